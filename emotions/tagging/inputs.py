"""Input discovery, schemas and reading.

Inputs are Parquet files named by files, folders (searched recursively; ``_``- and ``.``-prefixed
paths skipped, as Spark and Hive do) or globs, local or on a pyarrow URI. Every footer is read
before any work (``inspect_inputs``): a damaged file, or one without the needed columns, stops
the job before anything is written (or is skipped and listed, with ``on_bad_file="skip"``).

Schemas. Files may disagree (string vs large_string text, int32 vs int64 ids, extra columns):
only the needed columns are read, each file with its own schema, and cast to one type per column
(``output_schema``) as they are read. Text is one rule (``check_texts``): strings, and bytes that
are valid UTF-8, are text; anything else is flagged with its reason and never dropped.

Reading. The driver has read every footer already, so it plans the reads itself (``plan_reads``):
row ranges of a row group, whole row groups where there are enough of them to keep every actor
busy to the end, each read by a Ray task (``read_units``). ``ray.data.read_parquet`` is not used:
its file listing runs as a task that asks for 1 whole CPU on one node, which a pool of actors
spread over small nodes (1-CPU pods) never leaves free, and the pipeline hangs.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from emotions.labels import EMOTIONS
from emotions.storage import Folder, filesystem
from emotions.tagging.settings import TaggingError, TaggingSettings

log = logging.getLogger("emotions.tagging")


READS_PER_ACTOR = 4  # read units per actor at least, so the last ones spread over the pool
MAX_SLICES = 8  # a row group is read in at most this many units (each decodes up to its slice)
FILE_COLUMN = "__file"  # internal: index of the input file a row came from
TEXT_COLUMN = "__text"  # internal: the text as large_string (null when the column is not text)
ERROR_COLUMN = "__error"  # internal: the flag reason, computed when reading


@dataclass(frozen=True)
class InputFile:
    uri: str  # as reported in the manifest: a local path or scheme://...
    path: str  # inside the filesystem
    rows: int
    bytes: int
    schema: pa.Schema
    row_groups: tuple[int, ...] = ()  # rows in each row group, from the footer
    fingerprint: str = ""  # sha1 of the footer (offsets, sizes, statistics): the same bytes, or not
    mtime_ns: int = 0  # last modified, as the filesystem reports it (S3: whole seconds)

    @property
    def identity(self) -> tuple:
        """What must match for an earlier output of this input to stand for it: a file rewritten
        in place with the same size and rows has another footer or a later modification time."""
        return (self.uri, self.rows, self.bytes, self.fingerprint, self.mtime_ns)

    @property
    def output_name(self) -> str:
        """Deterministic: the same input always maps to the same output file."""
        stem = self.path.rsplit("/", 1)[-1].rsplit(".", 1)[0]
        return f"{stem}-{hashlib.sha1(self.uri.encode()).hexdigest()[:8]}.parquet"


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
            raise TaggingError(f"inputs are on different filesystems ({item}); tag each filesystem in its own run")
        fs = item_fs
        paths = _expand(fs, path, item)
        if not paths:
            raise TaggingError(f"input {item} holds no Parquet files (*.parquet); check the path")
        found.update((p, prefix + p) for p in paths)
    if exclude is not None and fs.equals(exclude.fs):
        inside = [uri for p, uri in found.items() if p.startswith(exclude.root + "/")]
        if inside:
            raise TaggingError(
                f"input {inside[0]} is inside the output folder {exclude.uri}; choose an output outside the inputs"
            )
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


def inspect_inputs(
    fs: pafs.FileSystem, paths: list[tuple[str, str]], settings: TaggingSettings
) -> tuple[list[InputFile], list[tuple[str, str]]]:
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
        raise TaggingError(
            f"{len(bad)} input file(s) cannot be tagged, nothing was written: "
            f"{listing}{more}. Fix or remove them, or pass --skip-bad-files "
            "(on_bad_file='skip') to tag the rest and list them in the manifest"
        )
    for uri, reason in bad:
        log.warning("skipping %s: %s", uri, reason)
    if not files:
        raise TaggingError("every input file was skipped as unreadable; nothing to tag")
    return files, bad


def _inspect(fs: pafs.FileSystem, path: str, uri: str, needed: list[str]) -> InputFile | tuple[str, str]:
    try:
        info = fs.get_file_info(path)
        with fs.open_input_file(path) as f:
            parquet = pq.ParquetFile(f)
            rows, schema, size = parquet.metadata.num_rows, parquet.schema_arrow, f.size()
            groups = tuple(parquet.metadata.row_group(i).num_rows for i in range(parquet.num_row_groups))
            footer = json.dumps(parquet.metadata.to_dict(), sort_keys=True, default=str)
    except Exception as error:  # pyarrow raises several types for a damaged file
        return uri, f"not a readable Parquet file ({type(error).__name__}: {error})"
    missing = [c for c in needed if c not in schema.names]
    if missing:
        return uri, f"no column(s) {missing}; columns found: {schema.names}"
    return InputFile(
        uri=uri,
        path=path,
        rows=rows,
        bytes=size,
        schema=schema,
        row_groups=groups,
        fingerprint=hashlib.sha1(footer.encode()).hexdigest()[:16],
        mtime_ns=info.mtime_ns or 0,
    )


def output_schema(files: list[InputFile], s: TaggingSettings) -> tuple[pa.Schema, dict[str, pa.DataType]]:
    """The output schema, and the one type each carried input column is cast to (files may
    disagree: string vs large_string, int32 vs int64)."""
    carried = [c for c in (s.id_column, *s.keep_columns) if c != s.text_column]
    column_types = {}
    for name in carried:
        types = {f.uri: _plain(f.schema.field(name).type) for f in files}
        try:
            column_types[name] = (
                pa.unify_schemas([pa.schema([(name, t)]) for t in types.values()], promote_options="permissive")
                .field(name)
                .type
            )
        except (pa.ArrowInvalid, pa.ArrowTypeError) as error:
            examples = {str(t): uri for uri, t in types.items()}
            raise TaggingError(
                f"column {name!r} has types that cannot be merged across files "
                f"({examples}): {error}. Rewrite the odd files with one type"
            ) from error
    labels = pa.list_(pa.string())
    fields = [
        pa.field(s.id_column, column_types[s.id_column]),
        pa.field("emotions", labels),
        pa.field("top_emotion", pa.string()),
        pa.field("top_score", pa.float32()),
    ]
    if s.probabilities:
        fields += [pa.field(f"p_{name}", pa.float32()) for name in EMOTIONS]
    fields += [pa.field("ekman", labels), pa.field("sentiment", labels), pa.field("model_hash", pa.string())]
    fields += [pa.field(c, pa.large_string() if c == s.text_column else column_types[c]) for c in s.keep_columns]
    return pa.schema([*fields, pa.field("error", pa.string())]), column_types


def _plain(t: pa.DataType) -> pa.DataType:
    return t.value_type if pa.types.is_dictionary(t) else t


def is_text(type_: pa.DataType) -> bool:
    """Whether a text column of this type may hold text: strings, and bytes (UTF-8 or flagged)."""
    type_ = _plain(type_)
    return any(
        check(type_)
        for check in (pa.types.is_string, pa.types.is_large_string, pa.types.is_binary, pa.types.is_large_binary)
    )


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


def read_units(
    units: pa.Table,
    fs: pafs.FileSystem,
    paths: list[str],
    needed: list[str],
    text_column: str,
    column_types: dict[str, pa.DataType],
):
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


def normalize_block(
    block: pa.Table, paths: list[str], text_column: str, column_types: dict[str, pa.DataType]
) -> pa.Table:
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
    """-> (text as large_string, null where there is none; reason, null where taggable).
    Strings are text; bytes are text where they are valid UTF-8 and flagged where not."""
    column = column.cast(_plain(column.type))
    invalid = None
    if pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type):
        column, invalid = _utf8(column)
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        reason = pc.if_else(pc.is_null(column), pa.scalar("null text"), pa.scalar("not a string"))
        return pa.nulls(len(column), pa.large_string()), reason
    text = column.cast(pa.large_string())
    stripped = pc.utf8_trim_whitespace(text)
    conditions = [
        pc.is_null(text),
        pc.equal(text, ""),
        pc.equal(stripped, ""),
        pc.equal(stripped, "[deleted]"),
        pc.equal(stripped, "[removed]"),
    ]
    reasons = ["null text", "empty text", "whitespace only", "[deleted]", "[removed]"]
    if invalid is not None:  # first: an invalid row's text is null too
        conditions, reasons = [invalid, *conditions], ["invalid UTF-8", *reasons]
    return text, pc.case_when(pc.make_struct(*conditions, field_names=reasons), *reasons)


def _utf8(column: pa.ChunkedArray) -> tuple[pa.ChunkedArray, pa.Array]:
    """Bytes -> (large_string, null where the bytes are not UTF-8; True there). Row by row only
    when the column as a whole is not valid UTF-8."""
    try:
        return column.cast(pa.large_string()), pa.array(np.zeros(len(column), dtype=bool))
    except pa.ArrowInvalid:
        texts, invalid = [], []
        for value in column.to_pylist():
            try:
                texts.append(None if value is None else value.decode("utf-8"))
                invalid.append(False)
            except UnicodeDecodeError:
                texts.append(None)
                invalid.append(True)
        return pa.chunked_array([pa.array(texts, pa.large_string())]), pa.array(invalid)
