"""The two-stage fine-tune on a real local Ray cluster, with a tiny seeded BERT."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import threading
import time

import numpy as np
import pytest

from emotions.batching import bucket_batches, random_batches, tokenize
from emotions.bundle import load_bundle
from emotions.config import build_config
from emotions.data import load_labelled
from emotions.model import load_tokenizer
from emotions.training import train


def metrics_of(bundle_path) -> dict:
    return json.loads((bundle_path / "metrics.json").read_text())


def test_two_stages_run_and_report_their_epochs_under_their_names(smoke_bundle):
    history = metrics_of(smoke_bundle)["history"]
    assert [(h["stage"], h["epoch"]) for h in history] == [("stage1", 1), ("stage1", 2), ("stage2", 1), ("stage2", 2)]
    # (How much cheaper stage 2's epochs are is measured in benchmarks/, not asserted here.)
    seconds = metrics_of(smoke_bundle)["stage_seconds"]
    assert set(seconds) == {"stage1", "stage2"} and all(s > 0 for s in seconds.values())
    assert "stage1/val_macro_f1" in history[0] and "stage2/val_loss" in history[-1]
    assert "stage2/val_loss" not in history[0] and "stage1/val_loss" not in history[-1]
    # Stage 1 learns: validation loss falls from the untrained start.
    assert history[1]["val_loss"] < history[0]["val_loss"]


def test_two_workers_train_on_different_shards(smoke_bundle):
    shards = metrics_of(smoke_bundle)["shards"]
    assert [s["rank"] for s in shards] == [0, 1]
    # Rebuild the data the run used; each rank's digest must match its own rank::2 shard.
    config = build_config("smoke")
    data = load_labelled("goemotions:train").take(config.data.max_train_examples, config.seed)
    tokenized = tokenize(data.texts, data.labels, load_tokenizer("tiny-random"), 32)
    expected = []
    for rank in (0, 1):
        rows = np.unique(tokenized.shard(rank, 2).index)
        expected.append(rows)
        assert shards[rank]["digest"] == hashlib.sha256(rows.astype(np.int64).tobytes()).hexdigest()[:16]
    assert not set(expected[0]) & set(expected[1])
    assert len(expected[0]) + len(expected[1]) == len(data)


def test_the_bundle_keeps_the_head_that_wins_held_out(smoke_bundle):
    """Stage 1's head and stage 2's sit over the same encoder; the bundle keeps stage 2's only if
    its held-out macro-F1 is higher, and its metrics are that head's."""
    metrics = metrics_of(smoke_bundle)
    choice = metrics["head_choice"]
    scores = choice["heldout_macro_f1"]
    assert choice["rule"] == "heldout" and set(scores) == {"stage1", "stage2"}
    assert choice["kept"] == ("stage2" if scores["stage2"] > scores["stage1"] else "stage1")
    # The bundle's validation metrics are the kept head's: the same held-out protocol, the same number.
    assert metrics["heldout"]["macro_f1"] == pytest.approx(scores[choice["kept"]])
    head = json.loads((smoke_bundle / "bundle.json").read_text())["head"]
    assert head["depth"] == (2 if choice["kept"] == "stage2" else 1)  # smoke: stage 1 depth 1, stage 2 depth 2
    # The per-epoch history reports the held-out number, and the in-sample one under its own name.
    assert all(
        0 <= h["val_macro_f1_heldout"] <= 1 and 0 <= h["val_macro_f1_in_sample"] <= 1 for h in metrics["history"]
    )


