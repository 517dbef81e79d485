"""The staging and commit protocol: every input row in the output exactly once, or no commit.

    OUTPUT/_lease/                       one writer at a time (emotions.leases)
    OUTPUT/_staging/run.json             {key, run_id}: the settings and the run staging belongs to
    OUTPUT/_staging/parts/<name>/part-<uuid>.arrow       tagged rows, one batch of one input file
    OUTPUT/_staging/<name>.<uuid>                        a merged output file, unique per attempt
    OUTPUT/_staging/_done/<name>.json    its marker: key, run_id, input, rows, the staged file
    OUTPUT/_staging/_COMMITTING          the commit may have begun
    OUTPUT/<name>, _manifest.json, _SUCCESS              the committed output, _SUCCESS last

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

The commit (``commit``): ``_COMMITTING``, the previous ``_SUCCESS`` removed, every staged file
moved to its final name (a rename locally; on object stores a copy, multipart above 5 GiB, then a
delete), then the previous output's other files deleted, ``_manifest.json``, ``_SUCCESS``. Until
the moves are done, the previous output's other files are still there; an output without
``_SUCCESS`` is never complete, and a re-run finishes an interrupted commit. Only what this
project wrote is ever deleted: an output folder is replaced only if its ``_SUCCESS`` and manifest
are this project's (``check_output``), and a file there that the previous manifest does not name
is refused by name rather than deleted. (The manifest's name starts with ``_`` because pyarrow,
pandas and Spark read every other file in a folder as Parquet.) Row order within a file is not
kept; join on the id column.

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
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from emotions.storage import Folder, move_file
from emotions.tagging.crashpoints import crash_point
from emotions.tagging.inputs import FILE_COLUMN, InputFile
from emotions.tagging.settings import TaggingError

log = logging.getLogger("emotions.tagging")


FORMAT = "emotions-tagging"
STAGING = "_staging"  # inside OUTPUT; the leading _ hides it from Parquet/Hive readers
LEASE = "_lease"  # inside OUTPUT: the lease of the run writing it (one writer per output)
DONE = "_done"  # per-file markers inside the staging folder
COMMITTING = "_COMMITTING"  # written once every file is staged; the commit may have begun
SUCCESS = "_SUCCESS"
MANIFEST = "_manifest.json"  # _-prefixed: pd.read_parquet(OUTPUT) and Spark skip it
REPORT_FILES = ("_report.md", "_report.json", "_report")  # emotions.report's, beside a committed output
ROW_GROUP_ROWS = 65_536  # rows buffered per output file before a row group is written
PARTS = "parts"  # inside the staging folder: parts/<output name>/part-<uuid>.arrow
PART_SCHEMA = pa.schema([(FILE_COLUMN, pa.int32()), ("part", pa.string()), ("rows", pa.int64()),
                         ("reasons", pa.string())])  # reasons: JSON {reason: rows}  # fmt: skip


@dataclass(frozen=True)
class Committed:
    """A committed output of this project, as its ``_SUCCESS`` and manifest describe it."""

    run_id: str
    key: str | None  # None for outputs committed before keys were recorded
    manifest: dict

    @property
    def outputs(self) -> set[str]:
        return {i["output"] for i in self.manifest.get("inputs", [])}


def read_committed(target: Folder) -> Committed | None:
    """The output's commit if ``_SUCCESS`` is there and this project wrote it; None if there is
    no ``_SUCCESS``. Raises TaggingError for another tool's ``_SUCCESS`` (Spark and Hadoop
    write an empty one): that folder is never ours to replace."""
    if not target.exists(SUCCESS):
        return None
    success, manifest = target.read_json(SUCCESS), target.read_json(MANIFEST)
    ours = (success is not None and "run_id" in success and manifest is not None
            and manifest.get("format") == FORMAT and manifest.get("run_id") == success["run_id"])  # fmt: skip
    if not ours:
        raise TaggingError(f"output {target.uri} holds a {SUCCESS} that `emotions tag` did not write (another "
                           f"tool's committed output, e.g. Spark's empty {SUCCESS}); it is never replaced: "
                           "choose another output folder")  # fmt: skip
    return Committed(success["run_id"], manifest.get("key"), manifest)


def check_output(target: Folder) -> Committed | None:
    """Refuse a file, and a folder that holds anything this project did not write (another
    tool's ``_SUCCESS``, a user's files beside a committed output). -> the folder's commit, if
    it has one; the caller decides whether a committed output may be replaced."""
    info = target.fs.get_file_info(target.root)
    if info.type == pafs.FileType.File:
        raise TaggingError(f"output {target.uri} is a file; name a folder for the tagged Parquet files")
    if info.type == pafs.FileType.NotFound:
        return None
    committed = read_committed(target)
    names = {i.base_name for i in target.list()}
    manifest = target.read_json(MANIFEST) or {}
    outputs = {i.get("output") for i in manifest.get("inputs", [])} if manifest.get("format") == FORMAT else set()
    staged = staged_outputs(target)  # an interrupted commit's files, and what it replaces
    foreign = sorted(names - {STAGING, LEASE, SUCCESS, MANIFEST, *REPORT_FILES, *outputs, *staged})
    if foreign and (committed or outputs or STAGING in names):
        raise TaggingError(f"output {target.uri} holds files `emotions tag` did not write: {foreign[:5]}; "
                           "they would be mixed into the tagged output. Move them elsewhere, or choose "
                           "another output folder")  # fmt: skip
    if foreign:
        raise TaggingError(f"output {target.uri} exists, is not empty and was not written by "
                           f"`emotions tag` (found {foreign[:5]}); choose a new or empty "
                           "folder, since the commit replaces the folder's files")  # fmt: skip
    return committed


def staged_outputs(target: Folder) -> set[str]:
    """Output names a staging folder may have moved into OUTPUT (an interrupted commit): those
    its markers name, what its commit said it replaces, and what its run.json carries."""
    names = {i.base_name[: -len(".json")] for i in target.list(STAGING, DONE) if i.base_name.endswith(".json")}
    names |= set((target.read_json(STAGING, COMMITTING) or {}).get("replaces", []))
    return names | set((target.read_json(STAGING, "run.json") or {}).get("replaces", []))


def staged_rows(target: Folder, name: str) -> int | None:
    """Rows in the footer of ``name`` (a path inside ``target``), or None if it is missing or
    not a whole Parquet file."""
    try:
        return pq.read_metadata(target.path(name), filesystem=target.fs).num_rows
    except (OSError, pa.ArrowInvalid):
        return None


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
        if target.exists(STAGING) and (run is None or run.get("key") != key
                                       or run.get("run_id") == committed.get("run_id")):  # fmt: skip
            why = ("left by a committed run" if run and run.get("key") == key else
                   "made with other settings" if run else "left without its run.json")  # fmt: skip
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
        staging.names_done = {i.base_name[: -len(".json")] for i in target.list(STAGING, DONE)
                              if i.base_name.endswith(".json")}  # fmt: skip
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
            raise RuntimeError(f"not committing {self.target.uri}: rows in != rows out for {len(wrong)} "
                               f"file(s) (file, rows in, rows in its output file): {wrong[:5]}. Re-run to "
                               "finish")  # fmt: skip
        return [m for m, _ in checked]

    def commit(self, markers: list[dict], manifest: dict, previous: Committed | None) -> None:
        """Replace the folder's files with the staged ones (``markers``: one per output file,
        those reused from ``previous`` included); ``_SUCCESS`` last. Safe to repeat."""
        t, fs = self.target, self.target.fs
        names = {m["output"] for m in markers}
        # What the commit replaces, kept where a re-run finds it: once _SUCCESS is gone, the
        # previous output is no longer "committed", but its files must still go.
        began = t.read_json(STAGING, COMMITTING) or {}
        manifest_there = t.read_json(MANIFEST) or {}  # committed or not: its files are ours
        replaces = (set(began.get("replaces", [])) | (previous.outputs if previous else set()) | self.replaces
                    | staged_outputs(t) | ({i.get("output") for i in manifest_there.get("inputs", [])}
                                          if manifest_there.get("format") == FORMAT else set()))  # fmt: skip
        replaces.discard(None)
        began = {"run_id": self.run_id, "replaces": sorted(replaces)}
        t.write_json_atomic(began, STAGING, COMMITTING)
        crash_point("commit-begun")
        if t.exists(SUCCESS):  # first, so no reader takes a half-replaced folder for complete
            fs.delete_file(t.path(SUCCESS))
            crash_point("success-removed")
        for m in markers:
            if "staged" in m and t.exists(STAGING, m["staged"]):  # not moved yet, not reused
                move_file(t, f"{STAGING}/{m['staged']}", m["output"])
                crash_point("file-moved")
            elif staged_rows(t, m["output"]) != m["rows_out"]:  # moved (or kept) files hold their rows
                raise RuntimeError(f"not committing {t.uri}: {m['output']} is neither staged nor in place with "
                                   f"its {m['rows_out']} rows (another run changed the output); re-run to tag "
                                   "it again")  # fmt: skip
        crash_point("files-moved")
        old = replaces | set(REPORT_FILES)  # the manifest is not deleted: the new one replaces it
        for info in t.list():  # the previous output's files this commit does not keep
            if info.base_name in old and info.base_name not in names:
                t.delete(info.base_name)
                crash_point("old-deleted")
        t.write_json_atomic(manifest, MANIFEST)
        crash_point("manifest-written")
        success = {"format": FORMAT, "run_id": self.run_id, "rows": manifest["rows_out"]}
        t.write_json_atomic(success, SUCCESS)
        crash_point("success-written")
        t.delete(STAGING)
        crash_point("staging-removed")
        log.info("committed %s (%d files)", t.uri, len(names))


def marker_matches(marker: dict | None, f: InputFile, run: dict) -> bool:
    """A marker written by this staging folder's run, for this same input."""
    return bool(marker) and (
        (marker.get("key"), marker.get("run_id")) == (run["key"], run["run_id"])
        and (marker.get("input"), marker.get("rows_in"), marker.get("input_bytes"),
             marker.get("input_fingerprint"), marker.get("input_mtime_ns")) == f.identity
        and bool(marker.get("staged"))
    )  # fmt: skip


