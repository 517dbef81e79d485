"""The report of a committed tagging output: ``write_report``, for people who look every night.

    OUTPUT/_SUCCESS, _manifest.json, *.parquet        a committed run (emotions.tagging)
    OUTPUT/_report.md                                 what to look at, called-out drift first
    OUTPUT/_report/emotions.png, groups.png, top_score.png
    OUTPUT/_report.json                               the counts and the drift, as numbers

What it shows: each label's share of the tagged rows, Ekman and sentiment shares, the share of
rows flagged by reason, the ``top_score`` distribution, and, against earlier committed runs
(the baselines), drift per label, the labels beyond the threshold called out at the top.

Counting. One Ray Data pass over the output's Parquet files, reading only the five columns it
needs: ``count_block`` turns each block into a few dozen (kind, key, value) rows with
vectorised pyarrow/numpy (label counts, group counts, reasons, a 20-bin histogram), and the
driver sums those as they stream in. The driver never holds tagged rows, only about a hundred
numbers per block, so the pass scales with the corpus like the tagging does; a groupby in Ray
Data would shuffle those few rows between tasks for nothing. A run's counts never change once it
is committed, so they are stored in ``_report.json`` with the run's id (from ``_SUCCESS``) and
read back from there when that run is a baseline, instead of counted again.

Baselines are pooled: their counts are added up and the run is compared with that sum. Against
one earlier night a label moves with that night's topics and noise; the pool of the last few
nights is steadier, and one odd night in it does not raise an alarm by itself. Pass the runs to
compare with (the nightly job passes the previous committed dates).

Drift per label. A label is called out when its share of tagged rows changed by a factor of at
least ``SHARE_RATIO`` either way *and* by at least ``MIN_Z`` standard errors (see the constants
for why both). ``top_score``'s distribution is compared with the population stability index
(PSI) over ten bins, the setting that index's usual thresholds were made for.

Files. Every name starts with ``_``: pyarrow, pandas and Spark skip ``_``- and ``.``-prefixed
files and folders when they read a folder as Parquet (Ray Data reads only ``*.parquet``), so
the report never reaches a reader of the tagged rows. The report is written after ``_SUCCESS`` (it needs the committed rows), each file
whole or not at all, and the next commit into the folder deletes it with the previous output.
"""

from __future__ import annotations

import io
import logging
import math
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from emotions import cluster
from emotions.labels import EKMAN, EMOTIONS, SENTIMENT
from emotions.storage import Folder

log = logging.getLogger("emotions.report")

FORMAT = "emotions-tagging-report"
VERSION = 1
SUCCESS = "_SUCCESS"  # tagging.SUCCESS: written last by a commit, holds the run's id
MANIFEST = "_manifest.json"  # tagging.MANIFEST
REPORT_MD = "_report.md"
REPORT_JSON = "_report.json"
PLOTS = "_report"  # folder of the PNGs
COLUMNS = ["emotions", "ekman", "sentiment", "top_score", "error"]  # what the counts read
NONE = "(none)"  # key for tagged rows with no label (no Ekman group, no sentiment)
SCORE_BINS = 20  # top_score histogram over [0, 1], 0.05 wide
READ_CPUS = 0.25  # per read-and-count task: decoding five columns and counting is light
# A label is called out when both hold:
# - its share of tagged rows went up by at least half, or down by at least a third (ratio 1.5
#   either way). An effect size, not a divergence: the PSI or Jensen-Shannon distance of a
#   label's present/absent split shrinks with the label's share, so their usual thresholds
#   (PSI > 0.2, JS distance > 0.1) miss a tripled share unless the label is common: PSI 0.12 for
#   5% -> 15% and 0.02 for 1% -> 3%; JS distance 0.06 for 1% -> 3% and 0.03 for grief's
#   0.2% -> 0.6%. A ratio treats grief (0.2% of GoEmotions) like neutral (33%).
# - the change is at least 4 standard errors of the two-proportion z-test: sampling noise alone
#   crosses that with probability 6e-5 per label, so about once in 1.5 years of nightly reports
#   over 28 labels. On a small corpus this keeps a rare label's noisy ratio from being called
#   out; on millions of rows the ratio is what decides.
SHARE_RATIO = 1.5
MIN_Z = 4.0
# top_score: PSI over ten 0.1-wide bins, called out above 0.25, the usual "significant shift" rule
# (< 0.1 stable, 0.1-0.25 moderate). Sampling noise adds about (bins - 1) * (1/n + 1/m) to it,
# under 0.01 for runs of a few thousand rows or more.
PSI_BINS = 10
PSI_LIMIT = 0.25


