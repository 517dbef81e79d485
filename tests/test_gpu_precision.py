"""What runs at which precision on which device, decided from a ``precision.Device`` by pure
functions, so the GPU cases run on a CPU machine: an A100/H100 trains in bf16 with TF32 matmuls, a
T4/V100 in fp16 with a gradient scaler and never bf16; ``--precision auto`` on a GPU takes bf16
only from a check made on that kind of GPU, reads the validation data only when no such check is
recorded, and waits for a GPU at most GPU_CHECK_TIMEOUT_S (a real unschedulable Ray task here);
thresholds are fitted on fp32 outputs and the bundle says so (older bundles load as "unknown");
the training loop reads its loss once per epoch, and a step the fp16 scaler skips moves neither
the schedule nor the weight average; the manifest tells fp32 from fp32 with TF32 matmuls."""

from __future__ import annotations

import json
import logging
import shutil
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from saved_bundles import bundle_fields

from emotions import precision as gate
from emotions.batching import tokenize
from emotions.bundle import bundle_files, load_bundle, save_bundle
from emotions.bundle_manifest import write_manifest
from emotions.config import build_config
from emotions.inference import to_device
from emotions.model import EmotionClassifier, build_head, load_encoder, load_tokenizer
from emotions.precision import Device, GpuCheckTimeout, PrecisionError, choose_gpu_runtime, gpu_device
from emotions.tagging import TaggingError, predictor
from emotions.training import (
    Shards,
    build_optimizer,
    build_scheduler,
    feature_inputs,
    loss_function,
    stage_inputs,
    step_autocast,
    step_scaler,
    train_epoch,
    train_precision,
)
from emotions.training.scoring import predict_probs, threshold_probs
from emotions.training.shards import inference_precision

VERSIONS = "torch 2.5.1, cuda 12.4"
A100 = gpu_device("NVIDIA A100-SXM4-80GB", (8, 0), VERSIONS)
H100 = gpu_device("NVIDIA H100 80GB HBM3", (9, 0), VERSIONS)
T4 = gpu_device("Tesla T4", (7, 5), VERSIONS)
V100 = gpu_device("Tesla V100-SXM2-16GB", (7, 0), VERSIONS)
CPU = Device("cpu", "x86_64 avx2", versions="torch 2.5.1")
FIT = {"backend": "torch", "numeric_precision": "fp32", "matmuls": "ieee", "device": "cpu"}


def made_check(name: str, device: Device, allowed: bool = True, speedup: float = 2.0) -> dict:
    """A check as ``check_runtimes`` records it, made on ``device``."""
    return {
        "precision": name,
        "allowed": allowed,
        "speedup": speedup,
        "seconds": 1.0,
        "fp32_s": speedup,
        "kernels": gate.kernels(name, device),
        "max_loss": gate.MAX_F1_LOSS,
        "max_share_change": gate.MAX_SHARE_CHANGE,
        "verdict": f"{name} on {device}: {'allowed' if allowed else 'refused'}",
    }


