"""The nightly run: ``tag_nightly`` takes a lease on each planned date and tags it with
``tagging.tag_corpus``; ``NightlyReport`` says what happened to every date (see ``emotions.nightly``)."""

from __future__ import annotations

import datetime as dt
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from emotions.leases import LEASE_TTL_S, SETTLE_S, Claim, Lease, new_owner
from emotions.nightly.dates import (
    MANIFEST,
    READY_MARKER,
    DatePlan,
    DateTemplate,
    NightlyError,
    check_dates,
    input_changes,
    is_committed,
    list_dump,
    plan_dates,
)
from emotions.nightly.failures import FAILURES, SET_ASIDE_AFTER, SET_ASIDE_RETRY_S, FailureRecords, record_failure
from emotions.storage import Folder

log = logging.getLogger("emotions.nightly")

LEASES = "_leases"  # beside the date partitions of the output; _-prefixed: Hive/Spark readers skip it
MAX_DATES = 7  # dates tagged (or failed) per run, oldest first
BASELINE_NIGHTS = 7  # a night's report compares it with this many earlier committed nights, pooled
STOP_BY_WINDOW_S = 12 * 3600.0  # --stop-by HH:MM is the occurrence of that time within this of the start
DURATION_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}  # --stop-after 3600s, 90m, 5h

DateLease = Lease  # a lease named by a date: DateLease(folder, "2026-11-25", owner)


class LeaseLost(RuntimeError):
    """Raised before a commit by a run whose lease on the date was taken over: it commits nothing."""


@dataclass(frozen=True)
class StopTime:
    """The wall-clock time after which a run starts no new date: ``at`` (epoch seconds), and the
    flag it came from (``--stop-by 06:00``), which the report names."""

    at: float
    flag: str = ""

    def __str__(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.at))
        return f"{when} ({self.flag})" if self.flag else when


def parse_stop_by(text: str, now: float) -> float:
    """``--stop-by``, in epoch seconds: an ISO date-time (``2026-12-08T06:00Z``,
    ``2026-12-08T07:00+01:00``; UTC when it has no offset) or ``HH:MM`` in UTC. ``HH:MM`` is the
    occurrence of that time nearest ``now``: at most 12 h ahead, else up to 12 h back, which has
    passed. So every attempt of one night reads the same instant: a run that starts at 02:30 and
    its retries at 08:00 or 14:00 all read 06:00 of that day (the retries start no date), and a
    run at 23:30 reads 06:00 the next morning. NightlyError when ``text`` is neither."""
    text = text.strip()
    if match := re.fullmatch(r"(\d{1,2}):(\d{2})", text):
        hour, minute = int(match[1]), int(match[2])
        if hour > 23 or minute > 59:
            raise NightlyError(f"{text!r} is not a time of day: give HH:MM from 00:00 to 23:59 (UTC)")
        start = dt.datetime.fromtimestamp(now, dt.timezone.utc)
        today = start.replace(hour=hour, minute=minute, second=0, microsecond=0).timestamp()
        # the three candidates are 24 h apart: exactly one is in (now - 12 h, now + 12 h]
        return next(t for t in (today - 86400, today, today + 86400) if -STOP_BY_WINDOW_S < t - now <= STOP_BY_WINDOW_S)
    try:
        when = dt.datetime.fromisoformat(text) if re.search(r"\d[T ]\d{1,2}:\d{2}", text) else None
    except ValueError:
        when = None
    if when is None:
        raise NightlyError(
            f"{text!r} is not a time: give HH:MM in UTC (e.g. 06:00) or an ISO date-time (e.g. 2026-12-08T06:00Z)"
        )
    return (when if when.tzinfo else when.replace(tzinfo=dt.timezone.utc)).timestamp()


def parse_duration(text: str) -> float:
    """``--stop-after``: ``3600s``, ``90m``, ``5h`` or ``1.5h`` in seconds (above 0)."""
    match = re.fullmatch(r"(\d+(?:\.\d*)?)([smh])", text.strip())
    if not match or float(match[1]) <= 0:
        raise NightlyError(f"{text!r} is not a duration: give a number above 0 and a unit, e.g. 3600s, 90m or 5h")
    return float(match[1]) * DURATION_UNITS[match[2]]


