"""Per-label thresholds."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import f1_score

from emotions.evaluation import fit_thresholds


def test_thresholds_beat_half_for_under_confident_labels():
    rng = np.random.default_rng(0)
    labels = (rng.random((2000, 3)) < [0.05, 0.3, 0.5]).astype(np.float32)
    # A rare label whose positives score ~0.3: at 0.5 it is never predicted.
    probs = np.clip(
        labels * rng.normal(0.3, 0.05, labels.shape) + (1 - labels) * rng.normal(0.1, 0.05, labels.shape), 0, 1
    )
    thresholds = fit_thresholds(probs, labels)
    for j in range(3):
        tuned = f1_score(labels[:, j], probs[:, j] >= thresholds[j])
        half = f1_score(labels[:, j], probs[:, j] >= 0.5, zero_division=0)
        assert tuned > 0.9 and tuned > half
        assert 0.1 < thresholds[j] < 0.3


def test_label_without_positives_keeps_the_fallback():
    labels = np.zeros((50, 2), dtype=np.float32)
    labels[:10, 0] = 1
    probs = np.full((50, 2), 0.2, dtype=np.float32)
    thresholds = fit_thresholds(probs, labels, fallback=0.42)
    assert thresholds[1] == np.float32(0.42)


def test_threshold_is_the_best_on_the_grid():
    rng = np.random.default_rng(1)
    labels = (rng.random((500, 1)) < 0.2).astype(np.float32)
    probs = np.clip(labels * 0.4 + rng.random((500, 1)) * 0.5, 0, 1)
    best = fit_thresholds(probs, labels)[0]
    grid_f1 = [f1_score(labels[:, 0], probs[:, 0] >= t) for t in np.round(np.arange(0.01, 1.0, 0.01), 2)]
    assert f1_score(labels[:, 0], probs[:, 0] >= best) == max(grid_f1)
