"""A finished sweep's outputs: the results table, the plot, the best config and the best bundle.

tune.ResultGrid ──summarize──▶ results.csv, results.md (markdown_table), sweep.png (plot_sweep),
                               best_config.json; SweepSummary (best trial, its params, vs baseline)
SweepSummary ──write_results──▶ best trial's checkpoint ──export_bundle──▶ <output>/best_bundle
                                (written in place locally, uploaded manifest-last to a URI)
"""

from __future__ import annotations

import io
import json
import logging
import math
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray

from emotions import storage
from emotions.config import TrainConfig
from emotions.tuning.space import base_value, trial_config

if TYPE_CHECKING:
    from emotions.tuning.settings import TuneSettings

log = logging.getLogger("emotions.tuning")


@dataclass
class SweepSummary:
    best: Any  # the best finished trial's ray.tune.Result
    params: dict  # its sampled values
    config: TrainConfig  # the base config with them applied
    metric: float
    baseline: dict | None  # the baseline trial's metric and best - baseline, if there was one
    trials: int

    def as_dict(self, **extra) -> dict:
        return {
            "best_params": self.params,
            "best_metric": self.metric,
            "baseline": self.baseline,
            "trials": self.trials,
            **extra,
        }


def summarize(
    results,
    settings: TuneSettings,
    base: TrainConfig,
    output: str,
    extra: dict | None = None,
    usable=lambda result: True,
) -> SweepSummary:
    """Write results.csv/.md, sweep.png and best_config.json into ``output`` (a folder or URI);
    pick the best finished trial (among those ``usable`` says have what the export needs) and
    compare it with the baseline trial."""
    import pandas as pd

    keys, metric = list(settings.search), settings.metric
    base_values = {k: base_value(base.to_dict(), k) for k in keys}
    rows = [
        _trial_row(result, keys, metric, settings.baseline, base_values)
        for result in results
        if result.metrics is not None
    ]
    rows.sort(key=lambda r: (r["stopped_early"], -(r["final_" + metric] or 0)))
    folder = storage.Folder.from_uri(output)
    table = pd.DataFrame(rows)
    folder.write_text(table.to_csv(index=False), "results.csv")
    folder.write_text(markdown_table(rows), "results.md")
    folder.write_bytes(plot_sweep(table, keys, metric), "sweep.png")
    finished = [r for r in results if r.metrics and r.metrics.get("final") and not r.error and usable(r)]
    if not finished:
        raise RuntimeError(f"no trial finished; see {folder.uri_of('results.md')}")
    best = max(finished, key=lambda r: r.metrics[metric])
    params = {k: best.config.get(k) for k in keys}
    comparison = _compare_with_baseline(rows, metric, best.metrics[metric])
    config = trial_config(base.to_dict(), params)
    best_config = {
        "params": params,
        metric: best.metrics[metric],
        "baseline": comparison,
        **(extra or {}),
        "config": config.to_dict(),
    }
    folder.write_text(json.dumps(best_config, indent=2) + "\n", "best_config.json")
    return SweepSummary(best, params, config, best.metrics[metric], comparison, len(rows))


def _trial_row(result, keys: list[str], metric: str, baseline: bool, base_values: dict) -> dict:
    """One trial's line of the results table."""
    history = result.metrics_dataframe
    best_f1 = float(history[metric].max()) if history is not None and metric in history else math.nan
    params = {k: result.config.get(k) for k in keys}
    return {
        "trial": trial_name(result.path),
        **params,
        "baseline": baseline and params == base_values,
        "epochs_run": int(len(history)) if history is not None else 0,
        "final_" + metric: result.metrics.get(metric),
        "best_" + metric: best_f1,
        "val_macro_f1_at_0.5": result.metrics.get("val_macro_f1"),
        "val_macro_f1_in_sample": result.metrics.get("val_macro_f1_in_sample"),  # flatters: not for choosing
        "val_share_ratio_max": result.metrics.get("val_share_ratio_max"),  # the most over-tagged label, held out
        "stopped_early": not result.metrics.get("final", False),
        "minutes": round(result.metrics.get("time_total_s", math.nan) / 60, 2),
        "ended": result.metrics.get("timestamp"),  # unix seconds of the last report
        "error": repr(result.error) if result.error else "",
    }


