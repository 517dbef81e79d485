"""Nightly tagging of date-partitioned dumps: ``tag_nightly``, idempotent and self-healing.

    dumps/dt=2026-11-23/ dt=2026-11-24/ dt=2026-11-25/      inputs, one partition per day
    dumps/dt=2026-11-25/_SUCCESS                              the producer's "this dump is complete"
    tagged/dt=2026-11-23/_SUCCESS, _manifest.json             committed (tagging.tag_corpus)
    tagged/_leases/2026-11-24.<generation>.json               a run is working on that date
    tagged/_failures/2026-11-20.json                          that date failed on the last runs

Which dates. Not "yesterday by the clock": every date that has a dump under the input root,
oldest first, up to ``max_dates`` per run, and never later than ``until`` (default yesterday in
UTC). A date is tagged when

- it has no committed output (``_SUCCESS``) and its dump is ready: it holds ``ready_marker``
  (default ``_SUCCESS``, which Spark/Hadoop write last; "" turns the check off) in every input's
  date partition, and its newest input file is at least ``min_age_s`` old (default 0). A date
  with Parquet files but not ready is reported as waiting, not failed, and tagged by a later run;
- or it is committed but its dump changed: the Parquet files now there (``resolve_inputs``;
  path and size) differ from the ``inputs`` of its ``_manifest.json``. It is re-opened: tagged
  again with ``keep_unchanged=True``, which keeps the output files of unchanged inputs and tags the
  new and changed ones; the report says why ("re-opened D: 1 new file, 0 changed, 0 removed").
  A committed date whose dump is unchanged is a success with nothing to do, never an error.

A night the operator missed, a suspended schedule or a failed night is therefore tagged by the
next run. The plan reads one ``_manifest.json`` and lists one partition per committed date in
``[since, until]``, in a thread pool.

Failures. A date that failed on ``set_aside_after`` runs in a row (default 3) is set aside:
``<output root>/_failures/<date>.json`` holds the count and the last reason (a ``_`` name, so
readers skip it), the report names it, and it is retried only once ``set_aside_retry_s``
(default 7 days) have passed since its last failure, and then after every other date of the
run, so a few dates that always fail never use up ``max_dates`` ahead of new nights. A success
clears the record.

Leases (``emotions.leases``). When KubeRay catches up on missed schedules it starts several
runs at once; they find the same dates, so each run takes a lease on a date before tagging it
and skips dates leased by another run. A lease is a small JSON object (owner, expiry) in
``<output root>/_leases/`` on the same storage as the output, renewed by a heartbeat thread
every ``ttl / 3``; a run that dies stops renewing, and its lease is taken over once it has
expired. A run checks the dates it skipped once more when their leases would expire unless
renewed, so the retry of a killed attempt finishes its dates in the same night.

What a lease guarantees. Where the storage can create an object only if it is absent (local
disks, S3, GCS with google-cloud-storage installed) exactly one run acquires a free date, at
once: the others read the winner's claim and name it. Elsewhere a claim is written, read back
after ``settle_s`` and the first live claim holds (see ``emotions.leases`` for when that can
fail). Either way, two runs hold a date only if one stalls past the lease's expiry and comes
back; expiry compares the owner's clock with the reader's, so clocks must agree to well within
the TTL. Such a run learns it lost the lease before it commits: the lease is renewed (its claims
read again) right before the commit's first write, and a run that lost it commits nothing and
reports the date as lost (its staged files stay; the holder finishes them). The lease keeps runs
from doing the same work at once; it is not what makes the output correct. That is
``tag_corpus``: every input file has one output file with a name derived from the input, a date
is committed with ``_SUCCESS`` last, so even two runs on one date write the same files and never
duplicate a row.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pyarrow.fs as pafs

from emotions.leases import LEASE_TTL_S, SETTLE_S, Claim, Lease, new_owner
from emotions.storage import Folder

log = logging.getLogger("emotions.nightly")

DATE = "{date}"  # the placeholder in --input/--output
DATE_PATTERN = r"\d{4}-\d{2}-\d{2}"
LEASES = "_leases"  # beside the date partitions of the output; _-prefixed: Hive/Spark readers skip it
FAILURES = "_failures"  # beside them too: <date>.json for each date that failed on the last runs
SUCCESS = "_SUCCESS"  # = tagging.SUCCESS, written last by a commit (not imported: this module stays light)
MANIFEST = "_manifest.json"  # = tagging.MANIFEST: the committed inputs, compared with the dump's files
READY_MARKER = "_SUCCESS"  # what Spark/Hadoop write last into a finished partition; "" = no check
MAX_DATES = 7  # dates tagged (or failed) per run, oldest first
BASELINE_NIGHTS = 7  # a night's report compares it with this many earlier committed nights, pooled
SET_ASIDE_AFTER = 3  # failures on consecutive runs before a date is set aside
SET_ASIDE_RETRY_S = 7 * 86400.0  # a set-aside date is retried this long after its last failure

DateLease = Lease  # a lease named by a date: DateLease(folder, "2026-11-25", owner)


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

    def partition(self, date: str) -> str:
        """The date's entry under ``parent`` (its folder, or its file): where a ready marker is."""
        head, _, rest = self.text.partition(DATE)
        return head + date + rest.split("/", 1)[0]


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


