"""The precision gate: a bundle may run at a precision other than fp32 only if that costs it at
most MAX_F1_LOSS held-out macro-F1.

    bundle + its validation split --(fp32 and bf16/int8, on CPU, through inference.run_rows)-->
        paired held-out macro-F1 change, 95% bootstrap interval --> allowed or refused

Precisions: fp32, bf16 (autocast to bfloat16) or int8 (CPU: dynamic quantization of every
nn.Linear, ``prepare_model``). Training and the head sweep run the int8 gate when they write a
bundle (``save_checked_bundle``) and record it in its metrics.json; tagging reads that record,
or runs ``check_precision`` itself, before it tags at anything but fp32. Thresholds are applied
to the precision they were checked for.

torch is imported inside the functions: tagging's Ray Data read tasks import this module.
"""

from __future__ import annotations

import logging
import time
import warnings

import numpy as np

log = logging.getLogger("emotions.precision")

# bf16/int8 is refused unless its 95% interval rules out a held-out macro-F1 loss larger than this.
# 0.01: on GoEmotions dev (5,426 comments) a held-out macro-F1 difference is itself only good to
# about +-0.01, so a tighter bound would refuse precisions for noise; and 0.01 is 2% of the
# default bundle's ~0.51, far below what changes any label's share in a night's tags.
MAX_F1_LOSS = 0.01
CPU_BATCH = 16  # rows per forward pass on CPU: the gate's, and tagging's CPU actors'
WARMUP_ROWS = 64  # scored once per precision before the timed pass, so the timings compare


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
    """The model to run at ``precision``: int8 quantizes it (in place), fp32 and bf16 leave it."""
    return quantize_int8(model) if precision == "int8" else model


def kernels() -> str:
    """What a check's numbers depend on besides the bundle: torch and its int8 kernels."""
    import torch

    return f"torch {torch.__version__.split('+')[0]}, {torch.backends.quantized.engine}"


def check_precision(bundle, precision: str, seed: int = 0) -> dict:
    """The gate for any precision but fp32 (bf16, int8), on the bundle's own validation split
    (tokenized as training tokenized it), through the one inference loop (``inference.run_rows``,
    on CPU here): fp32 and ``precision`` compared on held-out halves (``evaluation.paired_change``:
    thresholds fitted on fp32 outputs of one half, scored on the other, both ways), with a 95%
    paired bootstrap interval, the share of rows whose label set changes, and the seconds each
    pass took. ``allowed`` when the interval's low end is above -MAX_F1_LOSS; ``verdict`` says so
    in a sentence. PrecisionError when the validation data cannot be read."""
    import copy

    from emotions.batching import tokenize
    from emotions.data import DataError, load_labelled
    from emotions.evaluation import paired_change, rule_of
    from emotions.inference import run_rows

    assert precision in ("bf16", "int8"), precision
    data, seed = bundle.config["data"], bundle.config.get("seed", seed)
    try:
        validation = load_labelled(
            data["validation"],
            text_column=data["text_column"],
            labels_column=data["labels_column"],
            label_format=data["label_format"],
        )
        validation = validation.take(data["max_validation_examples"], seed)  # what thresholds were fit on
    except DataError as error:
        raise PrecisionError(
            f"--precision {precision} is checked on the bundle's validation data, which "
            f"cannot be read here ({error}); tag in fp32 (--precision fp32)"
        ) from error
    tokens = tokenize(validation.texts, validation.labels, bundle.tokenizer, bundle.max_length)
    pad_id = bundle.tokenizer.pad_token_id or 0
    candidates = {"fp32": bundle.model, precision: prepare_model(copy.deepcopy(bundle.model), precision)}
    probs, seconds = {}, {}
    for name, model in candidates.items():
        warmup = tokens.select(np.arange(min(WARMUP_ROWS, len(tokens))))
        run_rows(model, warmup, pad_id, batch_size=CPU_BATCH, device="cpu", precision=name)
        start = time.perf_counter()
        probs[name] = run_rows(model, tokens, pad_id, batch_size=CPU_BATCH, device="cpu", precision=name).numpy()
        seconds[name] = time.perf_counter() - start
    check = paired_change(validation.labels, probs["fp32"], probs[precision], seed=seed, rule=rule_of(bundle.config))
    low, high = check["interval_95"]
    allowed = low > -MAX_F1_LOSS
    verdict = (
        f"{precision} vs fp32 on bundle {bundle.hash}, held-out halves of {len(validation)} examples "
        f"of {validation.source}: macro-F1 {check['heldout_macro_f1_reference']:.4f} -> "
        f"{check['heldout_macro_f1_candidate']:.4f} ({check['change']:+.4f}, 95% interval "
        f"{low:+.4f} to {high:+.4f}); label sets change on {check['rows_changed']:.1%} of rows; "
        + (
            f"a loss over {MAX_F1_LOSS} is ruled out"
            if allowed
            else f"a loss over {MAX_F1_LOSS} is not ruled out: tag in fp32 (--precision fp32)"
        )
    )
    log.info("%s", verdict)
    return {
        "precision": precision,
        **check,
        "max_loss": MAX_F1_LOSS,
        "fp32_s": seconds["fp32"],
        f"{precision}_s": seconds[precision],
        "allowed": allowed,
        "verdict": verdict,
        "kernels": kernels(),
    }


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
