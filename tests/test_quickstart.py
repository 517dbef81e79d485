"""``emotions quickstart`` at test scale: what a new user sees first must not tag a label at many
times its real share (relief was tagged on 15% of the quickstart's sample against a true 0.2%)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.dataset as ds

from emotions import cli
from emotions.data import load_labelled
from emotions.labels import EMOTIONS

LIMIT = 4.0  # no label with 10 or more positives tagged at more than 4x its true share


def test_the_quickstart_tags_every_label_near_its_real_share(local_ray, runs_dir, tmp_path, capsys):
    out = tmp_path / "qs"
    code = cli.main(
        [
            "quickstart",
            "--output",
            str(out),
            "model.encoder=tiny-random",
            "data.max_train_examples=1024",
            "data.max_length=32",
            f"run.storage_path={runs_dir}",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "tagged most often against its true share (held out)" in printed

    # Held out on all of dev (the quickstart's validation split): shares at thresholds fitted on
    # the other half.
    report = json.loads((out / "report" / "metrics.json").read_text())
    assert report["heldout"]["examples"] == 5426
    judged = {n: r for n, r in report["heldout"]["shares"].items() if r["positives"] >= 10}
    assert len(judged) >= 20
    assert max(r["ratio"] for r in judged.values()) <= LIMIT, report["heldout"]["largest_share_ratio"]

    # The tagged sample (real GoEmotions comments) against GoEmotions' own shares.
    tagged = ds.dataset(out / "sample-tagged", format="parquet").to_table(columns=["emotions", "error"]).to_pylist()
    rows = [r["emotions"] for r in tagged if r["error"] is None]
    assert len(rows) > 1500
    dev = load_labelled("goemotions:dev").labels
    for j, name in enumerate(EMOTIONS):
        true_share = dev[:, j].mean()
        if dev[:, j].sum() < 10:
            continue
        share = np.mean([name in r for r in rows])
        assert share <= LIMIT * true_share, f"{name}: tagged on {share:.2%} of the sample, true on {true_share:.2%}"
