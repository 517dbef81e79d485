"""The precision gate: a bundle may run on a runtime other than torch fp32 only if that costs it
at most MAX_F1_LOSS held-out macro-F1; ``--precision auto`` takes the fastest runtime it allows.

    bundle + its validation split --(torch fp32 and each runtime, on a device, through inference.run_rows)-->
        paired held-out macro-F1 change, 95% bootstrap interval, seconds --> allowed or refused

Runtimes (``RUNTIMES``): torch fp32, bf16 (autocast to bfloat16), int8 (dynamic quantization of
every nn.Linear, ``prepare_model``); ONNX Runtime fp32 and int8 (the bundle exported to ONNX,
``emotions.onnx_model``). Training and the head sweep run the gate for ``auto_candidates()`` when
they write a bundle (``save_checked_bundle``) and record each check in its metrics.json with the
kernels and kind of CPU it was made on (``precision_checks``); a run on GPUs also checks bf16 on
one of its GPUs (``checks_on_gpu``: a Ray task, never the driver's CPU, waited on for at most
GPU_CHECK_TIMEOUT_S) and records that under
``gpu_precision_checks`` with the GPU's name, compute capability and torch/CUDA versions, so it
matches only that kind of GPU. Tagging reads those (``known_checks``), or runs the gate once per
bundle and device kind and caches it.

The reference is torch fp32 with IEEE float32 matmuls (TF32 off): the numerics a bundle's
thresholds are fitted at (``fit_precision``, recorded in bundle.json), on CPU and GPU alike.

What a device can run is decided from a ``Device`` (``describe_device`` is the one place that asks
torch.cuda), by pure functions: ``autocast_dtype``/``needs_grad_scaler`` (training steps),
``gpu_candidates`` (tagging), ``uses_tf32`` (fp32 matmuls on Ampere and later).

torch is imported inside the functions: tagging's Ray Data read tasks import this module.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import time
import warnings
from dataclasses import asdict, dataclass

import numpy as np

log = logging.getLogger("emotions.precision")

# bf16/int8 is refused unless its 95% interval rules out a held-out macro-F1 loss larger than this.
# 0.01: on GoEmotions dev (5,426 comments) a held-out macro-F1 difference is itself only good to
# about +-0.01, so a tighter bound would refuse precisions for noise; and 0.01 is 2% of the
# default bundle's ~0.51, far below what changes any label's share in a night's tags.
MAX_F1_LOSS = 0.01
# ... and unless no label (of those with 10+ positives) is tagged, held out, more than this many
# times as often as fp32 tags it: a runtime can keep macro-F1 and still over-tag one label (a barely
# trained tiny model's int8 tagged amusement on 56% of rows where fp32 kept it near its 5.6%).
MAX_SHARE_CHANGE = 1.5
CPU_BATCH = 16  # rows per forward pass on CPU: the gate's, and tagging's CPU actors'
GPU_BATCH = 256  # rows per forward pass on a GPU: the gate's, and tagging's GPU actors'
WARMUP_ROWS = 64  # scored once per precision before the timed pass, so the timings compare
# The longest the driver waits for each Ray task of ``checks_on_gpu``: for a GPU (freed, or on a node
# the autoscaler starts: minutes) and the check on it (under a minute for MiniLM on GoEmotions dev).
GPU_CHECK_TIMEOUT_S = 600


# name -> (backend, numeric precision). The torch names are those bundles and outputs always had.
RUNTIMES = {
    "fp32": ("torch", "fp32"),
    "bf16": ("torch", "bf16"),
    "int8": ("torch", "int8"),
    "onnx-fp32": ("onnxruntime", "fp32"),
    "onnx-int8": ("onnxruntime", "int8"),
}
GPU_RUNTIMES = ("fp32", "bf16")  # the others run on CPU only
# Ampere and later compute bfloat16 and TF32 in their tensor cores. Before it (T4: 7.5, V100: 7.0)
# torch emulates bf16, slower than fp32, though ``torch.cuda.is_bf16_supported()`` may say True
# (it counts emulation): so the capability decides, not that call.
NATIVE_CAPABILITY = (8, 0)
# Where each device kind's checks live: the bundle's metrics.json key, the cache file's suffix.
RECORDED = {"cpu": "precision_checks", "cuda": "gpu_precision_checks"}


@dataclass(frozen=True)
class Device:
    """What a precision decision needs to know of the device a pass runs on. ``describe_device``
    builds it from torch; tests build it by hand (``gpu_device("NVIDIA T4", (7, 5))``)."""

    kind: str  # "cpu" or "cuda"
    name: str  # the GPU's name ("NVIDIA A100-SXM4-80GB"), or the CPU's kind (``cpu_kind()``)
    capability: tuple[int, int] | None = None  # CUDA compute capability; None on CPU
    bf16: bool = False  # computes bfloat16 natively (CPU: AVX512-BF16, AMX, Arm BF16)
    tf32: bool = False  # has TF32 tensor cores for float32 matmuls
    versions: str = ""  # "torch 2.5.1, cuda 12.4": what a check made on it also depends on

    def __str__(self) -> str:
        return f"{self.name} (compute {self.capability[0]}.{self.capability[1]})" if self.capability else self.name


class PrecisionError(ValueError):
    """The gate cannot run (its validation data is unreadable); the message says what to do."""


class GpuCheckTimeout(PrecisionError):
    """No GPU of the Ray cluster ran a task of ``checks_on_gpu`` within its timeout (none free, or
    the autoscaler did not start one); the task was cancelled. Callers say what to do."""


def quantize_int8(model):
    """Dynamic int8 weights for every nn.Linear (activations quantized on the fly), CPU only.
    Per-channel scales: on the MiniLM bundle they halve per-tensor's macro-F1 loss."""
    import torch
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    with warnings.catch_warnings():  # torch announces the move of this API to torchao
        warnings.simplefilter("ignore")
        return quantize_dynamic(model, {torch.nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8)


def prepare_model(model, precision: str):
    """The torch model to run at ``precision``: int8 quantizes it (in place), fp32 and bf16 leave it."""
    return quantize_int8(model) if precision == "int8" else model


def runtime_model(bundle, name: str, threads: int | None = None, exported: bytes | None = None):
    """What ``inference.run_rows`` runs for runtime ``name``: the bundle's torch model (fp32, bf16),
    a quantized copy of it (int8), or an ONNX Runtime session (onnx-*) over ``exported`` (the
    bytes tagging's driver sent) or the bundle's cached export."""
    import copy

    backend, precision = RUNTIMES[name]
    if backend == "torch":
        return prepare_model(copy.deepcopy(bundle.model) if precision == "int8" else bundle.model, precision)
    from emotions.onnx_model import OnnxClassifier, load_onnx

    model = OnnxClassifier(exported, threads) if exported is not None else load_onnx(bundle, precision, threads)
    if model.bundle_hash != bundle.hash:
        raise PrecisionError(f"the ONNX model was exported from bundle {model.bundle_hash}, not {bundle.hash}")
    return model


@functools.lru_cache(maxsize=1)
def cpu_kind() -> str:
    """The CPU features the runtimes' kernels pick by (int8 dot products, native bf16), e.g.
    "x86_64 avx2" or "x86_64 avx512f avx512_vnni avx512_bf16 amx_bf16": a check recorded on one kind
    of CPU says nothing of another."""
    import platform

    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as info:
            line = next((line for line in info if line.startswith(("flags", "Features"))), ":")
        flags = set(line.split(":", 1)[1].split())
    except OSError:  # not Linux: the machine name alone
        pass
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "asimddp", "bf16")
    return " ".join([platform.machine(), *[f for f in wanted if f in flags]])


