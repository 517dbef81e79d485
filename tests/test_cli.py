"""The `emotions` command, run end to end in a subprocess like a user would."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def emotions(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "emotions.cli", *args], capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


def test_bad_labelled_file_fails_before_ray_starts(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("text,labels\nI love it,joy\nwhat a day,happyness\n")
    result = emotions("train", "--preset", "smoke", "--output", str(tmp_path / "out"), f"data.train={bad}")
    assert result.returncode == 2
    assert "bad.csv" in result.stderr and "line 3" in result.stderr and "happyness" in result.stderr
    assert "Started a local Ray instance" not in result.stderr  # refused before cluster time
    assert not (tmp_path / "out").exists()


def test_train_refuses_an_output_folder_of_other_files_before_anything_is_deleted(tmp_path):
    output = tmp_path / "work"
    output.mkdir()
    (output / "notes.md").write_text("mine\n")
    run = tmp_path / "runs" / "again"  # --fresh would delete this run's checkpoints: not before the check
    run.mkdir(parents=True)
    (run / "state.json").write_text("{}")
    result = emotions("train", "--preset", "smoke", "--output", str(output), "--fresh",
                      f"run.storage_path={tmp_path / 'runs'}", "run.name=again")  # fmt: skip
    assert result.returncode == 2
    assert f"bundle output {output} already holds files and is not a model bundle" in result.stderr
    assert "Choose a new or empty folder" in result.stderr
    assert "Started a local Ray instance" not in result.stderr
    assert (output / "notes.md").read_text() == "mine\n" and (run / "state.json").exists()


def test_unknown_config_key_is_refused_by_name(tmp_path):
    result = emotions("train", "--preset", "smoke", "--output", str(tmp_path / "out"), "stage1.epoks=2")
    assert result.returncode == 2
    assert "stage1.epoks: unknown key" in result.stderr


def test_evaluate_writes_report(smoke_bundle, tmp_path):
    data = tmp_path / "few.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in [
        {"text": "Thank you so much!", "labels": ["gratitude"]},
        {"text": "This is terrible.", "labels": ["disgust", "anger"]},
        {"text": "ok then", "labels": ["neutral"]},
    ]))  # fmt: skip
    result = emotions("evaluate", "--model", str(smoke_bundle), "--data", str(data), "--report", str(tmp_path / "r"))
    assert result.returncode == 0, result.stderr
    # Data the bundle's thresholds never saw: its row is the true test, and says so. (Three rows
    # with three different labels cannot be halved with positives on both sides: no held-out row.)
    assert "bundle's thresholds, unseen data" in result.stdout and "held-out" not in result.stdout
    report = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert report["n_examples"] == 3 and set(report) >= {"at_0.5", "at_thresholds"}
    assert (tmp_path / "r" / "report.md").exists()
    assert (tmp_path / "r" / "per_label_f1.png").read_bytes()[:4] == b"\x89PNG"


def test_evaluate_refuses_incomplete_bundle(smoke_bundle, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(smoke_bundle, broken)
    (broken / "model.safetensors").unlink()
    result = emotions("evaluate", "--model", str(broken))
    assert result.returncode == 2
    assert "missing ['model.safetensors']" in result.stderr


def test_bundle_with_other_labels_is_refused(smoke_bundle, tmp_path):
    import shutil

    from emotions.bundle import load_bundle

    other = tmp_path / "other"
    shutil.copytree(smoke_bundle, other)
    meta = json.loads((other / "bundle.json").read_text())
    meta["labels"] = meta["labels"][:-1] + ["calm"]
    (other / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="calm"):
        load_bundle(other, verify=False)
    with pytest.raises(ValueError, match="altered"):
        load_bundle(other)


def test_train_job_entry_point_accepts_the_cli_flags():
    result = subprocess.run([sys.executable, "jobs/train.py", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    for flag in ("--preset", "--config", "--output", "KEY=VALUE"):
        assert flag in result.stdout
