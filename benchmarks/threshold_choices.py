"""Per-label threshold rules compared on held-out halves of labelled data a bundle never trained
on, by two measures at once: held-out macro-F1, and how often each label is tagged against how
often it is true (a label tagged at 70x its share is a failure macro-F1 hardly sees).

For each split seed the rows are cut in two stratified halves; thresholds are fitted on one half
(or on ``--fit-rows`` rows drawn from it: 1,000 per half is what a 2,000-row validation split gives) and scored on
the other, both ways. Per rule the table shows the mean held-out macro-F1, its change from the
plain best-F1 rule with the spread of that change over seeds, the largest ratio of predicted to
true share among labels with at least 10 positives in a scored half (worst fold of each seed,
then the worst and the mean over seeds), how many (label, fold) pairs go above 4x, and the share
of rows given 4 or more labels.

Rules:
- best F1: each label's grid value with the best F1 on the fitting rows (``PLAIN``: the rule until
  2026-12);
- cap c: best F1, then raised until the label is predicted on at most c times its positives among
  the fitting rows (``evaluation.ThresholdRule(max_share_ratio=c)``);
- min k, match: best F1 where a label has k or more positives in the fitting rows; below k, the
  lowest threshold that predicts it no more often than it is true;
- shrink m: a label with n positives gets (n * own + m * pooled) / (n + m), ``pooled`` the one
  grid value best for macro-F1 over all labels (``ThresholdRule(shrink=m)``); with a cap, the cap
  applies after the shrinkage;
- to share m: the same, toward the label's own share-matching value (``prior="share"``);
- default: ``ThresholdRule()``, what training fits a bundle's thresholds with;
- smooth k: each label's F1 curve averaged over k grid steps either side before its maximum.

    python benchmarks/threshold_choices.py --model emotions-quickstart/model \\
        --data goemotions:dev --fit-rows 1000 --name quickstart_fit1000
"""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path

import numpy as np

from emotions.bundle import load_bundle
from emotions.data import load_labelled
from emotions.evaluation import (
    GRID,
    PLAIN,
    ThresholdRule,
    f1_curves,
    fit_thresholds,
    heldout_halves,
    label_shares,
    macro_f1,
)

RESULTS = Path(__file__).parent / "results"
MIN_SCORED_POSITIVES = 10  # labels judged on their share ratio in a scored half
RATIO_LIMIT = 4.0


def smoothed(probs: np.ndarray, labels: np.ndarray, smooth: int) -> np.ndarray:
    f1, support = f1_curves(probs, labels)
    padded = np.pad(f1, ((smooth, smooth), (0, 0)), mode="edge")
    f1 = np.stack([np.convolve(padded[:, j], np.ones(2 * smooth + 1), mode="valid") for j in range(f1.shape[1])], 1) / (
        2 * smooth + 1
    )
    thresholds = GRID[len(GRID) - 1 - np.argmax(f1[::-1], axis=0)].astype(np.float64)
    thresholds[support == 0] = 0.5
    return thresholds


def min_positives_match(probs: np.ndarray, labels: np.ndarray, minimum: int) -> np.ndarray:
    thresholds = fit_thresholds(probs, labels, PLAIN)
    matched = fit_thresholds(probs, labels, ThresholdRule(shrink=0, max_share_ratio=1.0))
    few = labels.sum(0) < minimum
    thresholds[few] = np.maximum(thresholds[few], matched[few])
    return thresholds


def rule(shrink: float = 0.0, cap: float | None = None, prior: str = "pooled"):
    return lambda p, y: fit_thresholds(p, y, ThresholdRule(shrink=shrink, prior=prior, max_share_ratio=cap))


RULES = {
    "best F1": rule(),
    **{f"cap {c:g}": rule(cap=c) for c in (1.0, 1.5, 2.0, 3.0)},
    **{f"min {k}, match": functools.partial(min_positives_match, minimum=k) for k in (10, 40)},
    **{f"shrink {m:g}": rule(shrink=m) for m in (5, 20, 40, 100)},
    **{f"shrink {m:g}, cap {c:g}": rule(shrink=m, cap=c) for m in (20, 40) for c in (1.5, 2.0, 3.0)},
    **{f"to share {m:g}": rule(shrink=m, prior="share") for m in (10, 40)},
    **{f"to share {m:g}, cap {c:g}": rule(shrink=m, cap=c, prior="share") for m in (10, 40) for c in (2.0, 3.0)},
    "smooth 3": functools.partial(smoothed, smooth=3),
}
DEFAULT = ThresholdRule()
RULES[f"default ({DEFAULT.prior} {DEFAULT.shrink:g}, cap {DEFAULT.max_share_ratio:g})"] = lambda p, y: fit_thresholds(
    p, y
)


