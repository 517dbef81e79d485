"""The whole workflow on a Ray cluster of three nodes that share no disk, all storage on S3.

A head with no CPUs (as on KubeRay, where the head pod runs no work) and two 1-CPU worker nodes,
each started with `ray start --block` in a mount namespace of its own (tests/ray_nodes.py): its
/tmp is a fresh tmpfs holding only its own folder (``Cluster.own``), where its Ray temp folder,
TMPDIR, HOME and caches (Hugging Face, XDG, the bundle cache, $EMOTIONS_CACHE) live, and the
driver's caches outside /tmp (~/.cache, /var/tmp) are empty tmpfs. A worker cannot see anything
the driver or another worker wrote locally (test_worker_nodes_share_no_disk_...), so code that
hands a local path or a cached file from one process to another fails here as it would on
Kubernetes. Every path the commands get is an s3:// URI on the session's moto server; the drivers
are the real `emotions` CLI in subprocesses on the "head" side, which shares the session's disk.
The one training run that the other tests use has a worker node killed under it, and a
replacement started (as KubeRay replaces a pod); it resumes from its last checkpoint on S3. The
nightly job tags two dates of dumps on S3; a tagging run loses a worker node midway (slow).
"""

from __future__ import annotations

import contextlib
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
from ray_nodes import NODE_ROOT, kill_node, node_command, node_env, start_node, stop_node, wait_for_nodes

COMMAND_TIMEOUT_S = 420
# The bodies of the Parquet dumps the tagging tests write: 3 comments, then [deleted] and null (flagged, kept).
TEXTS = ["I love this so much", "why would you do that", "thanks, that helps", "[deleted]", None]
LOST_FILES, LOST_ROWS = 4, 10_000  # the corpus a worker node is lost under: tens of seconds on two 1-CPU nodes


@dataclass
class Cluster:
    address: str
    env: dict = field(repr=False)  # holds the auth token
    hidden: list[Path]  # the driver's local folders: invisible to the worker nodes
    temp_dir: str  # the nodes' folders: the head's Ray temp folder (h), each worker's own disk (w0, w1, ...)
    workers: list = field(default_factory=list)
    head: subprocess.Popen | None = None

    def add_worker(self) -> subprocess.Popen:
        """One more 1-CPU worker node with a disk of its own (``own(i)``, which it sees as
        NODE_ROOT in a private /tmp), ``hidden`` hidden, and a custom resource ``worker<i>``."""
        i = len(self.workers)
        command, _, _ = node_command(
            head=False,
            num_cpus=1,
            gcs_port=int(self.address.rsplit(":", 1)[1]),
            temp_dir=f"{NODE_ROOT}/ray",
            resources={f"worker{i}": 1},
        )
        log = Path(self.temp_dir) / f"worker-{i}.log"
        node = start_node(command, node_env(self.env), log, hide=self.hidden, own=self.own(i))
        self.workers.append(node)
        return node

    def own(self, i: int) -> Path:
        """Worker ``i``'s own disk, as seen from outside it."""
        return Path(self.temp_dir) / f"w{i}"

    def live_workers(self) -> list[int]:
        return [i for i, node in enumerate(self.workers) if node.poll() is None]


def driver_folders(basetemp: Path) -> list[Path]:
    """The driver's local folders that a hand-off to a worker node could go through: its temporary
    root (hidden with /tmp), the emotions cache, the Hugging Face and XDG caches, /var/tmp."""
    from huggingface_hub import constants

    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return [Path(p) for p in (basetemp, os.environ["EMOTIONS_CACHE"], constants.HF_HOME, xdg, "/var/tmp")]


