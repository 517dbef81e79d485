"""The seed study's table as configurations."""

from __future__ import annotations

import json

import pytest

from emotions.ablation import ROWS, ablation_base, row_config, run_ablation
from emotions.config import build_config


def test_rows_are_the_seed_table():
    base = ablation_base("quickstart")
    configs = {row.name: row_config(base, row, "laptop") for row in ROWS}
    assert len(ROWS) == 17
    assert configs["+ positive weights (square root of each label's odds)"].stage1.pos_weight_power == 0.5
    # The levers each change one thing over the positive-weights row.
    assert configs["+ weight average (EMA 0.999)"].stage1.ema_decay == 0.999
    assert configs["+ layer-wise lr decay 0.8"].stage1.layer_lr_decay == 0.8
    focal = configs["+ focal loss (gamma 2)"]
    assert (focal.stage1.gamma_neg, focal.stage2.gamma_pos, focal.stage1.pos_weight_power) == (2, 2, 0.5)
    asymmetric = configs["asymmetric loss (gamma- 4, clip 0.05) instead of positive weights"]
    assert (asymmetric.stage2.gamma_neg, asymmetric.stage1.neg_clip, asymmetric.stage1.pos_weight_power) == (4, 0.05, 0)
    assert configs["+ max_length 32 (faster epochs)"].data.max_length == 32
    assert configs["+ bottom 2 layers frozen (faster epochs)"].model.freeze_layers == 2
    one = configs["DenseLayer(1) + dynamic lr"]
    assert one.stage2.epochs == 0 and one.stage1.schedule == "linear"
    # The seed's rows train with plain BCE even over a preset that weights positives (quickstart),
    # unless the user's overrides say otherwise.
    assert build_config("quickstart").stage1.pos_weight_power > 0 and one.stage1.pos_weight_power == 0
    assert configs["+ stage 2's head only if it wins held out"].stage2.pos_weight_power == 0
    assert ablation_base("quickstart", ["stage1.pos_weight_power=0.3"])["stage1"]["pos_weight_power"] == 0.3
    fixed = configs["DenseLayer(1) + fixed lr 5e-5"]
    assert fixed.stage1.schedule == "constant" and fixed.stage1.learning_rate == 5e-5
    assert configs["+ two-stage"].stage2.epochs > 0
    # The seed's rows keep stage 2's head always; the last row keeps it only if it wins held out.
    assert configs["+ two-stage"].model.head_choice == "last"
    assert configs["+ stage 2's head only if it wins held out"].model.head_choice == "heldout"
    assert configs["+ expanded dataset"].data.concat_fraction > 0
    assert configs["DenseLayer(2), dropout 0.2"].stage2.head_depth == 2
    assert configs["DenseLayer(2), dropout 0.2"].stage2.dropout == 0.2
    assert all(c.data.max_train_examples == 10000 for c in configs.values())  # laptop budget
    # Cumulative rows: all but the first train the encoder at the constant 5e-5 of row 2.
    later = list(configs.values())[1:]
    assert all((c.stage1.schedule, c.stage1.learning_rate) == ("constant", 5e-5) for c in later)
    assert one.stage1.learning_rate == 5e-5


@pytest.mark.slow  # 35 s; the rows' configs are checked in CI above; python -m pytest -m slow
def test_ablation_runs_rows_and_writes_the_table(local_ray, runs_dir, tmp_path):
    results = run_ablation(
        "smoke", tmp_path, "tiny", [f"run.storage_path={runs_dir}/ablate", "data.max_length=32"], rows=[4, 5]
    )
    assert [r["row"] for r in results] == ["+ dropout 0.1", "+ threshold optimisation"]
    # Rows 4 and 5 share one training run; thresholds (fitted on train) change the numbers.
    assert len(list((tmp_path / "bundles").iterdir())) == 1
    assert results[1]["macro_f1"] != results[0]["macro_f1"]
    # One run: one held-out number (thresholds refitted on validation halves), whichever column is read.
    assert results[0]["heldout_macro_f1"] == results[1]["heldout_macro_f1"] is not None
    assert results[0]["head_kept"] == "stage2"  # the seed's rows keep stage 2's head
    table = (tmp_path / "ablation.md").read_text()
    assert "| + threshold optimisation |" in table and "0.380" in table
    assert json.loads((tmp_path / "ablation.json").read_text()) == results
