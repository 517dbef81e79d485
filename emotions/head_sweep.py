"""Cheap head sweeps: stage-2 settings over one fixed, trained encoder, on cached features.

Stage 2 freezes the encoder, so every stage-2 trial would encode the same texts with the same
weights. Here the encoder runs once, in a Ray task (on a GPU when the cluster has one): the pooled
features of the train and validation texts are written to
``<run.storage_path>/features/<key>.safetensors`` (a local file or an object; the key covers the
bundle's hash, the data settings and the pooling), put in the object store once, and every trial
trains only a fresh head on them: seconds per trial instead of an encoder pass. A later sweep over
the same bundle and data reuses the file. The best head is written into a copy of the source bundle,
its thresholds fitted on fp32 outputs (features encoded again in fp32 where the sweep's were bf16,
on a GPU with native bf16), and gated on CPU and, when the cluster has a GPU, on one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import ray
import safetensors.numpy
import torch
from ray import tune
from safetensors.torch import load_file, save_file
from torch import nn

from emotions import cluster, environment, storage
from emotions.bundle import Bundle, bundle_files, check_output_folder, load_bundle_files
from emotions.config import ConfigError, TrainConfig, from_dict
from emotions.evaluation import evaluation_report, fit_bundle_thresholds, validation_scores
from emotions.evaluation_report import format_summary
from emotions.inference import head_probs
from emotions.model import build_head
from emotions.precision import describe_device, fit_precision, gpu_task, save_checked_bundle
from emotions.training import (
    WeightAverage,
    build_optimizer,
    build_scheduler,
    describe_head,
    epoch_seed,
    feature_inputs,
    load_training_data,
    loss_function,
    scored,
    train_epoch,
)
from emotions.tuning import (
    TuneSettings,
    build_tuner,
    check_search_keys,
    concurrency,
    export_bundle,
    load_tune_preset,
    merge_over,
    split_tune_settings,
    summarize,
    trial_config,
)

log = logging.getLogger("emotions.head_sweep")

HEAD_FILE = "head.safetensors"
# The data settings that decide which texts (and so which features) a sweep trains on.
DATA_KEYS = (
    "train",
    "validation",
    "text_column",
    "labels_column",
    "label_format",
    "max_length",
    "max_train_examples",
    "max_validation_examples",
    "concat_fraction",
)


def build_head_sweep_config(
    source: Bundle, preset: str = "heads", file: str | Path | None = None, overrides: list[str] = ()
) -> dict:
    """The source bundle's own training config, then the tune preset's sections (its ``base`` is
    ignored: the bundle is the base), then a file, then KEY=VALUE overrides."""
    sweep = load_tune_preset(preset)
    sweep.pop("base", None)
    raw = merge_over(source.config, sweep, file, overrides)
    check_head_only(raw, source)
    return raw


def check_head_only(raw: dict, source: Bundle) -> None:
    """Refuse settings a head sweep cannot honour: it never trains or re-reads the encoder."""
    _, settings = split_tune_settings(raw)
    outside = sorted(k for k in settings.search if not k.startswith("stage2."))
    if outside:
        raise ConfigError(
            f"a head sweep searches stage-2 settings only (the encoder is the bundle's, "
            f"fixed); drop {outside} from tune.search, or run a full sweep without "
            f"--from-bundle"
        )
    for section in ("model",):
        for key, value in raw.get(section, {}).items():
            if source.config.get(section, {}).get(key) != value:
                raise ConfigError(
                    f"{section}.{key}={value!r} differs from the bundle's "
                    f"{source.config[section].get(key)!r}; a head sweep keeps the "
                    f"bundle's encoder and pooling"
                )


def feature_key(source: Bundle, config: TrainConfig) -> str:
    data = {k: getattr(config.data, k) for k in DATA_KEYS}
    blob = json.dumps(
        {"bundle": source.hash, "data": data, "seed": config.seed, "pooling": config.model.pooling},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cached_features(source: Bundle, config: TrainConfig, cache_dir: str) -> tuple[dict[str, np.ndarray], dict]:
    """{train_x [n, hidden], train_y [n, 28], validation_x, validation_y} of the source encoder on
    the config's data, and where they came from ({"file", "reused", "device", "node_id", ...}):
    read from the cache (a folder or URI) if there, else encoded once by a Ray task and written there."""
    folder = storage.Folder.from_uri(cache_dir)
    name = f"{feature_key(source, config)}.safetensors"
    if folder.is_file(name):
        log.info("reusing cached encoder features %s", folder.uri_of(name))
        blob = folder.read_bytes(name)
        return safetensors.numpy.load(blob), {"file": folder.uri_of(name), "reused": True, **read_metadata(blob)}
    train, validation = load_training_data(config)
    log.info(
        "encoding %d train and %d validation texts once with the bundle's encoder (%s), in a Ray task",
        len(train),
        len(validation),
        source.hash,
    )
    encoded, info = encode_on_ray(source, {"train": train.texts, "validation": validation.texts}, "sweep")
    features = {
        "train_x": encoded["train"],
        "train_y": train.labels.astype(np.float32),
        "validation_x": encoded["validation"],
        "validation_y": validation.labels.astype(np.float32),
    }
    log.info(
        "features ready in %.0fs on %s (node %s); cached at %s",
        info["seconds"],
        info["device"],
        info["node_id"],
        folder.uri_of(name),
    )
    metadata = {"bundle": source.hash, "source": source.path.as_posix(), **info}
    # One object PUT on S3/GCS; write-then-rename locally: a killed run never leaves half a cache.
    folder.write_bytes_atomic(safetensors.numpy.save(features, metadata={k: str(v) for k, v in metadata.items()}), name)
    return features, {"file": folder.uri_of(name), "reused": False, **metadata}


def read_metadata(blob: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file's bytes (an 8-byte little-endian header size,
    then the JSON header)."""
    size = int.from_bytes(blob[:8], "little")
    return json.loads(blob[8 : 8 + size]).get("__metadata__", {})