class ReportError(ValueError):
    """A folder that is not a committed tagging output; the message names it and the fix."""


# ----------------------------------------------------------------------------- counts


@dataclass
class Counts:
    """What a report needs from a committed run, as sums (so runs can be pooled)."""

    rows: int = 0
    tagged: int = 0
    reasons: dict[str, int] = field(default_factory=dict)  # flag reason -> rows
    emotions: dict[str, int] = field(default_factory=lambda: dict.fromkeys([*EMOTIONS, NONE], 0))
    ekman: dict[str, int] = field(default_factory=lambda: dict.fromkeys([*EKMAN, NONE], 0))
    sentiment: dict[str, int] = field(default_factory=lambda: dict.fromkeys([*SENTIMENT, NONE], 0))
    top_score_bins: list[int] = field(default_factory=lambda: [0] * SCORE_BINS)
    top_score_sum: float = 0.0

    @property
    def flagged(self) -> int:
        return self.rows - self.tagged

    def add(self, other: Counts) -> Counts:
        """The pooled counts of both runs (a new object)."""
        out = Counts(self.rows + other.rows, self.tagged + other.tagged)
        for name in ("reasons", "emotions", "ekman", "sentiment"):
            mine, theirs = getattr(self, name), getattr(other, name)
            setattr(out, name, {k: mine.get(k, 0) + theirs.get(k, 0) for k in {**mine, **theirs}})
        out.top_score_bins = [a + b for a, b in zip(self.top_score_bins, other.top_score_bins)]
        out.top_score_sum = self.top_score_sum + other.top_score_sum
        return out

    @classmethod
    def from_totals(cls, totals: dict[tuple[str, str], float]) -> Counts:
        """{(kind, key): value} summed over the blocks -> Counts."""
        out = cls(rows=int(totals.get(("rows", ""), 0)), tagged=int(totals.get(("tagged", ""), 0)),
                  top_score_sum=float(totals.get(("top_score_sum", ""), 0.0)))  # fmt: skip
        for (kind, key), value in totals.items():
            if kind in ("reasons", "emotions", "ekman", "sentiment"):
                getattr(out, kind)[key] = int(value)
            elif kind == "top_score_bin":
                out.top_score_bins[int(key)] = int(value)
        return out


def count_block(block: pa.Table) -> pa.Table:
    """One block of tagged rows -> its counts as rows ``kind | key | value`` (float64): rows,
    tagged, flag reasons, each label, Ekman group and sentiment (``NONE``: tagged rows whose list
    is empty), the top_score histogram and sum. Flagged rows have null lists and a null score,
    so they count only as rows and by reason."""
    rows = [("rows", "", block.num_rows), ("tagged", "", pc.sum(pc.is_null(block["error"])).as_py() or 0)]
    rows += _value_counts("reasons", pc.drop_null(block["error"]))
    for kind in ("emotions", "ekman", "sentiment"):
        rows += _value_counts(kind, pc.list_flatten(block[kind]))
        rows.append((kind, NONE, pc.sum(pc.equal(pc.list_value_length(block[kind]), 0)).as_py() or 0))
    scores = pc.drop_null(block["top_score"]).to_numpy().astype(np.float64)  # [tagged rows]
    histogram, _ = np.histogram(np.clip(scores, 0.0, 1.0), bins=SCORE_BINS, range=(0.0, 1.0))
    rows += [("top_score_bin", str(i), n) for i, n in enumerate(histogram.tolist())]
    rows.append(("top_score_sum", "", float(scores.sum())))
    kinds, keys, values = zip(*rows)
    return pa.table({"kind": pa.array(kinds, pa.string()), "key": pa.array(keys, pa.string()),
                     "value": pa.array(values, pa.float64())})  # fmt: skip


def _value_counts(kind: str, values: pa.ChunkedArray | pa.Array) -> list[tuple[str, str, int]]:
    counted = pc.value_counts(values)
    return [(kind, key, n) for key, n in zip(counted.field("values").to_pylist(), counted.field("counts").to_pylist())]


