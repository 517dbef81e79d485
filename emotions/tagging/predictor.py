"""The encoder on a runtime, as tagging's actors run it: the bundle's tokenizer, tokenizing
with a character cap, the forward pass, and which runtime a run tags with (``resolve_runtime``).

The precision gate itself (``check_runtimes``, MAX_F1_LOSS, the runtimes) is
``emotions.precision``: training records its verdicts in every bundle, and tagging reads them here.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import numpy as np

from emotions.precision import (
    CPU_BATCH,
    GPU_BATCH,
    RUNTIMES,
    Device,
    GpuCheckTimeout,
    PrecisionError,
    auto_candidates,
    checks_on_gpu,
    choose_gpu_runtime,
    describe_device,
    fastest_allowed,
    known_checks,
    runtime_label,
    uses_tf32,
)
from emotions.storage import Folder
from emotions.tagging.settings import TaggingError

log = logging.getLogger("emotions.tagging")


ENCODER_BATCH = {"cpu": CPU_BATCH, "cuda": GPU_BATCH}
CHARS_PER_TOKEN_CAP = 100  # texts are cut to max_length * this many characters before tokenizing


def load_bundle_tokenizer(model: str):
    """The bundle's tokenizer alone: for a URI, only the small files beside it are downloaded
    (into a folder removed once the tokenizer is loaded), not the weights (``*.safetensors``).
    Format version 1 bundles keep it in tokenizer/."""
    import tempfile
    from pathlib import Path

    from transformers import AutoTokenizer

    folder = Folder.from_uri(model)
    if folder.is_file("tokenizer", "tokenizer_config.json"):  # bundle format version 1
        folder = folder.child("tokenizer")
    if folder.is_local:
        return AutoTokenizer.from_pretrained(folder.root, trust_remote_code=False)
    with tempfile.TemporaryDirectory(prefix="emotions-tokenizer-") as local:
        for info in folder.list():
            if info.is_file and not info.base_name.endswith(".safetensors"):
                (Path(local) / info.base_name).write_bytes(folder.read_bytes(info.base_name))
        return AutoTokenizer.from_pretrained(local, trust_remote_code=False)


def tokenize_texts(texts: list[str], tokenizer, max_length: int):
    """[n] texts -> TokenizedSet; texts are cut to max_length * CHARS_PER_TOKEN_CAP characters first
    (the tokenizer truncates to max_length tokens, but would split all of a 1 MB text first)."""
    from emotions.batching import tokenize  # torch: not imported by Ray Data's read tasks

    cap = max_length * CHARS_PER_TOKEN_CAP
    return tokenize([t[:cap] for t in texts], np.zeros((len(texts), 0), dtype=np.float32), tokenizer, max_length)


def predict_tokens(model, data, pad_id: int, batch_size: int, precision: str, device: str) -> np.ndarray:
    """[n] tokenized texts -> [n, 28] probabilities (float32): ``inference.run_rows``, the loop
    evaluation and training score with, at the tagging run's precision and device. ``model`` is
    the runtime's (``precision.runtime_model``). fp32 on a GPU with TF32 runs its matmuls in TF32
    ("fp32 (tf32 matmuls)"; ``tagging_tf32``)."""
    from emotions.inference import run_rows  # torch: not imported by Ray Data's read tasks

    tf32 = tagging_tf32(precision, device)
    probs = run_rows(model, data, pad_id, batch_size=batch_size, device=device, precision=precision, tf32=tf32)
    return probs.cpu().numpy()


@functools.lru_cache(maxsize=8)
def tagging_tf32(precision: str, device: str) -> bool:
    """Whether tagging's passes at ``precision`` on ``device`` run float32 matmuls in TF32: fp32 on a
    GPU that has it (Ampere and later); logged once per actor. TF32 keeps float32's range and
    accumulation and rounds matmul inputs to 10 mantissa bits, finer than the 7 of bf16, which the
    gate measures on such GPUs; thresholds and the gate's reference stay IEEE fp32."""
    if precision != "fp32" or device == "cpu":
        return False
    gpu = describe_device(device)
    log.info("tagging on %s in %s", gpu, runtime_label("fp32", gpu))
    return uses_tf32(gpu)


@dataclass(frozen=True)
class Resolved:
    """Which runtime a run tags with (``resolve_runtime``), and what decided it."""

    precision: str  # the runtime every actor tags with (RUNTIMES)
    check: dict | None  # the check that allows it; None for fp32 (the thresholds' own)
    checks: dict  # every check consulted {name: check}
    device: Device | None = None  # the GPU a GPU actors' choice was made on; None on CPU, or if no GPU task ran


def resolve_precision(
    bundle, requested: str, gpu: bool, ray_address: str | None = None
) -> tuple[str, dict | None, dict]:
    """(runtime to tag with, the check that allows it, every check consulted {name: check}):
    ``resolve_runtime`` without the device."""
    resolved = resolve_runtime(bundle, requested, gpu, ray_address)
    return resolved.precision, resolved.check, resolved.checks