def encode_on_ray(
    source: Bundle, texts: dict[str, list[str]], purpose: str = "sweep"
) -> tuple[dict[str, np.ndarray], dict]:
    """{split: [n] texts} -> ({split: [n, hidden] features}, where and at what precision they were
    computed), by one Ray task: on a GPU when the cluster has (or can scale to) one, else on the
    largest node's CPUs. ``purpose`` "sweep": at ``feature_precision``; "thresholds": IEEE fp32.
    The bundle travels as its files through the object store, so the task may run on a node that
    cannot read the driver's disk; the task loads them and checks the content hash."""
    use_gpu = cluster_has_gpu()
    # One CPU reserved, the largest node's CPUs as threads: asking Ray for the whole node waits
    # forever while any other actor holds a fraction of it.
    task = gpu_task(encode_texts) if use_gpu else ray.remote(num_cpus=1, max_retries=1)(encode_texts)
    files = ray.put(bundle_files(source.path))
    return ray.get(task.remote(files, source.hash, texts, "cuda" if use_gpu else "cpu", node_cpus(), purpose))


def cluster_has_gpu() -> bool:
    """Whether the connected cluster has, or its autoscaler may start, a GPU."""
    current, maximum = cluster.resources()
    return max(current.get("GPU", 0), (maximum or {}).get("GPU", 0)) > 0


def feature_precision(device) -> str:
    """The precision the sweep's features are encoded at on ``device`` (a ``precision.Device``):
    bf16 on a GPU that computes it natively (the features only feed heads trained in float32);
    fp32 elsewhere (emulated bf16 on a T4 or V100 is slower than fp32)."""
    return "bf16" if device.kind == "cuda" and device.bf16 else "fp32"


def node_cpus() -> int:
    """The CPUs of the largest live node (at least 1: an autoscaler starts a node for the task)."""
    return max([1, *(int(cpus) for cpus in cluster.node_cpus())])


def encode_texts(
    files: dict[str, bytes],
    bundle_hash: str,
    texts: dict[str, list[str]],
    device: str,
    threads: int = 1,
    purpose: str = "sweep",
) -> tuple[dict[str, np.ndarray], dict]:
    """Ray task: load the bundle's files on ``device`` and encode (``threads`` torch threads on
    CPU), at ``feature_precision`` for a sweep, at IEEE fp32 for thresholds."""
    start = time.perf_counter()
    torch.set_num_threads(max(1, threads))
    bundle = load_bundle_files(files, bundle_hash, device=device)  # verifies every file and the hash
    hardware = describe_device(device)
    precision = feature_precision(hardware) if purpose == "sweep" else "fp32"
    encoded = {split: bundle.features(split_texts, precision=precision) for split, split_texts in texts.items()}
    context = ray.get_runtime_context()
    name = f"cuda ({torch.cuda.get_device_name()})" if device == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    info = {
        "device": name,
        "device_kind": hardware.kind,
        "precision": precision,
        "node_id": context.get_node_id(),
        "worker_id": context.get_worker_id(),
        "pid": os.getpid(),
        "seconds": round(time.perf_counter() - start, 1),
    }
    return encoded, info


