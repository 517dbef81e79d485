"""The staging and commit protocol alone, without Ray: staged files, markers, resume and commit."""

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from emotions.storage import Folder
from emotions.tagging.inputs import FILE_COLUMN, InputFile
from emotions.tagging.staging import (COMMITTING, DONE, MANIFEST, PARTS, STAGING, SUCCESS, PartLedger, Staging,
                                      merge_parts, write_parts)  # fmt: skip

SCHEMA = pa.schema([("id", pa.string()), ("error", pa.string())])


def inputs(tmp_path, rows=(3, 2)) -> list[InputFile]:
    return [InputFile(uri=str(tmp_path / f"in-{k}.parquet"), path=str(tmp_path / f"in-{k}.parquet"), rows=n,
                      bytes=100 + k, schema=SCHEMA) for k, n in enumerate(rows)]  # fmt: skip


def stage(staging: Staging, files: list[InputFile], only=None) -> None:
    """What the actors and merge tasks do: parts per batch, then one merge per finished file."""
    ledger = PartLedger(files)
    for k, f in enumerate(files):
        if only is not None and k not in only:
            continue
        ids = [f"{k}-{i}" for i in range(f.rows)]
        for batch in (ids[:1], ids[1:]):
            report = write_parts(pa.table({FILE_COLUMN: [k] * len(batch), "id": batch, "error": [None] * len(batch)}),
                                 staging.target.child(STAGING), [g.output_name for g in files], SCHEMA)  # fmt: skip
            for j, parts, reasons in ledger.add(report):
                staging.record(merge_parts(staging.target.uri, files[j], parts, reasons, SCHEMA))


def test_a_commit_moves_every_staged_file_and_writes_success_last(tmp_path):
    files, target = inputs(tmp_path), Folder.from_uri(tmp_path / "out")
    staging = Staging.open(target, key="k1")
    stage(staging, files)
    markers = staging.check_finished(files)
    assert [m["rows_out"] for m in markers] == [3, 2] and all(m["written_by"]["pid"] == os.getpid() for m in markers)
    staging.commit([f.output_name for f in files], {"rows_out": 5})
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        [f.output_name for f in files] + [MANIFEST, SUCCESS])  # no staging, no parts left
    assert target.read_json(SUCCESS) == {"run_id": staging.run_id, "rows": 5}
    assert pq.read_table(tmp_path / "out" / files[0].output_name).column("id").to_pylist() == ["0-0", "0-1", "0-2"]


def test_rows_in_must_equal_rows_out_or_nothing_is_committed(tmp_path):
    files, target = inputs(tmp_path), Folder.from_uri(tmp_path / "out")
    staging = Staging.open(target, key="k1")
    stage(staging, files, only={0})
    with pytest.raises(RuntimeError, match="rows in != rows out for 1 file"):
        staging.check_finished(files)
    assert not target.exists(SUCCESS)


def test_a_rerun_resumes_finished_files_and_drops_unfinished_parts(tmp_path):
    files, target = inputs(tmp_path), Folder.from_uri(tmp_path / "out")
    first = Staging.open(target, key="k1")
    stage(first, files, only={0})
    stray = tmp_path / "out" / STAGING / PARTS / files[1].output_name / "part-left.arrow"  # a killed run's part
    stray.parent.mkdir(parents=True)
    stray.write_bytes(b"half")
    again = Staging.open(target, key="k1")
    assert again.run_id == first.run_id and not stray.exists()
    assert again.finished(files[0]) is not None and again.finished(files[1]) is None
    changed = InputFile(**{**vars(files[0]), "bytes": 999})  # the input was rewritten since
    assert again.finished(changed) is None
    other = Staging.open(target, key="k2")  # other settings: nothing of the old run is reused
    assert other.run_id != first.run_id and other.finished(files[0]) is None


def test_an_interrupted_commit_finishes_when_repeated(tmp_path):
    files, target = inputs(tmp_path), Folder.from_uri(tmp_path / "out")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old-output.parquet").write_bytes(b"from an earlier commit")
    staging = Staging.open(target, key="k1")
    stage(staging, files)
    target.write_json({"run_id": staging.run_id}, STAGING, COMMITTING)  # the commit began ...
    target.fs.move(target.path(STAGING, files[0].output_name), target.path(files[0].output_name))  # ... moved one
    resumed = Staging.open(target, key="k1")
    markers = resumed.check_finished(files)  # the moved file still counts as finished
    resumed.commit([f.output_name for f in files], {"rows_out": sum(m["rows_out"] for m in markers)})
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == sorted([f.output_name for f in files] + [MANIFEST, SUCCESS])  # the old file is gone
    assert Staging.open(target, key="k1").run_id != staging.run_id  # a committed run's staging is not reused
    assert not (tmp_path / "out" / STAGING / DONE).exists() or not any((tmp_path / "out" / STAGING / DONE).iterdir())
