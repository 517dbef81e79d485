"""The staging folder: tagged rows in part files, merged into one file per input file with its
marker, so that every input row is in the output exactly once, or nothing is committed.

    OUTPUT/_staging/run.json             {key, run_id}: the settings and the run staging belongs to
    OUTPUT/_staging/parts/<name>/part-<uuid>.arrow       tagged rows, one batch of one input file
    OUTPUT/_staging/<name>.<uuid>                        a merged output file, unique per attempt
    OUTPUT/_staging/_done/<name>.json    its marker: key, run_id, input, rows, the staged file
    -> Staging.commit: the files moved into OUTPUT, _SUCCESS last (emotions.tagging.commit)

Every input file has one output file whose name derives from the input's URI
(``InputFile.output_name``). Tagged rows never travel to the driver: each Tagger actor writes
every batch it tags, split by input file, as a part file (Arrow IPC, ``write_parts``) and returns
one small row per part (file index, part name, rows, flag counts). The driver adds those rows up
per file (``PartLedger``); when a file's parts hold all its rows, a Ray task streams exactly those
parts into a file of its own under a name no other attempt uses (``merge_parts``), writes the
marker that names it, then deletes the parts. A part written by an attempt Ray retried is never
reported to the driver, so it is never merged (more rows reported than the file has stops the
run); a merge Ray retries after its marker was written finds the marker and its file, and
returns them; a merge of a run that no longer owns the staging folder writes nothing.

Markers are trusted only when they name this staging folder's key and run and the input they
were made from (URI, rows, bytes), and only after the footer of the file they name, read back
from storage, holds the input's rows: a re-run re-tags any file that fails this, and the commit
checks every file once more (``check_finished``) before its first write.

Nothing here needs Ray: the functions run in Ray tasks and actors, and in tests without them.
``crash_point(step)`` marks each place a process can die (``crashpoints.STEPS``).
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from emotions.storage import Folder
from emotions.tagging.commit import (
    COMMITTING,
    DONE,
    STAGING,
    SUCCESS,
    Committed,
    commit_staged,
    staged_outputs,
    staged_rows,
)
from emotions.tagging.crashpoints import crash_point
from emotions.tagging.inputs import FILE_COLUMN, InputFile

log = logging.getLogger("emotions.tagging")


ROW_GROUP_ROWS = 65_536  # rows buffered per output file before a row group is written
PARTS = "parts"  # inside the staging folder: parts/<output name>/part-<uuid>.arrow
PART_SCHEMA = pa.schema(
    [(FILE_COLUMN, pa.int32()), ("part", pa.string()), ("rows", pa.int64()), ("reasons", pa.string())]
)  # reasons: JSON {reason: rows}


@dataclass
class Staging:
    """``OUTPUT/_staging``: finished output files and their markers, and the commit. The files
    and markers are written by Ray tasks (``merge_parts``, ``flag_file``), never by the driver."""

    target: Folder
    key: str
    run_id: str
    attempt: str = ""  # this driver's attempt: tasks of an earlier attempt of the run write nothing
    names_done: set[str] = field(default_factory=set)
    markers: dict[str, dict] = field(default_factory=dict)  # read once per file
    replaces: set[str] = field(default_factory=set)  # files of ours a discarded staging may have left

    @property
    def run(self) -> dict:
        """What the staging folder's run.json holds while this driver owns it; every task checks
        it before writing (``check_owner``), and every marker names its key and run."""
        return {"key": self.key, "run_id": self.run_id, "attempt": self.attempt, "replaces": sorted(self.replaces)}

    @classmethod
    def open(cls, target: Folder, key: str) -> Staging:
        """Resume the staging folder of an earlier run with the same key, else start a fresh one.
        Either way this driver's attempt is written into run.json: tasks an earlier attempt left
        running find another attempt there and write nothing."""
        run = target.read_json(STAGING, "run.json")
        committed = target.read_json(SUCCESS) or {}  # the run that committed the output, if any
        if target.exists(STAGING) and (
            run is None or run.get("key") != key or run.get("run_id") == committed.get("run_id")
        ):
            why = (
                "left by a committed run"
                if run and run.get("key") == key
                else "made with other settings"
                if run
                else "left without its run.json"
            )
            log.warning("discarding %s (%s)", target.uri_of(STAGING), why)
            carried = staged_outputs(target) if run is None or run.get("run_id") != committed.get("run_id") else set()
            target.delete(STAGING)
            run = {"replaces": sorted(carried)} if carried else None  # its moved files are still ours to delete
        if not run or "run_id" not in run:
            replaces = set((run or {}).get("replaces", []))
            run_id = f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{uuid.uuid4().hex[:6]}"
            run = {"key": key, "run_id": run_id, "replaces": sorted(replaces)}
            target.make(STAGING, DONE)
        else:  # parts of files a killed run left unfinished: those files are tagged again
            target.delete(STAGING, PARTS)
        staging = cls(target, key, run["run_id"], uuid.uuid4().hex[:12], replaces=set(run.get("replaces", [])))
        target.write_json_atomic(staging.run, STAGING, "run.json")
        staging.names_done = {
            i.base_name[: -len(".json")] for i in target.list(STAGING, DONE) if i.base_name.endswith(".json")
        }
        return staging

    def record(self, marker: dict) -> None:
        """A marker a Ray task has just written (and returned)."""
        self.names_done.add(marker["output"])
        self.markers[marker["output"]] = marker

    def finished(self, f: InputFile) -> dict | None:
        """The file's marker if its output is complete, made from this same input by this run's
        staging, and its footer on storage holds the input's rows; else None (tag it again)."""
        if f.output_name not in self.names_done:
            return None
        if f.output_name not in self.markers:
            self.markers[f.output_name] = self.target.read_json(STAGING, DONE, f.output_name + ".json")
        marker = self.markers[f.output_name]
        if not marker_matches(marker, f, self.run):
            return None
        where = self.where(marker)
        return marker if where and staged_rows(self.target, where) == f.rows else None

    def where(self, marker: dict) -> str | None:
        """Where the marker's file is now: in the staging folder, or (after an interrupted
        commit's move) under its final name; None if neither."""
        if self.target.exists(STAGING, marker["staged"]):
            return f"{STAGING}/{marker['staged']}"
        if self.target.exists(STAGING, COMMITTING) and self.target.exists(marker["output"]):
            return marker["output"]
        return None

    def check_finished(self, files: list[InputFile], kept: dict[str, dict] | None = None) -> list[dict]:
        """Every file's marker (``kept``: files of the committed output reused as they are, by
        output name); fails loudly unless each file's footer, read back now, holds its rows."""
        kept = kept or {}

        def check(f: InputFile) -> tuple[dict | None, int | None]:
            if f.output_name in kept:
                return kept[f.output_name], staged_rows(self.target, f.output_name)
            marker = self.finished(f)
            seen = marker or self.markers.get(f.output_name)  # rows named in the error, if a file is there
            where = seen and seen.get("staged") and self.where(seen)
            return marker, where and staged_rows(self.target, where)

        with ThreadPoolExecutor(max_workers=16) as pool:  # one footer read per file
            checked = list(pool.map(check, files))
        wrong = [(f.uri, f.rows, rows) for f, (m, rows) in zip(files, checked) if not m or rows != f.rows]
        if wrong:
            raise RuntimeError(
                f"not committing {self.target.uri}: rows in != rows out for {len(wrong)} "
                f"file(s) (file, rows in, rows in its output file): {wrong[:5]}. Re-run to "
                "finish"
            )
        return [m for m, _ in checked]

    def commit(self, markers: list[dict], manifest: dict, previous: Committed | None) -> None:
        """Replace the folder's files with the staged ones (``markers``: one per output file,
        those reused from ``previous`` included); ``_SUCCESS`` last. Safe to repeat. The steps:
        ``commit.commit_staged``."""
        commit_staged(self.target, self.run_id, self.replaces, markers, manifest, previous)


