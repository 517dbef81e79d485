"""Running a sweep: Tune wraps a driver function that runs the normal Ray Train fit per trial.

raw config ──split_tune_settings──▶ base TrainConfig (trial_scaling: auto -> 1) + TuneSettings
  ──check_search_keys, cluster.check_state_api──▶ refused before any trial
  ──concurrency(trial_resources, cluster.resources())──▶ trials at once
  ──build_tuner──▶ tune.Tuner (restored if the sweep exists): baseline point, seeded samples, ASHA
  ──fit──▶ run_trial per trial: fit(trial_config) with TuneReportCallback (per-epoch reports)
  ──write_results (emotions.tuning.results)──▶ table, plot, best_config.json, best bundle
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from ray import tune

from emotions import cluster, environment, storage
from emotions.config import AUTO, TrainConfig, from_dict
from emotions.tuning.results import write_results
from emotions.tuning.settings import TuneSettings, split_tune_settings
from emotions.tuning.space import base_value, check_search_keys, to_space, trial_config

log = logging.getLogger("emotions.tuning")


def run_sweep(raw_config: dict, output: str | Path, resume: bool = True) -> dict:
    """Run (or resume) a sweep; write results.csv/.md, the plot, best_config.json and the best
    bundle into ``output``, a local folder or a URI (s3://...; the sweep's own state goes there too)."""
    from emotions.bundle import check_output_folder
    from emotions.training import write_bundle_from_checkpoint

    output = storage.expand(output)
    check_output_folder(storage.join(output, "best_bundle"))  # before the sweep, not after it
    base_raw, settings = split_tune_settings(raw_config)
    base = trial_scaling(from_dict(base_raw))  # validates the fixed part now
    environment.log_environment({**base.to_dict(), "tune": settings.__dict__}, "tune")
    check_search_keys(base, settings)
    cluster.check_state_api()
    # The driver function only waits on Ray Train: it reserves memory but no CPU, so a trial's
    # CPUs all go to its training workers (a CPU per driver would halve concurrency on small nodes).
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=base.to_dict()), {"CPU": 0, "memory": 256 * 1024**2}
    )
    max_t = sum(s.epochs for s in base.stages) + 1  # one report per epoch, then the final one
    at_once = concurrency(trial_resources(base), settings, *cluster.resources())
    log.info("up to %d trials at once", at_once)
    tuner = build_tuner(trainable, storage.join(output, "sweep"), base, settings, max_t, at_once, resume)
    results = tuner.fit()
    return write_results(results, settings, base, output, write_bundle_from_checkpoint)


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
        log.info(
            "sweep trials: scaling %s (auto is for a run that has the cluster to itself)",
            ", ".join(f"{k}={v}" for k, v in fixed.items()),
        )
    return dataclasses.replace(config, scaling=dataclasses.replace(s, **fixed)) if fixed else config


def trial_resources(config: TrainConfig) -> dict[str, float]:
    """What one trial's Ray Train workers hold: GPUs with ``scaling.use_gpu``, else CPUs."""
    s = config.scaling
    if s.use_gpu:
        return {"GPU": s.num_workers}
    return {"CPU": s.num_workers * s.cpus_per_worker}


def concurrency(
    per_trial: dict[str, float],
    settings: TuneSettings,
    current: dict[str, float],
    maximum: dict[str, float] | None,
) -> int:
    """Trials at once: ``tune.max_concurrent_trials`` if set, else how many ``per_trial`` fit in the
    cluster at its largest, the autoscaler's maximum (``maximum``, None without an autoscaler) or
    what is there now (``current``), whichever is more. Sizing from ``current`` alone would run one
    trial at a time, forever, on a cluster whose worker groups start at 0 replicas."""
    if settings.max_concurrent_trials:
        return settings.max_concurrent_trials
    largest = {k: max(current.get(k, 0), (maximum or {}).get(k, 0)) for k in per_trial}
    return max(1, min((int(largest[k] // v) for k, v in per_trial.items() if v > 0), default=1))


def build_tuner(
    trainable,
    storage_path: str,
    base: TrainConfig,
    settings: TuneSettings,
    max_t: int,
    max_concurrent: int,
    resume: bool,
) -> tune.Tuner:
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
    search = tune.search.BasicVariantGenerator(
        points_to_evaluate=points, random_state=settings.seed, max_concurrent=max_concurrent
    )
    scheduler = tune.schedulers.ASHAScheduler(
        max_t=max_t, grace_period=min(settings.grace_period, max_t), reduction_factor=settings.reduction_factor
    )
    tune_config = tune.TuneConfig(
        metric=settings.metric, mode="max", scheduler=scheduler, search_alg=search, num_samples=settings.num_samples
    )
    return tune.Tuner(
        trainable,
        param_space=space,
        tune_config=tune_config,
        run_config=tune.RunConfig(name="sweep", storage_path=storage_path),
    )