@dataclass(frozen=True)
class DumpListing:
    """A date's Parquet input files as ``tag_corpus`` will find them: URI -> bytes."""

    files: dict[str, int]
    newest: float  # modification time of the newest file, epoch seconds (0 when unknown)
    mtimes: dict[str, int] = field(default_factory=dict)  # URI -> modification time, whole seconds


def list_dump(inputs: list[DateTemplate], date: str) -> DumpListing:
    """The date's input files (``tagging.resolve_inputs``) with their sizes; raises TaggingError
    when there are none. Sizes come from one recursive listing per input partition."""
    from emotions.tagging import resolve_inputs

    fs, paths = resolve_inputs([t.fill(date) for t in inputs])
    infos = {}
    for template in inputs:
        root = Folder.from_uri(template.partition(date))
        try:
            infos.update((i.path, i) for i in fs.get_file_info(pafs.FileSelector(root.root, recursive=True,
                                                                                  allow_not_found=True)))  # fmt: skip
        except (OSError, ValueError):  # the partition is a file: asked for one by one below
            pass
    missing = [p for p, _ in paths if p not in infos]
    infos.update((i.path, i) for i in (fs.get_file_info(missing) if missing else []))
    files = {uri: infos[p].size for p, uri in paths}
    newest = max((infos[p].mtime.timestamp() for p, _ in paths if infos[p].mtime), default=0.0)
    mtimes = {uri: int(infos[p].mtime.timestamp()) for p, uri in paths if infos[p].mtime}
    return DumpListing(files, newest, mtimes)


def readiness_problem(inputs: list[DateTemplate], date: str, listing: DumpListing, ready_marker: str | None,
                      min_age_s: float) -> str | None:  # fmt: skip
    """Why the date's dump is not ready to tag yet (the producer may still be writing it), or None."""
    for template in inputs if ready_marker else []:
        partition = Folder.from_uri(template.partition(date))
        if not partition.is_file(ready_marker):
            where = (f"{partition.uri} is a file, which holds no marker (pass --ready-marker '' for a "
                     "file-per-date layout)") if partition.is_file() else f"no {ready_marker} in {partition.uri} yet"  # fmt: skip
            return f"{where}; the producer writes it last (--ready-marker '' tags without it)"
    age = time.time() - listing.newest
    if min_age_s and age < min_age_s:
        return f"newest input file written {age:.0f} s ago; tagged once it is {min_age_s:.0f} s old (--min-age)"
    return None


def input_changes(manifest: dict | None, listing: DumpListing) -> str | None:
    """"1 new file, 0 changed, 0 removed" when the dump's files differ (path, bytes) from the
    ``inputs`` of a committed manifest; None when they match or there is nothing to compare
    (no manifest, or one without inputs: never re-opened)."""
    if not manifest or not isinstance(manifest.get("inputs"), list):
        return None
    committed = {i.get("path"): i for i in manifest["inputs"]}
    skipped = {s.get("path"): s for s in manifest.get("skipped_files") or []}  # bad files left out on purpose
    new = [p for p in listing.files if p not in committed and p not in skipped]
    changed = [p for p, size in listing.files.items() if (p in committed and rewritten(committed[p], size, listing, p))
               or (p in skipped and skipped[p].get("bytes") not in (None, size))]  # a bad file replaced  # fmt: skip
    removed = [p for p in committed if p not in listing.files]
    if not (new or changed or removed):
        return None
    return f"{len(new)} new file{'' if len(new) == 1 else 's'}, {len(changed)} changed, {len(removed)} removed"


