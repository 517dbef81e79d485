"""Outputs on object storage: evaluation reports, sweeps and head sweeps written to s3:// (the moto
server of the ``s3`` fixture), never to a local folder named ``s3:``."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
import uuid

import pandas as pd
import pytest

from emotions import storage
from emotions.bundle import load_bundle


def s3_folder(s3: str, name: str) -> str:
    """A fresh prefix under the test bucket: s3://emo/<name>-<random>."""
    return f"{s3}/{name}-{uuid.uuid4().hex[:8]}"


def test_evaluate_writes_the_report_to_s3(smoke_bundle, s3, tmp_path):
    data = tmp_path / "few.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in [
        {"text": "Thank you so much!", "labels": ["gratitude"]},
        {"text": "This is terrible.", "labels": ["disgust", "anger"]},
    ]))  # fmt: skip
    report = s3_folder(s3, "reports")
    result = subprocess.run([sys.executable, "-m", "emotions.cli", "evaluate", "--model", str(smoke_bundle),
                             "--data", str(data), "--report", report],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "s3:").exists()  # the old code wrote ./s3:/emo/reports-.../
    folder = storage.Folder.from_uri(report)
    assert folder.read_json("metrics.json")["n_examples"] == 2
    assert folder.read_text("report.md").startswith("# Evaluation of ")
    assert folder.read_bytes("per_label_f1.png")[:4] == b"\x89PNG"
    assert f"report: {report}/report.md" in result.stdout


def test_sweep_on_s3_writes_results_and_bundle_there_and_resumes(local_ray, s3, tmp_path, monkeypatch):
    from emotions.tuning import build_sweep_config, run_sweep

    monkeypatch.chdir(tmp_path)
    root = s3_folder(s3, "sweep")
    raw = build_sweep_config("smoke", overrides=[f"run.storage_path={root}/runs", "tune.num_samples=2",
                                                 "stage1.epochs=1", "stage2.epochs=1"])  # fmt: skip
    summary = run_sweep(raw, f"{root}/out")
    out = storage.Folder.from_uri(f"{root}/out")
    table = pd.read_csv(io.BytesIO(out.read_bytes("results.csv")))
    assert len(table) == 2 and summary["trials"] == 2 and table["baseline"].sum() == 1
    assert "| trial" in out.read_text("results.md")
    assert out.read_bytes("sweep.png")[:4] == b"\x89PNG"
    best = out.read_json("best_config.json")
    assert best["params"]["stage2.head_depth"] == best["config"]["stage2"]["head_depth"]
    assert summary["bundle"] == f"{root}/out/best_bundle"
    bundle = load_bundle(summary["bundle"])  # downloaded from S3, manifest verified
    assert bundle.config["stage2"]["head_depth"] == best["params"]["stage2.head_depth"]
    assert bundle.predict(["thanks a lot!"]) is not None
    trials = [i for i in out.child("sweep", "sweep").list() if i.type.name == "Directory"]
    assert len(trials) == 2  # Tune's experiment itself lives on S3
    assert not (tmp_path / "s3:").exists()

    # The same command again restores the sweep from S3: no trial runs again.
    reports = {i.base_name: out.read_text("sweep", "sweep", i.base_name, "result.json") for i in trials}
    start = time.time()
    again = run_sweep(raw, f"{root}/out")
    assert again["trials"] == 2 and again["best_params"] == summary["best_params"]
    assert {t: out.read_text("sweep", "sweep", t, "result.json") for t in reports} == reports  # none reported again
    assert time.time() - start < 60
    assert not (tmp_path / "s3:").exists()


def test_head_sweep_on_s3_encodes_in_a_ray_task_and_reuses_the_cached_object(smoke_bundle, local_ray, s3,
                                                                            tmp_path, monkeypatch):  # fmt: skip
    import emotions.head_sweep as head_sweep

    monkeypatch.chdir(tmp_path)
    root = s3_folder(s3, "heads")
    source = load_bundle(smoke_bundle)
    overrides = [f"run.storage_path={root}/runs", "tune.num_samples=2", "stage2.epochs=2"]
    raw = head_sweep.build_head_sweep_config(source, "heads", overrides=overrides)
    first = head_sweep.run_head_sweep(source, raw, f"{root}/first")
    cache = first["features"]
    assert cache.startswith(f"{root}/runs/features/") and cache.endswith(".safetensors")
    fs, path, _ = storage.filesystem(cache)
    stored = fs.open_input_stream(path).read()
    meta = head_sweep.read_metadata(stored)
    assert meta["bundle"] == source.hash and meta["device"].startswith("cpu")
    # Computed by a Ray task, not in this driver process.
    driver = local_ray.get_runtime_context()
    assert meta["worker_id"] != driver.get_worker_id() and int(meta["pid"]) != os.getpid()
    assert meta["node_id"] == driver.get_node_id()  # the one local node
    info = storage.Folder.from_uri(f"{root}/first").read_json("best_config.json")["features"]
    assert info["file"] == cache and info["reused"] is False and info["worker_id"] == meta["worker_id"]
    best = load_bundle(first["bundle"])
    assert first["bundle"] == f"{root}/first/best_bundle" and best.metrics["head_sweep"]["from_bundle"] == source.hash

    # Another sweep over the same bundle and data reads the object: no encoder task, same bytes.
    second = head_sweep.run_head_sweep(source, raw, f"{root}/second")
    info = storage.Folder.from_uri(f"{root}/second").read_json("best_config.json")["features"]
    assert second["features"] == cache and info["reused"] is True and info["worker_id"] == meta["worker_id"]
    assert fs.open_input_stream(path).read() == stored
    assert not (tmp_path / "s3:").exists()
