"""The two-stage fine-tune on Ray Train.

Driver (``train``): load and tokenize the data once, put it in the object store, run a
``TorchTrainer``, then fit thresholds and write the bundle from the final checkpoint.
Workers (``train_worker``): take their own shard, run each stage with ``run_stage``, and report
metrics with a checkpoint every epoch; after a failure Ray restarts them and they resume from the
last checkpoint.

Stage 1 fine-tunes encoder + head. Stage 2 freezes the encoder, builds a fresh head, computes the
pooled features once and trains the head on them (no encoder pass per epoch). Both heads then sit
over the same final encoder, and the bundle keeps the one with the better held-out macro-F1
(stage 2's only if it wins; ``model.head_choice: last`` keeps stage 2's, as the seed study did).

Checkpoints (one per epoch, kept under ``run.storage_path/<run name>/``) hold the trainable
weights, the AdamW moments by parameter name and ``state.json`` (progress, and the config they
were made with). A frozen stage stores the encoder once, as ``frozen-encoder/<sha256>.safetensors``
in the run's folder, and its checkpoints hold the head only plus that file's URI and hash. A run
that is started again under its name resumes from its latest checkpoint, unless the config changed
(refused by ``prepare_run``) or ``run.resume`` is false (its old checkpoints are deleted).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.numpy import load_file as load_numpy, save_file as save_numpy
from safetensors.torch import load as load_bytes, load_file, save as save_bytes, save_file
from torch import nn

from emotions import bundle, environment, storage
from emotions import cluster
from emotions.batching import TokenizedSet, bucket_batches, collate, random_batches, tokenize
from emotions.config import (AUTO, ConfigError, StageConfig, TrainConfig, config_changes, config_hash,
                             from_dict)  # fmt: skip
from emotions.data import LabelledData, expand_by_concatenation, load_labelled
from emotions.evaluation import evaluation_report, fit_thresholds, heldout_macro_f1, validation_scores
from emotions.metrics import format_summary
from emotions.inference import head_probs, run_rows
from emotions.model import EmotionClassifier, build_head, encoder_layers, load_encoder, load_tokenizer
from emotions.progress import Progress
from emotions.tagging.inference import save_checked_bundle

log = logging.getLogger("emotions.training")

STATE_FILE = "state.json"
WEIGHTS_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
PREDICTIONS_FILE = "predictions.safetensors"
EMA_FILE = "ema.safetensors"  # a stage's weight average (WeightAverage), while it runs
HEADS_FILE = "heads.safetensors"  # the heads a later stage competes with: "<stage>/head.*", "<stage>/validation_probs"
FROZEN_ENCODER_DIR = "frozen-encoder"  # in the run's folder: <sha256>.safetensors, encoder.* weights
SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"  # Ray Train's list of the run's checkpoints
EVAL_BATCH = 128


# ----------------------------------------------------------------------------- driver


def load_training_data(config: TrainConfig) -> tuple[LabelledData, LabelledData]:
    d = config.data
    kw = dict(text_column=d.text_column, labels_column=d.labels_column, label_format=d.label_format)
    train = load_labelled(d.train, **kw).take(d.max_train_examples, config.seed)
    validation = load_labelled(d.validation, **kw).take(d.max_validation_examples, config.seed)
    if d.concat_fraction > 0:
        train = expand_by_concatenation(train, d.concat_fraction, config.seed)
    return train, validation


def train(config: TrainConfig, output: str | Path, data: tuple | None = None) -> Path | str:
    """Run the two-stage fine-tune on the current Ray cluster; write a bundle to ``output``
    (a local folder, or a URI such as s3://bucket/bundles/name: written locally, then uploaded).
    ``data``: (train, validation) already loaded by ``load_training_data``, else loaded here.
    An ``output`` that holds anything but an earlier bundle is refused before training starts."""
    bundle.check_output_folder(output)
    if storage.is_uri(output):
        with tempfile.TemporaryDirectory() as tmp:
            local = train(config, Path(tmp) / "bundle", data)
            return bundle.publish_bundle(local, str(output))
    output = Path(output)
    name = config.run.name or f"{output.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    result = fit(config, name, data=data, reuse_final=True)
    with result.checkpoint.as_directory() as final:
        return write_bundle_from_checkpoint(Path(final), config, output)


def fit(config: TrainConfig, name: str, callbacks: list | None = None,
        data: tuple | None = None, reuse_final: bool = False) -> ray.train.Result:  # fmt: skip
    """The Ray Train run itself: data to the object store, TorchTrainer, fit. The result's
    checkpoint is the final one (weights + gathered predictions). ``reuse_final``: a run that
    already finished under this name and config returns its final checkpoint without starting
    any worker (a re-submitted job republishes its bundle in seconds)."""
    config = resolve_layout(config)
    environment.log_environment(config.to_dict(), "train")
    latest = prepare_run(config, name)
    if reuse_final and (final := final_checkpoint(config, name, latest)) is not None:
        log.info("run %r finished before: the bundle is written from its final checkpoint %s, nothing is "
                 "trained (--fresh, or run.resume=false, trains it again)", name, final.path)  # fmt: skip
        return ray.train.Result(metrics=None, checkpoint=final, error=None, path=final.path)
    layers = encoder_layers(config.model.encoder) if config.model.freeze_layers else 0  # a hub config: only when asked
    if config.model.freeze_layers and config.model.freeze_layers >= layers:
        raise ConfigError(f"model.freeze_layers={config.model.freeze_layers} would freeze all {layers} layers of "
                          f"{config.model.encoder}; stage 1 must train some (at most {layers - 1})")  # fmt: skip
    tokenizer = load_tokenizer(config.model.encoder)
    train_data, val_data = data or load_training_data(config)
    log.info("data: %d train examples (%s), %d validation examples (%s)",
             len(train_data), train_data.source, len(val_data), val_data.source)  # fmt: skip
    max_len = config.data.max_length
    train_set = tokenize(train_data.texts, train_data.labels, tokenizer, max_len)
    val_set = tokenize(val_data.texts, val_data.labels, tokenizer, max_len)
    s = config.scaling
    trainer = ray.train.torch.TorchTrainer(
        train_loop_per_worker=train_worker,
        train_loop_config={
            "config": config.to_dict(),
            "train": ray.put(train_set),
            "validation": ray.put(val_set),
            "validation_source": val_data.source,
            "pad_id": tokenizer.pad_token_id or 0,
            "run_dir": storage.join(config.run.storage_path, name),  # for the frozen encoder
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=s.num_workers, use_gpu=s.use_gpu,
            resources_per_worker={"CPU": s.cpus_per_worker, **({"GPU": 1} if s.use_gpu else {})},
        ),  # fmt: skip
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage.expand(config.run.storage_path),
            failure_config=ray.train.FailureConfig(max_failures=config.run.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=config.run.checkpoints_to_keep),
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),  # our progress lines suffice
            callbacks=callbacks,
        ),
    )
    return trainer.fit()


def resolve_layout(config: TrainConfig) -> TrainConfig:
    """``config`` with its Ray Train layout in numbers (``scaling.*: auto`` resolved against the
    connected cluster's nodes by ``config.resolve_scaling``), logged in one line. Checkpoints and
    the bundle's metrics record the resolved values, so resuming a run on a cluster that resolves
    to another worker count is refused (``prepare_run``) rather than silently re-sharded."""
    nodes = cluster.nodes() if config.scaling.num_workers == AUTO else ([], None)
    scaling, how = cluster.resolve_scaling(config.scaling, *nodes)
    log.info("Ray Train layout: %s", how)
    return replace(config, scaling=scaling)


def prepare_run(config: TrainConfig, name: str) -> tuple[str, dict] | None:
    """Before any training, on the driver: with ``run.resume`` false, delete the run's folder (its
    checkpoints); else, if the run has checkpoints, refuse (ConfigError) to resume them under a
    config that differs outside ``config.RESUMABLE_KEYS``. Idempotent. Returns the run's latest
    checkpoint as ``latest_checkpoint`` reads it (None after a deletion)."""
    run = storage.Folder.from_uri(storage.join(config.run.storage_path, name))
    if not config.run.resume:
        if run.exists():
            log.warning("run.resume=false: deleting the earlier run %s", run.uri)
            run.delete()
        return None
    latest = latest_checkpoint(run)
    saved = latest[1] if latest else None
    if saved is None or saved.get("config_hash") == config_hash(config.to_dict()):
        return latest
    if "config" in saved and not config_changes(saved["config"], config.to_dict()):
        return latest  # the same settings; the checkpoint predates keys added since (at their defaults)
    fix = (f"Start it over with --fresh (or run.resume=false), which deletes {run.uri}; or give "
           "this run a new run.name.")  # fmt: skip
    if "config" not in saved:
        raise ConfigError(f"run {name!r} in {run.uri} has checkpoints that do not record their config "
                          f"(made by an older version), so resuming them cannot be checked. {fix}")  # fmt: skip
    changes = config_changes(saved["config"], config.to_dict())
    if changes:
        raise ConfigError(f"run {name!r} in {run.uri} has checkpoints made with another config; resuming "
                          "would train on with the old values. Changed:\n  " + "\n  ".join(changes) +
                          f"\n{fix}")  # fmt: skip


def latest_checkpoint(run: storage.Folder) -> tuple[str, dict] | None:
    """(folder name, state.json) of the run's latest checkpoint per Ray Train's snapshot; None if
    it has none."""
    snapshot = run.read_json(SNAPSHOT_FILE) or {}
    latest = (snapshot.get("latest_checkpoint_result") or {}).get("checkpoint_dir_name")
    return (latest, run.read_json(latest, STATE_FILE) or {}) if latest else None


def final_checkpoint(config: TrainConfig, name: str,
                     latest: tuple[str, dict] | None) -> ray.train.Checkpoint | None:  # fmt: skip
    """The run's latest checkpoint (``latest``, as ``prepare_run`` returns it) if it is its final
    one (the kept head chosen) and holds the predictions this config fits thresholds on
    (``thresholds.split`` may change on resume; a final checkpoint made for the validation split
    has no training-split predictions), else None: then the workers start and finish again."""
    if latest is None or not latest[1].get("head_choice"):
        return None
    if latest[1].get("config", {}).get("thresholds", {}).get("split") != config.thresholds.split:
        return None
    run = storage.Folder.from_uri(storage.join(config.run.storage_path, name))
    return ray.train.Checkpoint(run.path(latest[0]), filesystem=run.fs)


def write_bundle_from_checkpoint(final: Path, config: TrainConfig, output: Path) -> Path:
    """Fit thresholds on the gathered predictions in the final checkpoint, write the bundle."""
    state = json.loads((final / STATE_FILE).read_text())
    val_source = state.get("validation_source", config.data.validation)
    tokenizer = load_tokenizer(config.model.encoder)
    predictions = load_numpy(str(final / PREDICTIONS_FILE))
    split = config.thresholds.split
    thresholds = fit_thresholds(predictions[f"{split}_probs"], predictions[f"{split}_labels"],
                                fallback=config.thresholds.fallback)  # fmt: skip
    report = evaluation_report(predictions["validation_labels"], predictions["validation_probs"], thresholds,
                               in_sample=split == "validation", source=val_source, model=config.model.encoder,
                               fallback=config.thresholds.fallback)  # fmt: skip
    report["thresholds_fitted_on"] = split
    report["head_choice"] = state.get("head_choice", {})
    report["history"] = state["history"]
    report["resumed_from"] = state.get("resumed_from", [])
    report["shards"] = state.get("shards", [])
    report["stage_seconds"] = state.get("stage_seconds", {})
    report["layout"] = state.get("config", {}).get("scaling", {})  # as resolved when the run started
    path = save_checked_bundle(  # the int8 gate, recorded in the bundle: tagging on CPU reads it
        output,
        weights=checkpoint_weights(final),
        encoder_config=state["encoder_config"],
        head=state["head"],
        tokenizer=tokenizer,
        thresholds=thresholds,
        config=config.to_dict(),
        metrics=report,
    )
    log.info("validation metrics (%s):\n%s", val_source, format_summary(report))
    log.info("bundle written to %s", path)
    return path


# ----------------------------------------------------------------------------- workers


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
    # Each finished stage's head over the current encoder: {stage: Candidate}. Saved in HEADS_FILE.
    candidates: dict = field(default_factory=dict)


@dataclass
class Candidate:
    """A finished stage's head, and its (gathered) validation probabilities."""

    weights: dict[str, torch.Tensor]  # the head's state_dict, on the CPU
    description: dict  # describe_head
    validation_probs: np.ndarray


@dataclass
class Shards:
    train: TokenizedSet
    validation: TokenizedSet
    pad_id: int
    device: torch.device
    rank: int
    world: int
    validation_source: str = ""
    positive_rates: np.ndarray | None = None  # [28] share of training rows with each label (all ranks' rows)
    precision: str = "fp32"  # inference passes: "bf16" = autocast on a GPU (scaling.bf16)
    train_precision: str = "fp32"  # training steps: "bf16" also on a CPU with scaling.cpu_bf16


def train_precision(config: TrainConfig, device: torch.device, rank: int = 0) -> str:
    """"bf16" or "fp32" for this worker's training steps (see ScalingSettings.cpu_bf16)."""
    if device.type == "cuda":
        return "bf16" if config.scaling.bf16 else "fp32"
    wanted = config.scaling.cpu_bf16
    native = environment.cpu_has_bf16()
    if wanted == AUTO:
        wanted = native
    if wanted and not native and rank == 0:
        log.warning("scaling.cpu_bf16 is on but this CPU has no native bfloat16 (AVX512-BF16 or AMX): "
                    "its training steps will be slower than in float32; set scaling.cpu_bf16=auto")
    if rank == 0 and wanted:
        log.info("training steps under autocast to bfloat16 on CPU (scaling.cpu_bf16=%s)", config.scaling.cpu_bf16)
    return "bf16" if wanted else "fp32"


def step_autocast(shards: Shards) -> torch.autocast:
    """The autocast the training steps of ``shards``' worker run under (``train_precision``)."""
    return torch.autocast(shards.device.type, dtype=torch.bfloat16, enabled=shards.train_precision == "bf16")


def train_worker(loop_config: dict) -> None:
    config = from_dict(loop_config["config"])
    environment.setup_logging()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(config.scaling.cpus_per_worker)
    torch.manual_seed(config.seed)
    train_set, device = ray.get(loop_config["train"]), ray.train.torch.get_device()
    steps = train_precision(config, device, rank)
    shards = Shards(
        train=train_set.shard(rank, world, equal=True),
        validation=ray.get(loop_config["validation"]).shard(rank, world, equal=False),
        pad_id=loop_config["pad_id"], device=device, rank=rank, world=world,
        validation_source=loop_config.get("validation_source", ""),
        positive_rates=train_set.labels.mean(0),
        precision=steps if device.type == "cuda" else "fp32", train_precision=steps,  # CPU: inference in float32
    )  # fmt: skip
    model = EmotionClassifier(load_encoder(config.model.encoder, config.seed),
                              nn.Identity(), config.model.pooling).to(shards.device)  # fmt: skip
    state, checkpoint = restore_state()
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
        model.head = build_head(model.hidden_size, stage.head_depth, stage.dropout,
                                stage.head_hidden).to(shards.device)  # fmt: skip
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
        state.candidates[stage.name] = Candidate({k: v.detach().cpu().clone() for k, v in model.head.state_dict().items()},
                                                 describe_head(model.head, model.pooling), val_probs)  # fmt: skip
        checkpoint = None  # later stages start fresh
    finish(model, shards, config, state)


def run_stage(stage: StageConfig, model: EmotionClassifier, shards: Shards, config: TrainConfig,
              state: WorkerState, checkpoint: Path | None, start_epoch: int):  # fmt: skip
    """Train one stage for ``stage.epochs`` epochs (from ``start_epoch``), reporting each epoch.
    Returns the last validation probabilities (all workers' rows, in validation order). What the
    stage trains and reads is ``stage_inputs``' answer; the loop itself is the same for both."""
    stage_start = time.perf_counter()
    inputs = stage_inputs(stage, model, shards, config)
    net = ray.train.torch.prepare_model(inputs.trained, parallel_strategy_kwargs={"find_unused_parameters": False}) \
        if shards.world > 1 else inputs.trained
    optimizer = build_optimizer(stage, model.head, model.encoder if stage.train_encoder else None)
    steps_per_epoch = math.ceil(len(shards.train) / stage.batch_size)
    scheduler = build_scheduler(optimizer, stage, steps_per_epoch)
    average = WeightAverage.for_stage(model, stage)
    if checkpoint is not None and start_epoch > 0 and (checkpoint / OPTIMIZER_FILE).exists():
        load_optimizer_state(optimizer, model, checkpoint / OPTIMIZER_FILE, shards.device)
        for _ in range(start_epoch * steps_per_epoch):
            scheduler.step()
        if average is not None:
            average.load(checkpoint / EMA_FILE)
    loss_fn = loss_function(stage, shards.positive_rates, shards.device)
    autocast = step_autocast(shards)
    val_probs = None
    for epoch in range(start_epoch, stage.epochs):
        progress = Progress(f"{stage.name} epoch {epoch + 1}/{stage.epochs}", steps_per_epoch,
                            enabled=shards.rank == 0, unit_scale=stage.batch_size * shards.world)  # fmt: skip
        t0 = time.perf_counter()
        losses = train_epoch(net, inputs, epoch_seed(config, epoch, shards.rank), loss_fn, optimizer, scheduler,
                             average, autocast, progress)  # fmt: skip
        elapsed = time.perf_counter() - t0
        with scored(average):
            val_probs, val_labels = predict_validation(model, shards, inputs.validation_features)
        metrics = epoch_metrics(stage, epoch, losses, val_probs, val_labels, elapsed, shards, config)
        if average is not None:
            metrics["ema_steps"] = average.steps  # the steps averaged so far (a resumed stage carries on)
        if shards.rank == 0:
            log.info("%s epoch %d/%d done in %.0fs: train_loss %.4f, val_loss %.4f, val macro-F1 "
                     "%.4f held out (%.4f at 0.5, %.4f in-sample)", stage.name, epoch + 1, stage.epochs,
                     elapsed, metrics["train_loss"], metrics["val_loss"], metrics["val_macro_f1_heldout"],
                     metrics["val_macro_f1"], metrics["val_macro_f1_in_sample"])  # fmt: skip
        state.stage, state.epoch = stage.name, epoch + 1
        state.stage_seconds[stage.name] = state.stage_seconds.get(stage.name, 0.0) + (
            time.perf_counter() - stage_start)
        stage_start = time.perf_counter()
        state.history.append(metrics)
        save_and_report(metrics, model, optimizer, state, shards, average=average)
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
        return feature_inputs(model.head, encode_features(model, shards.train, shards), shards.train.labels,
                              stage.batch_size, encode_features(model, shards.validation, shards))  # fmt: skip
    if config.model.freeze_embeddings:
        model.encoder.get_input_embeddings().requires_grad_(False)
    layers = model.encoder.config.num_hidden_layers
    for name, param in model.encoder.named_parameters():  # the bottom layers and the embeddings
        if config.model.freeze_layers and layers_above(name, layers) >= layers - config.model.freeze_layers:
            param.requires_grad_(False)
    train, device = shards.train, shards.device

    def logits(net: nn.Module, rows: np.ndarray) -> torch.Tensor:
        ids, mask, _ = collate(train, rows, shards.pad_id)
        return net(ids.to(device), mask.to(device))

    return StageInputs(model, lambda seed: bucket_batches(train.lengths, stage.batch_size, seed), logits, train.labels)


def feature_inputs(head: nn.Module, features: torch.Tensor, labels: np.ndarray, batch_size: int,
                   validation_features: torch.Tensor | None = None) -> StageInputs:  # fmt: skip
    """A head trained on pooled features [n, hidden]: shuffled batches (features have no length)."""
    return StageInputs(head, lambda seed: random_batches(len(features), batch_size, seed),
                       lambda net, rows: net(features[rows]), labels, validation_features)  # fmt: skip


def train_epoch(net: nn.Module, inputs: StageInputs, seed: int, loss_fn: nn.Module, optimizer, scheduler,
                average: WeightAverage | None = None, autocast=None, progress: Progress | None = None) -> list[float]:  # fmt: skip
    """One pass over ``inputs``' batches: a step of the optimizer (and scheduler, and weight
    average) per batch. Returns the batches' losses."""
    net.train()
    losses = []
    for rows in inputs.batches(seed):
        with autocast or contextlib.nullcontext():
            logits = inputs.logits(net, rows)
            loss = loss_fn(logits.float(), torch.from_numpy(inputs.labels[rows]).to(logits.device))
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if average is not None:
            average.update()
        losses.append(loss.item())
        if progress is not None:
            progress.step(loss=losses[-1])
    return losses


def epoch_seed(config: TrainConfig, epoch: int, rank: int = 0) -> int:
    """The shuffling seed of an epoch's batches on a worker."""
    return config.seed * 1000 + epoch * 10 + rank


def scored(average: WeightAverage | None):
    """While validating: the weight average swapped in, when the stage keeps one."""
    return average.swapped_in() if average is not None else contextlib.nullcontext()


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
        save_file({n: t.contiguous().cpu() for n, t in self.average.items()}, str(path),
                  metadata={"steps": str(self.steps)})  # fmt: skip

    def load(self, path: Path) -> None:
        with safe_open(str(path), "pt") as f:
            self.steps = int((f.metadata() or {}).get("steps", 0))
        saved = load_file(str(path))
        if sorted(saved) != sorted(self.names):
            raise RuntimeError(f"weight average {path} is for other parameters; start the run over with --fresh")
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


def encode_features(model: EmotionClassifier, data: TokenizedSet, shards: Shards) -> torch.Tensor:
    """Pooled encoder features [n, hidden] float32 for every row of ``data``, in row order."""
    return run_rows(model, data, shards.pad_id, batch_size=EVAL_BATCH, device=shards.device,
                    precision=shards.precision, output="features")  # fmt: skip


def predict_probs(model: EmotionClassifier, data: TokenizedSet, shards: Shards,
                  features: torch.Tensor | None = None) -> np.ndarray:  # fmt: skip
    """Sigmoid probabilities [n, 28] for this worker's rows of ``data``."""
    return head_probs(model.head, features if features is not None else encode_features(model, data, shards))


def gather_rows(local: np.ndarray, index: np.ndarray, shards: Shards) -> np.ndarray:
    """Every worker's rows, put back in source order (duplicates from equal shards collapse)."""
    if shards.world == 1:
        parts = [(index, local)]
    else:
        parts = [None] * shards.world
        dist.all_gather_object(parts, (index, local))
    n = max(int(i.max()) for i, _ in parts if len(i)) + 1
    out = np.zeros((n, local.shape[1]), dtype=np.float32)
    for i, values in parts:
        out[i] = values
    return out


def predict_validation(model, shards: Shards, features: torch.Tensor | None):
    probs = predict_probs(model, shards.validation, shards, features)
    all_probs = gather_rows(probs, shards.validation.index, shards)
    all_labels = gather_rows(shards.validation.labels, shards.validation.index, shards)
    return all_probs, all_labels


def epoch_metrics(stage: StageConfig, epoch: int, losses: list[float], probs: np.ndarray,
                  labels: np.ndarray, elapsed: float, shards: Shards, config: TrainConfig) -> dict:  # fmt: skip
    samples = len(losses) * stage.batch_size * shards.world
    metrics = {
        "stage": stage.name,
        "epoch": epoch + 1,
        "train_loss": float(np.mean(losses)) if losses else float("nan"),
        **validation_scores(labels, probs, fallback=config.thresholds.fallback),
        "samples_per_s": samples / max(elapsed, 1e-9),
        "epoch_seconds": elapsed,
    }
    # Stage names in the keys, so a results table keeps both stages apart.
    metrics.update({f"{stage.name}/{k}": v for k, v in list(metrics.items())[2:]})
    metrics["train_precision"] = shards.train_precision  # what the steps ran in (scaling.cpu_bf16 on CPU)
    return metrics


def save_and_report(metrics: dict, model: EmotionClassifier, optimizer, state: WorkerState, shards: Shards,
                    predictions: dict | None = None, average: WeightAverage | None = None) -> None:  # fmt: skip
    """Every rank reports; rank 0 attaches the checkpoint (weights, optimizer, state). While the
    encoder is frozen (``state.frozen_encoder``) the weights are the head's only."""
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if shards.rank == 0:
            d = Path(tmp)
            weights = {k: v.contiguous().cpu() for k, v in model.state_dict().items()
                       if not (state.frozen_encoder and k.startswith("encoder."))}  # fmt: skip
            save_file(weights, str(d / WEIGHTS_FILE))
            if optimizer is not None:
                save_optimizer_state(optimizer, model, d / OPTIMIZER_FILE)
            if average is not None:
                average.save(d / EMA_FILE)
            if predictions is not None:
                save_numpy(predictions, str(d / PREDICTIONS_FILE))
            if state.candidates:
                save_candidates(state.candidates, d / HEADS_FILE)
            payload = {**{k: v for k, v in state.__dict__.items() if k != "candidates"},
                       "candidates": {name: c.description for name, c in state.candidates.items()},
                       "validation_source": shards.validation_source,
                       "encoder_config": model.encoder.config.to_dict(),
                       "head": describe_head(model.head, model.pooling)}  # fmt: skip
            (d / STATE_FILE).write_text(json.dumps(payload, default=str))
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint)