def count_run(folder: Folder) -> Counts:
    """The counts of a committed output folder: one Ray Data pass over its Parquet files."""
    import ray

    files = parquet_files(folder)
    if not files:
        return Counts()
    check_columns(folder, files[0])
    cluster.connect()
    blocks = (ray.data.read_parquet(files, filesystem=folder.fs, num_cpus=READ_CPUS).select_columns(COLUMNS)
              .map_batches(count_block, batch_format="pyarrow", batch_size=None, num_cpus=READ_CPUS))  # fmt: skip
    totals: dict[tuple[str, str], float] = {}
    for batch in blocks.iter_batches(batch_format="pyarrow", batch_size=None):
        for kind, key, value in zip(*(batch[name].to_pylist() for name in ("kind", "key", "value"))):
            totals[kind, key] = totals.get((kind, key), 0.0) + value
    return Counts.from_totals(totals)


def parquet_files(folder: Folder) -> list[str]:
    """The output's Parquet files (filesystem paths), as readers see them: ``_``/``.`` names skipped."""
    return sorted(i.path for i in folder.list() if i.type == pafs.FileType.File
                  and not i.base_name.startswith(("_", ".")) and i.base_name.endswith(".parquet"))  # fmt: skip


def check_columns(folder: Folder, path: str) -> None:
    names = pq.read_schema(path, filesystem=folder.fs).names
    missing = [c for c in COLUMNS if c not in names]
    if missing:
        raise ReportError(f"{folder.uri} has Parquet files without the columns {missing} (e.g. {path}): "
                          "it is not an `emotions tag` output; pass the folder `emotions tag --output` wrote")  # fmt: skip


def read_run(uri: str) -> tuple[Folder, dict, Counts]:
    """(folder, its _SUCCESS record, its counts): counted, or read from the run's own
    _report.json when that report was made for this same committed run."""
    folder = Folder.from_uri(uri)
    success = check_committed(folder)
    stored = folder.read_json(REPORT_JSON) or {}
    if (stored.get("format"), stored.get("version")) == (FORMAT, VERSION) and success.get("run_id") \
            and stored.get("run_id") == success["run_id"]:  # fmt: skip
        return folder, success, Counts(**stored["counts"])
    return folder, success, count_run(folder)


def check_committed(folder: Folder) -> dict:
    if not folder.exists(SUCCESS):
        what = "does not exist" if not folder.exists() else f"has no {SUCCESS}, so its tagging run never committed"
        raise ReportError(f"{folder.uri} {what}: a report needs a committed `emotions tag` output "
                          "(finish it by re-running the same `emotions tag` command)")  # fmt: skip
    return folder.read_json(SUCCESS) or {}


# ----------------------------------------------------------------------------- drift


@dataclass(frozen=True)
class LabelDrift:
    label: str
    share: float  # of this run's tagged rows
    baseline_share: float  # of the pooled baselines' tagged rows
    ratio: float  # share / baseline_share, each with half a row added (no division by zero)
    z: float  # two-proportion z statistic, pooled standard error
    called_out: bool


def label_drift(current: Counts, baseline: Counts) -> list[LabelDrift]:
    """One row per label (``EMOTIONS`` order): shares, ratio, z, and whether it is called out."""
    n, m = current.tagged, baseline.tagged
    out = []
    for label in EMOTIONS:
        x, y = current.emotions.get(label, 0), baseline.emotions.get(label, 0)
        ratio = ((x + 0.5) / (n + 1)) / ((y + 0.5) / (m + 1))
        pooled = (x + y) / max(n + m, 1)
        se = math.sqrt(pooled * (1 - pooled) * (1 / max(n, 1) + 1 / max(m, 1)))
        z = (x / max(n, 1) - y / max(m, 1)) / se if se > 0 else 0.0
        called = abs(math.log(ratio)) >= math.log(SHARE_RATIO) and abs(z) >= MIN_Z
        out.append(LabelDrift(label, x / max(n, 1), y / max(m, 1), ratio, z, called))
    return out


def psi(current: list[int], baseline: list[int], bins: int = PSI_BINS) -> float:
    """Population stability index of two histograms over the same range, merged to ``bins`` bins:
    sum((p - q) * ln(p / q)); empty bins get half a count so that the log stays finite."""
    p = np.asarray(current, dtype=np.float64).reshape(bins, -1).sum(axis=1) + 0.5
    q = np.asarray(baseline, dtype=np.float64).reshape(bins, -1).sum(axis=1) + 0.5
    p, q = p / p.sum(), q / q.sum()
    return float(np.sum((p - q) * np.log(p / q)))


# ----------------------------------------------------------------------------- the report


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


