"""How DDP workers are laid out and what they send each step (emotions.training.distributed)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

from emotions.cluster import describe_layout
from emotions.config import ConfigError, ScalingSettings, build_config
from emotions.training.distributed import compress_gradients, compression_hook


@pytest.mark.parametrize(
    "setting, use_gpu, nodes, expected",
    [
        ("auto", True, 4, "bf16"),  # GPU workers across nodes: the network bounds the step
        ("auto", True, 1, None),  # one multi-GPU node: NCCL over PCIe/NVLink, nothing to gain
        ("auto", False, 3, None),  # CPU workers: compute bounds the step
        ("none", True, 4, None),
        ("fp16", False, 2, "fp16"),
        ("bf16", True, 1, "bf16"),
    ],
)
def test_gradients_are_compressed_where_the_network_bounds_the_step(setting, use_gpu, nodes, expected):
    assert compression_hook(setting, use_gpu, nodes) == expected


def test_bf16_compression_on_cpu_workers_is_refused_with_the_fix():
    with pytest.raises(ConfigError, match="gradient_compression.*NCCL.*fp16 or none"):
        build_config("smoke", overrides=["scaling.gradient_compression=bf16"])
    config = build_config("bert-base", overrides=["scaling.gradient_compression=bf16", "scaling.placement=strict_pack"])
    assert (config.scaling.gradient_compression, config.scaling.placement) == ("bf16", "strict_pack")
    with pytest.raises(ConfigError, match="placement"):
        build_config("smoke", overrides=["scaling.placement=scatter"])


def test_the_layout_line_names_placement_and_compression():
    scaling = ScalingSettings(num_workers=4, use_gpu=True, cpus_per_worker=11, placement="strict_pack")
    assert describe_layout(scaling).endswith("1 GPU each, placement strict_pack, gradient compression auto")


@pytest.fixture
def process_group():
    """A one-process gloo group: enough for DistributedDataParallel and its communication hooks."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("setting, compressed", [("fp16", True), ("none", False)])
def test_a_compressed_all_reduce_hands_the_optimizer_fp16_rounded_gradients(process_group, setting, compressed):
    torch.manual_seed(0)
    net = nn.parallel.DistributedDataParallel(nn.Linear(64, 28))
    hook = compress_gradients(net, setting, use_gpu=False, world=2, local_world=1)
    assert hook == ("fp16" if compressed else None)
    net(torch.randn(16, 64)).pow(2).sum().backward()
    grad = net.module.weight.grad
    assert grad.dtype == torch.float32  # the optimizer still steps in fp32
    assert torch.equal(grad, grad.half().float()) == compressed


def test_strict_pack_sizes_auto_to_the_largest_node_and_refuses_what_no_node_holds(caplog):
    from emotions.cluster import resolve_scaling

    up = [{"CPU": 0.0}]  # a KubeRay head at the start of a job
    at_max = [{"CPU": 8.0, "GPU": 1.0}] * 8 + [{"CPU": 48.0, "GPU": 4.0}]  # cluster/launcher/aws-gpu.yaml
    packed = ScalingSettings(use_gpu=True, placement="strict_pack")
    resolved, how = resolve_scaling(packed, up, at_max)
    assert (resolved.num_workers, resolved.cpus_per_worker) == (4, 12) and "largest single node" in how
    spread, _ = resolve_scaling(ScalingSettings(use_gpu=True), up, at_max)
    assert spread.num_workers == 12  # pack may span nodes: every GPU
    given = ScalingSettings(use_gpu=True, placement="strict_pack", num_workers=4, cpus_per_worker=4)
    assert resolve_scaling(given, up, at_max)[0].num_workers == 4
    too_many = ScalingSettings(use_gpu=True, placement="strict_pack", num_workers=8, cpus_per_worker=4)
    with pytest.raises(ConfigError, match="all 8 workers on one node, which needs 32 CPUs and 8 GPUs"):
        resolve_scaling(too_many, up, at_max)  # Ray Train would retry placing them without end
    with caplog.at_level("WARNING", logger="emotions.cluster"):
        resolve_scaling(too_many, up, None)  # no autoscaler seen: a node that large may still join
    assert "waits until such a node joins" in caplog.text
