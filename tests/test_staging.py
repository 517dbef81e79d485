"""The staging and commit protocol alone, without Ray: staged files, markers, resume and commit."""

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from emotions.storage import Folder
from emotions.tagging.commit import COMMITTING, DONE, FORMAT, MANIFEST, STAGING, SUCCESS, Committed, check_output
from emotions.tagging.inputs import FILE_COLUMN, InputFile
from emotions.tagging.settings import TaggingError
from emotions.tagging.staging import PARTS, PartLedger, Staging, merge_parts, write_parts

SCHEMA = pa.schema([("id", pa.string()), ("error", pa.string())])


def inputs(tmp_path, rows=(3, 2)) -> list[InputFile]:
    return [
        InputFile(
            uri=str(tmp_path / f"in-{k}.parquet"),
            path=str(tmp_path / f"in-{k}.parquet"),
            rows=n,
            bytes=100 + k,
            schema=SCHEMA,
        )
        for k, n in enumerate(rows)
    ]


def stage(staging: Staging, files: list[InputFile], only=None) -> None:
    """What the actors and merge tasks do: parts per batch, then one merge per finished file."""
    ledger = PartLedger(files)
    for k, f in enumerate(files):
        if only is not None and k not in only:
            continue
        ids = [f"{k}-{i}" for i in range(f.rows)]
        for batch in (ids[:1], ids[1:]):
            report = write_parts(
                pa.table({FILE_COLUMN: [k] * len(batch), "id": batch, "error": [None] * len(batch)}),
                staging.target.child(STAGING),
                [g.output_name for g in files],
                SCHEMA,
            )
            for j, parts, reasons in ledger.add(report):
                staging.record(merge_parts(staging.target.uri, files[j], parts, reasons, SCHEMA, staging.run))


def test_a_commit_moves_every_staged_file_and_writes_success_last(tmp_path):
    files, target = inputs(tmp_path), Folder.from_uri(tmp_path / "out")
    staging = Staging.open(target, key="k1")
    stage(staging, files)
    markers = staging.check_finished(files)
    assert [m["rows_out"] for m in markers] == [3, 2] and all(m["written_by"]["pid"] == os.getpid() for m in markers)
    assert all((m["key"], m["run_id"]) == ("k1", staging.run_id) for m in markers)  # whose marker it is
    staging.commit(markers, {"rows_out": 5}, None)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        [f.output_name for f in files] + [MANIFEST, SUCCESS]
    )  # no staging, no parts left
    assert target.read_json(SUCCESS) == {"format": FORMAT, "run_id": staging.run_id, "rows": 5}
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
    staged = staging.markers[files[0].output_name]["staged"]
    target.fs.move(target.path(STAGING, staged), target.path(files[0].output_name))  # ... moved one
    resumed = Staging.open(target, key="k1")
    markers = resumed.check_finished(files)  # the moved file still counts as finished
    previous = Committed("earlier", None, {"inputs": [{"output": "old-output.parquet"}]})
    resumed.commit(markers, {"rows_out": sum(m["rows_out"] for m in markers)}, previous)
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == sorted([f.output_name for f in files] + [MANIFEST, SUCCESS])  # the old file is gone
    assert Staging.open(target, key="k1").run_id != staging.run_id  # a committed run's staging is not reused
    assert not (tmp_path / "out" / STAGING / DONE).exists() or not any((tmp_path / "out" / STAGING / DONE).iterdir())


def test_a_merge_run_again_after_its_marker_never_empties_the_marked_file(tmp_path):
    """Ray retries a merge whose worker died after writing the marker (its parts are deleted by
    then): the retry must return the marker and leave the file whole, not truncate it."""
    files, target = inputs(tmp_path, rows=(3,)), Folder.from_uri(tmp_path / "out")
    staging = Staging.open(target, key="k1")
    stage(staging, files)
    marker = staging.markers[files[0].output_name]
    again = merge_parts(target.uri, files[0], ["gone/part-1.arrow"], {}, SCHEMA, staging.run)  # parts deleted
    assert again == marker
    assert pq.read_metadata(tmp_path / "out" / STAGING / marker["staged"]).num_rows == 3
    rerun = Staging.open(target, key="k1")
    assert rerun.finished(files[0]) == marker and rerun.check_finished(files) == [marker]