def rewritten(entry: dict, size: int, listing: DumpListing, path: str) -> bool:
    """Whether a committed input file changed since: another size, or (where the manifest
    recorded it) another modification time, in whole seconds as object stores give it."""
    mtime, recorded = listing.mtimes.get(path), entry.get("mtime_ns")
    return entry.get("bytes") != size or bool(recorded and mtime and recorded // 10**9 != mtime)


@dataclass(frozen=True)
class DatePlan:
    """What a run found, oldest first: dates to tag (the re-opened among them, with why), dates
    already committed, dates without a dump and dates not ready yet (date, why)."""

    pending: list[str]
    committed: list[str]
    no_dump: list[tuple[str, str]]
    waiting: list[tuple[str, str]] = field(default_factory=list)
    reopened: dict[str, str] = field(default_factory=dict)


def plan_dates(inputs: list[DateTemplate], output: DateTemplate, *, since: str | None = None,
               until: str | None = None, ready_marker: str | None = READY_MARKER,
               min_age_s: float = 0.0) -> DatePlan:  # fmt: skip
    """Every date in ``[since, until]`` with an entry under the first input's parent (``until``
    defaults to yesterday, UTC), classified by ``check_date``."""
    until = until or yesterday_utc()
    dates = [d for d in inputs[0].dates() if (since is None or d >= since) and d <= until]
    return check_dates(inputs, output, dates, ready_marker=ready_marker, min_age_s=min_age_s)


def check_dates(inputs: list[DateTemplate], output: DateTemplate, dates: list[str], *,
                ready_marker: str | None, min_age_s: float) -> DatePlan:  # fmt: skip
    with ThreadPoolExecutor(max_workers=16) as pool:  # a few requests per date: a year of dates in seconds
        found = list(pool.map(lambda d: check_date(inputs, output, d, ready_marker, min_age_s), dates))
    plan = DatePlan([], [], [], [], {})
    for date, (state, why) in zip(dates, found):
        if state == "committed":
            plan.committed.append(date)
        elif state == "no dump":
            plan.no_dump.append((date, why))
        elif state == "waiting":
            plan.waiting.append((date, why))
        else:
            plan.pending.append(date)
            if state == "re-open":
                plan.reopened[date] = why
    return plan


def check_date(inputs: list[DateTemplate], output: DateTemplate, date: str, ready_marker: str | None,
               min_age_s: float) -> tuple[str, str | None]:  # fmt: skip
    """(state, why): "committed" (and unchanged), "re-open" (committed, but the dump changed),
    "pending", "no dump" or "waiting" (not ready)."""
    from emotions.tagging import TaggingError

    committed = is_committed(output, date)
    manifest = Folder.from_uri(output.fill(date)).read_json(MANIFEST) if committed else None
    if committed and not (manifest and manifest.get("inputs")):
        return "committed", None  # nothing to compare the dump with (an output made another way)
    try:
        listing = list_dump(inputs, date)
    except TaggingError as error:  # no partition or no Parquet files: a committed output stays as it is
        return ("committed", None) if committed else ("no dump", str(error))
    changes = input_changes(manifest, listing) if committed else None
    if committed and not changes:
        return "committed", None
    problem = readiness_problem(inputs, date, listing, ready_marker, min_age_s)
    if problem:
        return "waiting", f"inputs changed since the commit ({changes}), but {problem}" if changes else problem
    return ("re-open", changes) if changes else ("pending", None)


# ----------------------------------------------------------------------------- failures


@dataclass(frozen=True)
class FailureRecords:
    """``<output root>/_failures/<date>.json``: how many runs in a row a date failed on, and why."""

    folder: Folder
    set_aside_after: int = SET_ASIDE_AFTER
    retry_s: float = SET_ASIDE_RETRY_S

    def read(self) -> dict[str, dict]:
        """date -> record, for every date with one (one listing; records are few)."""
        out = {}
        for info in self.folder.list():
            date = parse_date(info.base_name[: -len(".json")]) if info.base_name.endswith(".json") else None
            record = date and self.folder.read_json(info.base_name)
            if record:
                out[date] = record
        return out

    def set_aside(self, record: dict | None) -> bool:
        return bool(record) and int(record.get("failures", 0)) >= self.set_aside_after

    def due(self, record: dict) -> bool:
        """A set-aside date is retried once ``retry_s`` has passed since its last failure."""
        return time.time() - float(record.get("last_failed", 0)) >= self.retry_s

    def describe(self, record: dict) -> str:
        retry = dt.datetime.fromtimestamp(float(record.get("last_failed", 0)) + self.retry_s, dt.timezone.utc)
        return (f"failed on {record['failures']} runs in a row (last: {record.get('reason')}); "
                f"retried after {retry:%Y-%m-%d %H:%M} UTC (--set-aside-retry-days)")  # fmt: skip

    def add(self, date: str, reason: str) -> dict:
        """Count one more failed run for ``date``; the record as written."""
        now = time.time()
        record = self.folder.read_json(f"{date}.json") or {"date": date, "failures": 0, "first_failed": now}
        record.update(failures=int(record["failures"]) + 1, last_failed=now, reason=reason,
                      last_failed_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)))  # fmt: skip
        self.folder.write_json(record, f"{date}.json")
        return record

    def clear(self, date: str) -> None:
        self.folder.delete(f"{date}.json")


