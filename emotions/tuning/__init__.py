"""Ray Tune sweeps over the two-stage fine-tune.

Tune wraps a driver function (``run_trial``): each trial builds its TrainConfig from the base config
plus the sampled values and runs the normal Ray Train fit, whose per-epoch reports reach Tune through
``TuneReportCallback``. ASHA stops bad trials early on the per-epoch validation macro-F1. At the end:
a results table (CSV + Markdown), a plot, the best config, and the best trial's bundle.

    settings  tune preset + file + KEY=VALUE ──▶ raw config ──▶ (training part, TuneSettings)
    space     tune.search ──▶ checked entries, Tune samplers, one trial's TrainConfig
    sweep     run_sweep: base config + settings ──build_tuner──▶ tune.Tuner ──fit──▶ run_trial per trial
    results   ResultGrid ──summarize──▶ results.csv/.md, sweep.png, best_config.json ──▶ best_bundle

The names below are this package's interface; callers import them from ``emotions.tuning``.
"""

from emotions.tuning.results import (
    SweepSummary,
    export_bundle,
    markdown_table,
    plot_sweep,
    summarize,
    trial_name,
    write_results,
)
from emotions.tuning.settings import (
    TUNE_PRESETS,
    TuneSettings,
    build_sweep_config,
    load_tune_preset,
    merge_over,
    split_tune_settings,
    tune_preset_names,
)
from emotions.tuning.space import (
    DEFAULT_SEARCH,
    SEARCH_KINDS,
    base_value,
    check_search_keys,
    check_search_space,
    to_space,
    trial_config,
)
from emotions.tuning.sweep import (
    build_tuner,
    concurrency,
    run_sweep,
    run_trial,
    trial_resources,
    trial_scaling,
)

__all__ = [
    "DEFAULT_SEARCH",
    "SEARCH_KINDS",
    "TUNE_PRESETS",
    "SweepSummary",
    "TuneSettings",
    "base_value",
    "build_sweep_config",
    "build_tuner",
    "check_search_keys",
    "check_search_space",
    "concurrency",
    "export_bundle",
    "load_tune_preset",
    "markdown_table",
    "merge_over",
    "plot_sweep",
    "run_sweep",
    "run_trial",
    "split_tune_settings",
    "summarize",
    "to_space",
    "trial_config",
    "trial_name",
    "trial_resources",
    "trial_scaling",
    "tune_preset_names",
    "write_results",
]