def score(labels: np.ndarray, probs: np.ndarray, thresholds: np.ndarray) -> dict:
    predicted = probs >= thresholds
    shares = label_shares(labels, predicted)
    judged = shares["positives"] >= MIN_SCORED_POSITIVES
    ratios = shares["ratio"][judged]
    return {
        "macro_f1": float(macro_f1(labels, predicted)[0]),
        "max_ratio": float(ratios.max()),
        "over": int((ratios > RATIO_LIMIT).sum()),
        "four_plus": float((predicted.sum(1) >= 4).mean()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="bundle folder")
    parser.add_argument("--data", help="labelled data to score (default: the bundle's validation split)")
    parser.add_argument("--fit-rows", type=int, help="fit each fold on this many rows drawn from its half")
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--name", help="results file name (benchmarks/results/threshold_choices_NAME.json)")
    args = parser.parse_args()
    bundle = load_bundle(args.model)
    data = bundle.config["data"]
    validation = load_labelled(
        args.data or data["validation"],
        text_column=data["text_column"],
        labels_column=data["labels_column"],
        label_format=data["label_format"],
    )
    probs, labels = bundle.predict_proba(validation.texts), validation.labels.astype(bool)
    runs = {name: [] for name in RULES}
    for seed in range(args.seeds):
        halves = heldout_halves(labels, seed)
        rng = np.random.default_rng(1000 + seed)
        for fit, scored in (halves, halves[::-1]):
            if args.fit_rows:
                fit = rng.choice(fit, size=min(args.fit_rows, len(fit)), replace=False)
            for name, rule in RULES.items():
                runs[name].append(score(labels[scored], probs[scored], rule(probs[fit], labels[fit])))
    base = np.array([run["macro_f1"] for run in runs["best F1"]]).reshape(args.seeds, 2).mean(1)
    fitted_on = args.fit_rows or len(labels) // 2
    print(
        f"\n{len(labels):,} examples of {validation.source}, bundle {bundle.hash}, {args.seeds} seeded splits, "
        f"thresholds fitted on {fitted_on:,} rows per fold"
    )
    head = f"{'rule':24}{'held-out':>9}{'change':>8}{'spread':>7}{'worst x':>8}{'mean x':>7}{'>4x':>5}{'4+ labels':>10}"
    print(head)
    rows = []
    for name, folds in runs.items():
        f1 = np.array([run["macro_f1"] for run in folds]).reshape(args.seeds, 2).mean(1)
        worst = np.array([run["max_ratio"] for run in folds]).reshape(args.seeds, 2).max(1)
        row = {
            "rule": name,
            "heldout_macro_f1": float(f1.mean()),
            "change": float((f1 - base).mean()),
            "spread": float((f1 - base).std()),
            "worst_ratio": float(worst.max()),
            "mean_worst_ratio": float(worst.mean()),
            "over_4x": int(sum(run["over"] for run in folds)),
            "rows_4plus": float(np.mean([run["four_plus"] for run in folds])),
        }
        rows.append(row)
        print(
            f"{name:24}{row['heldout_macro_f1']:9.4f}{row['change']:+8.4f}{row['spread']:7.4f}"
            f"{row['worst_ratio']:8.1f}{row['mean_worst_ratio']:7.1f}{row['over_4x']:5d}{row['rows_4plus']:10.2%}"
        )
    true_four = float((labels.sum(1) >= 4).mean())
    print(
        f"rows with 4+ true labels: {true_four:.2%}; labels judged on their ratio: >= {MIN_SCORED_POSITIVES} positives"
    )
    out = RESULTS / f"threshold_choices_{args.name or bundle.hash}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    summary = {
        "model_hash": bundle.hash,
        "data": validation.source,
        "fit_rows": fitted_on,
        "seeds": args.seeds,
        "rows": rows,
    }
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
