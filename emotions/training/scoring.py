"""What scores and predicts during training: pooled features and probabilities for a worker's
rows (``encode_features``, ``predict_probs``), the gathered validation predictions and an epoch's
metrics (``predict_validation``, ``epoch_metrics``), and the head the bundle keeps (``choose_head``).
"""

from __future__ import annotations

import contextlib
import logging

import numpy as np
import torch

from emotions.batching import TokenizedSet
from emotions.config import StageConfig, TrainConfig
from emotions.evaluation import heldout_macro_f1, validation_scores
from emotions.inference import head_probs, run_rows
from emotions.model import EmotionClassifier, build_head
from emotions.precision import describe_device, runtime_label
from emotions.training.checkpoints import WorkerState
from emotions.training.losses import LossSum
from emotions.training.optim import WeightAverage
from emotions.training.shards import Shards, gather_rows

log = logging.getLogger("emotions.training")

EVAL_BATCH = 128  # rows per validation and feature pass


def scored(average: WeightAverage | None):
    """While validating: the weight average swapped in, when the stage keeps one."""
    return average.swapped_in() if average is not None else contextlib.nullcontext()


def encode_features(
    model: EmotionClassifier, data: TokenizedSet, shards: Shards, precision: str | None = None
) -> torch.Tensor:
    """Pooled encoder features [n, hidden] float32 for every row of ``data``, in row order, at
    ``precision`` (default: the worker's inference precision)."""
    return run_rows(
        model,
        data,
        shards.pad_id,
        batch_size=EVAL_BATCH,
        device=shards.device,
        precision=precision or shards.precision,
        output="features",
    )


def predict_probs(
    model: EmotionClassifier, data: TokenizedSet, shards: Shards, features: torch.Tensor | None = None
) -> np.ndarray:
    """Sigmoid probabilities [n, 28] for this worker's rows of ``data``."""
    return head_probs(model.head, features if features is not None else encode_features(model, data, shards))


def threshold_probs(model: EmotionClassifier, data: TokenizedSet, shards: Shards) -> np.ndarray:
    """[n, 28] probabilities of this worker's rows of ``data`` at the precision thresholds are
    fitted on (``precision.fit_precision``): torch fp32, IEEE matmuls, whatever the stage's passes
    ran at (bf16 on a GPU), so that tagging's fp32 and the gate's reference meet the thresholds at
    the numerics they were fitted at."""
    return head_probs(model.head, encode_features(model, data, shards, precision="fp32"))


def predict_validation(model, shards: Shards, features: torch.Tensor | None):
    """Validation probabilities and labels [n, 28] of every worker's rows, in validation order."""
    probs = predict_probs(model, shards.validation, shards, features)
    all_probs = gather_rows(probs, shards.validation.index, shards)
    all_labels = gather_rows(shards.validation.labels, shards.validation.index, shards)
    return all_probs, all_labels


def epoch_metrics(
    stage: StageConfig,
    epoch: int,
    losses: LossSum,
    probs: np.ndarray,
    labels: np.ndarray,
    elapsed: float,
    shards: Shards,
    config: TrainConfig,
) -> dict:
    """An epoch's report: train loss, validation scores and throughput, also under ``<stage>/`` keys."""
    samples = losses.steps * stage.batch_size * shards.world
    metrics = {
        "stage": stage.name,
        "epoch": epoch + 1,
        "train_loss": losses.mean(),  # the epoch's one read of its loss
        **validation_scores(labels, probs, rule=config.thresholds.rule()),
        "samples_per_s": samples / max(elapsed, 1e-9),
        "epoch_seconds": elapsed,
    }
    # Stage names in the keys, so a results table keeps both stages apart.
    metrics.update({f"{stage.name}/{k}": v for k, v in list(metrics.items())[2:]})
    # What the steps ran in: bf16, fp16 (a GPU without native bf16), fp32, "fp32 (tf32 matmuls)".
    metrics["train_precision"] = runtime_label(shards.train_precision, shards.hardware or describe_device("cpu"))
    return metrics


def choose_head(
    model: EmotionClassifier, shards: Shards, config: TrainConfig, state: WorkerState, labels: np.ndarray
) -> np.ndarray:
    """Put the kept head (``model.head_choice``) on the model, record the candidates' held-out
    macro-F1 (on the gathered validation ``labels``) and the choice in ``state.head_choice``;
    return the kept head's validation probs. Every rank computes the same choice from the same
    gathered predictions."""
    scores = {
        name: heldout_macro_f1(labels, c.validation_probs, rule=config.thresholds.rule())
        for name, c in state.candidates.items()
    }
    names = list(state.candidates)
    kept = names[-1]
    if config.model.head_choice == "heldout":
        kept = names[0]
        for name in names[1:]:  # a later stage's head must win outright
            kept = name if scores[name] > scores[kept] else kept
    state.head_choice = {"rule": config.model.head_choice, "heldout_macro_f1": scores, "kept": kept}
    chosen = state.candidates[kept]
    d = chosen.description
    model.head = build_head(model.hidden_size, d["depth"], d["dropout"], d["hidden"]).to(shards.device)
    model.head.load_state_dict(chosen.weights)
    if shards.rank == 0 and len(names) > 1:
        log.info(
            "heads over the final encoder, held-out macro-F1: %s; the bundle keeps %s's (%s)",
            ", ".join(f"{n} {v:.4f}" for n, v in scores.items()),
            kept,
            "the best" if config.model.head_choice == "heldout" else "the last stage's",
        )
    return state.candidates[kept].validation_probs
