"""Nightly tagging of date-partitioned dumps: ``tag_nightly``, idempotent and self-healing.

    dumps/dt=2026-11-23/ dt=2026-11-24/ dt=2026-11-25/      inputs, one partition per day
    tagged/dt=2026-11-23/_SUCCESS                             committed (tagging.tag_corpus)
    tagged/_leases/2026-11-24.<owner>.json                    a run is working on that date

Which dates. Not "yesterday by the clock": every date that has a dump under the input root and
no committed output (``_SUCCESS``), oldest first, up to ``max_dates`` per run, and never later
than ``until`` (default yesterday in UTC, so a dump still being written today is left alone).
A night the operator missed, a suspended schedule or a failed night is therefore tagged by the
next run, and a date already committed is a success with nothing to do, never an error.

Leases. When KubeRay catches up on missed schedules it starts several runs at once; they find
the same dates, so each run takes a lease on a date before tagging it and skips dates leased by
another run. A lease is a small JSON object (owner, expiry) in ``<output root>/_leases/`` on the
same storage as the output, renewed by a heartbeat thread every ``ttl / 3``; a run that dies
stops renewing, and its lease is taken over once it has expired. A run checks the dates it
skipped once more when their leases would expire unless renewed, so the retry of a killed
attempt (which finds that attempt's lease still live) finishes its dates in the same night.

What a lease guarantees. pyarrow gives no create-if-absent on object stores, so acquiring is
write, wait ``settle_s``, read back: a run holds the date if its claim is the first live claim,
ordered by when each claim was first written by the storage's own clock (the object's
modification time as listed, kept in the claim through renewals), then by owner name. A run
that finds live claims already there also waits ``settle_s`` and reads again before it skips the
date and names the holder: a claim ordered before the ones it saw may still be on its way.
S3 reads and lists are strongly consistent, so a run that wrote its claim before another run
read back sees it and withdraws. Two runs can both hold a date only if one claim's write takes
longer than ``settle_s`` minus the storage clock's resolution (S3: 1 s) to become visible, or if a
run stalls past the lease's expiry and comes back (then the heartbeat logs that the lease was
lost). Expiry compares the owner's clock with the reader's, so clocks must agree to well within
the TTL. The lease keeps runs from doing the same work at once; it is not what makes the output
correct. That is ``tag_corpus``: every input file has one output file with a name derived from
the input, a date is committed with ``_SUCCESS`` last, and a committed date is never re-tagged
here, so even two runs on one date write the same files and never duplicate a row.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field

from emotions.storage import Folder

log = logging.getLogger("emotions.nightly")

DATE = "{date}"  # the placeholder in --input/--output
DATE_PATTERN = r"\d{4}-\d{2}-\d{2}"
LEASES = "_leases"  # beside the date partitions of the output; _-prefixed: Hive/Spark readers skip it
SUCCESS = "_SUCCESS"  # = tagging.SUCCESS, written last by a commit (not imported: this module stays light)
LEASE_TTL_S = 600.0  # a dead run's date is free again after this; renewed every TTL / 3
SETTLE_S = 5.0  # wait between writing a claim and reading the claims back
MAX_DATES = 7  # dates tagged (or failed) per run, oldest first
BASELINE_NIGHTS = 7  # a night's report compares it with this many earlier committed nights, pooled


class NightlyError(ValueError):
    """A nightly run that cannot start; the message names the flag or path and the fix."""


# ----------------------------------------------------------------------------- dates


@dataclass(frozen=True)
class DateTemplate:
    """A path or URI with ``{date}`` in one folder or file name, e.g. ``s3://b/dumps/dt={date}/``:
    ``parent`` holds one entry per date (``s3://b/dumps``), ``entry`` matches an entry's name."""

    text: str
    parent: str
    entry: re.Pattern

    @classmethod
    def parse(cls, text: str, flag: str) -> DateTemplate:
        if DATE not in text:
            raise NightlyError(f"{flag} {text!r} has no {DATE}: name the date partitions, "
                               f"e.g. s3://bucket/dumps/dt={DATE}/")  # fmt: skip
        head, _, rest = text.partition(DATE)
        parent, slash, prefix = head.rpartition("/")
        suffix = rest.split("/", 1)[0]
        if not slash or not parent or parent.endswith(":") or parent.endswith(":/"):
            raise NightlyError(f"{flag} {text!r}: {DATE} must be in a folder or file name inside a "
                               f"folder that holds one entry per date, e.g. dumps/dt={DATE}/")  # fmt: skip
        if any(ch in prefix + suffix for ch in "*?[]{}"):
            raise NightlyError(f"{flag} {text!r}: the name around {DATE} must be plain text; put globs "
                               f"in the path after it, e.g. dumps/dt={DATE}/*.parquet")  # fmt: skip
        return cls(text, parent, re.compile(f"^{re.escape(prefix)}({DATE_PATTERN}){re.escape(suffix)}$"))

    def fill(self, date: str) -> str:
        return self.text.replace(DATE, date)

    def dates(self) -> list[str]:
        """The dates that have an entry under ``parent``, oldest first."""
        found = set()
        for info in Folder.from_uri(self.parent).list():
            match = self.entry.match(info.base_name)
            if match and parse_date(match.group(1)):
                found.add(match.group(1))
        return sorted(found)


def parse_date(text: str) -> str | None:
    """``text`` if it is a real date written YYYY-MM-DD, else None."""
    if not re.fullmatch(DATE_PATTERN, text):
        return None
    try:
        return dt.date.fromisoformat(text).isoformat()
    except ValueError:
        return None


def yesterday_utc() -> str:
    return (dt.datetime.now(dt.timezone.utc).date() - dt.timedelta(days=1)).isoformat()


def is_committed(output: DateTemplate, date: str) -> bool:
    return Folder.from_uri(output.fill(date)).exists(SUCCESS)


def dump_problem(inputs: list[DateTemplate], date: str) -> str | None:
    """Why ``date`` has no dump to tag (no partition, no Parquet files in it), or None."""
    from emotions.tagging import TaggingError, resolve_inputs

    try:
        resolve_inputs([t.fill(date) for t in inputs])
    except TaggingError as error:
        return str(error)
    return None


@dataclass(frozen=True)
class DatePlan:
    """What a run found: dates to tag (oldest first), dates already committed, dates without a
    dump (date, why)."""

    pending: list[str]
    committed: list[str]
    no_dump: list[tuple[str, str]]


def plan_dates(inputs: list[DateTemplate], output: DateTemplate, *, since: str | None = None,
               until: str | None = None) -> DatePlan:  # fmt: skip
    """Every date in ``[since, until]`` with an entry under the first input's parent: committed
    (``_SUCCESS`` in its output), else pending if it holds Parquet files. ``until`` defaults to
    yesterday (UTC)."""
    until = until or yesterday_utc()
    dates = [d for d in inputs[0].dates() if (since is None or d >= since) and d <= until]
    with ThreadPoolExecutor(max_workers=16) as pool:  # one HEAD per date: a year of dates in ~1 s
        committed = dict(zip(dates, pool.map(lambda d: is_committed(output, d), dates)))
    pending, no_dump = [], []
    for date in (d for d in dates if not committed[d]):
        problem = dump_problem(inputs, date)
        if problem:
            no_dump.append((date, problem))
        else:
            pending.append(date)
    return DatePlan(pending, [d for d in dates if committed[d]], no_dump)


# ----------------------------------------------------------------------------- leases


@dataclass(frozen=True)
class Claim:
    """One run's claim on a date, as read back from storage."""

    name: str  # object name in the leases folder: <date>.<owner>.json
    owner: str
    expires: float  # epoch seconds, by the owner's clock
    order: tuple  # (time the claim was first written, by the storage's clock; owner): first holds


def new_owner() -> str:
    """A run's name: host (the pod), process and a random part; safe in object names."""
    host = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:40]
    return f"{host}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