def finish(model: EmotionClassifier, shards: Shards, config: TrainConfig, state: WorkerState) -> None:
    """Final checkpoint: the kept head's weights plus the gathered predictions the driver fits
    thresholds on."""
    labels = gather_rows(shards.validation.labels, shards.validation.index, shards)
    predictions = {"validation_probs": choose_head(model, shards, config, state, labels), "validation_labels": labels}
    if config.thresholds.split == "train":
        train_probs = predict_probs(model, shards.train, shards)
        predictions["train_probs"] = gather_rows(train_probs, shards.train.index, shards)
        predictions["train_labels"] = gather_rows(shards.train.labels, shards.train.index, shards)
    last = state.history[-1] if state.history else {}
    # The final report scores the head the bundle keeps: what Tune picks the best trial by.
    kept = state.head_choice["kept"]
    metrics = {**last, "final": True, "head_kept": kept,
               "val_macro_f1_heldout": state.head_choice["heldout_macro_f1"][kept]}  # fmt: skip
    save_and_report(metrics, model, None, state, shards, predictions)


def choose_head(model: EmotionClassifier, shards: Shards, config: TrainConfig, state: WorkerState,
                labels: np.ndarray) -> np.ndarray:  # fmt: skip
    """Put the kept head (``model.head_choice``) on the model, record the candidates' held-out
    macro-F1 (on the gathered validation ``labels``) and the choice in ``state.head_choice``;
    return the kept head's validation probs. Every rank computes the same choice from the same
    gathered predictions."""
    scores = {name: heldout_macro_f1(labels, c.validation_probs, fallback=config.thresholds.fallback)
              for name, c in state.candidates.items()}  # fmt: skip
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
        log.info("heads over the final encoder, held-out macro-F1: %s; the bundle keeps %s's (%s)",
                 ", ".join(f"{n} {v:.4f}" for n, v in scores.items()), kept,
                 "the best" if config.model.head_choice == "heldout" else "the last stage's")  # fmt: skip
    return state.candidates[kept].validation_probs


