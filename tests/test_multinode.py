"""The whole workflow on a Ray cluster of three nodes that share no disk, all storage on S3.

A head with no CPUs (as on KubeRay, where the head pod runs no work) and two 1-CPU worker nodes,
each started with `ray start --block` in a mount namespace of its own where this test session's
temporary root is an empty tmpfs: a worker cannot see anything the driver wrote locally, so code
that hands a driver-local path to a task fails here as it would on Kubernetes. Every path the
commands get is an s3:// URI on the session's moto server; the drivers are the real `emotions`
CLI in subprocesses on the "head" side, with their working and temporary folders in the hidden
root. The one training run that the other tests use has a worker node killed under it, and a
replacement started (as KubeRay replaces a pod); it resumes from its last checkpoint on S3.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from ray_nodes import kill_node, node_command, start_node, stop_node, wait_for_nodes

COMMAND_TIMEOUT_S = 420


@dataclass
class Cluster:
    address: str
    env: dict = field(repr=False)  # holds the auth token
    hidden: Path  # the driver's local root: invisible to the worker nodes
    temp_dir: str
    workers: list = field(default_factory=list)
    head: subprocess.Popen | None = None

    def add_worker(self) -> subprocess.Popen:
        """One more 1-CPU worker node, in its own mount namespace with ``hidden`` hidden."""
        command, _, _ = node_command(head=False, num_cpus=1, gcs_port=int(self.address.rsplit(":", 1)[1]))
        log = Path(self.temp_dir) / f"worker-{len(self.workers)}.log"
        node = start_node(command, self.env, log, hide=self.hidden)
        self.workers.append(node)
        return node


@pytest.fixture(scope="module")
def cluster(s3, tmp_path_factory):
    hidden = tmp_path_factory.getbasetemp()  # every tmp_path of this session lives under it
    # Short path outside the hidden root: Ray's Unix sockets live under it (107-byte limit).
    temp_dir = tempfile.mkdtemp(prefix="raymn-", dir="/tmp")
    token = secrets.token_hex(16)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH")}
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=token,
        RAY_USAGE_STATS_ENABLED="0",
        RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",
    )
    command, gcs_port, dashboard_port = node_command(head=True, num_cpus=0, temp_dir=temp_dir)
    # Ray Train frees a stopped trial's placement group after asking the state API (the dashboard)
    # about its controller. Found by scanning for GCS processes, it is ambiguous on a machine that
    # runs local_ray too, so every process of this cluster is told where its own dashboard is.
    env["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{dashboard_port}"
    cluster = Cluster(f"127.0.0.1:{gcs_port}", env, hidden, temp_dir)
    try:
        cluster.head = start_node(command, env, Path(temp_dir) / "head.log")
        wait_for_nodes(cluster.address, 1, env)
        for count in (2, 3):  # one at a time: nodes on one machine pick their socket names in turn
            cluster.add_worker()
            wait_for_nodes(cluster.address, count, env)
        yield cluster
    finally:
        for node in [*cluster.workers, cluster.head]:
            if node is not None:
                stop_node(node)
        shutil.rmtree(temp_dir, ignore_errors=True)


def emotions(cluster: Cluster, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """`emotions ARGS` as a driver on the head side: RAY_ADDRESS names the cluster; its working
    and temporary folders are under the hidden root."""
    (cwd / "tmp").mkdir(parents=True, exist_ok=True)
    env = {**cluster.env, "RAY_ADDRESS": cluster.address, "TMPDIR": str(cwd / "tmp")}
    result = subprocess.run(
        [sys.executable, "-m", "emotions.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_S,
    )
    assert result.returncode == 0, f"emotions {args[0]} exited {result.returncode}:\n{result.stderr[-6000:]}"
    assert not (cwd / "s3:").exists(), "an s3:// URI was written to a local folder named s3:"
    return result


def s3_fs() -> pafs.FileSystem:
    return pafs.FileSystem.from_uri("s3://emo")[0]


def s3_exists(uri: str) -> bool:
    fs, path = pafs.FileSystem.from_uri(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_json(uri: str) -> dict:
    fs, path = pafs.FileSystem.from_uri(uri)
    with fs.open_input_stream(path) as f:
        return json.loads(f.read())


@dataclass
class KilledRun:
    uri: str  # the bundle
    log: str  # the driver's output


@pytest.fixture(scope="module")
def killed_run(cluster, s3, tmp_path_factory) -> KilledRun:
    """The smoke preset trained on the two worker nodes, bundle and checkpoints on S3. Once the
    run has a checkpoint there, a worker node is killed mid-stage-1 and a replacement joins (as
    KubeRay replaces a pod); the run goes on from that checkpoint. The bundle serves the later
    tests, which then run on the replacement and the surviving node."""
    cwd = tmp_path_factory.mktemp("train")
    (cwd / "tmp").mkdir()
    env = {**cluster.env, "RAY_ADDRESS": cluster.address, "TMPDIR": str(cwd / "tmp")}
    uri = f"{s3}/mn/bundle"
    args = [
        "train",
        "--preset",
        "smoke",
        "--output",
        uri,
        f"run.storage_path={s3}/mn/runs",
        "run.name=mn-smoke",
        "stage1.epochs=4",
        "data.max_train_examples=1024",
    ]
    log = open(cwd / "train.log", "w")
    driver = subprocess.Popen(
        [sys.executable, "-m", "emotions.cli", *args], cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + COMMAND_TIMEOUT_S
        while not s3_exists(f"{s3}/mn/runs/mn-smoke/checkpoint_manager_snapshot.json"):
            assert driver.poll() is None, (cwd / "train.log").read_text()[-6000:]
            assert time.monotonic() < deadline, "no checkpoint was registered"
            time.sleep(0.5)
        kill_node(cluster.workers[0])  # a training worker's node dies mid-stage-1
        cluster.add_worker()  # ... and is replaced, as KubeRay replaces a pod
        driver.wait(timeout=COMMAND_TIMEOUT_S)
    finally:
        if driver.poll() is None:
            driver.kill()
        log.close()
    output = (cwd / "train.log").read_text()
    assert driver.returncode == 0, output[-6000:]
    assert not (cwd / "s3:").exists(), "an s3:// URI was written to a local folder named s3:"
    return KilledRun(uri, output)


@pytest.fixture(scope="module")
def bundle(killed_run) -> str:
    return killed_run.uri


def test_training_runs_on_the_worker_nodes_with_everything_on_s3(bundle, s3):
    from emotions.bundle import load_bundle

    loaded = load_bundle(bundle)  # downloads, verifies every file against the manifest
    assert loaded.predict(["thank you so much!", "this is awful"]) is not None
    assert [(h["stage"], h["epoch"]) for h in loaded.metrics["history"]][-1] == ("stage2", 2)
    runs = s3_fs().get_file_info(pafs.FileSelector("emo/mn/runs/mn-smoke"))
    assert any(i.base_name.startswith("checkpoint_") for i in runs), [i.base_name for i in runs]


def test_evaluate_writes_its_report_to_s3(cluster, bundle, s3, tmp_path):
    emotions(
        cluster, tmp_path, "evaluate", "--model", bundle, "--data", "goemotions:dev", "--report", f"{s3}/mn/report"
    )
    for name in ("metrics.json", "report.md", "per_label_f1.png"):
        assert s3_exists(f"{s3}/mn/report/{name}"), name
    assert read_json(f"{s3}/mn/report/metrics.json")["n_examples"] > 5000


def test_tagging_reads_and_writes_s3_from_the_worker_nodes(cluster, bundle, s3, tmp_path):
    fs = s3_fs()
    texts = ["I love this so much", "why would you do that", "thanks, that helps", "[deleted]", None]
    rows_in = 0
    for part in range(3):
        rows = texts * (40 * (part + 1))
        ids = [f"{part}-{i}" for i in range(len(rows))]
        pq.write_table(
            pa.table({"id": ids, "body": pa.array(rows, pa.string())}),
            f"emo/mn/dump/part-{part}.parquet",
            filesystem=fs,
        )
        rows_in += len(rows)
    emotions(cluster, tmp_path, "tag", "--model", bundle, "--input", f"{s3}/mn/dump/", "--output", f"{s3}/mn/tagged")
    manifest = read_json(f"{s3}/mn/tagged/_manifest.json")
    assert s3_exists(f"{s3}/mn/tagged/_SUCCESS")
    table = pq.read_table("emo/mn/tagged", filesystem=fs)
    assert manifest["rows_in"] == manifest["rows_out"] == table.num_rows == rows_in
    assert len(set(table.column("id").to_pylist())) == rows_in  # every row exactly once
    assert manifest["rows_flagged"] == 2 * rows_in // len(texts)  # [deleted] and null, kept and flagged


@pytest.mark.slow  # 100 s; the one-node sweep (test_tuning.py) runs in CI; python -m pytest -m slow
def test_sweep_trials_train_on_the_worker_nodes_and_export_to_s3(cluster, s3, tmp_path):
    from emotions.bundle import load_bundle

    out = f"{s3}/mn/sweep"
    emotions(
        cluster,
        tmp_path,
        "tune",
        "--preset",
        "smoke",
        "--output",
        out,
        f"run.storage_path={s3}/mn/tune",
        "tune.num_samples=2",
        "stage1.epochs=1",
        "stage2.epochs=1",
    )
    for name in ("results.csv", "results.md", "sweep.png", "best_config.json"):
        assert s3_exists(f"{out}/{name}"), name
    assert load_bundle(f"{out}/best_bundle").predict(["thanks!"]) is not None
    # Tune's experiment itself lives on S3, each trial's results beside it (what a re-run restores).
    trials = [
        i.path
        for i in s3_fs().get_file_info(pafs.FileSelector("emo/mn/sweep/sweep/sweep"))
        if i.type == pafs.FileType.Directory
    ]
    assert len(trials) == 2 and all(s3_exists(f"s3://{t}/result.json") for t in trials)


@pytest.mark.slow  # 45 s; the one-node head sweep (test_tuning.py) runs in CI; python -m pytest -m slow
def test_head_sweep_caches_features_on_s3(cluster, bundle, s3, tmp_path):
    from emotions.bundle import load_bundle

    out = f"{s3}/mn/heads"
    emotions(
        cluster,
        tmp_path,
        "tune",
        "--from-bundle",
        bundle,
        "--output",
        out,
        f"run.storage_path={s3}/mn/head-runs",
        "tune.num_samples=2",
        "stage2.epochs=2",
    )
    cache = s3_fs().get_file_info(pafs.FileSelector("emo/mn/head-runs/features"))
    assert [i.base_name for i in cache if i.base_name.endswith(".safetensors")], "no feature cache on S3"
    assert load_bundle(f"{out}/best_bundle").predict(["thanks!"]) is not None


def test_training_resumes_after_a_worker_node_dies(killed_run):
    """The killed node's run finished from its checkpoint on S3, not from scratch."""
    from emotions.bundle import load_bundle

    metrics = load_bundle(killed_run.uri).metrics
    assert metrics["resumed_from"], "the run restarted from scratch instead of its checkpoint"
    assert metrics["resumed_from"][0]["stage"] == "stage1"
    epochs = [(h["stage"], h["epoch"]) for h in metrics["history"]]
    assert epochs == [("stage1", e) for e in range(1, 5)] + [("stage2", 1), ("stage2", 2)]