def tiny_tokens(n: int = 16):
    return tokenize(
        ["so happy for you", "this is awful", "ok", "thanks a lot"] * (n // 4),
        np.eye(28, dtype=np.float32)[[0, 1, 27, 15] * (n // 4)],
        load_tokenizer("tiny-random"),
        32,
    )


@pytest.mark.parametrize("gpu", [A100, H100], ids=lambda d: d.name)
def test_ampere_and_later_train_in_bf16_with_tf32_matmuls(gpu):
    assert gpu.bf16 and gpu.tf32
    assert gate.autocast_dtype(gpu, wanted=True) == torch.bfloat16 and not gate.needs_grad_scaler(torch.bfloat16)
    assert gate.autocast_dtype(gpu, wanted=False) is None
    assert train_precision(build_config("smoke"), gpu) == "bf16"  # scaling.bf16 is on by default
    assert train_precision(build_config("smoke", overrides=["scaling.bf16=false"]), gpu) == "fp32"
    assert inference_precision("bf16", gpu) == "bf16"
    assert gate.uses_tf32(gpu) and gate.runtime_label("fp32", gpu) == "fp32 (tf32 matmuls)"
    assert gate.runtime_label("bf16", gpu) == "bf16"
    assert gate.gpu_candidates(gpu) == ["bf16"]


@pytest.mark.parametrize("gpu", [T4, V100], ids=lambda d: d.name)
def test_gpus_without_native_bf16_train_in_fp16_with_a_grad_scaler_and_never_tag_in_bf16(gpu):
    assert not gpu.bf16 and not gpu.tf32  # capability < 8.0, whatever is_bf16_supported() would say
    dtype = gate.autocast_dtype(gpu, wanted=True)
    assert dtype == torch.float16 and gate.needs_grad_scaler(dtype)
    steps = train_precision(build_config("smoke"), gpu)
    assert steps == "fp16" and inference_precision(steps, gpu) == "fp32"  # no fp16 inference runtime
    assert train_precision(build_config("smoke", overrides=["scaling.bf16=false"]), gpu) == "fp32"
    assert not gate.uses_tf32(gpu) and gate.runtime_label("fp32", gpu) == "fp32"
    assert gate.gpu_candidates(gpu) == []
    # Even a check "made" on this GPU that allowed bf16 does not make auto pick emulated bf16 ...
    assert choose_gpu_runtime("auto", gpu, {"bf16": made_check("bf16", gpu)}) == "fp32"
    # ... and asking for it by name is refused with what to do.
    with pytest.raises(PrecisionError, match=r"no native bfloat16 .* tag in fp32"):
        choose_gpu_runtime("bf16", gpu, {})


def test_cpu_decisions_are_unchanged(monkeypatch):
    from emotions import environment

    assert gate.autocast_dtype(CPU, wanted=True) == torch.bfloat16  # whether to is scaling.cpu_bf16's call
    assert not gate.uses_tf32(CPU) and gate.gpu_candidates(CPU) == [] and gate.runtime_label("fp32", CPU) == "fp32"
    assert gate.kernels("int8", CPU) == gate.kernels("int8")  # CPU checks match as before
    try:
        for native, expected in ((True, "bf16"), (False, "fp32")):
            monkeypatch.setattr(environment, "cpu_has_bf16", lambda native=native: native)
            gate.describe_device.cache_clear()  # the CPU's Device asks it (native_bf16) once per process
            cpu = gate.describe_device("cpu")
            assert cpu.bf16 == native
            assert train_precision(build_config("smoke", overrides=["scaling.cpu_bf16=auto"]), cpu) == expected
    finally:
        gate.describe_device.cache_clear()  # no Device of the patched CPU for later tests
    assert inference_precision("bf16", CPU) == "fp32"  # CPU: inference in float32
    shards = Shards(train=None, validation=None, pad_id=0, device=torch.device("cpu"), rank=0, world=1)
    assert step_scaler(shards) is None and not step_autocast(shards)._enabled
    before = torch.get_float32_matmul_precision()
    with gate.cuda_matmuls("cpu", tf32=True):  # never touches the CPU's (oneDNN's) setting
        assert torch.get_float32_matmul_precision() == before


def test_matmul_precision_on_a_gpu_is_scoped_to_the_pass():
    before = torch.get_float32_matmul_precision()
    with gate.cuda_matmuls("cuda", tf32=True):
        assert torch.get_float32_matmul_precision() == "high"  # TF32 on CUDA
        with gate.cuda_matmuls("cuda"):  # e.g. the passes thresholds are fitted on, inside a TF32 worker
            assert torch.get_float32_matmul_precision() == "highest"
        assert torch.get_float32_matmul_precision() == "high"
    assert torch.get_float32_matmul_precision() == before


def test_fp16_steps_with_a_grad_scaler_train_and_keep_float32_weights():
    """What a T4 runs (train_precision "fp16"), on CPU: the steps under autocast to float16, the loss
    scaled by the GradScaler, float32 weights that move."""
    config = build_config("smoke")
    tokens = tiny_tokens()
    cpu = torch.device("cpu")
    shards = Shards(train=tokens, validation=tokens, pad_id=0, device=cpu, rank=0, world=1, train_precision="fp16")
    model = EmotionClassifier(load_encoder("tiny-random"), build_head(32, 1, 0.1), "mean")
    before = model.encoder.encoder.layer[0].output.dense.weight.detach().clone()
    inputs = stage_inputs(config.stage1, model, shards, config)
    optimizer = build_optimizer(config.stage1, model.head, model.encoder)
    autocast, scaler = step_autocast(shards), step_scaler(shards)
    assert isinstance(scaler, torch.amp.GradScaler)
    with autocast:
        assert inputs.logits(model, np.arange(4)).dtype == torch.float16
    loss_fn = loss_function(config.stage1, tokens.labels.mean(0), cpu)
    scheduler = build_scheduler(optimizer, config.stage1, 2)
    losses = train_epoch(model, inputs, 0, loss_fn, optimizer, scheduler, autocast=autocast, scaler=scaler)
    assert losses.steps > 0 and np.isfinite(losses.mean())
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert not torch.equal(before, model.encoder.encoder.layer[0].output.dense.weight)


def test_the_step_loop_reads_its_loss_once_per_epoch_not_per_step(monkeypatch):
    """``loss.item()`` per step makes the host wait for the GPU every step: the loop sums the loss
    where it is computed and the epoch's report reads it once."""
    reads = []
    item = torch.Tensor.item

    def counted(self):
        caller = sys._getframe(1).f_code.co_filename
        if "emotions" in caller:  # torch's own reads (AdamW's step counts on CPU) are not the loop's
            reads.append(caller)
        return item(self)

    torch.manual_seed(0)
    features, labels = torch.randn(64, 8), (np.random.default_rng(0).random((64, 28)) < 0.2).astype(np.float32)
    head = build_head(8, 1, 0.0)
    inputs = feature_inputs(head, features, labels, 8)
    stage = build_config("smoke").stage2
    optimizer = build_optimizer(stage, head)
    monkeypatch.setattr(torch.Tensor, "item", counted)
    losses = train_epoch(
        head, inputs, 0, loss_function(stage, labels.mean(0)), optimizer, build_scheduler(optimizer, stage, 8)
    )
    assert losses.steps == 8 and reads == []  # 8 steps, no read
    mean = losses.mean()
    assert len(reads) == 1 and reads[0].endswith("losses.py")  # the one read, when reported
    monkeypatch.undo()
    assert 0 < mean < 10


def test_host_copies_to_a_gpu_are_pinned_and_non_blocking():
    from emotions.inference import transfer_options

    assert transfer_options(torch.device("cuda")) == (True, True)
    assert transfer_options("cuda:1") == (True, True)
    assert transfer_options("cpu") == (False, False)
    ids = torch.arange(6).reshape(2, 3)
    assert to_device(ids, torch.device("cpu")) is ids  # on CPU nothing is copied


def test_auto_on_a_gpu_takes_bf16_only_from_a_check_made_on_that_kind_of_gpu():
    assert choose_gpu_runtime("auto", A100, {"bf16": made_check("bf16", A100)}) == "bf16"
    assert choose_gpu_runtime("auto", A100, {"bf16": made_check("bf16", A100, allowed=False)}) == "fp32"
    assert choose_gpu_runtime("auto", A100, {"bf16": made_check("bf16", A100, speedup=0.9)}) == "fp32"
    assert choose_gpu_runtime("auto", A100, {}) == "fp32"
    # Made on another kind of GPU, on the CPU, or with other torch/CUDA versions: not this GPU's.
    other_versions = gpu_device(A100.name, A100.capability, "torch 2.4.0, cuda 11.8")
    for elsewhere in (H100, CPU, other_versions):
        assert choose_gpu_runtime("auto", A100, {"bf16": made_check("bf16", elsewhere)}) == "fp32", elsewhere
        with pytest.raises(PrecisionError, match="no check of bf16"):
            choose_gpu_runtime("bf16", A100, {"bf16": made_check("bf16", elsewhere)})
    assert choose_gpu_runtime("bf16", A100, {"bf16": made_check("bf16", A100)}) == "bf16"
    with pytest.raises(PrecisionError, match="refused"):  # asked for by name: refused, not downgraded
        choose_gpu_runtime("bf16", A100, {"bf16": made_check("bf16", A100, allowed=False)})
    assert choose_gpu_runtime("fp32", A100, {"bf16": made_check("bf16", A100)}) == "fp32"


def test_known_checks_on_a_gpu_use_only_that_gpu_kinds_record_or_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EMOTIONS_CACHE", str(tmp_path / "cache"))
    runs = []

    def check_runtimes(bundle, names, seed=0, device=None, validation=None):
        runs.append((tuple(names), device))
        return {n: made_check(n, device) for n in names}

    monkeypatch.setattr(gate, "check_runtimes", check_runtimes)
    bundle = SimpleNamespace(
        hash="0123456789abcdef",
        metrics={
            "precision_checks": {"bf16": made_check("bf16", CPU)},  # the driver CPU's: not a GPU's
            "gpu_precision_checks": {"bf16": made_check("bf16", H100)},  # another kind of GPU
        },
    )
    check = gate.known_checks(bundle, ["bf16"], A100)["bf16"]
    assert runs == [(("bf16",), A100)] and check["source"] == "checked now"  # on the A100, not the CPU
    assert (tmp_path / "cache" / "checks" / f"{bundle.hash}.cuda.json").exists()  # beside the CPU cache
    again = gate.known_checks(bundle, ["bf16"], A100)["bf16"]
    assert len(runs) == 1 and again["source"].startswith("checked earlier on this machine")
    assert gate.known_checks(bundle, ["bf16"], H100)["bf16"]["source"] == "the bundle's metrics.json"
    assert len(runs) == 1


def test_tagging_on_a_gpu_resolves_on_a_gpu_of_the_cluster(monkeypatch):
    from emotions import cluster

    monkeypatch.setattr(cluster, "connect", lambda address=None: None)
    monkeypatch.setattr(cluster, "resources", lambda: ({"CPU": 8.0, "GPU": 1.0}, None))
    asked = []

    def on(device: Device, checks: dict):
        def checks_on_gpu(bundle, wanted, reuse=True):
            asked.append(wanted)
            return device, checks

        monkeypatch.setattr(predictor, "checks_on_gpu", checks_on_gpu)

    on(A100, {"bf16": {**made_check("bf16", A100), "source": "the bundle's metrics.json"}})
    chosen, check, checks = predictor.resolve_precision(object(), "auto", gpu=True)
    assert (chosen, check["precision"], list(checks)) == ("bf16", "bf16", ["bf16"]) and asked == [["bf16"]]
    on(A100, {"bf16": made_check("bf16", H100)})  # recorded for another GPU kind: fp32
    assert predictor.resolve_precision(object(), "auto", gpu=True)[0] == "fp32"
    on(T4, {})
    assert predictor.resolve_precision(object(), "auto", gpu=True)[:2] == ("fp32", None)
    with pytest.raises(TaggingError, match="no native bfloat16"):
        predictor.resolve_precision(object(), "bf16", gpu=True)
    assert predictor.resolve_precision(object(), "fp32", gpu=True) == ("fp32", None, {})
    monkeypatch.setattr(cluster, "resources", lambda: ({"CPU": 8.0}, None))  # no GPU to check on
    assert predictor.resolve_precision(object(), "auto", gpu=True) == ("fp32", None, {})
    with pytest.raises(TaggingError, match="no GPU"):
        predictor.resolve_precision(object(), "bf16", gpu=True)


def test_the_bundle_records_the_precision_its_thresholds_were_fitted_at(smoke_bundle):
    meta = json.loads((smoke_bundle / "bundle.json").read_text())
    assert meta["thresholds_precision"] == FIT  # trained on CPU workers: fp32, IEEE matmuls, cpu
    bundle = load_bundle(smoke_bundle)
    assert bundle.thresholds_precision == FIT
    for check in bundle.metrics["precision_checks"].values():  # the gate's reference is that precision
        assert check["reference"] == FIT and check["thresholds_precision"] == FIT
    assert "gpu_precision_checks" not in bundle.metrics  # no GPU in this run


def test_a_bundle_made_before_the_record_loads_as_unknown(smoke_bundle, tmp_path, caplog):
    old = shutil.copytree(smoke_bundle, tmp_path / "old")
    meta = json.loads((old / "bundle.json").read_text())
    del meta["thresholds_precision"]
    (old / "bundle.json").write_text(json.dumps(meta))
    (old / "manifest.json").unlink()
    write_manifest(old)
    with caplog.at_level(logging.INFO, logger="emotions.bundle"):
        bundle = load_bundle(old)
    assert bundle.thresholds_precision is None
    assert "does not record the precision its thresholds were fitted at" in caplog.text and "unknown" in caplog.text
    texts = ["so happy for you", "this is awful"]
    np.testing.assert_array_equal(bundle.predict_proba(texts), load_bundle(smoke_bundle).predict_proba(texts))


def test_thresholds_are_fitted_on_fp32_outputs_when_the_passes_ran_in_bf16():
    """A GPU run's validation passes autocast to bf16 (here on CPU, which autocasts too): the
    probabilities thresholds are fitted on are fp32's all the same."""
    tokens = tiny_tokens(8)
    torch.manual_seed(0)
    model = EmotionClassifier(load_encoder("tiny-random"), build_head(32, 1, 0.0), "mean")
    shards = Shards(train=tokens, validation=tokens, pad_id=0, device=torch.device("cpu"), rank=0, world=1)
    fp32 = predict_probs(model, tokens, shards)
    bf16_shards = Shards(**{**shards.__dict__, "precision": "bf16"})
    assert not np.array_equal(predict_probs(model, tokens, bf16_shards), fp32)  # the passes' bf16 outputs
    np.testing.assert_array_equal(threshold_probs(model, tokens, bf16_shards), fp32)


def test_a_gpu_run_records_a_bf16_check_made_on_its_gpu(smoke_bundle, tmp_path, monkeypatch):
    fields = bundle_fields(smoke_bundle)
    cpu_runs = []

    def check_runtimes(bundle, names, seed=0, device=None, validation=None):
        cpu_runs.append(device)
        return {n: made_check(n, CPU) for n in names}

    def checks_on_gpu(bundle, wanted, reuse=True, validation=None):
        assert wanted == ["bf16"] and not reuse  # a new bundle: checked, not looked up
        cpu_runs.append("gpu")
        return A100, {"bf16": made_check("bf16", A100)}

    monkeypatch.setattr(gate, "check_runtimes", check_runtimes)
    monkeypatch.setattr(gate, "checks_on_gpu", checks_on_gpu)
    path = gate.save_checked_bundle(tmp_path / "gpu-run", ["int8"], gpu=True, **fields)
    metrics = load_bundle(path).metrics
    # The GPU check first, while the run's GPU node is up; then the CPU gate on this machine, as before.
    assert cpu_runs == ["gpu", None]
    assert metrics["gpu_precision_checks"]["bf16"]["kernels"] == gate.kernels("bf16", A100)
    assert list(metrics["precision_checks"]) == ["int8"]
    assert load_bundle(path).thresholds_precision == FIT


def test_the_gpu_tasks_body_loads_the_bundles_files_and_reads_its_record(smoke_bundle, tmp_path, monkeypatch):
    """What ``checks_on_gpu``'s Ray task does with the files it is sent, run here on CPU."""
    monkeypatch.setenv("EMOTIONS_CACHE", str(tmp_path / "cache"))
    bundle = load_bundle(smoke_bundle)
    validation = gate.validation_set(bundle)
    device, checks = gate._checks_on_gpu(bundle_files(smoke_bundle), bundle.hash, ["int8"], validation, True, "cpu")
    assert device.kind == "cpu" and checks["int8"]["source"] == "the bundle's metrics.json"


def test_save_bundle_without_a_record_writes_unknown(smoke_bundle, tmp_path):
    fields = {**bundle_fields(smoke_bundle), "thresholds_precision": None}
    path = save_bundle(tmp_path / "unknown", **fields)
    assert json.loads((path / "bundle.json").read_text())["thresholds_precision"] is None
    assert load_bundle(path).thresholds_precision is None


def test_the_head_sweep_fits_thresholds_on_fp32_features(monkeypatch):
    from emotions import head_sweep

    assert [head_sweep.feature_precision(d) for d in (A100, T4, CPU)] == ["bf16", "fp32", "fp32"]
    config = build_config("smoke")  # thresholds.split: validation
    features = {"train_x": np.zeros((4, 8)), "validation_x": np.zeros((2, 8))}
    kept = head_sweep.threshold_features(None, config, features, {"precision": "fp32", "device_kind": "cuda"})
    assert kept["validation_x"] is features["validation_x"] and kept["precision"] == {**FIT, "device": "cuda"}
    encoded, calls = np.ones((2, 8)), []

    def encode_on_ray(source, texts, purpose="sweep"):
        calls.append((sorted(texts), purpose))
        return {"validation": encoded}, {"device_kind": "cuda", "precision": "fp32"}

    monkeypatch.setattr(head_sweep, "encode_on_ray", encode_on_ray)
    monkeypatch.setattr(
        head_sweep, "load_training_data", lambda c: (SimpleNamespace(texts=["a"] * 4), SimpleNamespace(texts=["b"] * 2))
    )
    # bf16 features (a GPU with native bf16), and a cache made on a GPU before the precision was recorded
    for origin in ({"precision": "bf16", "device_kind": "cuda"}, {"device": "cuda (NVIDIA A100-SXM4-80GB)"}):
        again = head_sweep.threshold_features(None, config, features, origin)
        assert calls[-1] == (["validation"], "thresholds") and again["validation_x"] is encoded
        assert again["precision"] == {**FIT, "device": "cuda"} and again["train_x"] is features["train_x"]


def no_gpu_bundle(tmp_path) -> SimpleNamespace:
    """What ``checks_on_gpu`` reads of a bundle whose validation data cannot be read here."""
    data = {"validation": str(tmp_path / "missing.jsonl"), "text_column": "text", "labels_column": "labels"}
    data |= {"label_format": "ids", "max_validation_examples": 0}
    return SimpleNamespace(hash="feedc0ffee123456", metrics={}, config={"data": data, "seed": 0}, path=tmp_path)


def test_a_gpu_check_no_gpu_can_run_times_out_and_is_cancelled(local_ray, tmp_path, caplog):
    """The local Ray has no GPU: a task asking for one is never scheduled. The wait ends at its
    timeout with GpuCheckTimeout (a PrecisionError, not Ray's GetTimeoutError), logged before and after."""
    start = time.monotonic()
    with caplog.at_level(logging.INFO, logger="emotions.precision"):
        with pytest.raises(GpuCheckTimeout, match=r"no GPU of the Ray cluster .* within 1s .* cancelled"):
            gate.checks_on_gpu(no_gpu_bundle(tmp_path), ["bf16"], timeout_s=1)
    assert time.monotonic() - start < 30
    assert "waiting up to 1s for a GPU" in caplog.text
    assert gate.GPU_CHECK_TIMEOUT_S == 600  # the default wait


def test_a_gpu_tasks_worker_exits_after_it(local_ray):
    """A reused GPU worker keeps its CUDA context and cached memory from the Tagger actors that
    follow a check, and stays bound to its first GPU. Ray makes the worker single-use only for
    num_gpus given to ray.remote itself (it drops max_calls from anything given to .options)."""

    def check():
        return "done"

    assert {k: gate.gpu_task(check)._default_options[k] for k in ("num_gpus", "max_calls")} == {
        "num_gpus": 1,
        "max_calls": 1,
    }


def test_tagging_does_not_wait_forever_for_a_gpu_to_check_on(local_ray, tmp_path, monkeypatch, caplog):
    """The cluster may scale to a GPU (the autoscaler's largest), none comes: auto tags in fp32 with
    a warning, --precision bf16 stops with what to do; each within the timeout, not hanging."""
    from emotions import cluster

    monkeypatch.setattr(cluster, "resources", lambda: ({"CPU": 2.0}, {"CPU": 10.0, "GPU": 1.0}))
    monkeypatch.setattr(gate, "GPU_CHECK_TIMEOUT_S", 1)
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="emotions.tagging"):
        assert predictor.resolve_precision(no_gpu_bundle(tmp_path), "auto", gpu=True) == ("fp32", None, {})
    assert "tagging in fp32 (--precision auto): no GPU of the Ray cluster" in caplog.text
    with pytest.raises(TaggingError, match=r"--precision bf16: no GPU .* tag in fp32 \(--precision fp32\), or run"):
        predictor.resolve_precision(no_gpu_bundle(tmp_path), "bf16", gpu=True)
    assert time.monotonic() - start < 60


def test_a_training_run_keeps_its_bundle_when_no_gpu_runs_the_check(smoke_bundle, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(gate, "GPU_CHECK_TIMEOUT_S", 1)
    monkeypatch.setattr(gate, "check_runtimes", lambda bundle, names, *a, **k: {n: made_check(n, CPU) for n in names})
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="emotions.precision"):
        path = gate.save_checked_bundle(tmp_path / "gpu-run", ["int8"], gpu=True, **bundle_fields(smoke_bundle))
    assert time.monotonic() - start < 60
    metrics = load_bundle(path).metrics
    assert "gpu_precision_checks" not in metrics and list(metrics["precision_checks"]) == ["int8"]
    assert "no GPU precision check recorded in the bundle: no GPU of the Ray cluster" in caplog.text


def test_a_recorded_gpu_check_is_used_when_the_driver_cannot_read_the_validation_data(tmp_path, monkeypatch):
    """A bundle trained on a local data.validation path, tagged from a driver that cannot read it:
    its recorded check for this kind of GPU decides, and the validation rows are never read."""
    from emotions import cluster

    monkeypatch.setenv("EMOTIONS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(cluster, "connect", lambda address=None: None)
    monkeypatch.setattr(cluster, "resources", lambda: ({"CPU": 8.0, "GPU": 1.0}, None))
    tasks = []

    def run_on_gpu(function, args, timeout_s=None, what="check"):  # the task, run here on an "A100"
        tasks.append(function.__name__)
        return function(*args)

    monkeypatch.setattr(gate, "run_on_gpu", run_on_gpu)
    monkeypatch.setattr(gate, "describe_device", lambda where="cpu": A100 if where == "cuda" else CPU)
    bundle = no_gpu_bundle(tmp_path)
    bundle.metrics = {"gpu_precision_checks": {"bf16": made_check("bf16", A100)}}
    resolved = predictor.resolve_runtime(bundle, "auto", gpu=True)
    assert (resolved.precision, resolved.check["source"], resolved.device) == (
        "bf16",
        "the bundle's metrics.json",
        A100,
    )
    assert predictor.resolve_precision(bundle, "bf16", gpu=True)[0] == "bf16"
    assert tasks == ["_stored_on_gpu", "_stored_on_gpu"]  # one look-up each; no check run, no data read
    # Recorded for another kind of GPU: the check must run, and its data cannot be read here.
    bundle.metrics = {"gpu_precision_checks": {"bf16": made_check("bf16", H100)}}
    assert predictor.resolve_precision(bundle, "auto", gpu=True) == ("fp32", None, {})
    with pytest.raises(TaggingError, match="cannot be read here"):
        predictor.resolve_precision(bundle, "bf16", gpu=True)


def test_the_manifest_tells_fp32_with_tf32_matmuls_from_ieee_fp32(monkeypatch):
    assert predictor.runtime_record("fp32", True, A100) == {
        "runtime": "fp32 (tf32 matmuls)",
        "gpu": "NVIDIA A100-SXM4-80GB (compute 8.0)",
    }
    assert predictor.runtime_record("fp32", True, T4) == {"runtime": "fp32", "gpu": "Tesla T4 (compute 7.5)"}
    assert predictor.runtime_record("bf16", True, H100)["runtime"] == "bf16"
    assert predictor.runtime_record("onnx-int8", False, None) == {"runtime": "onnx-int8", "gpu": None}
    unchecked = predictor.runtime_record("fp32", True, None)  # --precision fp32 on GPUs: no GPU task ran
    assert unchecked["gpu"] is None and "tf32 matmuls on GPUs of compute 8.0+" in unchecked["runtime"]
    # The driver knows the GPU from its check, also when auto falls back to fp32 there.
    from emotions import cluster

    monkeypatch.setattr(cluster, "connect", lambda address=None: None)
    monkeypatch.setattr(cluster, "resources", lambda: ({"CPU": 8.0, "GPU": 1.0}, None))
    for device, checks in ((A100, {"bf16": made_check("bf16", A100, allowed=False)}), (T4, {})):
        monkeypatch.setattr(predictor, "checks_on_gpu", lambda bundle, wanted, d=device, c=checks: (d, c))
        resolved = predictor.resolve_runtime(object(), "auto", gpu=True)
        assert (resolved.precision, resolved.device) == ("fp32", device)
    assert (
        predictor.runtime_record("fp32", True, A100)["runtime"] != predictor.runtime_record("fp32", True, T4)["runtime"]
    )


def test_a_step_the_fp16_scaler_skips_moves_neither_the_schedule_nor_the_weight_average():
    """An overflowing loss scale (2**28: float16 gradients turn inf) skips the first steps, as a
    T4's first steps at 2**16 can; the LR schedule and the weight average count only steps taken."""
    from emotions.training.optim import WeightAverage

    torch.manual_seed(0)
    features, labels = torch.randn(64, 8), (np.random.default_rng(0).random((64, 28)) < 0.2).astype(np.float32)
    head = build_head(8, 1, 0.0)
    inputs = feature_inputs(head, features, labels, 4)  # 16 batches
    stage = build_config("smoke").stage2
    optimizer = build_optimizer(stage, head)
    scheduler = build_scheduler(optimizer, stage, 16)
    average = WeightAverage(head, 0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**28)
    autocast = torch.autocast("cpu", dtype=torch.float16)
    losses = train_epoch(
        head, inputs, 0, loss_function(stage, labels.mean(0)), optimizer, scheduler, average, autocast, None, scaler
    )
    taken = int(optimizer.state[head[-1].weight]["step"])
    assert losses.steps == 16 and 0 < taken < 16  # some skipped, then the scale came down
    assert scaler.get_scale() < 2.0**28
    assert scheduler.last_epoch == taken and average.steps == taken