def resolve_runtime(bundle, requested: str, gpu: bool, ray_address: str | None = None) -> Resolved:
    """The runtime a run tags with, the check that allows it and every check consulted.
    "auto": on CPU the fastest runtime of ``auto_candidates()`` the gate allows
    (``fastest_allowed``), from the checks recorded in the bundle at training time or cached on
    this machine, the missing ones run now (``known_checks``); fp32 if none is faster, or if the
    gate cannot run. On GPU actors (``gpu``): ``resolve_gpu_precision``. Any other name but fp32:
    its check, recorded or run now; a refusal raises TaggingError."""
    if requested == "fp32":
        return Resolved("fp32", None, {})
    if gpu:
        return resolve_gpu_precision(bundle, requested, ray_address)
    names = auto_candidates() if requested == "auto" else [requested]
    try:
        checks = known_checks(bundle, names)
    except PrecisionError as error:
        return _fp32_or_refuse(requested, error)
    if requested == "auto":
        chosen = fastest_allowed(checks)
        for name, check in checks.items():
            log.info("%s %s: %s", "chose" if name == chosen else "considered", name, check["verdict"])
        log.info("tagging with %s (--precision auto)", chosen)
        return Resolved(chosen, checks.get(chosen), checks)
    check = checks[requested]
    if not check["allowed"]:
        raise TaggingError(check["verdict"])
    return Resolved(requested, check, checks)


def resolve_gpu_precision(bundle, requested: str, ray_address: str | None = None) -> Resolved:
    """``resolve_runtime`` for GPU actors: the gate runs on the kind of GPU they tag on, never on
    this driver's CPU (oneDNN's bf16 says nothing of a GPU's). A Ray task on a GPU of the cluster
    at ``ray_address`` (joined here if not yet) reads its GPU's kind and takes the bf16 check
    recorded in the bundle or cached on its node for that kind, or runs it there
    (``precision.checks_on_gpu``, waited on for at most ``precision.GPU_CHECK_TIMEOUT_S``);
    ``choose_gpu_runtime`` decides: bf16 under auto only where the GPU computes it natively and the
    check allowed it, else fp32. No GPU in time: fp32 under auto (a warning), TaggingError for bf16.
    The choice is the driver's, once, so every actor tags at the same runtime (the output's key
    and manifest name it)."""
    from emotions import cluster

    cluster.connect(ray_address)
    current, most = cluster.resources()
    if max(current.get("GPU", 0), (most or {}).get("GPU", 0)) <= 0:
        reason = "the Ray cluster has no GPU to check bf16 on"
        return _fp32_or_refuse(requested, reason, f"--precision {requested}: {reason}; tag in fp32 (--precision fp32)")
    try:
        device, checks = checks_on_gpu(bundle, ["bf16"])
        chosen = choose_gpu_runtime(requested, device, checks)
    except PrecisionError as error:  # GpuCheckTimeout among them: no GPU ran the check in time
        refusal = None
        if isinstance(error, GpuCheckTimeout):
            refusal = (
                f"--precision {requested}: {error}; tag in fp32 (--precision fp32), or run again when the "
                "cluster can give a GPU to the check (it takes under a minute once it has one)"
            )
        return _fp32_or_refuse(requested, error, refusal)
    for name, check in checks.items():
        log.info("%s %s on %s: %s", "chose" if name == chosen else "considered", name, device, check["verdict"])
    log.info("tagging with %s on %s (--precision %s)", runtime_label(chosen, device), device, requested)
    return Resolved(chosen, checks.get(chosen), checks, device)


def _fp32_or_refuse(requested: str, reason: Exception | str, refusal: str | None = None) -> Resolved:
    """Where the runtime ``requested`` cannot be checked or used (``reason``): a runtime asked for
    by name is refused (TaggingError: ``refusal``, default ``reason``); auto tags in fp32, with a warning."""
    if requested != "auto":
        raise TaggingError(refusal or str(reason)) from (reason if isinstance(reason, Exception) else None)
    log.warning("tagging in fp32 (--precision auto): %s", reason)
    return Resolved("fp32", None, {})


def runtime_record(precision: str, gpu: bool, device: Device | None) -> dict:
    """What a tagged output's manifest records of how its runtime ran, beside ``precision``,
    ``backend`` and ``numeric_precision`` (which the output's key does not change with):
    ``runtime``, the runtime as it ran (``precision.runtime_label``: "fp32 (tf32 matmuls)" for fp32
    on a GPU with TF32), and ``gpu``, the GPU the choice was made on. GPU actors that tagged in fp32
    without a GPU task (``--precision fp32``, or no GPU in time) record the rule, not a GPU."""
    if not gpu:
        return {"runtime": precision, "gpu": None}
    if device is None:
        label = (
            "fp32 (tf32 matmuls on GPUs of compute 8.0+; GPU kind not checked)" if precision == "fp32" else precision
        )
        return {"runtime": label, "gpu": None}
    return {"runtime": runtime_label(precision, device), "gpu": str(device)}


def runtime_bytes(bundle, name: str) -> bytes | None:
    """The exported graph an ONNX runtime runs (from the local cache, or exported now), which the
    driver sends its actors so that no node exports; None for the torch runtimes."""
    backend, precision = RUNTIMES[name]
    if backend != "onnxruntime":
        return None
    from emotions.onnx_model import OnnxExportError, onnx_bytes

    try:
        return onnx_bytes(bundle, precision)
    except OnnxExportError as error:
        raise TaggingError(str(error)) from error


def check_summary(check: dict) -> dict:
    """The fields of a gate check a tagged output's manifest keeps."""
    keys = ("allowed", "change", "interval_95", "rows_changed", "speedup", "kernels", "source", "thresholds_precision")
    return {k: check.get(k) for k in keys}
