"""Tests for emotions.evaluation's metrics and held-out protocol (the arithmetic against
hand-computed values) and for the written report (emotions.evaluation_report)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from emotions.evaluation import (
    PLAIN,
    compute_metrics,
    evaluation_report,
    fit_thresholds,
    heldout_halves,
    heldout_macro_f1,
    heldout_metrics,
    macro_f1,
)
from emotions.evaluation_report import format_summary, write_evaluation_report
from emotions.labels import EMOTIONS, LABEL_TO_ID, NUM_LABELS

ADM, ANGER, ANNOY, JOY, NEUTRAL = (LABEL_TO_ID[n] for n in ("admiration", "anger", "annoyance", "joy", "neutral"))


def _rows(*sets: tuple[int, ...]) -> np.ndarray:
    out = np.zeros((len(sets), NUM_LABELS), dtype=int)
    for i, ids in enumerate(sets):
        out[i, list(ids)] = 1
    return out


def _small_case() -> tuple[np.ndarray, np.ndarray]:
    """5 examples; 3 exact matches, one false positive (annoyance), one miss (neutral)."""
    labels = _rows((ADM, JOY), (ANGER,), (NEUTRAL,), (ADM,), (NEUTRAL,))
    predicted = _rows((ADM, JOY), (ANGER, ANNOY), (), (ADM,), (NEUTRAL,))
    probs = np.where(predicted == 1, 0.9, 0.1)
    return labels, probs


def test_perfect_predictions_score_one() -> None:
    rng = np.random.default_rng(0)
    labels = (rng.random((20, NUM_LABELS)) < 0.3).astype(int)
    labels[0] = 1  # every label has support, so macro averages are not diluted by empty labels
    m = compute_metrics(labels, labels.astype(float), 0.5)
    for key in ("macro_f1", "weighted_f1", "micro_f1", "accuracy", "macro_precision", "macro_recall"):
        assert m[key] == 1.0, key
    assert all(v["f1"] == 1.0 for v in m["per_label"].values())


def test_hand_computed_small_case() -> None:
    labels, probs = _small_case()
    m = compute_metrics(labels, probs, 0.5)
    # Per-label F1: admiration 1 (support 2), joy 1 (1), anger 1 (1), neutral 2/3 (2: tp 1, fn 1),
    # annoyance 0 (1 fp, support 0); 24 labels have no positive example: macro averages leave them
    # out (annoyance's false positive still costs micro-F1 and accuracy) and divide by 4.
    assert m["macro_f1"] == pytest.approx((3 + 2 / 3) / 4)
    assert m["macro_precision"] == pytest.approx(4 / 4)  # neutral's precision is 1
    assert m["macro_recall"] == pytest.approx(3.5 / 4)  # neutral's recall is 1/2
    assert len(m["labels_absent"]) == 24 and "annoyance" in m["labels_absent"] and "joy" not in m["labels_absent"]
    assert m["weighted_f1"] == pytest.approx((2 * 1 + 1 + 1 + 2 * 2 / 3) / 6)  # = 8/9
    assert m["micro_f1"] == pytest.approx(5 / 6)  # tp 5, fp 1, fn 1
    assert m["accuracy"] == pytest.approx(3 / 5)  # examples 0, 3, 4 match exactly
    neutral = m["per_label"]["neutral"]
    assert neutral == {
        "precision": 1.0,
        "recall": 0.5,
        "f1": pytest.approx(2 / 3),
        "support": 2,
        "threshold": 0.5,
        "true_share": 2 / 5,  # true on examples 2 and 4
        "predicted_share": 1 / 5,  # tagged on example 4 only
    }
    assert m["per_label"]["annoyance"]["true_share"] == 0 and m["per_label"]["annoyance"]["predicted_share"] == 1 / 5
    assert m["per_label"]["annoyance"]["support"] == 0
    assert list(m["per_label"]) == list(EMOTIONS)
    json.dumps(m)  # plain Python types only
    assert type(m["macro_f1"]) is float and type(neutral["support"]) is int


def test_per_label_thresholds_change_predictions() -> None:
    labels, probs = _small_case()
    thresholds = np.full(NUM_LABELS, 0.5)
    thresholds[ANNOY] = 0.95  # drops the false positive: example 1 now matches exactly
    m = compute_metrics(labels, probs, thresholds)
    assert m["accuracy"] == pytest.approx(4 / 5)
    assert m["micro_f1"] == pytest.approx(10 / 11)  # tp 5, fp 0, fn 1
    assert m["per_label"]["annoyance"]["threshold"] == 0.95
    # A probability equal to the threshold counts as predicted.
    assert compute_metrics(labels, probs, 0.9)["accuracy"] == pytest.approx(3 / 5)


def test_shape_mismatch_names_both_shapes() -> None:
    labels, probs = _small_case()
    with pytest.raises(ValueError, match=r"\(5, 28\).*\(5, 27\)"):
        compute_metrics(labels, probs[:, :-1], 0.5)
    with pytest.raises(ValueError, match="thresholds"):
        compute_metrics(labels, probs, np.full(3, 0.5))


def test_write_report_writes_three_readable_files(tmp_path) -> None:
    labels, probs = _small_case()
    thresholds = np.linspace(0.2, 0.8, NUM_LABELS)
    report = evaluation_report(labels, probs, thresholds, in_sample=True, source="dev.parquet", model="tiny")
    assert report["n_examples"] == 5
    summary = format_summary(report)
    assert summary.splitlines()[1].startswith("held-out halves")  # the number to compare by comes first
    assert "threshold 0.5" in summary and "fitted thresholds, in-sample" in summary
    assert "left out of macro averages" in summary
    unseen = format_summary(evaluation_report(labels, probs, thresholds, in_sample=False))
    assert "unseen data" in unseen and "in-sample" not in unseen
    assert f"{report['at_0.5']['macro_f1']:.4f}" in summary

    paths = write_evaluation_report(report, tmp_path / "out", title="Dev")
    assert set(paths) == {"json", "markdown", "plot"} and all(p.is_file() for p in paths.values())
    assert json.loads(paths["json"].read_text()) == report
    md = paths["markdown"].read_text()
    rows = [line for line in md.splitlines() if line.startswith("| ") and line.split("|")[1].strip(" *") in EMOTIONS]
    # The per-label metrics, then the held-out shares: each label once in each table.
    assert [r.split("|")[1].strip(" *") for r in rows] == list(EMOTIONS) * 2
    assert "## How often each label is tagged" in md
    assert md.count("| **") == 4  # the four lowest-F1 labels are marked
    assert "| held-out halves |" in md and "in-sample" in md
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_heldout_halves_are_stratified_and_paired_change_sees_a_real_loss():
    from emotions.evaluation import heldout_halves, paired_change

    rng = np.random.default_rng(0)
    labels = (rng.random((600, NUM_LABELS)) < np.linspace(0.005, 0.2, NUM_LABELS)).astype(int)
    a, b = heldout_halves(labels, seed=1)
    assert sorted(np.concatenate([a, b]).tolist()) == list(range(600)) and abs(len(a) - len(b)) <= 1
    enough = labels.sum(0) >= 2
    assert (labels[a].sum(0)[enough] > 0).all() and (labels[b].sum(0)[enough] > 0).all()
    probs = np.clip(labels * 0.6 + rng.random(labels.shape) * 0.5, 0, 1)
    same = paired_change(labels, probs, probs, resamples=200)
    assert same["change"] == 0 and same["interval_95"] == [0, 0] and same["rows_changed"] == 0
    noisy = np.clip(probs + rng.normal(0, 0.3, probs.shape), 0, 1)  # a much worse candidate
    worse = paired_change(labels, probs, noisy, resamples=200)
    assert worse["interval_95"][1] < 0 and worse["rows_changed"] > 0.5
    assert same["share_change"]["ratio"] == 1.0
    # A candidate that tags one label on every row: held out, counted against the reference's tags of it.
    label = int(np.argmax(labels.sum(0)))
    flooded = probs.copy()
    flooded[:, label] = 1.0
    over = paired_change(labels, probs, flooded, resamples=200)["share_change"]
    assert over["label"] == EMOTIONS[label] and over["candidate_share"] == 1.0
    assert over["ratio"] == pytest.approx(1.0 / over["reference_share"])


def test_macro_f1_leaves_out_absent_labels_so_subsets_compare():
    """A perfect model scores 1.0 on any subset, however many labels the subset happens to lack."""
    rng = np.random.default_rng(3)
    labels = (rng.random((400, NUM_LABELS)) < np.linspace(0.002, 0.2, NUM_LABELS)).astype(int)
    subset = labels[:40]
    assert (subset.sum(0) == 0).any()  # some rare labels are absent from the subset
    for rows in (labels, subset):
        m = compute_metrics(rows, rows.astype(float), 0.5)
        assert m["macro_f1"] == 1.0 and m["labels_absent"] == [EMOTIONS[j] for j in np.flatnonzero(rows.sum(0) == 0)]
        assert macro_f1(rows, rows)[0] == pytest.approx(1.0)
    # The vectorised macro_f1 and compute_metrics agree on a noisy model.
    probs = np.clip(labels * 0.5 + rng.random(labels.shape) * 0.6, 0, 1)
    assert macro_f1(labels, probs >= 0.5)[0] == pytest.approx(compute_metrics(labels, probs, 0.5)["macro_f1"])


def test_heldout_metrics_never_score_rows_their_thresholds_were_fitted_on():
    """Noise that in-sample thresholds can fit: the held-out estimate sees through it."""
    rng = np.random.default_rng(4)
    labels = (rng.random((600, NUM_LABELS)) < 0.03).astype(int)
    probs = rng.random(labels.shape)  # no signal at all
    # Each label's own best-F1 value (PLAIN): in-sample it flatters pure noise.
    in_sample = compute_metrics(labels, probs, fit_thresholds(probs, labels, PLAIN))["macro_f1"]
    assert heldout_metrics(labels, probs, rule=PLAIN)["macro_f1"] < in_sample - 0.01
    held = heldout_metrics(labels, probs)  # the default rule, by hand below
    assert held["macro_f1"] == pytest.approx(heldout_macro_f1(labels, probs))
    # By hand: each half's thresholds scored on the other half.
    a, b = heldout_halves(labels)
    by_hand = np.mean(
        [
            compute_metrics(labels[s], probs[s], fit_thresholds(probs[f], labels[f]))["macro_f1"]
            for f, s in ((a, b), (b, a))
        ]
    )
    assert held["macro_f1"] == pytest.approx(by_hand)


def test_a_set_too_small_to_halve_has_no_heldout_row():
    labels, probs = _small_case()
    assert heldout_metrics(labels[:1], probs[:1]) is None and np.isnan(heldout_macro_f1(labels[:1], probs[:1]))
    report = evaluation_report(labels[:1], probs[:1], 0.5, in_sample=False)
    assert report["heldout"] is None and "held-out" not in format_summary(report)


def test_share_table_by_hand_and_in_the_printed_report() -> None:
    from emotions.evaluation import label_shares, largest_share_ratio, share_table
    from emotions.evaluation_report import format_shares

    labels, probs = _small_case()
    shares = label_shares(labels, probs >= 0.5)
    # admiration: true on 2 of 5, tagged on 2; anger 1 and 2 (the false annoyance is its own label);
    # annoyance: never true, tagged once (no ratio); neutral: true on 2, tagged on 1.
    assert shares["positives"][ADM] == 2 and shares["tagged"][ADM] == 2 and shares["ratio"][ADM] == 1
    assert shares["true_share"][NEUTRAL] == pytest.approx(0.4) and shares["predicted_share"][NEUTRAL] == pytest.approx(
        0.2
    )
    assert shares["ratio"][NEUTRAL] == pytest.approx(0.5)
    assert np.isnan(shares["ratio"][ANNOY]) and shares["predicted_share"][ANNOY] == pytest.approx(0.2)
    table = share_table(labels, probs >= 0.5)
    assert table["annoyance"]["ratio"] is None and table["joy"] == {
        "positives": 1,
        "tagged": 1,
        "true_share": 0.2,
        "predicted_share": 0.2,
        "ratio": 1.0,
    }
    # Labels with fewer positives than `judged` are left out of the largest ratio.
    assert largest_share_ratio(table, judged=2)["label"] == "admiration"  # 1.0, above neutral's 0.5
    assert largest_share_ratio(table) is None  # no label has 10 positives here
    printed = format_shares({"heldout": {"shares": table}})
    assert "neutral                 2   40.00%   20.00%   0.50x" in printed
    assert "annoyance               0    0.00%   20.00%       -" in printed


def test_heldout_shares_tag_each_row_at_the_other_halfs_thresholds() -> None:
    rng = np.random.default_rng(3)
    labels = (rng.random((400, NUM_LABELS)) < 0.1).astype(int)
    probs = np.clip(labels * 0.3 + rng.random(labels.shape) * 0.6, 0, 1)
    held = heldout_metrics(labels, probs)
    tagged = np.zeros(NUM_LABELS)
    for fit, scored in (heldout_halves(labels), heldout_halves(labels)[::-1]):
        tagged += (probs[scored] >= fit_thresholds(probs[fit], labels[fit])).sum(0)
    assert [held["shares"][name]["tagged"] for name in EMOTIONS] == tagged.astype(int).tolist()
    assert held["shares"]["joy"]["true_share"] == pytest.approx(labels[:, JOY].mean())
    worst = max(EMOTIONS, key=lambda name: held["shares"][name]["ratio"])
    assert held["largest_share_ratio"]["label"] == worst
    assert f"({held['largest_share_ratio']['ratio']:.1f}x)" in format_summary(
        {"heldout": held, "at_0.5": held, "at_thresholds": held}
    )


def test_on_unseen_data_the_shares_shown_are_those_at_the_bundles_thresholds() -> None:
    from emotions.evaluation_report import format_shares

    labels, probs = _small_case()
    thresholds = np.full(NUM_LABELS, 0.5)
    thresholds[NEUTRAL] = 0.05  # neutral tagged on every example: 5 of 5 against 2 true
    report = evaluation_report(labels, probs, thresholds, in_sample=False)
    shares = report["at_thresholds"]["shares"]
    assert shares["neutral"]["predicted_share"] == 1.0 and shares["neutral"]["ratio"] == pytest.approx(2.5)
    assert report["at_thresholds"]["largest_share_ratio"] is None  # no label has 10 positives here
    printed = format_shares(report)
    assert "(bundle's thresholds, unseen data)" in printed.splitlines()[0]
    assert "neutral                 2   40.00%  100.00%   2.50x" in printed
    # In-sample thresholds: the held-out shares are the ones shown.
    assert "(held out)" in format_shares(evaluation_report(labels, probs, thresholds, in_sample=True))
