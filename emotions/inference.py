"""The one inference loop. Everything that runs a classifier over tokenized rows goes through
``run_rows``: training's validation and feature passes, ``Bundle.predict_proba`` / ``features``
(``emotions evaluate``, the head sweep's encoder task), tagging's actors (``tagging.predictor``) and
the precision gate (``emotions.precision``).
So a precision, a device or a batching change lands in every number the project reports at once.

    rows of a TokenizedSet --(passes sorted by length, on ``device``, at ``precision``)-->
        [n, 28] probabilities  or  [n, hidden] pooled features, float32, in row order
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from torch import nn

from emotions.batching import TokenizedSet, collate, sorted_batches
from emotions.labels import NUM_LABELS

OUTPUTS = ("probs", "features")


@torch.inference_mode()
def run_rows(
    model: nn.Module,
    data: TokenizedSet,
    pad_id: int,
    *,
    batch_size: int,
    device: str | torch.device,
    precision: str = "fp32",
    output: str = "probs",
) -> torch.Tensor:
    """``model`` (an ``EmotionClassifier``, int8-quantized or not) over every row of ``data`` ->
    [n, 28] sigmoid probabilities (``output="probs"``) or [n, hidden] pooled encoder features
    (``"features"``), float32 on ``device``. Passes of ``batch_size`` rows of similar length (the
    least padding); ``precision`` "bf16" runs them under autocast to bfloat16, "fp32" and "int8"
    (a model ``precision.prepare_model`` quantized) as they are."""
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
    device = torch.device(device)
    model.eval()
    width = NUM_LABELS if output == "probs" else model.hidden_size
    out = torch.empty(len(data), width, device=device)
    bf16 = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    with bf16:
        for rows in sorted_batches(data.lengths, batch_size):
            ids, mask, _ = collate(data, rows, pad_id)
            ids, mask = ids.to(device), mask.to(device)
            result = model.features(ids, mask) if output == "features" else torch.sigmoid(model(ids, mask).float())
            out[torch.from_numpy(rows).to(device)] = result.float()
    return out


@torch.inference_mode()
def head_probs(head: nn.Module, features: torch.Tensor) -> np.ndarray:
    """A head over pooled features (the frozen-encoder stage, the head sweep) -> [n, 28] float32."""
    head.eval()
    return torch.sigmoid(head(features).float()).cpu().numpy()
