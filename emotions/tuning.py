"""Ray Tune sweeps over the two-stage fine-tune.

Tune wraps a driver function (``run_trial``): each trial builds its TrainConfig from the base config
plus the sampled values and runs the normal Ray Train fit, whose per-epoch reports reach Tune through
``TuneReportCallback``. ASHA stops bad trials early on the per-epoch validation macro-F1. At the end:
a results table (CSV + Markdown), a plot, the best config, and the best trial's bundle.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
from ray import tune

from emotions import environment, storage
from emotions import cluster
from emotions.config import AUTO, ConfigError, TrainConfig, from_dict, merge, parse_overrides

log = logging.getLogger("emotions.tuning")

# Sampled keys -> how to sample them. Values: {"loguniform": [lo, hi]}, {"uniform": [lo, hi]},
# {"choice": [...]}, or a plain value (fixed).
DEFAULT_SEARCH: dict[str, Any] = {
    "stage1.learning_rate": {"loguniform": [3e-5, 3e-4]},
    "stage2.dropout": {"choice": [0.0, 0.1, 0.2]},
    "stage2.head_depth": {"choice": [1, 2]},
}


@dataclass(frozen=True)
class TuneSettings:
    num_samples: int = 8
    metric: str = "val_macro_f1_heldout"  # per-epoch held-out validation macro-F1 (evaluation.heldout_macro_f1)
    grace_period: int = 1  # reports (epochs) before ASHA may stop a trial
    reduction_factor: int = 2
    max_concurrent_trials: int | None = None  # None = as many as the cluster's CPUs/GPUs fit at its largest
    seed: int = 0  # the search algorithm's random state: the same seed samples the same trials
    baseline: bool = True  # trial 0 runs the base config's own values: "did the sweep beat it?"
    search: dict = field(default_factory=lambda: dict(DEFAULT_SEARCH))


TUNE_PRESETS = Path(__file__).parent / "presets" / "tune"


def tune_preset_names() -> list[str]:
    return sorted(p.stem for p in TUNE_PRESETS.glob("*.yaml"))


def load_tune_preset(preset: str) -> dict:
    """A tune preset's sections as written (``base`` names the training preset it starts from)."""
    import yaml

    path = TUNE_PRESETS / f"{preset}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown tune preset {preset!r}; choose one of {tune_preset_names()}")
    return yaml.safe_load(path.read_text()) or {}


def build_sweep_config(preset: str, file: str | Path | None = None, overrides: list[str] = ()) -> dict:
    """Tune preset (its ``base`` training preset + training sections + ``tune``), then a file,
    then KEY=VALUE overrides (``tune.num_samples=4`` or ``stage1.epochs=1``)."""
    from emotions.config import load_preset

    sweep = load_tune_preset(preset)
    return merge_over(load_preset(sweep.pop("base", "default")), sweep, file, overrides)


def merge_over(base: dict, sweep: dict, file: str | Path | None, overrides: list[str]) -> dict:
    """``base``, then the tune preset's sections, then a file, then KEY=VALUE overrides."""
    from emotions.config import load_file

    raw = merge(base, sweep)
    if file:
        raw = merge(raw, load_file(file))
    return merge(raw, parse_overrides(list(overrides)))


def split_tune_settings(raw: dict) -> tuple[dict, TuneSettings]:
    """A merged config dict -> (training part, TuneSettings) with unknown tune keys refused."""
    raw = dict(raw)
    tune_raw = raw.pop("tune", {}) or {}
    known = TuneSettings.__dataclass_fields__
    unknown = sorted(set(tune_raw) - set(known))
    if unknown:
        raise ConfigError(f"tune: unknown keys {unknown}; known keys: {sorted(known)}")
    settings = TuneSettings(**tune_raw)
    for key, spec in settings.search.items():
        to_space(key, spec)  # validate the search space before any trial runs
    return raw, settings


def to_space(key: str, spec: Any):
    if not isinstance(spec, dict):
        return spec
    if len(spec) != 1:
        raise ConfigError(f"tune.search.{key}: give exactly one of loguniform/uniform/choice, got {spec}")
    (kind, values), = spec.items()
    if kind == "loguniform":
        return tune.loguniform(float(values[0]), float(values[1]))
    if kind == "uniform":
        return tune.uniform(float(values[0]), float(values[1]))
    if kind == "choice":
        return tune.choice(list(values))
    raise ConfigError(f"tune.search.{key}: unknown kind {kind!r}; use loguniform, uniform or choice")


def trial_config(base: dict, params: dict) -> TrainConfig:
    """The base config dict with a trial's sampled ``section.key`` values applied."""
    overrides = parse_overrides([f"{k}={json.dumps(v)}" for k, v in params.items()])
    return from_dict(merge(base, overrides))


