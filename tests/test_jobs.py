"""The jobs in jobs/ submitted to a real Ray head through the Ray Jobs API, as on a cluster.

The fixture starts its own head with `ray start --head --block` (separate ports, worker-port range
and temp dir), so it coexists with the session's `local_ray` (started by `ray.init` in this
process). It is stopped by SIGTERM to that `ray start` process, which shuts down exactly the
processes it started; `ray stop` is not used because it kills every Ray process on the machine,
`local_ray`'s included. The head runs with token authentication and a token of its own, which the
Jobs API client sends and every process of the head (job drivers included) inherits.

Jobs are submitted like `ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml`:
the working_dir upload with the file's excludes and env_vars (HF_HOME pointed at a temporary
folder). The entry point is `python jobs/X.py`, and `python` resolves to this interpreter because
its folder leads the head's PATH, so the job finds this environment's installed packages.
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

import pytest
import yaml
from ray_nodes import free_port, free_port_range, stop_node

ROOT = Path(__file__).resolve().parents[1]
JOB_TIMEOUT_S = 240
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


@dataclass(frozen=True)
class HeadAPI:
    """Where the head's Jobs API listens and the headers it needs (the auth token)."""

    address: str
    headers: dict = field(repr=False)  # holds the token: kept out of test reports

    def client(self):
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.address, headers=self.headers)


@pytest.fixture(scope="module")
def ray_head_process():
    """A Ray head (2 CPUs, dashboard on) started with `ray start --head --block`; yields the
    Jobs API address and token. Stopped by SIGTERM to that process, not `ray stop` (see module
    docstring)."""
    # Short path: Ray's Unix sockets live under it and AF_UNIX paths are limited to 107 bytes.
    temp_dir = tempfile.mkdtemp(prefix="rayjobs-", dir="/tmp")
    gcs, dashboard, client, agent = (free_port() for _ in range(4))
    low, high = free_port_range()
    # Token auth with a token of its own: Ray 2.60 turns auth on for `ray start` whenever
    # ~/.ray/auth_token exists, so be explicit instead of depending on this machine's home folder.
    # Every process of the head, job drivers included, inherits the token from this environment.
    token = secrets.token_hex(16)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH")}
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=token,
        RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",  # SIGTERM stops at once (default: 30 s drain)
        RAY_ENABLE_UV_RUN_RUNTIME_ENV="0",
        RAY_USAGE_STATS_ENABLED="0",
    )
    command = [
        sys.executable,
        "-m",
        "ray.scripts.scripts",
        "start",
        "--head",
        "--block",
        "--num-cpus=2",
        "--num-gpus=0",
        f"--port={gcs}",
        f"--dashboard-port={dashboard}",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--ray-client-server-port={client}",
        f"--dashboard-agent-listen-port={agent}",
        f"--min-worker-port={low}",
        f"--max-worker-port={high}",
        "--object-store-memory=300000000",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
    ]
    log_path = Path(temp_dir) / "ray-start.log"
    with open(log_path, "w") as log:
        head = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=temp_dir, start_new_session=True
        )
    head_api = HeadAPI(f"http://127.0.0.1:{dashboard}", {"Authorization": f"Bearer {token}"})
    try:
        deadline = time.monotonic() + 120
        while True:
            if head.poll() is not None:
                raise RuntimeError(f"`ray start --head` exited with {head.returncode}:\n{log_path.read_text()}")
            try:
                head_api.client().list_jobs()
                break
            except Exception as exc:  # not up yet: connection refused, 503 while starting
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"no Jobs API at {head_api.address} after 120 s ({exc!r}):\n{log_path.read_text()}"
                    ) from exc
                time.sleep(1)
        yield head_api
    finally:
        stop_node(head)
        shutil.rmtree(temp_dir, ignore_errors=True)


def job_runtime_env(hf_home: Path) -> dict:
    """jobs/runtime_env.yaml for a submission from this checkout (HF_HOME made local)."""
    env = yaml.safe_load((ROOT / "jobs" / "runtime_env.yaml").read_text())
    return {
        "working_dir": str(ROOT),
        "excludes": env["excludes"],
        "env_vars": {**env["env_vars"], "HF_HOME": str(hf_home)},
    }


def run_job(head: HeadAPI, entrypoint: str, runtime_env: dict) -> tuple[str, str]:
    """Submit, wait for a terminal state (stopping the job on timeout); return (status, logs)."""
    client = head.client()
    job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)
    deadline = time.monotonic() + JOB_TIMEOUT_S
    status = str(client.get_job_status(job_id).value)
    while status not in TERMINAL and time.monotonic() < deadline:
        time.sleep(2)
        status = str(client.get_job_status(job_id).value)
    if status not in TERMINAL:
        client.stop_job(job_id)
        status = f"TIMEOUT after {JOB_TIMEOUT_S} s"
    return status, client.get_job_logs(job_id)


@pytest.fixture(scope="module")
def training_job(ray_head_process, tmp_path_factory):
    """The smoke training job, submitted once: (status, logs, bundle folder, runs folder, runtime_env)."""
    tmp = tmp_path_factory.mktemp("training-job")
    runtime_env = job_runtime_env(tmp / "hf")
    bundle_dir, runs = tmp / "bundle", tmp / "runs"
    entrypoint = (
        f"python jobs/train.py --preset smoke --output {bundle_dir} run.storage_path={runs} run.name=jobs-smoke"
    )
    status, logs = run_job(ray_head_process, entrypoint, runtime_env)
    return status, logs, bundle_dir, runs, runtime_env


