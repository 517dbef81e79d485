"""Crash points: a tagging run dies at each step where a process can die, then runs again.

For every step in ``crashpoints.STEPS``, on a local folder and on the moto S3 server: an output
committed earlier from other inputs is being replaced (``--overwrite``), so the commit's deletes
run too. The process that reaches the step dies there (``os._exit``): a worker (Ray retries its
task or restarts the actor, and the run goes on) or the driver (a real `emotions tag` process,
killed; the same command then runs again). Then, for every step:

- rows out == rows in, no id twice, and the output equals a clean run's (same files, same rows,
  same tags), with nothing left of the earlier output;
- a second re-run changes nothing (every file, marker and manifest as it was).

CI runs a sample of the steps (``SAMPLE``) and leaves out the two-nightly-runs race (marked
``slow``); this runs every step on both storages and the race, which is how the table in
docs/reliability.md was made:

    EMOTIONS_CRASH_POINTS=all python -m pytest tests/test_crashes.py -q -m "slow or not slow"
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset
import pyarrow.parquet as pq
import pytest

from emotions.storage import Folder
from emotions.tagging import tag_corpus
from emotions.tagging.crashpoints import CRASH_EXIT, CRASH_FILE, STEPS

DRIVER_STEPS = {step for step, where in STEPS if where.startswith("driver")}
SAMPLE = {  # CI's share: a merge run twice after its marker; a driver killed mid-commit on S3
    "local": {"marker-written"},
    "s3": {"file-moved"},
}
ALL = os.environ.get("EMOTIONS_CRASH_POINTS") == "all"
OPTIONS = {"num_actors": 1, "batch_size": 16, "precision": "fp32", "report": False}
COMPARED = ["id", "emotions", "top_emotion", "ekman", "sentiment", "error"]
TABLE: list[tuple[str, str, str, str]] = []  # (storage, step, what died, outcome): printed at the end


def write_dump(folder: Folder, files: dict[str, int]) -> None:
    for name, rows in files.items():
        body = [("[deleted]" if i % 9 == 4 else f"comment {i} of {name}: I love it, thanks!") for i in range(rows)]
        sink = pa.BufferOutputStream()
        pq.write_table(pa.table({"id": [f"{name}-{i}" for i in range(rows)], "body": body}), sink, row_group_size=32)
        folder.write_bytes(sink.getvalue().to_pybytes(), f"{name}.parquet")


def read_output(folder: Folder) -> pa.Table:
    table = pyarrow.dataset.dataset(folder.root, filesystem=folder.fs, format="parquet").to_table()
    return table.select(COMPARED).sort_by("id")


def listing(folder: Folder) -> dict[str, tuple]:
    """Every object under the folder with its size and time: what 'changes nothing' compares."""
    from pyarrow.fs import FileSelector, FileType

    infos = folder.fs.get_file_info(FileSelector(folder.root, recursive=True, allow_not_found=True))
    return {i.path: (i.size, i.mtime_ns) for i in infos if i.type == FileType.File}


@pytest.fixture(scope="module")
def crash_file() -> Path:
    path = Path(os.environ[CRASH_FILE])  # set by conftest before Ray started: every worker has it
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def local_world(smoke_bundle, local_ray, tmp_path_factory) -> str:
    """On a local folder: the dump, an earlier committed output of other inputs, a clean run's."""
    root = str(tmp_path_factory.mktemp("crash"))
    write_dump(Folder.from_uri(f"{root}/dump"), {"a": 70, "b": 45, "c": 20})
    write_dump(Folder.from_uri(f"{root}/old-dump"), {"old": 30})
    tag_corpus(smoke_bundle, f"{root}/old-dump", f"{root}/previous", **OPTIONS)
    assert tag_corpus(smoke_bundle, f"{root}/dump", f"{root}/clean", **OPTIONS).rows_out == 135
    return root


@pytest.fixture(scope="module")
def world(request, local_world):
    """Per storage: (kind, root, the dump, a clean run's rows). On S3, the local dump and earlier
    output are copied there (the clean rows do not depend on where they are stored)."""
    if not ALL and not SAMPLE[request.param]:
        pytest.skip("no crash point of this storage in CI's sample")
    root = local_world
    if request.param == "s3":
        root = f"{request.getfixturevalue('s3')}/crash-{time.time_ns()}"
        for name in ("dump", "previous"):
            copy_folder(f"{local_world}/{name}", f"{root}/{name}")
    return request.param, root, Folder.from_uri(f"{root}/dump"), read_output(Folder.from_uri(f"{local_world}/clean"))


def copy_folder(source: str, target: str) -> None:
    src, dst = Folder.from_uri(source), Folder.from_uri(target)
    if dst.is_local:
        dst.make()
    pyarrow.fs.copy_files(src.root, dst.root, source_filesystem=src.fs, destination_filesystem=dst.fs)