def native_bf16() -> bool:
    """Whether this CPU computes bf16 itself (AVX512-BF16, AMX), as oneDNN sees it
    (``environment.cpu_has_bf16``, which training also decides by); elsewhere torch emulates it,
    slower than fp32."""
    from emotions import environment

    return environment.cpu_has_bf16()


def gpu_device(name: str, capability: tuple[int, int], versions: str = "") -> Device:
    """A CUDA GPU as the decisions see it: bf16 and TF32 from its compute capability alone."""
    capability = (int(capability[0]), int(capability[1]))
    native = capability >= NATIVE_CAPABILITY
    return Device("cuda", name, capability, bf16=native, tf32=native, versions=versions)


@functools.lru_cache(maxsize=8)
def describe_device(device="cpu") -> Device:
    """The ``Device`` of a torch device (a name such as "cuda:0", or a torch.device): the one
    function that asks torch.cuda."""
    import torch

    device = torch.device(device)
    torch_version = f"torch {torch.__version__.split('+')[0]}"
    if device.type != "cuda":
        return Device("cpu", cpu_kind(), bf16=native_bf16(), versions=torch_version)
    index = device.index if device.index is not None else torch.cuda.current_device()
    return gpu_device(
        torch.cuda.get_device_name(index),
        torch.cuda.get_device_capability(index),
        f"{torch_version}, cuda {torch.version.cuda}",
    )


