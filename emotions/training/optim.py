"""How a stage steps its weights: AdamW with per-layer rates (``build_optimizer``), the learning
rate schedule (``build_scheduler``) and the exponential weight average (``WeightAverage``).
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from emotions.config import StageConfig
from emotions.training.checkpoints import ResumeError


def build_optimizer(stage: StageConfig, head: nn.Module, encoder: nn.Module | None = None) -> torch.optim.AdamW:
    """AdamW: the head at ``head_learning_rate``; with an ``encoder`` (a stage that trains it), its
    trainable weights at ``learning_rate``, scaled by ``layer_lr_decay`` ** (layers above theirs)."""
    groups = [{"params": list(head.parameters()), "lr": stage.head_learning_rate or stage.learning_rate}]
    if encoder is not None:
        by_depth: dict[int, list] = {}
        for name, param in encoder.named_parameters():
            if param.requires_grad:
                by_depth.setdefault(layers_above(name, encoder.config.num_hidden_layers), []).append(param)
        for depth, params in sorted(by_depth.items()):
            groups.append({"params": params, "lr": stage.learning_rate * stage.layer_lr_decay**depth})
    return torch.optim.AdamW(groups, weight_decay=stage.weight_decay)


def layers_above(name: str, num_layers: int) -> int:
    """How many transformer layers sit above an encoder parameter: 0 for the top layer (and for
    anything after the layers, such as a final norm), ``num_layers`` for the embeddings."""
    match = re.search(r"(?:^|\.)layers?\.(\d+)\.", name)
    if match:
        return num_layers - 1 - int(match.group(1))
    return num_layers if "embed" in name else 0


class WeightAverage:
    """An exponential moving average of a model's trainable weights (float32 copies), kept beside
    the model: ``update`` after each optimizer step, ``swapped_in`` to score it, ``apply`` to end a
    stage with it. Saved in checkpoints as EMA_FILE (with its step count) so a resumed stage
    carries on averaging."""

    def __init__(self, model: nn.Module, decay: float, warmup: float = 10.0):
        self.decay, self.warmup, self.steps = decay, warmup, 0
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        params = dict(model.named_parameters())
        self.average = {n: params[n].detach().float().clone() for n in self.names}
        self._params = [params[n] for n in self.names]

    @classmethod
    def for_stage(cls, model: nn.Module, stage: StageConfig) -> WeightAverage | None:
        """The stage's average of ``model``'s trainable weights; None when ``ema_decay`` is 0."""
        return cls(model, stage.ema_decay, stage.ema_warmup) if stage.ema_decay else None

    @torch.no_grad()
    def update(self) -> None:
        decay = min(self.decay, (1 + self.steps) / (self.warmup + self.steps))
        self.steps += 1
        torch._foreach_lerp_(list(self.average.values()), [p.detach().float() for p in self._params], 1 - decay)

    @torch.no_grad()
    def apply(self) -> None:
        for p, avg in zip(self._params, self.average.values()):
            p.copy_(avg)

    @contextlib.contextmanager
    def swapped_in(self):
        saved = [p.detach().clone() for p in self._params]
        self.apply()
        try:
            yield
        finally:
            with torch.no_grad():
                for p, s in zip(self._params, saved):
                    p.copy_(s)

    def save(self, path: Path) -> None:
        save_file(
            {n: t.contiguous().cpu() for n, t in self.average.items()}, str(path), metadata={"steps": str(self.steps)}
        )

    def load(self, path: Path) -> None:
        with safe_open(str(path), "pt") as f:
            self.steps = int((f.metadata() or {}).get("steps", 0))
        saved = load_file(str(path))
        if sorted(saved) != sorted(self.names):
            raise ResumeError(f"weight average {path} is for other parameters; start the run over with --fresh")
        for n in self.names:
            self.average[n].copy_(saved[n])


def build_scheduler(optimizer, stage: StageConfig, steps_per_epoch: int):
    total = max(1, stage.epochs * steps_per_epoch)
    warmup = int(stage.warmup_ratio * total)

    def factor(step: int) -> float:
        if stage.schedule == "constant":
            return 1.0
        if step < warmup:
            return (step + 1) / warmup
        left = max(0.0, (total - step) / max(1, total - warmup))
        return stage.lr_floor + (1.0 - stage.lr_floor) * left

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
