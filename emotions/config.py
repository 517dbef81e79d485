"""Typed training configuration: frozen dataclasses, YAML presets, checked ``key=value`` overrides.

A config is built from a preset (``emotions/presets/NAME.yaml``), then an optional user file
(YAML or JSON), then ``section.key=value`` overrides, in that order. Every unknown key and every
bad value is reported at once, by name, before any cluster time is spent.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import re
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration problem; the message names each bad key, its value and the fix."""


@dataclass(frozen=True)
class DataConfig:
    train: str = "goemotions:train"  # a path, goemotions:train|dev, or hf:NAME[:SPLIT]
    validation: str = "goemotions:dev"
    text_column: str = "text"
    labels_column: str = "labels"
    label_format: str = "auto"  # auto | names | ids | columns
    max_train_examples: int | None = None  # seeded subset; None = all
    max_validation_examples: int | None = None
    concat_fraction: float = 0.0  # dataset expansion: extra examples as a fraction of train
    max_length: int = 128  # tokens; GoEmotions comments are ~19 tokens on average


@dataclass(frozen=True)
class ModelConfig:
    # "minilm" = the embedded all-MiniLM-L6-v2; "tiny-random" = a seeded 2-layer BERT (tests);
    # anything else is a Hugging Face model name or a local folder.
    encoder: str = "minilm"
    pooling: str = "mean"  # mean | cls
    freeze_embeddings: bool = False  # keep the word-embedding matrix fixed in stage 1
    # Keep the bottom N transformer layers (and the embeddings below them) fixed in stage 1: the
    # backward pass stops above them, so epochs are faster. 0 = train every layer.
    freeze_layers: int = 0
    # Which stage's head the bundle keeps, of the heads trained over its final encoder (stage 1's
    # and stage 2's when stage 2 freezes the encoder): "heldout" = the best on held-out macro-F1
    # (a later stage's only if it is strictly better); "last" = the last stage's (the seed study's
    # two-stage design).
    head_choice: str = "heldout"


@dataclass(frozen=True)
class StageConfig:
    name: str
    epochs: int
    train_encoder: bool  # False = frozen encoder: pooled features are computed once, then reused
    learning_rate: float = 5e-5
    head_learning_rate: float | None = None  # None = learning_rate
    schedule: str = "linear"  # linear (warm-up then linear decay) | constant
    warmup_ratio: float = 0.06
    # The linear schedule decays to this fraction of the learning rates, not to 0. With a weight
    # average (ema_decay) the last steps then still move, and the average smooths them.
    lr_floor: float = 0.0
    weight_decay: float = 0.01
    batch_size: int = 32  # per worker
    head_depth: int = 1  # 1 = Linear; 2 = Linear-GELU-Dropout-Linear
    head_hidden: int | None = None  # width of the 2-layer head's hidden layer; None = encoder width
    dropout: float = 0.1
    # Imbalance: each label's positives weigh ((negatives / positives) in the training data) ** this
    # in the BCE loss. 0 = plain BCE; 0.5 = the square root (grief x22, neutral x1.4); 1 = balanced.
    pos_weight_power: float = 0.0
    # Asymmetric loss (Ridnik et al., 2021) on top of the weights above: negatives' terms scaled by
    # p ** gamma_neg after shifting p down by neg_clip (easy negatives drop out), positives' by
    # (1 - p) ** gamma_pos. All 0 = BCE; gamma_neg = gamma_pos, neg_clip 0 = focal loss.
    gamma_neg: float = 0.0
    gamma_pos: float = 0.0
    neg_clip: float = 0.0
    # Layer-wise learning-rate decay (stages that train the encoder): the top encoder layer trains
    # at learning_rate, each layer below at this factor times the one above, the embeddings below
    # the bottom layer. 1 = one rate for the whole encoder.
    layer_lr_decay: float = 1.0
    # An exponential moving average of the trained weights (decay per step, warmed up as
    # min(ema_decay, (1 + step) / (ema_warmup + step))): validation scores it, and the stage ends
    # with it as the model's weights. 0 = off.
    ema_decay: float = 0.0
    # The warm-up constant c: until the decay reaches ema_decay the average spans about the last
    # 1 / (c - 1) of the steps so far (10: a ninth; 4: a third). With c = 10 the decay stays below
    # 0.999 until step 8,991, so on shorter stages c, not ema_decay, sets the span.
    ema_warmup: float = 10.0