def test_bundle_thresholds_are_fitted_on_the_final_checkpoints_predictions(smoke_bundle, runs_dir, tmp_path):
    """The driver fits each label's threshold on the gathered predictions in the final checkpoint:
    a label whose positives all score 0.3 and negatives 0.1 there gets a threshold between the two,
    so the bundle tags every positive that a 0.5 cut would miss."""
    import shutil

    from safetensors.numpy import load_file, save_file

    from emotions.evaluation import fit_thresholds
    from emotions.training import write_bundle_from_checkpoint

    states = {c: c / "state.json" for run in runs_dir.glob("bundle-*") for c in run.glob("checkpoint_*")}
    finals = [c for c, state in states.items() if state.exists() and json.loads(state.read_text())["head_choice"]]
    assert finals, "the smoke run left no final checkpoint"
    checkpoint = shutil.copytree(finals[0], tmp_path / "final")
    config = build_config("smoke", overrides=[f"run.storage_path={runs_dir}"])
    split = config.thresholds.split
    predictions = load_file(str(checkpoint / "predictions.safetensors"))
    labels, probs = predictions[f"{split}_labels"], predictions[f"{split}_probs"].copy()
    label = int(labels.sum(0).argmax())  # the label with the most positives
    probs[:, label] = np.where(labels[:, label] > 0, 0.3, 0.1)
    save_file({**predictions, f"{split}_probs": probs}, str(checkpoint / "predictions.safetensors"))

    bundle = load_bundle(write_bundle_from_checkpoint(checkpoint, config, tmp_path / "bundle"))
    assert 0.1 < bundle.thresholds[label] <= 0.3
    np.testing.assert_array_equal(bundle.thresholds, fit_thresholds(probs, labels, config.thresholds.rule()))
    tagged = probs[:, label] >= bundle.thresholds[label]
    np.testing.assert_array_equal(tagged, labels[:, label] > 0)  # every positive, no negative
    assert tagged.any() and not (probs[:, label] >= 0.5).any()  # a 0.5 cut tags none of them
    assert bundle.metrics["thresholds_fitted_on"] == split


def test_a_gpu_run_whose_gpus_are_gone_writes_its_bundle_without_starting_one(
    smoke_bundle, runs_dir, tmp_path, monkeypatch, caplog
):
    """A finished GPU run submitted again writes its bundle from the final checkpoint on a cluster
    whose GPU group is at 0: no Ray task asks for a GPU (it would start a GPU node for one check,
    or wait 10 minutes for one), and the bundle stands without a GPU check."""
    import shutil

    from emotions import precision
    from emotions.training import write_bundle_from_checkpoint

    def no_gpu_task(*args, **kwargs):
        raise AssertionError("a GPU task was submitted")

    monkeypatch.setattr(precision, "run_on_gpu", no_gpu_task)
    states = {c: c / "state.json" for run in runs_dir.glob("bundle-*") for c in run.glob("checkpoint_*")}
    final = next(c for c, state in states.items() if state.exists() and json.loads(state.read_text())["head_choice"])
    checkpoint = shutil.copytree(final, tmp_path / "final")
    config = build_config("smoke", overrides=[f"run.storage_path={runs_dir}", "scaling.use_gpu=true"])
    with caplog.at_level(logging.WARNING, logger="emotions.training"):
        bundle = load_bundle(write_bundle_from_checkpoint(checkpoint, config, tmp_path / "bundle"))
    assert "gpu_precision_checks" not in bundle.metrics and bundle.metrics["precision_checks"]
    assert "no GPU is up to check bf16 on" in caplog.text


def test_bundle_round_trip_gives_identical_predictions(smoke_bundle, tmp_path):
    from saved_bundles import bundle_fields

    from emotions.bundle import save_bundle

    first = load_bundle(smoke_bundle)
    texts = ["I love this so much!", "This is awful and I'm angry.", "ok", "Why would you do that?"]
    probs = first.predict_proba(texts)
    copy = save_bundle(tmp_path / "copy", **bundle_fields(smoke_bundle))
    second = load_bundle(copy)
    np.testing.assert_array_equal(second.predict_proba(texts), probs)
    assert second.predict(texts) == first.predict(texts)
    # Batch composition (padding) must not change a text's probabilities.
    np.testing.assert_allclose(first.predict_proba(texts[:1]), probs[:1], atol=1e-5)


def test_bundle_reproduces_validation_metrics(smoke_bundle):
    """Predictions made in this process match what the Ray workers measured."""
    from emotions.evaluation import compute_metrics

    bundle = load_bundle(smoke_bundle)
    config = build_config("smoke")
    dev = load_labelled("goemotions:dev").take(config.data.max_validation_examples, config.seed)
    result = compute_metrics(dev.labels, bundle.predict_proba(dev.texts), bundle.thresholds)
    assert result["macro_f1"] == pytest.approx(metrics_of(smoke_bundle)["at_thresholds"]["macro_f1"], abs=0.01)


