"""The precision gate: a bundle may run on a runtime other than torch fp32 only if that costs it
at most MAX_F1_LOSS held-out macro-F1; ``--precision auto`` takes the fastest runtime it allows.

    bundle + its validation split --(torch fp32 and each runtime, on CPU, through inference.run_rows)-->
        paired held-out macro-F1 change, 95% bootstrap interval, seconds --> allowed or refused

Runtimes (``RUNTIMES``): torch fp32, bf16 (autocast to bfloat16), int8 (dynamic quantization of
every nn.Linear, ``prepare_model``); ONNX Runtime fp32 and int8 (the bundle exported to ONNX,
``emotions.onnx_model``). Training and the head sweep run the gate for ``auto_candidates()`` when
they write a bundle (``save_checked_bundle``) and record each check in its metrics.json with the
kernels and kind of CPU it was made on; tagging reads those (``known_checks``), or runs the gate
once per bundle and CPU kind and caches it. Thresholds are applied to the runtime they were
checked for.

torch is imported inside the functions: tagging's Ray Data read tasks import this module.
"""

from __future__ import annotations

import functools
import logging
import os
import time
import warnings

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
WARMUP_ROWS = 64  # scored once per precision before the timed pass, so the timings compare


# name -> (backend, numeric precision). The torch names are those bundles and outputs always had.
RUNTIMES = {
    "fp32": ("torch", "fp32"),
    "bf16": ("torch", "bf16"),
    "int8": ("torch", "int8"),
    "onnx-fp32": ("onnxruntime", "fp32"),
    "onnx-int8": ("onnxruntime", "int8"),
}
GPU_RUNTIMES = ("fp32", "bf16")  # the others run on CPU only


class PrecisionError(ValueError):
    """The gate cannot run (its validation data is unreadable); the message says what to do."""


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
    """Whether this CPU computes bf16 itself (AVX512-BF16, AMX, Arm BF16); elsewhere torch emulates
    it, slower than fp32."""
    return any(f in cpu_kind().split()[1:] for f in ("avx512_bf16", "amx_bf16", "bf16"))


def kernels(name: str) -> str:
    """What a check of runtime ``name`` depends on besides the bundle: the runtime's version and
    kernels, and the kind of CPU."""
    import torch

    backend, _ = RUNTIMES[name]
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


def check_runtimes(bundle, names: list[str], seed: int = 0) -> dict[str, dict]:
    """The gate for each runtime in ``names`` (any but fp32), on the bundle's own validation split
    (tokenized as training tokenized it), through the one inference loop (``inference.run_rows``,
    on CPU here): torch fp32 and the runtime compared on held-out halves
    (``evaluation.paired_change``: thresholds fitted on fp32 outputs of one half, scored on the
    other, both ways), with a 95% paired bootstrap interval, the share of rows whose label set
    changes, how much more often than fp32 it tags its most over-tagged label, and the seconds each
    pass took (the same threads for all). ``allowed`` when the interval's low end is above
    -MAX_F1_LOSS and no label is tagged over MAX_SHARE_CHANGE times as often as in fp32;
    ``verdict`` says so in a sentence. -> {name: check}.
    PrecisionError when the validation data cannot be read or a runtime cannot be built."""
    import torch

    from emotions.batching import tokenize
    from emotions.data import DataError
    from emotions.evaluation import rule_of
    from emotions.inference import run_rows
    from emotions.onnx_model import OnnxExportError

    unknown = [n for n in names if n not in RUNTIMES or n == "fp32"]
    assert not unknown, unknown
    seed = bundle.config.get("seed", seed)
    try:
        validation = validation_set(bundle, seed)
    except DataError as error:
        raise PrecisionError(
            f"--precision {'/'.join(names)} is checked on the bundle's validation data, which "
            f"cannot be read here ({error}); tag in fp32 (--precision fp32)"
        ) from error
    tokens = tokenize(validation.texts, validation.labels, bundle.tokenizer, bundle.max_length)
    pad_id = bundle.tokenizer.pad_token_id or 0
    threads = torch.get_num_threads()
    probs, seconds = {}, {}
    for name in ["fp32", *names]:
        try:
            model = runtime_model(bundle, name, threads)
        except OnnxExportError as error:
            raise PrecisionError(str(error)) from error
        warmup = tokens.select(np.arange(min(WARMUP_ROWS, len(tokens))))
        run_rows(model, warmup, pad_id, batch_size=CPU_BATCH, device="cpu", precision=name)
        start = time.perf_counter()
        probs[name] = run_rows(model, tokens, pad_id, batch_size=CPU_BATCH, device="cpu", precision=name).numpy()
        seconds[name] = time.perf_counter() - start
    return {
        name: _check(bundle, validation, probs["fp32"], probs[name], name, seconds, seed, rule_of(bundle.config))
        for name in names
    }


