"""``<output root>/_failures/<date>.json``: the dates that failed on the last runs, and when a date
failed often enough in a row to be set aside (see ``emotions.nightly``)."""

from __future__ import annotations

import datetime as dt
import logging
import time
from dataclasses import dataclass

from emotions.nightly.dates import parse_date
from emotions.storage import Folder

log = logging.getLogger("emotions.nightly")

FAILURES = "_failures"  # beside the date partitions of the output: <date>.json per date that failed lately
SET_ASIDE_AFTER = 3  # failures on consecutive runs before a date is set aside
SET_ASIDE_RETRY_S = 7 * 86400.0  # a set-aside date is retried this long after its last failure


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
        return (
            f"failed on {record['failures']} runs in a row (last: {record.get('reason')}); "
            f"retried after {retry:%Y-%m-%d %H:%M} UTC (--set-aside-retry-days)"
        )

    def add(self, date: str, reason: str) -> dict:
        """Count one more failed run for ``date``; the record as written."""
        now = time.time()
        record = self.folder.read_json(f"{date}.json") or {"date": date, "failures": 0, "first_failed": now}
        record.update(
            failures=int(record["failures"]) + 1,
            last_failed=now,
            reason=reason,
            last_failed_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
        )
        self.folder.write_json(record, f"{date}.json")
        return record

    def clear(self, date: str) -> None:
        self.folder.delete(f"{date}.json")


def record_failure(failures: FailureRecords, date: str, reason: str) -> dict | None:
    try:
        return failures.add(date, reason)
    except Exception:  # the date's failure is reported either way; only the count is missed
        log.exception("%s: could not record the failure in %s", date, failures.folder.uri)
        return None
