"""What a run learns from: a config's digest, and the changes that refuse a resume."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from emotions.config.schema import section_defaults

# Keys that may differ between a run's checkpoints and the config that resumes it: how many
# restarts and checkpoints, where the run is stored, the hardware, and the thresholds (fitted
# after training on the final predictions). Any other change is refused on resume.
RESUMABLE_KEYS = frozenset(
    {
        "run.max_failures",
        "run.checkpoints_to_keep",
        "run.resume",
        "run.storage_path",
        "scaling.use_gpu",
        "scaling.cpus_per_worker",
        "scaling.bf16",
        "scaling.cpu_bf16",
        "scaling.placement",
        "scaling.gradient_compression",
        "thresholds.split",
        "thresholds.fallback",
        "thresholds.shrink",
        "thresholds.prior",
        "thresholds.max_share_ratio",
        "thresholds.min_positives",
        "model.head_choice",
    }
)


def flatten(raw: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"stage1": {"epochs": 2}}`` -> ``{"stage1.epochs": 2}``."""
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_hash(raw: dict[str, Any]) -> str:
    """A digest of what a run learns from: every key of the config but the RESUMABLE_KEYS."""
    kept = {k: v for k, v in flatten(raw).items() if k not in RESUMABLE_KEYS}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``["stage1.learning_rate: 0.001 -> 0.002", ...]`` for each key outside RESUMABLE_KEYS. A key
    that one side lacks (a setting added since the checkpoint was made) is no change when the other
    side holds its default: the run trained with that value."""
    before, after = flatten(old), flatten(new)
    defaults = flatten(section_defaults())
    changes = []
    for key in sorted(before.keys() | after.keys()):
        if key in RESUMABLE_KEYS:
            continue
        if after.get(key) == "auto":
            # Checkpoints record the layout as resolved ("auto" -> 1 worker): before Ray starts
            # "auto" cannot be compared; ``training.fit`` compares again once it is resolved.
            continue
        if before.get(key, defaults.get(key, ...)) != after.get(key, defaults.get(key, ...)):
            changes.append(f"{key}: {_shown(before, key)} -> {_shown(after, key)}")
    return changes


def _shown(values: dict[str, Any], key: str) -> str:
    return json.dumps(values[key], default=str) if key in values else "(absent)"
