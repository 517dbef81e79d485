"""A real Ray Tune sweep (ASHA, driver-function trials running Ray Train) on the tiny model."""

from __future__ import annotations

import io
import json
import time

import pandas as pd
import pytest

from emotions.bundle import load_bundle
from emotions.config import ConfigError, from_dict
from emotions.tuning import (
    TuneSettings,
    build_sweep_config,
    concurrency,
    run_sweep,
    split_tune_settings,
    trial_resources,
)


@pytest.fixture(scope="module")
def smoke_sweep(local_ray, runs_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    raw = build_sweep_config("smoke", overrides=[f"run.storage_path={runs_dir}/tune"])
    return out, raw, run_sweep(raw, out)


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
    assert summary["best_metric"] == pytest.approx(finished["final_val_macro_f1_heldout"].max())


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


def test_sweep_runs_no_more_trials_at_once_than_the_cpus_fit(smoke_sweep):
    out, _, _ = smoke_sweep
    spans = []
    for path in (out / "sweep" / "sweep").glob("*/result.json"):
        last = json.loads(path.read_text().splitlines()[-1])
        spans.append((last["timestamp"] - last["time_total_s"], last["timestamp"]))
    assert len(spans) == 4
    # 2 CPUs, 1-CPU Train workers: two trials at a time, so at most one other running when one starts.
    assert max(sum(s < t - 1 and e > t + 1 for s, e in spans) for t, _ in spans) <= 1  # others


def test_sweep_table_marks_the_baseline_trial(smoke_sweep):
    out, raw, summary = smoke_sweep
    table = pd.read_csv(out / "results.csv")
    baseline = table[table["baseline"]]
    assert len(baseline) == 1  # trial 0 ran the base config's own values
    assert baseline["stage1.learning_rate"].iloc[0] == pytest.approx(raw["stage1"]["learning_rate"])
    assert summary["baseline"] is not None and "best_minus_baseline" in summary["baseline"]


def test_concurrency_sizes_for_the_autoscalers_maximum_and_the_flag_wins():
    base, _ = split_tune_settings(build_sweep_config("smoke"))
    one_cpu = trial_resources(from_dict(base))  # 1 Ray Train worker x 1 CPU
    assert one_cpu == {"CPU": 1}
    # An autoscaling cluster at its start (2 CPUs up) that may grow to 16 CPUs: 16 trials, not 2.
    assert concurrency(one_cpu, TuneSettings(), {"CPU": 2.0}, {"CPU": 16, "GPU": 0}) == 16
    assert concurrency(one_cpu, TuneSettings(), {"CPU": 2.0}, None) == 2  # no autoscaler: what is there
    assert concurrency(one_cpu, TuneSettings(max_concurrent_trials=3), {"CPU": 2.0}, {"CPU": 16}) == 3
    gpu = {"GPU": 2}  # scaling.use_gpu with 2 workers
    assert concurrency(gpu, TuneSettings(), {"CPU": 8.0}, {"CPU": 64, "GPU": 8}) == 4
    assert concurrency(gpu, TuneSettings(), {"CPU": 8.0}, None) == 1  # none now: still one trial


def test_tune_flag_max_concurrent_trials_reaches_the_settings(monkeypatch, s3):  # check_output_folder reads S3
    import emotions.cli as cli
    from emotions.commands.tune import run_tune

    seen = {}
    monkeypatch.setattr("emotions.cluster.connect", lambda address: None)
    monkeypatch.setattr("emotions.tuning.run_sweep", lambda raw, output, resume: seen.update(raw=raw) or {})
    args = cli.build_parser().parse_args(
        [
            "tune",
            "--preset",
            "smoke",
            "--output",
            "s3://emo/x",
            "--max-concurrent-trials",
            "5",
            "tune.max_concurrent_trials=2",
        ]
    )
    assert run_tune(args) == 0
    assert split_tune_settings(seen["raw"])[1].max_concurrent_trials == 5  # the flag wins over the override
    args = cli.build_parser().parse_args(["tune", "--preset", "smoke", "--output", "x", "--max-concurrent-trials", "0"])
    with pytest.raises(ConfigError, match="--max-concurrent-trials"):
        run_tune(args)


def test_head_sweep_encodes_once_in_a_ray_task_and_exports_the_best_head(
    smoke_bundle, local_ray, s3, tmp_path, monkeypatch
):
    """All on S3: the feature cache, the sweep's outputs and the best bundle."""
    import os
    import uuid

    from safetensors.torch import load_file

    import emotions.head_sweep as head_sweep
    from emotions import storage

    monkeypatch.chdir(tmp_path)
    root = f"{s3}/heads-{uuid.uuid4().hex[:8]}"
    source = load_bundle(smoke_bundle)
    overrides = [f"run.storage_path={root}/runs", "tune.num_samples=4", "stage2.epochs=3", "tune.grace_period=1"]
    raw = head_sweep.build_head_sweep_config(source, "heads", overrides=overrides)
    first = head_sweep.run_head_sweep(source, raw, f"{root}/first")
    out = storage.Folder.from_uri(f"{root}/first")
    table = pd.read_csv(io.BytesIO(out.read_bytes("results.csv")))
    assert len(table) == 4 and table["baseline"].sum() == 1 and table["stage2.dropout"].nunique() > 1
    assert first["bundle"] == f"{root}/first/best_bundle"
    best = load_bundle(first["bundle"])  # downloaded from S3, manifest verified
    assert best.config["stage2"]["head_depth"] == first["best_params"]["stage2.head_depth"]
    assert best.metrics["head_sweep"]["from_bundle"] == source.hash
    weights = {n: load_file(str(b / "model.safetensors")) for n, b in (("source", source.path), ("best", best.path))}
    encoder = [k for k in weights["source"] if k.startswith("encoder.")]
    assert encoder and all((weights["source"][k] == weights["best"][k]).all() for k in encoder)  # untouched
    assert best.predict(["thanks a lot!"]) is not None
    # The features were computed once, by a Ray task (not this driver), and cached as one object.
    cache = first["features"]
    assert cache.startswith(f"{root}/runs/features/") and cache.endswith(".safetensors")
    fs, path, _ = storage.filesystem(cache)
    stored = fs.open_input_stream(path).read()
    meta = head_sweep.read_metadata(stored)
    driver = local_ray.get_runtime_context()
    assert meta["bundle"] == source.hash and meta["device"].startswith("cpu")
    assert meta["worker_id"] != driver.get_worker_id() and int(meta["pid"]) != os.getpid()
    info = out.read_json("best_config.json")["features"]
    assert info["file"] == cache and info["reused"] is False and info["worker_id"] == meta["worker_id"]
    # Another sweep over the same bundle and data reads the cached object: the encoder never runs.
    raw = head_sweep.build_head_sweep_config(
        source, "heads", overrides=[*overrides[:1], "tune.num_samples=2", "stage2.epochs=2"]
    )
    second = head_sweep.run_head_sweep(source, raw, f"{root}/second")
    assert second["features"] == cache and second["trials"] == 2
    info = storage.Folder.from_uri(f"{root}/second").read_json("best_config.json")["features"]
    assert info["reused"] is True and info["file"] == cache and info["worker_id"] == meta["worker_id"]
    assert fs.open_input_stream(path).read() == stored
    assert not (tmp_path / "s3:").exists()


def test_head_sweep_refuses_encoder_settings(smoke_bundle):
    import emotions.head_sweep as head_sweep

    source = load_bundle(smoke_bundle)
    raw = head_sweep.build_head_sweep_config(source, "heads")
    raw["tune"]["search"]["stage1.learning_rate"] = {"loguniform": [1e-5, 1e-4]}
    with pytest.raises(ConfigError, match="stage-2 settings only"):
        head_sweep.check_head_only(raw, source)
    with pytest.raises(ConfigError, match="keeps the bundle's encoder"):
        head_sweep.build_head_sweep_config(source, "heads", overrides=["model.pooling=cls"])


def test_sweep_trials_turn_auto_scaling_into_one_worker_of_one_cpu():
    from emotions.config import build_config
    from emotions.tuning import trial_resources, trial_scaling

    trial = trial_scaling(build_config("default"))  # auto: a whole node per worker, for a single run
    assert (trial.scaling.num_workers, trial.scaling.cpus_per_worker) == (1, 1)
    assert trial_resources(trial) == {"CPU": 1}
    assert trial_scaling(build_config("smoke")).scaling == build_config("smoke").scaling  # explicit: kept