def run_trial(params: dict, base: dict) -> None:
    """Tune's driver function: one Ray Train run with this trial's values."""
    from ray.tune.integration.ray_train import TuneReportCallback

    from emotions.training import fit

    config = trial_config(base, params)
    trial = tune.get_context().get_trial_id()
    fit(config, name=f"train-{trial}", callbacks=[TuneReportCallback()])


def trial_scaling(config: TrainConfig) -> TrainConfig:
    """Trials share the cluster, so ``auto`` (a whole node per worker) means 1 for them: a trial
    is 1 worker x 1 CPU unless the sweep's config says otherwise."""
    s = config.scaling
    fixed = {k: 1 for k in ("num_workers", "cpus_per_worker") if getattr(s, k) == AUTO}
    if fixed:
        log.info("sweep trials: scaling %s (auto is for a run that has the cluster to itself)",
                 ", ".join(f"{k}={v}" for k, v in fixed.items()))  # fmt: skip
    return dataclasses.replace(config, scaling=dataclasses.replace(s, **fixed)) if fixed else config


def trial_resources(config: TrainConfig) -> dict[str, float]:
    """What one trial's Ray Train workers hold: GPUs with ``scaling.use_gpu``, else CPUs."""
    s = config.scaling
    if s.use_gpu:
        return {"GPU": s.num_workers}
    return {"CPU": s.num_workers * s.cpus_per_worker}


