"""The nightly run over many nights: which dates it tags (ready, re-opened, set aside), the
lease that keeps runs apart, and the real tagging of tiny date partitions on the session's local
Ray with the smoke bundle.

Leases are tested on a local folder and on the moto S3 server (both create-if-absent: a hard link,
a PUT with If-None-Match), and on pyarrow's in-memory mock filesystem, which has none (the
write-wait-read protocol), with real threads racing for a date and a real process killed while it
holds one. The nightly logic (readiness, re-opening, failures, a lease lost before the commit) runs
with a stand-in tagger that commits a tiny output the way tag_corpus does; one test re-opens a
date with real tagging.
"""

from __future__ import annotations

import datetime as dt
import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from emotions.leases import CREATE_IF_ABSENT, WRITE_WAIT_READ, Lease
from emotions.nightly import (
    FAILURES,
    LEASES,
    DateLease,
    DateTemplate,
    NightlyError,
    new_owner,
    plan_dates,
    tag_nightly,
)
from emotions.nightly.run import StopTime, parse_duration, parse_stop_by, resolve_stop
from emotions.storage import Folder
from emotions.tagging import tag_corpus

TEXTS = ["I love this so much", "why would you do that", "thanks, that helps", "[deleted]"]


def write_dump(root: str, date: str, rows: int = 8, part: str = "part-0", ready: bool = True) -> None:
    """One day's dump: a Parquet file with ``rows`` comments under root/dt=DATE/, then (``ready``)
    the producer's _SUCCESS, as Spark writes it: empty, last."""
    folder = Folder.from_uri(root).child(f"dt={date}")
    body = (TEXTS * rows)[:rows]
    table = pa.table({"id": [f"{date}-{part}-{i}" for i in range(rows)], "body": body})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    folder.write_bytes(sink.getvalue().to_pybytes(), f"{part}.parquet")
    if ready:
        folder.write_bytes(b"", "_SUCCESS")


def commit_marker(root: str, date: str) -> None:
    """What an earlier night's commit leaves that matters to the search: _SUCCESS."""
    Folder.from_uri(root).child(f"dt={date}").write_json({"run_id": "earlier-night"}, "_SUCCESS")