@pytest.mark.parametrize("step", [step for step, _ in STEPS])
@pytest.mark.parametrize("world", ["local", "s3"], indirect=True)
def test_a_run_killed_at_any_step_is_finished_exactly_once_by_the_next(
    world, step, crash_file, smoke_bundle, local_ray
):
    kind, root, dump, clean = world
    if not ALL and step not in SAMPLE[kind]:
        pytest.skip("outside CI's sample of crash points: EMOTIONS_CRASH_POINTS=all runs every one")
    out = Folder.from_uri(f"{root}/out-{step}")
    copy_folder(f"{root}/previous", out.uri)  # replacing an earlier commit: its files must go
    crash_file.write_text(step)
    if step in DRIVER_STEPS:  # the driver dies: a real `emotions tag` process, killed at the step
        command = [
            sys.executable,
            "-m",
            "emotions.cli",
            "tag",
            "--model",
            str(smoke_bundle),
            "--input",
            dump.uri,
            "--output",
            out.uri,
            "--overwrite",
            "--actors",
            "1",
            "--batch-size",
            "16",
            "--precision",
            "fp32",
            "--no-report",
            "--ray-address",
            local_ray.get_runtime_context().gcs_address,
        ]
        driver = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert driver.returncode == CRASH_EXIT, driver.stderr[-3000:]
        died, first = "driver", "killed; the same command again finished it"
        summary = tag_corpus(smoke_bundle, dump.uri, out.uri, overwrite=True, **OPTIONS)  # the same, again
    else:  # a worker dies: Ray runs its task again, and the run goes on
        died = "worker"
        try:
            summary = tag_corpus(smoke_bundle, dump.uri, out.uri, overwrite=True, **OPTIONS)
            first = "Ray ran its task again; the run finished"
        except Exception as error:  # noqa: BLE001 - whatever stopped it, the re-run must finish
            first = f"the run failed ({type(error).__name__}); the same command again finished it"
            summary = tag_corpus(smoke_bundle, dump.uri, out.uri, overwrite=True, **OPTIONS)
    assert not crash_file.exists(), f"the run never reached {step}"
    crash_file.with_name(crash_file.name + ".fired").unlink()

    table = read_output(out)
    ids = table.column("id").to_pylist()
    assert summary.rows_in == summary.rows_out == len(ids) == len(set(ids)) == 135
    assert table.equals(clean), "the output differs from a clean run's"
    assert pc.sum(pc.starts_with(table.column("id"), "old-")).as_py() == 0  # the earlier output is gone
    assert not out.exists("_staging")
    before = listing(out)
    again = tag_corpus(smoke_bundle, dump.uri, out.uri, **OPTIONS)
    assert again.unchanged and listing(out) == before  # a second re-run changes nothing
    TABLE.append((kind, step, died, f"{first}: 135/135 rows, equal to a clean run; a further run: no change"))


# ----------------------------------------------------------------------------- concurrent runs


def test_a_run_on_an_output_whose_lease_another_run_holds_is_refused_by_name(smoke_bundle, tmp_path):
    """One writer per output: while another run holds the output's lease, `emotions tag` refuses
    before touching anything, and names the holder."""
    from emotions.leases import Lease, new_owner
    from emotions.tagging import TaggingError

    dump, out = tmp_path / "dump", tmp_path / "out"
    write_dump(Folder.from_uri(dump), {"a": 20})
    writer = Lease(Folder.from_uri(out).child("_lease"), "output", new_owner(), ttl_s=60)
    assert writer.acquire()
    with pytest.raises(TaggingError, match=f"being written by another run \\({writer.owner}"):
        tag_corpus(smoke_bundle, dump, out, **OPTIONS)
    assert sorted(p.name for p in out.iterdir()) == ["_lease"]  # nothing staged, nothing deleted


@pytest.mark.slow  # 20 s: a real second process; python -m pytest -m slow
def test_a_second_run_on_an_output_being_written_is_refused_with_the_holders_name(smoke_bundle, local_ray, tmp_path):
    """Two `emotions tag` runs on one output: one writes, the other is refused while it does
    (naming it) and never touches its staging; the writer's output is exactly once."""
    from emotions.corpus import make_corpus
    from emotions.tagging import TaggingError

    dump, out = tmp_path / "dump", tmp_path / "out"
    make_corpus(dump, rows=240, files=3, seed=11)
    command = [
        sys.executable,
        "-m",
        "emotions.cli",
        "tag",
        "--model",
        str(smoke_bundle),
        "--input",
        str(dump),
        "--output",
        str(out),
        "--actors",
        "1",
        "--batch-size",
        "16",
        "--no-report",
        "--ray-address",
        local_ray.get_runtime_context().gcs_address,
    ]
    log = tmp_path / "writer.log"
    writer = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log.open("w"))
    deadline = time.monotonic() + 120
    while not list((out / "_staging" / "parts").glob("*/part-*")) and writer.poll() is None:
        assert time.monotonic() < deadline, log.read_text()[-2000:]
        time.sleep(0.05)  # the writer holds the lease and is tagging
    staged = sorted(p.name for p in (out / "_staging").rglob("*"))
    with pytest.raises(TaggingError, match=rf"being written by another run \(\S+-{writer.pid}-"):
        tag_corpus(smoke_bundle, dump, out, num_actors=1, report=False)
    assert set(staged) <= {p.name for p in (out / "_staging").rglob("*")} or writer.poll() is not None
    assert writer.wait(timeout=300) == 0, log.read_text()[-2000:]
    table = pyarrow.dataset.dataset(str(out), format="parquet").to_table()
    ids = table.column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 240
    TABLE.append(("local", "two `emotions tag` on one output", "-", "second refused, naming the writer; 240/240 rows"))


