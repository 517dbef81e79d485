"""Evaluate a bundle on labelled data: metrics at 0.5 and at the bundle's thresholds."""

from __future__ import annotations

import logging
from pathlib import Path

from emotions.bundle import load_bundle
from emotions.data import load_labelled
from emotions.metrics import evaluation_report, format_summary, write_report

log = logging.getLogger("emotions.evaluation")


def evaluate_bundle(model: str | Path, data: str, report_dir: str | Path | None = None, *,
                    text_column: str = "text", labels_column: str = "labels",
                    label_format: str = "auto", batch_size: int = 64) -> dict:  # fmt: skip
    """Predict ``data`` with the bundle at ``model``; optionally write metrics.json, report.md and
    per_label_f1.png into ``report_dir`` (a local folder or a URI). Returns the report dict."""
    bundle = load_bundle(model)
    labelled = load_labelled(data, text_column=text_column, labels_column=labels_column,
                             label_format=label_format)  # fmt: skip
    log.info("evaluating bundle %s (hash %s) on %d examples from %s", bundle.path, bundle.hash,
             len(labelled), labelled.source)  # fmt: skip
    probs = bundle.predict_proba(labelled.texts, batch_size=batch_size)
    report = evaluation_report(labelled.labels, probs, bundle.thresholds, source=labelled.source,
                               model=f"{bundle.path} ({bundle.hash})")  # fmt: skip
    if report_dir is not None:
        write_report(report, report_dir, title=f"Evaluation of {str(model).rstrip('/').rsplit('/', 1)[-1]}")
    log.info("\n%s", format_summary(report))
    return report
