"""What a training checkpoint holds, written and read back: one folder per epoch.

    model.safetensors      the trainable weights (a frozen stage's: the head only)
    optimizer.safetensors  the AdamW moments, by parameter name (no pickles); in its JSON metadata the LR
                           scheduler's steps and, for float16 steps, the GradScaler's state
    ema.safetensors        the stage's weight average, while it runs (optim.WeightAverage)
    heads.safetensors      the heads a later stage competes with: "<stage>/head.*", "<stage>/validation_probs"
    predictions.safetensors  the final checkpoint's gathered predictions (thresholds are fitted on them)
    state.json             WorkerState: progress, history, the config it was made with

A frozen stage stores the encoder once, as ``frozen-encoder/<sha256>.safetensors`` in the run's
folder; its checkpoints refer to that file by URI and hash (``checkpoint_weights`` joins them).
A checkpoint that cannot be resumed raises ResumeError, which names the fix.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from safetensors import safe_open
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import load as load_bytes
from safetensors.torch import load_file, save_file
from safetensors.torch import save as save_bytes
from torch import nn

from emotions import storage
from emotions.model import EmotionClassifier

if TYPE_CHECKING:
    from emotions.training.optim import WeightAverage

log = logging.getLogger("emotions.training")

STATE_FILE = "state.json"
WEIGHTS_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
PREDICTIONS_FILE = "predictions.safetensors"
EMA_FILE = "ema.safetensors"  # a stage's weight average (WeightAverage), while it runs
HEADS_FILE = "heads.safetensors"  # the heads a later stage competes with: "<stage>/head.*", "<stage>/validation_probs"
FROZEN_ENCODER_DIR = "frozen-encoder"  # in the run's folder: <sha256>.safetensors, encoder.* weights


class ResumeError(ValueError):
    """A run's checkpoints cannot be resumed as they are; the message says how to start over."""


@dataclass
class WorkerState:
    """What survives in a checkpoint besides weights."""

    stage: str = ""
    epoch: int = 0  # completed epochs of ``stage``
    history: list[dict] = field(default_factory=list)
    resumed_from: list[dict] = field(default_factory=list)
    shards: list[dict] = field(default_factory=list)  # what each rank trained on
    stage_seconds: dict[str, float] = field(default_factory=dict)  # wall time, features included
    frozen_encoder: dict | None = None  # {"uri", "sha256"} while a frozen stage runs: head-only checkpoints
    config: dict = field(default_factory=dict)  # the config the checkpoint was made with
    config_hash: str = ""  # config.config_hash(config): what prepare_run compares
    head_choice: dict = field(default_factory=dict)  # the heads' held-out scores and the one kept
    thresholds_precision: dict | None = None  # the final predictions' precision (precision.fit_precision)
    # Each finished stage's head over the current encoder: {stage: Candidate}. Saved in HEADS_FILE.
    candidates: dict = field(default_factory=dict)


@dataclass
class Candidate:
    """A finished stage's head, and its (gathered) validation probabilities."""

    weights: dict[str, torch.Tensor]  # the head's state_dict, on the CPU
    description: dict  # describe_head
    validation_probs: np.ndarray


def describe_head(head: nn.Sequential, pooling: str) -> dict:
    """What rebuilds a head (``model.build_head``): recorded in checkpoints and bundles."""
    linears = [m for m in head if isinstance(m, nn.Linear)]
    dropout = next((m.p for m in head if isinstance(m, nn.Dropout)), 0.0)
    return {
        "depth": len(linears),
        "hidden": linears[0].out_features if len(linears) == 2 else None,
        "dropout": dropout,
        "pooling": pooling,
    }


