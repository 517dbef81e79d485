"""A worker's share of the run: its rows of the data, its device, rank and precisions (``Shards``,
built by ``worker_shards``), and what every rank gathers from the others (``gather_rows``,
``describe_shards``).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from emotions import environment
from emotions.batching import TokenizedSet
from emotions.config import AUTO, TrainConfig

log = logging.getLogger("emotions.training")


@dataclass
class Shards:
    """A worker's view of the run: its rows of the data, its device, rank and precisions."""

    train: TokenizedSet
    validation: TokenizedSet
    pad_id: int
    device: torch.device
    rank: int
    world: int
    validation_source: str = ""
    positive_rates: np.ndarray | None = None  # [28] share of training rows with each label (all ranks' rows)
    precision: str = "fp32"  # inference passes: "bf16" = autocast on a GPU (scaling.bf16)
    train_precision: str = "fp32"  # training steps: "bf16" also on a CPU with scaling.cpu_bf16


def train_precision(config: TrainConfig, device: torch.device, rank: int = 0) -> str:
    """The precision of this worker's training steps, "bf16" or "fp32" (see ScalingSettings.cpu_bf16)."""
    if device.type == "cuda":
        return "bf16" if config.scaling.bf16 else "fp32"
    wanted = config.scaling.cpu_bf16
    native = environment.cpu_has_bf16()
    if wanted == AUTO:
        wanted = native
    if wanted and not native and rank == 0:
        log.warning(
            "scaling.cpu_bf16 is on but this CPU has no native bfloat16 (AVX512-BF16 or AMX): "
            "its training steps will be slower than in float32; set scaling.cpu_bf16=auto"
        )
    if rank == 0 and wanted:
        log.info("training steps under autocast to bfloat16 on CPU (scaling.cpu_bf16=%s)", config.scaling.cpu_bf16)
    return "bf16" if wanted else "fp32"


def step_autocast(shards: Shards) -> torch.autocast:
    """The autocast the training steps of ``shards``' worker run under (``train_precision``)."""
    return torch.autocast(shards.device.type, dtype=torch.bfloat16, enabled=shards.train_precision == "bf16")


def worker_shards(loop_config: dict, config: TrainConfig) -> Shards:
    """This worker's rows of the data the driver put in the object store, and its device."""
    environment.setup_logging()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(config.scaling.cpus_per_worker)
    train_set, device = ray.get(loop_config["train"]), ray.train.torch.get_device()
    steps = train_precision(config, device, rank)
    return Shards(
        train=train_set.shard(rank, world, equal=True),
        validation=ray.get(loop_config["validation"]).shard(rank, world, equal=False),
        pad_id=loop_config["pad_id"],
        device=device,
        rank=rank,
        world=world,
        validation_source=loop_config.get("validation_source", ""),
        positive_rates=train_set.labels.mean(0),
        precision=steps if device.type == "cuda" else "fp32",
        train_precision=steps,  # CPU: inference in float32
    )


def gather_rows(local: np.ndarray, index: np.ndarray, shards: Shards) -> np.ndarray:
    """Every worker's rows, put back in source order (duplicates from equal shards collapse)."""
    if shards.world == 1:
        parts = [(index, local)]
    else:
        parts = [None] * shards.world
        dist.all_gather_object(parts, (index, local))
    n = max(int(i.max()) for i, _ in parts if len(i)) + 1
    out = np.zeros((n, local.shape[1]), dtype=np.float32)
    for i, values in parts:
        out[i] = values
    return out


def describe_shards(shards: Shards) -> list[dict]:
    """Per rank: rows in its training shard and a digest of their source row numbers."""
    index = np.unique(shards.train.index)
    mine = {
        "rank": shards.rank,
        "rows": int(len(index)),
        "digest": hashlib.sha256(index.astype(np.int64).tobytes()).hexdigest()[:16],
    }
    if shards.world == 1:
        return [mine]
    everyone = [None] * shards.world
    dist.all_gather_object(everyone, mine)
    return everyone