def write_report(tagged: str, baselines: list[str] | tuple[str, ...] = (), ray_address: str | None = None) -> ReportSummary:
    """Write ``_report.md``, ``_report/*.png`` and ``_report.json`` into the committed tagging
    output ``tagged`` (a local folder or a URI such as s3://bucket/tagged/2026-11-25), comparing
    it with the pooled ``baselines`` (earlier committed outputs). Counts on the Ray cluster at
    ``ray_address`` (None: the current one, ``RAY_ADDRESS``, else a local Ray). Raises ReportError, before any counting, for a folder that is
    not a committed output."""
    folder = Folder.from_uri(tagged)
    check_committed(folder)
    for uri in baselines:
        check_committed(Folder.from_uri(uri))
    if any(Folder.from_uri(uri).uri == folder.uri for uri in baselines):
        raise ReportError(f"{folder.uri} is among its own baselines; pass earlier runs only")
    cluster.connect(ray_address)
    folder, success, counts = read_run(tagged)
    runs = [read_run(uri) for uri in baselines]
    pooled = None
    for _, _, run in runs:
        pooled = run if pooled is None else pooled.add(run)
    if pooled is not None and not (pooled.tagged and counts.tagged):
        pooled = None  # shares of nothing: no drift to compute
    drift = label_drift(counts, pooled) if pooled else []
    called = sorted((d for d in drift if d.called_out), key=lambda d: -abs(math.log(d.ratio)))
    score_psi = psi(counts.top_score_bins, pooled.top_score_bins) if pooled else None
    manifest = folder.read_json(MANIFEST) or {}
    data = {
        "format": FORMAT, "version": VERSION, "output": folder.uri, "run_id": success.get("run_id"),
        "created_utc": manifest.get("created_utc"), "model": manifest.get("model", {}).get("hash"),
        "counts": asdict(counts),
        "baselines": [{"output": f.uri, "run_id": s.get("run_id"), "rows": c.rows, "tagged": c.tagged}
                      for f, s, c in runs],
        "rule": {"share_ratio": SHARE_RATIO, "min_z": MIN_Z, "psi_bins": PSI_BINS, "psi_limit": PSI_LIMIT},
        "drift": [asdict(d) for d in drift], "called_out": [d.label for d in called],
        "top_score_psi": score_psi,
    }  # fmt: skip
    plots = {"emotions.png": plot_emotions(counts, pooled, drift), "groups.png": plot_groups(counts, pooled),
             "top_score.png": plot_top_score(counts, pooled)}  # fmt: skip
    for name, png in plots.items():
        folder.write_bytes_atomic(png, PLOTS, name)
    folder.write_bytes_atomic(markdown(data, counts, pooled, drift, called).encode(), REPORT_MD)
    folder.write_json_atomic(data, REPORT_JSON)
    summary = ReportSummary(
        report=folder.uri_of(REPORT_MD), data=folder.uri_of(REPORT_JSON),
        plots=tuple(folder.uri_of(PLOTS, name) for name in plots), rows=counts.rows, tagged=counts.tagged,
        flagged=counts.flagged, baselines=tuple(f.uri for f, _, _ in runs),
        called_out=tuple(d.label for d in called), top_score_psi=score_psi,
        top_score_called_out=score_psi is not None and score_psi > PSI_LIMIT,
    )  # fmt: skip
    log.info("%s; %s", summary.line(), summary.called_out_line())
    return summary