def autocast_dtype(device: Device, wanted: bool):
    """The dtype a pass that asked for reduced precision (``wanted``: scaling.bf16 on GPU, the
    resolved scaling.cpu_bf16 on CPU) autocasts to on ``device``: bfloat16, except on a GPU without
    native bf16 (T4, V100), where float16 runs on their tensor cores instead (its training steps
    then need a gradient scaler: ``needs_grad_scaler``); None when not wanted (float32)."""
    import torch

    if not wanted:
        return None
    return torch.float16 if device.kind == "cuda" and not device.bf16 else torch.bfloat16


def needs_grad_scaler(dtype) -> bool:
    """Whether training steps under autocast to ``dtype`` need ``torch.amp.GradScaler``: float16's
    5-bit exponent underflows small gradients; bfloat16 keeps float32's range."""
    import torch

    return dtype == torch.float16


def gpu_candidates(device: Device) -> list[str]:
    """The runtimes ``--precision auto`` chooses among on this GPU, besides torch fp32: bf16 where
    the GPU computes it natively; none elsewhere (emulated bf16 is slower than fp32)."""
    return ["bf16"] if device.kind == "cuda" and device.bf16 else []


def uses_tf32(device: Device) -> bool:
    """Whether float32 matmuls on ``device`` run in TF32 where this project allows it (tagging's
    fp32 passes and the training steps; never the gate's reference or the passes thresholds are
    fitted on): on GPUs with TF32 tensor cores."""
    return device.kind == "cuda" and device.tf32


def runtime_label(name: str, device: Device) -> str:
    """How a runtime ran on ``device``, for logs and records: "fp32 (tf32 matmuls)" where fp32
    matmuls run in TF32."""
    return f"{name} (tf32 matmuls)" if name == "fp32" and uses_tf32(device) else name


def enable_tf32(device: Device) -> bool:
    """TF32 float32 matmuls for the rest of this process where ``device`` has them (a training
    worker's steps); True if on. Passes that must be IEEE float32 run under ``cuda_matmuls``."""
    import torch

    if not uses_tf32(device):
        return False
    torch.set_float32_matmul_precision("high")  # on CUDA: TF32; the stable API across torch versions
    torch.backends.cudnn.allow_tf32 = True  # convolutions (torch's default; BERT encoders have none)
    return True


@contextlib.contextmanager
def cuda_matmuls(device, tf32: bool = False):
    """Inside: float32 matmuls on a CUDA ``device`` in TF32 (``tf32``) or IEEE float32; after: as
    before. On CPU nothing changes (the setting would also reach oneDNN)."""
    import torch

    if torch.device(device).type != "cuda":
        yield
        return
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def fit_precision(kind: str) -> dict:
    """What a bundle records (bundle.json ``thresholds_precision``) of the outputs its thresholds
    were fitted on, computed on a device of ``kind`` ("cpu", "cuda"): always torch fp32 with IEEE
    matmuls (TF32 off), so a bundle's thresholds mean the same on every device, and the gate's
    reference runs at that precision."""
    return {"backend": "torch", "numeric_precision": "fp32", "matmuls": "ieee", "device": kind}