def latest_checkpoint_metrics(run_dir) -> dict:
    """The metrics Ray Train registered with the run's latest checkpoint ({} before the first)."""
    try:
        snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):  # not written yet, or being rewritten
        return {}
    return (snapshot.get("latest_checkpoint_result") or {}).get("metrics", {})


def kill_a_worker_after_a_checkpoint_of(stage: str, run_dir, deadline: float) -> None:
    while latest_checkpoint_metrics(run_dir).get("stage") != stage:
        assert time.time() < deadline, f"no {stage} checkpoint was registered"
        time.sleep(0.05)
    import ray
    from ray.util.state import list_actors  # this cluster's workers only, not other sessions' Ray

    workers = list_actors(
        address=ray.get_runtime_context().gcs_address,
        filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")],
    )
    assert len(workers) == 2, workers
    os.kill(workers[-1].pid, signal.SIGKILL)


def safetensors_keys(path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path), "np") as f:
        return list(f.keys())


@pytest.mark.slow  # 75 s; resuming after a lost node runs in CI (test_multinode.py); python -m pytest -m slow
def test_workers_killed_in_each_stage_resume_from_checkpoints(local_ray, runs_dir, tmp_path):
    """A worker dies mid-stage-1 (full checkpoint), then another mid-stage-2 (head-only checkpoint
    plus the frozen encoder stored once): both restores continue where the checkpoint left off."""
    from safetensors.numpy import load_file

    storage = runs_dir / "kill"
    config = build_config(
        "smoke",
        overrides=[
            f"run.storage_path={storage}",
            "run.name=kill",
            "stage1.epochs=2",
            "stage2.epochs=8",
            "data.max_train_examples=1024",
            # resumed too: the weight average and per-layer rates
            "stage1.ema_decay=0.99",
            "stage1.layer_lr_decay=0.8",
        ],
    )
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(path=train(config, tmp_path / "bundle")))
    thread.start()
    deadline = time.time() + 240
    kill_a_worker_after_a_checkpoint_of("stage1", storage / "kill", deadline)
    kill_a_worker_after_a_checkpoint_of("stage2", storage / "kill", deadline)
    thread.join(timeout=300)
    assert "path" in result, "training did not finish after the workers were killed"
    metrics = metrics_of(result["path"])
    assert [r["stage"] for r in metrics["resumed_from"]] == ["stage1", "stage2"], metrics["resumed_from"]
    assert metrics["resumed_from"][0]["epoch"] == 1 and 1 <= metrics["resumed_from"][1]["epoch"] < 8
    # Stage 1's head came back from the stage-2 checkpoint (heads.safetensors) to compete at the end.
    assert set(metrics["head_choice"]["heldout_macro_f1"]) == {"stage1", "stage2"}
    epochs = [(h["stage"], h["epoch"]) for h in metrics["history"]]
    assert epochs == [("stage1", 1), ("stage1", 2)] + [("stage2", e) for e in range(1, 9)]
    # The weight average came back with the stage-1 checkpoint and went on averaging.
    assert metrics["history"][1]["ema_steps"] == 2 * metrics["history"][0]["ema_steps"] > 0
    # The restored stage-2 worker had the stage-1 encoder back bit for bit: every stage-2 checkpoint,
    # before and after its restart, refers to the same stored encoder, and the bundle's encoder is
    # that file. (A kill that lands after the first attempt already began stage 2 leaves that
    # attempt's encoder file behind, unreferenced; a worker killed while writing one leaves a hidden
    # .<name>.partial-<pid>. Neither is ever read.)
    states = [
        json.loads((c / "state.json").read_text())
        for c in (storage / "kill").glob("checkpoint_*")
        if (c / "state.json").exists()
    ]
    referenced = {s["frozen_encoder"]["sha256"] for s in states if s.get("stage") == "stage2"}
    assert len(referenced) == 1 and any(
        s["resumed_from"][-1]["stage"] == "stage2" for s in states if s.get("stage") == "stage2"
    )
    encoder = storage / "kill" / "frozen-encoder" / f"{referenced.pop()}.safetensors"
    bundle = load_bundle(result["path"]).model.state_dict()  # encoder.* and head.*, whatever the file layout
    for name, tensor in load_file(str(encoder)).items():
        np.testing.assert_array_equal(bundle[name].numpy(), tensor)
    kept = [c for c in (storage / "kill").glob("checkpoint_*") if (c / "state.json").exists()]
    for checkpoint in kept:  # stage 2's hold the head only (a kill may leave a stage-1 one kept)
        if json.loads((checkpoint / "state.json").read_text()).get("stage") == "stage2":
            assert all(k.startswith("head.") for k in safetensors_keys(checkpoint / "model.safetensors"))


