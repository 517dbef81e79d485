"""The stage's loss over the 28 labels: BCE, optionally with positives weighted by their odds
and asymmetric focusing (``AsymmetricLoss``). Logits [batch, 28] and targets [batch, 28] -> a scalar.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from emotions.config import StageConfig


def loss_function(stage: StageConfig, positive_rates: np.ndarray, device=None) -> nn.Module:
    """The stage's loss over the 28 labels: BCE, with each label's positives weighted by
    ((1 - rate) / rate) ** ``stage.pos_weight_power`` (``rate``: its share of the training rows; a
    label without any: 1), and asymmetric focusing when ``stage.gamma_neg``, ``gamma_pos`` or
    ``neg_clip`` is set (``AsymmetricLoss``)."""
    weight = None
    if stage.pos_weight_power > 0:
        rates = np.asarray(positive_rates, dtype=np.float64)
        odds = np.where(rates > 0, (1 - rates) / np.maximum(rates, 1e-12), 1.0)
        weight = torch.tensor(odds**stage.pos_weight_power, dtype=torch.float32, device=device)
    if stage.gamma_neg or stage.gamma_pos or stage.neg_clip:
        return AsymmetricLoss(stage.gamma_neg, stage.gamma_pos, stage.neg_clip, weight)
    return nn.BCEWithLogitsLoss(pos_weight=weight)


class AsymmetricLoss(nn.Module):
    """Ridnik et al. 2021, averaged over rows and labels like BCE:
    -[w y (1-p)^g+ log p + (1-y) q^g- log(1-q)], q = max(p - clip, 0). With every knob at 0 it is
    BCE (``w``: the positives' weights)."""

    def __init__(self, gamma_neg: float, gamma_pos: float, clip: float, pos_weight: torch.Tensor | None = None):
        super().__init__()
        self.gamma_neg, self.gamma_pos, self.clip = gamma_neg, gamma_pos, clip
        self.pos_weight = pos_weight

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        log_p, log_not_p = nn.functional.logsigmoid(logits), nn.functional.logsigmoid(-logits)
        if self.clip:
            q = (torch.sigmoid(logits) - self.clip).clamp(min=0)
            log_not_q = torch.log1p(-q.clamp(max=1 - 1e-6))
            neg_scale = q.pow(self.gamma_neg) if self.gamma_neg else None
        else:  # the focusing factors in log space: finite gradients where p rounds to 0 or 1
            log_not_q = log_not_p
            neg_scale = torch.exp(self.gamma_neg * log_p) if self.gamma_neg else None
        pos = log_p * torch.exp(self.gamma_pos * log_not_p) if self.gamma_pos else log_p
        if self.pos_weight is not None:
            pos = pos * self.pos_weight
        neg = log_not_q * neg_scale if neg_scale is not None else log_not_q
        return -(targets * pos + (1 - targets) * neg).mean()


class LossSum:
    """An epoch's training loss, summed where it is computed: ``add`` queues an addition on the
    device and returns at once; ``mean`` reads the sum once, when the epoch is reported. (A
    ``loss.item()`` per step would make the host wait for the GPU every step.) ``last`` is the
    last step's loss, a 0-d tensor: formatting it reads it, only when a progress line is printed."""

    def __init__(self) -> None:
        self.total: torch.Tensor | None = None
        self.last: torch.Tensor | None = None
        self.steps = 0

    def add(self, loss: torch.Tensor) -> None:
        self.last = loss.detach()
        self.total = self.last.float() if self.total is None else self.total + self.last
        self.steps += 1

    def mean(self) -> float:
        """The steps' mean loss (nan without any): the one host sync."""
        return self.total.item() / self.steps if self.steps else float("nan")
