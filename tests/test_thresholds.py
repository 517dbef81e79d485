"""Per-label thresholds."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import f1_score

from emotions.evaluation import PLAIN, ThresholdRule, explain_thresholds, fit_bundle_thresholds, fit_thresholds


def test_thresholds_beat_half_for_under_confident_labels():
    rng = np.random.default_rng(0)
    labels = (rng.random((2000, 3)) < [0.05, 0.3, 0.5]).astype(np.float32)
    # A rare label whose positives score ~0.3: at 0.5 it is never predicted.
    probs = np.clip(
        labels * rng.normal(0.3, 0.05, labels.shape) + (1 - labels) * rng.normal(0.1, 0.05, labels.shape), 0, 1
    )
    thresholds = fit_thresholds(probs, labels, PLAIN)
    for j in range(3):
        tuned = f1_score(labels[:, j], probs[:, j] >= thresholds[j])
        half = f1_score(labels[:, j], probs[:, j] >= 0.5, zero_division=0)
        assert tuned > 0.9 and tuned > half
        assert 0.1 < thresholds[j] < 0.3


def test_label_without_positives_keeps_the_fallback():
    labels = np.zeros((50, 2), dtype=np.float32)
    labels[:10, 0] = 1
    probs = np.full((50, 2), 0.2, dtype=np.float32)
    thresholds = fit_thresholds(probs, labels, ThresholdRule(fallback=0.42))
    assert thresholds[1] == np.float32(0.42)


def test_threshold_is_the_best_on_the_grid():
    rng = np.random.default_rng(1)
    labels = (rng.random((500, 1)) < 0.2).astype(np.float32)
    probs = np.clip(labels * 0.4 + rng.random((500, 1)) * 0.5, 0, 1)
    best = fit_thresholds(probs, labels, PLAIN)[0]
    grid_f1 = [f1_score(labels[:, 0], probs[:, 0] >= t) for t in np.round(np.arange(0.01, 1.0, 0.01), 2)]
    assert f1_score(labels[:, 0], probs[:, 0] >= best) == max(grid_f1)


@pytest.mark.parametrize("prior", ["share", "pooled"])
def test_shrinkage_pulls_a_label_toward_its_target_by_its_positives(prior):
    rng = np.random.default_rng(2)
    labels = (rng.random((3000, 2)) < [0.3, 0.004]).astype(np.float32)  # 2nd label: about 12 positives
    probs = np.clip(labels * 0.35 + rng.random(labels.shape) * 0.5, 0, 1)
    explained = explain_thresholds(probs, labels, ThresholdRule(shrink=40, prior=prior, max_share_ratio=None))
    own, n = explained["own"], labels.sum(0)
    if prior == "pooled":
        target = np.full(2, explained["pooled"])
    else:  # each label's lowest grid value tagging it on no more rows than it is true on
        grid = np.round(np.arange(0.01, 1.0, 0.01), 2)
        target = np.array([grid[(probs[:, j, None] >= grid).sum(0) <= n[j]].min() for j in range(2)])
    np.testing.assert_allclose(explained["target"], target)
    expected = (n * own + 40 * target) / (n + 40)
    np.testing.assert_allclose(explained["thresholds"], expected, rtol=1e-6)
    np.testing.assert_allclose(own, fit_thresholds(probs, labels, PLAIN), rtol=1e-6)
    # The common label keeps most of its own value, the rare one mostly the target.
    assert abs(expected[0] - own[0]) < abs(expected[1] - own[1])


def test_the_share_cap_bounds_a_label_that_best_f1_tags_far_too_often():
    # A rare label whose positives score no higher than a fifth of the negatives: best F1 sits low
    # and tags hundreds of rows for 5 positives.
    rng = np.random.default_rng(0)
    labels = np.zeros((2000, 1), dtype=np.float32)
    labels[:5] = 1
    probs = rng.random((2000, 1)) * 0.5
    probs[:5] = [[0.45], [0.46], [0.2], [0.1], [0.05]]
    plain = fit_thresholds(probs, labels, PLAIN)[0]
    capped = fit_thresholds(probs, labels, ThresholdRule(shrink=0, max_share_ratio=2.0))[0]
    assert (probs[:, 0] >= plain).sum() > 20
    assert (probs[:, 0] >= capped).sum() <= 2 * 5 and capped > plain
    # The lowest grid value that meets the cap: one step lower breaks it.
    assert (probs[:, 0] >= round(float(capped) - 0.01, 2)).sum() > 10


def test_labels_on_few_positives_are_named_with_what_was_done(caplog):
    from emotions.labels import EMOTIONS, NUM_LABELS

    rng = np.random.default_rng(4)
    labels = (rng.random((1000, NUM_LABELS)) < 0.2).astype(np.float32)
    labels[:, EMOTIONS.index("grief")] = 0
    labels[:3, EMOTIONS.index("grief")] = 1
    labels[:, EMOTIONS.index("pride")] = 0
    probs = np.clip(labels * 0.3 + rng.random(labels.shape) * 0.6, 0, 1)
    with caplog.at_level("WARNING", logger="emotions.evaluation"):
        thresholds, notes = fit_bundle_thresholds(probs, labels, ThresholdRule(min_positives=40))
    assert "grief (3)" in caplog.text and "pride (0)" in caplog.text
    grief = notes["labels"]["grief"]
    assert grief["positives"] == 3 and grief["few_positives"]
    assert "shrunk toward its share-matching" in grief["what_was_done"]
    assert notes["labels"]["pride"]["what_was_done"] == "no positive example: fallback 0.5"
    assert thresholds[EMOTIONS.index("pride")] == np.float32(0.5)
    assert notes["rule"] == ThresholdRule(min_positives=40).as_dict()
    assert "joy" not in notes["labels"] or not notes["labels"]["joy"]["few_positives"]
    # report.md's note names the rule as it is (the share-matching prior, the cap) and each label.
    from emotions.evaluation_report import _threshold_lines

    page = "\n".join(_threshold_lines({"thresholds_fit": notes}))
    assert "toward each label's share-matching threshold, tagged on at most 2x" in page and "| grief | 3 |" in page