def test_frozen_stage_checkpoints_hold_the_head_only(smoke_bundle, runs_dir):
    runs = [run for run in runs_dir.glob("bundle-*") if (run / "frozen-encoder").is_dir()]
    assert runs, "the smoke run stored no frozen encoder"
    bundle = load_bundle(smoke_bundle).model.state_dict()  # encoder.* and head.*, whatever the file layout
    for run in runs:
        (encoder,) = (run / "frozen-encoder").iterdir()
        assert encoder.name == hashlib.sha256(encoder.read_bytes()).hexdigest() + ".safetensors"
        checkpoints = sorted(c for c in run.glob("checkpoint_*") if c.is_dir())
        assert checkpoints  # the last two: stage 2's second epoch and the final one
        for checkpoint in checkpoints:
            state = json.loads((checkpoint / "state.json").read_text())
            assert state["stage"] == "stage2" and state["frozen_encoder"]["uri"] == str(encoder)
            keys = safetensors_keys(checkpoint / "model.safetensors")
            assert keys and all(k.startswith("head.") for k in keys)
            if state["head_choice"]:  # the final checkpoint: the head the bundle keeps
                assert sorted(keys) == sorted(k for k in bundle if k.startswith("head."))
            # Stage 2's checkpoints carry stage 1's head, which stage 2's competes with at the end.
            assert set(state["candidates"]) == ({"stage1", "stage2"} if state["head_choice"] else {"stage1"})
            # Each checkpoint says what it was made with (prepare_run compares the hash).
            assert state["config"]["stage2"]["epochs"] == 2 and len(state["config_hash"]) == 16
        # The bundle is whole: the stored encoder plus the final checkpoint's head.
        assert {k for k in bundle if k.startswith("encoder.")} == set(safetensors_keys(encoder))


def test_optimizer_state_is_restored_by_parameter_name(tmp_path):
    import torch

    from emotions.model import EmotionClassifier, build_head, load_encoder
    from emotions.training import ResumeError, load_optimizer_state, save_optimizer_state

    torch.manual_seed(0)
    model = EmotionClassifier(load_encoder("tiny-random"), build_head(32, 2, 0.1), "mean")
    optimizer = torch.optim.AdamW(model.head.parameters())
    model.head(torch.randn(4, 32)).sum().backward()
    optimizer.step()
    save_optimizer_state(optimizer, model, tmp_path / "optimizer.safetensors")
    # The same parameters in another order: each gets its own moments back.
    reordered = torch.optim.AdamW(list(model.head.parameters())[::-1])
    load_optimizer_state(reordered, model, tmp_path / "optimizer.safetensors", torch.device("cpu"))
    for p in model.head.parameters():
        torch.testing.assert_close(reordered.state[p]["exp_avg"], optimizer.state[p]["exp_avg"])
    # Other parameters (a 1-layer head): refused, not loaded by position.
    model.head = build_head(32, 1, 0.1)
    with pytest.raises(ResumeError, match="other parameters.*start the run over with --fresh"):
        load_optimizer_state(
            torch.optim.AdamW(model.head.parameters()), model, tmp_path / "optimizer.safetensors", torch.device("cpu")
        )