@dataclass(frozen=True)
class ThresholdConfig:
    split: str = "validation"  # validation | train (the seed study fitted on train)
    fallback: float = 0.5  # for labels with no positive example in the split


AUTO = "auto"  # a scaling value resolved from the cluster when the run starts (resolve_scaling)


@dataclass(frozen=True)
class ScalingSettings:
    # Ray Train workers. auto, on CPU: as many as the CPU nodes hold at cpus_per_worker each, so
    # with cpus_per_worker auto one worker per node (DDP across nodes, all of a node's cores in
    # one process: what a plain loop does); on GPU: one per GPU.
    num_workers: int | str = AUTO
    use_gpu: bool = False
    # CPUs of each worker, also its torch thread count. auto: with num_workers auto, a whole node
    # (the smallest CPU node's count; on GPU, the smallest node's CPUs per GPU); else 1. On a node
    # whose cores other busy processes share, multi-threaded workers slow down far more than
    # 1-thread ones (2-core machine at load 10-16: 1 x 2 ran at 0.22x of 2 x 1): set 1 there.
    cpus_per_worker: int | str = AUTO
    bf16: bool = True  # autocast to bfloat16 on GPU, in training and inference passes
    # Training steps on CPU workers under autocast to bfloat16 (validation, thresholds and tagging
    # stay float32): auto = where the CPU computes bfloat16 natively (AVX512-BF16 or AMX; the
    # default run's epochs 1.5x faster on the 2-core machine, README) and off elsewhere; true; false.
    cpu_bf16: bool | str = False


@dataclass(frozen=True)
class RunSettings:
    storage_path: str = "~/emotions_runs"  # local folder or a pyarrow URI (s3://, gs://)
    # A folder name under storage_path (RUN_NAME); None = derived from the output folder name and time.
    name: str | None = None
    max_failures: int = 3  # worker-group restarts from the last checkpoint
    checkpoints_to_keep: int = 2
    # true: a run whose name has checkpoints resumes from the latest (refused if the config
    # changed, see RESUMABLE_KEYS); false: its old checkpoints are deleted first (CLI: --fresh).
    resume: bool = True


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    stage1: StageConfig = field(
        default_factory=lambda: StageConfig(name="stage1", epochs=2, train_encoder=True)
    )
    stage2: StageConfig = field(
        default_factory=lambda: StageConfig(
            name="stage2", epochs=10, train_encoder=False, learning_rate=1e-3, batch_size=256
        )
    )
    thresholds: ThresholdConfig = field(default_factory=ThresholdConfig)
    scaling: ScalingSettings = field(default_factory=ScalingSettings)
    run: RunSettings = field(default_factory=RunSettings)

    @property
    def stages(self) -> list[StageConfig]:
        """The stages to run, in order; a stage with 0 epochs is skipped."""
        return [s for s in (self.stage1, self.stage2) if s.epochs > 0]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Keys that may differ between a run's checkpoints and the config that resumes it: how many
# restarts and checkpoints, where the run is stored, the hardware, and the thresholds (fitted
# after training on the final predictions). Any other change is refused on resume.
RESUMABLE_KEYS = frozenset({
    "run.max_failures", "run.checkpoints_to_keep", "run.resume", "run.storage_path",
    "scaling.use_gpu", "scaling.cpus_per_worker", "scaling.bf16", "scaling.cpu_bf16",
    "thresholds.split", "thresholds.fallback", "model.head_choice",
})  # fmt: skip


def flatten(raw: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"stage1": {"epochs": 2}}`` -> ``{"stage1.epochs": 2}``."""
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_hash(raw: dict[str, Any]) -> str:
    """A digest of what a run learns from: every key of the config but the RESUMABLE_KEYS."""
    kept = {k: v for k, v in flatten(raw).items() if k not in RESUMABLE_KEYS}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``["stage1.learning_rate: 0.001 -> 0.002", ...]`` for each key outside RESUMABLE_KEYS. A key
    that one side lacks (a setting added since the checkpoint was made) is no change when the other
    side holds its default: the run trained with that value."""
    before, after = flatten(old), flatten(new)
    defaults = flatten(TrainConfig().to_dict())
    show = lambda d, k: json.dumps(d[k], default=str) if k in d else "(absent)"  # noqa: E731
    return [f"{k}: {show(before, k)} -> {show(after, k)}" for k in sorted(before.keys() | after.keys())
            if k not in RESUMABLE_KEYS and before.get(k, defaults.get(k, ...)) != after.get(k, defaults.get(k, ...))]  # fmt: skip


