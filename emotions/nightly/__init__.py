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

Stopping in time (``stop``: ``--stop-by``/``--stop-after``, ``StopTime``). A run starts no date
once its stop has passed: the date in hand is finished and committed, the others are reported
"out of time" and left for the next run, and that shortfall alone is a success (exit 0), so a
RayJob does not retry it. ``--stop-by 06:00`` names one instant that every attempt of a night
reads alike (the 06:00 UTC within 12 hours of the attempt's start), so a retried RayJob, whose
``activeDeadlineSeconds`` starts again with each attempt, still stops at 06:00.

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

from emotions.leases import LEASE_TTL_S, SETTLE_S, new_owner
from emotions.nightly.dates import (
    DATE,
    DATE_PATTERN,
    MANIFEST,
    READY_MARKER,
    SUCCESS,
    DatePlan,
    DateTemplate,
    DumpListing,
    NightlyError,
    check_date,
    check_dates,
    input_changes,
    is_committed,
    list_dump,
    parse_date,
    plan_dates,
    readiness_problem,
    yesterday_utc,
)
from emotions.nightly.failures import FAILURES, SET_ASIDE_AFTER, SET_ASIDE_RETRY_S, FailureRecords, record_failure
from emotions.nightly.run import (
    BASELINE_NIGHTS,
    LEASES,
    MAX_DATES,
    DateLease,
    LeaseLost,
    NightlyReport,
    check_lease,
    earlier_nights,
    order_failed_last,
    tag_date,
    tag_nightly,
)

__all__ = [
    "BASELINE_NIGHTS",
    "DATE",
    "DATE_PATTERN",
    "FAILURES",
    "LEASES",
    "LEASE_TTL_S",
    "MANIFEST",
    "MAX_DATES",
    "READY_MARKER",
    "SET_ASIDE_AFTER",
    "SET_ASIDE_RETRY_S",
    "SETTLE_S",
    "SUCCESS",
    "DateLease",
    "DatePlan",
    "DateTemplate",
    "DumpListing",
    "FailureRecords",
    "LeaseLost",
    "NightlyError",
    "NightlyReport",
    "check_date",
    "check_dates",
    "check_lease",
    "earlier_nights",
    "input_changes",
    "is_committed",
    "list_dump",
    "new_owner",
    "order_failed_last",
    "parse_date",
    "plan_dates",
    "readiness_problem",
    "record_failure",
    "tag_date",
    "tag_nightly",
    "yesterday_utc",
]
