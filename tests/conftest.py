"""Shared fixtures: one real local Ray for the whole session, and one smoke-trained bundle."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")


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
