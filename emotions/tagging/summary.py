"""``TagSummary``: what one tagging run did (or found already done), and its one-line report."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TagSummary:
    rows_in: int
    rows_out: int
    rows_flagged: int
    seconds: float
    rows_per_s: float  # rows tagged by this run (resumed files excluded) per second of it
    output: str
    manifest: str
    files: int = 0
    files_resumed: int = 0
    files_skipped: tuple[str, ...] = ()  # unreadable inputs left out (on_bad_file="skip")
    report: str | None = None  # the output's _report.md, when one was written
    files_reused: int = 0  # output files of unchanged inputs kept from the committed output
    unchanged: bool = False  # already committed with these settings and inputs: nothing was done

    def line(self) -> str:
        if self.unchanged:
            return (
                f"{self.output} is already committed with these settings and inputs ({self.rows_out:,} "
                f"rows from {self.files} files): nothing to do"
            )
        skipped = f", {len(self.files_skipped)} bad files skipped" if self.files_skipped else ""
        resumed = f", {self.files_resumed} files resumed" if self.files_resumed else ""
        resumed += f", {self.files_reused} unchanged files kept" if self.files_reused else ""
        return (
            f"tagged {self.rows_out:,} rows ({self.rows_flagged:,} flagged) from {self.files} "
            f"files in {self.seconds:.1f}s, {self.rows_per_s:,.0f} rows/s{resumed}{skipped} "
            f"-> {self.output}"
        )
