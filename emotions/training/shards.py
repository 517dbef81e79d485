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
from emotions.precision import Device, autocast_dtype, describe_device, enable_tf32, needs_grad_scaler, runtime_label

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
    precision: str = "fp32"  # inference passes: "bf16" = autocast on a GPU with native bf16 (scaling.bf16)
    train_precision: str = "fp32"  # training steps: "bf16", "fp16" (GPUs without native bf16), "fp32"
    hardware: Device | None = None  # what decided them (precision.describe_device); None: a CPU


STEP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {dtype: name for name, dtype in STEP_DTYPES.items()} | {None: "fp32"}


def train_precision(config: TrainConfig, device: Device, rank: int = 0) -> str:
    """The precision of this worker's training steps on ``device``: "bf16", "fp16" or "fp32". On a GPU
    scaling.bf16 asks for reduced precision and ``precision.autocast_dtype`` decides: bfloat16
    where the GPU computes it natively (compute 8.0+), float16 with a gradient scaler on older ones
    (T4, V100). On CPU, scaling.cpu_bf16 (auto: where the CPU computes bf16 natively, ``device.bf16``)."""
    if device.kind == "cuda":
        steps = DTYPE_NAMES[autocast_dtype(device, config.scaling.bf16)]
        if steps == "fp16" and rank == 0:
            log.warning(
                "%s has no native bfloat16: training steps autocast to float16 with a gradient scaler "
                "(scaling.bf16=true); inference passes run float32",
                device,
            )
        return steps
    wanted = config.scaling.cpu_bf16
    native = device.bf16  # describe_device's: environment.cpu_has_bf16, as oneDNN sees the CPU
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
    dtype = STEP_DTYPES.get(shards.train_precision)
    return torch.autocast(shards.device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def step_scaler(shards: Shards) -> torch.amp.GradScaler | None:
    """The gradient scaler float16 steps need (``precision.needs_grad_scaler``), else None."""
    needed = needs_grad_scaler(STEP_DTYPES.get(shards.train_precision))
    return torch.amp.GradScaler(shards.device.type) if needed else None


def inference_precision(steps: str, device: Device) -> str:
    """The precision of a worker's validation and feature passes: bf16 where its steps are (on a
    GPU with native bf16), else fp32. Thresholds are fitted on fp32 outputs whatever this is
    (``scoring.threshold_probs``)."""
    return "bf16" if steps == "bf16" and device.kind == "cuda" else "fp32"


def worker_shards(loop_config: dict, config: TrainConfig) -> Shards:
    """This worker's rows of the data the driver put in the object store, and its device."""
    environment.setup_logging()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(config.scaling.cpus_per_worker)
    train_set, device = ray.get(loop_config["train"]), ray.train.torch.get_device()
    hardware = describe_device(device)
    steps = train_precision(config, hardware, rank)
    enable_tf32(hardware)  # the steps' float32 matmuls; inference passes stay IEEE (run_rows)
    if rank == 0:
        log.info("training steps on %s in %s", hardware, runtime_label(steps, hardware))
    return Shards(
        train=train_set.shard(rank, world, equal=True),
        validation=ray.get(loop_config["validation"]).shard(rank, world, equal=False),
        pad_id=loop_config["pad_id"],
        device=device,
        rank=rank,
        world=world,
        validation_source=loop_config.get("validation_source", ""),
        positive_rates=train_set.labels.mean(0),
        precision=inference_precision(steps, hardware),  # CPU: inference in float32
        train_precision=steps,
        hardware=hardware,
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
