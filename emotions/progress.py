"""Progress lines with rate and ETA for long loops (training epochs, feature passes, tagging)."""

from __future__ import annotations

import logging
import time

log = logging.getLogger("emotions.progress")


def format_seconds(seconds: float) -> str:
    seconds = int(max(0, seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


class Progress:
    """Logs ``what: step/total, rate, ETA`` at most every ``every`` seconds (and at the end)."""

    def __init__(
        self,
        what: str,
        total: int,
        enabled: bool = True,
        every: float = 15.0,
        unit_scale: int = 1,
        unit: str = "samples",
    ):
        self.what, self.total, self.enabled, self.every = what, total, enabled, every
        self.unit_scale, self.unit = unit_scale, unit
        self.done = 0
        self.start = self.last = time.perf_counter()

    def step(self, n: int = 1, **values: float) -> None:
        self.done += n
        now = time.perf_counter()
        if not self.enabled or (now - self.last < self.every and self.done < self.total):
            return
        self.last = now
        elapsed = now - self.start
        rate = self.done / max(elapsed, 1e-9)
        eta = (self.total - self.done) / max(rate, 1e-9)
        extra = " ".join(f"{k}={v:.4f}" for k, v in values.items())
        log.info(
            "%s: %d/%d (%.0f%%) %.1f %s/s %s ETA %s",
            self.what,
            self.done,
            self.total,
            100.0 * self.done / max(self.total, 1),
            rate * self.unit_scale,
            self.unit,
            extra,
            format_seconds(eta),
        )
