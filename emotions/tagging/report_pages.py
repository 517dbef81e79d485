"""The pages of a tagging report: ``_report.md`` and the three PNGs, from counts and drift."""

from __future__ import annotations

import io

import numpy as np

from emotions.labels import EMOTIONS
from emotions.tagging.report_counts import MIN_Z, NONE, PSI_BINS, PSI_LIMIT, SCORE_BINS, SHARE_RATIO, Counts, LabelDrift
from emotions.tagging.report_reference import HELDOUT


def markdown(
    data: dict,
    counts: Counts,
    pooled: Counts | None,
    drift: list[LabelDrift],
    called: list[LabelDrift],
    reference: dict | None = None,
) -> str:
    name = data["output"].rstrip("/").rsplit("/", 1)[-1]
    lines = [
        f"# Tagging report: {name}",
        "",
        f"`{data['output']}`: run {data['run_id']}, committed {data['created_utc']}, model {data['model']}.",
        f"{counts.rows:,} rows: {counts.tagged:,} tagged, {counts.flagged:,} flagged "
        f"({_pct(counts.flagged, counts.rows)}).",
        "",
        "## Drift",
        "",
    ]
    lines += drift_lines(data, pooled, called)
    lines += [
        "",
        "## Emotions",
        "",
        "![emotion shares](_report/emotions.png)",
        "",
        "Share of tagged rows with each label (a row may have several)."
        + (" Ratio: this run's share over the baselines'; z: the change in standard errors." if pooled else ""),
        "",
    ]
    if reference:
        lines += [reference_sentence(reference), ""]
    lines += emotion_table(counts, pooled, drift, reference)
    lines += ["", "## Ekman and sentiment", "", "![Ekman and sentiment shares](_report/groups.png)", ""]
    for title, kind in (("Ekman group", "ekman"), ("sentiment", "sentiment")):
        lines += [
            f"| {title} | rows | share |" + (" baselines |" if pooled else ""),
            "|---|---:|---:|" + ("---:|" if pooled else ""),
        ]
        for key, rows in getattr(counts, kind).items():
            base = f" {_pct(getattr(pooled, kind).get(key, 0), pooled.tagged)} |" if pooled else ""
            lines.append(f"| {key} | {rows:,} | {_pct(rows, counts.tagged)} |{base}")
        lines.append("")
    lines += [
        "## Flagged rows",
        "",
        "Rows not tagged, by reason, as a share of all rows.",
        "",
        "| reason | rows | share |",
        "|---|---:|---:|",
    ]
    lines += [
        f"| {reason} | {rows:,} | {_pct(rows, counts.rows)} |"
        for reason, rows in sorted(counts.reasons.items(), key=lambda item: -item[1])
    ] or ["| (none) | 0 | 0% |"]
    lines += [
        "",
        "## top_score",
        "",
        "![top_score distribution](_report/top_score.png)",
        "",
        "The highest of the 28 probabilities of each tagged row. " + score_summary(counts),
        "",
    ]
    if pooled:
        lines.append(f"Baselines: {score_summary(pooled)}")
    return "\n".join(lines) + "\n"


def reference_sentence(reference: dict) -> str:
    """What the reference columns are: the bundle's validation shares, held out where recorded."""
    rows = f"its {reference['examples']:,} validation rows" if reference.get("examples") else "its validation rows"
    tagged = (
        "the share of them the bundle tagged with the label, each row at thresholds fitted on the other half "
        "of the rows (held out)"
        if reference["source"] == HELDOUT
        else "– (the bundle was trained before it recorded how often it tags each label)"
    )
    return (
        f"Reference: the bundle that tagged this run, on {rows}. *validation true*: the share of them on "
        f"which the label is true; *validation tagged*: {tagged}; *x validation*: this run's share over "
        "validation true (far above 1: tagged here far more often than the label is true in validation)."
    )


def emotion_table(counts: Counts, pooled: Counts | None, drift: list[LabelDrift], reference: dict | None) -> list[str]:
    """One row per label and one for rows with none: rows and share, then the reference's columns
    (with a reference) and the baselines' (with baselines)."""
    head, rule = "| label | rows | share |", "|---|---:|---:|"
    if reference:
        head, rule = head + " validation true | validation tagged | x validation |", rule + "---:|---:|---:|"
    if pooled:
        head, rule = head + " baselines | ratio | z | |", rule + "---:|---:|---:|---|"
    lines = [head, rule]
    by_label = {d.label: d for d in drift}
    for label in [*EMOTIONS, NONE]:
        rows = counts.emotions.get(label, 0)
        cells = [label, f"{rows:,}", _pct(rows, counts.tagged)]
        if reference:
            cells += _reference_cells(reference["labels"].get(label), rows / counts.tagged if counts.tagged else None)
        if pooled and label in by_label:
            d = by_label[label]
            cells += [
                f"{d.baseline_share:.2%}",
                f"{d.ratio:.2f}",
                f"{d.z:+.1f}",
                "**called out**" if d.called_out else "",
            ]
        elif pooled:
            cells += [_pct(pooled.emotions.get(label, 0), pooled.tagged), "", "", ""]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _reference_cells(row: dict | None, share: float | None) -> list[str]:
    """validation true, validation tagged, x validation; "–" where unknown ("" for no label)."""
    if row is None:
        return ["", "", ""]
    true, tagged = row["true_share"], row.get("predicted_share")
    return [
        f"{true:.2%}",
        "–" if tagged is None else f"{tagged:.2%}",
        f"{share / true:.2f}" if share is not None and true > 0 else "–",
    ]


