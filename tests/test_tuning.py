"""A real Ray Tune sweep (ASHA, driver-function trials running Ray Train) on the tiny model."""

from __future__ import annotations

import json
import time

import pandas as pd
import pytest

from emotions.bundle import load_bundle
from emotions.config import ConfigError
from emotions.tuning import build_sweep_config, run_sweep, split_tune_settings


HANG = ("known problem: on this 2-CPU machine the 3rd and 4th trials of the smoke sweep wait forever "
        "for a CPU after ASHA/earlier trials finish (Train worker-group startup timeouts); the sweep "
        "is not yet reliable, see the tune issue")


@pytest.fixture(scope="module")
def smoke_sweep(local_ray, runs_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    raw = build_sweep_config("smoke", overrides=[f"run.storage_path={runs_dir}/tune"])
    return out, raw, run_sweep(raw, out)


@pytest.mark.skip(reason=HANG)
def test_sweep_writes_table_plot_and_a_loadable_best_bundle(smoke_sweep):
    out, _, summary = smoke_sweep
    table = pd.read_csv(out / "results.csv")
    assert len(table) == 4 and summary["trials"] == 4
    assert {"stage1.learning_rate", "stage2.dropout", "stage2.head_depth"} <= set(table.columns)
    assert table["stage1.learning_rate"].nunique() == 4  # sampled, not fixed
    assert "| trial" in (out / "results.md").read_text()
    assert (out / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    best = json.loads((out / "best_config.json").read_text())
    assert best["config"]["stage1"]["learning_rate"] == best["params"]["stage1.learning_rate"]
    bundle = load_bundle(out / "best_bundle")
    assert bundle.predict(["thanks a lot!"]) is not None
    assert bundle.config["stage2"]["head_depth"] == best["params"]["stage2.head_depth"]
    finished = table[~table["stopped_early"]]
    assert summary["best_metric"] == pytest.approx(finished["final_val_macro_f1_tuned"].max())


@pytest.mark.skip(reason=HANG)
def test_resumed_sweep_does_not_redo_finished_trials(smoke_sweep):
    out, raw, _ = smoke_sweep
    results = sorted((out / "sweep" / "sweep").glob("*/result.json"))
    before = {p: p.read_text() for p in results}
    start = time.time()
    summary = run_sweep(raw, out)
    assert summary["trials"] == 4
    assert {p: p.read_text() for p in results} == before  # no trial reported again
    assert time.time() - start < 60


def test_bad_search_space_is_refused_before_running():
    # Search keys hold dots, so a search space comes from a --config file (a dict here).
    raw = build_sweep_config("smoke")
    raw["tune"]["search"]["stage1.learning_rate"] = {"gaussian": [1, 2]}
    with pytest.raises(ConfigError, match="unknown kind 'gaussian'"):
        split_tune_settings(raw)