def resolve_stop(stop_by: str | None, stop_after: str | None, now: float) -> StopTime | None:
    """The earlier of ``--stop-by`` and ``now`` + ``--stop-after`` (None when neither is given);
    ``now`` is when the run started. NightlyError names the flag of a bad value."""
    stops = []
    for flag, text, parse in (
        ("--stop-by", stop_by, lambda t: parse_stop_by(t, now)),
        ("--stop-after", stop_after, lambda t: now + parse_duration(t)),
    ):
        if text:
            try:
                stops.append(StopTime(parse(text), f"{flag} {text}"))
            except NightlyError as error:
                raise NightlyError(f"{flag} {error}") from None
    return min(stops, key=lambda s: s.at, default=None)


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
    out_of_time: list[str] = field(default_factory=list)  # pending, not started: ``stop`` had passed
    stop: StopTime | None = None  # no date is started after this
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
        if self.out_of_time:
            out.append(
                f"left for the next run, out of time (no date is started after {self.stop}): "
                f"{', '.join(self.out_of_time)}"
            )
        if self.lost:
            out.append(
                f"lease lost before the commit, not committed (the run holding it commits): {', '.join(self.lost)}"
            )
        work = f"would tag {len(self.planned)}" if self.dry_run else f"tagged {len(self.committed)}"
        out.append(
            f"nightly: {work} date(s), {len(self.failed)} failed, {len(self.already)} already "
            f"committed, {len(self.leased)} leased by other runs, {len(self.reopened)} re-opened, "
            f"{len(self.waiting)} waiting, {len(self.set_aside)} set aside"
            + (f", {len(self.out_of_time)} out of time" if self.out_of_time else "")
        )
        return out