def markdown(data: dict, counts: Counts, pooled: Counts | None, drift: list[LabelDrift],
             called: list[LabelDrift]) -> str:  # fmt: skip
    name = data["output"].rstrip("/").rsplit("/", 1)[-1]
    lines = [f"# Tagging report: {name}", "",
             f"`{data['output']}`: run {data['run_id']}, committed {data['created_utc']}, model {data['model']}.",
             f"{counts.rows:,} rows: {counts.tagged:,} tagged, {counts.flagged:,} flagged "
             f"({_pct(counts.flagged, counts.rows)}).", "", "## Drift", ""]  # fmt: skip
    lines += drift_lines(data, pooled, called)
    lines += ["", "## Emotions", "", "![emotion shares](_report/emotions.png)", "",
              "Share of tagged rows with each label (a row may have several)."
              + (" Ratio: this run's share over the baselines'; z: the change in standard errors." if pooled else ""),
              ""]  # fmt: skip
    if pooled:
        lines += ["| label | rows | share | baselines | ratio | z | |", "|---|---:|---:|---:|---:|---:|---|"]
        for d in drift:
            lines.append(f"| {d.label} | {counts.emotions.get(d.label, 0):,} | {d.share:.2%} | {d.baseline_share:.2%} "
                         f"| {d.ratio:.2f} | {d.z:+.1f} | {'**called out**' if d.called_out else ''} |")  # fmt: skip
    else:
        lines += ["| label | rows | share |", "|---|---:|---:|"]
        lines += [f"| {label} | {counts.emotions.get(label, 0):,} | {_pct(counts.emotions.get(label, 0), counts.tagged)} |"
                  for label in EMOTIONS]  # fmt: skip
    none = f"| {NONE} | {counts.emotions.get(NONE, 0):,} | {_pct(counts.emotions.get(NONE, 0), counts.tagged)} |"
    lines.append(none + (f" {_pct(pooled.emotions.get(NONE, 0), pooled.tagged)} | | | |" if pooled else ""))
    lines += ["", "## Ekman and sentiment", "", "![Ekman and sentiment shares](_report/groups.png)", ""]
    for title, kind in (("Ekman group", "ekman"), ("sentiment", "sentiment")):
        lines += [f"| {title} | rows | share |" + (" baselines |" if pooled else ""),
                  "|---|---:|---:|" + ("---:|" if pooled else "")]  # fmt: skip
        for key, rows in getattr(counts, kind).items():
            base = f" {_pct(getattr(pooled, kind).get(key, 0), pooled.tagged)} |" if pooled else ""
            lines.append(f"| {key} | {rows:,} | {_pct(rows, counts.tagged)} |{base}")
        lines.append("")
    lines += ["## Flagged rows", "", "Rows not tagged, by reason, as a share of all rows.", "",
              "| reason | rows | share |", "|---|---:|---:|"]  # fmt: skip
    lines += [f"| {reason} | {rows:,} | {_pct(rows, counts.rows)} |"
              for reason, rows in sorted(counts.reasons.items(), key=lambda item: -item[1])] or ["| (none) | 0 | 0% |"]
    lines += ["", "## top_score", "", "![top_score distribution](_report/top_score.png)", "",
              "The highest of the 28 probabilities of each tagged row. " + score_summary(counts), ""]  # fmt: skip
    if pooled:
        lines.append(f"Baselines: {score_summary(pooled)}")
    return "\n".join(lines) + "\n"


def drift_lines(data: dict, pooled: Counts | None, called: list[LabelDrift]) -> list[str]:
    if pooled is None:
        return ["No drift: it needs tagged rows in this run and in at least one baseline, an earlier "
                "committed output (`emotions report TAGGED_DIR --baseline DIR ...`)."]  # fmt: skip
    base = (f"{len(data['baselines'])} baseline run(s), pooled: {pooled.tagged:,} tagged rows "
            f"({', '.join(b['output'].rstrip('/').rsplit('/', 1)[-1] for b in data['baselines'])})")
    lines = []
    if called:
        lines.append(f"**Called out** against {base}:")
        lines += [f"- **{d.label}**: {d.baseline_share:.2%} -> {d.share:.2%} of tagged rows "
                  f"(x{d.ratio:.2f}, z = {d.z:+.1f})" for d in called]  # fmt: skip
    else:
        lines.append(f"No label called out against {base}.")
    score_psi = data["top_score_psi"]
    verdict = "**called out**" if score_psi > PSI_LIMIT else "stable" if score_psi < 0.1 else "moderate"
    lines += ["", f"top_score distribution: PSI {score_psi:.3f} ({verdict}).", "",
              f"Rule: a label is called out when its share of tagged rows changed by a factor of at least "
              f"{SHARE_RATIO} either way and by at least {MIN_Z:g} standard errors; top_score when its PSI "
              f"over {PSI_BINS} bins exceeds {PSI_LIMIT}."]  # fmt: skip
    return lines


def score_summary(counts: Counts) -> str:
    if not counts.tagged:
        return "No tagged rows."
    q10, q50, q90 = (histogram_quantile(counts.top_score_bins, q) for q in (0.1, 0.5, 0.9))
    return (f"Mean {counts.top_score_sum / counts.tagged:.3f}; 10th, 50th and 90th percentiles "
            f"{q10:.2f}, {q50:.2f}, {q90:.2f} (from the {SCORE_BINS}-bin histogram).")


def histogram_quantile(bins: list[int], q: float) -> float:
    """The q-quantile of a histogram over [0, 1], linear within the bin it falls in."""
    counts = np.asarray(bins, dtype=np.float64)
    cumulative = np.cumsum(counts)
    target = q * cumulative[-1]
    i = int(np.searchsorted(cumulative, target))
    before = cumulative[i - 1] if i else 0.0
    return (i + (target - before) / max(counts[i], 1.0)) / len(bins)