@pytest.mark.slow  # a minute: two drivers, each with a Ray of its own; python -m pytest -m slow
def test_two_nightly_runs_one_killed_mid_commit_leave_every_date_exactly_once(smoke_bundle, s3, crash_file, local_ray):
    """Two `tag_nightly` jobs at once on the same dates on S3, each with its own Ray (as each
    RayJob brings its own cluster), racing with real leases; the first to reach a commit's first
    move dies there. The survivor (or, if the dead run's lease was still live at its re-check,
    the next night) finishes that date from the dead run's staging; nothing lost, nothing twice."""
    from emotions.nightly import tag_nightly

    root = f"{s3}/nightly-race-{time.time_ns()}"
    days = ["2026-03-01", "2026-03-02"]
    for k, day in enumerate(days):
        dump = Folder.from_uri(f"{root}/dumps/dt={day}")
        write_dump(dump, {f"d{k}": 40})
        dump.write_bytes(b"", "_SUCCESS")  # the producer's "complete"
    inputs, output = f"{root}/dumps/dt={{date}}/", f"{root}/tagged/dt={{date}}/"
    crash_file.write_text("file-moved")
    command = [
        sys.executable,
        str(Path(__file__).resolve().parents[1] / "jobs" / "tag_nightly.py"),
        "--model",
        str(smoke_bundle),
        "--input",
        inputs,
        "--output",
        output,
        "--until",
        days[-1],
        "--actors",
        "1",
        "--batch-size",
        "16",
        "--precision",
        "fp32",
        "--no-report",
        "--lease-ttl",
        "8",
        "--lease-settle",
        "1",
    ]
    env = {**os.environ, "RAY_ADDRESS": "local"}  # a Ray of its own per run
    runs = [
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        for _ in range(2)
    ]
    outputs = [run.communicate(timeout=420)[0] for run in runs]
    codes = sorted(run.returncode for run in runs)
    assert CRASH_EXIT in codes and not crash_file.exists(), outputs  # one died mid-commit
    crash_file.with_name(crash_file.name + ".fired").unlink()
    survivor = outputs[[run.returncode for run in runs].index(min(codes))]
    assert min(codes) == 0, survivor[-3000:]
    finished_by_survivor = sum(f"tagged {day}" in survivor for day in days)
    report = tag_nightly(
        str(smoke_bundle), [inputs], output, until=days[-1], num_actors=1, batch_size=16, precision="fp32", report=False
    )  # the next night: finishes what is left
    assert report.ok and not report.failed
    for k, day in enumerate(days):
        out = Folder.from_uri(output.replace("{date}", day))
        table = read_output(out)
        ids = table.column("id").to_pylist()
        assert len(ids) == len(set(ids)) == 40 and all(i.startswith(f"d{k}-") for i in ids)
        assert out.read_json("_SUCCESS")["rows"] == 40 and not out.exists("_staging")
    before = {day: listing(Folder.from_uri(output.replace("{date}", day))) for day in days}
    again = tag_nightly(str(smoke_bundle), [inputs], output, until=days[-1], num_actors=1, report=False)
    assert (
        not again.committed and {day: listing(Folder.from_uri(output.replace("{date}", day))) for day in days} == before
    )
    TABLE.append(
        (
            "s3",
            "two tag_nightly runs, one killed at file-moved",
            "driver",
            f"the survivor tagged {finished_by_survivor} of 2 dates (the dead run's from its staging), "
            f"the next night {2 - finished_by_survivor}; 40/40 rows each, a further run: no change",
        )
    )


def test_zz_print_the_crash_table(capsys):
    """The table of crash points this session covered (shown with -rA, and in the log)."""
    lines = ["storage | step | process that died | outcome", "---|---|---|---"]
    lines += [" | ".join(row) for row in TABLE]
    with capsys.disabled():
        print("\n\nCrash points covered:\n" + "\n".join(lines))