def kernels(name: str, device: Device | None = None) -> str:
    """What a check of runtime ``name`` depends on besides the bundle: the runtime's version and
    kernels, and the kind of CPU; on a GPU, torch's and CUDA's versions and the GPU's name and
    compute capability."""
    import torch

    backend, _ = RUNTIMES[name]
    if device is not None and device.kind == "cuda":
        return f"{device.versions}, {device}"
    if backend == "onnxruntime":
        from emotions.onnx_model import versions

        return f"{versions()}, {cpu_kind()}"
    return f"torch {torch.__version__.split('+')[0]}, {torch.backends.quantized.engine}, {cpu_kind()}"


def auto_candidates() -> list[str]:
    """The runtimes ``--precision auto`` chooses among on this CPU, besides torch fp32: ONNX
    Runtime int8 and fp32, torch's int8, and bf16 where the CPU computes it natively."""
    return ["onnx-int8", "int8", *(["bf16"] if native_bf16() else []), "onnx-fp32"]


def validation_set(bundle, seed: int = 0):
    """The bundle's validation rows, as its thresholds were fitted on them (DataError if unreadable)."""
    from emotions.data import load_labelled

    data = bundle.config["data"]
    validation = load_labelled(
        data["validation"],
        text_column=data["text_column"],
        labels_column=data["labels_column"],
        label_format=data["label_format"],
    )
    return validation.take(data["max_validation_examples"], bundle.config.get("seed", seed))


def check_precision(bundle, precision: str, seed: int = 0) -> dict:
    """The gate for one runtime but torch fp32: ``check_runtimes(bundle, [precision])``."""
    return check_runtimes(bundle, [precision], seed)[precision]


def check_runtimes(
    bundle, names: list[str], seed: int = 0, device: Device | None = None, validation=None
) -> dict[str, dict]:
    """The gate for each runtime in ``names`` (any but fp32), on the bundle's own validation split
    (``validation``: those rows, read beforehand; tokenized as training tokenized them), through the
    one inference loop (``inference.run_rows``, on ``device``: the CPU by default, else the GPU the
    bundle's model is on): torch fp32 and the runtime compared on held-out halves
    (``evaluation.paired_change``: thresholds fitted on fp32 outputs of one half, scored on the
    other, both ways), with a 95% paired bootstrap interval, the share of rows whose label set
    changes, how much more often than fp32 it tags its most over-tagged label, and the seconds each
    pass took (the same threads for all). ``allowed`` when the interval's low end is above
    -MAX_F1_LOSS and no label is tagged over MAX_SHARE_CHANGE times as often as in fp32;
    ``verdict`` says so in a sentence. -> {name: check}.
    PrecisionError when the validation data cannot be read or a runtime cannot be built."""
    import torch

    from emotions.batching import tokenize
    from emotions.inference import run_rows
    from emotions.onnx_model import OnnxExportError

    unknown = [n for n in names if n not in RUNTIMES or n == "fp32"]
    assert not unknown, unknown
    device = device or describe_device("cpu")
    on = next(bundle.model.parameters()).device if device.kind == "cuda" else torch.device("cpu")
    seed = bundle.config.get("seed", seed)
    validation = validation if validation is not None else read_validation(bundle, names, seed)
    tokens = tokenize(validation.texts, validation.labels, bundle.tokenizer, bundle.max_length)
    pad_id = bundle.tokenizer.pad_token_id or 0
    threads, batch = torch.get_num_threads(), GPU_BATCH if device.kind == "cuda" else CPU_BATCH
    probs, seconds = {}, {}
    for name in ["fp32", *names]:
        try:
            model = runtime_model(bundle, name, threads)
        except OnnxExportError as error:
            raise PrecisionError(str(error)) from error
        warmup = tokens.select(np.arange(min(WARMUP_ROWS, len(tokens))))
        # The reference is IEEE fp32 (run_rows' default, TF32 off) on GPUs too: the thresholds were
        # fitted at it (``fit_precision``), so a runtime is judged by what it changes against them.
        # A TF32 reference would judge bf16 against an approximation, and let the two errors add up.
        # Its seconds are IEEE fp32's too: fp32 tagging on a TF32 GPU is faster than that, so a GPU
        # check's speedup is bf16's best case against fp32.
        run_rows(model, warmup, pad_id, batch_size=batch, device=on, precision=name)
        if on.type == "cuda":
            torch.cuda.synchronize(on)  # the warm-up's kernels are queued: not part of the timing
        start = time.perf_counter()
        probs[name] = run_rows(model, tokens, pad_id, batch_size=batch, device=on, precision=name).cpu().numpy()
        seconds[name] = time.perf_counter() - start  # .cpu() waited for the GPU
    return {name: _check(bundle, validation, probs["fp32"], probs[name], name, seconds, seed, device) for name in names}