def snapshot(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*"))}


def storage_root(kind: str, tmp_path: Path, request) -> str:
    if kind == "local":
        return str(tmp_path)
    return f"{request.getfixturevalue('s3')}/nightly/{tmp_path.name}"


# ----------------------------------------------------------------------------- which dates


def test_templates_name_the_partition_folder_and_refuse_what_cannot_be_searched():
    from emotions import nightly, tagging

    assert nightly.SUCCESS == tagging.SUCCESS  # what "committed" means is tagging's marker
    t = DateTemplate.parse("s3://b/dumps/dt={date}/", "--input")
    assert t.parent == "s3://b/dumps" and t.fill("2026-11-25") == "s3://b/dumps/dt=2026-11-25/"
    assert t.entry.match("dt=2026-11-25") and not t.entry.match("dt=2026-11-25.tmp")
    assert DateTemplate.parse("dumps/{date}.parquet", "--input").entry.match("2026-11-25.parquet")
    for bad, why in [
        ("s3://b/dumps/", "has no {date}"),
        ("s3://{date}/x", "inside a folder"),
        ("dumps/dt={date}*/", "plain text"),
    ]:
        with pytest.raises(NightlyError, match=why):
            DateTemplate.parse(bad, "--input")


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_dates_are_found_oldest_first_without_the_committed_the_empty_and_today(kind, tmp_path, request):
    root = storage_root(kind, tmp_path, request)
    for date in ["2026-01-03", "2026-01-01", "2026-01-02", "2026-01-05", "2026-01-09"]:
        write_dump(f"{root}/dumps", date, rows=2)
    Folder.from_uri(f"{root}/dumps").child("dt=2026-01-04").make()  # a partition still empty
    Folder.from_uri(f"{root}/dumps").child("dt=2026-01-04").write_bytes(b"", "_started")
    Folder.from_uri(f"{root}/dumps").child("dt=2026-02-30").write_bytes(b"x", "a.parquet")  # not a date
    Folder.from_uri(f"{root}/dumps").child("dt=latest").write_bytes(b"x", "a.parquet")
    commit_marker(f"{root}/tagged", "2026-01-02")
    Folder.from_uri(f"{root}/tagged").child("dt=2026-01-03", "_staging").write_bytes(b"{}", "run.json")

    inputs = [DateTemplate.parse(f"{root}/dumps/dt={{date}}/", "--input")]
    output = DateTemplate.parse(f"{root}/tagged/dt={{date}}/", "--output")
    plan = plan_dates(inputs, output, until="2026-01-08")  # 2026-01-09 is "today": not yet
    assert plan.pending == ["2026-01-01", "2026-01-03", "2026-01-05"]  # a half-done date is pending
    assert plan.committed == ["2026-01-02"]
    assert [d for d, _ in plan.no_dump] == ["2026-01-04"] and "no Parquet files" in plan.no_dump[0][1]
    assert plan_dates(inputs, output, since="2026-01-03", until="2026-01-09").pending == [
        "2026-01-03",
        "2026-01-05",
        "2026-01-09",
    ]


# ----------------------------------------------------------------------------- leases


def lease_folder(kind: str, tmp_path: Path, request) -> Folder:
    """A leases folder on a local disk, on S3 (both create-if-absent), or on pyarrow's in-memory
    mock filesystem (none: write-wait-read); one Folder object shares the mock's memory."""
    if kind == "mock":
        folder = Folder.from_uri("mock:///tagged").child(LEASES)
        folder.make()  # like a disk, the mock needs folders before files
        return folder
    return Folder.from_uri(storage_root(kind, tmp_path, request)).child(LEASES)


@pytest.mark.parametrize("kind", ["local", "s3", "mock"])
def test_runs_racing_for_a_date_leave_exactly_one_holder(kind, tmp_path, request):
    folder = lease_folder(kind, tmp_path, request)
    for race in range(2):
        start, held = threading.Barrier(4), []
        leases = [DateLease(folder, f"2026-01-0{race + 1}", new_owner(), ttl_s=30, settle_s=0.3) for _ in range(4)]

        def run(lease: DateLease, late_s: float, start=start, held=held) -> None:
            start.wait()
            time.sleep(late_s)  # the later runs find claims already written, some still settling
            if lease.acquire():
                held.append(lease)

        threads = [threading.Thread(target=run, args=(lease, 0.03 * i)) for i, lease in enumerate(leases)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        assert len(held) == 1, f"race {race}: {len(held)} runs hold the date"
        assert held[0].protocol == (WRITE_WAIT_READ if kind == "mock" else CREATE_IF_ABSENT)
        losers = [lease for lease in leases if lease is not held[0]]
        assert all(lease.holder and lease.holder.owner == held[0].owner for lease in losers)
        assert [c.owner for c in held[0].claims()] == [held[0].owner]  # the losers withdrew their claims
        assert not losers[0].acquire()  # still held: a later run skips the date
        held[0].release()
        assert losers[0].acquire()  # released: the next run gets it
        losers[0].release()


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_where_the_store_can_create_if_absent_acquiring_needs_no_settle_wait(kind, tmp_path, request):
    folder = lease_folder(kind, tmp_path, request)
    lease = DateLease(folder, "2026-01-01", new_owner(), ttl_s=30, settle_s=60)
    started = time.monotonic()
    assert lease.acquire() and time.monotonic() - started < 5, "acquire waited for the settle time"
    assert lease.protocol == CREATE_IF_ABSENT and lease.name == "2026-01-01.0000000001.json"
    rival = DateLease(folder, "2026-01-01", new_owner(), ttl_s=30, settle_s=60)
    started = time.monotonic()
    assert not rival.acquire() and rival.holder.owner == lease.owner and time.monotonic() - started < 5
    assert lease.renew()
    lease.release()

    # Racers with no settle time at all: exactly one creates the next generation, every time.
    for race in range(4):
        start, held = threading.Barrier(6), []
        racers = [Lease(folder, "2026-01-02", new_owner(), ttl_s=30, settle_s=0) for _ in range(6)]

        def run(lease: Lease, start=start, held=held) -> None:
            start.wait()
            if lease.acquire():
                held.append(lease)

        threads = [threading.Thread(target=run, args=(lease,)) for lease in racers]
        [t.start() for t in threads]
        [t.join() for t in threads]
        assert len(held) == 1, f"race {race}: {len(held)} runs hold the date"
        assert all(r.holder.owner == held[0].owner for r in racers if r is not held[0])
        held[0].release()

    # tagging's one-writer-per-output lock: the same lease, named "output", beside the output.
    output = Folder.from_uri(storage_root(kind, tmp_path, request)).child("tagged", "dt=2026-01-01")
    writer, other = (Lease(output.child("_lease"), "output", new_owner(), ttl_s=30) for _ in range(2))
    assert writer.acquire() and not other.acquire() and other.holder.owner == writer.owner
    with writer.held():
        assert [c.name for c in writer.claims()] == ["output.0000000001.json"]
    assert other.acquire()
    other.release()


KILLED_RUN = """
import sys, time
from emotions.nightly import DateLease
from emotions.storage import Folder
from emotions.tagging import tag_corpus
lease = DateLease(Folder.from_uri(sys.argv[1]), "2026-01-01", "killed-run", ttl_s=1.0, settle_s=0.1)
assert lease.acquire()
with lease.held():
    print("held", flush=True)
    time.sleep(600)
"""


def test_the_expired_lease_of_a_killed_run_is_taken_over(s3, tmp_path):
    folder = Folder.from_uri(f"{s3}/nightly/{tmp_path.name}").child(LEASES)
    run = subprocess.Popen([sys.executable, "-c", KILLED_RUN, folder.uri], stdout=subprocess.PIPE, text=True)
    try:
        assert run.stdout.readline().strip() == "held"
        time.sleep(0.4)  # past a heartbeat: the lease is renewed while the run lives
    finally:
        run.send_signal(signal.SIGKILL)
        run.wait()
    killed_at = time.monotonic()
    lease = DateLease(folder, "2026-01-01", new_owner(), ttl_s=30, settle_s=0.3)
    assert not lease.acquire() and lease.holder.owner == "killed-run"  # not expired yet
    while time.monotonic() - killed_at < 1.1:
        time.sleep(0.1)
    assert lease.acquire(), "the lease of the killed run did not expire"
    assert [c.owner for c in lease.claims()] == [lease.owner]  # the dead run's claim is gone
    lease.release()


@pytest.mark.parametrize("kind", ["local", "mock"])
def test_a_stalled_run_learns_it_lost_its_lease(kind, tmp_path, request):
    folder = lease_folder(kind, tmp_path, request)
    stalled = DateLease(folder, "2026-01-01", "stalled", ttl_s=0.5, settle_s=0.05)
    assert stalled.acquire()
    time.sleep(0.6)  # no heartbeat: the lease expires
    other = DateLease(folder, "2026-01-01", "other", ttl_s=30, settle_s=0.05)
    assert other.acquire()
    assert not stalled.renew(), "a run whose lease was taken over must not think it still holds it"
    assert other.renew()


# ----------------------------------------------------------------------------- tagging, night after night


def run_job(argv: list[str], capsys) -> tuple[int, str]:
    """`emotions nightly ARGV` (what jobs/tag_nightly.py runs), in this process (it joins the
    session's local Ray)."""
    from emotions.cli import main

    code = main(["nightly", *argv])
    return code, capsys.readouterr().out


def test_dates_missed_in_the_middle_are_tagged_by_the_next_run_and_a_rerun_changes_nothing(
    smoke_bundle, local_ray, tmp_path, capsys
):
    dumps, tagged = tmp_path / "dumps", tmp_path / "tagged"
    days = ["2026-01-01", "2026-01-02", "2026-01-03", "2026-01-04"]
    for day in days:
        write_dump(str(dumps), day)
    for day in (days[0], days[3]):  # nights 1 and 4 ran; the operator was down on nights 2 and 3
        commit_marker(str(tagged), day)
    before = snapshot(tagged)
    argv = [
        "--model",
        str(smoke_bundle),
        "--input",
        f"{dumps}/dt={{date}}/",
        "--output",
        f"{tagged}/dt={{date}}/",
        "--actors",
        "1",
        "--lease-settle",
        "0.3",
        "--no-report",
    ]

    code, out = run_job(argv, capsys)  # the next night
    assert code == 0, out
    assert [line.split(":")[0] for line in out.splitlines() if line.startswith("tagged ")] == [
        "tagged 2026-01-02",
        "tagged 2026-01-03",
    ]
    assert "2 already committed" in out
    assert {k: v for k, v in snapshot(tagged).items() if k in before} == before  # nights 1 and 4 untouched
    for day in days[1:3]:
        manifest = json.loads((tagged / f"dt={day}" / "_manifest.json").read_text())
        assert manifest["rows_in"] == manifest["rows_out"] == 8 and manifest["rows_flagged"] == 2
        assert manifest["inputs"][0]["path"] == f"{dumps}/dt={day}/part-0.parquet"

    everything = snapshot(tagged)
    for again in (argv, [*argv, "--date", days[1]]):  # the whole root again, and one committed date
        code, out = run_job(again, capsys)
        assert code == 0, out
        assert "tagged 0 date(s), 0 failed, " in out
    assert snapshot(tagged) == everything  # nothing rewritten, no lease left behind
    now = time.time()  # released claims stay as expired tombstones (generation numbers are never reused)
    assert all(json.loads(p.read_text())["expires"] <= now for p in (tagged / LEASES).glob("*.json"))


def test_two_runs_started_together_commit_each_date_exactly_once(smoke_bundle, local_ray, tmp_path):
    dumps, tagged = tmp_path / "dumps", tmp_path / "tagged"
    days = ["2026-02-01", "2026-02-02"]
    for day in days:
        write_dump(str(dumps), day)
    start, reports = threading.Barrier(2), {}
    fast = dict(settle_s=0.3, lease_ttl_s=3)  # defaults 5 s and 10 min; a skipped date is re-checked after 3 s
    # On Kubernetes each run brings its own Ray cluster. Here both share the session's 2 CPUs, and
    # two pipelines at once would each reserve a CPU for its actor, leaving none for either's read
    # tasks: the runs race for dates freely, and take turns only inside tag_corpus.
    one_pipeline = threading.Lock()

    def tag_in_turn(*args, **kwargs):
        with one_pipeline:
            return tag_corpus(*args, **kwargs)

    def night(name: str) -> None:  # what KubeRay does after an outage: several runs at once
        start.wait()
        reports[name] = tag_nightly(
            str(smoke_bundle),
            [f"{dumps}/dt={{date}}/"],
            f"{tagged}/dt={{date}}/",
            owner=name,
            num_actors=1,
            report=False,
            tagger=tag_in_turn,
            **fast,
        )

    threads = [threading.Thread(target=night, args=(name,)) for name in ("run-a", "run-b")]
    [t.start() for t in threads]
    [t.join() for t in threads]
    committed = {name: [d for d, _ in r.committed] for name, r in reports.items()}
    assert sorted(committed["run-a"] + committed["run-b"]) == days, committed  # each date once
    assert all(r.ok and not r.lost for r in reports.values())
    for day in days:
        manifest = json.loads((tagged / f"dt={day}" / "_manifest.json").read_text())
        success = json.loads((tagged / f"dt={day}" / "_SUCCESS").read_text())
        assert manifest["rows_in"] == manifest["rows_out"] == 8 and success["run_id"] == manifest["run_id"]
    skipped = [d for r in reports.values() for d in r.already + [d for d, _ in r.leased]]
    assert set(skipped) <= set(days)  # the other run saw each date leased or already committed


def test_a_nights_report_is_compared_with_the_committed_nights_before_it(tmp_path):
    from emotions.nightly import earlier_nights

    days = [f"2026-02-{d:02d}" for d in range(1, 12)]
    for day in days:
        if day != "2026-02-09":  # a night that never committed is no baseline
            commit_marker(str(tmp_path), day)
    output = DateTemplate.parse(f"{tmp_path}/dt={{date}}/", "--output")
    assert earlier_nights(output, "2026-02-11") == [
        f"{tmp_path}/dt={d}/"
        for d in ("2026-02-03", "2026-02-04", "2026-02-05", "2026-02-06", "2026-02-07", "2026-02-08", "2026-02-10")
    ]
    assert earlier_nights(output, "2026-02-01") == []  # the first night has none


def test_each_night_writes_its_report_against_the_nights_before(smoke_bundle, local_ray, tmp_path):
    dumps, tagged = tmp_path / "dumps", tmp_path / "tagged"
    for day in ("2026-03-01", "2026-03-02"):
        write_dump(str(dumps), day)
    report = tag_nightly(
        str(smoke_bundle), [f"{dumps}/dt={{date}}/"], f"{tagged}/dt={{date}}/", num_actors=1, settle_s=0.1
    )  # the report is on by default
    assert [d for d, _ in report.committed] == ["2026-03-01", "2026-03-02"]
    first, second = (
        json.loads((tagged / f"dt={d}" / "_report.json").read_text()) for d in ("2026-03-01", "2026-03-02")
    )
    assert first["baselines"] == [] and [b["output"] for b in second["baselines"]] == [f"{tagged}/dt=2026-03-01"]


# ----------------------------------------------------------------------------- ready, re-opened, set aside


class StandInTagger:
    """``tag_corpus`` for tests of the nightly logic: commits a tiny output the way it does (the
    inputs' paths and sizes in ``_manifest.json``, then ``_SUCCESS``), after ``before_commit``.
    Dates in ``failing`` raise. ``calls``: (date folder name, overwrite) per call."""

    def __init__(self, failing=()):
        self.failing, self.calls, self.on_tag = set(failing), [], None

    def __call__(self, model, inputs, output, *, overwrite=False, keep_unchanged=False, before_commit=None, **options):
        from types import SimpleNamespace

        from emotions.tagging import TaggingError, resolve_inputs

        target = Folder.from_uri(output)
        overwrite = overwrite or keep_unchanged  # either replaces a committed output
        self.calls.append((Path(target.root).name, overwrite))
        if target.exists("_SUCCESS") and not overwrite:
            raise TaggingError(f"{output} is committed")
        if any(day in output for day in self.failing):
            raise RuntimeError(f"the dump of {output} is damaged")
        if self.on_tag:
            self.on_tag(output)
        fs, paths = resolve_inputs(inputs)
        files = [
            {"path": uri, "rows": 1, "bytes": fs.get_file_info(path).size, "output": Path(path).name}
            for path, uri in paths
        ]
        if before_commit:
            before_commit()
        target.write_json({"inputs": files, "rows_in": len(files), "rows_out": len(files)}, "_manifest.json")
        target.write_json({"run_id": "stand-in"}, "_SUCCESS")
        return SimpleNamespace(line=lambda: f"{len(files)} files -> {output}", report=None)


def nightly(root: Path, tagger, **options):
    return tag_nightly(
        "no-model",
        [f"{root}/dumps/dt={{date}}/"],
        f"{root}/tagged/dt={{date}}/",
        tagger=tagger,
        until="2026-12-31",
        settle_s=0.05,
        report=False,
        **options,
    )


def test_a_date_is_tagged_only_once_its_dump_is_ready(tmp_path, capsys):
    write_dump(f"{tmp_path}/dumps", "2026-04-01")
    write_dump(f"{tmp_path}/dumps", "2026-04-02", ready=False)  # the producer is still writing it
    tagger = StandInTagger()
    report = nightly(tmp_path, tagger)
    assert [d for d, _ in report.committed] == ["2026-04-01"] and report.ok
    assert [d for d, _ in report.waiting] == ["2026-04-02"] and "no _SUCCESS in" in report.waiting[0][1]
    assert "waiting 2026-04-02: no _SUCCESS in" in "\n".join(report.lines())
    assert nightly(tmp_path, tagger, min_age_s=3600).waiting[0][0] == "2026-04-02"

    Folder.from_uri(f"{tmp_path}/dumps/dt=2026-04-02").write_bytes(b"", "_SUCCESS")  # the producer is done
    report = nightly(tmp_path, tagger, min_age_s=3600)  # ...but wrote the last file a moment ago
    assert not report.committed and "tagged once it is 3600 s old (--min-age)" in report.waiting[0][1]
    report = nightly(tmp_path, tagger)
    assert [d for d, _ in report.committed] == ["2026-04-02"] and not report.waiting
    assert [name for name, _ in tagger.calls] == ["dt=2026-04-01", "dt=2026-04-02"]

    write_dump(f"{tmp_path}/dumps", "2026-04-03", ready=False)  # a producer that writes no marker
    argv = [
        "--model",
        "no-model",
        "--input",
        f"{tmp_path}/dumps/dt={{date}}/",
        "--output",
        f"{tmp_path}/tagged/dt={{date}}/",
        "--until",
        "2026-12-31",
        "--dry-run",
    ]
    code, out = run_job(argv, capsys)
    assert code == 0 and "waiting 2026-04-03: no _SUCCESS" in out and "1 waiting" in out, out
    code, out = run_job([*argv, "--ready-marker", ""], capsys)
    assert code == 0 and "would tag 2026-04-03" in out and "--ready-marker" not in out.split("emotions tag")[1], out


def test_a_committed_date_whose_dump_changed_is_reopened_and_an_unchanged_one_is_left_alone(tmp_path):
    for day in ("2026-05-01", "2026-05-02"):
        write_dump(f"{tmp_path}/dumps", day)
    commit_marker(f"{tmp_path}/tagged", "2026-04-30")  # committed without a manifest: nothing to compare
    write_dump(f"{tmp_path}/dumps", "2026-04-30")
    tagger = StandInTagger()
    assert [d for d, _ in nightly(tmp_path, tagger).committed] == ["2026-05-01", "2026-05-02"]

    tagger.calls.clear()
    again = nightly(tmp_path, tagger)  # the same night again: nothing changed, nothing to do
    assert tagger.calls == [] and not again.committed and not again.reopened
    assert sorted(again.already) == ["2026-04-30", "2026-05-01", "2026-05-02"]

    write_dump(f"{tmp_path}/dumps", "2026-05-01", part="part-1", rows=3)  # a file that came late
    write_dump(f"{tmp_path}/dumps", "2026-05-02", rows=5)  # a file rewritten, smaller
    report = nightly(tmp_path, tagger)
    assert report.reopened == [
        ("2026-05-01", "1 new file, 0 changed, 0 removed"),
        ("2026-05-02", "0 new files, 1 changed, 0 removed"),
    ]
    assert tagger.calls == [("dt=2026-05-01", True), ("dt=2026-05-02", True)]  # tagged again, overwriting
    assert "re-opened 2026-05-01: 1 new file, 0 changed, 0 removed" in report.lines()
    assert "2 re-opened" in report.lines()[-1] and report.already == ["2026-04-30"]

    Folder.from_uri(f"{tmp_path}/dumps/dt=2026-05-01").delete("part-1.parquet")
    report = nightly(tmp_path, tagger, dry_run=True)
    assert report.planned == ["2026-05-01"] and report.reopened == [("2026-05-01", "0 new files, 0 changed, 1 removed")]
    assert "would re-open 2026-05-01: 0 new files, 0 changed, 1 removed" in report.lines()

    Folder.from_uri(f"{tmp_path}/dumps/dt=2026-05-01").delete("_SUCCESS")  # the producer is rewriting it
    report = nightly(tmp_path, tagger)
    assert not report.committed and report.waiting[0][0] == "2026-05-01"
    assert report.waiting[0][1].startswith(
        "inputs changed since the commit (0 new files, 0 changed, 1 removed), but no _SUCCESS"
    )


def test_dates_failing_night_after_night_are_set_aside_and_new_nights_go_on(tmp_path):
    old = ["2026-06-01", "2026-06-02"]
    for day in [*old, "2026-06-03"]:
        write_dump(f"{tmp_path}/dumps", day)
    tagger = StandInTagger(failing=old)
    options = dict(max_dates=2, set_aside_after=2)
    for _ in (1, 2):  # the two old dates use up the budget: the new night waits
        report = nightly(tmp_path, tagger, **options)
        assert [d for d, _ in report.failed] == old and report.deferred == ["2026-06-03"] and not report.ok
    assert "set aside" in report.failed[0][1]
    record = json.loads((tmp_path / "tagged" / FAILURES / "2026-06-01.json").read_text())
    assert record["failures"] == 2 and "RuntimeError: the dump of" in record["reason"]

    write_dump(f"{tmp_path}/dumps", "2026-06-04")
    report = nightly(tmp_path, tagger, **options)  # set aside: new nights first, the old ones not tried
    assert [d for d, _ in report.committed] == ["2026-06-03", "2026-06-04"] and report.ok
    assert [d for d, _ in report.set_aside] == old and "failed on 2 runs in a row" in report.set_aside[0][1]
    assert any(line.startswith("set aside 2026-06-01: failed on 2 runs in a row") for line in report.lines())

    tagger.failing = {"2026-06-01"}  # 2026-06-02's dump was repaired
    write_dump(f"{tmp_path}/dumps", "2026-06-05")
    report = nightly(tmp_path, tagger, set_aside_retry_s=0, **options)  # due: retried after the new night
    assert [d for d, _ in report.committed] == ["2026-06-05"] and [d for d, _ in report.failed] == ["2026-06-01"]
    assert report.deferred == ["2026-06-02"]  # a failed retry counts, but only after the new night
    report = nightly(tmp_path, tagger, set_aside_retry_s=0, **options)
    assert [d for d, _ in report.committed] == ["2026-06-02"] and [d for d, _ in report.failed] == ["2026-06-01"]
    assert not (tmp_path / "tagged" / FAILURES / "2026-06-02.json").exists()  # a success clears the record
    assert json.loads((tmp_path / "tagged" / FAILURES / "2026-06-01.json").read_text())["failures"] == 4


def test_a_run_that_lost_its_lease_before_the_commit_commits_nothing(tmp_path):
    write_dump(f"{tmp_path}/dumps", "2026-07-01")
    leases = Folder.from_uri(f"{tmp_path}/tagged").child(LEASES)
    rival = Lease(leases, "2026-07-01", "rival", ttl_s=30)

    def stall_and_be_taken_over(output: str) -> None:
        """This run stalls past its lease's expiry while tagging; a rival takes the date over."""
        mine = json.loads(leases.read_bytes("2026-07-01.0000000001.json"))
        leases.write_json({**mine, "expires": time.time() - 1}, "2026-07-01.0000000001.json")
        assert rival.acquire()

    tagger = StandInTagger()
    tagger.on_tag = stall_and_be_taken_over
    report = nightly(tmp_path, tagger, lease_ttl_s=30, owner="stalled")
    assert report.lost == ["2026-07-01"] and not report.committed and report.ok
    assert not (tmp_path / "tagged" / "dt=2026-07-01" / "_SUCCESS").exists()  # nothing committed
    assert not (tmp_path / "tagged" / FAILURES).exists()  # not a failure of the date: the rival tags it
    assert [c.owner for c in rival.claims()] == ["rival"]  # the lost run left the rival's lease alone
    assert "lease lost before the commit, not committed" in "\n".join(report.lines())


# ----------------------------------------------------------------------------- a wall-clock stop


def utc(text: str) -> float:
    return dt.datetime.fromisoformat(text).replace(tzinfo=dt.timezone.utc).timestamp()


def nightly_argv(root: Path, *extra: str) -> list[str]:
    return [
        "--model",
        "no-model",
        "--input",
        f"{root}/dumps/dt={{date}}/",
        "--output",
        f"{root}/tagged/dt={{date}}/",
        "--until",
        "2026-12-31",
        *extra,
    ]


def test_a_run_that_starts_after_its_stop_tags_nothing_and_exits_0(tmp_path, capsys):
    """A RayJob retry that starts after --stop-by: nothing tagged, the dates left for the next
    night, exit 0 (so KubeRay does not retry again)."""
    for day in ("2026-09-01", "2026-09-02"):
        write_dump(f"{tmp_path}/dumps", day)
    code, out = run_job(nightly_argv(tmp_path, "--stop-by", "2026-01-01T06:00Z"), capsys)
    assert code == 0, out
    assert (
        "left for the next run, out of time (no date is started after 2026-01-01 06:00:00 UTC "
        "(--stop-by 2026-01-01T06:00Z)): 2026-09-01, 2026-09-02" in out
    ), out
    assert "nightly: tagged 0 date(s), 0 failed" in out and "2 out of time" in out
    assert not (tmp_path / "tagged").exists()  # no lease taken, nothing staged

    code, out = run_job(nightly_argv(tmp_path, "--stop-after", "5h", "--stop-by", "2026-01-01T07:00+01:00"), capsys)
    assert code == 0 and "(--stop-by 2026-01-01T07:00+01:00)): 2026-09-01, 2026-09-02" in out, out  # the earlier
    code, out = run_job(nightly_argv(tmp_path, "--stop-by", "2026-01-01T06:00", "--dry-run"), capsys)
    assert code == 0 and "would tag 2026" not in out and "would tag 0 date(s)" in out and "2 out of time" in out, out


def test_a_stop_that_passes_while_a_date_is_tagged_commits_it_and_leaves_the_rest(tmp_path):
    days = ["2026-10-01", "2026-10-02", "2026-10-03"]
    for day in days:
        write_dump(f"{tmp_path}/dumps", day)
    now = [utc("2026-10-04T05:30")]
    tagger = StandInTagger()
    tagger.on_tag = lambda output: now.__setitem__(0, now[0] + 3600)  # a date takes an hour
    stop = StopTime(utc("2026-10-04T06:00"), "--stop-by 06:00")
    report = nightly(tmp_path, tagger, stop=stop, clock=lambda: now[0])
    assert [d for d, _ in report.committed] == days[:1] and report.out_of_time == days[1:] and report.ok
    assert (tmp_path / "tagged" / "dt=2026-10-01" / "_SUCCESS").exists()  # the date in hand is finished
    assert not (tmp_path / "tagged" / "dt=2026-10-02").exists()  # the others are not started
    assert (
        "left for the next run, out of time (no date is started after 2026-10-04 06:00:00 UTC "
        "(--stop-by 06:00)): 2026-10-02, 2026-10-03" in report.lines()
    )
    assert report.lines()[-1].endswith(", 2 out of time") and not report.deferred

    tagger.failing = {days[1]}  # a failure before the stop: the run goes on, and exits 1
    now[0] = utc("2026-10-05T04:30")
    report = nightly(tmp_path, tagger, stop=StopTime(utc("2026-10-05T06:00")), clock=lambda: now[0])
    assert [d for d, _ in report.failed] == days[1:2] and [d for d, _ in report.committed] == days[2:]
    assert not report.out_of_time and not report.ok


def test_stop_flags_read_the_same_instant_on_every_attempt_and_refuse_bad_values(tmp_path, capsys):
    """--stop-by HH:MM is the occurrence within 12 h of the start, so a night's retries share it;
    --stop-after counts from the start; with both, the earlier wins."""
    night = utc("2026-12-08T06:00")
    for start in ("2026-12-08T02:30", "2026-12-08T08:00", "2026-12-08T17:59", "2026-12-07T23:30"):
        assert parse_stop_by("06:00", utc(start)) == night, start
    assert parse_stop_by("06:00", utc("2026-12-08T18:30")) == night + 86400  # the next night's
    assert parse_stop_by("2026-12-08T06:00Z", 0) == parse_stop_by("2026-12-08T07:00+01:00", 0) == night
    assert parse_stop_by("2026-12-08T06:00", 0) == night  # no offset: UTC
    assert [parse_duration(t) for t in ("5h", "90m", "3600s", "1.5h")] == [18000, 5400, 3600, 5400]

    start = utc("2026-12-08T02:30")
    assert resolve_stop("06:00", "5h", start) == StopTime(night, "--stop-by 06:00")
    assert resolve_stop("06:00", "90m", start) == StopTime(start + 5400, "--stop-after 90m")
    assert resolve_stop(None, None, start) is None
    with pytest.raises(NightlyError, match="--stop-after '5' is not a duration"):
        resolve_stop(None, "5", start)

    from emotions.cli import main

    for flag, value, message in [
        ("--stop-by", "6am", "'6am' is not a time: give HH:MM in UTC (e.g. 06:00) or an ISO date-time"),
        ("--stop-by", "24:00", "'24:00' is not a time of day: give HH:MM from 00:00 to 23:59"),
        ("--stop-by", "2026-12-08", "'2026-12-08' is not a time"),
        ("--stop-after", "5", "'5' is not a duration: give a number above 0 and a unit, e.g. 3600s, 90m or 5h"),
        ("--stop-after", "0h", "'0h' is not a duration"),
    ]:
        with pytest.raises(SystemExit) as exit:
            main(["nightly", *nightly_argv(tmp_path, flag, value)])
        err = capsys.readouterr().err
        assert exit.value.code == 2 and f"argument {flag}: {message}" in err, err


def test_a_file_added_after_its_date_was_committed_is_tagged_by_the_next_run(smoke_bundle, local_ray, tmp_path, capsys):
    dumps, tagged, day = tmp_path / "dumps", tmp_path / "tagged", "2026-08-01"
    write_dump(str(dumps), day, rows=200)
    argv = [
        "--model",
        str(smoke_bundle),
        "--input",
        f"{dumps}/dt={{date}}/",
        "--output",
        f"{tagged}/dt={{date}}/",
        "--actors",
        "1",
        "--no-report",
        "--until",
        day,
    ]
    code, out = run_job(argv, capsys)
    assert code == 0 and f"tagged {day}: tagged 200 rows" in out, out

    write_dump(str(dumps), day, rows=150, part="part-1")  # the producer re-delivers the day with a late file
    code, out = run_job(argv, capsys)
    assert code == 0, out
    assert f"re-opened {day}: 1 new file, 0 changed, 0 removed" in out and f"tagged {day}: tagged 350 rows" in out
    manifest = json.loads((tagged / f"dt={day}" / "_manifest.json").read_text())
    assert manifest["rows_in"] == manifest["rows_out"] == 350
    by_file = {Path(i["path"]).name: i for i in manifest["inputs"]}
    assert by_file["part-0.parquet"]["reused"] and not by_file["part-1.parquet"]["reused"]  # only the new file tagged
    files = sorted((tagged / f"dt={day}").glob("*.parquet"))
    assert len(files) == 2 and sum(pq.read_metadata(f).num_rows for f in files) == 350

    everything = snapshot(tagged)
    code, out = run_job(argv, capsys)  # the next night: the dump is as committed
    assert code == 0 and "tagged 0 date(s), 0 failed, 1 already committed" in out, out
    assert snapshot(tagged) == everything
