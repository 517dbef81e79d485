"""Bulk tagging of Parquet comment dumps with Ray Data: ``tag_corpus``.

    inputs -> footers checked -> read_parquet -> normalize (per block, in the read tasks)
           [-> Tokenizer actors (CPU: token ids per row; GPU runs)]
           -> Tagger actors (bundle loaded once each): tagged rows -> part files in OUTPUT/_staging
           -> driver: part paths and row counts only -> merge task per finished input file
           -> one output file per input file in OUTPUT/_staging -> rows in == rows out -> commit

Output (one row per input row; flagged rows keep their id and have null predictions)::

    <id column> | emotions list<string> | top_emotion string | top_score float32
    | p_<label> float32 x 28 (probabilities=True) | ekman list<string> | sentiment list<string>
    | model_hash string | <keep columns> | error string (null when tagged)

``error`` says why a row was not tagged: "null text", "empty text", "whitespace only",
"not a string" (the file's text column is not a string type), "[deleted]" or "[removed]"
(Reddit's placeholders for comments that are gone: tagging them would count "neutral" for text
nobody wrote). Texts longer than the bundle's ``max_length`` tokens are truncated, not rejected.

Exactly once. Every input file has one output file whose name derives from the input's URI.
Tagged rows never travel to the driver (on a cluster of many GPU actors it would be the
bottleneck): each Tagger actor writes every batch it tags, split by input file, as a part file
``_staging/parts/<output name>/part-<uuid>.arrow`` (Arrow IPC) and returns one small row per part (file
index, part name, rows, flag counts). The driver adds those rows up per file; when a file's parts
hold all its rows it launches a Ray task that streams exactly those parts, row group by row
group, into the file's output file in ``OUTPUT/_staging/`` (readers skip ``_``-prefixed paths),
then writes its marker into ``_staging/_done/`` and deletes the parts. A part written by an
attempt Ray retried is never reported to the driver, so it is never merged (more rows reported
than the file has stops the run). A re-run with the same settings skips files whose marker
matches (same rows and bytes of input), discards the parts of unfinished files, rewrites any
half-written ones, and finishes the rest. The commit checks rows in == rows out for every file,
moves the files into OUTPUT (a rename locally, copy + delete on object stores), writes
``_manifest.json`` and then ``_SUCCESS``: an output without ``_SUCCESS`` is never complete.
(The manifest's name starts with ``_`` because pyarrow, pandas and Spark read every other file in
a folder as Parquet.) Row order within a file is not kept; join on the id column.

Reading. The driver has read every footer already, so it plans the reads itself (``plan_reads``):
row ranges of a row group, whole row groups where there are enough of them to keep every actor
busy to the end, each read by a Ray task of ``READ_CPUS`` (``read_units``). ``ray.data.read_parquet``
is not used: its file listing runs as a task that asks for 1 whole CPU on one node, which a pool
of actors spread over small nodes (1-CPU pods) never leaves free, and the pipeline hangs.

Actor sizing. Read and merge tasks need ``ROOM_CPUS`` on some node while the actors run; a pool
that reserves every CPU leaves them unschedulable and the pipeline hangs without a word. So by
default there is one actor per ``cpus_per_actor`` CPUs (per ``gpus_per_actor`` GPUs on GPU), each
running ``cpus_per_actor`` torch threads, but each *reserves* only so much that every node keeps
``ROOM_CPUS`` free when it hosts its share of the pool: on one 2-CPU node, 2 actors x 1 thread
that reserve 0.75 CPU each; on 1-CPU nodes, one actor each reserving 0.5. Reads and merges are
light next to the encoder, so running them beside the actors costs little.

Tokenizing. On GPU runs a pool of Tokenizer actors (``TOKENIZER_CPUS`` each, one per GPU actor)
turns text into token ids ahead of the encoder, so GPU actors only run the encoder. On CPU the
actors tokenize their own batches: on 2 CPUs the separate stage cost throughput (100k rows, smoke
bundle: 2,001 vs 2,305 rows/s in benchmarks/tag_throughput.py), since the tokenizer's CPU is taken
from the encoder's and token ids travel through the object store; ``tokenize_stage=True`` forces it.

Schemas. Files may disagree (string vs large_string text, int32 vs int64 ids, extra columns):
only the needed columns are read, each file with its own schema, and cast to one type per column
(``output_schema``) as they are read. A file whose text column is not
text at all is not sent through Ray Data: a Ray task writes its rows flagged "not a string".

Precision: fp32 (the default, on CPU and GPU), bf16 (autocast to bfloat16) or int8 (CPU: dynamic
quantization of every nn.Linear). A precision other than fp32 is allowed only for a bundle whose
validation macro-F1 it moves by at most MAX_F1_CHANGE: ``check_precision`` compares it with fp32
on the driver (on CPU) before each such run, and the manifest records the precision and the
check, since thresholds are applied to the precision they were checked for.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import logging
import math
import os
import time
import uuid
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from emotions import environment, storage
from emotions.storage import Folder, filesystem
from emotions.labels import EKMAN, EMOTIONS, SENTIMENT
from emotions.progress import Progress

log = logging.getLogger("emotions.tagging")

FORMAT = "emotions-tagging"
STAGING = "_staging"  # inside OUTPUT; the leading _ hides it from Parquet/Hive readers
DONE = "_done"  # per-file markers inside the staging folder
COMMITTING = "_COMMITTING"  # written once every file is staged; the commit may have begun
SUCCESS = "_SUCCESS"
MANIFEST = "_manifest.json"  # _-prefixed: pd.read_parquet(OUTPUT) and Spark skip it
READ_CPUS = 0.25  # per read task: decoding a few Parquet columns is light next to the encoder
# Rows per encoder pass, after sorting a Ray batch by length. Small on CPU: a 256-row batch in
# passes of 16 pads to 1.12x its real tokens, in passes of 64 to 1.53x (GoEmotions-like lengths).
ENCODER_BATCH = {"cpu": 16, "cuda": 256}
CHARS_PER_TOKEN_CAP = 100  # texts are cut to max_length * this many characters before tokenizing
PRECISIONS = ("fp32", "bf16", "int8")
MAX_F1_CHANGE = 0.005  # bf16/int8 is refused for a bundle whose validation macro-F1 it moves more
TOKENIZER_CPUS = 1.0  # per Tokenizer actor, when tokenizing is a stage of its own
MERGE_CPUS = 0.25  # per merge task: reading parts and writing one file is I/O
ROOM_CPUS = READ_CPUS + MERGE_CPUS  # kept free on every node beside the actors (see Actor sizing)
READS_PER_ACTOR = 4  # read units per actor at least, so the last ones spread over the pool
MAX_SLICES = 8  # a row group is read in at most this many units (each decodes up to its slice)
ROW_GROUP_ROWS = 65_536  # rows buffered per output file before a row group is written
FILE_COLUMN = "__file"  # internal: index of the input file a row came from
TEXT_COLUMN = "__text"  # internal: the text as large_string (null when the column is not text)
ERROR_COLUMN = "__error"  # internal: the flag reason, computed when reading
IDS_COLUMN = "__ids"  # internal: token ids (list<int32>, empty where flagged), from the Tokenizer stage
PARTS = "parts"  # inside the staging folder: parts/<output name>/part-<uuid>.arrow
# What the Tagger actors return to the driver: one row per part file, no tagged rows.
PART_SCHEMA = pa.schema([(FILE_COLUMN, pa.int32()), ("part", pa.string()), ("rows", pa.int64()),
                         ("reasons", pa.string())])  # reasons: JSON {reason: rows}  # fmt: skip
RESERVED = ("emotions", "top_emotion", "top_score", "ekman", "sentiment", "model_hash", "error",
            *(f"p_{name}" for name in EMOTIONS), "path")  # fmt: skip
ON_BAD_FILE = ("fail", "skip")
_EKMAN_MATRIX = np.array([[name in members for members in EKMAN.values()] for name in EMOTIONS])
_SENTIMENT_MATRIX = np.array([[name in members for members in SENTIMENT.values()] for name in EMOTIONS])


class TaggingError(ValueError):
    """A tagging job that cannot start or cannot commit; the message names the input and the fix."""


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
    precision: str = "fp32"  # fp32 | bf16 (autocast) | int8 (dynamic quantization of nn.Linear, CPU)
    tokenize_stage: bool | None = None  # None: a Tokenizer stage on GPU runs, in the actors on CPU
    on_bad_file: str = "fail"  # fail | skip: an unreadable input file stops the job, or is listed

    def output_key(self, model_hash: str) -> str:
        """Names everything that changes the output's bytes: staged files of another key are stale."""
        fields = [model_hash, self.text_column, self.id_column, self.keep_columns, self.probabilities,
                  self.precision]  # fmt: skip
        return hashlib.sha256(json.dumps(fields).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class ActorPlan:
    actors: int
    cpus_reserved: float  # per actor: what Ray schedules on (see the module docstring)
    gpus: float  # per actor
    threads: int  # torch threads per actor
    tokenizers: int = 0  # Tokenizer actors ahead of the encoder (0: the actors tokenize)
    tokenizer_cpus: float = 0.0  # reserved per Tokenizer actor


@dataclass(frozen=True)
class InputFile:
    uri: str  # as reported in the manifest: a local path or scheme://...
    path: str  # inside the filesystem
    rows: int
    bytes: int
    schema: pa.Schema
    row_groups: tuple[int, ...] = ()  # rows in each row group, from the footer

    @property
    def output_name(self) -> str:
        """Deterministic: the same input always maps to the same output file."""
        stem = self.path.rsplit("/", 1)[-1].rsplit(".", 1)[0]
        return f"{stem}-{hashlib.sha1(self.uri.encode()).hexdigest()[:8]}.parquet"


@dataclass(frozen=True)
class TagSummary:
    rows_in: int
    rows_out: int
    rows_flagged: int
    seconds: float
    rows_per_s: float  # rows tagged by this run (resumed files excluded) per second of it
    output: str
    manifest: str
    files: int = 0
    files_resumed: int = 0
    files_skipped: tuple[str, ...] = ()  # unreadable inputs left out (on_bad_file="skip")

    def line(self) -> str:
        skipped = f", {len(self.files_skipped)} bad files skipped" if self.files_skipped else ""
        resumed = f", {self.files_resumed} files resumed" if self.files_resumed else ""
        return (f"tagged {self.rows_out:,} rows ({self.rows_flagged:,} flagged) from {self.files} "
                f"files in {self.seconds:.1f}s, {self.rows_per_s:,.0f} rows/s{resumed}{skipped} "
                f"-> {self.output}")  # fmt: skip


# ----------------------------------------------------------------------------- driver


def tag_corpus(model: str | Path, inputs: str | Path | list, output: str | Path, *,
               text_column: str = "body", id_column: str = "id", keep_columns=(),
               probabilities: bool = False, overwrite: bool = False, num_actors: int | None = None,
               batch_size: int = 1024, cpus_per_actor: int = 1, gpus_per_actor: float = 0,
               precision: str | None = None, int8: bool = False, tokenize_stage: bool | None = None,
               on_bad_file: str = "fail") -> TagSummary:  # fmt: skip
    """Tag every row of the Parquet ``inputs`` (file, folder, glob, or a list; local or a pyarrow
    URI) with the bundle at ``model``; write the committed output folder ``output``.
    ``precision`` is fp32 (default), bf16 or int8; ``int8=True`` means ``precision="int8"``.

    ``model`` is read by every actor: on a multi-node cluster, a URI (s3://...) or a shared
    folder. Raises TaggingError (or BundleError) before any work for anything a user can fix."""
    start = time.perf_counter()
    if isinstance(keep_columns, str):
        keep_columns = keep_columns.split(",")
    if int8 and precision not in (None, "int8"):
        raise TaggingError(f"--int8 is --precision int8, but --precision {precision} was also given; pass one")
    settings = TaggingSettings(
        model=storage.expand(str(model)), output=str(output),
        text_column=text_column, id_column=id_column,
        keep_columns=tuple(dict.fromkeys(c for c in keep_columns if c != id_column)),
        probabilities=probabilities, overwrite=overwrite, num_actors=num_actors,
        batch_size=batch_size, cpus_per_actor=cpus_per_actor, gpus_per_actor=float(gpus_per_actor),
        precision="int8" if int8 else precision or "fp32", tokenize_stage=tokenize_stage,
        on_bad_file=on_bad_file,
    )  # fmt: skip
    check_settings(settings)
    target = Folder.from_uri(settings.output)
    check_output(target, overwrite)
    input_fs, paths = resolve_inputs(inputs, exclude=target)
    files, bad = inspect_inputs(input_fs, paths, settings)
    from emotions.bundle import load_bundle  # torch: imported here, not by Ray Data's read tasks

    bundle = load_bundle(settings.model)
    model_hash, max_length = bundle.hash, bundle.max_length
    precision_check = check_precision(bundle, settings.precision) if settings.precision != "fp32" else None
    if precision_check and not precision_check["allowed"]:
        raise TaggingError(precision_check["verdict"])
    del bundle  # the actors load their own copy; the driver only needed to check it
    schema, column_types = output_schema(files, settings)
    inspected = time.perf_counter()

    _connect_ray()
    record = environment.log_environment(asdict(settings), "tag")
    plan = plan_actors(settings, *_cluster_size())
    log.info("%d input files, %d rows; %d actors x %d threads (%.2f CPU, %.2f GPU reserved each), "
             "%s, %d tokenizer actors", len(files), sum(f.rows for f in files), plan.actors, plan.threads,
             plan.cpus_reserved, plan.gpus, settings.precision, plan.tokenizers)  # fmt: skip
    staging = Staging.open(target, settings.output_key(model_hash))
    pending = [f for f in files if staging.finished(f) is None]
    resumed = {f.output_name for f in files} - {f.output_name for f in pending}
    if len(pending) < len(files):
        log.info("resuming: %d of %d files were finished by an earlier run", len(resumed), len(files))
    startup_s = write_outputs(input_fs, pending, staging, schema, column_types, settings, plan, model_hash,
                              max_length)  # fmt: skip
    tagged = time.perf_counter()

    markers = staging.check_finished(files)  # rows in == rows out, file by file, or no commit
    manifest = build_manifest(files, markers, bad, resumed, settings, plan, staging.run_id, model_hash,
                              max_length, schema, record, inspect_s=inspected - start,
                              tag_s=tagged - inspected, startup_s=startup_s)  # fmt: skip
    manifest["precision"] = settings.precision  # the thresholds were checked for this precision
    manifest["precision_check"] = precision_check  # None for fp32, the thresholds' own precision
    staging.commit([f.output_name for f in files], manifest)
    seconds = time.perf_counter() - start
    summary = TagSummary(rows_in=manifest["rows_in"], rows_out=manifest["rows_out"],
                         rows_flagged=manifest["rows_flagged"], seconds=seconds,
                         rows_per_s=sum(f.rows for f in pending) / max(seconds, 1e-9),
                         output=target.uri, manifest=target.uri_of(MANIFEST), files=len(files),
                         files_resumed=len(resumed), files_skipped=tuple(uri for uri, _ in bad))  # fmt: skip
    log.info("%s", summary.line())
    return summary


def build_manifest(files: list[InputFile], markers: list[dict], bad: list[tuple[str, str]],
                   resumed: set[str], settings: TaggingSettings, plan: ActorPlan, run_id: str,
                   model_hash: str, max_length: int, schema: pa.Schema, environment_record: dict,
                   inspect_s: float, tag_s: float, startup_s: float | None) -> dict:  # fmt: skip
    tagged_rows = sum(f.rows for f in files if f.output_name not in resumed)
    return {
        "format": FORMAT, "version": 1, "run_id": run_id,
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": {"path": settings.model, "hash": model_hash, "max_length": max_length},
        "settings": asdict(settings), "actors": asdict(plan),
        "inputs": [{"path": f.uri, "rows": f.rows, "bytes": f.bytes, "output": f.output_name,
                    "rows_out": m["rows_out"], "flagged": m["flagged"], "resumed": f.output_name in resumed,
                    "written_by": m.get("written_by")}
                   for f, m in zip(files, markers)],
        "skipped_files": [{"path": uri, "reason": reason} for uri, reason in bad],
        "rows_in": sum(f.rows for f in files), "rows_out": sum(m["rows_out"] for m in markers),
        "rows_flagged": sum(m["flagged"] for m in markers),
        "flag_reasons": _add_counts(m["reasons"] for m in markers),
        "output_schema": schema.to_string(show_schema_metadata=False).splitlines(),
        "timings": {"inspect_s": inspect_s, "tag_s": tag_s, "startup_s": startup_s},  # to the first rows
        "rows_per_s": tagged_rows / max(tag_s, 1e-9),  # this run's rows over its tagging time
        "environment": environment_record,
    }  # fmt: skip


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
    if s.precision not in PRECISIONS:
        errors.append(f"precision={s.precision!r} is not one of {list(PRECISIONS)} (--precision)")
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


def plan_actors(s: TaggingSettings, node_cpus: list[float], cluster_gpus: float) -> ActorPlan:
    """Actor count and reservations that leave ROOM_CPUS on every node for the read and merge
    tasks, each node hosting its share of the pool (``node_cpus``: the CPUs of each node)."""
    nodes = [c for c in node_cpus if c > 0] or [1.0]
    if s.gpus_per_actor > 0:
        actors = s.num_actors or max(1, int(cluster_gpus // s.gpus_per_actor))
        if cluster_gpus < actors * s.gpus_per_actor:
            log.warning("the pool asks for %.2f GPUs, the cluster has %.2f now: it waits for the "
                        "autoscaler (or forever)", actors * s.gpus_per_actor, cluster_gpus)  # fmt: skip
    else:
        actors = s.num_actors or max(1, sum(int(c // s.cpus_per_actor) for c in nodes))
    stage = s.gpus_per_actor > 0 if s.tokenize_stage is None else s.tokenize_stage
    tokenizers = actors if stage else 0  # one CPU tokenizer keeps one GPU encoder fed (MiniLM)
    members, total = actors + tokenizers, sum(nodes)
    # A node of c CPUs hosts about members * c / total of the pool (Ray spreads the actors).
    room = [(c - ROOM_CPUS) / max(1, math.ceil(members * c / total)) for c in nodes if c > ROOM_CPUS]
    share = max(0.01, float(np.floor(100 * min(room or [0.01])) / 100))
    reserved = min(float(s.cpus_per_actor), share)
    if actors * s.cpus_per_actor > total:
        log.warning("%d actors x %d threads oversubscribe the cluster's %.0f CPUs", actors,
                    s.cpus_per_actor, total)  # fmt: skip
    return ActorPlan(actors=actors, cpus_reserved=reserved, gpus=s.gpus_per_actor, threads=s.cpus_per_actor,
                     tokenizers=tokenizers, tokenizer_cpus=min(TOKENIZER_CPUS, share) if tokenizers else 0.0)


# ----------------------------------------------------------------------------- files


def check_output(target: Folder, overwrite: bool) -> None:
    """Refuse a committed output (unless ``overwrite``) and any folder that is not ours."""
    info = target.fs.get_file_info(target.root)
    if info.type == pafs.FileType.File:
        raise TaggingError(f"output {target.uri} is a file; name a folder for the tagged Parquet files")
    if target.exists(SUCCESS) and not overwrite:
        raise TaggingError(f"output {target.uri} already holds a committed tagging output (it has "
                           f"{SUCCESS}); pass --overwrite (overwrite=True) to replace it, or choose "
                           "another output folder")  # fmt: skip
    names = {i.base_name for i in target.list()} if info.type == pafs.FileType.Directory else set()
    if names and not names & {SUCCESS, STAGING}:
        raise TaggingError(f"output {target.uri} exists, is not empty and was not written by "
                           f"`emotions tag` (found {sorted(names)[:5]}); choose a new or empty "
                           "folder, since the commit replaces the folder's files")  # fmt: skip


def resolve_inputs(inputs, exclude: Folder | None = None) -> tuple[pafs.FileSystem, list[tuple[str, str]]]:
    """Parquet files (fs path, URI) named by files, folders (searched recursively; ``_``- and
    ``.``-prefixed paths skipped, as Spark and Hive do) or globs, on one filesystem."""
    items = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    if not items:
        raise TaggingError("no inputs given: name Parquet files, folders or globs (--input)")
    found, fs = {}, None
    for item in map(str, items):
        item_fs, path, prefix = filesystem(item)
        if fs is not None and not fs.equals(item_fs):
            raise TaggingError(f"inputs are on different filesystems ({item}); tag each filesystem "
                               "in its own run")  # fmt: skip
        fs = item_fs
        paths = _expand(fs, path, item)
        if not paths:
            raise TaggingError(f"input {item} holds no Parquet files (*.parquet); check the path")
        found.update((p, prefix + p) for p in paths)
    if exclude is not None and fs.equals(exclude.fs):
        inside = [uri for p, uri in found.items() if p.startswith(exclude.root + "/")]
        if inside:
            raise TaggingError(f"input {inside[0]} is inside the output folder {exclude.uri}; "
                               "choose an output outside the inputs")  # fmt: skip
    return fs, sorted(found.items())


def _expand(fs: pafs.FileSystem, path: str, item: str) -> list[str]:
    if any(ch in path for ch in "*?["):
        parts = path.split("/")
        first = next(i for i, part in enumerate(parts) if any(ch in part for ch in "*?["))
        base = "/".join(parts[:first]) or "/"
        return [p for p in _parquet_files(fs, base) if fnmatch.fnmatchcase(p, path)]
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise TaggingError(f"input {item} does not exist; check the path (--input)")
    if info.type == pafs.FileType.File:
        return [path]
    return _parquet_files(fs, path)


def _parquet_files(fs: pafs.FileSystem, base: str) -> list[str]:
    selector = pafs.FileSelector(base, recursive=True, allow_not_found=True)
    out = []
    for info in fs.get_file_info(selector):
        relative = info.path[len(base.rstrip("/")) + 1 :].split("/")
        hidden = any(part.startswith(("_", ".")) for part in relative)
        if info.type == pafs.FileType.File and info.path.lower().endswith(".parquet") and not hidden:
            out.append(info.path)
    return out


def inspect_inputs(fs: pafs.FileSystem, paths: list[tuple[str, str]],
                   settings: TaggingSettings) -> tuple[list[InputFile], list[tuple[str, str]]]:  # fmt: skip
    """Read every file's footer (in parallel threads: this is I/O) before any work is done.
    A file that cannot be read, or lacks a needed column, stops the job (or is skipped)."""
    needed = [settings.id_column, settings.text_column, *settings.keep_columns]
    with ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(lambda item: _inspect(fs, *item, needed), paths))
    files = [r for r in results if isinstance(r, InputFile)]
    bad = [r for r in results if isinstance(r, tuple)]
    if bad and settings.on_bad_file == "fail":
        listing = "; ".join(f"{uri}: {reason}" for uri, reason in bad[:3])
        more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
        raise TaggingError(f"{len(bad)} input file(s) cannot be tagged, nothing was written: "
                           f"{listing}{more}. Fix or remove them, or pass --skip-bad-files "
                           "(on_bad_file='skip') to tag the rest and list them in the manifest")  # fmt: skip
    for uri, reason in bad:
        log.warning("skipping %s: %s", uri, reason)
    if not files:
        raise TaggingError("every input file was skipped as unreadable; nothing to tag")
    return files, bad


def _inspect(fs: pafs.FileSystem, path: str, uri: str, needed: list[str]) -> InputFile | tuple[str, str]:
    try:
        with fs.open_input_file(path) as f:
            parquet = pq.ParquetFile(f)
            rows, schema, size = parquet.metadata.num_rows, parquet.schema_arrow, f.size()
            groups = tuple(parquet.metadata.row_group(i).num_rows for i in range(parquet.num_row_groups))
    except Exception as error:  # pyarrow raises several types for a damaged file
        return uri, f"not a readable Parquet file ({type(error).__name__}: {error})"
    missing = [c for c in needed if c not in schema.names]
    if missing:
        return uri, f"no column(s) {missing}; columns found: {schema.names}"
    return InputFile(uri=uri, path=path, rows=rows, bytes=size, schema=schema, row_groups=groups)


def output_schema(files: list[InputFile], s: TaggingSettings) -> tuple[pa.Schema, dict[str, pa.DataType]]:
    """The output schema, and the one type each carried input column is cast to (files may
    disagree: string vs large_string, int32 vs int64)."""
    carried = [c for c in (s.id_column, *s.keep_columns) if c != s.text_column]
    column_types = {}
    for name in carried:
        types = {f.uri: _plain(f.schema.field(name).type) for f in files}
        try:
            column_types[name] = pa.unify_schemas([pa.schema([(name, t)]) for t in types.values()],
                                                  promote_options="permissive").field(name).type  # fmt: skip
        except (pa.ArrowInvalid, pa.ArrowTypeError) as error:
            examples = {str(t): uri for uri, t in types.items()}
            raise TaggingError(f"column {name!r} has types that cannot be merged across files "
                               f"({examples}): {error}. Rewrite the odd files with one type"
                               ) from error  # fmt: skip
    labels = pa.list_(pa.string())
    fields = [pa.field(s.id_column, column_types[s.id_column]), pa.field("emotions", labels),
              pa.field("top_emotion", pa.string()), pa.field("top_score", pa.float32())]  # fmt: skip
    if s.probabilities:
        fields += [pa.field(f"p_{name}", pa.float32()) for name in EMOTIONS]
    fields += [pa.field("ekman", labels), pa.field("sentiment", labels), pa.field("model_hash", pa.string())]
    fields += [pa.field(c, pa.large_string() if c == s.text_column else column_types[c])
               for c in s.keep_columns]  # fmt: skip
    return pa.schema([*fields, pa.field("error", pa.string())]), column_types


def _plain(t: pa.DataType) -> pa.DataType:
    return t.value_type if pa.types.is_dictionary(t) else t


# ----------------------------------------------------------------------------- staging and commit


@dataclass
class Staging:
    """``OUTPUT/_staging``: finished output files and their markers, and the commit. The files
    and markers are written by Ray tasks (``merge_parts``, ``flag_file``), never by the driver."""

    target: Folder
    key: str
    run_id: str
    names_done: set[str] = field(default_factory=set)
    markers: dict[str, dict] = field(default_factory=dict)  # read once per file

    @classmethod
    def open(cls, target: Folder, key: str) -> Staging:
        """Resume the staging folder of an earlier run with the same key, else start a fresh one."""
        run = target.read_json(STAGING, "run.json")
        committed = target.read_json(SUCCESS) or {}  # the run that committed the output, if any
        if run and (run["key"] != key or run["run_id"] == committed.get("run_id")):
            why = "made with other settings" if run["key"] != key else "left by a committed run"
            log.warning("discarding %s (%s)", target.uri_of(STAGING), why)
            target.fs.delete_dir(target.path(STAGING))
            run = None
        if run is None:
            run_id = f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{uuid.uuid4().hex[:6]}"
            run = {"key": key, "run_id": run_id}
            target.fs.create_dir(target.path(STAGING, DONE), recursive=True)
            target.write_json(run, STAGING, "run.json")
        else:  # parts of files a killed run left unfinished: those files are tagged again
            target.delete(STAGING, PARTS)
        done = {i.base_name[: -len(".json")] for i in target.list(STAGING, DONE)}
        return cls(target, key, run["run_id"], done)

    def record(self, marker: dict) -> None:
        """A marker a Ray task has just written (and returned)."""
        self.names_done.add(marker["output"])
        self.markers[marker["output"]] = marker

    def finished(self, f: InputFile) -> dict | None:
        """The file's marker if its output is complete and was made from this same input."""
        if f.output_name not in self.names_done:
            return None
        if f.output_name not in self.markers:
            self.markers[f.output_name] = self.target.read_json(STAGING, DONE, f.output_name + ".json")
        marker = self.markers[f.output_name]
        made_from = marker and (marker.get("input"), marker.get("rows_in"), marker.get("input_bytes"))
        if made_from != (f.uri, f.rows, f.bytes):
            return None
        staged = self.target.exists(STAGING, f.output_name)
        moved = self.target.exists(STAGING, COMMITTING) and self.target.exists(f.output_name)
        return marker if staged or moved else None

    def check_finished(self, files: list[InputFile]) -> list[dict]:
        """Every file's marker; fails loudly unless each file's rows out equal its rows in."""
        markers = [self.finished(f) for f in files]
        wrong = [(f.uri, f.rows, m and m["rows_out"]) for f, m in zip(files, markers)
                 if not m or m["rows_out"] != f.rows]  # fmt: skip
        if wrong:
            raise RuntimeError(f"not committing {self.target.uri}: rows in != rows out for {len(wrong)} "
                               f"file(s) (file, rows in, rows out): {wrong[:5]}. Re-run to finish")  # fmt: skip
        return markers

    def commit(self, names: list[str], manifest: dict) -> None:
        """Replace the folder's files with the staged ones; ``_SUCCESS`` last. Safe to repeat."""
        t, fs = self.target, self.target.fs
        t.write_json({"run_id": self.run_id}, STAGING, COMMITTING)
        if t.exists(SUCCESS):  # first, so no reader takes a half-replaced folder for complete
            fs.delete_file(t.path(SUCCESS))
        staged = {i.base_name for i in t.list(STAGING)}
        for info in t.list():  # the previous output's files
            if info.base_name == STAGING or (info.base_name in names and info.base_name not in staged):
                continue  # ours, moved by an interrupted commit of this run
            fs.delete_dir(info.path) if info.type == pafs.FileType.Directory else fs.delete_file(info.path)
        for name in names:
            if name in staged:
                fs.move(t.path(STAGING, name), t.path(name))  # rename locally; copy+delete on S3
        t.write_json(manifest, MANIFEST)
        t.write_json({"run_id": self.run_id, "rows": manifest["rows_out"]}, SUCCESS)
        fs.delete_dir(t.path(STAGING))
        log.info("committed %s (%d files)", t.uri, len(names))


# ----------------------------------------------------------------------------- the pipeline


def write_outputs(input_fs: pafs.FileSystem, files: list[InputFile], staging: Staging, schema: pa.Schema,
                  column_types: dict[str, pa.DataType], s: TaggingSettings, plan: ActorPlan,
                  model_hash: str, max_length: int) -> float | None:  # fmt: skip
    """Tag ``files`` into the staging folder, on Ray workers only: files of text through the Ray
    Data pipeline, whose actors write part files and report them here, then one ``merge_parts``
    task per file once its parts hold all its rows; files without rows, or whose text column holds
    no text (every row flagged), by one ``flag_file`` task each. The driver counts rows and
    records the markers the tasks return. Returns the seconds until the first parts were reported
    (actor start-up, mostly), if the pipeline ran."""
    import ray

    target = staging.target.uri
    direct = {f.output_name for f in files if f.rows == 0 or not _is_text(f.schema.field(s.text_column).type)}
    flag = ray.remote(flag_file).options(num_cpus=MERGE_CPUS)
    tasks = [flag.remote(target, f, column_types, schema, s, model_hash) for f in files if f.output_name in direct]
    readable = [f for f in files if f.output_name not in direct]
    startup_s = None
    if readable:
        start = time.perf_counter()
        pipeline = tag_pipeline(input_fs, readable, staging, schema, column_types, s, plan, model_hash,
                                max_length)  # fmt: skip
        ledger = PartLedger(readable)
        merge = ray.remote(merge_parts).options(num_cpus=MERGE_CPUS)
        progress = Progress("tagging", sum(f.rows for f in readable), unit="rows")
        for block in pipeline.iter_batches(batch_size=None, batch_format="pyarrow"):  # PART_SCHEMA rows
            startup_s = startup_s or time.perf_counter() - start
            for k, parts, reasons in ledger.add(block):  # files whose last rows just arrived
                tasks.append(merge.remote(target, readable[k], parts, reasons, schema))
            progress.step(int(pc.sum(block.column("rows")).as_py() or 0))
        ledger.check_complete()
    for marker in ray.get(tasks):
        staging.record(marker)
    return startup_s


def tag_pipeline(input_fs: pafs.FileSystem, files: list[InputFile], staging: Staging, schema: pa.Schema,
                 column_types: dict[str, pa.DataType], s: TaggingSettings, plan: ActorPlan,
                 model_hash: str, max_length: int):  # fmt: skip
    """The Ray Data pipeline over ``files``: a Dataset of PART_SCHEMA rows, one per part file the
    Tagger actors wrote into the staging folder (__file: the part's input file, an index in
    ``files``). Tagged rows stay on the workers."""
    import ray

    paths = [f.path for f in files]
    needed = list(dict.fromkeys([s.id_column, s.text_column, *s.keep_columns]))
    units = plan_reads(files, s.batch_size, plan.actors)
    ds = ray.data.from_items(units, override_num_blocks=max(1, len(units)))
    ds = ds.map_batches(read_units, batch_size=1, batch_format="pyarrow", num_cpus=READ_CPUS,
                        fn_kwargs={"fs": input_fs, "paths": paths, "needed": needed,
                                   "text_column": s.text_column, "column_types": column_types})  # fmt: skip
    # No repartition: its tasks ask for a whole CPU, which the actors may not leave.
    if plan.tokenizers:
        ds = ds.map_batches(
            Tokenizer, batch_size=s.batch_size, batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=plan.tokenizers), num_cpus=plan.tokenizer_cpus,
            fn_constructor_kwargs={"model": s.model, "max_length": max_length,
                                   "keep_text": s.text_column in s.keep_columns},
        )  # fmt: skip
    return ds.map_batches(
        Tagger, batch_size=s.batch_size, batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=plan.actors),
        num_cpus=plan.cpus_reserved, num_gpus=plan.gpus or None,
        fn_constructor_kwargs={"model": s.model, "model_hash": model_hash, "threads": plan.threads,
                               "use_gpu": plan.gpus > 0, "precision": s.precision, "schema": schema,
                               "text_column": s.text_column, "staging": staging.target.uri_of(STAGING),
                               "names": [f.output_name for f in files]},
    )  # fmt: skip


class PartLedger:
    """The driver's account of the part files the Tagger actors reported: rows per input file and
    the parts that hold them. Only reported parts count: an attempt that Ray retried may have
    left a part in storage, but no one reported it, so no merge reads it."""

    def __init__(self, files: list[InputFile]):
        self.files = files
        self.received = np.zeros(len(files), dtype=np.int64)
        self.parts: dict[int, list[str]] = {}
        self.reasons: dict[int, dict[str, int]] = {}

    def add(self, block: pa.Table) -> list[tuple[int, list[str], dict[str, int]]]:
        """PART_SCHEMA rows -> (file index, its parts, its flag counts) of each file now complete."""
        complete = []
        for row in block.to_pylist():
            k = row[FILE_COLUMN]
            self.received[k] += row["rows"]
            if self.received[k] > self.files[k].rows:
                raise RuntimeError(f"{self.files[k].uri}: {self.received[k]} rows tagged, but the file "
                                   f"has {self.files[k].rows}: rows were duplicated")  # fmt: skip
            self.parts.setdefault(k, []).append(row["part"])
            counts = self.reasons.setdefault(k, {})
            for reason, n in json.loads(row["reasons"]).items():
                counts[reason] = counts.get(reason, 0) + n
            if self.received[k] == self.files[k].rows:
                complete.append((k, self.parts.pop(k), self.reasons.pop(k)))
        return complete

    def check_complete(self) -> None:
        short = [(f.uri, int(n), f.rows) for f, n in zip(self.files, self.received) if n != f.rows]
        if short:
            raise RuntimeError(f"the pipeline ended with files not fully tagged (file, rows tagged, "
                               f"rows in): {short[:5]}; nothing was committed, re-run to finish")  # fmt: skip


def write_parts(tagged: pa.Table, staging: Folder, names: list[str], schema: pa.Schema) -> pa.Table:
    """On a Tagger actor: tagged rows (__file + the output columns) -> one part file per input file
    in the batch, written into ``staging``; -> one PART_SCHEMA row per part, for the driver."""
    index = tagged.column(FILE_COLUMN).to_numpy()
    report = {name: [] for name in PART_SCHEMA.names}
    for k in np.unique(index):
        rows = tagged.filter(pa.array(index == k)).drop_columns([FILE_COLUMN]).cast(schema)
        part = f"{names[k]}/part-{uuid.uuid4().hex}.arrow"  # unique: a retried attempt writes anew
        if staging.is_local:
            staging.make(PARTS, names[k])
        with (staging.fs.open_output_stream(staging.path(PARTS, part)) as stream,
              pa.ipc.new_file(stream, schema) as writer):  # fmt: skip
            writer.write_table(rows)  # Arrow IPC: no encoding here, no decoding in the merge
        reasons = {r["values"]: r["counts"] for r in pc.value_counts(rows.column("error").drop_null()).to_pylist()}
        for name, value in zip(PART_SCHEMA.names, (int(k), part, rows.num_rows, json.dumps(reasons))):
            report[name].append(value)
    return pa.table(report, schema=PART_SCHEMA)


def merge_parts(target_uri: str, f: InputFile, parts: list[str], reasons: dict[str, int],
                schema: pa.Schema) -> dict:  # fmt: skip
    """A Ray task: stream the reported ``parts`` of ``f`` (those only) into its output file in the
    staging folder, in row groups of up to ROW_GROUP_ROWS; write its marker, delete its parts.
    -> the marker."""
    target = Folder.from_uri(target_uri)
    with pq.ParquetWriter(target.path(STAGING, f.output_name), schema, filesystem=target.fs) as writer:
        buffer: list[pa.Table] = []
        for i, part in enumerate(parts):
            with target.fs.open_input_file(target.path(STAGING, PARTS, part)) as handle:
                buffer.append(pa.ipc.open_file(handle).read_all())
            if sum(t.num_rows for t in buffer) >= ROW_GROUP_ROWS or i == len(parts) - 1:
                writer.write_table(pa.concat_tables(buffer))
                buffer = []
    marker = write_marker(target, f, reasons)
    target.delete(STAGING, PARTS, f.output_name)
    return marker


def flag_file(target_uri: str, f: InputFile, column_types: dict[str, pa.DataType], schema: pa.Schema,
              s: TaggingSettings, model_hash: str) -> dict:  # fmt: skip
    """A Ray task: the output file of an input with nothing to tag (no rows, or a text column that
    holds no text), streamed by row group with every row flagged; its marker. -> the marker."""
    input_fs, path, _ = filesystem(f.uri)
    target = Folder.from_uri(target_uri)
    needed = list(dict.fromkeys([s.id_column, s.text_column, *s.keep_columns]))
    reasons: dict[str, int] = {}
    with (pq.ParquetWriter(target.path(STAGING, f.output_name), schema, filesystem=target.fs) as writer,
          input_fs.open_input_file(path) as handle):  # fmt: skip
        for batch in pq.ParquetFile(handle).iter_batches(columns=needed):
            block = pa.Table.from_batches([batch])
            block = block.append_column("path", pa.array([path] * block.num_rows, pa.string()))
            rows = normalize_block(block, [path], s.text_column, column_types)
            no_probs = np.zeros((rows.num_rows, len(EMOTIONS)), dtype=np.float32)
            tagged = label_batch(rows, no_probs, np.ones(len(EMOTIONS)), model_hash, schema, s.text_column)
            writer.write_table(tagged.drop_columns([FILE_COLUMN]).cast(schema))
            for item in pc.value_counts(tagged.column("error").drop_null()).to_pylist():
                reasons[item["values"]] = reasons.get(item["values"], 0) + item["counts"]
    return write_marker(target, f, reasons)


def write_marker(target: Folder, f: InputFile, reasons: dict[str, int]) -> dict:
    """Once ``f``'s output file is complete in the staging folder: its marker, with the rows its
    footer on storage holds (not as counted) and the process that wrote it. -> the marker."""
    import ray

    written = pq.read_metadata(target.path(STAGING, f.output_name), filesystem=target.fs)
    node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    marker = {"input": f.uri, "input_bytes": f.bytes, "rows_in": f.rows, "rows_out": written.num_rows,
              "flagged": sum(reasons.values()), "reasons": dict(sorted(reasons.items())),
              "output": f.output_name, "written_by": {"pid": os.getpid(), "node": node}}  # fmt: skip
    target.write_json(marker, STAGING, DONE, f.output_name + ".json")
    return marker


def _is_text(type_: pa.DataType) -> bool:
    type_ = _plain(type_)
    return pa.types.is_string(type_) or pa.types.is_large_string(type_)


def plan_reads(files: list[InputFile], batch_size: int, actors: int) -> list[dict]:
    """Read units: row ranges [start, stop) of a row group of a file, of about the same number of
    rows, whole row groups where that leaves every actor READS_PER_ACTOR units or more.

    A read task's output is one block, and one block goes to one actor, so units must be small
    enough to spread over the pool, but every unit is a Ray task (and part files downstream):
    1,024-row units cost a third of the throughput of 10,000-row ones on 2 CPUs (smoke bundle).
    A row group cut into k slices is decoded up to k times over (Parquet cannot seek to a row in
    a row group), so it is cut into at most MAX_SLICES."""
    total = sum(f.rows for f in files)
    target = max(batch_size, math.ceil(total / max(1, actors * READS_PER_ACTOR) / batch_size) * batch_size)
    units = []
    for k, f in enumerate(files):
        for g, n in enumerate(f.row_groups):
            if n == 0:
                continue
            rows = math.ceil(n / min(MAX_SLICES, math.ceil(n / target)))
            units += [{"file": k, "row_group": g, "start": a, "stop": min(n, a + rows)} for a in range(0, n, rows)]
    return units


def read_units(units: pa.Table, fs: pafs.FileSystem, paths: list[str], needed: list[str], text_column: str,
               column_types: dict[str, pa.DataType]):  # fmt: skip
    """Read units (``plan_reads``) -> normalized blocks, read straight from storage by the Ray
    task that runs this."""
    for k, group, start, stop in zip(*(units.column(c).to_pylist() for c in ("file", "row_group", "start", "stop"))):
        with fs.open_input_file(paths[k]) as handle:
            batches = pq.ParquetFile(handle).iter_batches(batch_size=stop - start, row_groups=[group], columns=needed)
            block = _rows(batches, start, stop)
        block = block.append_column("path", pa.array([paths[k]] * block.num_rows, pa.string()))
        yield normalize_block(block, paths, text_column, column_types)


def _rows(batches, start: int, stop: int) -> pa.Table:
    """Rows [start, stop) of a stream of record batches, read no further than ``stop``
    (start < stop <= the rows in the stream)."""
    kept, seen = [], 0
    for batch in batches:
        if seen + batch.num_rows > start:
            kept.append(batch.slice(max(0, start - seen), stop - max(seen, start)))
        seen += batch.num_rows
        if seen >= stop:
            break
    return pa.Table.from_batches(kept)


def normalize_block(block: pa.Table, paths: list[str], text_column: str,
                    column_types: dict[str, pa.DataType]) -> pa.Table:  # fmt: skip
    """One read block -> the columns the actors expect, with one schema for every file:
    input file index, text as large_string, the flag reason, carried columns cast to one type."""
    files = pc.index_in(block.column("path"), value_set=pa.array(paths))
    assert files.null_count == 0, "a row came from a file that was not asked for"
    text, error = check_texts(block.column(text_column))
    columns = {FILE_COLUMN: files, TEXT_COLUMN: text, ERROR_COLUMN: error}
    for name, type_ in column_types.items():
        columns[name] = block.column(name).cast(type_)
    return pa.table(columns)


def check_texts(column: pa.ChunkedArray) -> tuple[pa.ChunkedArray, pa.ChunkedArray]:
    """-> (text as large_string, null if the column is not text; reason, null where taggable)."""
    column = column.cast(_plain(column.type))
    if pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type):
        try:
            column = column.cast(pa.large_string())  # validates UTF-8
        except pa.ArrowInvalid:
            pass
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        reason = pc.if_else(pc.is_null(column), pa.scalar("null text"), pa.scalar("not a string"))
        return pa.nulls(len(column), pa.large_string()), reason
    text = column.cast(pa.large_string())
    stripped = pc.utf8_trim_whitespace(text)
    conditions = [pc.is_null(text), pc.equal(text, ""), pc.equal(stripped, ""),
                  pc.equal(stripped, "[deleted]"), pc.equal(stripped, "[removed]")]  # fmt: skip
    reasons = ["null text", "empty text", "whitespace only", "[deleted]", "[removed]"]
    return text, pc.case_when(pc.make_struct(*conditions, field_names=reasons), *reasons)


class Tokenizer:
    """A Ray Data actor on CPU, ahead of the encoder actors (GPU runs): adds __ids, the token ids
    of every taggable row (empty where flagged), so the GPU actors only run the encoder."""

    def __init__(self, model: str, max_length: int, keep_text: bool):
        environment.setup_logging()
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per actor, as reserved
        self.tokenizer, self.max_length, self.keep_text = load_tokenizer(model), max_length, keep_text

    def __call__(self, batch: pa.Table) -> pa.Table:
        flagged = _flagged(batch)
        data = tokenize_texts(_texts(batch, flagged), self.tokenizer, self.max_length)
        lengths = np.zeros(batch.num_rows, dtype=np.int32)
        lengths[~flagged] = data.lengths
        offsets = np.zeros(batch.num_rows + 1, dtype=np.int32)
        np.cumsum(lengths, out=offsets[1:])
        batch = batch.append_column(IDS_COLUMN, pa.ListArray.from_arrays(pa.array(offsets), pa.array(data.ids)))
        return batch if self.keep_text else batch.drop_columns([TEXT_COLUMN])


def load_tokenizer(model: str):
    """The bundle's tokenizer alone (for a URI, only its tokenizer/ folder is downloaded)."""
    import tempfile

    from transformers import AutoTokenizer

    folder = Folder.from_uri(model).child("tokenizer")
    local = folder.root if folder.is_local else folder.download(tempfile.mkdtemp(prefix="emotions-tokenizer-"))
    return AutoTokenizer.from_pretrained(str(local), trust_remote_code=False)


def tokenize_texts(texts: list[str], tokenizer, max_length: int):
    """[n] texts -> TokenizedSet; texts are cut to max_length * CHARS_PER_TOKEN_CAP characters first
    (the tokenizer truncates to max_length tokens, but would split all of a 1 MB text first)."""
    from emotions.batching import tokenize  # torch: not imported by Ray Data's read tasks

    cap = max_length * CHARS_PER_TOKEN_CAP
    return tokenize([t[:cap] for t in texts], np.zeros((len(texts), 0), dtype=np.float32), tokenizer, max_length)


def _flagged(batch: pa.Table) -> np.ndarray:
    return batch.column(ERROR_COLUMN).is_valid().to_numpy(zero_copy_only=False)  # [batch] bool


def _texts(batch: pa.Table, flagged: np.ndarray) -> list[str]:
    return batch.column(TEXT_COLUMN).filter(pa.array(~flagged)).to_pylist()


def _token_ids(batch: pa.Table, flagged: np.ndarray):
    """The Tokenizer stage's __ids of the taggable rows -> TokenizedSet."""
    from emotions.batching import TokenizedSet

    ids = batch.column(IDS_COLUMN).combine_chunks().filter(pa.array(~flagged))
    offsets = np.zeros(len(ids) + 1, dtype=np.int64)
    np.cumsum(pc.list_value_length(ids).to_numpy(zero_copy_only=False), out=offsets[1:])
    return TokenizedSet(ids.flatten().to_numpy(zero_copy_only=False), offsets,
                        np.zeros((len(ids), 0), dtype=np.float32), np.arange(len(ids)))  # fmt: skip


class Tagger:
    """A Ray Data actor: loads the bundle once, then tags a batch of rows and writes them as part
    files into the staging folder (``write_parts``).

    Batch in: __file, __text (or __ids from the Tokenizer stage), __error, carried columns.
    Batch out: PART_SCHEMA rows, one per part file written."""

    def __init__(self, model: str, model_hash: str, threads: int, use_gpu: bool, precision: str,
                 schema: pa.Schema, text_column: str, staging: str, names: list[str]):  # fmt: skip
        start = time.perf_counter()
        import torch

        from emotions.bundle import BundleError, load_bundle

        environment.setup_logging()  # a fresh worker process: its lines reach the driver's log
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the actor's threads are torch's alone
        torch.set_num_threads(threads)
        self.device = "cuda" if use_gpu else "cpu"
        self.bundle = load_bundle(model, device=self.device)
        if self.bundle.hash != model_hash:
            raise BundleError(f"model bundle {model} changed while tagging (hash {self.bundle.hash}, "
                              f"expected {model_hash}); re-run against an unchanging bundle")  # fmt: skip
        self.model, self.precision = prepare_model(self.bundle.model, precision), precision
        self.schema, self.text_column = schema, text_column
        self.staging, self.names = Folder.from_uri(staging), names
        log.info("tagging actor ready in %.1fs (%s, %d threads, %s)", time.perf_counter() - start,
                 self.device, threads, precision)  # fmt: skip

    def __call__(self, batch: pa.Table) -> pa.Table:
        return write_parts(self.tag(batch), self.staging, self.names, self.schema)

    def tag(self, batch: pa.Table) -> pa.Table:
        """A normalized batch -> __file + the output columns."""
        flagged = _flagged(batch)
        probs = np.zeros((batch.num_rows, len(EMOTIONS)), dtype=np.float32)  # [batch, 28]
        if not flagged.all():
            tokenizer = self.bundle.tokenizer
            data = (_token_ids(batch, flagged) if IDS_COLUMN in batch.column_names
                    else tokenize_texts(_texts(batch, flagged), tokenizer, self.bundle.max_length))  # fmt: skip
            probs[~flagged] = predict_tokens(self.model, data, tokenizer.pad_token_id or 0,
                                             ENCODER_BATCH[self.device], self.precision, self.device)  # fmt: skip
        return label_batch(batch, probs, self.bundle.thresholds, self.bundle.hash, self.schema,
                           self.text_column)  # fmt: skip


def predict_tokens(model, data, pad_id: int, batch_size: int, precision: str, device: str) -> np.ndarray:
    """[n] tokenized texts -> [n, 28] probabilities (float32), in passes of ``batch_size`` rows
    sorted by length. bf16 runs under autocast; an int8 model comes quantized (prepare_model)."""
    import torch

    from emotions.batching import collate, sorted_batches

    out = np.zeros((len(data), len(EMOTIONS)), dtype=np.float32)
    autocast = torch.autocast(device, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    with torch.inference_mode(), autocast:
        for rows in sorted_batches(data.lengths, batch_size):
            ids, mask, _ = collate(data, rows, pad_id)
            logits = model(ids.to(device), mask.to(device))  # [pass, 28]
            out[rows] = torch.sigmoid(logits.float()).cpu().numpy()
    return out


def prepare_model(model, precision: str):
    """The model to run at ``precision``: int8 quantizes it (in place), fp32 and bf16 leave it."""
    return quantize_int8(model) if precision == "int8" else model


def quantize_int8(model):
    """Dynamic int8 weights for every nn.Linear (activations quantized on the fly), CPU only.
    Per-channel scales: on the MiniLM bundle they halve per-tensor's macro-F1 loss."""
    import torch
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    with warnings.catch_warnings():  # torch announces the move of this API to torchao
        warnings.simplefilter("ignore")
        return quantize_dynamic(model, {torch.nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8)


def check_precision(bundle, precision: str) -> dict:
    """The gate for any precision but fp32 (bf16, int8): macro-F1 at the bundle's thresholds on its
    own validation split, fp32 vs ``precision``, through the encoder loop the actors run (on CPU,
    here), and the seconds each pass took. ``allowed`` is False when ``precision`` moves macro-F1
    by more than MAX_F1_CHANGE; ``verdict`` says so in a sentence."""
    import copy

    from emotions.data import DataError, load_labelled
    from emotions.metrics import compute_metrics

    assert precision in PRECISIONS and precision != "fp32", precision
    data, seed = bundle.config["data"], bundle.config.get("seed", 0)
    try:
        validation = load_labelled(data["validation"], text_column=data["text_column"],
                                   labels_column=data["labels_column"], label_format=data["label_format"])
        validation = validation.take(data["max_validation_examples"], seed)  # what thresholds were fit on
    except DataError as error:
        raise TaggingError(f"--precision {precision} is checked on the bundle's validation data, which "
                           f"cannot be read here ({error}); tag in fp32 (--precision fp32)") from error  # fmt: skip
    tokens = tokenize_texts(validation.texts, bundle.tokenizer, bundle.max_length)
    pad_id = bundle.tokenizer.pad_token_id or 0
    candidates = {"fp32": bundle.model, precision: prepare_model(copy.deepcopy(bundle.model), precision)}
    scores, seconds = {}, {}
    for name, model in candidates.items():
        predict_tokens(model, tokens.select(np.arange(min(64, len(tokens)))), pad_id, ENCODER_BATCH["cpu"],
                       name, "cpu")  # warm-up, so the timings compare  # fmt: skip
        start = time.perf_counter()
        probs = predict_tokens(model, tokens, pad_id, ENCODER_BATCH["cpu"], name, "cpu")
        seconds[name] = time.perf_counter() - start
        scores[name] = compute_metrics(validation.labels, probs, bundle.thresholds)["macro_f1"]
    change = scores[precision] - scores["fp32"]
    allowed = abs(change) <= MAX_F1_CHANGE
    verdict = (f"{precision} moves validation macro-F1 of bundle {bundle.hash} from {scores['fp32']:.4f} "
               f"to {scores[precision]:.4f} ({change:+.4f} on {len(validation)} examples of "
               f"{validation.source}); " + ("within" if allowed else "more than")
               + f" the {MAX_F1_CHANGE} allowed"
               + ("" if allowed else ": tag in fp32 (--precision fp32)"))  # fmt: skip
    log.info("%s", verdict)
    return {"precision": precision, "macro_f1_fp32": scores["fp32"], f"macro_f1_{precision}": scores[precision],
            "change": change, "max_change": MAX_F1_CHANGE, "examples": len(validation),
            "fp32_s": seconds["fp32"], f"{precision}_s": seconds[precision], "allowed": allowed,
            "verdict": verdict}  # fmt: skip


def label_batch(batch: pa.Table, probs: np.ndarray, thresholds: np.ndarray, model_hash: str,
                schema: pa.Schema, text_column: str) -> pa.Table:  # fmt: skip
    """A normalized batch and its [n, 28] probabilities -> __file + the output columns. Rows
    with a flag reason get null predictions."""
    flagged = batch.column(ERROR_COLUMN).is_valid().to_numpy(zero_copy_only=False)  # [n] bool
    chosen = (probs >= thresholds) & ~flagged[:, None]  # [n, 28]
    top = probs.argmax(axis=1)
    columns = {
        "emotions": _label_lists(chosen, EMOTIONS, flagged),
        "top_emotion": pa.array(EMOTIONS).take(pa.array(top, mask=flagged)),
        "top_score": pa.array(probs.max(axis=1), pa.float32(), mask=flagged),
        "ekman": _label_lists(chosen.astype(np.int32) @ _EKMAN_MATRIX > 0, tuple(EKMAN), flagged),
        "sentiment": _label_lists(chosen.astype(np.int32) @ _SENTIMENT_MATRIX > 0, tuple(SENTIMENT), flagged),
        "model_hash": pa.array([model_hash] * batch.num_rows, pa.string()),
        "error": batch.column(ERROR_COLUMN),
        **{f"p_{name}": pa.array(probs[:, j], pa.float32(), mask=flagged) for j, name in enumerate(EMOTIONS)
           if f"p_{name}" in schema.names},
    }  # fmt: skip
    for name in schema.names:
        if name not in columns:  # the id and keep columns
            columns[name] = batch.column(TEXT_COLUMN if name == text_column else name)
    return pa.table({FILE_COLUMN: batch.column(FILE_COLUMN), **{name: columns[name] for name in schema.names}})


def _label_lists(chosen: np.ndarray, names: tuple[str, ...], null: np.ndarray) -> pa.ListArray:
    """[n, k] bool -> n lists of the chosen names, in ``names`` order; null where ``null``."""
    offsets = np.zeros(len(chosen) + 1, dtype=np.int32)
    np.cumsum(chosen.sum(axis=1), out=offsets[1:])
    values = pa.array(names, pa.string()).take(pa.array(np.nonzero(chosen)[1]))
    return pa.ListArray.from_arrays(pa.array(offsets), values, mask=pa.array(null))


# ----------------------------------------------------------------------------- helpers


def _connect_ray() -> None:
    import ray

    if not ray.is_initialized():
        ray.init(log_to_driver=True)


def _cluster_size() -> tuple[list[float], float]:
    """(CPUs of each alive node, GPUs in the cluster)."""
    import ray

    cpus = [float(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n["Alive"]]
    return cpus, float(ray.cluster_resources().get("GPU", 0))


def _add_counts(dicts) -> dict[str, int]:
    total: dict[str, int] = {}
    for d in dicts:
        for key, n in d.items():
            total[key] = total.get(key, 0) + n
    return dict(sorted(total.items()))
