"""The two-stage fine-tune on Ray Train.

    driver (driver.py: train -> fit)
      config resolved against the cluster (resolve_layout), earlier checkpoints checked (prepare_run)
      data loaded and tokenized once -> object store
      -> TorchTrainer: N Ray Train workers (worker.py: train_worker)
           each takes its shard (shards.py); per stage (run_stage; stage_inputs says what it trains):
             train_epoch per epoch: loss (losses.py), AdamW, schedule, weight average (optim.py)
             -> validation scored (scoring.py), metrics + a checkpoint reported (checkpoints.py; rank 0 writes it)
           finish: the kept head (scoring.py: choose_head) + gathered predictions -> the final checkpoint
      <- the final checkpoint (after a failure, Ray restarts the workers from the latest one)
      -> thresholds fitted on fp32 outputs, precision gate (emotions.precision) -> bundle (write_bundle_from_checkpoint)

Stage 1 fine-tunes encoder + head. Stage 2 freezes the encoder, builds a fresh head, computes the
pooled features once and trains the head on them (no encoder pass per epoch). Both heads then sit
over the same final encoder, and the bundle keeps the one with the better held-out macro-F1
(stage 2's only if it wins; ``model.head_choice: last`` keeps stage 2's, as the seed study did).

Checkpoints (one per epoch, kept under ``run.storage_path/<run name>/``) hold the trainable
weights, the AdamW moments by parameter name and ``state.json`` (progress, and the config they
were made with); a frozen stage's hold the head only and refer to the encoder stored once in the
run's folder. A run started again under its name resumes from its latest checkpoint, unless the
config changed (refused by ``prepare_run``) or ``run.resume`` is false (``--fresh``: its old
checkpoints are deleted). Checkpoints that cannot be resumed as they are raise ResumeError.

The head sweep (emotions.head_sweep) trains heads on cached features through the same loop:
``feature_inputs``, ``train_epoch``, ``epoch_seed``, ``loss_function``, ``build_optimizer``,
``build_scheduler``, ``WeightAverage`` and ``scored`` are public for it.
"""

from emotions.training.checkpoints import (
    ResumeError,
    checkpoint_weights,
    describe_head,
    load_optimizer_state,
    save_optimizer_state,
)
from emotions.training.driver import (
    fit,
    load_training_data,
    prepare_run,
    resolve_layout,
    train,
    write_bundle_from_checkpoint,
)
from emotions.training.losses import AsymmetricLoss, LossSum, loss_function
from emotions.training.optim import WeightAverage, build_optimizer, build_scheduler, layers_above
from emotions.training.scoring import scored
from emotions.training.shards import Shards, step_autocast, step_scaler, train_precision
from emotions.training.worker import StageInputs, epoch_seed, feature_inputs, stage_inputs, train_epoch, train_worker

__all__ = [
    "AsymmetricLoss",
    "LossSum",
    "ResumeError",
    "Shards",
    "StageInputs",
    "WeightAverage",
    "build_optimizer",
    "build_scheduler",
    "checkpoint_weights",
    "describe_head",
    "epoch_seed",
    "feature_inputs",
    "fit",
    "layers_above",
    "load_optimizer_state",
    "load_training_data",
    "loss_function",
    "prepare_run",
    "resolve_layout",
    "save_optimizer_state",
    "scored",
    "stage_inputs",
    "step_autocast",
    "step_scaler",
    "train",
    "train_epoch",
    "train_precision",
    "train_worker",
    "write_bundle_from_checkpoint",
]
