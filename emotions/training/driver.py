"""The driver's side of a training run: load and tokenize the data once, put it in the object
store, run a ``TorchTrainer`` over ``worker.train_worker``, then fit thresholds and write the
bundle from the final checkpoint (``write_bundle_from_checkpoint``, through the precision gate:
on this CPU, and on one of the run's GPUs for a GPU run).

Resume policy (``prepare_run``, before any worker starts): a run started again under its name
resumes from its latest checkpoint (Ray Train hands it to the workers), unless its config
changed outside ``config.RESUMABLE_KEYS`` (refused, naming each key) or ``run.resume`` is false
(``--fresh``: its old checkpoints are deleted). A run that already finished is not trained
again: its recorded result gives the bundle.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import ray
import ray.train
import ray.train.torch
from safetensors.numpy import load_file as load_numpy

from emotions import bundle, cluster, environment, storage
from emotions.batching import tokenize
from emotions.config import AUTO, ConfigError, TrainConfig, config_changes, config_hash
from emotions.data import LabelledData, expand_by_concatenation, load_labelled
from emotions.evaluation import evaluation_report, fit_bundle_thresholds
from emotions.evaluation_report import format_shares, format_summary
from emotions.model import encoder_layers, load_tokenizer
from emotions.precision import save_checked_bundle
from emotions.training.checkpoints import PREDICTIONS_FILE, STATE_FILE, ResumeError, checkpoint_weights
from emotions.training.worker import train_worker

log = logging.getLogger("emotions.training")


def load_training_data(config: TrainConfig) -> tuple[LabelledData, LabelledData]:
    """(train, validation) as ``config.data`` says: capped and sampled with ``config.seed``, the
    training part expanded by concatenation when ``data.concat_fraction`` asks for it."""
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


def fit(
    config: TrainConfig, name: str, callbacks: list | None = None, data: tuple | None = None, reuse_final: bool = False
) -> ray.train.Result:
    """The Ray Train run itself: data to the object store, TorchTrainer, fit. The result's
    checkpoint is the final one (weights + gathered predictions). ``reuse_final``: a run that
    already finished under this name and config returns its recorded result without starting
    any worker (a re-submitted job republishes its bundle in seconds)."""
    config = resolve_layout(config)
    environment.log_environment(config.to_dict(), "train")
    latest = prepare_run(config, name)
    if reuse_final and (finished := finished_run(config, latest)) is not None:
        log.info(
            "run %r finished before: the bundle is written from its final checkpoint %s, nothing is "
            "trained (--fresh, or run.resume=false, trains it again)",
            name,
            finished.checkpoint.path,
        )
        return finished
    layers = encoder_layers(config.model.encoder) if config.model.freeze_layers else 0  # a hub config: only when asked
    if config.model.freeze_layers and config.model.freeze_layers >= layers:
        raise ConfigError(
            f"model.freeze_layers={config.model.freeze_layers} would freeze all {layers} layers of "
            f"{config.model.encoder}; stage 1 must train some (at most {layers - 1})"
        )
    tokenizer = load_tokenizer(config.model.encoder)
    train_data, val_data = data or load_training_data(config)
    log.info(
        "data: %d train examples (%s), %d validation examples (%s)",
        len(train_data),
        train_data.source,
        len(val_data),
        val_data.source,
    )
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
            num_workers=s.num_workers,
            use_gpu=s.use_gpu,
            resources_per_worker={"CPU": s.cpus_per_worker, **({"GPU": 1} if s.use_gpu else {})},
            placement_strategy=s.placement.upper(),
        ),
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
    s = config.scaling
    nodes = cluster.nodes() if s.num_workers == AUTO or s.placement == "strict_pack" else ([], None)
    scaling, how = cluster.resolve_scaling(config.scaling, *nodes)
    log.info("Ray Train layout: %s", how)
    return replace(config, scaling=scaling)


def prepare_run(config: TrainConfig, name: str) -> tuple[ray.train.Result, dict] | None:
    """Before any training, on the driver: with ``run.resume`` false, delete the run's folder (its
    checkpoints); else, if the run has checkpoints, refuse (ConfigError) to resume them under a
    config that differs outside ``config.RESUMABLE_KEYS`` (ResumeError: checkpoints that do not
    record their config). Idempotent. Returns the run as
    ``latest_checkpoint`` reads it (None without checkpoints, or after a deletion)."""
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
    fix = f"Start it over with --fresh (or run.resume=false), which deletes {run.uri}; or give this run a new run.name."
    if "config" not in saved:
        raise ResumeError(
            f"run {name!r} in {run.uri} has checkpoints that do not record their config (made by an older "
            f"version), so resuming them cannot be checked. {fix}"
        )
    changes = config_changes(saved["config"], config.to_dict())
    if changes:
        raise ConfigError(
            f"run {name!r} in {run.uri} has checkpoints made with another config; resuming "
            "would train on with the old values. Changed:\n  " + "\n  ".join(changes) + f"\n{fix}"
        )


def latest_checkpoint(run: storage.Folder) -> tuple[ray.train.Result, dict] | None:
    """(the run as Ray Train recorded it in its folder, the state.json of its latest checkpoint);
    None if it has no checkpoint. ``Result.from_path`` reads the record: ``.checkpoint`` is the
    latest one, ``.metrics`` what was reported with it."""
    if not run.exists():
        return None
    try:
        result = ray.train.Result.from_path(run.root, storage_filesystem=run.fs)
    except RuntimeError:  # Ray Train's words for "no record of reported checkpoints here"
        return None
    if result.checkpoint is None:
        return None
    checkpoint = storage.Folder(result.checkpoint.filesystem, result.checkpoint.path, run.prefix)
    return result, checkpoint.read_json(STATE_FILE) or {}


def finished_run(config: TrainConfig, latest: tuple[ray.train.Result, dict] | None) -> ray.train.Result | None:
    """The run's result (``latest``, as ``prepare_run`` returns it) if its latest checkpoint is its
    final one (the kept head chosen) and holds the predictions this config fits thresholds on
    (``thresholds.split`` may change on resume; a final checkpoint made for the validation split
    has no training-split predictions), else None: then the workers start and finish again."""
    if latest is None or not latest[1].get("head_choice"):
        return None
    if latest[1].get("config", {}).get("thresholds", {}).get("split") != config.thresholds.split:
        return None
    return latest[0]


def gpu_up_for_the_check() -> bool:
    """Whether a GPU run's bf16 check can run on a GPU its cluster has up now: the one it trained
    on, before the autoscaler removes it. None is up when a run that had finished is submitted
    again (its bundle is written from the recorded final checkpoint and no worker starts): a GPU
    node would then be started (for a 4-GPU pod, an image pull and minutes of paid GPUs) for one
    check, so the bundle goes without it, and tagging on GPUs checks bf16 on its first run."""
    if cluster.resources_if_connected().get("GPU", 0) > 0:  # up now: not the autoscaler's groups
        return True
    log.warning(
        "no GPU is up to check bf16 on (the run's GPU nodes are gone): the bundle records no GPU "
        "precision check, and tagging on GPUs makes it on its first run"
    )
    return False


def write_bundle_from_checkpoint(final: Path, config: TrainConfig, output: Path) -> Path:
    """Fit thresholds on the gathered predictions in the final checkpoint, write the bundle."""
    state = json.loads((final / STATE_FILE).read_text())
    val_source = state.get("validation_source", config.data.validation)
    tokenizer = load_tokenizer(config.model.encoder)
    predictions = load_numpy(str(final / PREDICTIONS_FILE))
    split = config.thresholds.split
    thresholds, notes = fit_bundle_thresholds(
        predictions[f"{split}_probs"], predictions[f"{split}_labels"], config.thresholds.rule()
    )
    report = evaluation_report(
        predictions["validation_labels"],
        predictions["validation_probs"],
        thresholds,
        in_sample=split == "validation",
        source=val_source,
        model=config.model.encoder,
        rule=config.thresholds.rule(),
    )
    report["thresholds_fitted_on"] = split
    report["thresholds_fit"] = notes
    report["head_choice"] = state.get("head_choice", {})
    report["history"] = state["history"]
    report["resumed_from"] = state.get("resumed_from", [])
    report["shards"] = state.get("shards", [])
    report["stage_seconds"] = state.get("stage_seconds", {})
    report["layout"] = state.get("config", {}).get("scaling", {})  # as resolved when the run started
    if state.get("thresholds_precision") is None:
        log.warning("the final checkpoint does not record the precision of its predictions: the bundle says unknown")
    path = save_checked_bundle(  # the gate on CPU (and on a GPU for a GPU run), recorded in the bundle
        output,
        gpu=config.scaling.use_gpu and gpu_up_for_the_check(),
        thresholds_precision=state.get("thresholds_precision"),
        weights=checkpoint_weights(final),
        encoder_config=state["encoder_config"],
        head=state["head"],
        tokenizer=tokenizer,
        thresholds=thresholds,
        config=config.to_dict(),
        metrics=report,
    )
    log.info("validation metrics (%s):\n%s\n%s", val_source, format_summary(report), format_shares(report))
    log.info("bundle written to %s", path)
    return path
