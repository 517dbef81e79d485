"""The sections of a training config: frozen pydantic dataclasses and the types of their keys.

The field types say what each key accepts (choices, bounds). The classes validate on every
construction, ``dataclasses.replace`` included; ``Problems`` carries the checks that span keys.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import field
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BeforeValidator, ConfigDict, Field, PlainValidator, model_validator
from pydantic.dataclasses import dataclass

from emotions.encoders import encoder_positions


class ConfigError(ValueError):
    """A configuration problem; the message names each bad key, its value and the fix.
    ``problems`` holds one ``"key: what is wrong"`` line per problem."""

    def __init__(self, message: str, problems: list[str] | None = None):
        super().__init__(message)
        self.problems = problems or [message]


class Problems(ValueError):
    """Raised by a validator that checks several values at once: ``[(key, message), ...]``, each
    key relative to where the validator runs ("" for that place itself)."""

    def __init__(self, problems: list[tuple[str, str]]):
        super().__init__("; ".join(f"{key}: {message}" if key else message for key, message in problems))
        self.problems = problems


# Frozen, unknown keys refused, NaN and infinities refused (a learning rate of nan trains nothing).
SETTINGS = ConfigDict(extra="forbid", allow_inf_nan=False)


def _number(value: Any) -> Any:
    if isinstance(value, bool):  # YAML's true is not 1.0
        raise ValueError(f"expected float, got {value!r}")
    return value


# Integers, strings and booleans are strict: YAML gives real types, so "3" or 1 for true is a
# mistake. Floats also take a numeric string, as YAML reads 5e-5 (no dot) as the string "5e-5".
Int = Annotated[int, Field(strict=True)]
Str = Annotated[str, Field(strict=True)]
Bool = Annotated[bool, Field(strict=True)]
Float = Annotated[float, BeforeValidator(_number)]
Fraction = Annotated[Float, Field(ge=0, lt=1)]  # [0, 1)
Probability = Annotated[Float, Field(ge=0, le=1)]  # [0, 1]

AUTO = "auto"  # a scaling value resolved from the cluster when the run starts (cluster.resolve_scaling)


def _int_or_auto(value: Any) -> int | str:
    if value == AUTO:
        return value
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"expected int or {AUTO!r}, got {value!r}")
    if value < 1:
        raise ValueError(f"{value} must be >= 1, or {AUTO}")
    return value


def _bool_or_auto(value: Any) -> bool | str:
    if value == AUTO or isinstance(value, bool):
        return value
    raise ValueError(f"expected bool or {AUTO!r}, got {value!r}")


IntOrAuto = Annotated[int | str, PlainValidator(_int_or_auto)]
BoolOrAuto = Annotated[bool | str, PlainValidator(_bool_or_auto)]

# run.name is one folder under run.storage_path, which `--fresh` deletes: no "/", "..", or a leading "."
RUN_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")


def _run_name(name: str | None) -> str | None:
    if name is not None and not RUN_NAME.fullmatch(name):
        raise ValueError(
            f"{name!r} is not a folder name under run.storage_path (which --fresh deletes); use letters, "
            "digits, '.', '_' and '-', not starting with '.' (e.g. run.name=bert-base-v1)"
        )
    return name


@dataclass(frozen=True, config=SETTINGS)
class DataConfig:
    train: Str = "goemotions:train"  # a path, goemotions:train|dev, or hf:NAME[:SPLIT]
    validation: Str = "goemotions:dev"
    text_column: Str = "text"
    labels_column: Str = "labels"
    label_format: Literal["auto", "names", "ids", "columns"] = "auto"
    max_train_examples: Annotated[Int | None, Field(ge=1)] = None  # seeded subset; None = all
    max_validation_examples: Annotated[Int | None, Field(ge=1)] = None
    concat_fraction: Probability = 0.0  # dataset expansion: extra examples as a fraction of train
    # Tokens; GoEmotions comments are ~19 tokens on average. At most the encoder's position
    # embeddings (TrainConfig checks).
    max_length: Annotated[Int, Field(ge=8)] = 128


@dataclass(frozen=True, config=SETTINGS)
class ModelConfig:
    # "minilm" = the embedded all-MiniLM-L6-v2; "tiny-random" = a seeded 2-layer BERT (tests);
    # anything else is a Hugging Face model name or a local folder.
    encoder: Annotated[Str, Field(min_length=1)] = "minilm"
    pooling: Literal["mean", "cls"] = "mean"
    freeze_embeddings: Bool = False  # keep the word-embedding matrix fixed in stage 1
    # Keep the bottom N transformer layers (and the embeddings below them) fixed in stage 1: the
    # backward pass stops above them, so epochs are faster. 0 = train every layer.
    freeze_layers: Annotated[Int, Field(ge=0)] = 0
    # Which stage's head the bundle keeps, of the heads trained over its final encoder (stage 1's
    # and stage 2's when stage 2 freezes the encoder): "heldout" = the best on held-out macro-F1
    # (a later stage's only if it is strictly better); "last" = the last stage's (the seed study's
    # two-stage design).
    head_choice: Literal["heldout", "last"] = "heldout"


@dataclass(frozen=True, config=SETTINGS)
class StageConfig:
    name: Str
    epochs: Annotated[Int, Field(ge=0)]
    train_encoder: Bool  # False = frozen encoder: pooled features are computed once, then reused
    learning_rate: Annotated[Float, Field(gt=0)] = 5e-5
    head_learning_rate: Annotated[Float | None, Field(gt=0)] = None  # None = learning_rate
    schedule: Literal["linear", "constant"] = "linear"  # linear: warm-up then linear decay
    warmup_ratio: Fraction = 0.06
    # The linear schedule decays to this fraction of the learning rates, not to 0. With a weight
    # average (ema_decay) the last steps then still move, and the average smooths them.
    lr_floor: Annotated[Fraction, Field(description="0 = decay to 0")] = 0.0
    weight_decay: Annotated[Float, Field(ge=0)] = 0.01
    batch_size: Annotated[Int, Field(ge=1)] = 32  # per worker
    head_depth: Literal[1, 2] = 1  # 1 = Linear; 2 = Linear-GELU-Dropout-Linear
    # Width of the 2-layer head's hidden layer; None = encoder width.
    head_hidden: Annotated[Int | None, Field(ge=1)] = None
    dropout: Fraction = 0.1
    # Imbalance: each label's positives weigh ((negatives / positives) in the training data) ** this
    # in the BCE loss. 0 = plain BCE; 0.5 = the square root (grief x22, neutral x1.4); 1 = balanced.
    pos_weight_power: Probability = 0.0
    # Asymmetric loss (Ridnik et al., 2021) on top of the weights above: negatives' terms scaled by
    # p ** gamma_neg after shifting p down by neg_clip (easy negatives drop out), positives' by
    # (1 - p) ** gamma_pos. All 0 = BCE; gamma_neg = gamma_pos, neg_clip 0 = focal loss.
    gamma_neg: Annotated[Float, Field(ge=0, le=8)] = 0.0
    gamma_pos: Annotated[Float, Field(ge=0, le=8)] = 0.0
    neg_clip: Annotated[Float, Field(ge=0, lt=0.5)] = 0.0
    # Layer-wise learning-rate decay (stages that train the encoder): the top encoder layer trains
    # at learning_rate, each layer below at this factor times the one above, the embeddings below
    # the bottom layer. 1 = one rate for the whole encoder.
    layer_lr_decay: Annotated[Float, Field(gt=0, le=1)] = 1.0
    # An exponential moving average of the trained weights (decay per step, warmed up as
    # min(ema_decay, (1 + step) / (ema_warmup + step))): validation scores it, and the stage ends
    # with it as the model's weights. 0 = off.
    ema_decay: Annotated[Fraction, Field(description="0 = off")] = 0.0
    # The warm-up constant c: until the decay reaches ema_decay the average spans about the last
    # 1 / (c - 1) of the steps so far (10: a ninth; 4: a third). With c = 10 the decay stays below
    # 0.999 until step 8,991, so on shorter stages c, not ema_decay, sets the span.
    ema_warmup: Annotated[Float, Field(gt=1, description="10 = the usual warm-up")] = 10.0

    @model_validator(mode="after")
    def _floor_needs_decay(self) -> StageConfig:
        if self.lr_floor > 0 and self.schedule == "constant":
            why = "(a constant schedule has no decay to floor); set one or the other"
            raise Problems([("lr_floor", f"{self.lr_floor} needs schedule=linear {why}")])
        return self


@dataclass(frozen=True, config=SETTINGS)
class ThresholdConfig:
    """How per-label thresholds are fitted: ``evaluation.ThresholdRule`` (measured there)."""

    split: Literal["validation", "train"] = "validation"  # the seed study fitted on train
    fallback: Probability = 0.5  # for labels with no positive example in the split
    # A prior worth this many positives pulls each label's best-F1 threshold toward `prior`;
    # 0 = each label's own best-F1 value (the rule until 2026-12).
    shrink: Annotated[Float, Field(ge=0)] = 40.0
    # What a label's threshold is shrunk toward: "share", the label's own lowest value that tags
    # it no more often than it is true; or "pooled", the one value best over all labels.
    prior: Literal["pooled", "share"] = "share"
    # No label tagged on more than this many times its positives in the split; None = no cap.
    max_share_ratio: Annotated[Float | None, Field(ge=1)] = 2.0
    # Labels with fewer positives in the split are named in the training log and metrics.json.
    min_positives: Annotated[Int, Field(ge=0)] = 40

    def rule(self):
        """This section as the ``evaluation.ThresholdRule`` that fitting takes (``split`` aside)."""
        import dataclasses

        from emotions.evaluation import ThresholdRule

        return ThresholdRule(**{field.name: getattr(self, field.name) for field in dataclasses.fields(ThresholdRule)})


@dataclass(frozen=True, config=SETTINGS)
class ScalingSettings:
    # Ray Train workers. auto, on CPU: as many as the CPU nodes hold at cpus_per_worker each, so
    # with cpus_per_worker auto one worker per node (DDP across nodes, all of a node's cores in
    # one process: what a plain loop does); on GPU: one per GPU.
    num_workers: IntOrAuto = AUTO
    use_gpu: Bool = False
    # CPUs of each worker, also its torch thread count. auto: with num_workers auto, a whole node
    # (the smallest CPU node's count; on GPU, the smallest node's CPUs per GPU); else 1. On a node
    # whose cores other busy processes share, multi-threaded workers slow down far more than
    # 1-thread ones (2-core machine at load 10-16: 1 x 2 ran at 0.22x of 2 x 1): set 1 there.
    cpus_per_worker: IntOrAuto = AUTO
    # Training steps on GPU workers under autocast to bfloat16 where the GPU computes it natively
    # (compute capability 8.0+: A100, A10G, L4, H100); on older GPUs (T4, V100) float16 with a
    # gradient scaler instead. Thresholds are always fitted on float32 outputs.
    bf16: Bool = True
    # Training steps on CPU workers under autocast to bfloat16 (validation, thresholds and tagging
    # stay float32): auto = where the CPU computes bfloat16 natively (AVX512-BF16 or AMX; the
    # default run's epochs 1.5x faster on the 2-core machine, README) and off elsewhere; true; false.
    cpu_bf16: BoolOrAuto = False
    # How Ray places the workers (Ray Train's placement_strategy): pack fills a node before using
    # the next; strict_pack puts every worker on one node, or waits for a node that holds them all,
    # so no gradient crosses the network (docs/cluster.md, "Step time"); spread, one per node.
    placement: Literal["pack", "strict_pack", "spread"] = "pack"
    # Gradients all-reduced in 16 bits (a DDP communication hook: half the bytes per step).
    # auto: bf16 when GPU workers span several nodes, where the network bounds the step; none
    # otherwise. bf16 needs GPU workers (NCCL); fp16 also runs on CPU workers (gloo).
    gradient_compression: Literal["auto", "none", "bf16", "fp16"] = AUTO

    @model_validator(mode="after")
    def _compression_needs_nccl(self) -> ScalingSettings:
        if self.gradient_compression == "bf16" and not self.use_gpu:
            raise Problems(
                [
                    (
                        "gradient_compression",
                        "bf16 all-reduces through NCCL, which needs scaling.use_gpu=true; "
                        "CPU workers (gloo) take fp16 or none",
                    )
                ]
            )
        return self


@dataclass(frozen=True, config=SETTINGS)
class RunSettings:
    # A local folder or a pyarrow URI (s3://, gs://).
    storage_path: Annotated[Str, Field(min_length=1)] = "~/emotions_runs"
    # A folder name under storage_path (RUN_NAME); None = derived from the output folder name and time.
    name: Annotated[Str | None, AfterValidator(_run_name)] = None
    max_failures: Annotated[Int, Field(ge=0)] = 3  # worker-group restarts from the last checkpoint
    checkpoints_to_keep: Annotated[Int, Field(ge=1)] = 2
    # true: a run whose name has checkpoints resumes from the latest (refused if the config
    # changed, see RESUMABLE_KEYS); false: its old checkpoints are deleted first (CLI: --fresh).
    resume: Bool = True


@dataclass(frozen=True, config=SETTINGS)
class TrainConfig:
    seed: Annotated[Int, Field(ge=0)] = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    stage1: StageConfig = field(default_factory=lambda: StageConfig(name="stage1", epochs=2, train_encoder=True))
    stage2: StageConfig = field(
        default_factory=lambda: StageConfig(
            name="stage2", epochs=10, train_encoder=False, learning_rate=1e-3, batch_size=256
        )
    )
    thresholds: ThresholdConfig = field(default_factory=ThresholdConfig)
    scaling: ScalingSettings = field(default_factory=ScalingSettings)
    run: RunSettings = field(default_factory=RunSettings)

    @model_validator(mode="after")
    def _check_across_sections(self) -> TrainConfig:
        problems = []
        if self.stage1.epochs == 0 and self.stage2.epochs == 0:
            problems.append(("stage1.epochs", "0, and stage2.epochs is 0 too: nothing to train"))
        if self.stage1.epochs > 0 and not self.stage1.train_encoder:
            problems.append(("stage1.train_encoder", "must be true: stage 1 fine-tunes the encoder"))
        positions = encoder_positions(self.model.encoder)
        if positions is not None and self.data.max_length > positions:
            too_long = (
                f"{self.data.max_length} is more than the {positions} positions of model.encoder="
                f"{self.model.encoder} (its max_position_embeddings); use at most {positions}"
            )
            problems.append(("data.max_length", too_long))
        if problems:
            raise Problems(problems)
        return self

    @property
    def stages(self) -> list[StageConfig]:
        """The stages to run, in order; a stage with 0 epochs is skipped."""
        return [s for s in (self.stage1, self.stage2) if s.epochs > 0]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def section_defaults() -> dict[str, Any]:
    """``{"stage1": {...}, "stage2": {...}, ...}``: each section's defaults, without building (and
    so checking the encoder of) a whole TrainConfig."""
    sections = [f for f in dataclasses.fields(TrainConfig) if f.default_factory is not dataclasses.MISSING]
    return {f.name: dataclasses.asdict(f.default_factory()) for f in sections}