def describe_shards(shards: Shards) -> list[dict]:
    """Per rank: rows in its training shard and a digest of their source row numbers."""
    index = np.unique(shards.train.index)
    mine = {"rank": shards.rank, "rows": int(len(index)),
            "digest": hashlib.sha256(index.astype(np.int64).tobytes()).hexdigest()[:16]}  # fmt: skip
    if shards.world == 1:
        return [mine]
    everyone = [None] * shards.world
    dist.all_gather_object(everyone, mine)
    return everyone


def describe_head(head: nn.Sequential, pooling: str) -> dict:
    linears = [m for m in head if isinstance(m, nn.Linear)]
    dropout = next((m.p for m in head if isinstance(m, nn.Dropout)), 0.0)
    return {"depth": len(linears), "hidden": linears[0].out_features if len(linears) == 2 else None,
            "dropout": dropout, "pooling": pooling}  # fmt: skip


def restore_state() -> tuple[WorkerState, Path | None]:
    """The state of the last checkpoint, if Ray restarted us after a failure (or a resumed run)."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return WorkerState(), None
    local = Path(tempfile.mkdtemp(prefix="emotions-restore-"))
    checkpoint.to_directory(str(local))
    saved = json.loads((local / STATE_FILE).read_text())
    state = WorkerState(saved["stage"], saved["epoch"], saved["history"], saved.get("resumed_from", []),
                        stage_seconds=saved.get("stage_seconds", {}),
                        frozen_encoder=saved.get("frozen_encoder"), head_choice=saved.get("head_choice", {}))  # fmt: skip
    if (local / HEADS_FILE).exists():
        state.candidates = load_candidates(local / HEADS_FILE, saved.get("candidates", {}))
    state.resumed_from.append({"stage": state.stage, "epoch": state.epoch})
    log.warning("resuming from checkpoint: %s epoch %d done", state.stage, state.epoch)
    return state, local


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
    data = save_bytes({k: v.contiguous().cpu() for k, v in model.state_dict().items()
                       if k.startswith("encoder.")})  # fmt: skip
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
            raise RuntimeError(f"frozen encoder {ref['uri']} does not match the sha256 {ref['sha256']} "
                               "its checkpoint recorded: the run's storage was altered; start the run "
                               "over with --fresh")  # fmt: skip
        weights.update({k: v.to(device) for k, v in load_bytes(data).items()})
    return weights


def optimizer_param_names(optimizer: torch.optim.Optimizer, model: nn.Module) -> list[str]:
    """The model's name for each parameter the optimizer holds, in the optimizer's order."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def save_optimizer_state(optimizer: torch.optim.Optimizer, model: nn.Module, path: Path) -> None:
    """AdamW moments as safetensors (no pickles): '{parameter name}.{key}' for each tensor."""
    names = optimizer_param_names(optimizer, model)
    tensors = {}
    for pid, values in optimizer.state_dict()["state"].items():
        for key, value in values.items():
            tensors[f"{names[pid]}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    save_file(tensors, str(path), metadata={"params": json.dumps(names)})


def load_optimizer_state(optimizer: torch.optim.Optimizer, model: nn.Module, path: Path,
                         device: torch.device) -> None:  # fmt: skip
    """Restore the moments by parameter name; refused if the saved parameters (names or shapes)
    are not the ones this optimizer trains."""
    names = optimizer_param_names(optimizer, model)
    with safe_open(str(path), "pt") as f:
        saved_names = json.loads((f.metadata() or {}).get("params", "[]"))
    if sorted(saved_names) != sorted(names):
        missing, extra = sorted(set(names) - set(saved_names)), sorted(set(saved_names) - set(names))
        raise RuntimeError(f"optimizer state {path} is for other parameters (missing {missing[:5]}, "
                           f"unexpected {extra[:5]}); start the run over with --fresh")  # fmt: skip
    params = dict(model.named_parameters())
    by_name: dict[str, dict] = {}
    for key, tensor in load_file(str(path)).items():
        name, part = key.rsplit(".", 1)  # "head.1.weight.exp_avg" -> "head.1.weight", "exp_avg"
        if part != "step" and tensor.shape != params[name].shape:
            raise RuntimeError(f"optimizer state {path}: {key} has shape {list(tensor.shape)}, the parameter "
                               f"{list(params[name].shape)}; start the run over with --fresh")  # fmt: skip
        by_name.setdefault(name, {})[part] = tensor if part == "step" else tensor.to(device)
    full = optimizer.state_dict()
    full["state"] = {pid: by_name[name] for pid, name in enumerate(names) if name in by_name}
    optimizer.load_state_dict(full)
