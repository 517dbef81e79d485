"""Tune settings and the sweep config: a tune preset, a file and overrides merged, then split.

presets/tune/<name>.yaml ──load_tune_preset──▶ {base: <training preset>, sections..., tune: {...}}
training preset + tune preset + --config file + KEY=VALUE ──build_sweep_config / merge_over──▶ raw dict
raw dict ──split_tune_settings──▶ (training part, TuneSettings)   every bad tune key at once, by name
"""

from __future__ import annotations

from dataclasses import field
from pathlib import Path
from typing import Annotated, Any, Literal

import pydantic.dataclasses
from pydantic import AfterValidator, Field

from emotions.config import SETTINGS, Bool, ConfigError, Int, merge, parse_overrides, validate
from emotions.tuning.space import DEFAULT_SEARCH, check_search_space


@pydantic.dataclasses.dataclass(frozen=True, config=SETTINGS)
class TuneSettings:
    num_samples: Annotated[Int, Field(ge=1)] = 8
    # What ASHA and the choice of the best trial maximise: the per-epoch held-out validation
    # macro-F1 (evaluation.heldout_macro_f1), or macro-F1 at 0.5. Not the in-sample figure: it flatters.
    metric: Literal["val_macro_f1_heldout", "val_macro_f1"] = "val_macro_f1_heldout"
    grace_period: Annotated[Int, Field(ge=1)] = 1  # reports (epochs) before ASHA may stop a trial
    reduction_factor: Annotated[Int, Field(ge=2)] = 2  # ASHA keeps 1 / this of the trials at each rung
    # None = as many as the cluster's CPUs/GPUs fit at its largest.
    max_concurrent_trials: Annotated[Int | None, Field(ge=1)] = None
    seed: Int = 0  # the search algorithm's random state: the same seed samples the same trials
    baseline: Bool = True  # trial 0 runs the base config's own values: "did the sweep beat it?"
    search: Annotated[dict[str, Any], AfterValidator(check_search_space)] = field(
        default_factory=lambda: dict(DEFAULT_SEARCH)
    )


TUNE_PRESETS = Path(__file__).parents[1] / "presets" / "tune"


def tune_preset_names() -> list[str]:
    return sorted(p.stem for p in TUNE_PRESETS.glob("*.yaml"))


def load_tune_preset(preset: str) -> dict:
    """A tune preset's sections as written (``base`` names the training preset it starts from)."""
    import yaml

    if preset not in tune_preset_names():  # a name, never a path: a file of your own goes through --config
        choices = tune_preset_names()
        raise ConfigError(f"unknown tune preset {preset!r}; choose one of {choices}, or pass a file with --config")
    return yaml.safe_load((TUNE_PRESETS / f"{preset}.yaml").read_text()) or {}


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
    """A merged config dict -> (training part, TuneSettings). Every unknown or bad tune key and
    every malformed search entry is refused at once, by name (``tune.search.stage1.learning_rate``),
    in one ConfigError."""
    raw = dict(raw)
    tune_raw = raw.pop("tune", None)
    settings = validate(TuneSettings, {} if tune_raw is None else tune_raw, what="tune settings", prefix="tune")
    return raw, settings
