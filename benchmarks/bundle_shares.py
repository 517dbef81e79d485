"""How often a bundle tags each label, at its own thresholds, on labelled rows its thresholds were
not fitted on, against how often each label is true there: the shares a user of the bundle gets.

The rows the thresholds were fitted on are the bundle's validation split as its config took it
(``data.validation``, capped at ``data.max_validation_examples`` with its seed); they are left
out of ``--data`` by text. Prints the labels tagged most often against their share, and the share
of rows given 4 or more labels.

    python benchmarks/bundle_shares.py --model emotions-quickstart/model --data goemotions:dev
"""

from __future__ import annotations

import argparse

import numpy as np

from emotions.bundle import load_bundle
from emotions.data import load_labelled
from emotions.evaluation import label_shares
from emotions.labels import EMOTIONS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="bundle folder")
    parser.add_argument("--data", default="goemotions:dev", help="labelled data")
    parser.add_argument("--top", type=int, default=6, help="labels shown")
    args = parser.parse_args()
    bundle = load_bundle(args.model)
    data, seed = bundle.config["data"], bundle.config.get("seed", 0)
    kw = dict(text_column=data["text_column"], labels_column=data["labels_column"], label_format=data["label_format"])
    fitted = set(load_labelled(data["validation"], **kw).take(data["max_validation_examples"], seed).texts)
    labelled = load_labelled(args.data, **kw)
    unseen = np.array([text not in fitted for text in labelled.texts])
    labels = labelled.labels[unseen].astype(bool)
    tagged = bundle.predict_proba([t for t, keep in zip(labelled.texts, unseen) if keep]) >= bundle.thresholds
    shares = label_shares(labels, tagged)
    print(f"\nbundle {bundle.hash}: {unseen.sum():,} rows of {labelled.source} its thresholds were not fitted on")
    print(f"{'label':15}{'positives':>10}{'true':>9}{'tagged':>9}{'ratio':>8}{'threshold':>11}")
    for j in np.argsort(-np.nan_to_num(shares["ratio"]))[: args.top]:
        print(
            f"{EMOTIONS[j]:15}{shares['positives'][j]:>10}{shares['true_share'][j]:>9.2%}"
            f"{shares['predicted_share'][j]:>9.2%}{shares['ratio'][j]:>7.1f}x{bundle.thresholds[j]:>11.2f}"
        )
    print(f"rows given 4+ labels: {(tagged.sum(1) >= 4).mean():.2%} (true: {(labels.sum(1) >= 4).mean():.2%})")


if __name__ == "__main__":
    main()