def train_head(config: TrainConfig, features: dict[str, np.ndarray], report) -> None:
    """Stage 2 on cached features, through the loop training's frozen stage runs
    (``training.feature_inputs`` and ``train_epoch``): a fresh head, ``stage2.epochs`` epochs, the
    stage's loss, rates and weight average; after each epoch ``report(metrics, head, last)``
    (Tune's report in a trial)."""
    stage = config.stage2
    torch.manual_seed(config.seed + 1)  # as training seeds stage 2's head
    with warnings.catch_warnings():  # object-store arrays are read-only; nothing here writes to them
        warnings.simplefilter("ignore", UserWarning)
        x, vx = torch.from_numpy(features["train_x"]), torch.from_numpy(features["validation_x"])
    head = build_head(x.shape[1], stage.head_depth, stage.dropout, stage.head_hidden)
    inputs = feature_inputs(head, x, features["train_y"], stage.batch_size, vx)
    optimizer = build_optimizer(stage, head)
    scheduler = build_scheduler(optimizer, stage, math.ceil(len(x) / stage.batch_size))
    loss_fn = loss_function(stage, features["train_y"].mean(0))
    average = WeightAverage.for_stage(head, stage)
    for epoch in range(stage.epochs):
        start = time.perf_counter()
        losses = train_epoch(head, inputs, epoch_seed(config, epoch), loss_fn, optimizer, scheduler, average)
        with scored(average):
            probs = head_probs(head, vx)
        last = epoch + 1 == stage.epochs
        if last and average is not None:
            average.apply()  # the head reported (and exported) is the average, as in training
        metrics = {
            "stage": "stage2",
            "epoch": epoch + 1,
            "train_loss": losses.mean(),
            **validation_scores(features["validation_y"], probs, rule=config.thresholds.rule()),
            "epoch_seconds": time.perf_counter() - start,
            "final": last,
        }
        report(metrics, head, last)


def run_head_trial(params: dict, base: dict, features: dict[str, np.ndarray]) -> None:
    """Tune's trainable: a head on the shared features. No encoder is loaded here."""
    torch.set_num_threads(1)
    config = trial_config(base, params)

    def report(metrics: dict, head: nn.Module, last: bool) -> None:
        if not last:
            tune.report(metrics)
            return
        with tempfile.TemporaryDirectory() as tmp:
            save_file({k: v.contiguous() for k, v in head.state_dict().items()}, os.path.join(tmp, HEAD_FILE))
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))

    train_head(config, features, report)


def run_head_sweep(source: Bundle, raw_config: dict, output: str | Path, resume: bool = True) -> dict:
    """Sweep stage-2 settings over the (loaded) bundle's encoder; write the table, plot, best config
    and the best bundle (the source bundle with the best head and its thresholds) into ``output``,
    a local folder or a URI."""
    output = storage.expand(output)
    check_output_folder(storage.join(output, "best_bundle"))  # before the sweep, not after it
    check_head_only(raw_config, source)
    base_raw, settings = split_tune_settings(raw_config)
    base = from_dict(base_raw)
    environment.log_environment(
        {**base.to_dict(), "tune": settings.__dict__, "from_bundle": str(source.path)}, "tune-heads"
    )
    check_search_keys(base, settings)
    cluster.check_state_api()
    features, origin = cached_features(source, base, storage.join(base.run.storage_path, "features"))
    # with_parameters puts the features in the object store once; trials map them, zero-copy.
    per_trial = {"CPU": 1}
    trainable = tune.with_resources(
        tune.with_parameters(run_head_trial, base=base.to_dict(), features=features), per_trial
    )
    at_once = concurrency(per_trial, settings, *cluster.resources())
    tuner = build_tuner(
        trainable, storage.join(output, "sweep"), base, settings, max_epochs(base, settings), at_once, resume
    )
    results = tuner.fit()
    return write_head_results(results, settings, base, source, features, origin, output)


