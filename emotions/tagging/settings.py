"""What a tagging run was asked for (``TaggingSettings``), checked all at once before any work."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from emotions.labels import EMOTIONS

PRECISIONS = ("fp32", "bf16", "int8")
ON_BAD_FILE = ("fail", "skip")
RESERVED = ("emotions", "top_emotion", "top_score", "ekman", "sentiment", "model_hash", "error",
            *(f"p_{name}" for name in EMOTIONS), "path")  # fmt: skip


class TaggingError(ValueError):
    """A tagging job that cannot start or cannot commit; the message names the input and the fix."""


class OutputBusy(TaggingError):
    """Another run holds the output's lease: it is being written now (``holder`` names the run)."""

    def __init__(self, message: str, holder: str):
        super().__init__(message)
        self.holder = holder



@dataclass(frozen=True)
class TaggingSettings:
    """What the caller asked for; saved in the output's manifest."""

    model: str
    output: str
    text_column: str = "body"
    id_column: str = "id"
    keep_columns: tuple[str, ...] = ()
    probabilities: bool = False  # add the 28 p_<label> columns
    overwrite: bool = False  # replace a committed output
    num_actors: int | None = None  # None = one per cpus_per_actor CPUs (per gpus_per_actor GPUs)
    batch_size: int = 1024  # rows per actor call; sorted by length into ENCODER_BATCH passes
    cpus_per_actor: int = 1  # torch threads per actor
    gpus_per_actor: float = 0.0
    precision: str = "auto"  # auto (int8 on CPU if the bundle passed its check) | fp32 | bf16 | int8
    tokenize_stage: bool | None = None  # None: a Tokenizer stage on GPU runs, in the actors on CPU
    on_bad_file: str = "fail"  # fail | skip: an unreadable input file stops the job, or is listed

    def output_key(self, model_hash: str) -> str:
        """Names everything that changes the output's bytes: staged files of another key are stale."""
        fields = [model_hash, self.text_column, self.id_column, self.keep_columns, self.probabilities,
                  self.precision]  # fmt: skip
        return hashlib.sha256(json.dumps(fields).encode()).hexdigest()[:16]



def check_settings(s: TaggingSettings) -> None:
    """Every bad argument at once, by name, before any file is opened or any Ray resource used."""
    errors = []
    if s.on_bad_file not in ON_BAD_FILE:
        errors.append(f"on_bad_file={s.on_bad_file!r} is not one of {list(ON_BAD_FILE)}")
    if s.batch_size < 1:
        errors.append(f"batch_size={s.batch_size} must be >= 1 (--batch-size)")
    if s.num_actors is not None and s.num_actors < 1:
        errors.append(f"num_actors={s.num_actors} must be >= 1 (--actors)")
    if not isinstance(s.cpus_per_actor, int) or s.cpus_per_actor < 1:
        errors.append(f"cpus_per_actor={s.cpus_per_actor!r} must be a whole number >= 1 (--cpus-per-actor)")
    if s.gpus_per_actor < 0:
        errors.append(f"gpus_per_actor={s.gpus_per_actor} must be >= 0 (--gpus-per-actor)")
    if s.precision not in ("auto", *PRECISIONS):
        errors.append(f"precision={s.precision!r} is not one of {['auto', *PRECISIONS]} (--precision)")
    if s.precision == "int8" and s.gpus_per_actor > 0:
        errors.append("int8 quantization is for CPU inference: use --precision bf16 or fp32 on GPUs, "
                      "or drop --gpus-per-actor")  # fmt: skip
    if not s.text_column or not s.id_column or s.text_column == s.id_column:
        errors.append(f"text column {s.text_column!r} and id column {s.id_column!r} must be two "
                      "different, non-empty names (--text-column, --id-column)")  # fmt: skip
    clash = [c for c in (s.id_column, s.text_column, *s.keep_columns) if c in RESERVED]
    if clash:
        errors.append(f"columns {clash} clash with output (or Ray Data) column names; reserved: "
                      "emotions, top_emotion, top_score, ekman, sentiment, model_hash, error, "
                      "p_<label>, path")  # fmt: skip
    if errors:
        raise TaggingError("; ".join(errors))