def test_fp16_grad_scaler_state_and_schedule_position_survive_a_checkpoint(tmp_path, caplog):
    """A resumed or restarted fp16 stage carries on at its scale, not 2**16 (whose first steps
    would overflow and be skipped again); the state is JSON in the optimizer file's metadata."""
    import logging

    import torch
    from safetensors import safe_open

    from emotions.model import EmotionClassifier, build_head, load_encoder
    from emotions.training import load_optimizer_state, save_optimizer_state

    model = EmotionClassifier(load_encoder("tiny-random"), build_head(32, 1, 0.1), "mean")
    optimizer = torch.optim.AdamW(model.head.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    scaler = torch.amp.GradScaler("cpu")
    for _ in range(3):
        scaler.scale(model.head(torch.randn(4, 32)).sum()).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
    scaler.update(new_scale=512.0)  # as after overflows backed it off
    path = tmp_path / "optimizer.safetensors"
    save_optimizer_state(optimizer, model, path, scaler, scheduler)
    with safe_open(str(path), "pt") as f:
        assert json.loads(f.metadata()["grad_scaler"])["scale"] == 512.0
    fresh = torch.amp.GradScaler("cpu")
    steps = load_optimizer_state(torch.optim.AdamW(model.head.parameters()), model, path, torch.device("cpu"), fresh)
    assert fresh.state_dict() == scaler.state_dict() and fresh.get_scale() == 512.0 and steps == 3
    # A checkpoint of fp32/bf16 steps (or an older one): the scaler starts at its default, said so.
    save_optimizer_state(optimizer, model, path)
    other = torch.amp.GradScaler("cpu")
    with caplog.at_level(logging.WARNING, logger="emotions.training"):
        assert load_optimizer_state(torch.optim.AdamW(model.head.parameters()), model, path, "cpu", other) is None
    assert other.get_scale() == 2.0**16 and "no gradient scaler state" in caplog.text


def test_resuming_under_another_config_is_refused_and_fresh_starts_over(local_ray, s3, capsys, monkeypatch):
    """All on S3: the run's checkpoints, the bundles, and the driver's reading of the run's record
    (``ray.train.Result.from_path``). The `emotions train` command runs in this process
    (``cli.main``), on the session's Ray."""
    from emotions import cli, cluster

    # scaling.num_workers=auto, as the default and quickstart presets ask: checkpoints record the
    # resolved count, and a resubmitted run must not be refused as "num_workers: 2 -> auto".
    run = ["run.name=resume", f"run.storage_path={s3}/runs", "stage1.epochs=1", "stage2.epochs=1"]
    run += ["scaling.num_workers=auto"]
    train(build_config("smoke", overrides=run), f"{s3}/bundles/first")
    changed = [*run, "stage1.learning_rate=0.002"]
    with monkeypatch.context() as patch:  # refused before Ray: connecting would fail the test
        patch.setattr(cluster, "connect", lambda address=None: pytest.fail("Ray was reached"))
        code = cli.main(["train", "--preset", "smoke", "--output", f"{s3}/bundles/second", *changed])
    stderr = capsys.readouterr().err
    assert code == 2, stderr
    assert "stage1.learning_rate: 0.001 -> 0.002" in stderr and "--fresh" in stderr
    assert cli.main(["train", "--preset", "smoke", "--output", f"{s3}/bundles/second", "--fresh", *changed]) == 0
    second = load_bundle(f"{s3}/bundles/second").metrics
    assert second["resumed_from"] == [] and len(second["history"]) == 2
    # The same config (but for a key that may change), submitted again as a command, finds the
    # run finished: the bundle comes from its final checkpoint on S3, and no worker group starts.
    import ray.train.torch

    with monkeypatch.context() as patch:
        patch.setattr(ray.train.torch, "TorchTrainer", lambda *a, **k: pytest.fail("workers were started"))
        again = ["train", "--preset", "smoke", "--output", f"{s3}/bundles/third", *changed, "run.max_failures=1"]
        assert cli.main(again) == 0, capsys.readouterr().err
        third = load_bundle(f"{s3}/bundles/third")
    assert third.metrics["resumed_from"] == [] and third.metrics["history"] == second["history"]
    texts = ["what a lovely surprise", "I am so sorry for your loss"]
    np.testing.assert_array_equal(third.predict_proba(texts), load_bundle(f"{s3}/bundles/second").predict_proba(texts))


def test_bucketing_covers_every_row_once_and_pads_less():
    lengths = np.random.default_rng(0).integers(3, 60, size=1000)
    bucketed = bucket_batches(lengths, 16, seed=1)
    assert sorted(np.concatenate(bucketed).tolist()) == list(range(1000))
    padded = lambda batches: sum(len(b) * lengths[b].max() for b in batches)  # noqa: E731
    assert padded(bucketed) < 0.8 * padded(random_batches(1000, 16, seed=1))
    assert bucket_batches(lengths, 16, seed=1)[0].tolist() == bucketed[0].tolist()  # seeded


def test_bundle_published_to_a_uri_loads_back(smoke_bundle, tmp_path):
    from emotions.bundle import publish_bundle

    uri = f"file://{tmp_path}/store/bundle"
    publish_bundle(smoke_bundle, uri)
    assert (tmp_path / "store" / "bundle" / "manifest.json").exists()
    texts = ["what a lovely surprise", "I am so sorry for your loss"]
    np.testing.assert_array_equal(load_bundle(uri).predict_proba(texts), load_bundle(smoke_bundle).predict_proba(texts))


def test_auto_layout_resolves_against_the_connected_cluster(local_ray):
    from emotions.training import resolve_layout

    resolved = resolve_layout(build_config("default"))  # num_workers and cpus_per_worker: auto
    cpus = int(local_ray.cluster_resources()["CPU"])  # one node: the session's local Ray
    assert (resolved.scaling.num_workers, resolved.scaling.cpus_per_worker) == (1, cpus)
    assert resolve_layout(build_config("smoke")).scaling == build_config("smoke").scaling  # explicit: kept


def test_bundle_metrics_record_the_layout_that_ran(smoke_bundle):
    layout = metrics_of(smoke_bundle)["layout"]
    assert (layout["num_workers"], layout["cpus_per_worker"], layout["use_gpu"]) == (2, 1, False)
    assert len(metrics_of(smoke_bundle)["shards"]) == layout["num_workers"]


def test_positive_weights_lift_rare_labels_by_their_odds():
    from emotions.training import loss_function

    rates = np.array([0.5, 0.01, 0.0] + [0.1] * 25)
    weighted = loss_function(build_config("smoke", overrides=["stage1.pos_weight_power=0.5"]).stage1, rates)
    assert weighted.pos_weight[0].item() == pytest.approx(1.0)  # as many positives as negatives
    assert weighted.pos_weight[1].item() == pytest.approx(99**0.5, rel=1e-5)  # 1 in 100: x sqrt(99)
    assert weighted.pos_weight[2].item() == 1.0  # a label the training data lacks is left alone
    assert loss_function(build_config("smoke").stage1, rates).pos_weight is None  # the default: plain BCE


def test_asymmetric_loss_is_bce_at_zero_and_drops_easy_negatives():
    import torch
    from torch import nn

    from emotions.training import AsymmetricLoss

    torch.manual_seed(0)
    logits, targets, weight = torch.randn(16, 28), (torch.rand(16, 28) < 0.2).float(), torch.rand(28) + 0.5
    plain = nn.BCEWithLogitsLoss(pos_weight=weight)(logits, targets)
    assert AsymmetricLoss(0, 0, 0, weight)(logits, targets).item() == pytest.approx(plain.item(), rel=1e-5)
    easy = torch.full((1, 28), -4.0)  # p = 0.018: a confident negative
    negatives = torch.zeros(1, 28)
    assert AsymmetricLoss(4, 0, 0.05)(easy, negatives).item() == 0.0  # clipped away entirely
    focal, bce = AsymmetricLoss(2, 2, 0)(easy, negatives), nn.BCEWithLogitsLoss()(easy, negatives)
    assert 0 < focal.item() < bce.item() * 0.001  # scaled by p ** 2
    for gamma in (0.5, 2.0):  # finite gradients where the sigmoid rounds to 0 or 1, both targets
        for value in (-110.0, -20.0, 20.0, 110.0):
            for target in (0.0, 1.0):
                x = torch.full((1, 28), value, requires_grad=True)
                AsymmetricLoss(gamma, gamma, 0)(x, torch.full((1, 28), target)).backward()
                assert torch.isfinite(x.grad).all(), (gamma, value, target)
    config = build_config("smoke", overrides=["stage1.gamma_neg=4", "stage1.neg_clip=0.05"]).stage1
    from emotions.training import loss_function

    assert isinstance(loss_function(config, np.full(28, 0.1)), AsymmetricLoss)


def test_layer_lr_decay_gives_lower_layers_smaller_rates():
    from torch import nn

    from emotions.model import EmotionClassifier, build_head, load_encoder
    from emotions.training import build_optimizer

    model = EmotionClassifier(load_encoder("tiny-random"), build_head(32, 1, 0.1), "mean")
    stage = build_config(
        "smoke", overrides=["stage1.layer_lr_decay=0.5", "stage1.learning_rate=1e-3", "stage1.head_learning_rate=1e-2"]
    ).stage1
    groups = build_optimizer(stage, model.head, model.encoder).param_groups
    rate = {id(p): g["lr"] for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert rate[id(named["head.1.weight"])] == 1e-2
    assert rate[id(named["encoder.encoder.layer.1.output.dense.weight"])] == 1e-3  # the top of 2 layers
    assert rate[id(named["encoder.encoder.layer.0.output.dense.weight"])] == 5e-4
    assert rate[id(named["encoder.embeddings.word_embeddings.weight"])] == 2.5e-4
    assert len(rate) == len(named)  # every trainable weight, once
    assert isinstance(model.head, nn.Sequential)


def test_weight_average_tracks_steps_and_survives_a_checkpoint(tmp_path):
    import torch
    from torch import nn

    from emotions.training import WeightAverage

    model = nn.Linear(3, 2)
    average = WeightAverage(model, decay=0.5)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    average.update()  # first step: decay min(0.5, 1/10) = 0.1
    np.testing.assert_allclose(average.average["weight"], start + 0.9, rtol=1e-6)
    with average.swapped_in():
        np.testing.assert_allclose(model.weight.detach(), start + 0.9, rtol=1e-6)
    np.testing.assert_allclose(model.weight.detach(), start + 1.0, rtol=1e-6)  # the trained weights back
    average.save(tmp_path / "ema.safetensors")
    again = WeightAverage(model, decay=0.5)
    again.load(tmp_path / "ema.safetensors")
    assert again.steps == 1
    np.testing.assert_allclose(again.average["weight"], start + 0.9, rtol=1e-6)
    again.apply()
    np.testing.assert_allclose(model.weight.detach(), start + 0.9, rtol=1e-6)
    # The warm-up constant sets the span: with 4, the first step keeps 1/4 of the old average
    wide = WeightAverage(model, decay=0.999, warmup=4.0)
    before = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    wide.update()
    np.testing.assert_allclose(wide.average["weight"], before + 0.75, rtol=1e-6)


def test_linear_schedule_warms_up_then_decays_to_its_floor():
    import torch

    from emotions.training import build_scheduler

    def rates(floor: float) -> list[float]:
        stage = build_config(
            "smoke", overrides=["stage1.epochs=2", "stage1.warmup_ratio=0.1", f"stage1.lr_floor={floor}"]
        ).stage1
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        scheduler, seen = build_scheduler(optimizer, stage, steps_per_epoch=50), []
        for _ in range(100):
            seen.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        return seen

    plain, floored = rates(0.0), rates(0.3)
    assert plain[:10] == floored[:10] and plain[9] == 1.0  # the same warm-up
    assert plain[-1] < 0.02 and abs(floored[-1] - 0.3) < 0.01  # down to 0, or to the floor
    assert all(a >= b for a, b in zip(floored[9:], floored[10:]))  # decaying all the way
    assert floored[55] > plain[55]
    with pytest.raises(ValueError, match=r"stage1.lr_floor: 1.0 must be in \[0, 1\)"):
        rates(1.0)
    with pytest.raises(ValueError, match=r"stage1.lr_floor: 0.3 needs (stage1.)?schedule=linear"):
        build_config("smoke", overrides=["stage1.lr_floor=0.3", "stage1.schedule=constant"])


def test_cpu_bf16_steps_train_in_bfloat16_and_keep_float32_weights(monkeypatch):
    import torch

    from emotions import environment
    from emotions.model import EmotionClassifier, build_head, load_encoder
    from emotions.precision import describe_device, gpu_device
    from emotions.training import (
        Shards,
        build_optimizer,
        build_scheduler,
        loss_function,
        stage_inputs,
        step_autocast,
        train_epoch,
        train_precision,
    )

    cpu, a100 = torch.device("cpu"), gpu_device("NVIDIA A100-SXM4-80GB", (8, 0))
    config = build_config("smoke", overrides=["scaling.cpu_bf16=auto"])
    try:
        for native, expected in ((True, "bf16"), (False, "fp32")):
            monkeypatch.setattr(environment, "cpu_has_bf16", lambda native=native: native)
            describe_device.cache_clear()  # the CPU's Device asks it (precision.native_bf16) once per process
            assert train_precision(config, describe_device(cpu)) == expected
        assert train_precision(build_config("smoke"), describe_device(cpu)) == "fp32"  # off unless asked for
    finally:
        describe_device.cache_clear()  # no Device of the patched CPU for later tests
    assert (
        train_precision(build_config("smoke", overrides=["scaling.cpu_bf16=false"]), a100) == "bf16"
    )  # GPU: scaling.bf16

    tokens = tokenize(
        ["so happy for you", "this is awful", "ok", "thanks a lot"] * 4,
        np.eye(28, dtype=np.float32)[[0, 1, 27, 15] * 4],
        load_tokenizer("tiny-random"),
        32,
    )
    shards = Shards(train=tokens, validation=tokens, pad_id=0, device=cpu, rank=0, world=1, train_precision="bf16")
    model = EmotionClassifier(load_encoder("tiny-random"), build_head(32, 1, 0.1), "mean")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    inputs = stage_inputs(config.stage1, model, shards, config)
    optimizer = build_optimizer(config.stage1, model.head, model.encoder)
    seen = []
    autocast = step_autocast(shards)
    with autocast:
        seen.append(inputs.logits(model, np.arange(4)).dtype)
    losses = train_epoch(
        model,
        inputs,
        0,
        loss_function(config.stage1, tokens.labels.mean(0), cpu),
        optimizer,
        build_scheduler(optimizer, config.stage1, 2),
        autocast=autocast,
    )
    assert seen == [torch.bfloat16] and losses.steps > 0 and np.isfinite(losses.mean())
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert not torch.equal(
        before["encoder.encoder.layer.0.output.dense.weight"], model.encoder.encoder.layer[0].output.dense.weight
    )


def test_frozen_bottom_layers_get_no_gradients_and_no_optimizer_slot():
    import torch

    from emotions.model import EmotionClassifier, build_head, load_encoder
    from emotions.training import Shards, build_optimizer, stage_inputs

    config = build_config("smoke", overrides=["model.freeze_layers=1"])
    tokens = tokenize(
        ["so happy for you", "this is awful", "ok"], np.zeros((3, 28), np.float32), load_tokenizer("tiny-random"), 32
    )
    shards = Shards(train=tokens, validation=tokens, pad_id=0, device=torch.device("cpu"), rank=0, world=1)
    model = EmotionClassifier(load_encoder("tiny-random"), build_head(32, 1, 0.1), "mean")
    inputs = stage_inputs(config.stage1, model, shards, config)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(n.startswith(("encoder.embeddings.", "encoder.encoder.layer.0.")) for n in trainable)
    assert any(n.startswith("encoder.encoder.layer.1.") for n in trainable) and "head.1.weight" in trainable
    optimizer = build_optimizer(config.stage1, model.head, model.encoder)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(trainable)
    loss = inputs.logits(model, np.arange(3)).sum()
    loss.backward()
    assert model.encoder.encoder.layer[0].output.dense.weight.grad is None
    assert model.encoder.encoder.layer[1].output.dense.weight.grad is not None
