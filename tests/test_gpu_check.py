"""benchmarks/gpu_check.py keeps working on machines without a GPU (CI): its skip path (one line,
exit 0, a record that says so), its FLOP count, and its tagging (bf16 allowed and refused by the
precision gate) and quality parts on the smoke bundle (bf16 autocast runs on CPU too)."""

from __future__ import annotations

import importlib.util
import json
import re
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


NO_GPU = (  # what the script prints, and records, on a machine without a CUDA GPU
    "no CUDA GPU here: the GPU parts (a)-(c) are skipped. Run this on a GPU machine, or pass --smoke to run every "
    "part on CPU at toy sizes"
)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the check would run for real")
def test_without_a_gpu_the_check_says_so_in_one_line_and_records_only_that(tmp_path):
    out = tmp_path / "out.json"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--output", str(out)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]  # a skip, not a failure: CI runs it
    first, last = result.stdout.splitlines()  # the reason, then where the record went
    assert first == NO_GPU and re.fullmatch(rf"\d+ s in all; results: {re.escape(str(out))}", last)
    assert "Started a local Ray" not in result.stderr  # nothing ran
    record = json.loads(out.read_text())
    assert record["skipped"] == NO_GPU and record["device"] == "cpu" and record["bf16_peak_flops"] is None
    assert record["smoke"] is False and "torch" in json.dumps(record["versions"]) and record["total_s"] >= 0
    assert not {"train_minilm", "bert_base", "precision"} & set(record), "no part ran"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the check would run for real")
def test_without_a_gpu_the_record_goes_to_the_cpu_file_by_default(gpu_check, tmp_path, monkeypatch):
    monkeypatch.delenv("OUT", raising=False)
    monkeypatch.setattr(gpu_check, "RESULTS", tmp_path)
    assert gpu_check.main([]) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["gpu_check_cpu.json"]  # never over a GPU run's gpu_check.json
    assert json.loads((tmp_path / "gpu_check_cpu.json").read_text())["skipped"] == NO_GPU


def test_on_the_device_machine_the_record_goes_to_out_with_the_parts_done_before_a_failure(
    gpu_check, tmp_path, monkeypatch
):
    """The device tool brings back only what is under $OUT; a part that fails must not take the
    numbers of the parts before it with it."""
    monkeypatch.setenv("OUT", str(tmp_path))

    def fails_in_part_c(args, record):
        record["train_minilm"] = {"samples_per_s": 1.0}
        raise RuntimeError("part (c) failed")

    monkeypatch.setattr(gpu_check, "run", fails_in_part_c)
    with pytest.raises(RuntimeError, match="part"):
        gpu_check.main([])
    record = json.loads((tmp_path / "gpu_check_cpu.json").read_text())
    assert record["train_minilm"] == {"samples_per_s": 1.0} and record["failed"] == "RuntimeError: part (c) failed"


def test_flops_per_token_of_bert_base(gpu_check):
    from transformers import BertConfig

    config = BertConfig().to_dict()  # 12 x 768: 85M weights outside the embeddings
    per_token = gpu_check.encoder_flops_per_token(config, tokens=20)
    assert 2 * 84.9e6 < per_token < 2 * 85.1e6 + 12 * 4 * 20 * 768 + 1
    assert gpu_check.bf16_peak("NVIDIA H100 80GB HBM3") == pytest.approx(989.4e12)
    assert gpu_check.bf16_peak("NVIDIA H100 PCIe") == pytest.approx(756.0e12)
    assert gpu_check.bf16_peak("some other card") is None
    # by pattern, not substring: an L40 or L40S is not an L4, an A10G not an A10
    peaks = {name: gpu_check.bf16_peak(name) for name in ("NVIDIA L4", "NVIDIA L40", "NVIDIA L40S", "NVIDIA A10G")}
    assert peaks == {"NVIDIA L4": 121.0e12, "NVIDIA L40": 181.05e12, "NVIDIA L40S": 362.1e12, "NVIDIA A10G": 70.0e12}
    assert gpu_check.bf16_peak("NVIDIA A10") == 125.0e12


def test_tagging_and_quality_parts_run_on_the_smoke_bundle(gpu_check, smoke_bundle, tmp_path, monkeypatch):
    from emotions import precision as gate
    from emotions.bundle import load_bundle
    from emotions.corpus import make_corpus
    from emotions.tagging.predictor import tokenize_texts

    make_corpus(tmp_path / "corpus", rows=200, files=2, seed=1)
    # bf16 must pass the precision gate; with its bound set, the verdict is known in advance.
    monkeypatch.setattr(gate, "MAX_F1_LOSS", -1.0)  # no interval rules out every loss: refused
    monkeypatch.setattr(gate, "MAX_SHARE_CHANGE", float("inf"))  # the F1 bound alone decides
    part = gpu_check.tag_part(str(smoke_bundle), tmp_path / "corpus", tmp_path / "refused", "bf16", 0.0)
    assert part.keys() == {"precision", "refused"} and part["precision"] == "bf16"  # a refusal is a result
    assert "is not ruled out: tag in fp32" in part["refused"] and not (tmp_path / "refused").exists()
    monkeypatch.setattr(gate, "MAX_F1_LOSS", 1.0)  # any change passes
    part = gpu_check.tag_part(str(smoke_bundle), tmp_path / "corpus", tmp_path / "tagged", "bf16", 0.0)
    assert part["rows"] == 200 and part["rows_per_s"] > 0 and part["seconds"] > 0
    assert part["precision_check"]["precision"] == "bf16" and part["precision_check"]["allowed"]
    quality = gpu_check.dev_quality(str(smoke_bundle), "cpu", examples=600)
    assert quality["examples"] == 600 and np.isfinite(quality["change"])
    low, high = quality["interval_95"]
    assert low <= quality["change"] <= high
    assert quality["bf16_allowed"] and "bf16 vs fp32" in quality["bf16_verdict"]  # the gate itself ran (bound 1.0)
    assert not quality["tf32_on_this_device"] and quality["tf32_change"] == 0.0  # no TF32 on CPU: same numerics
    # the encoder pass alone, timed apart from the command's start-up; no MFU without a peak
    texts = ["so happy for you", "this is awful", "thanks!"] * 20
    bundle = load_bundle(smoke_bundle)
    tokens = tokenize_texts(texts, bundle.tokenizer, bundle.max_length)
    encoder = gpu_check.encoder_pass(str(smoke_bundle), tokens, "cpu", flops_per_row=1e6, peak=None)
    assert encoder["rows"] == 60 and {encoder[p]["matmuls"] for p in ("bf16", "fp32")} == {"bf16", "fp32"}
    assert all(encoder[p]["rows_per_s"] > 0 and encoder[p]["mfu"] is None for p in ("bf16", "fp32"))
    encoder = gpu_check.encoder_pass(str(smoke_bundle), tokens, "cpu", flops_per_row=1e6, peak=1e12)
    assert encoder["bf16"]["mfu"] == pytest.approx(encoder["bf16"]["rows_per_s"] * 1e6 / 1e12)
    assert encoder["fp32"]["mfu"] is None  # IEEE fp32 is not held against a tensor-core peak
