"""What DDP sends between workers each step: gradients in 32 bits, or compressed to 16.

Every optimizer step all-reduces the gradient of every trained parameter. For bert-base that is
110M fp32 values, 438 MB, and a ring all-reduce moves 2(N-1)/N of it in and out of each of N
workers: 657 MB per worker per step with 4 workers. Over a 10 Gbit/s pod link that is 0.53 s a
step at line rate, against ~45 ms of compute for a batch of 32 x 128 tokens on an A10G (the
arithmetic, with sources: docs/cluster.md, "Step time"). So GPU workers on several nodes are
bound by the network, and compressing the gradients to 16 bits halves the bound
(``torch.distributed.algorithms.ddp_comm_hooks.default_hooks``: each bucket is cast to 16 bits,
all-reduced, divided by the world size and cast back, so the optimizer still sees fp32).

    scaling.gradient_compression ──compression_hook(setting, use_gpu, nodes)──▶ "bf16" | "fp16" | None
    the DDP model ──compress_gradients(net, setting, use_gpu)──▶ the hook registered (rank 0 logs it)

bf16 keeps fp32's exponent range (no overflow, no loss scaling) and is the choice on GPUs; its
hook needs NCCL, so CPU workers (gloo) take fp16, whose hook runs on gloo.
"""

from __future__ import annotations

import logging

from torch import nn

log = logging.getLogger("emotions.training")


def compression_hook(setting: str, use_gpu: bool, nodes: int) -> str | None:
    """The 16-bit format DDP should all-reduce gradients in, or None for fp32: ``setting`` is
    scaling.gradient_compression; ``nodes`` is how many nodes the worker group spans. auto
    compresses (bf16) only where the network bounds the step: GPU workers on several nodes."""
    if setting == "auto":
        return "bf16" if use_gpu and nodes > 1 else None
    if setting == "none":
        return None
    return setting


def compress_gradients(net: nn.Module, setting: str, use_gpu: bool, world: int, local_world: int) -> str | None:
    """Register the hook ``compression_hook`` picks on ``net`` (a DistributedDataParallel model of
    ``world`` workers, ``local_world`` of them on this worker's node). Returns what was chosen."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    nodes = max(1, -(-world // max(1, local_world)))  # ceil: the last node may hold fewer workers
    hook = compression_hook(setting, use_gpu, nodes)
    if hook is not None:
        net.register_comm_hook(
            None, default_hooks.bf16_compress_hook if hook == "bf16" else default_hooks.fp16_compress_hook
        )
    log.debug("gradients all-reduced in %s (%d workers on %d node(s))", hook or "fp32", world, nodes)
    return hook
