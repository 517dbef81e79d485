"""The report of a committed tagging output: ``write_tagging_report``, for people who look every night.

    OUTPUT/_SUCCESS, _manifest.json, *.parquet        a committed run (emotions.tagging)
    OUTPUT/_report.md                                 what to look at, called-out drift first
    OUTPUT/_report/emotions.png, groups.png, top_score.png
    OUTPUT/_report.json                               the counts and the drift, as numbers

What it shows: each label's share of the tagged rows beside its share in the validation data of
the bundle that tagged them (the reference: true there, and tagged there held out), Ekman and
sentiment shares, the share of rows flagged by reason, the ``top_score`` distribution, and,
against earlier committed runs (the baselines), drift per label, the labels beyond the threshold
called out at the top. Counting and drift: emotions.tagging.report_counts; the reference:
emotions.tagging.report_reference; the pages: emotions.tagging.report_pages.

Baselines are pooled: their counts are added up and the run is compared with that sum. Against
one earlier night a label moves with that night's topics and noise; the pool of the last few
nights is steadier, and one odd night in it does not raise an alarm by itself. Pass the runs to
compare with (the nightly job passes the previous committed dates).

Files. Every name starts with ``_``: pyarrow, pandas and Spark skip ``_``- and ``.``-prefixed
files and folders when they read a folder as Parquet (Ray Data reads only ``*.parquet``), so
the report never reaches a reader of the tagged rows. The report is written after ``_SUCCESS`` (it
needs the committed rows), each file
whole or not at all, and the next commit into the folder deletes it with the previous output.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from emotions.storage import Folder
from emotions.tagging.commit import MANIFEST, REPORT_JSON, REPORT_MD, SUCCESS
from emotions.tagging.commit import REPORT_PLOTS as PLOTS  # folder of the PNGs
from emotions.tagging.report_counts import (
    COLUMNS,
    MIN_Z,
    PSI_BINS,
    PSI_LIMIT,
    SHARE_RATIO,
    Counts,
    count_run,
    label_drift,
    psi,
)
from emotions.tagging.report_pages import markdown, plot_emotions, plot_groups, plot_top_score
from emotions.tagging.report_reference import read_reference

log = logging.getLogger("emotions.report")

FORMAT = "emotions-tagging-report"
VERSION = 1


class ReportError(ValueError):
    """A folder that is not a committed tagging output; the message names it and the fix."""


def parquet_files(folder: Folder) -> list[str]:
    """The output's Parquet files (filesystem paths), as readers see them: ``_``/``.`` names skipped."""
    return sorted(
        i.path
        for i in folder.list()
        if i.type == pafs.FileType.File and not i.base_name.startswith(("_", ".")) and i.base_name.endswith(".parquet")
    )


def check_columns(folder: Folder, path: str) -> None:
    names = pq.read_schema(path, filesystem=folder.fs).names
    missing = [c for c in COLUMNS if c not in names]
    if missing:
        raise ReportError(
            f"{folder.uri} has Parquet files without the columns {missing} (e.g. {path}): "
            "it is not an `emotions tag` output; pass the folder `emotions tag --output` wrote"
        )


def read_run(uri: str, ray_address: str | None = None) -> tuple[Folder, dict, Counts]:
    """(folder, its _SUCCESS record, its counts): counted, or read from the run's own
    _report.json when that report was made for this same committed run."""
    folder = Folder.from_uri(uri)
    success = check_committed(folder)
    stored = folder.read_json(REPORT_JSON) or {}
    if (
        (stored.get("format"), stored.get("version")) == (FORMAT, VERSION)
        and success.get("run_id")
        and stored.get("run_id") == success["run_id"]
    ):
        return folder, success, Counts(**stored["counts"])
    files = parquet_files(folder)
    if files:
        check_columns(folder, files[0])
    return folder, success, count_run(folder, files, ray_address)


def check_committed(folder: Folder) -> dict:
    if not folder.exists(SUCCESS):
        what = "does not exist" if not folder.exists() else f"has no {SUCCESS}, so its tagging run never committed"
        raise ReportError(
            f"{folder.uri} {what}: a report needs a committed `emotions tag` output "
            "(finish it by re-running the same `emotions tag` command)"
        )
    return folder.read_json(SUCCESS) or {}


