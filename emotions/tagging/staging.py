"""The staging and commit protocol: every input row in the output exactly once, or no commit.

Every input file has one output file whose name derives from the input's URI
(``InputFile.output_name``). Tagged rows never travel to the driver: each Tagger actor writes
every batch it tags, split by input file, as a part file
``_staging/parts/<output name>/part-<uuid>.arrow`` (Arrow IPC, ``write_parts``) and returns one
small row per part (file index, part name, rows, flag counts). The driver adds those rows up per
file (``PartLedger``); when a file's parts hold all its rows, a Ray task streams exactly those
parts into the file's output file in ``OUTPUT/_staging/`` (``merge_parts``; readers skip
``_``-prefixed paths), then writes its marker into ``_staging/_done/`` and deletes the parts. A
part written by an attempt Ray retried is never reported to the driver, so it is never merged
(more rows reported than the file has stops the run).

A re-run with the same settings (``Staging.open``) skips files whose marker matches (same rows
and bytes of input), discards the parts of unfinished files, rewrites any half-written ones, and
finishes the rest. The commit checks rows in == rows out for every file, moves the files into
OUTPUT (a rename locally, copy + delete on object stores), writes ``_manifest.json`` and then
``_SUCCESS``: an output without ``_SUCCESS`` is never complete. (The manifest's name starts with
``_`` because pyarrow, pandas and Spark read every other file in a folder as Parquet.) Row order
within a file is not kept; join on the id column.

Nothing here needs Ray: the functions run in Ray tasks and actors, and in tests without them.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from emotions.storage import Folder
from emotions.tagging.inputs import FILE_COLUMN, InputFile
from emotions.tagging.settings import TaggingError

log = logging.getLogger("emotions.tagging")


FORMAT = "emotions-tagging"
STAGING = "_staging"  # inside OUTPUT; the leading _ hides it from Parquet/Hive readers
DONE = "_done"  # per-file markers inside the staging folder
COMMITTING = "_COMMITTING"  # written once every file is staged; the commit may have begun
SUCCESS = "_SUCCESS"
MANIFEST = "_manifest.json"  # _-prefixed: pd.read_parquet(OUTPUT) and Spark skip it
ROW_GROUP_ROWS = 65_536  # rows buffered per output file before a row group is written
PARTS = "parts"  # inside the staging folder: parts/<output name>/part-<uuid>.arrow
PART_SCHEMA = pa.schema([(FILE_COLUMN, pa.int32()), ("part", pa.string()), ("rows", pa.int64()),
                         ("reasons", pa.string())])  # reasons: JSON {reason: rows}  # fmt: skip


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