def read_validation(bundle, names: list[str], seed: int = 0):
    """``validation_set``, or PrecisionError saying what to do (``unreadable``)."""
    from emotions.data import DataError

    try:
        return validation_set(bundle, seed)
    except DataError as error:
        raise unreadable(names, error) from error


def unreadable(names: list[str], error: Exception) -> PrecisionError:
    """What to do when the validation data the checks of ``names`` run on cannot be read here."""
    return PrecisionError(
        f"--precision {'/'.join(names)} is checked on the bundle's validation data, which "
        f"cannot be read here ({error}); tag in fp32 (--precision fp32)"
    )


def _check(bundle, validation, reference, candidate, name, seconds, seed, device: Device) -> dict:
    from emotions.evaluation import paired_change, rule_of

    check = paired_change(validation.labels, reference, candidate, seed=seed, rule=rule_of(bundle.config))
    low, high = check["interval_95"]
    shares = check["share_change"] or {"label": None, "ratio": 1.0}
    f1_ok, shares_ok = within_bounds(check)
    allowed = f1_ok and shares_ok
    backend, precision = RUNTIMES[name]
    where = f" on {device}" if device.kind == "cuda" else ""
    verdict = (
        f"{name} vs fp32{where} on bundle {bundle.hash}, held-out halves of {len(validation)} examples "
        f"of {validation.source}: macro-F1 {check['heldout_macro_f1_reference']:.4f} -> "
        f"{check['heldout_macro_f1_candidate']:.4f} ({check['change']:+.4f}, 95% interval "
        f"{low:+.4f} to {high:+.4f}); label sets change on {check['rows_changed']:.1%} of rows; "
        f"most over-tagged against fp32: {shares['label']} {shares['ratio']:.2f}x; "
        f"{seconds['fp32'] / seconds[name]:.2f}x fp32's speed; "
        + (f"a loss over {MAX_F1_LOSS} is ruled out" if f1_ok else f"a loss over {MAX_F1_LOSS} is not ruled out")
        + ("" if shares_ok else f", and {shares['label']} is tagged over {MAX_SHARE_CHANGE}x as often as in fp32")
        + ("" if allowed else ": tag in fp32 (--precision fp32)")
    )
    log.info("%s", verdict)
    return {
        "precision": name,
        "backend": backend,
        "numeric_precision": precision,
        **check,
        "max_loss": MAX_F1_LOSS,
        "max_share_change": MAX_SHARE_CHANGE,
        "fp32_s": seconds["fp32"],
        f"{name}_s": seconds[name],
        "seconds": seconds[name],
        "speedup": seconds["fp32"] / seconds[name],
        "allowed": allowed,
        "verdict": verdict,
        "kernels": kernels(name, device),
        "device": asdict(device),
        "reference": fit_precision(device.kind),  # what fp32 ran as: the numerics thresholds are fitted at
        # what the bundle says its thresholds were fitted at (None: a bundle made before it was recorded)
        "thresholds_precision": bundle.thresholds_precision,
    }


def within_bounds(change: dict) -> tuple[bool, bool]:
    """The gate's two bounds on a paired change (``evaluation.paired_change``): (a macro-F1 loss over
    MAX_F1_LOSS is ruled out, no label is tagged over MAX_SHARE_CHANGE times as often)."""
    shares = change["share_change"] or {"ratio": 1.0}
    return change["interval_95"][0] > -MAX_F1_LOSS, shares["ratio"] <= MAX_SHARE_CHANGE


def fastest_allowed(checks: dict[str, dict]) -> str:
    """The runtime ``--precision auto`` picks from ``checks`` ({name: check}): the fastest one the
    gate allowed, if faster than torch fp32 in its own check; else fp32."""
    allowed = [c for c in checks.values() if c["allowed"] and c["speedup"] > 1.0]
    return min(allowed, key=lambda c: c["seconds"] / c["fp32_s"])["precision"] if allowed else "fp32"


