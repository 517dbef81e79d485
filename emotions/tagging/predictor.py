"""The encoder at a precision, as tagging's actors run it: the bundle's tokenizer, tokenizing
with a character cap, the forward pass, and which precision a run tags at (``resolve_precision``).

The precision gate itself (``check_precision``, MAX_F1_LOSS, int8 quantization) is
``emotions.precision``: training records its verdict in every bundle, and tagging reads it here.
"""

from __future__ import annotations

import logging

import numpy as np

from emotions.precision import CPU_BATCH, PrecisionError, check_precision, kernels
from emotions.precision import prepare_model as prepare_model  # the actors' (pipeline.py) way in
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
    evaluation and training score with, at the tagging run's precision and device. An int8 model
    comes quantized (``prepare_model``)."""
    from emotions.inference import run_rows  # torch: not imported by Ray Data's read tasks

    return run_rows(model, data, pad_id, batch_size=batch_size, device=device, precision=precision).cpu().numpy()


def resolve_precision(bundle, requested: str, gpu: bool) -> tuple[str, dict | None]:
    """(precision to tag at, the check that allows it or that refused int8 under "auto").
    "auto": int8 on CPU when the bundle's recorded check passed (``save_checked_bundle``), else
    fp32; fp32 on GPU. bf16/int8: the recorded check if made with these kernels, else one run
    now (``precision.check_precision``); a failed check raises TaggingError."""
    if requested == "fp32" or (requested == "auto" and gpu):
        return "fp32", None
    recorded = (bundle.metrics.get("precision_checks") or {}).get("int8" if requested == "auto" else requested)
    if recorded and recorded.get("kernels") == kernels():
        recorded = {**recorded, "source": "the bundle's metrics.json"}
    else:
        recorded = None
    if requested == "auto":
        if recorded and recorded["allowed"]:
            return "int8", recorded
        log.info(
            "tagging in fp32: %s",
            recorded["verdict"]
            if recorded
            else "the bundle records no int8 check made with these kernels (--precision int8 runs one)",
        )
        return "fp32", recorded
    try:
        check = recorded or {**check_precision(bundle, requested), "source": "checked now"}
    except PrecisionError as error:
        raise TaggingError(str(error)) from error
    if not check["allowed"]:
        raise TaggingError(check["verdict"])
    return requested, check
