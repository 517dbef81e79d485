"""What each Ray Train worker runs: ``train_worker`` takes its shard of the data (``shards.py``), runs
every stage with ``run_stage`` (one loop, ``train_epoch``, for a stage that fine-tunes the encoder and
for a frozen-encoder stage, as ``stage_inputs`` says), reports metrics with a checkpoint every epoch
(rank 0 writes it, every rank reports), and ends with ``finish``: the kept head chosen
(``scoring.choose_head``) and the gathered predictions the driver fits thresholds on.
"""

from __future__ import annotations

import contextlib
import logging
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
from torch import nn

from emotions.batching import bucket_batches, collate, random_batches
from emotions.config import StageConfig, TrainConfig, config_hash, from_dict
from emotions.inference import to_device
from emotions.model import EmotionClassifier, build_head, load_encoder
from emotions.precision import fit_precision
from emotions.progress import Progress
from emotions.training.checkpoints import (
    EMA_FILE,
    OPTIMIZER_FILE,
    Candidate,
    WorkerState,
    checkpoint_weights,
    describe_head,
    load_optimizer_state,
    restore_state,
    save_frozen_encoder,
    write_checkpoint,
)
from emotions.training.distributed import compress_gradients
from emotions.training.losses import LossSum, loss_function
from emotions.training.optim import WeightAverage, build_optimizer, build_scheduler, layers_above
from emotions.training.scoring import (
    choose_head,
    encode_features,
    epoch_metrics,
    predict_validation,
    scored,
    threshold_probs,
)
from emotions.training.shards import (
    Shards,
    describe_shards,
    gather_rows,
    step_autocast,
    step_scaler,
    worker_shards,
)

log = logging.getLogger("emotions.training")


def train_worker(loop_config: dict) -> None:
    """Ray Train's per-worker function. A run that Ray Train restarted after a failure (or that was
    started again under its name) gets its latest checkpoint here and carries on from it: the
    checkpoint's folder is read in place, or from a local copy that ``as_directory`` removes when
    the worker is done."""
    checkpoint = ray.train.get_checkpoint()
    with checkpoint.as_directory() if checkpoint is not None else contextlib.nullcontext() as restored:
        train_stages(loop_config, Path(restored) if restored is not None else None)


def train_stages(loop_config: dict, checkpoint: Path | None) -> None:
    """Every stage the checkpoint (a local folder, or None) has not finished, then ``finish``."""
    config = from_dict(loop_config["config"])
    shards = worker_shards(loop_config, config)
    torch.manual_seed(config.seed)
    model = EmotionClassifier(load_encoder(config.model.encoder, config.seed), nn.Identity(), config.model.pooling).to(
        shards.device
    )
    state = restore_state(checkpoint)
    state.shards = describe_shards(shards)
    state.config, state.config_hash = loop_config["config"], config_hash(loop_config["config"])
    order = [s.name for s in config.stages]
    if state.head_choice and checkpoint is not None:  # restarted after the final report: finish again
        weights = checkpoint_weights(checkpoint, str(shards.device))
        model.load_state_dict({k: v for k, v in weights.items() if k.startswith("encoder.")}, strict=False)
        return finish(model, shards, config, state)
    for stage in config.stages:
        if state.stage and order.index(stage.name) < order.index(state.stage):
            continue  # finished before the restart; its weights are in the checkpoint
        torch.manual_seed(config.seed + order.index(stage.name))
        model.head = build_head(model.hidden_size, stage.head_depth, stage.dropout, stage.head_hidden).to(shards.device)
        start = 0
        if checkpoint is not None and stage.name == state.stage:
            model.load_state_dict(checkpoint_weights(checkpoint, str(shards.device)))
            start = state.epoch
        # A frozen encoder is stored once, by rank 0 (which writes the checkpoints); the stage's
        # checkpoints then hold the head only and refer to it.
        stores_encoder = not stage.train_encoder and shards.rank == 0
        state.frozen_encoder = save_frozen_encoder(model, loop_config["run_dir"]) if stores_encoder else None
        val_probs = run_stage(stage, model, shards, config, state, checkpoint, start)
        if stage.train_encoder:  # heads over an earlier encoder no longer fit it
            state.candidates.clear()
        head = {k: v.detach().cpu().clone() for k, v in model.head.state_dict().items()}
        state.candidates[stage.name] = Candidate(head, describe_head(model.head, model.pooling), val_probs)
        checkpoint = None  # later stages start fresh
    finish(model, shards, config, state)