def write_checkpoint(
    folder: Path,
    model: EmotionClassifier,
    optimizer,
    state: WorkerState,
    validation_source: str,
    predictions: dict | None = None,
    average: WeightAverage | None = None,
    scaler: torch.amp.GradScaler | None = None,
    scheduler=None,
) -> None:
    """The checkpoint's files into ``folder``. While the encoder is frozen (``state.frozen_encoder``)
    the weights are the head's only. ``scaler`` and ``scheduler`` are saved with the optimizer."""
    weights = {
        k: v.contiguous().cpu()
        for k, v in model.state_dict().items()
        if not (state.frozen_encoder and k.startswith("encoder."))
    }
    save_file(weights, str(folder / WEIGHTS_FILE))
    if optimizer is not None:
        save_optimizer_state(optimizer, model, folder / OPTIMIZER_FILE, scaler, scheduler)
    if average is not None:
        average.save(folder / EMA_FILE)
    if predictions is not None:
        save_numpy(predictions, str(folder / PREDICTIONS_FILE))
    if state.candidates:
        save_candidates(state.candidates, folder / HEADS_FILE)
    payload = {
        **{k: v for k, v in state.__dict__.items() if k != "candidates"},
        "candidates": {name: c.description for name, c in state.candidates.items()},
        "validation_source": validation_source,
        "encoder_config": model.encoder.config.to_dict(),
        "head": describe_head(model.head, model.pooling),
    }
    (folder / STATE_FILE).write_text(json.dumps(payload, default=str))


def restore_state(folder: Path | None) -> WorkerState:
    """The state of the checkpoint in ``folder`` (the one Ray Train hands a restarted or resumed
    run's workers), with this restart added to ``resumed_from``; a fresh state without one."""
    if folder is None:
        return WorkerState()
    saved = json.loads((folder / STATE_FILE).read_text())
    state = WorkerState(
        saved["stage"],
        saved["epoch"],
        saved["history"],
        saved.get("resumed_from", []),
        stage_seconds=saved.get("stage_seconds", {}),
        frozen_encoder=saved.get("frozen_encoder"),
        head_choice=saved.get("head_choice", {}),
    )
    if (folder / HEADS_FILE).exists():
        state.candidates = load_candidates(folder / HEADS_FILE, saved.get("candidates", {}))
    state.resumed_from.append({"stage": state.stage, "epoch": state.epoch})
    log.warning("resuming from checkpoint: %s epoch %d done", state.stage, state.epoch)
    return state


def save_candidates(candidates: dict[str, Candidate], path: Path) -> None:
    tensors = {}
    for name, c in candidates.items():
        tensors.update({f"{name}/head.{k}": v.contiguous() for k, v in c.weights.items()})
        tensors[f"{name}/validation_probs"] = torch.from_numpy(np.ascontiguousarray(c.validation_probs))
    save_file(tensors, str(path))


def load_candidates(path: Path, descriptions: dict[str, dict]) -> dict[str, Candidate]:
    tensors = load_file(str(path))
    out = {}
    for name, description in descriptions.items():  # JSON keeps the stages' order
        weights = {k.split("/head.", 1)[1]: v for k, v in tensors.items() if k.startswith(f"{name}/head.")}
        out[name] = Candidate(weights, description, tensors[f"{name}/validation_probs"].numpy())
    return out


def save_frozen_encoder(model: EmotionClassifier, run_dir: str) -> dict:
    """Store the encoder's weights (``encoder.*``) in the run's folder, named by their sha256, unless
    a complete copy is there already (a resumed stage); returns {"uri", "sha256"} for state.json."""
    data = save_bytes({k: v.contiguous().cpu() for k, v in model.state_dict().items() if k.startswith("encoder.")})
    sha = hashlib.sha256(data).hexdigest()
    folder, name = storage.Folder.from_uri(storage.join(run_dir, FROZEN_ENCODER_DIR)), f"{sha}.safetensors"
    if folder.fs.get_file_info(folder.path(name)).size != len(data):  # missing, or cut short by a crash
        folder.write_bytes_atomic(data, name)  # a crash never leaves a short file under its hash
    return {"uri": folder.uri_of(name), "sha256": sha}


