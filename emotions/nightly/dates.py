"""Which dates a nightly run tags: the ``{date}`` templates of --input/--output, each date's dump
(its Parquet files, whether it is ready), and the plan (pending, re-opened, committed, waiting).
See ``emotions.nightly`` for the rules."""

from __future__ import annotations

import datetime as dt
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pyarrow.fs as pafs

from emotions.storage import Folder
from emotions.tagging.commit import MANIFEST, SUCCESS  # what a commit writes: the committed inputs, written last

DATE = "{date}"  # the placeholder in --input/--output
DATE_PATTERN = r"\d{4}-\d{2}-\d{2}"
READY_MARKER = "_SUCCESS"  # what Spark/Hadoop write last into a finished partition; "" = no check


class NightlyError(ValueError):
    """A nightly run that cannot start; the message names the flag or path and the fix."""


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
            raise NightlyError(
                f"{flag} {text!r} has no {DATE}: name the date partitions, e.g. s3://bucket/dumps/dt={DATE}/"
            )
        head, _, rest = text.partition(DATE)
        parent, slash, prefix = head.rpartition("/")
        suffix = rest.split("/", 1)[0]
        if not slash or not parent or parent.endswith(":") or parent.endswith(":/"):
            raise NightlyError(
                f"{flag} {text!r}: {DATE} must be in a folder or file name inside a "
                f"folder that holds one entry per date, e.g. dumps/dt={DATE}/"
            )
        if any(ch in prefix + suffix for ch in "*?[]{}"):
            raise NightlyError(
                f"{flag} {text!r}: the name around {DATE} must be plain text; put globs "
                f"in the path after it, e.g. dumps/dt={DATE}/*.parquet"
            )
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
            infos.update(
                (i.path, i)
                for i in fs.get_file_info(pafs.FileSelector(root.root, recursive=True, allow_not_found=True))
            )
        except (OSError, ValueError):  # the partition is a file: asked for one by one below
            pass
    missing = [p for p, _ in paths if p not in infos]
    infos.update((i.path, i) for i in (fs.get_file_info(missing) if missing else []))
    files = {uri: infos[p].size for p, uri in paths}
    newest = max((infos[p].mtime.timestamp() for p, _ in paths if infos[p].mtime), default=0.0)
    mtimes = {uri: int(infos[p].mtime.timestamp()) for p, uri in paths if infos[p].mtime}
    return DumpListing(files, newest, mtimes)


def readiness_problem(
    inputs: list[DateTemplate], date: str, listing: DumpListing, ready_marker: str | None, min_age_s: float
) -> str | None:
    """Why the date's dump is not ready to tag yet (the producer may still be writing it), or None."""
    for template in inputs if ready_marker else []:
        partition = Folder.from_uri(template.partition(date))
        if not partition.is_file(ready_marker):
            where = (
                (
                    f"{partition.uri} is a file, which holds no marker (pass --ready-marker '' for a "
                    "file-per-date layout)"
                )
                if partition.is_file()
                else f"no {ready_marker} in {partition.uri} yet"
            )
            return f"{where}; the producer writes it last (--ready-marker '' tags without it)"
    age = time.time() - listing.newest
    if min_age_s and age < min_age_s:
        return f"newest input file written {age:.0f} s ago; tagged once it is {min_age_s:.0f} s old (--min-age)"
    return None


def input_changes(manifest: dict | None, listing: DumpListing) -> str | None:
    """ "1 new file, 0 changed, 0 removed" when the dump's files differ (path, bytes) from the
    ``inputs`` of a committed manifest; None when they match or there is nothing to compare
    (no manifest, or one without inputs: never re-opened)."""
    if not manifest or not isinstance(manifest.get("inputs"), list):
        return None
    committed = {i.get("path"): i for i in manifest["inputs"]}
    skipped = {s.get("path"): s for s in manifest.get("skipped_files") or []}  # bad files left out on purpose
    new = [p for p in listing.files if p not in committed and p not in skipped]
    changed = [
        p
        for p, size in listing.files.items()
        if (p in committed and rewritten(committed[p], size, listing, p))
        or (p in skipped and skipped[p].get("bytes") not in (None, size))
    ]  # a bad file replaced
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


def plan_dates(
    inputs: list[DateTemplate],
    output: DateTemplate,
    *,
    since: str | None = None,
    until: str | None = None,
    ready_marker: str | None = READY_MARKER,
    min_age_s: float = 0.0,
) -> DatePlan:
    """Every date in ``[since, until]`` with an entry under the first input's parent (``until``
    defaults to yesterday, UTC), classified by ``check_date``."""
    until = until or yesterday_utc()
    dates = [d for d in inputs[0].dates() if (since is None or d >= since) and d <= until]
    return check_dates(inputs, output, dates, ready_marker=ready_marker, min_age_s=min_age_s)


def check_dates(
    inputs: list[DateTemplate], output: DateTemplate, dates: list[str], *, ready_marker: str | None, min_age_s: float
) -> DatePlan:
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


def check_date(
    inputs: list[DateTemplate], output: DateTemplate, date: str, ready_marker: str | None, min_age_s: float
) -> tuple[str, str | None]:
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
