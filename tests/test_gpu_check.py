"""benchmarks/gpu_check.py keeps working on machines without a GPU (CI): its skip path, its FLOP
count, and its tagging and quality parts on the smoke bundle (bf16 autocast runs on CPU too)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the check would run for real")
def test_without_a_gpu_the_check_says_so_and_writes_its_file(tmp_path):
    result = subprocess.run([sys.executable, str(SCRIPT), "--output", str(tmp_path / "out.json")],
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "no CUDA GPU here: the GPU parts (a)-(c) are skipped" in result.stdout
    record = json.loads((tmp_path / "out.json").read_text())
    assert record["device"] == "cpu" and "skipped" in record and "train_minilm" not in record


def test_flops_per_token_of_bert_base(gpu_check):
    from transformers import BertConfig

    config = BertConfig().to_dict()  # 12 x 768: 85M weights outside the embeddings
    per_token = gpu_check.encoder_flops_per_token(config, tokens=20)
    assert 2 * 84.9e6 < per_token < 2 * 85.1e6 + 12 * 4 * 20 * 768 + 1
    assert gpu_check.bf16_peak("NVIDIA H100 80GB HBM3") == pytest.approx(989.4e12)
    assert gpu_check.bf16_peak("NVIDIA H100 PCIe") == pytest.approx(756.0e12)
    assert gpu_check.bf16_peak("some other card") is None


def test_tagging_and_quality_parts_run_on_the_smoke_bundle(gpu_check, smoke_bundle, tmp_path):
    from emotions.corpus import make_corpus

    make_corpus(tmp_path / "corpus", rows=200, files=2, seed=1)
    part = gpu_check.tag_part(str(smoke_bundle), tmp_path / "corpus", tmp_path / "tagged", "bf16", 0.0)
    if "refused" not in part:  # the gate may refuse bf16 for the random smoke model: also a result
        assert part["rows"] == 200 and part["rows_per_s"] > 0
        assert part["precision_check"]["precision"] == "bf16"
    quality = gpu_check.dev_quality(str(smoke_bundle), "cpu", examples=600)
    assert quality["examples"] == 600 and np.isfinite(quality["change"])
    low, high = quality["interval_95"]
    assert low <= quality["change"] <= high