@dataclass(frozen=True)
class ReportSummary:
    report: str  # URI (or path) of _report.md
    data: str  # of _report.json
    plots: tuple[str, ...]
    rows: int
    tagged: int
    flagged: int
    baselines: tuple[str, ...]
    called_out: tuple[str, ...]  # labels beyond the drift threshold, largest change first
    top_score_psi: float | None  # None without baselines
    top_score_called_out: bool = False

    def line(self) -> str:
        against = f"against {len(self.baselines)} baseline run(s)" if self.baselines else "without baselines"
        return f"report of {self.rows:,} rows ({self.flagged:,} flagged) {against}: {self.report}"

    def called_out_line(self) -> str:
        if self.top_score_psi is None:
            return "called out: - (no drift without a baseline)"
        names = [*self.called_out, *(["top_score"] if self.top_score_called_out else [])]
        return f"called out: {', '.join(names) or 'nothing'}"


def write_tagging_report(
    tagged: str, baselines: list[str] | tuple[str, ...] = (), ray_address: str | None = None
) -> ReportSummary:
    """Write ``_report.md``, ``_report/*.png`` and ``_report.json`` into the committed tagging
    output ``tagged`` (a local folder or a URI such as s3://bucket/tagged/2026-11-25), comparing
    it with the pooled ``baselines`` (earlier committed outputs). Counts on the Ray cluster at
    ``ray_address`` (None: the current one, ``RAY_ADDRESS``, else a local Ray). Raises ReportError,
    before any counting, for a folder that is
    not a committed output."""
    folder = Folder.from_uri(tagged)
    check_committed(folder)
    for uri in baselines:
        check_committed(Folder.from_uri(uri))
    if any(Folder.from_uri(uri).uri == folder.uri for uri in baselines):
        raise ReportError(f"{folder.uri} is among its own baselines; pass earlier runs only")
    folder, success, counts = read_run(tagged, ray_address)
    runs = [read_run(uri, ray_address) for uri in baselines]
    pooled = None
    for _, _, run in runs:
        pooled = run if pooled is None else pooled.add(run)
    if pooled is not None and not (pooled.tagged and counts.tagged):
        pooled = None  # shares of nothing: no drift to compute
    drift = label_drift(counts, pooled) if pooled else []
    called = sorted((d for d in drift if d.called_out), key=lambda d: -abs(math.log(d.ratio)))
    score_psi = psi(counts.top_score_bins, pooled.top_score_bins) if pooled else None
    manifest = folder.read_json(MANIFEST) or {}
    reference = read_reference(manifest)
    data = {
        "format": FORMAT,
        "version": VERSION,
        "output": folder.uri,
        "run_id": success.get("run_id"),
        "created_utc": manifest.get("created_utc"),
        "model": manifest.get("model", {}).get("hash"),
        "counts": asdict(counts),
        "reference": reference,  # the bundle's validation shares; None if unknown
        "baselines": [
            {"output": f.uri, "run_id": s.get("run_id"), "rows": c.rows, "tagged": c.tagged} for f, s, c in runs
        ],
        "rule": {"share_ratio": SHARE_RATIO, "min_z": MIN_Z, "psi_bins": PSI_BINS, "psi_limit": PSI_LIMIT},
        "drift": [asdict(d) for d in drift],
        "called_out": [d.label for d in called],
        "top_score_psi": score_psi,
    }
    plots = {
        "emotions.png": plot_emotions(counts, pooled, drift, reference),
        "groups.png": plot_groups(counts, pooled),
        "top_score.png": plot_top_score(counts, pooled),
    }
    for name, png in plots.items():
        folder.write_bytes_atomic(png, PLOTS, name)
    folder.write_bytes_atomic(markdown(data, counts, pooled, drift, called, reference).encode(), REPORT_MD)
    folder.write_json_atomic(data, REPORT_JSON)
    summary = ReportSummary(
        report=folder.uri_of(REPORT_MD),
        data=folder.uri_of(REPORT_JSON),
        plots=tuple(folder.uri_of(PLOTS, name) for name in plots),
        rows=counts.rows,
        tagged=counts.tagged,
        flagged=counts.flagged,
        baselines=tuple(f.uri for f, _, _ in runs),
        called_out=tuple(d.label for d in called),
        top_score_psi=score_psi,
        top_score_called_out=score_psi is not None and score_psi > PSI_LIMIT,
    )
    log.info("%s; %s", summary.line(), summary.called_out_line())
    return summary