def checkpoint_weights(folder: Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Every weight of the model a checkpoint holds: its own file, plus the frozen encoder that a
    head-only checkpoint refers to (read from the run's storage and checked against its hash)."""
    weights = load_file(str(folder / WEIGHTS_FILE), device=device)
    ref = json.loads((folder / STATE_FILE).read_text()).get("frozen_encoder")
    if ref:
        parent, name = ref["uri"].rsplit("/", 1)
        data = storage.Folder.from_uri(parent).read_bytes(name)
        if hashlib.sha256(data).hexdigest() != ref["sha256"]:
            raise ResumeError(
                f"frozen encoder {ref['uri']} does not match the sha256 its checkpoint recorded "
                "(the run's storage was altered); start the run over with --fresh"
            )
        weights.update({k: v.to(device) for k, v in load_bytes(data).items()})
    return weights


def optimizer_param_names(optimizer: torch.optim.Optimizer, model: nn.Module) -> list[str]:
    """The model's name for each parameter the optimizer holds, in the optimizer's order."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def save_optimizer_state(
    optimizer: torch.optim.Optimizer,
    model: nn.Module,
    path: Path,
    scaler: torch.amp.GradScaler | None = None,
    scheduler=None,
) -> None:
    """AdamW moments as safetensors (no pickles): '{parameter name}.{key}' for each tensor. In the
    file's metadata, as JSON: the parameters' names, the LR scheduler's steps (``scheduler``), and
    the float16 steps' GradScaler state (``scaler``: its scale and growth tracker, a few numbers),
    so a resumed or restarted stage does not start over at a scale of 2**16 and skip steps."""
    names = optimizer_param_names(optimizer, model)
    tensors = {}
    for pid, values in optimizer.state_dict()["state"].items():
        for key, value in values.items():
            tensors[f"{names[pid]}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    metadata = {"params": json.dumps(names)}
    if scheduler is not None:
        metadata["scheduler_steps"] = json.dumps(scheduler.last_epoch)
    if scaler is not None and scaler.is_enabled():
        metadata["grad_scaler"] = json.dumps(scaler.state_dict())  # reads the scale: one sync, per epoch
    save_file(tensors, str(path), metadata=metadata)


def load_optimizer_state(
    optimizer: torch.optim.Optimizer,
    model: nn.Module,
    path: Path,
    device: torch.device,
    scaler: torch.amp.GradScaler | None = None,
) -> int | None:
    """Restore the moments by parameter name, and ``scaler``'s state where the checkpoint has one
    (float16 steps); refused (ResumeError) if the saved parameters (names or shapes) are not the
    ones this optimizer trains. -> the LR scheduler's steps saved with them (None: not recorded)."""
    names = optimizer_param_names(optimizer, model)
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata() or {}
    saved_names = json.loads(metadata.get("params", "[]"))
    if sorted(saved_names) != sorted(names):
        missing, extra = sorted(set(names) - set(saved_names)), sorted(set(saved_names) - set(names))
        raise ResumeError(
            f"optimizer state {path} is for other parameters (missing {missing[:5]}, "
            f"unexpected {extra[:5]}); start the run over with --fresh"
        )
    params = dict(model.named_parameters())
    by_name: dict[str, dict] = {}
    for key, tensor in load_file(str(path)).items():
        name, part = key.rsplit(".", 1)  # "head.1.weight.exp_avg" -> "head.1.weight", "exp_avg"
        if part != "step" and tensor.shape != params[name].shape:
            raise ResumeError(
                f"optimizer state {path}: {key} has shape {list(tensor.shape)}, the parameter "
                f"{list(params[name].shape)}; start the run over with --fresh"
            )
        by_name.setdefault(name, {})[part] = tensor if part == "step" else tensor.to(device)
    full = optimizer.state_dict()
    full["state"] = {pid: by_name[name] for pid, name in enumerate(names) if name in by_name}
    optimizer.load_state_dict(full)
    if scaler is not None and scaler.is_enabled():
        if "grad_scaler" in metadata:
            scaler.load_state_dict(json.loads(metadata["grad_scaler"]))
        else:  # made by fp32/bf16 steps, or before the scaler was saved
            log.warning("checkpoint %s has no gradient scaler state: float16 steps start at scale 2**16", path)
    return json.loads(metadata["scheduler_steps"]) if "scheduler_steps" in metadata else None
