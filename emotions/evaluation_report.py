"""How an evaluation report (``evaluation.evaluation_report``) is shown: a terminal table, and
metrics.json, report.md and per_label_f1.png beside every evaluation. The numbers themselves
come from ``emotions.evaluation``."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np

from emotions.evaluation import largest_share_ratio
from emotions.labels import EMOTIONS, NUM_LABELS

SUMMARY_KEYS = (
    ("macro_f1", "macro-F1"),
    ("weighted_f1", "weighted-F1"),
    ("micro_f1", "micro-F1"),
    ("accuracy", "accuracy"),
)
N_WORST = 4  # lowest-F1 labels marked in report.md


def settings(report: dict) -> list[tuple[str, str]]:
    """(key, title) of the report's rows, the held-out estimate first; the row at the fitted
    thresholds is labelled in-sample where they were fitted on these rows. Reports written before
    the held-out protocol (no "heldout") show their two rows as before."""
    fitted = report.get("thresholds_in_sample")
    title = {
        True: "fitted thresholds, in-sample",
        False: "bundle's thresholds, unseen data",
        None: "fitted thresholds",
    }[fitted]
    rows = [("heldout", "held-out halves")] if report.get("heldout") else []
    return rows + [("at_0.5", "threshold 0.5"), ("at_thresholds", title)]


def format_summary(report: dict) -> str:
    """A plain-text table for a terminal: one row per setting, the held-out estimate first."""
    rows = settings(report)
    width = max(len(title) for _, title in rows)
    lines = [" " * width + "".join(f"  {head:>11}" for _, head in SUMMARY_KEYS)]
    for key, title in rows:
        lines.append(f"{title:<{width}}" + "".join(f"  {report[key][metric]:>11.4f}" for metric, _ in SUMMARY_KEYS))
    if report.get("labels_absent"):
        lines.append(f"left out of macro averages (no positive example): {', '.join(report['labels_absent'])}")
    where, table = _shares_of(report)
    largest = largest_share_ratio(table) if table else None
    if largest:
        lines.append(
            f"tagged most often against its true share ({where}): {largest['label']} on "
            f"{largest['predicted_share']:.2%} of rows, true on {largest['true_share']:.2%} ({largest['ratio']:.1f}x)"
        )
    return "\n".join(lines)


def _shares_of(report: dict) -> tuple[str, dict | None]:
    """(how they were tagged, the share table) a report is read by: on data the bundle's thresholds
    never saw, the shares at those thresholds (what tagging will give); else held out."""
    unseen = (report.get("at_thresholds") or {}).get("shares")
    if report.get("thresholds_in_sample") is False and unseen:
        return "bundle's thresholds, unseen data", unseen
    return "held out", (report.get("heldout") or {}).get("shares")


def format_shares(report: dict) -> str:
    """Per label, how often it is true and how often it is tagged, for a terminal: held out (each
    row at thresholds fitted on the half it was not in), or at the bundle's thresholds on data they
    never saw; "" for a report without them."""
    where, shares = _shares_of(report)
    if not shares:
        return ""
    lines = [f"{'label':<15}{'positives':>10}{'true':>9}{'tagged':>9}{'ratio':>8}   ({where})"]
    for name in EMOTIONS:
        row = shares[name]
        ratio = "-" if row["ratio"] is None else f"{row['ratio']:.2f}x"
        lines.append(
            f"{name:<15}{row['positives']:>10,}{row['true_share']:>9.2%}{row['predicted_share']:>9.2%}{ratio:>8}"
        )
    return "\n".join(lines)


def _share_lines(report: dict) -> list[str]:
    """report.md's share table: true against tagged share per label."""
    where, shares = _shares_of(report)
    if not shares:
        return []
    how = (
        "Held out: each example tagged at thresholds fitted on the half it was not in."
        if where == "held out"
        else "At the bundle's thresholds, on data they were not fitted on: the shares tagging will give."
    )
    lines = [
        "",
        "## How often each label is tagged",
        "",
        f"{how} A label tagged far more often than it is true makes every share built on it "
        "(tagging reports, drift) misleading.",
        "",
        "| label | positives | true share | tagged share | ratio |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in EMOTIONS:
        row = shares[name]
        ratio = "–" if row["ratio"] is None else f"{row['ratio']:.2f}x"
        lines.append(
            f"| {name} | {row['positives']} | {row['true_share']:.2%} | {row['predicted_share']:.2%} | {ratio} |"
        )
    return lines


def _threshold_lines(report: dict) -> list[str]:
    """report.md's note on labels whose thresholds rest on few positives (``thresholds_fit``)."""
    notes = report.get("thresholds_fit")
    if not notes or not notes.get("labels"):
        return []
    rule = notes["rule"]
    lines = [
        "",
        "## Thresholds resting on few positives",
        "",
        f"Rule: prior worth {rule['shrink']:g} positives toward "
        + (
            f"the pooled threshold {notes['pooled']:.2f}"
            if rule.get("prior") == "pooled"
            else "each label's share-matching threshold"
        )
        + (
            f", tagged on at most {rule['max_share_ratio']:g}x the positives of the fitting rows"
            if rule["max_share_ratio"] is not None
            else ", no share cap"
        )
        + f"; labels with fewer than {rule['min_positives']} positives listed.",
        "",
        "| label | positives | own best-F1 | threshold | what was done |",
        "|---|---:|---:|---:|---|",
    ]
    for name, row in notes["labels"].items():
        lines.append(
            f"| {name} | {row['positives']} | {row['own']:.2f} | {row['threshold']:.2f} | {row['what_was_done']} |"
        )
    return lines


def _markdown(report: dict, title: str) -> str:
    """report.md: header, summary table, per-label table with the lowest-F1 labels marked."""
    lo, hi = report["at_0.5"]["per_label"], report["at_thresholds"]["per_label"]
    worst = set(sorted(EMOTIONS, key=lambda name: hi[name]["f1"])[:N_WORST])
    lines = [
        f"# {title}",
        "",
        f"- source: {report['source'] or '-'}",
        f"- model: {report['model'] or '-'}",
        f"- examples: {report['n_examples']}",
    ]
    if report.get("heldout"):
        lines.append(
            "- held-out halves: thresholds fitted on one half of these examples and scored on the "
            "other, both ways, averaged (the number to compare models by)"
        )
    if report.get("thresholds_in_sample"):
        lines.append("- the fitted thresholds were fitted on these examples: their row is in-sample and flatters")
    if report.get("labels_absent"):
        lines.append(f"- left out of macro averages (no positive example): {', '.join(report['labels_absent'])}")
    lines += [
        "",
        "| setting | " + " | ".join(head for _, head in SUMMARY_KEYS) + " |",
        "|---|" + "---:|" * len(SUMMARY_KEYS),
    ]
    for key, name in settings(report):
        lines.append(f"| {name} | " + " | ".join(f"{report[key][metric]:.4f}" for metric, _ in SUMMARY_KEYS) + " |")
    lines += [
        "",
        f"Per label; **bold** marks the {N_WORST} lowest F1 at fitted thresholds.",
        "",
        "| label | support | threshold | P@0.5 | R@0.5 | F1@0.5 | P@thr | R@thr | F1@thr |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in EMOTIONS:
        a, b = lo[name], hi[name]
        shown = f"**{name}**" if name in worst else name
        lines.append(
            f"| {shown} | {b['support']} | {b['threshold']:.2f} | {a['precision']:.3f} | "
            f"{a['recall']:.3f} | {a['f1']:.3f} | {b['precision']:.3f} | {b['recall']:.3f} | "
            f"{b['f1']:.3f} |"
        )
    lines += _share_lines(report) + _threshold_lines(report)
    return "\n".join(lines) + "\n"


def _plot_per_label(report: dict, title: str) -> bytes:
    """Horizontal bars of F1 at 0.5 and at fitted thresholds; thresholds as markers on a twin axis."""
    # Agg canvas on a bare Figure: no pyplot, so the caller's global backend is left alone.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    lo, hi = report["at_0.5"]["per_label"], report["at_thresholds"]["per_label"]
    y = np.arange(NUM_LABELS)
    fig = Figure(figsize=(10, 9), dpi=100)  # 1000 x 900 px
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.barh(y - 0.2, [lo[n]["f1"] for n in EMOTIONS], height=0.4, label="F1 @ 0.5")
    ax.barh(y + 0.2, [hi[n]["f1"] for n in EMOTIONS], height=0.4, label="F1 @ fitted thresholds")
    ax.set_yticks(y, [f"{n} ({hi[n]['support']})" for n in EMOTIONS])
    ax.invert_yaxis()  # EMOTIONS order top to bottom
    ax.set_xlim(0, 1)
    ax.set_xlabel("F1")
    ax.grid(axis="x", alpha=0.3)
    top = ax.twiny()  # thresholds share the rows, on their own [0, 1] scale at the top
    top.plot([hi[n]["threshold"] for n in EMOTIONS], y, "kD", markersize=5, label="threshold")
    top.set_xlim(0, 1)
    top.set_xlabel("fitted threshold (black diamonds)")
    handles = ax.get_legend_handles_labels()[0] + top.get_legend_handles_labels()[0]
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.06), ncol=3, fontsize=9)
    ax.set_title(f"{title}: per-label F1 (support in brackets)", fontsize=11)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png")
    return png.getvalue()


def write_evaluation_report(report: dict, directory: str | Path, title: str = "Evaluation") -> dict[str, Path | str]:
    """Write metrics.json, report.md and per_label_f1.png into ``directory`` (a local folder or a
    URI such as s3://bucket/reports/x); return their paths (URIs for a URI)."""
    from emotions import storage

    folder = storage.Folder.from_uri(directory)
    folder.write_text(json.dumps(report, indent=2) + "\n", "metrics.json")
    folder.write_text(_markdown(report, title), "report.md")
    folder.write_bytes(_plot_per_label(report, title), "per_label_f1.png")
    names = {"json": "metrics.json", "markdown": "report.md", "plot": "per_label_f1.png"}
    if storage.is_uri(directory):
        return {key: folder.uri_of(name) for key, name in names.items()}
    return {key: Path(folder.path(name)) for key, name in names.items()}
