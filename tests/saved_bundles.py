"""Rebuilding a saved bundle: the keyword arguments ``save_bundle`` takes to write it again."""

from __future__ import annotations

import json
from pathlib import Path

from emotions.bundle import load_bundle


def bundle_fields(path: Path) -> dict:
    """``save_bundle``'s keyword arguments that rebuild the bundle at ``path``: its weights, head,
    tokenizer, thresholds and their recorded precision, config, and metrics less the precision checks
    (``*precision_checks``), which describe the bundle they were run on."""
    bundle = load_bundle(path)
    return dict(
        weights=bundle.model.state_dict(),
        encoder_config=bundle.model.encoder.config.to_dict(),
        head=json.loads((path / "bundle.json").read_text())["head"],
        tokenizer=bundle.tokenizer,
        thresholds=bundle.thresholds,
        config=bundle.config,
        metrics={k: v for k, v in bundle.metrics.items() if not k.endswith("precision_checks")},
        thresholds_precision=bundle.thresholds_precision,
    )