# ----------------------------------------------------------------------------- the run


class LeaseLost(RuntimeError):
    """Raised before a commit by a run whose lease on the date was taken over: it commits nothing."""


@dataclass
class NightlyReport:
    """What one run did, date by date."""

    committed: list[tuple[str, str]] = field(default_factory=list)  # (date, tag_corpus summary line)
    reopened: list[tuple[str, str]] = field(default_factory=list)  # (date, what changed in its dump)
    already: list[str] = field(default_factory=list)  # committed (and unchanged) before this run got to them
    leased: list[tuple[str, str]] = field(default_factory=list)  # (date, owner of the lease)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (date, one-line reason)
    no_dump: list[tuple[str, str]] = field(default_factory=list)  # (date, why)
    waiting: list[tuple[str, str]] = field(default_factory=list)  # (date, why its dump is not ready)
    set_aside: list[tuple[str, str]] = field(default_factory=list)  # (date, failures; next retry), not tried
    deferred: list[str] = field(default_factory=list)  # pending, left for the next run (max_dates)
    lost: list[str] = field(default_factory=list)  # lease lost before the commit: not committed by this run
    planned: list[str] = field(default_factory=list)  # dry run: the dates a run would try, in order
    dry_run: bool = False

    @property
    def ok(self) -> bool:
        return not self.failed

    def lines(self) -> list[str]:
        """One line per date worth reporting, then a summary line."""
        out = [f"{'would re-open' if self.dry_run else 're-opened'} {d}: {why}" for d, why in self.reopened]
        out += [f"tagged {d}: {line}" for d, line in self.committed]
        out += [f"would tag {d}" for d in self.planned]
        out += [f"failed {d}: {why}" for d, why in self.failed]
        out += [f"set aside {d}: {why}" for d, why in self.set_aside]
        out += [f"waiting {d}: {why}" for d, why in self.waiting]
        out += [f"skipped {d}: leased by {owner}" for d, owner in self.leased]
        out += [f"skipped {d}: no dump ({why})" for d, why in self.no_dump]
        if self.deferred:
            out.append(f"left for the next run (--max-dates): {', '.join(self.deferred)}")
        if self.lost:
            out.append(f"lease lost before the commit, not committed (the run holding it commits): "
                       f"{', '.join(self.lost)}")  # fmt: skip
        work = f"would tag {len(self.planned)}" if self.dry_run else f"tagged {len(self.committed)}"
        out.append(f"nightly: {work} date(s), {len(self.failed)} failed, {len(self.already)} already "
                   f"committed, {len(self.leased)} leased by other runs, {len(self.reopened)} re-opened, "
                   f"{len(self.waiting)} waiting, {len(self.set_aside)} set aside")  # fmt: skip
        return out


