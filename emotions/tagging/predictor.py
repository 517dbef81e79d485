"""The encoder on a runtime, as tagging's actors run it: the bundle's tokenizer, tokenizing
with a character cap, the forward pass, and which runtime a run tags with (``resolve_precision``).

The precision gate itself (``check_runtimes``, MAX_F1_LOSS, the runtimes) is
``emotions.precision``: training records its verdicts in every bundle, and tagging reads them here.
"""

from __future__ import annotations

import logging

import numpy as np

from emotions.precision import CPU_BATCH, RUNTIMES, PrecisionError, auto_candidates, fastest_allowed, known_checks
from emotions.storage import Folder
from emotions.tagging.settings import TaggingError

log = logging.getLogger("emotions.tagging")


ENCODER_BATCH = {"cpu": CPU_BATCH, "cuda": 256}
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
    the runtime's (``precision.runtime_model``)."""
    from emotions.inference import run_rows  # torch: not imported by Ray Data's read tasks

    return run_rows(model, data, pad_id, batch_size=batch_size, device=device, precision=precision).cpu().numpy()


def resolve_precision(bundle, requested: str, gpu: bool) -> tuple[str, dict | None, dict]:
    """(runtime to tag with, the check that allows it, every check consulted {name: check}).
    "auto": on GPU fp32; on CPU the fastest runtime of ``auto_candidates()`` the gate allows
    (``fastest_allowed``), from the checks recorded in the bundle at training time or cached on
    this machine, the missing ones run now (``known_checks``); fp32 if none is faster, or if the
    gate cannot run. Any other name but fp32: its check, recorded or run now; a refusal raises
    TaggingError."""
    if requested == "fp32" or (requested == "auto" and gpu):
        return "fp32", None, {}
    names = auto_candidates() if requested == "auto" else [requested]
    try:
        checks = known_checks(bundle, names)
    except PrecisionError as error:
        if requested != "auto":
            raise TaggingError(str(error)) from error
        log.warning("tagging in fp32: %s", error)
        return "fp32", None, {}
    if requested == "auto":
        chosen = fastest_allowed(checks)
        for name, check in checks.items():
            log.info("%s %s: %s", "chose" if name == chosen else "considered", name, check["verdict"])
        log.info("tagging with %s (--precision auto)", chosen)
        return chosen, checks.get(chosen), checks
    check = checks[requested]
    if not check["allowed"]:
        raise TaggingError(check["verdict"])
    return requested, check, checks


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
    keys = ("allowed", "change", "interval_95", "rows_changed", "speedup", "kernels", "source")
    return {k: check.get(k) for k in keys}