def _check(bundle, validation, reference, candidate, name, seconds, seed, rule) -> dict:
    from emotions.evaluation import paired_change

    check = paired_change(validation.labels, reference, candidate, seed=seed, rule=rule)
    low, high = check["interval_95"]
    shares = check["share_change"] or {"label": None, "ratio": 1.0}
    f1_ok, shares_ok = low > -MAX_F1_LOSS, shares["ratio"] <= MAX_SHARE_CHANGE
    allowed = f1_ok and shares_ok
    backend, precision = RUNTIMES[name]
    verdict = (
        f"{name} vs fp32 on bundle {bundle.hash}, held-out halves of {len(validation)} examples "
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
        "kernels": kernels(name),
    }


def fastest_allowed(checks: dict[str, dict]) -> str:
    """The runtime ``--precision auto`` picks from ``checks`` ({name: check}): the fastest one the
    gate allowed, if faster than torch fp32 in its own check; else fp32."""
    allowed = [c for c in checks.values() if c["allowed"] and c["speedup"] > 1.0]
    return min(allowed, key=lambda c: c["seconds"] / c["fp32_s"])["precision"] if allowed else "fp32"


def known_checks(bundle, names: list[str]) -> dict[str, dict]:
    """The gate's checks of ``names`` valid on this machine: those recorded in the bundle (by
    training) or in the local cache with this machine's kernels and today's bounds, the rest
    run now and cached (``onnx_model.cache_dir()``/checks). Each says where it came from (``source``)."""
    import json

    from emotions.onnx_model import cache_dir

    cached_file = cache_dir() / "checks" / f"{bundle.hash}.json"
    try:
        cached = json.loads(cached_file.read_text())
    except (OSError, ValueError):
        cached = {}
    recorded = bundle.metrics.get("precision_checks") or {}
    found = {}
    for name in names:
        valid = {"kernels": kernels(name), "max_loss": MAX_F1_LOSS, "max_share_change": MAX_SHARE_CHANGE}
        if all((recorded.get(name) or {}).get(k) == v for k, v in valid.items()):
            found[name] = {**recorded[name], "source": "the bundle's metrics.json"}
        elif all((cached.get(name) or {}).get(k) == v for k, v in valid.items()):
            found[name] = {**cached[name], "source": f"checked earlier on this machine ({cached_file})"}
    missing = [n for n in names if n not in found]
    if missing:
        log.info("checking %s on this machine (%s): the bundle records no check of them here", missing, cpu_kind())
        fresh = check_runtimes(bundle, missing)
        cached_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached_file.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({**cached, **fresh}, indent=1))
        os.replace(tmp, cached_file)
        found.update({n: {**c, "source": "checked now"} for n, c in fresh.items()})
    return {n: found[n] for n in names}


def save_checked_bundle(output, precisions: list[str] | None = None, **fields):
    """``bundle.save_bundle(output, **fields)``, then the precision gate for each runtime of
    ``precisions`` (default: ``auto_candidates()``) on the saved bundle, recorded in its
    metrics.json (the bundle is written again with it), so that tagging on this kind of CPU picks
    its runtime without running the gate. -> the bundle's path."""
    from emotions.bundle import load_bundle, save_bundle

    start = time.perf_counter()
    path = save_bundle(output, **fields)
    try:
        checks = check_runtimes(load_bundle(path), precisions or auto_candidates())
    except PrecisionError as error:  # the bundle stands; tagging checks on first use, or tags in fp32
        log.warning("no precision checks recorded in the bundle: %s", error)
        return path
    path = save_bundle(output, **{**fields, "metrics": {**fields["metrics"], "precision_checks": checks}})
    log.info("precision checks recorded in the bundle in %.1fs", time.perf_counter() - start)
    return path
