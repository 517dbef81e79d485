"""The encoder at a precision: tokenizing, the forward pass, int8 quantization, and the gate
that any precision but fp32 must pass.

Precision: fp32 (the default, on CPU and GPU), bf16 (autocast to bfloat16) or int8 (CPU: dynamic
quantization of every nn.Linear). A precision other than fp32 is allowed only for a bundle whose
validation macro-F1 it moves by at most MAX_F1_CHANGE: ``check_precision`` compares it with fp32
on the driver (on CPU) before each such run, and the manifest records the precision and the
check, since thresholds are applied to the precision they were checked for.
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings

import numpy as np

from emotions.labels import EMOTIONS
from emotions.storage import Folder
from emotions.tagging.settings import PRECISIONS, TaggingError

log = logging.getLogger("emotions.tagging")


ENCODER_BATCH = {"cpu": 16, "cuda": 256}
CHARS_PER_TOKEN_CAP = 100  # texts are cut to max_length * this many characters before tokenizing
MAX_F1_CHANGE = 0.005  # bf16/int8 is refused for a bundle whose validation macro-F1 it moves more


def load_tokenizer(model: str):
    """The bundle's tokenizer alone (for a URI, only its tokenizer/ folder is downloaded)."""
    import tempfile

    from transformers import AutoTokenizer

    folder = Folder.from_uri(model).child("tokenizer")
    local = folder.root if folder.is_local else folder.download(tempfile.mkdtemp(prefix="emotions-tokenizer-"))
    return AutoTokenizer.from_pretrained(str(local), trust_remote_code=False)



def tokenize_texts(texts: list[str], tokenizer, max_length: int):
    """[n] texts -> TokenizedSet; texts are cut to max_length * CHARS_PER_TOKEN_CAP characters first
    (the tokenizer truncates to max_length tokens, but would split all of a 1 MB text first)."""
    from emotions.batching import tokenize  # torch: not imported by Ray Data's read tasks

    cap = max_length * CHARS_PER_TOKEN_CAP
    return tokenize([t[:cap] for t in texts], np.zeros((len(texts), 0), dtype=np.float32), tokenizer, max_length)



def predict_tokens(model, data, pad_id: int, batch_size: int, precision: str, device: str) -> np.ndarray:
    """[n] tokenized texts -> [n, 28] probabilities (float32), in passes of ``batch_size`` rows
    sorted by length. bf16 runs under autocast; an int8 model comes quantized (prepare_model)."""
    import torch

    from emotions.batching import collate, sorted_batches

    out = np.zeros((len(data), len(EMOTIONS)), dtype=np.float32)
    autocast = torch.autocast(device, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    with torch.inference_mode(), autocast:
        for rows in sorted_batches(data.lengths, batch_size):
            ids, mask, _ = collate(data, rows, pad_id)
            logits = model(ids.to(device), mask.to(device))  # [pass, 28]
            out[rows] = torch.sigmoid(logits.float()).cpu().numpy()
    return out



def prepare_model(model, precision: str):
    """The model to run at ``precision``: int8 quantizes it (in place), fp32 and bf16 leave it."""
    return quantize_int8(model) if precision == "int8" else model



def quantize_int8(model):
    """Dynamic int8 weights for every nn.Linear (activations quantized on the fly), CPU only.
    Per-channel scales: on the MiniLM bundle they halve per-tensor's macro-F1 loss."""
    import torch
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    with warnings.catch_warnings():  # torch announces the move of this API to torchao
        warnings.simplefilter("ignore")
        return quantize_dynamic(model, {torch.nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8)



def check_precision(bundle, precision: str) -> dict:
    """The gate for any precision but fp32 (bf16, int8): macro-F1 at the bundle's thresholds on its
    own validation split, fp32 vs ``precision``, through the encoder loop the actors run (on CPU,
    here), and the seconds each pass took. ``allowed`` is False when ``precision`` moves macro-F1
    by more than MAX_F1_CHANGE; ``verdict`` says so in a sentence."""
    import copy

    from emotions.data import DataError, load_labelled
    from emotions.metrics import compute_metrics

    assert precision in PRECISIONS and precision != "fp32", precision
    data, seed = bundle.config["data"], bundle.config.get("seed", 0)
    try:
        validation = load_labelled(data["validation"], text_column=data["text_column"],
                                   labels_column=data["labels_column"], label_format=data["label_format"])
        validation = validation.take(data["max_validation_examples"], seed)  # what thresholds were fit on
    except DataError as error:
        raise TaggingError(f"--precision {precision} is checked on the bundle's validation data, which "
                           f"cannot be read here ({error}); tag in fp32 (--precision fp32)") from error  # fmt: skip
    tokens = tokenize_texts(validation.texts, bundle.tokenizer, bundle.max_length)
    pad_id = bundle.tokenizer.pad_token_id or 0
    candidates = {"fp32": bundle.model, precision: prepare_model(copy.deepcopy(bundle.model), precision)}
    scores, seconds = {}, {}
    for name, model in candidates.items():
        predict_tokens(model, tokens.select(np.arange(min(64, len(tokens)))), pad_id, ENCODER_BATCH["cpu"],
                       name, "cpu")  # warm-up, so the timings compare  # fmt: skip
        start = time.perf_counter()
        probs = predict_tokens(model, tokens, pad_id, ENCODER_BATCH["cpu"], name, "cpu")
        seconds[name] = time.perf_counter() - start
        scores[name] = compute_metrics(validation.labels, probs, bundle.thresholds)["macro_f1"]
    change = scores[precision] - scores["fp32"]
    allowed = abs(change) <= MAX_F1_CHANGE
    verdict = (f"{precision} moves validation macro-F1 of bundle {bundle.hash} from {scores['fp32']:.4f} "
               f"to {scores[precision]:.4f} ({change:+.4f} on {len(validation)} examples of "
               f"{validation.source}); " + ("within" if allowed else "more than")
               + f" the {MAX_F1_CHANGE} allowed"
               + ("" if allowed else ": tag in fp32 (--precision fp32)"))  # fmt: skip
    log.info("%s", verdict)
    return {"precision": precision, "macro_f1_fp32": scores["fp32"], f"macro_f1_{precision}": scores[precision],
            "change": change, "max_change": MAX_F1_CHANGE, "examples": len(validation),
            "fp32_s": seconds["fp32"], f"{precision}_s": seconds[precision], "allowed": allowed,
            "verdict": verdict}  # fmt: skip
