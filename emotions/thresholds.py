"""Per-label decision thresholds that maximise each label's F1 (the seed study's biggest gain)."""

from __future__ import annotations

import numpy as np

GRID = np.round(np.arange(0.01, 1.0, 0.01), 2)  # candidate thresholds


def fit_thresholds(probs: np.ndarray, labels: np.ndarray, fallback: float = 0.5,
                   grid: np.ndarray = GRID) -> np.ndarray:  # fmt: skip
    """[n, L] probabilities and 0/1 labels -> [L] thresholds, each the grid value with the best F1
    for its label (ties go to the higher threshold: fewer false positives on new data).
    A label with no positive example keeps ``fallback``: there is nothing to fit."""
    if probs.shape != labels.shape:
        raise ValueError(f"probs {probs.shape} and labels {labels.shape} differ in shape")
    positive = labels.astype(bool)
    # [grid, n, L] predictions are too big for large n; count per grid value instead.
    tp = np.stack([((probs >= t) & positive).sum(0) for t in grid])  # [grid, L]
    predicted = np.stack([(probs >= t).sum(0) for t in grid])  # [grid, L]
    support = positive.sum(0)  # [L]
    f1 = 2 * tp / np.maximum(predicted + support[None, :], 1)
    best = len(grid) - 1 - np.argmax(f1[::-1], axis=0)  # last index of the max
    thresholds = grid[best].astype(np.float32)
    thresholds[support == 0] = fallback
    return thresholds