def tag_nightly(
    model: str,
    inputs: list[str],
    output: str,
    *,
    date: str | None = None,
    max_dates: int = MAX_DATES,
    since: str | None = None,
    until: str | None = None,
    overwrite: bool = False,
    dry_run: bool = False,
    lease_ttl_s: float = LEASE_TTL_S,
    settle_s: float = SETTLE_S,
    recheck_leased: bool = True,
    owner: str | None = None,
    ready_marker: str | None = READY_MARKER,
    min_age_s: float = 0.0,
    set_aside_after: int = SET_ASIDE_AFTER,
    set_aside_retry_s: float = SET_ASIDE_RETRY_S,
    stop: StopTime | None = None,
    clock: Callable[[], float] = time.time,
    tagger=None,
    **tag_options,
) -> NightlyReport:
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

    Once ``stop`` has passed (by ``clock``, epoch seconds) no date is started: the date in hand is
    finished and committed, the dates not started go to ``report.out_of_time`` (not a failure),
    and a run that starts after ``stop`` tags nothing. A RayJob's retries read the same absolute
    ``stop`` (``--stop-by``), so it bounds the whole night, not one attempt.

    Raises NightlyError (or a TaggingError/StorageError) before any work for what a user can fix."""
    input_templates = [DateTemplate.parse(text, "--input") for text in inputs]
    output_template = DateTemplate.parse(output, "--output")
    if max_dates < 1:
        raise NightlyError(f"--max-dates {max_dates}: give 1 or more")
    if set_aside_after < 1:
        raise NightlyError(f"--set-aside-after {set_aside_after}: give 1 or more")
    if overwrite and date is None:
        raise NightlyError(
            "--overwrite re-tags a committed date: name it with --date (the search for "
            "untagged dates re-opens a committed one only when its dump changed)"
        )
    ready_marker = ready_marker or None
    report = NightlyReport()
    root = Folder.from_uri(output_template.parent)
    failures = FailureRecords(root.child(FAILURES), set_aside_after, set_aside_retry_s)
    if date is not None:
        plan = check_dates(input_templates, output_template, [date], ready_marker=ready_marker, min_age_s=min_age_s)
        if plan.no_dump:
            raise NightlyError(f"--date {date}: {plan.no_dump[0][1]}")
        if overwrite and plan.committed:  # re-tag on purpose, though nothing changed
            plan = DatePlan([date], [], [], [], {})
    else:
        plan = plan_dates(
            input_templates, output_template, since=since, until=until, ready_marker=ready_marker, min_age_s=min_age_s
        )
    log.info(
        "%d date(s) to tag (%s; %d re-opened), %d committed, %d waiting for their dump, %d without a dump",
        len(plan.pending),
        ", ".join(plan.pending) or "none",
        len(plan.reopened),
        len(plan.committed),
        len(plan.waiting),
        len(plan.no_dump),
    )
    report.already, report.no_dump, report.waiting = plan.committed, plan.no_dump, plan.waiting
    # A date named with --date is tried even if set aside; the search puts set-aside dates last.
    pending = plan.pending if date else order_failed_last(plan, failures, report, clean=not dry_run)
    report.stop = stop

    def out_of_time() -> bool:
        return stop is not None and clock() >= stop.at

    if stop is not None:
        log.info("no date is started after %s%s", stop, "; that has passed: nothing to do" if out_of_time() else "")
    if dry_run:
        report.dry_run = True
        if out_of_time():
            report.out_of_time = pending
        else:
            report.planned, report.deferred = pending[:max_dates], pending[max_dates:]
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
            tag_date(
                model,
                input_templates,
                output_template,
                day,
                overwrite,
                tagger,
                tag_options,
                report,
                before_commit=lambda: check_lease(lease),
                failures=failures,
            )
        return None

    def budget_left() -> bool:
        return len(report.committed) + len(report.failed) + len(report.lost) < max_dates

    held = []  # (date, holder's claim)
    for i, day in enumerate(pending):
        if not budget_left():
            report.deferred = pending[i:]
            break
        if out_of_time():
            report.out_of_time = pending[i:]
            log.warning("%s has passed: not starting %s; a later run tags them", stop, ", ".join(pending[i:]))
            break
        holder = attempt(day)
        if holder:
            held.append((day, holder))
    if held and recheck_leased and budget_left() and not out_of_time():
        wait = min(max(c.expires for _, c in held) - time.time(), lease_ttl_s) + settle_s
        if stop is not None and clock() + wait >= stop.at:
            log.info(
                "%d date(s) leased by other runs; not waiting %.0f s for their leases: past %s", len(held), wait, stop
            )
        else:
            log.info(
                "%d date(s) leased by other runs; checking them again in %.0f s, when their leases expire unless "
                "renewed",
                len(held),
                wait,
            )
            time.sleep(max(wait, 0.0))
            held = [(day, attempt(day) if budget_left() and not out_of_time() else holder) for day, holder in held]
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
        log.info(
            "set aside after %d failed runs in a row: %s (%d due for a retry, after the other dates)",
            failures.set_aside_after,
            ", ".join(aside),
            len(due),
        )
    return [d for d in plan.pending if d not in aside] + due


def check_lease(lease: Lease) -> None:
    """``before_commit``: renew the lease (its claims read again, not only the heartbeat's
    flag); raise LeaseLost if another run took it over, so nothing is committed."""
    if lease.lost.is_set() or not lease.renew():
        lease.lost.set()
        raise LeaseLost(
            f"{lease.key}: the lease was taken over by another run (this run stalled past its "
            f"expiry); not committing. The staged files stay for the run that holds it"
        )


def earlier_nights(output: DateTemplate, date: str, count: int = BASELINE_NIGHTS) -> list[str]:
    """The committed outputs of the ``count`` latest dates before ``date``: its report's baselines
    (a week pooled: steadier than one night, and weekly patterns average out)."""
    earlier = [d for d in output.dates() if d < date and is_committed(output, d)]
    return [output.fill(d) for d in earlier[-count:]]


def tag_date(
    model: str,
    inputs: list[DateTemplate],
    output: DateTemplate,
    date: str,
    overwrite: bool,
    tagger,
    tag_options: dict,
    report: NightlyReport,
    *,
    before_commit=None,
    failures: FailureRecords | None = None,
) -> None:
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
    log.info(
        "%s: tagging %s -> %s%s",
        date,
        ", ".join(t.fill(date) for t in inputs),
        output.fill(date),
        f" (re-opened: {changes})" if changes else "",
    )
    if not tag_options.get("baselines") and tag_options.get("report", True):
        tag_options = {**tag_options, "baselines": earlier_nights(output, date)}
    try:
        summary = tagger(
            model,
            [t.fill(date) for t in inputs],
            output.fill(date),
            overwrite=overwrite,
            keep_unchanged=bool(changes),
            before_commit=before_commit,
            **tag_options,
        )
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
            reason += (
                f" (failed on {record['failures']} runs in a row: set aside, retried "
                f"{failures.retry_s / 86400:g} days after each failure, after the other dates)"
            )
        report.failed.append((date, reason))
        return
    if failures is not None:
        failures.clear(date)
    if changes:
        report.reopened.append((date, changes))
    report_note = f"; report: {summary.report}" if summary.report else ""
    report.committed.append((date, summary.line() + report_note))
