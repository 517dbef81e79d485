"""The encoder at a precision: tokenizing, the forward pass, int8 quantization, and the gate
that any precision but fp32 must pass.

Precision: fp32 (the default, on CPU and GPU), bf16 (autocast to bfloat16) or int8 (CPU: dynamic
quantization of every nn.Linear). A precision other than fp32 is allowed only for a bundle on
whose validation split a loss of more than MAX_F1_LOSS held-out macro-F1 is ruled out (a paired
bootstrap over held-out halves, ``check_precision``); the comparison runs on the driver (on CPU)
before each such run, and the manifest records the precision and the check, since thresholds
are applied to the precision they were checked for.
"""

from __future__ import annotations

import logging
import time
import warnings

import numpy as np

from emotions.storage import Folder
from emotions.tagging.settings import PRECISIONS, TaggingError

log = logging.getLogger("emotions.tagging")


ENCODER_BATCH = {"cpu": 16, "cuda": 256}
CHARS_PER_TOKEN_CAP = 100  # texts are cut to max_length * this many characters before tokenizing
# bf16/int8 is refused unless its 95% interval rules out a held-out macro-F1 loss larger than this.
# 0.01: on GoEmotions dev (5,426 comments) a held-out macro-F1 difference is itself only good to
# about +-0.01, so a tighter bound would refuse precisions for noise; and 0.01 is 2% of the
# default bundle's ~0.51, far below what changes any label's share in a night's tags.
MAX_F1_LOSS = 0.01


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
    """[n] tokenized texts -> [n, 28] probabilities (float32): ``inference.run_rows``, the loop
    evaluation and training score with, at the tagging run's precision and device. An int8 model
    comes quantized (``prepare_model``)."""
    from emotions.inference import run_rows  # torch: not imported by Ray Data's read tasks

    return run_rows(model, data, pad_id, batch_size=batch_size, device=device, precision=precision).cpu().numpy()



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



def check_precision(bundle, precision: str, seed: int = 0) -> dict:
    """The gate for any precision but fp32 (bf16, int8), on the bundle's own validation split,
    through the encoder loop the actors run (on CPU, here): fp32 and ``precision`` compared on
    held-out halves (``evaluation.paired_change``: thresholds fitted on fp32 outputs of one half,
    scored on the other, both ways), with a 95% paired bootstrap interval, the share of rows whose
    label set changes, and the seconds each pass took. ``allowed`` when the interval's low end
    is above -MAX_F1_LOSS; ``verdict`` says so in a sentence."""
    import copy

    from emotions.data import DataError, load_labelled
    from emotions.evaluation import paired_change

    assert precision in PRECISIONS and precision != "fp32", precision
    data, seed = bundle.config["data"], bundle.config.get("seed", seed)
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
    probs, seconds = {}, {}
    for name, model in candidates.items():
        predict_tokens(model, tokens.select(np.arange(min(64, len(tokens)))), pad_id, ENCODER_BATCH["cpu"],
                       name, "cpu")  # warm-up, so the timings compare  # fmt: skip
        start = time.perf_counter()
        probs[name] = predict_tokens(model, tokens, pad_id, ENCODER_BATCH["cpu"], name, "cpu")
        seconds[name] = time.perf_counter() - start
    check = paired_change(validation.labels, probs["fp32"], probs[precision], seed=seed)
    low, high = check["interval_95"]
    allowed = low > -MAX_F1_LOSS
    verdict = (f"{precision} vs fp32 on bundle {bundle.hash}, held-out halves of {len(validation)} examples "
               f"of {validation.source}: macro-F1 {check['heldout_macro_f1_reference']:.4f} -> "
               f"{check['heldout_macro_f1_candidate']:.4f} ({check['change']:+.4f}, 95% interval "
               f"{low:+.4f} to {high:+.4f}); label sets change on {check['rows_changed']:.1%} of rows; "
               + (f"a loss over {MAX_F1_LOSS} is ruled out" if allowed else
                  f"a loss over {MAX_F1_LOSS} is not ruled out: tag in fp32 (--precision fp32)"))  # fmt: skip
    log.info("%s", verdict)
    return {"precision": precision, **check, "max_loss": MAX_F1_LOSS, "fp32_s": seconds["fp32"],
            f"{precision}_s": seconds[precision], "allowed": allowed, "verdict": verdict, "kernels": kernels()}


def kernels() -> str:
    """What a check's numbers depend on besides the bundle: torch and its int8 kernels."""
    import torch

    return f"torch {torch.__version__.split('+')[0]}, {torch.backends.quantized.engine}"


def resolve_precision(bundle, requested: str, gpu: bool) -> tuple[str, dict | None]:
    """(precision to tag at, the check that allows it or that refused int8 under "auto").
    "auto": int8 on CPU when the bundle's recorded check passed (``save_checked_bundle``), else
    fp32; fp32 on GPU. bf16/int8: the recorded check if made with these kernels, else one run
    now; a failed check raises TaggingError."""
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
        log.info("tagging in fp32: %s", recorded["verdict"] if recorded else
                 "the bundle records no int8 check made with these kernels (--precision int8 runs one)")
        return "fp32", recorded
    check = recorded or {**check_precision(bundle, requested), "source": "checked now"}
    if not check["allowed"]:
        raise TaggingError(check["verdict"])
    return requested, check


def save_checked_bundle(output, precisions=("int8",), **fields):
    """``bundle.save_bundle(output, **fields)``, then the precision gate for each of
    ``precisions`` on the saved bundle, recorded in its metrics.json (the bundle is written again
    with it), so tagging on CPU can use int8 without running the gate. -> the bundle's path."""
    from emotions.bundle import load_bundle, save_bundle

    start = time.perf_counter()
    path = save_bundle(output, **fields)
    checks = {p: check_precision(load_bundle(path), p) for p in precisions}
    path = save_bundle(output, **{**fields, "metrics": {**fields["metrics"], "precision_checks": checks}})
    log.info("precision checks recorded in the bundle in %.1fs", time.perf_counter() - start)
    return path