def check_owner(target: Folder, run: dict) -> None:
    """Raise unless the staging folder still belongs to ``run`` (a task of a run whose staging was
    discarded or committed by another run must write nothing)."""
    current = target.read_json(STAGING, "run.json") or {}
    if any(current.get(k) != run.get(k) for k in ("key", "run_id", "attempt")):
        raise RuntimeError(f"{target.uri_of(STAGING)} belongs to another run now ({current}, this task's: {run}); "
                           "this run's work there is void")  # fmt: skip


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
        crash_point("part-written")
        reasons = {r["values"]: r["counts"] for r in pc.value_counts(rows.column("error").drop_null()).to_pylist()}
        for name, value in zip(PART_SCHEMA.names, (int(k), part, rows.num_rows, json.dumps(reasons))):
            report[name].append(value)
    return pa.table(report, schema=PART_SCHEMA)



def merge_parts(target_uri: str, f: InputFile, parts: list[str], reasons: dict[str, int],
                schema: pa.Schema, run: dict) -> dict:  # fmt: skip
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
    marker = {"key": run["key"], "run_id": run["run_id"], "attempt": run["attempt"], "input": f.uri, "input_bytes": f.bytes, "rows_in": f.rows,
              "input_fingerprint": f.fingerprint, "input_mtime_ns": f.mtime_ns, "rows_out": written.num_rows,
              "staged": staged, "output": f.output_name, "flagged": sum(reasons.values()),
              "reasons": dict(sorted(reasons.items())), "written_by": {"pid": os.getpid(), "node": node}}  # fmt: skip
    target.write_json_atomic(marker, STAGING, DONE, f.output_name + ".json")
    return marker  # an earlier attempt's file, if any, is left alone: the commit removes the staging folder