def tag_nightly(model: str, inputs: list[str], output: str, *, date: str | None = None,
                max_dates: int = MAX_DATES, since: str | None = None, until: str | None = None,
                overwrite: bool = False, dry_run: bool = False, lease_ttl_s: float = LEASE_TTL_S,
                settle_s: float = SETTLE_S, recheck_leased: bool = True, owner: str | None = None,
                ready_marker: str | None = READY_MARKER, min_age_s: float = 0.0,
                set_aside_after: int = SET_ASIDE_AFTER, set_aside_retry_s: float = SET_ASIDE_RETRY_S,
                tagger=None, **tag_options) -> NightlyReport:  # fmt: skip
    """Tag the dates of the date-partitioned ``inputs`` (every ``{date}`` in them filled) that
    have no committed ``output`` yet and a ready dump, or whose dump changed since the commit
    (see the module docstring), oldest first, at most ``max_dates``; or only ``date``. Each date
    is tagged by ``tagging.tag_corpus(model, inputs, output, overwrite=..., before_commit=...,
    **tag_options)`` under a lease, which ``before_commit`` renews (and raises LeaseLost if it was
    taken over). A date that fails is recorded and reported and the run goes on with the next
    one; one that failed on ``set_aside_after`` runs in a row is set aside (retried
    ``set_aside_retry_s`` after its last failure, after the other dates). ``tagger`` replaces
    ``tag_corpus`` (same arguments), e.g. to keep two runs that share one small Ray cluster from
    tagging at the same time.

    Dates another run holds are tried once more when those leases would expire unless renewed
    (``recheck_leased``): the holder may be a killed attempt of this same night (a RayJob retry
    starts while its lease is still live), and then this run takes the date over.

    Raises NightlyError (or a TaggingError/StorageError) before any work for what a user can fix."""
    input_templates = [DateTemplate.parse(text, "--input") for text in inputs]
    output_template = DateTemplate.parse(output, "--output")
    if max_dates < 1:
        raise NightlyError(f"--max-dates {max_dates}: give 1 or more")
    if set_aside_after < 1:
        raise NightlyError(f"--set-aside-after {set_aside_after}: give 1 or more")
    if overwrite and date is None:
        raise NightlyError("--overwrite re-tags a committed date: name it with --date (the search for "
                           "untagged dates re-opens a committed one only when its dump changed)")  # fmt: skip
    ready_marker = ready_marker or None
    report = NightlyReport()
    root = Folder.from_uri(output_template.parent)
    failures = FailureRecords(root.child(FAILURES), set_aside_after, set_aside_retry_s)
    if date is not None:
        plan = check_dates(input_templates, output_template, [date], ready_marker=ready_marker,
                           min_age_s=min_age_s)  # fmt: skip
        if plan.no_dump:
            raise NightlyError(f"--date {date}: {plan.no_dump[0][1]}")
        if overwrite and plan.committed:  # re-tag on purpose, though nothing changed
            plan = DatePlan([date], [], [], [], {})
    else:
        plan = plan_dates(input_templates, output_template, since=since, until=until, ready_marker=ready_marker,
                          min_age_s=min_age_s)  # fmt: skip
    log.info("%d date(s) to tag (%s; %d re-opened), %d committed, %d waiting for their dump, %d without a dump",
             len(plan.pending), ", ".join(plan.pending) or "none", len(plan.reopened), len(plan.committed),
             len(plan.waiting), len(plan.no_dump))  # fmt: skip
    report.already, report.no_dump, report.waiting = plan.committed, plan.no_dump, plan.waiting
    # A date named with --date is tried even if set aside; the search puts set-aside dates last.
    pending = plan.pending if date else order_failed_last(plan, failures, report, clean=not dry_run)
    if dry_run:
        report.dry_run, report.planned, report.deferred = True, pending[:max_dates], pending[max_dates:]
        report.reopened = [(d, plan.reopened[d]) for d in report.planned if d in plan.reopened]
        return report

    leases = root.child(LEASES)
    owner = owner or new_owner()

    def attempt(day: str) -> Claim | None:
        """Tag ``day`` under a lease; the other run's claim if it holds the date."""
        lease = DateLease(leases, day, owner, ttl_s=lease_ttl_s, settle_s=settle_s)
        if not lease.acquire():
            log.info("%s: leased by %s; skipping it", day, lease.holder.owner if lease.holder else "another run")
            return lease.holder or Claim("", "another run", time.time() + lease_ttl_s, ())
        with lease.held():
            tag_date(model, input_templates, output_template, day, overwrite, tagger, tag_options, report,
                     before_commit=lambda: check_lease(lease), failures=failures)  # fmt: skip
        return None

    def budget_left() -> bool:
        return len(report.committed) + len(report.failed) + len(report.lost) < max_dates

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
    report.leased += [(day, holder.owner) for day, holder in held if holder]  # after any output busy
    return report