def test_training_job_writes_a_bundle_that_predicts(training_job):
    from emotions.bundle import load_bundle
    from emotions.labels import EMOTIONS

    status, logs, bundle_dir, runs, _ = training_job
    assert status == "SUCCEEDED", f"training job {status}; its logs:\n{logs[-8000:]}"
    assert f"bundle: {bundle_dir}" in logs
    assert "stage1 epoch 1/2 done" in logs and "samples/s" in logs  # workers' progress reaches `ray job logs`

    bundle = load_bundle(bundle_dir)  # verifies every file against manifest.json
    texts = ["Thank you so much, this made my day!", "This is the worst thing that ever happened."]
    probs = bundle.predict_proba(texts)
    assert probs.shape == (2, len(EMOTIONS)) and ((probs >= 0) & (probs <= 1)).all()
    assert len(bundle.predict(texts)) == 2
    assert bundle.config["run"]["storage_path"] == str(runs)  # the KEY=VALUE override reached the job
    assert any((runs / "jobs-smoke").glob("checkpoint_*")), "no Ray Train checkpoint under run.storage_path"


@pytest.mark.slow  # 40 s; nightly on a real Ray runs in CI (test_nightly.py); python -m pytest -m slow
def test_nightly_job_tags_the_untagged_night_and_a_rerun_changes_nothing(ray_head_process, training_job, tmp_path):
    status, logs, bundle_dir, _, runtime_env = training_job
    if status != "SUCCEEDED":
        pytest.fail("the training job failed, so there is no bundle to tag with (see the training test)")
    check_nightly_job(ray_head_process, runtime_env, bundle_dir, tmp_path)


def check_nightly_job(head: HeadAPI, runtime_env: dict, bundle_dir: Path, tmp_path: Path) -> None:
    """A dump root with two nights, one already committed: the job (no --date) tags the other;
    a second run finds nothing to do, exits 0 and leaves the output as it was."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    committed, day = "2026-01-14", "2026-01-15"
    dump = tmp_path / "dumps" / f"dt={day}"
    dump.mkdir(parents=True)
    texts = ["I love this so much", "why would you do that", "thanks, that helps", "meh", "[deleted]"]
    for part in range(2):
        rows = texts * (part + 2)
        pq.write_table(
            pa.table({"id": [f"{part}-{i}" for i in range(len(rows))], "body": rows}), dump / f"part-{part}.parquet"
        )
    (tmp_path / "dumps" / f"dt={committed}").mkdir()
    pq.write_table(
        pa.table({"id": ["x"], "body": ["an earlier night"]}), tmp_path / "dumps" / f"dt={committed}" / "part-0.parquet"
    )
    for date in (committed, day):  # the producer's marker, written last: the dumps are complete
        (tmp_path / "dumps" / f"dt={date}" / "_SUCCESS").write_text("")
    (tmp_path / "tagged" / f"dt={committed}").mkdir(parents=True)
    (tmp_path / "tagged" / f"dt={committed}" / "_SUCCESS").write_text('{"run_id": "an earlier night"}')
    rows_in = 2 * len(texts) + 3 * len(texts)
    tagged = tmp_path / "tagged" / f"dt={day}"
    entrypoint = (
        f"python jobs/tag_nightly.py --model {bundle_dir} --input '{tmp_path}/dumps/dt={{date}}/' "
        f"--output '{tmp_path}/tagged/dt={{date}}/' --lease-settle 0.5 --no-report"
    )

    status, logs = run_job(head, entrypoint, runtime_env)
    assert status == "SUCCEEDED", f"tagging job {status}; its logs:\n{logs[-8000:]}"
    assert f"tagged {day}: tagged {rows_in} rows" in logs and "1 already committed" in logs, logs[-4000:]
    assert (tagged / "_SUCCESS").exists(), f"no _SUCCESS in {sorted(p.name for p in tagged.iterdir())}"
    manifest = json.loads((tagged / "_manifest.json").read_text())
    files = sorted(tagged.glob("*.parquet"))
    assert len(files) == 2 and sum(pq.read_metadata(f).num_rows for f in files) == rows_in
    assert manifest["rows_in"] == manifest["rows_out"] == rows_in
    assert manifest["rows_flagged"] == 5  # the "[deleted]" rows keep their id, get no labels
    assert not (tmp_path / "tagged" / f"dt={committed}" / "_manifest.json").exists()  # never re-tagged
    assert not (tagged / "_report.md").exists()  # --no-report reached tag_corpus (the report is tested there)

    # The next night (or a retry after a late failure) finds nothing to do: a success that
    # rewrites nothing and leaves no lease behind.
    before = {str(f): f.stat().st_mtime_ns for f in (tmp_path / "tagged").rglob("*")}
    status, logs = run_job(head, entrypoint, runtime_env)
    assert status == "SUCCEEDED", f"re-running a tagged root: {status}\n{logs[-4000:]}"
    assert "nightly: tagged 0 date(s), 0 failed, 2 already committed" in logs, logs[-4000:]
    assert {str(f): f.stat().st_mtime_ns for f in (tmp_path / "tagged").rglob("*")} == before