def usable_checks(stored: dict, names: list[str], device: Device) -> dict[str, dict]:
    """The checks of ``names`` in ``stored`` ({name: check}) that hold on ``device``: made with its
    kernels (on a GPU: the same GPU name, compute capability, torch and CUDA) under today's bounds."""
    found = {}
    for name in names:
        valid = {"kernels": kernels(name, device), "max_loss": MAX_F1_LOSS, "max_share_change": MAX_SHARE_CHANGE}
        check = stored.get(name) or {}
        if all(check.get(k) == v for k, v in valid.items()):
            found[name] = check
    return found


def stored_checks(bundle_hash: str, recorded: dict, names: list[str], device: Device) -> dict[str, dict]:
    """The checks of ``names`` valid on ``device`` that need no run: those in ``recorded`` (the bundle's
    record for the device's kind, ``RECORDED``), then those cached on this machine
    (``onnx_model.cache_dir()``/checks). Each says where it came from (``source``)."""
    cached_file = _cache_file(bundle_hash, device)
    in_bundle = usable_checks(recorded, names, device)
    earlier = usable_checks(_read_cache(cached_file), [n for n in names if n not in in_bundle], device)
    found = {n: {**c, "source": "the bundle's metrics.json"} for n, c in in_bundle.items()}
    found.update({n: {**c, "source": f"checked earlier on this machine ({cached_file})"} for n, c in earlier.items()})
    return found


def _cache_file(bundle_hash: str, device: Device):
    from emotions.onnx_model import cache_dir

    suffix = "" if device.kind == "cpu" else f".{device.kind}"
    return cache_dir() / "checks" / f"{bundle_hash}{suffix}.json"


def _read_cache(path) -> dict:
    import json

    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def known_checks(bundle, names: list[str], device: Device | None = None, validation=None) -> dict[str, dict]:
    """The gate's checks of ``names`` valid on ``device`` (default: this CPU; a GPU: the one the
    bundle's model is on): those recorded in the bundle (by training; ``RECORDED`` says under which
    key for the device's kind) or in this machine's cache (``stored_checks``), the rest run now on
    that device and cached (``onnx_model.cache_dir()``/checks). Each says where it came from
    (``source``). The validation rows are read (or ``validation`` used) only if a check is missing."""
    import json

    device = device or describe_device("cpu")
    found = stored_checks(bundle.hash, bundle.metrics.get(RECORDED[device.kind]) or {}, names, device)
    missing = [n for n in names if n not in found]
    if missing:
        log.info("checking %s on this machine (%s): the bundle records no check of them here", missing, device)
        fresh = check_runtimes(bundle, missing, device=device, validation=validation)
        cached_file = _cache_file(bundle.hash, device)
        cached_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached_file.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({**_read_cache(cached_file), **fresh}, indent=1))
        os.replace(tmp, cached_file)
        found.update({n: {**c, "source": "checked now"} for n, c in fresh.items()})
    return {n: found[n] for n in names}


def choose_gpu_runtime(requested: str, device: Device, checks: dict[str, dict]) -> str:
    """The runtime GPU actors tag with: "fp32" as asked; under "auto", bf16 where ``device``
    computes it natively and a check made on this kind of GPU (``usable_checks``) allowed it
    and found it faster, else fp32; "bf16" asked for by name is refused (PrecisionError) where
    the GPU has no native bf16 or its check is missing or refused it, not downgraded."""
    if requested == "fp32":
        return "fp32"
    assert requested in ("auto", "bf16"), requested
    valid = usable_checks(checks, gpu_candidates(device), device)
    if requested == "auto":
        return fastest_allowed(valid)
    if "bf16" not in gpu_candidates(device):
        raise PrecisionError(
            f"{device} has no native bfloat16 (compute capability under "
            f"{NATIVE_CAPABILITY[0]}.{NATIVE_CAPABILITY[1]}): torch would emulate it, slower than fp32; "
            "tag in fp32 (--precision fp32)"
        )
    if "bf16" not in valid:
        raise PrecisionError(f"no check of bf16 on {device} could be made; tag in fp32 (--precision fp32)")
    if not valid["bf16"]["allowed"]:
        raise PrecisionError(valid["bf16"]["verdict"])
    return "bf16"