def _compare_with_baseline(rows: list[dict], metric: str, best: float) -> dict | None:
    """The baseline trial's metric and best - baseline (logged), or None without a baseline trial."""
    baseline = next((r for r in rows if r["baseline"]), None)
    if not baseline:
        return None
    comparison = {
        "baseline_" + metric: baseline["final_" + metric],
        "baseline_stopped_early": baseline["stopped_early"],
        "best_minus_baseline": best - (baseline["final_" + metric] or 0),
    }
    log.info(
        "baseline (the base config's own values): %s = %.4f%s; best - baseline = %+.4f",
        metric,
        comparison["baseline_" + metric] or math.nan,
        " (stopped early)" if comparison["baseline_stopped_early"] else "",
        comparison["best_minus_baseline"],
    )
    return comparison


def write_results(results, settings: TuneSettings, base: TrainConfig, output: str, write_bundle) -> dict:
    summary = summarize(results, settings, base, output)
    # Ray Train reports the checkpoint's path inside run.storage_path's filesystem (no s3:// prefix).
    fs = storage.filesystem(summary.config.run.storage_path)[0]
    checkpoint = ray.train.Checkpoint(summary.best.metrics["checkpoint_path"], filesystem=fs)
    with checkpoint.as_directory() as final:
        bundle = export_bundle(
            storage.join(output, "best_bundle"), lambda local: write_bundle(Path(final), summary.config, local)
        )
    log.info("best trial %s: %s = %.4f; bundle %s", summary.best.path, settings.metric, summary.metric, bundle)
    return summary.as_dict(bundle=str(bundle))


def export_bundle(uri: str, write) -> str:
    """``write(local_folder)`` writes a bundle; it ends up at ``uri``: written in place for a local
    path, else written to a temporary folder and uploaded (manifest last). Returns ``uri``."""
    from emotions.bundle import publish_bundle

    if not storage.is_uri(uri):
        return str(write(Path(uri)))
    with tempfile.TemporaryDirectory(prefix="emotions-bundle-") as tmp:
        return publish_bundle(write(Path(tmp) / "bundle"), uri)


def trial_name(path: str) -> str:
    """A trial folder (run_trial_794af_00006_6_stage1_...) -> its id (run_trial_794af_00006)."""
    name = path.rstrip("/").rsplit("/", 1)[-1]
    match = re.match(r".*?_[0-9a-f]{5}_\d{5}", name)
    return match.group(0) if match else name


def markdown_table(rows: list[dict]) -> str:
    if not rows:
        return "(no trials)\n"
    rows = [{k: v for k, v in row.items() if k != "ended"} for row in rows]  # the CSV keeps it
    cell = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(cell(v) for v in row.values()) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def plot_sweep(table, keys: list[str], metric: str) -> bytes:
    """Validation macro-F1 against stage-1 learning rate, one colour per stage-2 head depth (PNG)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    x_key = next((k for k in keys if k.endswith("learning_rate")), keys[0])
    group_key = next((k for k in keys if k.endswith("head_depth")), None)
    y = "best_" + metric
    groups = table.groupby(group_key) if group_key else [("all", table)]
    for value, part in groups:
        ax.scatter(part[x_key], part[y], label=f"{group_key}={value}" if group_key else None, s=40)
    if x_key.endswith("learning_rate"):
        ax.set_xscale("log")
    ax.set_xlabel(x_key)
    ax.set_ylabel(f"validation {metric}")
    ax.set_title("Sweep: best per-epoch validation macro-F1 of each trial")
    if group_key:
        ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    return png.getvalue()