def marker_matches(marker: dict | None, f: InputFile, run: dict) -> bool:
    """A marker written by this staging folder's run, for this same input."""
    return bool(marker) and (
        (marker.get("key"), marker.get("run_id")) == (run["key"], run["run_id"])
        and (
            marker.get("input"),
            marker.get("rows_in"),
            marker.get("input_bytes"),
            marker.get("input_fingerprint"),
            marker.get("input_mtime_ns"),
        )
        == f.identity
        and bool(marker.get("staged"))
    )


def check_owner(target: Folder, run: dict) -> None:
    """Raise unless the staging folder still belongs to ``run`` (a task of a run whose staging was
    discarded or committed by another run must write nothing)."""
    current = target.read_json(STAGING, "run.json") or {}
    if any(current.get(k) != run.get(k) for k in ("key", "run_id", "attempt")):
        raise RuntimeError(
            f"{target.uri_of(STAGING)} belongs to another run now ({current}, this task's: {run}); "
            "this run's work there is void"
        )


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
                raise RuntimeError(
                    f"{self.files[k].uri}: {self.received[k]} rows tagged, but the file "
                    f"has {self.files[k].rows}: rows were duplicated"
                )
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
            raise RuntimeError(
                f"the pipeline ended with files not fully tagged (file, rows tagged, "
                f"rows in): {short[:5]}; nothing was committed, re-run to finish"
            )


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
        with (
            staging.fs.open_output_stream(staging.path(PARTS, part)) as stream,
            pa.ipc.new_file(stream, schema) as writer,
        ):
            writer.write_table(rows)  # Arrow IPC: no encoding here, no decoding in the merge
        crash_point("part-written")
        reasons = {r["values"]: r["counts"] for r in pc.value_counts(rows.column("error").drop_null()).to_pylist()}
        for name, value in zip(PART_SCHEMA.names, (int(k), part, rows.num_rows, json.dumps(reasons))):
            report[name].append(value)
    return pa.table(report, schema=PART_SCHEMA)