@pytest.fixture(scope="module")
def cluster(s3, tmp_path_factory):
    hidden = driver_folders(tmp_path_factory.getbasetemp())  # every tmp_path of this session lives in the first
    # Short path: Ray's Unix sockets live under the head's temp folder (107-byte limit).
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
    command, gcs_port, dashboard_port = node_command(head=True, num_cpus=0, temp_dir=f"{temp_dir}/h")
    # Ray Train frees a stopped trial's placement group after asking the state API (the dashboard)
    # about its controller. Found by scanning for GCS processes, it is ambiguous on a machine that
    # runs local_ray too, so every process of this cluster is told where its own dashboard is.
    env["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{dashboard_port}"
    cluster = Cluster(f"127.0.0.1:{gcs_port}", env, hidden, temp_dir)
    try:
        # The head shares the driver's disk: the drivers run on the head pod.
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
    result = subprocess.run(
        [sys.executable, "-m", "emotions.cli", *args],
        cwd=cwd,
        env=driver_env(cluster, cwd),
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_S,
    )
    assert result.returncode == 0, f"emotions {args[0]} exited {result.returncode}:\n{result.stderr[-6000:]}"
    assert not (cwd / "s3:").exists(), "an s3:// URI was written to a local folder named s3:"
    return result


def driver_env(cluster: Cluster, cwd: Path) -> dict:
    """A driver's environment: RAY_ADDRESS names the cluster, its temporary folder is cwd/tmp."""
    (cwd / "tmp").mkdir(parents=True, exist_ok=True)
    return {**cluster.env, "RAY_ADDRESS": cluster.address, "TMPDIR": str(cwd / "tmp")}


def s3_fs() -> pafs.FileSystem:
    return pafs.FileSystem.from_uri("s3://emo")[0]


def s3_exists(uri: str) -> bool:
    fs, path = pafs.FileSystem.from_uri(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_json(uri: str) -> dict:
    fs, path = pafs.FileSystem.from_uri(uri)
    with fs.open_input_stream(path) as f:
        return json.loads(f.read())


PROBE = """
import json, os, sys
import ray

@ray.remote(num_cpus=0)
def probe(me, token, paths):
    import tempfile
    from huggingface_hub import constants
    from emotions.bundle_store import bundle_cache
    from emotions.onnx_model import cache_dir

    folders = {
        "tmp": tempfile.gettempdir(),
        "/tmp": "/tmp",
        "home": os.path.expanduser("~"),
        "hf": constants.HF_HOME,
        "emotions": str(cache_dir()),
        "bundles": str(bundle_cache()),
        "ray": ray._private.worker.global_worker.node.get_session_dir_path(),
    }
    for folder in folders.values():  # a file of this node's in each
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, f"{token}-{me}"), "w") as f:
            f.write(me)
    seen = [p for p in paths if os.path.exists(p)]
    return {"node": ray.get_runtime_context().get_node_id(), "folders": folders, "seen": seen}

ray.init(logging_level="ERROR")
token, workers, paths = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
found = {}
for me in workers:  # each pinned to its node by the node's own resource
    found[me] = ray.get(probe.options(resources={me: 0.01}).remote(me, token, paths[me]))
print("PROBE", json.dumps(found))
"""


def run_probe(cluster: Cluster, cwd: Path, token: str, paths: dict[str, list[str]]) -> dict:
    """PROBE's findings, per worker (``worker<i>`` -> what it saw of ``paths[worker<i>]``)."""
    result = subprocess.run(
        [sys.executable, "-c", PROBE, token, json.dumps(sorted(paths)), json.dumps(paths)],
        cwd=cwd,
        env=driver_env(cluster, cwd),
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_S,
    )
    assert result.returncode == 0, result.stderr[-6000:]
    return json.loads(next(x for x in result.stdout.splitlines() if x.startswith("PROBE "))[len("PROBE ") :])


def test_worker_nodes_share_no_disk_with_the_driver_or_each_other(cluster, tmp_path):
    """A task pinned to each worker node sees none of the files the driver wrote in /tmp, its
    caches (emotions, Hugging Face, XDG), its temporary root, /var/tmp or the head's Ray folder;
    its own such folders are its node's; and no worker sees another's."""
    token = f"emotions-mn-{secrets.token_hex(4)}"
    driver = [Path("/tmp"), *driver_folders(tmp_path), Path(cluster.temp_dir, "h")]
    made = [d for d in driver if not d.exists()]
    planted = [d / f"{token}-driver" for d in driver]
    workers = [f"worker{i}" for i in cluster.live_workers()]
    assert len(workers) == 2
    try:
        for d in made:
            d.mkdir(parents=True)
        for path in planted:
            path.write_text("driver")
        found = run_probe(cluster, tmp_path, token, {w: [str(p) for p in planted] for w in workers})
        assert len({f["node"] for f in found.values()}) == len(workers)
        for worker, f in found.items():
            assert f["seen"] == [], f"{worker} sees files of the driver's: {f['seen']}"
            own = cluster.own(int(worker[len("worker") :]))
            for name, folder in f["folders"].items():
                if name == "/tmp":  # the node's private /tmp: no file of it reaches this machine's
                    assert not Path("/tmp", f"{token}-{worker}").exists()
                    continue
                assert folder.startswith(NODE_ROOT + "/"), f"{worker}'s {name} folder is {folder}"
                outside = own / os.path.relpath(folder, NODE_ROOT) / f"{token}-{worker}"
                assert outside.read_text() == worker, f"{worker}'s {name} folder is not on its own disk"
        # Each worker looks for the others' files: where they wrote them (the same names on every
        # node), and in their disks as this machine sees them.
        others = {
            w: [
                p
                for other, f in found.items()
                if other != w
                for folder in f["folders"].values()
                for p in (
                    os.path.join(folder, f"{token}-{other}"),
                    str(cluster.own(int(other[len("worker") :])) / "tmp" / f"{token}-{other}"),
                )
            ]
            for w in workers
        }
        again = run_probe(cluster, tmp_path, token, others)
        for worker, f in again.items():
            assert f["seen"] == [], f"{worker} sees another worker's files: {f['seen']}"
    finally:
        for path in planted:
            path.unlink(missing_ok=True)
        for d in reversed(made):  # only if still empty
            with contextlib.suppress(OSError):
                d.rmdir()


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
    rows_in = 0
    for part in range(3):
        rows = TEXTS * (40 * (part + 1))
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
    assert manifest["rows_flagged"] == 2 * rows_in // len(TEXTS)  # [deleted] and null, kept and flagged


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


def write_dump(fs: pafs.FileSystem, folder: str, files: int, rows: int, prefix: str) -> set[str]:
    """``files`` Parquet files of ``rows`` rows each under ``folder`` (no scheme); -> their ids."""
    ids = set()
    for part in range(files):
        part_ids = [f"{prefix}-{part}-{i}" for i in range(rows)]
        body = pa.array([TEXTS[i % len(TEXTS)] for i in range(rows)], pa.string())
        pq.write_table(pa.table({"id": part_ids, "body": body}), f"{folder}/part-{part}.parquet", filesystem=fs)
        ids.update(part_ids)
    return ids


def check_tagged(fs: pafs.FileSystem, folder: str, ids: set[str]) -> dict:
    """``folder`` (no scheme) is committed with every row of ``ids`` exactly once; -> its manifest."""
    assert s3_exists(f"s3://{folder}/_SUCCESS"), folder
    manifest = read_json(f"s3://{folder}/_manifest.json")
    out = pq.read_table(folder, filesystem=fs, columns=["id"]).column("id").to_pylist()
    assert manifest["rows_in"] == manifest["rows_out"] == len(out) == len(ids), folder
    assert len(set(out)) == len(out), f"{folder}: {len(out) - len(set(out))} rows twice"
    assert set(out) == ids, folder
    return manifest


def live_claims(fs: pafs.FileSystem, folder: str) -> list[str]:
    """The lease claims under ``folder`` (no scheme) that have not expired (emotions.leases)."""
    infos = fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
    claims = {i.path: read_json(f"s3://{i.path}") for i in infos if i.is_file and i.base_name.endswith(".json")}
    return [path for path, claim in claims.items() if float(claim["expires"]) > time.time()]


def test_nightly_tags_each_date_of_s3_dumps_once(cluster, bundle, s3, tmp_path):
    """`emotions nightly` on date-partitioned dumps on S3: the two dates whose producer wrote its
    _SUCCESS are committed with every row once, no lease left held, the third waits for its
    marker; a re-run tags nothing."""
    fs = s3_fs()
    dates = ["2024-05-01", "2024-05-02"]
    ids = {}
    for n, date in enumerate([*dates, "2024-05-03"]):
        ids[date] = write_dump(fs, f"emo/mn/nightly/dumps/dt={date}", files=2, rows=150 * (n + 1), prefix=date)
        if date in dates:  # the last date's producer has not finished: no marker
            with fs.open_output_stream(f"emo/mn/nightly/dumps/dt={date}/_SUCCESS"):
                pass  # the producer's "this dump is complete", written last
    args = [
        "nightly",
        "--model",
        bundle,
        "--input",
        f"{s3}/mn/nightly/dumps/dt={{date}}/",
        "--output",
        f"{s3}/mn/nightly/tagged/dt={{date}}/",
        "--no-report",  # ~15 s less; test_tagging_reads_and_writes_s3_from_the_worker_nodes writes one
    ]
    first = emotions(cluster, tmp_path, *args)
    assert "nightly: tagged 2 date(s), 0 failed, 0 already committed" in first.stdout, first.stdout
    assert "waiting 2024-05-03: no _SUCCESS" in first.stdout, first.stdout
    for date in dates:
        check_tagged(fs, f"emo/mn/nightly/tagged/dt={date}", ids[date])
        assert live_claims(fs, f"emo/mn/nightly/tagged/dt={date}/_lease") == [], date
    assert not s3_exists(f"{s3}/mn/nightly/tagged/dt=2024-05-03")
    leases = fs.get_file_info(pafs.FileSelector("emo/mn/nightly/tagged/_leases"))
    assert {i.base_name.split(".")[0] for i in leases} == set(dates)  # each date was leased, and released:
    assert live_claims(fs, "emo/mn/nightly/tagged/_leases") == []
    committed = {d: read_json(f"{s3}/mn/nightly/tagged/dt={d}/_SUCCESS") for d in dates}

    again = emotions(cluster, tmp_path, *args)
    assert "nightly: tagged 0 date(s), 0 failed, 2 already committed" in again.stdout, again.stdout
    assert "waiting 2024-05-03" in again.stdout, again.stdout
    assert {d: read_json(f"{s3}/mn/nightly/tagged/dt={d}/_SUCCESS") for d in dates} == committed
    assert live_claims(fs, "emo/mn/nightly/tagged/_leases") == []


@pytest.mark.slow  # ~60-100 s (two cold actor starts); python -m pytest -m slow
def test_tagging_survives_a_worker_node_lost_mid_run(cluster, bundle, s3, tmp_path):
    """`emotions tag` on S3 loses a worker node (SIGKILL to all its processes) once it has staged
    tagged rows; a replacement joins. The run finishes (or a re-run does) with every row once."""
    fs = s3_fs()
    ids = write_dump(fs, "emo/mn/lost/dump", files=LOST_FILES, rows=LOST_ROWS, prefix="lost")
    args = ["tag", "--model", bundle, "--input", f"{s3}/mn/lost/dump/", "--output", f"{s3}/mn/lost/tagged"]
    args += ["--batch-size", "256", "--no-report"]
    with open(tmp_path / "tag.log", "w") as log:
        driver = subprocess.Popen(
            [sys.executable, "-m", "emotions.cli", *args],
            cwd=tmp_path,
            env=driver_env(cluster, tmp_path),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + COMMAND_TIMEOUT_S
        parts = pafs.FileSelector("emo/mn/lost/tagged/_staging/parts", recursive=True, allow_not_found=True)
        while not any(i.is_file for i in fs.get_file_info(parts)):
            assert driver.poll() is None, (tmp_path / "tag.log").read_text()[-6000:]
            assert time.monotonic() < deadline, "no part file was staged"
            time.sleep(0.2)
        assert not s3_exists(f"{s3}/mn/lost/tagged/_SUCCESS")
        lost = cluster.live_workers()[0]
        kill_node(cluster.workers[lost])  # a tagging node dies mid-run
        cluster.add_worker()  # ... and is replaced, as KubeRay replaces a pod
        driver.wait(timeout=COMMAND_TIMEOUT_S)
    finally:
        if driver.poll() is None:
            driver.kill()
    output = (tmp_path / "tag.log").read_text()
    if driver.returncode != 0:  # a run that fails this way commits nothing; a re-run finishes it
        assert not s3_exists(f"{s3}/mn/lost/tagged/_SUCCESS"), output[-6000:]
        print(f"the run that lost a node exited {driver.returncode}; re-running:\n{output[-3000:]}")
        emotions(cluster, tmp_path, *args)
    check_tagged(fs, "emo/mn/lost/tagged", ids)