def run_stage(
    stage: StageConfig,
    model: EmotionClassifier,
    shards: Shards,
    config: TrainConfig,
    state: WorkerState,
    checkpoint: Path | None,
    start_epoch: int,
):
    """Train one stage for ``stage.epochs`` epochs (from ``start_epoch``), reporting each epoch.
    Returns the last validation probabilities (all workers' rows, in validation order). What the
    stage trains and reads is ``stage_inputs``' answer; the loop itself is the same for both."""
    stage_start = time.perf_counter()
    inputs = stage_inputs(stage, model, shards, config)
    net = (
        ray.train.torch.prepare_model(inputs.trained, parallel_strategy_kwargs={"find_unused_parameters": False})
        if shards.world > 1
        else inputs.trained
    )
    if shards.world > 1:
        context = ray.train.get_context()
        s = config.scaling
        compress_gradients(net, s.gradient_compression, s.use_gpu, shards.world, context.get_local_world_size())
    optimizer = build_optimizer(stage, model.head, model.encoder if stage.train_encoder else None)
    steps_per_epoch = math.ceil(len(shards.train) / stage.batch_size)
    scheduler = build_scheduler(optimizer, stage, steps_per_epoch)
    average = WeightAverage.for_stage(model, stage)
    autocast, scaler = step_autocast(shards), step_scaler(shards)  # a scaler for float16 steps only
    if checkpoint is not None and start_epoch > 0 and (checkpoint / OPTIMIZER_FILE).exists():
        steps = load_optimizer_state(optimizer, model, checkpoint / OPTIMIZER_FILE, shards.device, scaler)
        for _ in range(start_epoch * steps_per_epoch if steps is None else steps):  # the steps the scaler kept
            scheduler.step()
        if average is not None:
            average.load(checkpoint / EMA_FILE)
    loss_fn = loss_function(stage, shards.positive_rates, shards.device)
    val_probs = None
    for epoch in range(start_epoch, stage.epochs):
        progress = Progress(
            f"{stage.name} epoch {epoch + 1}/{stage.epochs}",
            steps_per_epoch,
            enabled=shards.rank == 0,
            unit_scale=stage.batch_size * shards.world,
        )
        t0 = time.perf_counter()
        losses = train_epoch(
            net,
            inputs,
            epoch_seed(config, epoch, shards.rank),
            loss_fn,
            optimizer,
            scheduler,
            average,
            autocast,
            progress,
            scaler,
        )
        elapsed = time.perf_counter() - t0
        with scored(average):
            val_probs, val_labels = predict_validation(model, shards, inputs.validation_features)
        metrics = epoch_metrics(stage, epoch, losses, val_probs, val_labels, elapsed, shards, config)
        if average is not None:
            metrics["ema_steps"] = average.steps  # the steps averaged so far (a resumed stage carries on)
        if shards.rank == 0:
            log.info(
                "%s epoch %d/%d done in %.0fs: train_loss %.4f, val_loss %.4f, val macro-F1 "
                "%.4f held out (%.4f at 0.5, %.4f in-sample); most over-tagged label at %.1fx its share",
                stage.name,
                epoch + 1,
                stage.epochs,
                elapsed,
                metrics["train_loss"],
                metrics["val_loss"],
                metrics["val_macro_f1_heldout"],
                metrics["val_macro_f1"],
                metrics["val_macro_f1_in_sample"],
                metrics["val_share_ratio_max"],
            )
        state.stage, state.epoch = stage.name, epoch + 1
        state.stage_seconds[stage.name] = state.stage_seconds.get(stage.name, 0.0) + (time.perf_counter() - stage_start)
        stage_start = time.perf_counter()
        state.history.append(metrics)
        save_and_report(metrics, model, optimizer, state, shards, average=average, scaler=scaler, scheduler=scheduler)
    if average is not None:  # the stage ends with the averaged weights: later stages and the bundle use them
        average.apply()
    if val_probs is None:  # stage already complete at restore: predictions for the next step
        val_probs, _ = predict_validation(model, shards, inputs.validation_features)
    return val_probs


@dataclass
class StageInputs:
    """What a stage trains and reads: the stage as data, so one loop (``train_epoch``) serves a
    stage that fine-tunes the encoder, a frozen-encoder stage and the head sweep's trials."""

    trained: nn.Module  # what the optimizer steps and DDP wraps: the whole classifier, or its head
    batches: Callable[[int], list[np.ndarray]]  # seed -> batches of training row numbers
    logits: Callable[[nn.Module, np.ndarray], torch.Tensor]  # (trained or its DDP wrapper, rows) -> [b, 28]
    labels: np.ndarray  # [n, 28] of the training rows
    validation_features: torch.Tensor | None = None  # pooled once while the encoder is frozen


def stage_inputs(stage: StageConfig, model: EmotionClassifier, shards: Shards, config: TrainConfig) -> StageInputs:
    """A stage that trains the encoder reads token batches of similar length; a frozen stage pools
    this worker's rows once (``feature_inputs``) and trains the head on those features."""
    model.encoder.requires_grad_(stage.train_encoder)
    if not stage.train_encoder:
        return feature_inputs(
            model.head,
            encode_features(model, shards.train, shards),
            shards.train.labels,
            stage.batch_size,
            encode_features(model, shards.validation, shards),
        )
    if config.model.freeze_embeddings:
        model.encoder.get_input_embeddings().requires_grad_(False)
    layers = model.encoder.config.num_hidden_layers
    for name, param in model.encoder.named_parameters():  # the bottom layers and the embeddings
        if config.model.freeze_layers and layers_above(name, layers) >= layers - config.model.freeze_layers:
            param.requires_grad_(False)
    train, device = shards.train, shards.device

    def logits(net: nn.Module, rows: np.ndarray) -> torch.Tensor:
        ids, mask, _ = collate(train, rows, shards.pad_id)
        return net(to_device(ids, device), to_device(mask, device))

    return StageInputs(model, lambda seed: bucket_batches(train.lengths, stage.batch_size, seed), logits, train.labels)