def merge_parts(
    target_uri: str, f: InputFile, parts: list[str], reasons: dict[str, int], schema: pa.Schema, run: dict
) -> dict:
    """A Ray task: stream the reported ``parts`` of ``f`` (those only) into a new file of its own
    in the staging folder, in row groups of up to ROW_GROUP_ROWS; write its marker, delete the
    parts. A retry after the marker was written returns that marker. -> the marker."""
    target = Folder.from_uri(target_uri)
    check_owner(target, run)
    earlier = target.read_json(STAGING, DONE, f.output_name + ".json")
    if marker_matches(earlier, f, run) and staged_rows(target, f"{STAGING}/{earlier['staged']}") == f.rows:
        target.delete(STAGING, PARTS, f.output_name)  # a retry of this merge: its work is done
        return earlier
    staged = f"{f.output_name}.{uuid.uuid4().hex[:12]}"  # never a name a marker already names
    with pq.ParquetWriter(target.path(STAGING, staged), schema, filesystem=target.fs) as writer:
        buffer: list[pa.Table] = []
        for i, part in enumerate(parts):
            with target.fs.open_input_file(target.path(STAGING, PARTS, part)) as handle:
                buffer.append(pa.ipc.open_file(handle).read_all())
            if sum(t.num_rows for t in buffer) >= ROW_GROUP_ROWS or i == len(parts) - 1:
                writer.write_table(pa.concat_tables(buffer))
                buffer = []
                crash_point("merge-writing")
    crash_point("merge-written")
    marker = write_marker(target, f, reasons, staged, run)
    crash_point("marker-written")
    target.delete(STAGING, PARTS, f.output_name)
    crash_point("parts-deleted")
    return marker


def write_marker(target: Folder, f: InputFile, reasons: dict[str, int], staged: str, run: dict) -> dict:
    """Once ``f``'s output file ``staged`` is complete in the staging folder: its marker, with
    the rows its footer on storage holds (not as counted), the run it belongs to and the process
    that wrote it. -> the marker."""
    import ray

    written = pq.read_metadata(target.path(STAGING, staged), filesystem=target.fs)
    check_owner(target, run)
    node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    marker = {
        "key": run["key"],
        "run_id": run["run_id"],
        "attempt": run["attempt"],
        "input": f.uri,
        "input_bytes": f.bytes,
        "rows_in": f.rows,
        "input_fingerprint": f.fingerprint,
        "input_mtime_ns": f.mtime_ns,
        "rows_out": written.num_rows,
        "staged": staged,
        "output": f.output_name,
        "flagged": sum(reasons.values()),
        "reasons": dict(sorted(reasons.items())),
        "written_by": {"pid": os.getpid(), "node": node},
    }
    target.write_json_atomic(marker, STAGING, DONE, f.output_name + ".json")
    return marker  # an earlier attempt's file, if any, is left alone: the commit removes the staging folder