def max_epochs(base: TrainConfig, settings: TuneSettings) -> int:
    """ASHA's max_t: the most epochs any trial can run (stage2.epochs may be searched)."""
    spec = settings.search.get("stage2.epochs")
    values = spec.get("choice", spec.get("uniform", spec.get("loguniform", []))) if isinstance(spec, dict) else [spec]
    return int(max([base.stage2.epochs, *[v for v in values if v is not None]]))


def write_head_results(
    results,
    settings: TuneSettings,
    base: TrainConfig,
    source: Bundle,
    features: dict[str, np.ndarray],
    origin: dict,
    output: str,
) -> dict:
    extra = {"from_bundle": {"path": str(source.path), "hash": source.hash}, "features": origin}
    summary = summarize(results, settings, base, output, extra, usable=lambda r: r.checkpoint is not None)
    with summary.best.checkpoint.as_directory() as d:
        head_state = load_file(os.path.join(d, HEAD_FILE))
    fit_features = threshold_features(source, summary.config, features, origin)
    bundle = export_bundle(
        storage.join(output, "best_bundle"),
        lambda local: write_head_bundle(source, summary.config, head_state, fit_features, local),
    )
    log.info("best head %s: %s = %.4f; bundle %s", summary.best.path, settings.metric, summary.metric, bundle)
    return summary.as_dict(bundle=bundle, features=origin["file"])


def threshold_features(source: Bundle, config: TrainConfig, features: dict[str, np.ndarray], origin: dict) -> dict:
    """The features the best head's thresholds are fitted (and its report scored) on: the sweep's
    own where they are IEEE fp32 (encoded on CPU, or on a GPU without native bf16), else the fit
    split's and the validation texts encoded again in fp32 (one more encoder pass). Cached files
    made before the precision was recorded say only their device: bf16 if it was a GPU. Adds
    ``precision``: the ``fit_precision`` record."""
    precision = origin.get("precision") or ("bf16" if str(origin.get("device", "")).startswith("cuda") else "fp32")
    kind = origin.get("device_kind") or ("cuda" if str(origin.get("device", "")).startswith("cuda") else "cpu")
    if precision == "fp32":
        return {**features, "precision": fit_precision(kind)}
    train, validation = load_training_data(config)
    splits = {"validation": validation.texts, **({"train": train.texts} if config.thresholds.split == "train" else {})}
    log.info("encoding %s again in fp32 for the thresholds (the sweep's features are %s)", sorted(splits), precision)
    encoded, info = encode_on_ray(source, splits, "thresholds")
    again = {f"{split}_x": x for split, x in encoded.items()}
    return {**features, **again, "precision": fit_precision(info["device_kind"])}


def write_head_bundle(source: Bundle, config: TrainConfig, head_state: dict, features: dict, output: Path) -> Path:
    """The source bundle's encoder with this head, thresholds fitted as the config says, on
    ``features`` (``threshold_features``: fp32)."""
    s = config.stage2
    head = build_head(features["train_x"].shape[1], s.head_depth, s.dropout, s.head_hidden)
    head.load_state_dict(head_state)
    split = config.thresholds.split
    # torch.tensor copies: the features may be read-only (from the object store or the cache's bytes).
    probs = {name: head_probs(head, torch.tensor(features[f"{name}_x"])) for name in ("train", "validation")}
    thresholds, notes = fit_bundle_thresholds(probs[split], features[f"{split}_y"], config.thresholds.rule())
    report = evaluation_report(
        features["validation_y"],
        probs["validation"],
        thresholds,
        in_sample=split == "validation",
        source=config.data.validation,
        model=config.model.encoder,
        rule=config.thresholds.rule(),
    )
    report["thresholds_fitted_on"] = split
    report["thresholds_fit"] = notes
    report["head_sweep"] = {"from_bundle": source.hash}
    weights = {k: v for k, v in source.model.state_dict().items() if not k.startswith("head.")}
    weights.update({f"head.{k}": v for k, v in head_state.items()})
    path = save_checked_bundle(
        output,
        gpu=cluster_has_gpu(),  # bf16 checked on the kind of GPU the cluster tags on
        thresholds_precision=features["precision"],
        weights=weights,
        encoder_config=source.model.encoder.config.to_dict(),
        head=describe_head(head, config.model.pooling),
        tokenizer=source.tokenizer,
        thresholds=thresholds,
        config=config.to_dict(),
        metrics=report,
    )
    log.info("validation metrics of the best head:\n%s", format_summary(report))
    return path