_AUTO_KEYS = ("scaling.num_workers", "scaling.cpus_per_worker", "scaling.cpu_bf16")  # a value, or AUTO

_CHOICES = {
    "data.label_format": ("auto", "names", "ids", "columns"),
    "model.pooling": ("mean", "cls"),
    "model.head_choice": ("heldout", "last"),
    "schedule": ("linear", "constant"),
    "head_depth": (1, 2),
    "thresholds.split": ("validation", "train"),
}

# run.name is one folder under run.storage_path, which `--fresh` deletes: no "/", "..", or a leading "."
RUN_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")

PRESETS_DIR = resources.files("emotions") / "presets"


def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in PRESETS_DIR.iterdir() if p.name.endswith(".yaml"))


def load_preset(name: str) -> dict[str, Any]:
    path = PRESETS_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown preset {name!r}; choose one of {preset_names()}")
    return yaml.safe_load(path.read_text()) or {}


def load_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    text = path.read_text()
    data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(data).__name__}")
    return data


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["stage1.epochs=3", "model.encoder=bert-base-uncased"]`` -> nested dict (values as YAML)."""
    nested: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not KEY=VALUE (for example stage1.epochs=3)")
        node = nested
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(raw) if raw.strip() else None
    return nested


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def build_config(
    preset: str | None = "default", file: str | Path | None = None, overrides: list[str] = ()
) -> TrainConfig:
    raw: dict[str, Any] = load_preset(preset) if preset else {}
    if file:
        raw = merge(raw, load_file(file))
    raw = merge(raw, parse_overrides(list(overrides)))
    return from_dict(raw)


def from_dict(raw: dict[str, Any]) -> TrainConfig:
    """Build and validate a TrainConfig; all problems are collected into one ConfigError."""
    errors: list[str] = []
    config = _build(TrainConfig, raw, "", errors)
    try:
        _check(config, errors)
    except TypeError:  # a value of the wrong type, already reported above
        pass
    if errors:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(errors))
    return config


def _build(cls: type, raw: Any, prefix: str, errors: list[str]) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if not isinstance(raw, dict):
        errors.append(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {raw!r}")
        return cls() if cls is not StageConfig else None
    for key in raw:
        if key not in fields:
            errors.append(f"{prefix}{key}: unknown key; known keys here: {sorted(fields)}")
    defaults = cls() if cls is not StageConfig else None
    kwargs = {}
    for name, f in fields.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            base = dataclasses.asdict(getattr(defaults, name)) if defaults else {}
            sub = raw.get(name, {})
            kwargs[name] = _build(hint, merge(base, sub) if isinstance(sub, dict) else sub,
                                  f"{prefix}{name}.", errors)
        elif name in raw:
            kwargs[name] = _coerce(raw[name], hint, f"{prefix}{name}", errors)
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a required key (stage name/epochs) is missing
        errors.append(f"{prefix.rstrip('.')}: {exc}")
        return defaults


def _coerce(value: Any, hint: Any, key: str, errors: list[str]) -> Any:
    args = typing.get_args(hint)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), hint) if args else hint
    if value is None:
        if not optional:
            errors.append(f"{key}: may not be empty")
        return value
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if base is float and isinstance(value, str):  # YAML reads 5e-5 as a string
        try:
            return float(value)
        except ValueError:
            pass
    if key in _AUTO_KEYS and value == AUTO:
        return value
    if not isinstance(value, base) or (base is int and isinstance(value, bool)):
        expected = f"{base.__name__} or {AUTO!r}" if key in _AUTO_KEYS else base.__name__
        errors.append(f"{key}: expected {expected}, got {value!r}")
    return value


def _check(config: TrainConfig, errors: list[str]) -> None:

    def choice(key: str, value: Any, allowed_key: str | None = None) -> None:
        allowed = _CHOICES[allowed_key or key]
        if value not in allowed:
            errors.append(f"{key}: {value!r} is not one of {list(allowed)}")

    choice("data.label_format", config.data.label_format)
    choice("model.pooling", config.model.pooling)
    choice("model.head_choice", config.model.head_choice)
    choice("thresholds.split", config.thresholds.split)
    if not 0.0 <= config.data.concat_fraction <= 1.0:
        errors.append(f"data.concat_fraction: {config.data.concat_fraction} must be in [0, 1]")
    if config.data.max_length < 8:
        errors.append(f"data.max_length: {config.data.max_length} is too short (>= 8)")
    for stage in (config.stage1, config.stage2):
        if stage is None:
            continue
        choice(f"{stage.name}.schedule", stage.schedule, "schedule")
        choice(f"{stage.name}.head_depth", stage.head_depth, "head_depth")
        if stage.epochs < 0 or stage.batch_size < 1:
            errors.append(f"{stage.name}: epochs must be >= 0 and batch_size >= 1")
        if stage.learning_rate <= 0 or not 0.0 <= stage.dropout < 1.0:
            errors.append(f"{stage.name}: learning_rate must be > 0 and dropout in [0, 1)")
        if not 0.0 <= stage.pos_weight_power <= 1.0:
            errors.append(f"{stage.name}.pos_weight_power: {stage.pos_weight_power} must be in [0, 1]")
        for key in ("gamma_neg", "gamma_pos"):
            if not 0.0 <= getattr(stage, key) <= 8.0:
                errors.append(f"{stage.name}.{key}: {getattr(stage, key)} must be in [0, 8]")
        if not 0.0 <= stage.neg_clip < 0.5:
            errors.append(f"{stage.name}.neg_clip: {stage.neg_clip} must be in [0, 0.5)")
        if not 0.0 < stage.layer_lr_decay <= 1.0:
            errors.append(f"{stage.name}.layer_lr_decay: {stage.layer_lr_decay} must be in (0, 1]")
        if not 0.0 <= stage.ema_decay < 1.0:
            errors.append(f"{stage.name}.ema_decay: {stage.ema_decay} must be in [0, 1) (0 = off)")
        if not stage.ema_warmup > 1.0:
            errors.append(f"{stage.name}.ema_warmup: {stage.ema_warmup} must be over 1 (10 = the usual warm-up)")
        if not 0.0 <= stage.lr_floor < 1.0:
            errors.append(f"{stage.name}.lr_floor: {stage.lr_floor} must be in [0, 1) (0 = decay to 0)")
        elif stage.lr_floor > 0 and stage.schedule == "constant":
            errors.append(f"{stage.name}.lr_floor: {stage.lr_floor} needs {stage.name}.schedule=linear "
                          f"(a constant schedule has no decay to floor); set one or the other")
        if not 0.0 <= stage.warmup_ratio < 1.0:
            errors.append(f"{stage.name}.warmup_ratio: {stage.warmup_ratio} must be in [0, 1)")
    name = config.run.name
    if isinstance(name, str) and not RUN_NAME.fullmatch(name):  # other types: reported by _coerce
        errors.append(f"run.name: {name!r} is not a folder name under run.storage_path (which --fresh "
                      "deletes); use letters, digits, '.', '_' and '-', not starting with '.' "
                      "(e.g. run.name=bert-base-v1)")  # fmt: skip
    if config.model.freeze_layers < 0:
        errors.append(f"model.freeze_layers: {config.model.freeze_layers} must be >= 0")
    if config.stage1.epochs == 0 and config.stage2.epochs == 0:
        errors.append("stage1.epochs and stage2.epochs are both 0: nothing to train")
    if config.stage1.epochs > 0 and not config.stage1.train_encoder:
        errors.append("stage1.train_encoder must be true: stage 1 fine-tunes the encoder")
    for key in ("num_workers", "cpus_per_worker"):
        value = getattr(config.scaling, key)
        if isinstance(value, int) and value < 1:  # other strings: reported by _coerce
            errors.append(f"scaling.{key}: {value} must be >= 1, or auto")