def checks_on_gpu(
    bundle, wanted: list[str], reuse: bool = True, timeout_s: float | None = None, validation=None
) -> tuple[Device, dict[str, dict]]:
    """The gate for ``wanted`` on one GPU of the connected Ray cluster, never on this process's CPU,
    in Ray tasks (one GPU each, ``run_on_gpu``: each waited on for at most ``timeout_s``, default
    GPU_CHECK_TIMEOUT_S). With ``reuse``, a first task gets only the bundle's recorded checks,
    describes its GPU and keeps those of ``wanted`` the GPU computes natively (``gpu_candidates``)
    that are recorded for that kind of GPU or cached on its node (``stored_checks``): nothing more
    is read or sent when they cover them, so a bundle whose validation data this driver cannot read
    still uses its record. Only for a missing check (or, without ``reuse``, always: training's
    record of a new bundle) does a task get the bundle's files and its validation rows (read here:
    the GPU's node may not see their path; ``validation``: those rows, read beforehand) and run the
    gate there (``known_checks``).
    -> (the GPU, {name: check}). PrecisionError when the validation data is needed and cannot be
    read; GpuCheckTimeout when no GPU ran a task in time."""
    import ray

    from emotions.bundle import bundle_files

    if reuse:
        records = {key: bundle.metrics.get(key) or {} for key in RECORDED.values()}
        device, found, missing = run_on_gpu(
            _stored_on_gpu, (bundle.hash, records, wanted), timeout_s, f"look up the precision checks of {wanted}"
        )
        if not missing:
            return device, found
        wanted = missing
    validation = validation if validation is not None else read_validation(bundle, wanted)
    files = ray.put(bundle_files(bundle.path))
    return run_on_gpu(
        _checks_on_gpu,
        (files, bundle.hash, wanted, validation, reuse),
        timeout_s,
        f"run the precision checks of {wanted}",
    )


def gpu_task(function):
    """``function`` as a Ray task on one GPU whose worker process exits after it. Ray makes a GPU
    task's worker single-use (``max_calls=1``) only when ``num_gpus`` is given to ``ray.remote``
    itself (``RemoteFunction.__init__``); through ``.options`` the worker is reused, keeping its
    CUDA context and cached GPU memory from the actors that come next, and bound to the GPU it
    first used whatever ``CUDA_VISIBLE_DEVICES`` Ray gives the next task (ray-project/ray#47767)."""
    import ray

    return ray.remote(num_gpus=1, num_cpus=1, max_calls=1, max_retries=1)(function)


def run_on_gpu(function, args: tuple, timeout_s: float | None = None, what: str = "run precision checks"):
    """``function(*args)`` as a Ray task on one GPU of the connected cluster (the one place
    ``checks_on_gpu`` submits and waits): logged before the wait (a GPU may have to be freed, or
    started by the autoscaler) and after it. GpuCheckTimeout, the task cancelled, when it has not
    finished within ``timeout_s`` (default GPU_CHECK_TIMEOUT_S)."""
    import ray
    from ray.exceptions import GetTimeoutError

    timeout_s = GPU_CHECK_TIMEOUT_S if timeout_s is None else timeout_s
    task = gpu_task(function)
    log.info(
        "waiting up to %.0fs for a GPU of the Ray cluster to %s on (a Ray task asking for 1 GPU)",
        timeout_s,
        what,
    )
    start = time.monotonic()
    ref = task.remote(*args)
    try:
        result = ray.get(ref, timeout=timeout_s)
    except GetTimeoutError:  # a RayError: turned into one its callers tell from the others
        ray.cancel(ref, force=True)
        raise GpuCheckTimeout(
            f"no GPU of the Ray cluster ran the task to {what} within {timeout_s:.0f}s "
            "(none free, or the autoscaler did not start a GPU node); the task was cancelled"
        ) from None
    log.info("the GPU task to %s ran on %s (%.0fs)", what, result[0], time.monotonic() - start)
    return result