def concurrency(per_trial: dict[str, float], settings: TuneSettings, current: dict[str, float],
                maximum: dict[str, float] | None) -> int:  # fmt: skip
    """Trials at once: ``tune.max_concurrent_trials`` if set, else how many ``per_trial`` fit in the
    cluster at its largest, the autoscaler's maximum (``maximum``, None without an autoscaler) or
    what is there now (``current``), whichever is more. Sizing from ``current`` alone would run one
    trial at a time, forever, on a cluster whose worker groups start at 0 replicas."""
    if settings.max_concurrent_trials:
        return settings.max_concurrent_trials
    largest = {k: max(current.get(k, 0), (maximum or {}).get(k, 0)) for k in per_trial}
    return max(1, min((int(largest[k] // v) for k, v in per_trial.items() if v > 0), default=1))


def run_sweep(raw_config: dict, output: str | Path, resume: bool = True) -> dict:
    """Run (or resume) a sweep; write results.csv/.md, the plot, best_config.json and the best
    bundle into ``output``, a local folder or a URI (s3://...; the sweep's own state goes there too)."""
    from emotions.training import write_bundle_from_checkpoint

    from emotions.bundle import check_output_folder

    output = storage.expand(output)
    check_output_folder(storage.join(output, "best_bundle"))  # before the sweep, not after it
    base_raw, settings = split_tune_settings(raw_config)
    base = trial_scaling(from_dict(base_raw))  # validates the fixed part now
    environment.log_environment({**base.to_dict(), "tune": settings.__dict__}, "tune")
    check_search_keys(base, settings)
    cluster.check_state_api()
    # The driver function only waits on Ray Train: it reserves memory but no CPU, so a trial's
    # CPUs all go to its training workers (a CPU per driver would halve concurrency on small nodes).
    trainable = tune.with_resources(tune.with_parameters(run_trial, base=base.to_dict()),
                                    {"CPU": 0, "memory": 256 * 1024**2})  # fmt: skip
    max_t = sum(s.epochs for s in base.stages) + 1  # one report per epoch, then the final one
    at_once = concurrency(trial_resources(base), settings, *cluster.resources())
    log.info("up to %d trials at once", at_once)
    tuner = build_tuner(trainable, storage.join(output, "sweep"), base, settings, max_t, at_once, resume)
    results = tuner.fit()
    return write_results(results, settings, base, output, write_bundle_from_checkpoint)


def check_search_keys(base: TrainConfig, settings: TuneSettings) -> None:
    """Every searched key must name a config key: refused by name (ConfigError) before any trial."""
    for key, spec in settings.search.items():
        trial_config(base.to_dict(), {key: _example(spec)})


def build_tuner(trainable, storage_path: str, base: TrainConfig, settings: TuneSettings, max_t: int,
                max_concurrent: int, resume: bool) -> tune.Tuner:  # fmt: skip
    """Restore the sweep in ``storage_path`` (a folder or URI) if there is one (and ``resume``), else
    a new one: trial 0 the base config's own values (``tune.baseline``), then seeded samples; ASHA
    on the metric."""
    experiment = storage.join(storage_path, "sweep")
    if resume and tune.Tuner.can_restore(experiment):
        log.info("resuming the sweep in %s (finished trials are kept)", experiment)
        return tune.Tuner.restore(experiment, trainable=trainable, resume_errored=True)
    space = {key: to_space(key, spec) for key, spec in settings.search.items()}
    points = [{key: base_value(base.to_dict(), key) for key in space}] if settings.baseline else []
    # The generator itself limits concurrency (0: no limit): Tune ignores max_concurrent_trials for it.
    search = tune.search.BasicVariantGenerator(points_to_evaluate=points, random_state=settings.seed,
                                               max_concurrent=max_concurrent)  # fmt: skip
    scheduler = tune.schedulers.ASHAScheduler(max_t=max_t, grace_period=min(settings.grace_period, max_t),
                                              reduction_factor=settings.reduction_factor)  # fmt: skip
    return tune.Tuner(
        trainable, param_space=space,
        tune_config=tune.TuneConfig(metric=settings.metric, mode="max", scheduler=scheduler,
                                    search_alg=search, num_samples=settings.num_samples),
        run_config=tune.RunConfig(name="sweep", storage_path=storage_path),
    )  # fmt: skip


def base_value(base: dict, key: str) -> Any:
    """``stage1.learning_rate`` -> base["stage1"]["learning_rate"]."""
    value = base
    for part in key.split("."):
        value = value[part]
    return value


def _example(spec: Any) -> Any:
    if isinstance(spec, dict):
        (kind, values), = spec.items()
        return values[0]
    return spec


@dataclass
class SweepSummary:
    best: Any  # the best finished trial's ray.tune.Result
    params: dict  # its sampled values
    config: TrainConfig  # the base config with them applied
    metric: float
    baseline: dict | None  # the baseline trial's metric and best - baseline, if there was one
    trials: int

    def as_dict(self, **extra) -> dict:
        return {"best_params": self.params, "best_metric": self.metric, "baseline": self.baseline,
                "trials": self.trials, **extra}  # fmt: skip


def summarize(results, settings: TuneSettings, base: TrainConfig, output: str, extra: dict | None = None,
              usable=lambda result: True) -> SweepSummary:  # fmt: skip
    """Write results.csv/.md, sweep.png and best_config.json into ``output`` (a folder or URI);
    pick the best finished trial (among those ``usable`` says have what the export needs) and
    compare it with the baseline trial."""
    import pandas as pd

    keys, metric = list(settings.search), settings.metric
    base_values = {k: base_value(base.to_dict(), k) for k in keys}
    rows = []
    for result in results:
        if result.metrics is None:
            continue
        history = result.metrics_dataframe
        best_f1 = float(history[metric].max()) if history is not None and metric in history else math.nan
        params = {k: result.config.get(k) for k in keys}
        rows.append({
            "trial": trial_name(result.path),
            **params,
            "baseline": settings.baseline and params == base_values,
            "epochs_run": int(len(history)) if history is not None else 0,
            "final_" + metric: result.metrics.get(metric),
            "best_" + metric: best_f1,
            "val_macro_f1_at_0.5": result.metrics.get("val_macro_f1"),
            "val_macro_f1_in_sample": result.metrics.get("val_macro_f1_in_sample"),  # flatters: not for choosing
            "stopped_early": not result.metrics.get("final", False),
            "minutes": round(result.metrics.get("time_total_s", math.nan) / 60, 2),
            "ended": result.metrics.get("timestamp"),  # unix seconds of the last report
            "error": repr(result.error) if result.error else "",
        })  # fmt: skip
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
    baseline = next((r for r in rows if r["baseline"]), None)
    comparison = None
    if baseline:
        comparison = {"baseline_" + metric: baseline["final_" + metric],
                      "baseline_stopped_early": baseline["stopped_early"],
                      "best_minus_baseline": best.metrics[metric] - (baseline["final_" + metric] or 0)}  # fmt: skip
        log.info("baseline (the base config's own values): %s = %.4f%s; best - baseline = %+.4f",
                 metric, comparison["baseline_" + metric] or math.nan,
                 " (stopped early)" if comparison["baseline_stopped_early"] else "",
                 comparison["best_minus_baseline"])  # fmt: skip
    config = trial_config(base.to_dict(), params)
    folder.write_text(json.dumps({
        "params": params, metric: best.metrics[metric], "baseline": comparison, **(extra or {}),
        "config": config.to_dict()}, indent=2) + "\n", "best_config.json")  # fmt: skip
    return SweepSummary(best, params, config, best.metrics[metric], comparison, len(rows))


def write_results(results, settings: TuneSettings, base: TrainConfig, output: str, write_bundle) -> dict:
    summary = summarize(results, settings, base, output)
    # Ray Train reports the checkpoint's path inside run.storage_path's filesystem (no s3:// prefix).
    fs = storage.filesystem(summary.config.run.storage_path)[0]
    checkpoint = ray.train.Checkpoint(summary.best.metrics["checkpoint_path"], filesystem=fs)
    with checkpoint.as_directory() as final:
        bundle = export_bundle(storage.join(output, "best_bundle"),
                               lambda local: write_bundle(Path(final), summary.config, local))  # fmt: skip
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