def _pct(part: int, whole: int) -> str:
    return f"{part / whole:.2%}" if whole else "-"


# ----------------------------------------------------------------------------- plots


def _figure(height: float):
    """An Agg figure 8 inches wide; plots set their margins themselves (tight_layout would draw
    the figure once more, a third of a plot's time)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, height))
    FigureCanvasAgg(fig)  # Agg: no display, no pyplot state
    return fig


def _png(fig) -> bytes:
    out = io.BytesIO()
    fig.savefig(out, format="png", dpi=100)
    return out.getvalue()


def _bars(ax, names: list[str], shares: list[float], baseline: list[float] | None, marked=()) -> None:
    """Horizontal bars, this run beside the baselines; ``marked`` names drawn in red. The caller
    adds one legend below the axes (inside them it would cover the longest bars)."""
    y = np.arange(len(names))
    height = 0.4 if baseline is not None else 0.8
    colors = ["tab:red" if name in marked else "tab:blue" for name in names]
    ax.barh(y - (height / 2 if baseline is not None else 0), shares, height, color=colors, label="this run")
    if baseline is not None:
        ax.barh(y + height / 2, baseline, height, color="tab:gray", alpha=0.6, label="baselines")
    ax.set_yticks(y, names)
    ax.invert_yaxis()
    ax.xaxis.set_major_formatter(lambda value, _: f"{value:.0%}")
    ax.grid(axis="x", alpha=0.3)


def plot_emotions(counts: Counts, pooled: Counts | None, drift: list[LabelDrift]) -> bytes:
    """Each label's share of tagged rows (PNG), called-out labels in red."""
    fig = _figure(8)
    ax = fig.add_subplot()
    names = [*EMOTIONS, NONE]
    shares = [counts.emotions.get(n, 0) / max(counts.tagged, 1) for n in names]
    base = [pooled.emotions.get(n, 0) / max(pooled.tagged, 1) for n in names] if pooled else None
    _bars(ax, names, shares, base, marked={d.label for d in drift if d.called_out})
    ax.set_title("Share of tagged rows per label" + (" (red: called out)" if pooled else ""))
    _legend_below(fig, ax, pooled)
    fig.subplots_adjust(left=0.17, right=0.97, top=0.96, bottom=0.08)
    return _png(fig)


def plot_groups(counts: Counts, pooled: Counts | None) -> bytes:
    """Ekman and sentiment shares of tagged rows (PNG), side by side."""
    fig = _figure(3.8)
    for i, (title, kind) in enumerate((("Ekman groups", "ekman"), ("Sentiment", "sentiment"))):
        ax = fig.add_subplot(1, 2, i + 1)
        names = list(getattr(counts, kind))
        shares = [getattr(counts, kind)[n] / max(counts.tagged, 1) for n in names]
        base = [getattr(pooled, kind).get(n, 0) / max(pooled.tagged, 1) for n in names] if pooled else None
        _bars(ax, names, shares, base)
        ax.set_title(title)
    _legend_below(fig, ax, pooled)
    fig.subplots_adjust(left=0.11, right=0.98, top=0.92, bottom=0.17, wspace=0.35)
    return _png(fig)


def _legend_below(fig, ax, pooled: Counts | None) -> None:
    if pooled:
        fig.legend(*ax.get_legend_handles_labels(), loc="lower center", ncol=2, frameon=False)


def plot_top_score(counts: Counts, pooled: Counts | None) -> bytes:
    """The top_score distribution as a share of tagged rows per 0.05 bin (PNG)."""
    fig = _figure(3.5)
    ax = fig.add_subplot()
    edges = np.linspace(0.0, 1.0, SCORE_BINS + 1)
    ax.stairs(np.asarray(counts.top_score_bins) / max(counts.tagged, 1), edges, fill=True, alpha=0.7, label="this run")
    if pooled:
        ax.stairs(np.asarray(pooled.top_score_bins) / max(pooled.tagged, 1), edges, color="black", label="baselines")
        ax.legend()
    ax.set_xlabel("top_score")
    ax.set_ylabel("share of tagged rows")
    ax.set_title("Highest label probability per tagged row")
    ax.grid(alpha=0.3)
    fig.subplots_adjust(left=0.1, right=0.98, top=0.91, bottom=0.14)
    return _png(fig)
