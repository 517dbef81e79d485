"""Outputs on object storage: an evaluation report written to s3:// (the moto server of the ``s3``
fixture), never to a local folder named ``s3:``. Sweeps and head sweeps on S3: tests/test_tuning.py
(the head sweep) and tests/test_multinode.py (both, from a cluster whose nodes share no disk)."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid

from emotions import storage


def s3_folder(s3: str, name: str) -> str:
    """A fresh prefix under the test bucket: s3://emo/<name>-<random>."""
    return f"{s3}/{name}-{uuid.uuid4().hex[:8]}"


def test_evaluate_writes_the_report_to_s3(smoke_bundle, s3, tmp_path):
    data = tmp_path / "few.jsonl"
    data.write_text(
        "\n".join(
            json.dumps(r)
            for r in [
                {"text": "Thank you so much!", "labels": ["gratitude"]},
                {"text": "This is terrible.", "labels": ["disgust", "anger"]},
            ]
        )
    )
    report = s3_folder(s3, "reports")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "emotions.cli",
            "evaluate",
            "--model",
            str(smoke_bundle),
            "--data",
            str(data),
            "--report",
            report,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "s3:").exists()  # the old code wrote ./s3:/emo/reports-.../
    folder = storage.Folder.from_uri(report)
    assert folder.read_json("metrics.json")["n_examples"] == 2
    assert folder.read_text("report.md").startswith("# Evaluation of ")
    assert folder.read_bytes("per_label_f1.png")[:4] == b"\x89PNG"
    assert f"report: {report}/report.md" in result.stdout