def order_failed_last(plan: DatePlan, failures: FailureRecords, report: NightlyReport, clean: bool) -> list[str]:
    """The pending dates in the order a run tries them: oldest first, then the set-aside dates
    due for a retry; set-aside dates not due go to ``report.set_aside``. Records of dates
    committed since (by another run, or by hand) are removed when ``clean``."""
    records = failures.read()
    if clean:
        for day in set(records) & set(plan.committed):
            failures.clear(day)
    aside = [d for d in plan.pending if failures.set_aside(records.get(d))]
    due = [d for d in aside if failures.due(records[d])]
    report.set_aside = [(d, failures.describe(records[d])) for d in aside if d not in due]
    if aside:
        log.info("set aside after %d failed runs in a row: %s (%d due for a retry, after the other dates)",
                 failures.set_aside_after, ", ".join(aside), len(due))  # fmt: skip
    return [d for d in plan.pending if d not in aside] + due


def check_lease(lease: Lease) -> None:
    """``before_commit``: renew the lease (its claims read again, not only the heartbeat's
    flag); raise LeaseLost if another run took it over, so nothing is committed."""
    if lease.lost.is_set() or not lease.renew():
        lease.lost.set()
        raise LeaseLost(f"{lease.key}: the lease was taken over by another run (this run stalled past its "
                        f"expiry); not committing. The staged files stay for the run that holds it")  # fmt: skip


def record_failure(failures: FailureRecords, date: str, reason: str) -> dict | None:
    try:
        return failures.add(date, reason)
    except Exception:  # the date's failure is reported either way; only the count is missed
        log.exception("%s: could not record the failure in %s", date, failures.folder.uri)
        return None


def earlier_nights(output: DateTemplate, date: str, count: int = BASELINE_NIGHTS) -> list[str]:
    """The committed outputs of the ``count`` latest dates before ``date``: its report's baselines
    (a week pooled: steadier than one night, and weekly patterns average out)."""
    earlier = [d for d in output.dates() if d < date and is_committed(output, d)]
    return [output.fill(d) for d in earlier[-count:]]


def tag_date(model: str, inputs: list[DateTemplate], output: DateTemplate, date: str, overwrite: bool,
             tagger, tag_options: dict, report: NightlyReport, *, before_commit=None,
             failures: FailureRecords | None = None) -> None:  # fmt: skip
    """Tag one leased date into ``report``: committed (re-opened when its committed dump
    changed), already committed, lost (``before_commit`` raised LeaseLost) or failed."""
    from emotions.tagging import TaggingError, tag_corpus
    from emotions.tagging.settings import OutputBusy

    tagger = tagger or tag_corpus
    changes = None
    if is_committed(output, date) and not overwrite:  # re-opened, or committed by a run that ended after we listed
        try:
            changes = input_changes(Folder.from_uri(output.fill(date)).read_json(MANIFEST), list_dump(inputs, date))
        except TaggingError:  # the dump is gone: the committed output stays
            changes = None
        if not changes:
            report.already.append(date)
            return
    log.info("%s: tagging %s -> %s%s", date, ", ".join(t.fill(date) for t in inputs), output.fill(date),
             f" (re-opened: {changes})" if changes else "")  # fmt: skip
    if not tag_options.get("baselines") and tag_options.get("report", True):
        tag_options = {**tag_options, "baselines": earlier_nights(output, date)}
    try:
        summary = tagger(model, [t.fill(date) for t in inputs], output.fill(date),
                         overwrite=overwrite, keep_unchanged=bool(changes), before_commit=before_commit,
                         **tag_options)  # fmt: skip
    except LeaseLost as error:
        log.error("%s", error)
        report.lost.append(date)
        return
    except OutputBusy as error:  # another run (an `emotions tag` by hand?) writes the date: not a failure
        log.warning("%s: %s", date, error)
        report.leased.append((date, error.holder))
        return
    except Exception as error:  # one bad date must not stop the others; the run exits non-zero
        log.exception("%s: tagging failed", date)
        first_line = (str(error).splitlines() or [""])[0]
        reason = f"{type(error).__name__}: {first_line}"
        record = failures and record_failure(failures, date, reason)
        if record and failures.set_aside(record):
            reason += (f" (failed on {record['failures']} runs in a row: set aside, retried "
                       f"{failures.retry_s / 86400:g} days after each failure, after the other dates)")  # fmt: skip
        report.failed.append((date, reason))
        return
    if failures is not None:
        failures.clear(date)
    if changes:
        report.reopened.append((date, changes))
    report_note = f"; report: {summary.report}" if summary.report else ""
    report.committed.append((date, summary.line() + report_note))
