"""The search space: ``tune.search`` entries checked, turned into Tune samplers, and applied to a config.

tune.search {key: spec} ──check_search_space──▶ every malformed entry at once (Problems)
                        ──to_space───────────▶ tune.loguniform / tune.uniform / tune.choice
base config + search ──check_search_keys─────▶ every value the config would refuse (ConfigError)
base dict + {key: value} ──trial_config──────▶ one trial's TrainConfig
base dict + key ──base_value─────────────────▶ the base config's own value (the baseline trial)
"""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Any

from ray import tune

from emotions.config import ConfigError, Problems, TrainConfig, from_dict, merge, parse_overrides

if TYPE_CHECKING:
    from emotions.tuning.settings import TuneSettings

# Sampled keys -> how to sample them. Values: {"loguniform": [lo, hi]} (0 < lo < hi),
# {"uniform": [lo, hi]} (lo < hi), {"choice": [...]} (one value or more), or a plain value (fixed).
DEFAULT_SEARCH: dict[str, Any] = {
    "stage1.learning_rate": {"loguniform": [3e-5, 3e-4]},
    "stage2.dropout": {"choice": [0.0, 0.1, 0.2]},
    "stage2.head_depth": {"choice": [1, 2]},
}
SEARCH_KINDS = ("loguniform", "uniform", "choice")


def check_search_space(search: dict[str, Any]) -> dict[str, Any]:
    """Every malformed ``tune.search`` entry at once (Problems, keyed by the searched key)."""
    problems = [(key, problem) for key, spec in search.items() if (problem := _spec_problem(spec))]
    if not search:
        example = "stage1.learning_rate: {loguniform: [1.0e-5, 1.0e-4]}"
        problems.append(("", f"is empty: give at least one key to sample, e.g. {example}"))
    if problems:
        raise Problems(problems)
    return search


def _spec_problem(spec: Any) -> str | None:
    if not isinstance(spec, dict):
        return None  # a fixed value
    if len(spec) != 1:
        return f"give exactly one of loguniform/uniform/choice, got {spec}"
    ((kind, values),) = spec.items()
    if kind not in SEARCH_KINDS:
        return f"unknown kind {kind!r}; use loguniform, uniform or choice"
    if kind == "choice":
        return None if isinstance(values, list) and values else f"choice needs a list of values, got {values!r}"
    bounds = _range(values)
    if bounds is None:
        return f"{kind} needs [low, high], two finite numbers, got {values!r}"
    if not bounds[0] < bounds[1] or (kind == "loguniform" and bounds[0] <= 0):
        return f"{kind} needs {'0 < ' * (kind == 'loguniform')}low < high, got {values!r}"
    return None


def _range(values: Any) -> tuple[float, float] | None:
    """[low, high] as two finite floats (YAML reads 1e-4 as a string), else None."""
    if not isinstance(values, list) or len(values) != 2 or any(isinstance(v, bool) for v in values):
        return None
    try:
        low, high = (float(v) for v in values)
    except (TypeError, ValueError):
        return None
    return (low, high) if math.isfinite(low) and math.isfinite(high) else None


def to_space(key: str, spec: Any):
    """A ``tune.search`` entry (checked by TuneSettings) -> Tune's sampler; a plain value stays fixed."""
    if not isinstance(spec, dict):
        return spec
    ((kind, values),) = spec.items()
    if kind == "choice":
        return tune.choice(list(values))
    low, high = _range(values)
    return tune.loguniform(low, high) if kind == "loguniform" else tune.uniform(low, high)


def trial_config(base: dict, params: dict) -> TrainConfig:
    """The base config dict with a trial's sampled ``section.key`` values applied."""
    overrides = parse_overrides([f"{k}={json.dumps(v)}" for k, v in params.items()])
    return from_dict(merge(base, overrides))


def base_value(base: dict, key: str) -> Any:
    """``stage1.learning_rate`` -> base["stage1"]["learning_rate"]."""
    value = base
    for part in key.split("."):
        value = value[part]
    return value


def check_search_keys(base: TrainConfig, settings: TuneSettings) -> None:
    """Every searched key must name a config key, and every value it may take (each choice, both
    ends of a range) must be valid there: all refused at once, by name (ConfigError), before any trial."""
    values = {key: _checked_values(spec) for key, spec in settings.search.items()}
    problems: list[str] = []
    for i in range(max(map(len, values.values()), default=0)):
        params = {key: v[min(i, len(v) - 1)] for key, v in values.items()}
        try:
            trial_config(base.to_dict(), params)
        except ConfigError as error:
            problems += [problem for problem in error.problems if problem not in problems]
    if problems:
        raise ConfigError("tune.search may sample values the config refuses:\n  " + "\n  ".join(problems), problems)


def _checked_values(spec: Any) -> list:
    """What ``check_search_keys`` tries of a search entry: a choice's values, a range's two ends."""
    if not isinstance(spec, dict):
        return [spec]
    ((kind, values),) = spec.items()
    return list(values) if kind == "choice" else list(_range(values))