def feature_inputs(
    head: nn.Module,
    features: torch.Tensor,
    labels: np.ndarray,
    batch_size: int,
    validation_features: torch.Tensor | None = None,
) -> StageInputs:
    """A head trained on pooled features [n, hidden]: shuffled batches (features have no length)."""
    return StageInputs(
        head,
        lambda seed: random_batches(len(features), batch_size, seed),
        lambda net, rows: net(features[to_device(torch.from_numpy(rows), features.device)]),
        labels,
        validation_features,
    )


def train_epoch(
    net: nn.Module,
    inputs: StageInputs,
    seed: int,
    loss_fn: nn.Module,
    optimizer,
    scheduler,
    average: WeightAverage | None = None,
    autocast=None,
    progress: Progress | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> LossSum:
    """One pass over ``inputs``' batches: a step of the optimizer (and scheduler, and weight
    average) per batch; float16 steps through ``scaler``, which skips a step whose gradients
    overflowed (the scheduler and weight average then skip it too). Returns the batches' losses,
    summed on the device: no step reads its loss. Float16 steps do make the host wait for the GPU
    once per step: the scaler reads whether a gradient overflowed before it steps."""
    net.train()
    losses = LossSum()
    # Optimizer steps taken: the scaler does not call ``optimizer.step()`` on overflow (a fused
    # optimizer, which skips inside its step, would count every step; build_optimizer's is not fused).
    stepped = [0]
    hook = optimizer.register_step_post_hook(lambda *_: stepped.__setitem__(0, stepped[0] + 1)) if scaler else None
    try:
        for rows in inputs.batches(seed):
            with autocast or contextlib.nullcontext():
                logits = inputs.logits(net, rows)
                loss = loss_fn(logits.float(), to_device(torch.from_numpy(inputs.labels[rows]), logits.device))
            before = stepped[0]
            if scaler is None:
                loss.backward()
                optimizer.step()
            else:  # the loss scaled up, so float16 gradients do not underflow; a step with inf/nan is skipped
                scaler.scale(loss).backward()
                scaler.step(optimizer)  # reads whether a gradient overflowed: the host waits for the GPU here
                scaler.update()
            if scaler is None or stepped[0] > before:
                scheduler.step()
                if average is not None:
                    average.update()
            optimizer.zero_grad(set_to_none=True)
            losses.add(loss)
            if progress is not None:
                progress.step(loss=losses.last)  # read only when a line is printed
    finally:
        if hook is not None:
            hook.remove()
    return losses


def epoch_seed(config: TrainConfig, epoch: int, rank: int = 0) -> int:
    """The shuffling seed of an epoch's batches on a worker."""
    return config.seed * 1000 + epoch * 10 + rank


def save_and_report(
    metrics: dict,
    model: EmotionClassifier,
    optimizer,
    state: WorkerState,
    shards: Shards,
    predictions: dict | None = None,
    average: WeightAverage | None = None,
    scaler: torch.amp.GradScaler | None = None,
    scheduler=None,
) -> None:
    """Every rank reports; rank 0 attaches the checkpoint (``checkpoints.write_checkpoint``)."""
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if shards.rank == 0:
            write_checkpoint(
                Path(tmp), model, optimizer, state, shards.validation_source, predictions, average, scaler, scheduler
            )
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint)


def finish(model: EmotionClassifier, shards: Shards, config: TrainConfig, state: WorkerState) -> None:
    """Final checkpoint: the kept head's weights plus the gathered predictions the driver fits
    thresholds on."""
    labels = gather_rows(shards.validation.labels, shards.validation.index, shards)
    validation_probs = choose_head(model, shards, config, state, labels)
    if shards.precision != "fp32":  # scored in bf16: thresholds are fitted on fp32 outputs
        validation_probs = gather_rows(
            threshold_probs(model, shards.validation, shards), shards.validation.index, shards
        )
    state.thresholds_precision = fit_precision(shards.device.type)
    predictions = {"validation_probs": validation_probs, "validation_labels": labels}
    if config.thresholds.split == "train":
        train_probs = threshold_probs(model, shards.train, shards)
        predictions["train_probs"] = gather_rows(train_probs, shards.train.index, shards)
        predictions["train_labels"] = gather_rows(shards.train.labels, shards.train.index, shards)
    last = state.history[-1] if state.history else {}
    # The final report scores the head the bundle keeps: what Tune picks the best trial by.
    kept = state.head_choice["kept"]
    metrics = {
        **last,
        "final": True,
        "head_kept": kept,
        "val_macro_f1_heldout": state.head_choice["heldout_macro_f1"][kept],
    }
    save_and_report(metrics, model, None, state, shards, predictions)
