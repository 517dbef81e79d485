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
from emotions.precision import cuda_matmuls

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
    tf32: bool = False,
) -> torch.Tensor:
    """``model`` (an ``EmotionClassifier``, int8-quantized or not) over every row of ``data`` ->
    [n, 28] sigmoid probabilities (``output="probs"``) or [n, hidden] pooled encoder features
    (``"features"``), float32 on ``device``. Passes of ``batch_size`` rows of similar length (the
    least padding); ``precision`` "bf16" runs them under autocast to bfloat16, "fp32" and "int8"
    (a model ``precision.prepare_model`` quantized) as they are. float32 matmuls on a GPU are IEEE
    unless ``tf32`` (tagging's fp32 on GPUs that have TF32): thresholds are fitted, and the gate's
    reference runs, at IEEE fp32."""
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
    device = torch.device(device)
    model.eval()
    width = NUM_LABELS if output == "probs" else model.hidden_size
    out = torch.empty(len(data), width, device=device)
    bf16 = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    with bf16, cuda_matmuls(device, tf32):
        for rows in sorted_batches(data.lengths, batch_size):
            ids, mask, _ = collate(data, rows, pad_id)
            ids, mask, index = (to_device(t, device) for t in (ids, mask, torch.from_numpy(rows)))
            result = model.features(ids, mask) if output == "features" else torch.sigmoid(model(ids, mask).float())
            out[index] = result.float()
    return out  # on CUDA still being written: the caller's .cpu() waits for it (the one sync)


def transfer_options(device: str | torch.device) -> tuple[bool, bool]:
    """(pin the host tensors, copy them with non_blocking) for host-to-device copies onto ``device``.
    On CUDA both: a copy from pinned memory is queued on the stream and returns at once, so the
    next pass is collated while this one runs, and no pass waits for the GPU (a copy from pageable
    memory waits for the stream, one sync per pass). Elsewhere neither: pinning needs CUDA, and
    on CPU there is nothing to copy."""
    cuda = torch.device(device).type == "cuda"
    return cuda, cuda


def to_device(tensor: torch.Tensor, device: str | torch.device) -> torch.Tensor:
    """A host tensor onto ``device`` as ``transfer_options`` decides: onto a GPU from pinned memory
    with non_blocking (the copy is queued; no wait for the GPU), elsewhere as it is."""
    pin, non_blocking = transfer_options(device)
    return (tensor.pin_memory() if pin else tensor).to(device, non_blocking=non_blocking)


@torch.inference_mode()
def head_probs(head: nn.Module, features: torch.Tensor) -> np.ndarray:
    """A head over pooled features (the frozen-encoder stage, the head sweep) -> [n, 28] float32."""
    head.eval()
    with cuda_matmuls(features.device):  # IEEE fp32, also in a training worker that steps in TF32
        return torch.sigmoid(head(features).float()).cpu().numpy()