def test_a_marked_file_that_lost_its_rows_is_tagged_again_and_never_committed(tmp_path):
    files, target = inputs(tmp_path, rows=(3, 2)), Folder.from_uri(tmp_path / "out")
    staging = Staging.open(target, key="k1")
    stage(staging, files)
    emptied = tmp_path / "out" / STAGING / staging.markers[files[0].output_name]["staged"]
    pq.write_table(SCHEMA.empty_table(), emptied)  # what an old-style second merge left: 0 rows, marker intact
    rerun = Staging.open(target, key="k1")
    assert rerun.finished(files[0]) is None and rerun.finished(files[1]) is not None  # tagged again
    with pytest.raises(RuntimeError, match=r"rows in != rows out for 1 file.*in-0.parquet', 3, 0"):
        rerun.check_finished(files)
    assert not target.exists(SUCCESS)


def test_markers_of_another_run_or_other_settings_are_not_trusted(tmp_path):
    files, target = inputs(tmp_path, rows=(3,)), Folder.from_uri(tmp_path / "out")
    first = Staging.open(target, key="k1")
    stage(first, files)
    marker = first.markers[files[0].output_name]
    target.delete(STAGING, "run.json")  # another run's commit removed the staging folder's identity ...
    second = Staging.open(target, key="k1")  # ... and a new run started it again
    assert second.run_id != first.run_id
    target.write_json(marker, STAGING, DONE, files[0].output_name + ".json")  # the first run's late marker
    target.write_bytes(b"x", STAGING, marker["staged"])
    second.names_done.add(files[0].output_name)
    assert second.finished(files[0]) is None  # named another run: tagged again, never mixed in
    with pytest.raises(RuntimeError, match="belongs to another run"):  # and the late merge writes nothing
        merge_parts(target.uri, files[0], [], {}, SCHEMA, first.run)


def test_only_outputs_this_project_committed_are_ever_replaced(tmp_path):
    spark = tmp_path / "spark"
    spark.mkdir()
    (spark / "_SUCCESS").write_bytes(b"")  # Spark/Hadoop's committed output
    (spark / "part-00000.parquet").write_bytes(b"theirs")
    with pytest.raises(TaggingError, match="did not write"):
        check_output(Folder.from_uri(spark))
    files, target = inputs(tmp_path, rows=(3,)), Folder.from_uri(tmp_path / "ours")
    staging = Staging.open(target, key="k1")
    stage(staging, files)
    staging.commit(
        staging.check_finished(files),
        {"format": FORMAT, "run_id": staging.run_id, "rows_out": 3, "inputs": [{"output": files[0].output_name}]},
        None,
    )
    assert check_output(target).run_id == staging.run_id
    (tmp_path / "ours" / "notes.parquet").write_bytes(b"a user's file")
    with pytest.raises(TaggingError, match=r"did not write: \['notes.parquet'\]"):
        check_output(target)


def test_a_file_over_the_single_copy_limit_is_committed_in_parts_on_s3(s3, monkeypatch):
    """S3's CopyObject stops at 5 GiB: above storage.SINGLE_COPY_MAX the commit's move copies in
    parts (limits lowered here so a 6 MiB file takes that path)."""
    import boto3

    from emotions import storage

    monkeypatch.setattr(storage, "SINGLE_COPY_MAX", 1 << 20)
    monkeypatch.setattr(storage, "COPY_PART_BYTES", 5 << 20)  # S3's smallest part
    folder = Folder.from_uri(f"{s3}/big-commit")
    data = os.urandom(6 << 20)
    folder.write_bytes(data, STAGING, "big.parquet.0")
    storage.move_file(folder, f"{STAGING}/big.parquet.0", "big.parquet")
    assert folder.read_bytes("big.parquet") == data and not folder.exists(STAGING, "big.parquet.0")
    head = boto3.client("s3").head_object(Bucket="emo", Key="big-commit/big.parquet")
    assert head["ETag"].strip('"').endswith("-2")  # two parts


