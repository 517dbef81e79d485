"""Per-label threshold choices compared on held-out halves of a bundle's validation split: the
plain best-F1 grid value (what ``evaluation.fit_thresholds`` does) against robust variants for
labels with few positives (grief has 13 in dev), over several seeded splits in one run.

- shrink m: a label with n positives gets (n * own + m * pooled) / (n + m), ``pooled`` the one
  grid value best for macro-F1 over all labels;
- smooth k: each label's F1 curve averaged over k grid steps either side before its maximum;
- global: one threshold for every label.

For each split seed, thresholds are fitted on one half and scored on the other, both ways; the
table shows the mean held-out macro-F1, its difference from best-F1, the spread of that
difference over the seeds, and on how many seeds the variant won.

    python benchmarks/threshold_choices.py --model /tmp/default_run/bundle
"""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path

import numpy as np

from emotions.bundle import load_bundle
from emotions.data import load_labelled
from emotions.evaluation import GRID, f1_curves, fit_thresholds, heldout_halves, macro_f1

RESULTS = Path(__file__).parent / "results" / "threshold_choices.json"


def robust_thresholds(probs: np.ndarray, labels: np.ndarray, shrink: float = 0.0, smooth: int = 0) -> np.ndarray:
    f1, support = f1_curves(probs, labels)
    if smooth:
        padded = np.pad(f1, ((smooth, smooth), (0, 0)), mode="edge")
        f1 = np.stack(
            [np.convolve(padded[:, j], np.ones(2 * smooth + 1), mode="valid") for j in range(f1.shape[1])], 1
        ) / (2 * smooth + 1)
    thresholds = GRID[len(GRID) - 1 - np.argmax(f1[::-1], axis=0)].astype(np.float64)
    if shrink:
        pooled = GRID[len(GRID) - 1 - np.argmax(f1[:, support > 0].mean(1)[::-1])]
        thresholds = (support * thresholds + shrink * pooled) / (support + shrink)
    thresholds[support == 0] = 0.5
    return thresholds


VARIANTS = {
    "best F1 (fit_thresholds)": lambda p, y: fit_thresholds(p, y),
    **{f"shrink {m}": functools.partial(robust_thresholds, shrink=m) for m in (2, 5, 10, 40)},
    **{f"smooth {k}": functools.partial(robust_thresholds, smooth=k) for k in (1, 2, 3, 5)},
    "global": lambda p, y: robust_thresholds(p, y, shrink=1e12),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="/tmp/default_run/bundle")
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    bundle = load_bundle(args.model)
    data = bundle.config["data"]
    validation = load_labelled(
        data["validation"],
        text_column=data["text_column"],
        labels_column=data["labels_column"],
        label_format=data["label_format"],
    )
    probs, labels = bundle.predict_proba(validation.texts), validation.labels.astype(bool)
    scores = {name: [] for name in VARIANTS}
    for seed in range(args.seeds):
        halves = heldout_halves(labels, seed)
        for name, fit in VARIANTS.items():
            scores[name].append(
                np.mean(
                    [macro_f1(labels[s], probs[s] >= fit(probs[f], labels[f]))[0] for f, s in (halves, halves[::-1])]
                )
            )
    base = np.array(scores["best F1 (fit_thresholds)"])
    print(f"\n{len(labels):,} examples of {validation.source}, bundle {bundle.hash}, {args.seeds} seeded splits")
    print(f"{'thresholds':28}{'held-out':>10}{'vs best F1':>12}{'spread':>8}{'wins':>6}")
    rows = []
    for name, values in scores.items():
        diff = np.array(values) - base
        rows.append(
            {
                "variant": name,
                "heldout_macro_f1": float(np.mean(values)),
                "change": float(diff.mean()),
                "spread": float(diff.std()),
                "wins": int((diff > 0).sum()),
            }
        )
        print(f"{name:28}{np.mean(values):10.4f}{diff.mean():+12.4f}{diff.std():8.4f}{(diff > 0).sum():>6}")
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps({"model_hash": bundle.hash, "seeds": args.seeds, "rows": rows}, indent=2) + "\n")
    print(f"written to {args.results}")


if __name__ == "__main__":
    main()
