"""The one Ray room (emotions/cluster.py): what it reads from a real local Ray, and the internal
call it keeps because Ray 2.60 has no public API for the autoscaler's largest cluster.

The autoscaler (v2) publishes its node groups as a ``ClusterConfig`` proto in the GCS's internal
key-value store; Ray Train reads them from there to size elastic worker groups, and so does
``cluster.nodes()``. The pinning test writes that record where the autoscaler writes it and
checks that the room reads it back: if a Ray upgrade moves it, this test fails, not a cluster.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from emotions import cluster

PACKAGE = Path(cluster.__file__).parent


def test_only_the_ray_room_starts_ray_or_reads_rays_internals():
    """``ray.init`` and ``ray._private`` appear in emotions/cluster.py and nowhere else."""
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "cluster.py" and path.parent == PACKAGE:
            continue
        text = path.read_text()
        if re.search(r"ray\.init\(|ray\._private|checkpoint_manager_snapshot", text):
            offenders.append(str(path.relative_to(PACKAGE.parent)))
    assert offenders == []


def test_a_local_ray_without_an_autoscaler_is_sized_by_its_nodes_up(local_ray):
    up, at_max = cluster.nodes()
    assert [node["CPU"] for node in up] == [2.0]
    assert at_max is None
    now, largest = cluster.resources()
    assert now["CPU"] == 2.0 and largest is None
    assert cluster.node_cpus() == [2.0]


@pytest.fixture
def autoscaler_record(local_ray):
    """Publish an autoscaler's node groups (2 x 8-CPU workers, 4 x 1-GPU nodes) where Ray's
    autoscaler v2 publishes them; removed afterwards."""
    from ray._raylet import GCS_AUTOSCALER_CLUSTER_CONFIG_KEY, GCS_AUTOSCALER_STATE_NAMESPACE
    from ray.core.generated.autoscaler_pb2 import ClusterConfig
    from ray.experimental.internal_kv import _internal_kv_del, _internal_kv_put

    config = ClusterConfig()
    cpu = config.node_group_configs.add(max_count=2)
    cpu.resources["CPU"] = 8
    gpu = config.node_group_configs.add(max_count=4)
    gpu.resources.update({"CPU": 8, "GPU": 1})
    key, namespace = GCS_AUTOSCALER_CLUSTER_CONFIG_KEY.encode(), GCS_AUTOSCALER_STATE_NAMESPACE.encode()
    _internal_kv_put(key, config.SerializeToString(), overwrite=True, namespace=namespace)
    yield
    _internal_kv_del(key, namespace=namespace)


def test_the_autoscalers_largest_cluster_is_read_where_the_autoscaler_publishes_it(autoscaler_record):
    up, at_max = cluster.nodes()
    assert [node["CPU"] for node in up] == [2.0]
    assert at_max == [{"CPU": 8.0}] * 2 + [{"CPU": 8.0, "GPU": 1.0}] * 4
    _, largest = cluster.resources()
    assert largest == {"CPU": 48, "GPU": 4}
    # and the layout training picks from it: one worker per GPU at the maximum
    from emotions.config import ScalingSettings

    scaling, how = cluster.resolve_scaling(ScalingSettings(use_gpu=True), up, at_max)
    assert (scaling.num_workers, scaling.cpus_per_worker) == (4, 8)
    assert "autoscaler's maximum" in how