class DateLease:
    """A lease on one date in ``folder`` (see the module docstring for what it guarantees).

        lease = DateLease(folder, "2026-11-25", owner)
        if lease.acquire():
            with lease.held():  # renewed every ttl / 3 until the block ends, then released
                ...
    """

    def __init__(self, folder: Folder, date: str, owner: str, *, ttl_s: float = LEASE_TTL_S,
                 settle_s: float = SETTLE_S):  # fmt: skip
        assert "." not in owner and "/" not in owner, owner
        self.folder, self.date, self.owner = folder, date, owner
        self.ttl_s, self.settle_s = ttl_s, settle_s
        self.name = f"{date}.{owner}.json"
        self.holder: Claim | None = None  # who holds the date when acquire() failed
        self.order: tuple | None = None  # this claim's place in line, fixed when acquired
        self.lost = threading.Event()  # set by the heartbeat if another run took the date over

    def claims(self) -> list[Claim]:
        """This date's claims, each read back (a claim that cannot be read expires a TTL after
        it was written, so a torn or foreign object never blocks a date for good)."""
        out = []
        for info in self.folder.list():
            if not (info.base_name.startswith(f"{self.date}.") and info.base_name.endswith(".json")):
                continue  # other dates, and local write-then-rename temporaries (.name.partial-pid)
            written = info.mtime.timestamp() if info.mtime else 0.0
            try:
                data = json.loads(self.folder.read_bytes(info.base_name))
                owner, expires = str(data["owner"]), float(data["expires"])
                order = (float(data["order"][0]), owner) if data.get("order") else (written, owner)
            except Exception:  # gone, torn or not ours: decided below
                if not self.folder.exists(info.base_name):
                    continue  # released or taken over between the listing and the read
                owner, expires = info.base_name[len(self.date) + 1 : -len(".json")], written + self.ttl_s
                order = (written, owner)
            out.append(Claim(info.base_name, owner, expires, order))
        return out

    def _read(self) -> tuple[float, list[Claim], list[Claim]]:
        """(now, this date's claims, the other runs' live claims among them)."""
        now, claims = time.time(), self.claims()
        return now, claims, [c for c in claims if c.expires > now and c.owner != self.owner]

    def acquire(self) -> bool:
        """Claim the date unless another run holds it; True if this run now holds it."""
        now, claims, live = self._read()
        if live:  # held or being claimed. A claim ordered before these may not be visible yet:
            time.sleep(self.settle_s)  # after settle_s it is, and the first live claim holds
            now, claims, live = self._read()
        if live:
            self.holder = min(live, key=lambda c: c.order)
            return False
        for stale in (c for c in claims if c.expires <= now):
            log.warning("%s: taking over the expired lease of %s (expired %.0f s ago)", self.date,
                        stale.owner, now - stale.expires)  # fmt: skip
            self._delete(stale.name)
        self._write()
        time.sleep(self.settle_s)
        now = time.time()
        live = sorted((c for c in self.claims() if c.expires > now), key=lambda c: c.order)
        if live and live[0].owner == self.owner:
            self.order = live[0].order  # kept through renewals, which change the object's time
            return True
        self.holder = live[0] if live else None
        self._delete(self.name)
        return False

    def renew(self) -> bool:
        """Extend the lease; False if this run lost the date (it stalled past the expiry and
        another run took over: its claim is gone, or another live claim comes first)."""
        if not any(c.owner == self.owner for c in self.claims()):
            return False  # deleted as expired by the run that took over: never write it back
        self._write()
        now = time.time()
        live = sorted((c for c in self.claims() if c.expires > now), key=lambda c: c.order)
        if live and live[0].owner == self.owner:
            return True
        self._delete(self.name)
        return False

    def release(self) -> None:
        self._delete(self.name)
        self.order = None

    @contextmanager
    def held(self):
        """Renew every ``ttl / 3`` while the block runs; release at the end."""
        stop = threading.Event()

        def heartbeat() -> None:
            while not stop.wait(self.ttl_s / 3):
                try:
                    if not self.renew():
                        log.error("%s: lease lost to another run; this run's output is still exactly "
                                  "once per input file, but the two runs did the same work", self.date)  # fmt: skip
                        self.lost.set()
                        return
                except Exception as error:  # storage hiccup: try again at the next beat
                    log.warning("%s: could not renew the lease (%s); retrying", self.date, error)

        thread = threading.Thread(target=heartbeat, name=f"lease-{self.date}", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            stop.set()
            thread.join()
            self.release()

    def _write(self) -> None:
        claim = {"owner": self.owner, "date": self.date, "host": socket.gethostname(), "pid": os.getpid(),
                 "written": time.time(), "expires": time.time() + self.ttl_s,
                 "order": self.order and list(self.order)}  # fmt: skip
        self.folder.write_bytes_atomic(json.dumps(claim).encode(), self.name)

    def _delete(self, name: str) -> None:
        try:
            self.folder.delete(name)
        except FileNotFoundError:
            pass


# ----------------------------------------------------------------------------- the run


@dataclass
class NightlyReport:
    """What one run did, date by date."""

    committed: list[tuple[str, str]] = field(default_factory=list)  # (date, tag_corpus summary line)
    already: list[str] = field(default_factory=list)  # committed before this run got to them
    leased: list[tuple[str, str]] = field(default_factory=list)  # (date, owner of the lease)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (date, one-line reason)
    no_dump: list[tuple[str, str]] = field(default_factory=list)  # (date, why)
    deferred: list[str] = field(default_factory=list)  # pending, left for the next run (max_dates)
    lost: list[str] = field(default_factory=list)  # committed, but the lease was lost meanwhile
    planned: list[str] = field(default_factory=list)  # dry run: the dates a run would try, in order
    dry_run: bool = False

    @property
    def ok(self) -> bool:
        return not self.failed

    def lines(self) -> list[str]:
        """One line per date worth reporting, then a summary line."""
        out = [f"tagged {d}: {line}" for d, line in self.committed]
        out += [f"would tag {d}" for d in self.planned]
        out += [f"failed {d}: {why}" for d, why in self.failed]
        out += [f"skipped {d}: leased by {owner}" for d, owner in self.leased]
        out += [f"skipped {d}: no dump ({why})" for d, why in self.no_dump]
        if self.deferred:
            out.append(f"left for the next run (--max-dates): {', '.join(self.deferred)}")
        if self.lost:
            out.append(f"lease lost while tagging (output still exactly once): {', '.join(self.lost)}")
        work = f"would tag {len(self.planned)}" if self.dry_run else f"tagged {len(self.committed)}"
        out.append(f"nightly: {work} date(s), {len(self.failed)} failed, {len(self.already)} already "
                   f"committed, {len(self.leased)} leased by other runs")  # fmt: skip
        return out


def tag_nightly(model: str, inputs: list[str], output: str, *, date: str | None = None,
                max_dates: int = MAX_DATES, since: str | None = None, until: str | None = None,
                overwrite: bool = False, dry_run: bool = False, lease_ttl_s: float = LEASE_TTL_S,
                settle_s: float = SETTLE_S, recheck_leased: bool = True, owner: str | None = None,
                tagger=None, **tag_options) -> NightlyReport:  # fmt: skip
    """Tag the dates of the date-partitioned ``inputs`` that have no committed ``output`` yet
    (every ``{date}`` in them filled), oldest first, at most ``max_dates``; or only ``date``.
    Each date is tagged by ``tagging.tag_corpus(model, inputs, output, **tag_options)`` under a
    lease. A date that fails is reported and the run goes on with the next one. ``tagger``
    replaces ``tag_corpus`` (same arguments), e.g. to keep two runs that share one small Ray
    cluster from tagging at the same time.

    Dates another run holds are tried once more when those leases would expire unless renewed
    (``recheck_leased``): the holder may be a killed attempt of this same night (a RayJob retry
    starts while its lease is still live), and then this run takes the date over.

    Raises NightlyError (or a TaggingError/StorageError) before any work for what a user can fix."""
    input_templates = [DateTemplate.parse(text, "--input") for text in inputs]
    output_template = DateTemplate.parse(output, "--output")
    if max_dates < 1:
        raise NightlyError(f"--max-dates {max_dates}: give 1 or more")
    if overwrite and date is None:
        raise NightlyError("--overwrite re-tags a committed date: name it with --date (the search for "
                           "untagged dates never touches a committed one)")  # fmt: skip
    report = NightlyReport()
    if date is not None:
        if is_committed(output_template, date) and not overwrite:
            report.already.append(date)
            return report
        problem = dump_problem(input_templates, date)
        if problem:
            raise NightlyError(f"--date {date}: {problem}")
        pending = [date]
    else:
        plan = plan_dates(input_templates, output_template, since=since, until=until)
        log.info("%d date(s) to tag (%s), %d committed, %d without a dump", len(plan.pending),
                 ", ".join(plan.pending) or "none", len(plan.committed), len(plan.no_dump))  # fmt: skip
        report.already, report.no_dump, pending = plan.committed, plan.no_dump, plan.pending
    if dry_run:
        report.dry_run, report.planned, report.deferred = True, pending[:max_dates], pending[max_dates:]
        return report

    leases = Folder.from_uri(output_template.parent).child(LEASES)
    owner = owner or new_owner()

    def attempt(day: str) -> Claim | None:
        """Tag ``day`` under a lease; the other run's claim if it holds the date."""
        lease = DateLease(leases, day, owner, ttl_s=lease_ttl_s, settle_s=settle_s)
        if not lease.acquire():
            log.info("%s: leased by %s; skipping it", day, lease.holder.owner if lease.holder else "another run")
            return lease.holder or Claim("", "another run", time.time() + lease_ttl_s, ())
        with lease.held():
            tag_date(model, input_templates, output_template, day, overwrite, tagger, tag_options, report)
        if lease.lost.is_set():
            report.lost.append(day)
        return None

    def budget_left() -> bool:
        return len(report.committed) + len(report.failed) < max_dates

    held = []  # (date, holder's claim)
    for i, day in enumerate(pending):
        if not budget_left():
            report.deferred = pending[i:]
            break
        holder = attempt(day)
        if holder:
            held.append((day, holder))
    if held and recheck_leased and budget_left():
        wait = min(max(c.expires for _, c in held) - time.time(), lease_ttl_s) + settle_s
        log.info("%d date(s) leased by other runs; checking them again in %.0f s, when their leases "
                 "expire unless renewed", len(held), wait)  # fmt: skip
        time.sleep(max(wait, 0.0))
        held = [(day, attempt(day) if budget_left() else holder) for day, holder in held]
    report.leased = [(day, holder.owner) for day, holder in held if holder]
    return report


def earlier_nights(output: DateTemplate, date: str, count: int = BASELINE_NIGHTS) -> list[str]:
    """The committed outputs of the ``count`` latest dates before ``date``: its report's baselines
    (a week pooled: steadier than one night, and weekly patterns average out)."""
    earlier = [d for d in output.dates() if d < date and is_committed(output, d)]
    return [output.fill(d) for d in earlier[-count:]]


def tag_date(model: str, inputs: list[DateTemplate], output: DateTemplate, date: str, overwrite: bool,
             tagger, tag_options: dict, report: NightlyReport) -> None:  # fmt: skip
    """Tag one leased date into ``report``: committed, already committed, or failed."""
    from emotions.tagging import tag_corpus

    tagger = tagger or tag_corpus
    if is_committed(output, date) and not overwrite:  # committed by a run that ended after we listed
        report.already.append(date)
        return
    log.info("%s: tagging %s -> %s", date, ", ".join(t.fill(date) for t in inputs), output.fill(date))
    if not tag_options.get("baselines") and tag_options.get("report", True):
        tag_options = {**tag_options, "baselines": earlier_nights(output, date)}
    try:
        summary = tagger(model, [t.fill(date) for t in inputs], output.fill(date), overwrite=overwrite,
                         **tag_options)  # fmt: skip
    except Exception as error:  # one bad date must not stop the others; the run exits non-zero
        log.exception("%s: tagging failed", date)
        first_line = (str(error).splitlines() or [""])[0]
        report.failed.append((date, f"{type(error).__name__}: {first_line}"))
        return
    report_note = f"; report: {summary.report}" if summary.report else ""
    report.committed.append((date, summary.line() + report_note))
