"""What a tagging run was asked for (``TaggingSettings``), checked all at once before any work."""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Literal, get_args

from pydantic import Field, TypeAdapter, ValidationError, model_validator
from pydantic.dataclasses import dataclass

from emotions.config import SETTINGS, Bool, Float, Int, Problems, Str, describe_errors
from emotions.labels import EMOTIONS
from emotions.precision import GPU_RUNTIMES, RUNTIMES

Precision = Literal[tuple(RUNTIMES)]  # emotions.precision.RUNTIMES
PRECISIONS = get_args(Precision)
ON_BAD_FILE = ("fail", "skip")
RESERVED = (
    "emotions",
    "top_emotion",
    "top_score",
    "ekman",
    "sentiment",
    "model_hash",
    "error",
    *(f"p_{name}" for name in EMOTIONS),
    "path",
)
# The `emotions tag` flag of each setting, named in its error.
FLAGS = {
    "model": "--model",
    "output": "--output",
    "text_column": "--text-column",
    "id_column": "--id-column",
    "keep_columns": "--keep-columns",
    "num_actors": "--actors",
    "min_actors": "--min-actors",
    "batch_size": "--batch-size",
    "cpus_per_actor": "--cpus-per-actor",
    "gpus_per_actor": "--gpus-per-actor",
    "precision": "--precision",
    "on_bad_file": "--skip-bad-files",
}

Name = Annotated[Str, Field(min_length=1)]


class TaggingError(ValueError):
    """A tagging job that cannot start or cannot commit; the message names the input and the fix."""


class OutputBusy(TaggingError):
    """Another run holds the output's lease: it is being written now (``holder`` names the run)."""

    def __init__(self, message: str, holder: str):
        super().__init__(message)
        self.holder = holder


@dataclass(frozen=True, config=SETTINGS)
class TaggingSettings:
    """What the caller asked for; saved in the output's manifest. Validated on construction
    (``check_settings`` turns the errors into one TaggingError)."""

    model: Name
    output: Name
    text_column: Name = "body"
    id_column: Name = "id"
    keep_columns: tuple[Name, ...] = ()
    probabilities: Bool = False  # add the 28 p_<label> columns
    overwrite: Bool = False  # replace a committed output
    # The most actors; None = one per cpus_per_actor CPUs (per gpus_per_actor GPUs) of the nodes the
    # autoscaler can bring up (else of those up now). See emotions.tagging.actor_plan.
    num_actors: Annotated[Int | None, Field(ge=1)] = None
    # The fewest: the pool starts whole and tags with the actors that are up, never fewer than these
    # once started; None = 1, so a night with fewer GPUs than asked runs on those it gets.
    min_actors: Annotated[Int | None, Field(ge=1)] = None
    # Rows per actor call; sorted by length into ENCODER_BATCH passes.
    batch_size: Annotated[Int, Field(ge=1)] = 1024
    cpus_per_actor: Annotated[Int, Field(ge=1)] = 1  # torch threads per actor
    gpus_per_actor: Annotated[Float, Field(ge=0)] = 0.0
    # auto: on CPU the fastest runtime the precision gate allows (emotions.precision), else fp32.
    precision: Literal[("auto", *RUNTIMES)] = "auto"
    tokenize_stage: Bool | None = None  # None: a Tokenizer stage on GPU runs, in the actors on CPU
    on_bad_file: Literal["fail", "skip"] = "fail"  # an unreadable input file stops the job, or is listed

    @model_validator(mode="after")
    def _check_together(self) -> TaggingSettings:
        problems = []
        if self.precision not in ("auto", *GPU_RUNTIMES) and self.gpus_per_actor > 0:
            fix = "use --precision bf16 or fp32 on GPUs, or drop --gpus-per-actor"
            problems.append(("precision", f"{self.precision} is for CPU inference: {fix}"))
        if self.min_actors and self.num_actors and self.min_actors > self.num_actors:
            fix = "give --min-actors at most --actors"
            problems.append(("min_actors", f"{self.min_actors} is more than --actors {self.num_actors}: {fix}"))
        if self.text_column == self.id_column:
            fix = "give two different names (--text-column, --id-column)"
            problems.append(("id_column", f"{self.id_column!r} is the text column too: {fix}"))
        clash = [c for c in (self.id_column, self.text_column, *self.keep_columns) if c in RESERVED]
        if clash:
            reserved = "emotions, top_emotion, top_score, ekman, sentiment, model_hash, error, p_<label>, path"
            problems.append(("", f"columns {clash} clash with output (or Ray Data) column names; reserved: {reserved}"))
        if problems:
            raise Problems(problems)
        return self

    def output_key(self, model_hash: str) -> str:
        """Names everything that changes the output's bytes: staged files of another key are stale."""
        fields = [model_hash, self.text_column, self.id_column, self.keep_columns, self.probabilities, self.precision]
        return hashlib.sha256(json.dumps(fields).encode()).hexdigest()[:16]


def check_settings(**values) -> TaggingSettings:
    """TaggingSettings from the caller's arguments; every bad one at once, by name and flag, in one
    TaggingError, before any file is opened or any Ray resource used."""
    try:
        return TypeAdapter(TaggingSettings).validate_python(values)
    except ValidationError as error:
        lines = []
        for key, message in describe_errors(error, TaggingSettings):
            flag = FLAGS.get(key.split(".")[0])
            named = f"{key}: {message}" if key else message
            lines.append(f"{named} ({flag})" if flag and flag not in message else named)
        raise TaggingError("invalid tagging settings: " + "; ".join(lines)) from None
