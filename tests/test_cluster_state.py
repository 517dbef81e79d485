"""The one Ray room (emotions/cluster.py): what it reads from a real local Ray, and where it finds
the autoscaler's largest cluster, which Ray 2.60 has no public API for.

Three sources, in order (``cluster.node_groups``): a ``ClusterConfig`` proto in the GCS's internal
key-value store (where Ray Train and Ray Data look; autoscalers that report their config write it,
Ray 2.60's own do not: the pinning test writes it there and checks it is read back, so a Ray
upgrade that moves it fails here, not on a cluster), ``EMOTIONS_NODE_GROUPS`` (the KubeRay
manifests set it; ``tests/test_cluster.py`` keeps it equal to their worker groups), and the cluster
launcher's ``~/ray_bootstrap_config.yaml`` (read here from the launcher config this repository
ships).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from emotions import cluster
from emotions.config import ConfigError, ScalingSettings
from emotions.tagging.actor_plan import plan_actors
from emotions.tagging.settings import TaggingSettings

LAUNCHER = Path(__file__).resolve().parents[1] / "cluster" / "launcher" / "aws-gpu.yaml"

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
    scaling, how = cluster.resolve_scaling(ScalingSettings(use_gpu=True), up, at_max)
    assert (scaling.num_workers, scaling.cpus_per_worker) == (4, 8)
    assert "autoscaler's maximum" in how


@pytest.fixture
def no_launcher_config(monkeypatch, tmp_path):
    """A home without the cluster launcher's config, and no EMOTIONS_NODE_GROUPS."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv(cluster.NODE_GROUPS_ENV, raising=False)
    return tmp_path


def test_a_kuberay_head_reads_the_worker_groups_its_manifest_declares(local_ray, no_launcher_config, monkeypatch):
    """What a RayCronJob's head sees at 02:30: itself only (here, the local node), and the groups
    its manifest declares. The pool is planned for 4 GPUs, not for one 1-CPU node."""
    groups = [
        {"group": "gpu", "maxReplicas": 4, "resources": {"CPU": 7, "GPU": 1}},
        {"group": "cpu", "maxReplicas": 2, "resources": {"CPU": 8}},
    ]
    monkeypatch.setenv(cluster.NODE_GROUPS_ENV, json.dumps(groups))
    up, at_max = cluster.nodes()
    assert at_max == [{"CPU": 7.0, "GPU": 1.0}] * 4 + [{"CPU": 8.0}] * 2
    assert cluster.resources()[1] == {"CPU": 44.0, "GPU": 4.0}
    plan = plan_actors(TaggingSettings(model="m", output="o", gpus_per_actor=1), [{"CPU": 0.0}], at_max)
    assert (plan.min_actors, plan.initial_actors, plan.max_actors, plan.cpus_reserved) == (1, 4, 4, 1.0)
    # An unbounded group: the largest cluster is unknown, and its resources count without bound.
    groups[1]["maxReplicas"] = -1
    monkeypatch.setenv(cluster.NODE_GROUPS_ENV, json.dumps(groups))
    assert cluster.nodes()[1] is None and cluster.resources()[1]["CPU"] > 1e9


@pytest.mark.parametrize(
    "value",
    ['{"group": "gpu"}', "gpu=4", '[{"group": "gpu", "maxReplicas": "four", "resources": {}}]', "[{}]"],
)
def test_a_malformed_node_groups_variable_is_refused_with_its_form(local_ray, no_launcher_config, monkeypatch, value):
    monkeypatch.setenv(cluster.NODE_GROUPS_ENV, value)
    with pytest.raises(ConfigError, match=r"EMOTIONS_NODE_GROUPS is not a list of worker groups.*e\.g\. \[\{"):
        cluster.nodes()


def test_a_launcher_head_reads_the_node_types_of_its_bootstrap_config(local_ray, no_launcher_config):
    """``ray up`` leaves its config on the head as ~/ray_bootstrap_config.yaml: the shipped
    launcher config, read there, gives its worker types at their max_workers (not the head)."""
    shutil.copy(LAUNCHER, no_launcher_config / "ray_bootstrap_config.yaml")
    groups = {g.name: (g.max_count, g.resources) for g in cluster.node_groups()}
    assert groups == {
        "gpu": (8, {"CPU": 8.0, "GPU": 1.0}),
        "gpu4": (1, {"CPU": 48.0, "GPU": 4.0}),
        "cpu": (4, {"CPU": 8.0}),
    }
    assert cluster.resources()[1] == {"CPU": 8 * 8 + 48 + 4 * 8.0, "GPU": 12.0}
    # The 4-GPU training layout fits a node the autoscaler can bring: not refused, not warned about.
    s = ScalingSettings(use_gpu=True, num_workers=4, placement="strict_pack")
    assert cluster.resolve_scaling(s, *cluster.nodes())[0].num_workers == 4
    # A node type without resources (filled in from its instance type at run time): unknown.
    (no_launcher_config / "ray_bootstrap_config.yaml").write_text(
        "head_node_type: head\navailable_node_types:\n  head: {resources: {CPU: 0}}\n  w: {max_workers: 2}\n"
    )
    assert cluster.node_groups() is None and cluster.nodes()[1] is None


def test_the_gcs_record_comes_before_the_variable(autoscaler_record, monkeypatch):
    monkeypatch.setenv(cluster.NODE_GROUPS_ENV, '[{"group": "x", "maxReplicas": 1, "resources": {"CPU": 1}}]')
    assert len(cluster.nodes()[1]) == 6