def drift_lines(data: dict, pooled: Counts | None, called: list[LabelDrift]) -> list[str]:
    if pooled is None:
        return [
            "No drift: it needs tagged rows in this run and in at least one baseline, an earlier "
            "committed output (`emotions report TAGGED_DIR --baseline DIR ...`)."
        ]
    base = (
        f"{len(data['baselines'])} baseline run(s), pooled: {pooled.tagged:,} tagged rows "
        f"({', '.join(b['output'].rstrip('/').rsplit('/', 1)[-1] for b in data['baselines'])})"
    )
    lines = []
    if called:
        lines.append(f"**Called out** against {base}:")
        lines += [
            f"- **{d.label}**: {d.baseline_share:.2%} -> {d.share:.2%} of tagged rows (x{d.ratio:.2f}, z = {d.z:+.1f})"
            for d in called
        ]
    else:
        lines.append(f"No label called out against {base}.")
    score_psi = data["top_score_psi"]
    verdict = "**called out**" if score_psi > PSI_LIMIT else "stable" if score_psi < 0.1 else "moderate"
    lines += [
        "",
        f"top_score distribution: PSI {score_psi:.3f} ({verdict}).",
        "",
        f"Rule: a label is called out when its share of tagged rows changed by a factor of at least "
        f"{SHARE_RATIO} either way and by at least {MIN_Z:g} standard errors; top_score when its PSI "
        f"over {PSI_BINS} bins exceeds {PSI_LIMIT}.",
    ]
    return lines


def score_summary(counts: Counts) -> str:
    if not counts.tagged:
        return "No tagged rows."
    q10, q50, q90 = (histogram_quantile(counts.top_score_bins, q) for q in (0.1, 0.5, 0.9))
    return (
        f"Mean {counts.top_score_sum / counts.tagged:.3f}; 10th, 50th and 90th percentiles "
        f"{q10:.2f}, {q50:.2f}, {q90:.2f} (from the {SCORE_BINS}-bin histogram)."
    )


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


def _bars(ax, names: list[str], shares: list[float], baseline: list[float] | None, marked=()) -> np.ndarray:
    """Horizontal bars, this run beside the baselines; ``marked`` names drawn in red. The caller
    adds one legend below the axes (inside them it would cover the longest bars). -> the y of
    this run's bars."""
    y = np.arange(len(names))
    height = 0.4 if baseline is not None else 0.8
    colors = ["tab:red" if name in marked else "tab:blue" for name in names]
    mine = y - (height / 2 if baseline is not None else 0)
    ax.barh(mine, shares, height, color=colors, label="this run")
    if baseline is not None:
        ax.barh(y + height / 2, baseline, height, color="tab:gray", alpha=0.6, label="baselines")
    ax.set_yticks(y, names)
    ax.invert_yaxis()
    ax.xaxis.set_major_formatter(lambda value, _: f"{value:.0%}")
    ax.grid(axis="x", alpha=0.3)
    return mine


def plot_emotions(
    counts: Counts, pooled: Counts | None, drift: list[LabelDrift], reference: dict | None = None
) -> bytes:
    """Each label's share of tagged rows (PNG), called-out labels in red; with a reference, a black
    diamond on each bar at the label's true share in the bundle's validation data."""
    fig = _figure(8)
    ax = fig.add_subplot()
    names = [*EMOTIONS, NONE]
    shares = [counts.emotions.get(n, 0) / max(counts.tagged, 1) for n in names]
    base = [pooled.emotions.get(n, 0) / max(pooled.tagged, 1) for n in names] if pooled else None
    y = _bars(ax, names, shares, base, marked={d.label for d in drift if d.called_out})
    if reference:
        true = [reference["labels"][n]["true_share"] if n in reference["labels"] else np.nan for n in names]
        ax.scatter(true, y, marker="D", s=16, color="black", zorder=3, label="validation (true share)")
    ax.set_title("Share of tagged rows per label" + (" (red: called out)" if pooled else ""))
    _legend_below(fig, ax)
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
    _legend_below(fig, ax)
    fig.subplots_adjust(left=0.11, right=0.98, top=0.92, bottom=0.17, wspace=0.35)
    return _png(fig)


def _legend_below(fig, ax) -> None:
    """One legend below the axes, when there is more than this run to tell apart: the bars first,
    then markers (matplotlib lists markers first)."""
    from matplotlib.container import BarContainer

    entries = sorted(zip(*ax.get_legend_handles_labels()), key=lambda entry: not isinstance(entry[0], BarContainer))
    if len(entries) > 1:
        fig.legend(*zip(*entries), loc="lower center", ncol=len(entries), frameon=False)


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
