"""The committed output folder: its names, whether it is ours, and the commit that replaces it.

    OUTPUT/_lease/                  one writer at a time (emotions.leases)
    OUTPUT/_staging/                the run being staged (emotions.tagging.staging)
    OUTPUT/_staging/_COMMITTING     the commit may have begun; names what it replaces
    OUTPUT/<name>                   one output file per input file
    OUTPUT/_manifest.json           the run: settings, inputs, rows, timings
    OUTPUT/_SUCCESS                 written last: the output is complete

The commit (``commit_staged``): ``_COMMITTING``, the previous ``_SUCCESS`` removed, every staged
file moved to its final name (a rename locally; on object stores a copy, multipart above 5 GiB,
then a delete), then the previous output's other files deleted, ``_manifest.json``,
``_SUCCESS``. Until the moves are done, the previous output's other files are still there; an
output without ``_SUCCESS`` is never complete, and a re-run finishes an interrupted commit. Only
what this project wrote is ever deleted: an output folder is replaced only if its ``_SUCCESS``
and manifest are this project's (``check_output``), and a file there that the previous manifest
does not name is refused by name rather than deleted. (The manifest's name starts with ``_``
because pyarrow, pandas and Spark read every other file in a folder as Parquet.) Row order
within a file is not kept; join on the id column.

Nothing here needs Ray. ``crash_point(step)`` marks each place the driver can die while
committing (``crashpoints.STEPS``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from emotions.storage import Folder, move_file
from emotions.tagging.crashpoints import crash_point
from emotions.tagging.settings import TaggingError

log = logging.getLogger("emotions.tagging")

FORMAT = "emotions-tagging"
STAGING = "_staging"  # inside OUTPUT; the leading _ hides it from Parquet/Hive readers
LEASE = "_lease"  # inside OUTPUT: the lease of the run writing it (one writer per output)
DONE = "_done"  # per-file markers inside the staging folder
COMMITTING = "_COMMITTING"  # written once every file is staged; the commit may have begun
SUCCESS = "_SUCCESS"
MANIFEST = "_manifest.json"  # _-prefixed: pd.read_parquet(OUTPUT) and Spark skip it
REPORT_MD, REPORT_JSON, REPORT_PLOTS = "_report.md", "_report.json", "_report"  # emotions.tagging.report's
REPORT_FILES = (REPORT_MD, REPORT_JSON, REPORT_PLOTS)  # beside a committed output


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
    ours = (
        success is not None
        and "run_id" in success
        and manifest is not None
        and manifest.get("format") == FORMAT
        and manifest.get("run_id") == success["run_id"]
    )
    if not ours:
        raise TaggingError(
            f"output {target.uri} holds a {SUCCESS} that `emotions tag` did not write (another "
            f"tool's committed output, e.g. Spark's empty {SUCCESS}); it is never replaced: "
            "choose another output folder"
        )
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
        raise TaggingError(
            f"output {target.uri} holds files `emotions tag` did not write: {foreign[:5]}; "
            "they would be mixed into the tagged output. Move them elsewhere, or choose "
            "another output folder"
        )
    if foreign:
        raise TaggingError(
            f"output {target.uri} exists, is not empty and was not written by "
            f"`emotions tag` (found {foreign[:5]}); choose a new or empty "
            "folder, since the commit replaces the folder's files"
        )
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


def commit_staged(
    target: Folder, run_id: str, carried: set[str], markers: list[dict], manifest: dict, previous: Committed | None
) -> None:
    """Replace the folder's files with the staged ones of run ``run_id`` (``markers``: one per
    output file, those reused from ``previous`` included; ``carried``: files of ours a
    discarded staging folder may have left); ``_SUCCESS`` last. Safe to repeat."""
    t, fs = target, target.fs
    names = {m["output"] for m in markers}
    # What the commit replaces, kept where a re-run finds it: once _SUCCESS is gone, the
    # previous output is no longer "committed", but its files must still go.
    began = t.read_json(STAGING, COMMITTING) or {}
    manifest_there = t.read_json(MANIFEST) or {}  # committed or not: its files are ours
    replaces = (
        set(began.get("replaces", []))
        | (previous.outputs if previous else set())
        | carried
        | staged_outputs(t)
        | (
            {i.get("output") for i in manifest_there.get("inputs", [])}
            if manifest_there.get("format") == FORMAT
            else set()
        )
    )
    replaces.discard(None)
    began = {"run_id": run_id, "replaces": sorted(replaces)}
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
            raise RuntimeError(
                f"not committing {t.uri}: {m['output']} is neither staged nor in place with "
                f"its {m['rows_out']} rows (another run changed the output); re-run to tag "
                "it again"
            )
    crash_point("files-moved")
    old = replaces | set(REPORT_FILES)  # the manifest is not deleted: the new one replaces it
    for info in t.list():  # the previous output's files this commit does not keep
        if info.base_name in old and info.base_name not in names:
            t.delete(info.base_name)
            crash_point("old-deleted")
    t.write_json_atomic(manifest, MANIFEST)
    crash_point("manifest-written")
    success = {"format": FORMAT, "run_id": run_id, "rows": manifest["rows_out"]}
    t.write_json_atomic(success, SUCCESS)
    crash_point("success-written")
    t.delete(STAGING)
    crash_point("staging-removed")
    log.info("committed %s (%d files)", t.uri, len(names))
