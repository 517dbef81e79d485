"""Shared fixtures: one real local Ray for the whole session, one smoke-trained bundle, and a
real S3 API on localhost (moto's server) for every test that touches object storage.

The S3 variables are set when this file is imported, before any Ray process starts, so every
Ray worker (local_ray's and the multi-node cluster's) inherits them the way pods inherit their
environment: only the standard AWS variables, nothing project-specific.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from importlib import metadata

import pytest
from ray_nodes import free_port

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
# Ray Train's controller checks on its workers every 2 s and waits out that interval in each of its
# states, so every run of a few seconds pays several of them: a smoke `emotions train` took 47-49 s
# at 2 s and 34-40 s at 0.5 s (2-core machine). Every Ray process of the session inherits this, the
# nodes and job heads the tests start included. Training itself does not read it.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")

# tests/test_crashes.py arms this file to make the process reaching a named step die there
# (emotions/tagging/crashpoints.py); set before any Ray process starts, so every worker has it.
os.environ.setdefault("EMOTIONS_CRASH_FILE", os.path.join(tempfile.mkdtemp(prefix="emotions-crash-"), "crash"))
# The ONNX exports and precision checks cached per machine (emotions/onnx_model.py): the session's own.
os.environ.setdefault("EMOTIONS_CACHE", tempfile.mkdtemp(prefix="emotions-cache-"))

S3_BUCKET = "emo"  # created by the s3 fixture; tests write under s3://emo/<their own prefix>
MOTO_MIN_VERSION = (5, 2, 5)  # 5.2.1 fails pyarrow's upload of an empty object (Ray Train's marker)


S3_PORT = free_port()
os.environ.update(
    AWS_ENDPOINT_URL=f"http://127.0.0.1:{S3_PORT}",
    AWS_ACCESS_KEY_ID="testing",
    AWS_SECRET_ACCESS_KEY="testing",
    AWS_DEFAULT_REGION="us-east-1",
    AWS_EC2_METADATA_DISABLED="true",
)


@pytest.fixture(scope="session")
def s3():
    """moto's S3 server (this venv's own, >= 5.2.5) on localhost with the bucket ``emo``; yields
    the ``s3://emo`` prefix. Stopped at the end of the session."""
    version = tuple(int(p) for p in metadata.version("moto").split(".")[:3])
    if version < MOTO_MIN_VERSION:
        pytest.fail(
            f"moto {metadata.version('moto')} is too old for pyarrow's empty-object uploads; "
            "install the test extra: pip install -e '.[test]'"
        )
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(S3_PORT)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        import boto3

        client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
        deadline = time.monotonic() + 60
        while True:
            try:
                client.create_bucket(Bucket=S3_BUCKET)
                break
            except Exception:  # not listening yet
                if server.poll() is not None or time.monotonic() > deadline:
                    raise
                time.sleep(0.3)
        yield f"s3://{S3_BUCKET}"
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.fixture(scope="session")
def local_ray():
    """A real local Ray instance (2 CPUs), started once per test session."""
    import ray

    ray.init(num_cpus=2)  # with the dashboard: Ray Train's state queries need it
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def runs_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="session")
def smoke_bundle(local_ray, runs_dir, tmp_path_factory):
    """A bundle trained with the smoke preset on 2 Ray Train workers (seconds)."""
    from emotions.config import build_config
    from emotions.training import train

    config = build_config("smoke", overrides=[f"run.storage_path={runs_dir}"])
    return train(config, tmp_path_factory.mktemp("smoke") / "bundle")
