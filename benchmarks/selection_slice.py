"""Cut GoEmotions train into a training part and a selection slice held out from it, so that a
choice between settings (the `default` preset's epochs) is made on comments that neither training
nor the dev halves the README reports on ever saw.

    python benchmarks/selection_slice.py --out /tmp/sel
    emotions train --preset default --output /tmp/sel/ep4 data.train=/tmp/sel/train_rest.tsv \\
        data.validation=/tmp/sel/sel.tsv

Writes ``train_rest.tsv`` (37,984 comments) and ``sel.tsv`` (5,426, the size of dev), both in the
GoEmotions layout, the slice drawn with a seeded shuffle of the train split's lines.
"""

from __future__ import annotations

import argparse
import random
from collections import Counter
from pathlib import Path

from emotions.data import bundled_path
from emotions.labels import EMOTIONS

SEED = 12345
SIZE = 5426  # as many comments as GoEmotions dev


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("/tmp/sel"))
    args = parser.parse_args()
    lines = [line for line in bundled_path("train").read_text(encoding="utf-8").split("\n") if line]
    order = list(range(len(lines)))
    random.Random(SEED).shuffle(order)
    chosen = set(order[:SIZE])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sel.tsv").write_text("\n".join(lines[i] for i in sorted(chosen)) + "\n", encoding="utf-8")
    rest = "\n".join(line for i, line in enumerate(lines) if i not in chosen) + "\n"
    (args.out / "train_rest.tsv").write_text(rest, encoding="utf-8")
    counts = Counter(int(j) for i in chosen for j in lines[i].split("\t")[1].split(","))
    rarest = ", ".join(f"{EMOTIONS[j]} {n}" for j, n in sorted(counts.items(), key=lambda t: t[1])[:4])
    print(
        f"{args.out}/sel.tsv: {len(chosen)} comments (rarest labels: {rarest}); "
        f"{args.out}/train_rest.tsv: {len(lines) - len(chosen)}"
    )


if __name__ == "__main__":
    main()