def test_tasks_of_an_earlier_driver_attempt_write_nothing_and_a_vanished_file_stops_the_commit(tmp_path):
    """A driver that lost its output keeps merge tasks running; after another driver resumed the
    staging, their writes must be refused, and a commit must never skip a file it cannot find."""
    files, target = inputs(tmp_path, rows=(3, 2)), Folder.from_uri(tmp_path / "out")
    first = Staging.open(target, key="k1")
    stage(first, files)
    second = Staging.open(target, key="k1")  # the same run, resumed by another driver attempt
    assert second.run_id == first.run_id and second.attempt != first.attempt
    with pytest.raises(RuntimeError, match="belongs to another run"):
        merge_parts(target.uri, files[0], [], {}, SCHEMA, first.run)  # the earlier attempt's late merge
    markers = second.check_finished(files)
    target.delete(STAGING, markers[1]["staged"])  # gone under the commit's feet
    with pytest.raises(RuntimeError, match="neither staged nor in place"):
        second.commit(markers, {"rows_out": 5}, None)
    assert not target.exists(SUCCESS)


def test_files_an_interrupted_commit_moved_in_are_deleted_even_when_its_staging_is_discarded(tmp_path):
    files, target = inputs(tmp_path, rows=(3, 2)), Folder.from_uri(tmp_path / "out")
    first = Staging.open(target, key="k1")
    stage(first, files)
    target.write_json({"run_id": first.run_id, "replaces": []}, STAGING, COMMITTING)  # the commit began ...
    moved = first.markers[files[1].output_name]
    target.fs.move(target.path(STAGING, moved["staged"]), target.path(files[1].output_name))  # ... moved one, died
    assert check_output(target) is None  # the moved file is known as ours
    other = Staging.open(target, key="k2")  # the next run has other settings (a new model) and one input
    stage(other, files[:1])
    other.commit(other.check_finished(files[:1]), {"rows_out": 3}, None)
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == sorted([files[0].output_name, MANIFEST, SUCCESS])  # the other input's file is gone


def test_an_input_rewritten_in_place_with_the_same_size_is_not_the_same_input(tmp_path):
    from emotions.tagging.inputs import inspect_inputs
    from emotions.tagging.reuse import check_committed
    from emotions.tagging.settings import TaggingSettings

    path = tmp_path / "in.parquet"
    pq.write_table(pa.table({"id": ["a", "b"], "body": ["good", "bad!"]}), path)
    settings = TaggingSettings(model="m", output=str(tmp_path / "out"))
    fs = Folder.from_uri(tmp_path).fs
    (before,), _ = inspect_inputs(fs, [(str(path), str(path))], settings)
    pq.write_table(pa.table({"id": ["a", "b"], "body": ["bad!", "good"]}), path)  # corrected, same size
    os.utime(path, ns=(before.mtime_ns + 10**9, before.mtime_ns + 10**9))  # a second later (same footer stats)
    (after,), _ = inspect_inputs(fs, [(str(path), str(path))], settings)
    assert (after.bytes, after.rows) == (before.bytes, before.rows) and after.identity != before.identity
    marker = {
        "key": "k",
        "run_id": "r",
        "input": before.uri,
        "rows_in": 2,
        "input_bytes": before.bytes,
        "input_fingerprint": before.fingerprint,
        "input_mtime_ns": before.mtime_ns,
        "staged": "x",
    }
    from emotions.tagging.staging import marker_matches

    assert marker_matches(marker, before, {"key": "k", "run_id": "r"})
    assert not marker_matches(marker, after, {"key": "k", "run_id": "r"})  # resumed from stale tags: never
    entry = {
        "path": before.uri,
        "rows": 2,
        "bytes": before.bytes,
        "fingerprint": before.fingerprint,
        "mtime_ns": before.mtime_ns,
        "output": before.output_name,
        "rows_out": 2,
        "flagged": 0,
    }
    previous = Committed("r", "k", {"inputs": [entry], "skipped_files": []})
    target = Folder.from_uri(tmp_path / "out")
    with pytest.raises(TaggingError, match=r"from other inputs \(0 new, 1 changed, 0 removed\)"):
        check_committed(target, previous, "k", [after], [], overwrite=False)
    with pytest.raises(TaggingError, match="missing or do not hold their rows"):  # unchanged, but its file is gone
        check_committed(target, previous, "k", [before], [], overwrite=False)
    assert check_committed(target, previous, "k", [before], [], overwrite=True, force=True) is None  # re-tag
