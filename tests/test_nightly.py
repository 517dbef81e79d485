"""The nightly run over many nights: which dates it tags, the lease that keeps runs apart, and
the real tagging of tiny date partitions on the session's local Ray with the smoke bundle.

Leases are tested on a local folder and on the moto S3 server (the object store has no
create-if-absent through pyarrow, which is what the lease protocol works around), with real
threads racing for a date and a real process killed while it holds one.
"""

from __future__ import annotations

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

from emotions.nightly import (LEASES, DateLease, DateTemplate, NightlyError, new_owner, plan_dates,
                              tag_nightly)  # fmt: skip
from emotions.storage import Folder
from emotions.tagging import tag_corpus

ROOT = Path(__file__).resolve().parents[1]
TEXTS = ["I love this so much", "why would you do that", "thanks, that helps", "[deleted]"]


def write_dump(root: str, date: str, rows: int = 8) -> None:
    """One day's dump: one Parquet file with ``rows`` comments under root/dt=DATE/."""
    folder = Folder.from_uri(root).child(f"dt={date}")
    body = (TEXTS * rows)[:rows]
    table = pa.table({"id": [f"{date}-{i}" for i in range(rows)], "body": body})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    folder.write_bytes(sink.getvalue().to_pybytes(), "part-0.parquet")


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
    for bad, why in [("s3://b/dumps/", "has no {date}"), ("s3://{date}/x", "inside a folder"),
                     ("dumps/dt={date}*/", "plain text")]:  # fmt: skip
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
        "2026-01-03", "2026-01-05", "2026-01-09"]  # fmt: skip


# ----------------------------------------------------------------------------- leases


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_runs_racing_for_a_date_leave_exactly_one_holder(kind, tmp_path, request):
    folder = Folder.from_uri(storage_root(kind, tmp_path, request)).child(LEASES)
    for race in range(2):
        start, held = threading.Barrier(4), []
        leases = [DateLease(folder, f"2026-01-0{race + 1}", new_owner(), ttl_s=30, settle_s=0.3)
                  for _ in range(4)]  # fmt: skip

        def run(lease: DateLease, late_s: float) -> None:
            start.wait()
            time.sleep(late_s)  # the later runs find claims already written, some still settling
            if lease.acquire():
                held.append(lease)

        threads = [threading.Thread(target=run, args=(lease, 0.03 * i)) for i, lease in enumerate(leases)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        assert len(held) == 1, f"race {race}: {len(held)} runs hold the date"
        losers = [lease for lease in leases if lease is not held[0]]
        assert all(lease.holder and lease.holder.owner == held[0].owner for lease in losers)
        assert [c.owner for c in held[0].claims()] == [held[0].owner]  # the losers withdrew their claims
        assert not losers[0].acquire()  # still held: a later run skips the date
        held[0].release()
        assert losers[0].acquire()  # released: the next run gets it
        losers[0].release()


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


def test_a_stalled_run_learns_it_lost_its_lease(tmp_path):
    folder = Folder.from_uri(tmp_path).child(LEASES)
    stalled = DateLease(folder, "2026-01-01", "stalled", ttl_s=0.5, settle_s=0.05)
    assert stalled.acquire()
    time.sleep(0.6)  # no heartbeat: the lease expires
    other = DateLease(folder, "2026-01-01", "other", ttl_s=30, settle_s=0.05)
    assert other.acquire()
    assert not stalled.renew(), "a run whose lease was taken over must not think it still holds it"
    assert other.renew()


# ----------------------------------------------------------------------------- tagging, night after night


def run_job(argv: list[str], capsys) -> tuple[int, str]:
    """jobs/tag_nightly.py's main(), in this process (it joins the session's local Ray)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("tag_nightly_job", ROOT / "jobs" / "tag_nightly.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    code = job.main(argv)
    return code, capsys.readouterr().out


def test_dates_missed_in_the_middle_are_tagged_by_the_next_run_and_a_rerun_changes_nothing(
        smoke_bundle, local_ray, tmp_path, capsys):  # fmt: skip
    dumps, tagged = tmp_path / "dumps", tmp_path / "tagged"
    days = ["2026-01-01", "2026-01-02", "2026-01-03", "2026-01-04"]
    for day in days:
        write_dump(str(dumps), day)
    for day in (days[0], days[3]):  # nights 1 and 4 ran; the operator was down on nights 2 and 3
        commit_marker(str(tagged), day)
    before = snapshot(tagged)
    argv = ["--model", str(smoke_bundle), "--input", f"{dumps}/dt={{date}}/", "--output",
            f"{tagged}/dt={{date}}/", "--actors", "1", "--lease-settle", "0.3", "--no-report"]  # fmt: skip

    code, out = run_job(argv, capsys)  # the next night
    assert code == 0, out
    assert [line.split(":")[0] for line in out.splitlines() if line.startswith("tagged ")] == [
        "tagged 2026-01-02", "tagged 2026-01-03"]  # fmt: skip
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
    assert not any((tagged / LEASES).iterdir())


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
        reports[name] = tag_nightly(str(smoke_bundle), [f"{dumps}/dt={{date}}/"], f"{tagged}/dt={{date}}/",
                                    owner=name, num_actors=1, report=False, tagger=tag_in_turn, **fast)  # fmt: skip

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
    assert earlier_nights(output, "2026-02-11") == [f"{tmp_path}/dt={d}/" for d in
                                                    ("2026-02-03", "2026-02-04", "2026-02-05", "2026-02-06",
                                                     "2026-02-07", "2026-02-08", "2026-02-10")]  # fmt: skip
    assert earlier_nights(output, "2026-02-01") == []  # the first night has none


def test_each_night_writes_its_report_against_the_nights_before(smoke_bundle, local_ray, tmp_path):
    dumps, tagged = tmp_path / "dumps", tmp_path / "tagged"
    for day in ("2026-03-01", "2026-03-02"):
        write_dump(str(dumps), day)
    report = tag_nightly(str(smoke_bundle), [f"{dumps}/dt={{date}}/"], f"{tagged}/dt={{date}}/", num_actors=1,
                         settle_s=0.1)  # the report is on by default  # fmt: skip
    assert [d for d, _ in report.committed] == ["2026-03-01", "2026-03-02"]
    first, second = (json.loads((tagged / f"dt={d}" / "_report.json").read_text()) for d in ("2026-03-01", "2026-03-02"))
    assert first["baselines"] == [] and [b["output"] for b in second["baselines"]] == [f"{tagged}/dt=2026-03-01"]