def _runnable(wanted: list[str], where: str) -> tuple[Device, list[str]]:
    """What a task of ``checks_on_gpu`` runs on (``where``), and the runtimes of ``wanted`` it can check there."""
    device = describe_device(where)
    names = [n for n in wanted if n in (gpu_candidates(device) if device.kind == "cuda" else auto_candidates())]
    if not names:
        log.info("%s: no runtime of %s to check here (no native bf16): tagging on it runs fp32", device, wanted)
    return device, names


def _stored_on_gpu(bundle_hash: str, records: dict, wanted: list[str], where: str = "cuda"):
    """``checks_on_gpu``'s first task (``where``: "cpu" in tests): (its device, the checks of
    ``wanted`` it can use without a run (``stored_checks``), those it would still have to run)."""
    device, names = _runnable(wanted, where)
    found = stored_checks(bundle_hash, records.get(RECORDED[device.kind]) or {}, names, device)
    return device, found, [n for n in names if n not in found]


def _checks_on_gpu(files, bundle_hash: str, wanted: list[str], validation, reuse: bool, where: str = "cuda"):
    """``checks_on_gpu``'s task that runs checks (``where``: "cpu" in tests)."""
    from emotions.bundle import load_bundle_files

    bundle = load_bundle_files(files, bundle_hash, device=where)
    device, names = _runnable(wanted, where)
    if not names:
        return device, {}
    if reuse:
        return device, known_checks(bundle, names, device, validation)
    return device, check_runtimes(bundle, names, device=device, validation=validation)


def save_checked_bundle(output, precisions: list[str] | None = None, gpu: bool = False, **fields):
    """``bundle.save_bundle(output, **fields)``, then the precision gate for each runtime of
    ``precisions`` (default: ``auto_candidates()``) on the saved bundle, on this CPU; with ``gpu``
    (the run trained on GPUs) also, first, bf16 on one of the cluster's GPUs (``checks_on_gpu``;
    none recorded, with a warning, if no GPU ran it within GPU_CHECK_TIMEOUT_S). Both are
    recorded in its metrics.json (the bundle is written again with them: ``precision_checks``,
    ``gpu_precision_checks``), so that tagging on this kind of CPU or GPU picks its runtime
    without running the gate. -> the bundle's path."""
    from emotions.bundle import load_bundle, save_bundle
    from emotions.data import DataError

    start = time.perf_counter()
    path = save_bundle(output, **fields)
    bundle, recorded = load_bundle(path), {}
    try:  # read once, for the GPU's checks and the CPU's
        validation, error_reading = validation_set(bundle), None
    except DataError as error:  # each check below is refused, as when it read them itself (read_validation)
        validation, error_reading = None, error
    if gpu:  # first: the CPU checks take minutes, after which the autoscaler may have removed the run's GPU node
        from ray.exceptions import RayError

        try:
            if error_reading is not None:
                raise unreadable(["bf16"], error_reading) from error_reading
            device, checks = checks_on_gpu(bundle, ["bf16"], reuse=False, validation=validation)
            recorded["gpu_precision_checks"] = checks
            log.info("GPU precision checks made on %s: %s", device, sorted(checks) or "none (no native bf16)")
        except (PrecisionError, RayError) as error:  # the trained bundle stands; tagging checks on first use
            hint = "; tagging on GPUs checks bf16 first" if isinstance(error, GpuCheckTimeout) else ""
            log.warning("no GPU precision check recorded in the bundle: %s%s", error, hint)
    try:
        names = precisions or auto_candidates()
        if error_reading is not None:
            raise unreadable(names, error_reading) from error_reading
        recorded["precision_checks"] = check_runtimes(bundle, names, validation=validation)
    except PrecisionError as error:  # the bundle stands; tagging checks on first use, or tags in fp32
        log.warning("no CPU precision checks recorded in the bundle: %s", error)
    if not recorded:
        return path
    path = save_bundle(output, **{**fields, "metrics": {**fields["metrics"], **recorded}})
    log.info("precision checks recorded in the bundle in %.1fs", time.perf_counter() - start)
    return path
