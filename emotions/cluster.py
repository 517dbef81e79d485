"""The one module that talks to Ray's cluster state: connecting, what the nodes hold, and the
Ray Train worker layout those nodes allow.

    emotions CLI / jobs ──connect(address)──▶ ray.init (once per process)
    training ──nodes()──▶ resolve_scaling(config.scaling, up, at_max) ──▶ workers x CPUs, device
    tuning, head sweep ──resources()──▶ how many trials fit at once
    tagging ──nodes()──▶ plan_actors(settings, up, at_max) ──▶ an autoscaling actor pool, min..max
    head sweep ──node_cpus()──▶ threads of the feature task

Everything else in the package asks this module; nothing else imports ``ray._private``.

The autoscaler's largest cluster has no public API in Ray 2.60, and Ray 2.60's own autoscalers
(v1 and v2, on KubeRay and under the cluster launcher) do not publish it to the driver. So
``node_groups`` reads it from the first of: the ``ClusterConfig`` record in the GCS that Ray Train
and Ray Data read to size elastic work (written by autoscalers that report their config), the
``EMOTIONS_NODE_GROUPS`` variable the KubeRay manifests set on the head, and the cluster
launcher's ``~/ray_bootstrap_config.yaml`` on the head. ``tests/test_cluster_state.py`` pins each.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path

from emotions.config import AUTO, ConfigError, ScalingSettings

log = logging.getLogger(__name__)

NODE_GROUPS_ENV = "EMOTIONS_NODE_GROUPS"  # set on the head by cluster/kuberay/*.yaml
LAUNCHER_CONFIG = "~/ray_bootstrap_config.yaml"  # what `ray up` writes on the head for its autoscaler
NODE_GROUPS_EXAMPLE = '[{"group": "gpu", "maxReplicas": 4, "resources": {"CPU": 7, "GPU": 1}}]'


@dataclasses.dataclass(frozen=True)
class NodeGroup:
    """One autoscaling worker group: the Ray resources of each of its nodes, and how many of them
    the autoscaler may run at most (-1: no bound)."""

    name: str
    resources: dict[str, float]
    max_count: int


def connect(address: str | None = None) -> None:
    """Join the Ray cluster at ``address`` (None: ``RAY_ADDRESS``, else a new local Ray), once per
    process. Every command that needs Ray calls this; nothing else calls ``ray.init``."""
    import ray

    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=True)


def nodes() -> tuple[list[dict[str, float]], list[dict[str, float]] | None]:
    """(the resources of each node up now, of each worker node the autoscaler may run at its
    largest, or None where no autoscaler's groups are known or one is unbounded)."""
    import ray

    up = [node["Resources"] for node in ray.nodes() if node["Alive"]]
    groups = node_groups()
    if not groups or any(g.max_count < 0 for g in groups):
        return up, None
    return up, [dict(g.resources) for g in groups for _ in range(g.max_count)]


def resources() -> tuple[dict[str, float], dict[str, float] | None]:
    """(the Ray cluster's resources now, the most its autoscaler's worker groups may add up to, or
    None where none are known; an unbounded group's resources count as ``sys.maxsize``)."""
    import ray

    groups = node_groups()
    if not groups:
        return ray.cluster_resources(), None
    most: dict[str, float] = collections.defaultdict(float)
    for group in groups:
        for key, amount in group.resources.items():
            most[key] = sys.maxsize if group.max_count < 0 else most[key] + amount * group.max_count
    return ray.cluster_resources(), dict(most)


def resources_if_connected() -> dict[str, float]:
    """The cluster's resources now if this process is connected, else {}: what is up, without the
    autoscaler's groups (``node_groups``) that ``resources`` also reads."""
    import ray

    return ray.cluster_resources() if ray.is_initialized() else {}


def node_cpus() -> list[float]:
    """The CPUs of each alive node."""
    import ray

    return [float(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n["Alive"]]


def node_groups() -> list[NodeGroup] | None:
    """The autoscaler's worker groups, or None where none is known (a local Ray, a static
    cluster). Read from the first source that has them:

    1. Ray's ``ClusterConfig`` record in the GCS (internal API: what Ray Train 2.60 reads to size
       elastic worker groups, ``worker_group.py``, and Ray Data its cluster autoscaler). Ray
       2.60's own autoscalers do not write it; autoscalers that report their config do.
    2. ``EMOTIONS_NODE_GROUPS``: a JSON list of the worker groups (``group``, ``maxReplicas``, and
       the Ray ``resources`` of one pod), which the KubeRay manifests set on the head from their
       own ``workerGroupSpecs`` (a test keeps the two equal).
    3. The cluster launcher's config on the head (``~/ray_bootstrap_config.yaml``): every
       ``available_node_types`` entry but the head's, with its ``resources`` and ``max_workers``.
    """
    from ray._private.state import state

    try:
        config = state.get_cluster_config()
    except Exception:  # noqa: BLE001 - no GCS record: the other sources
        config = None
    if config is not None and config.node_group_configs:
        return [
            NodeGroup(g.name, {k: float(v) for k, v in g.resources.items()}, g.max_count)
            for g in config.node_group_configs
        ]
    if os.environ.get(NODE_GROUPS_ENV, "").strip():
        return parse_node_groups(os.environ[NODE_GROUPS_ENV])
    return launcher_node_groups(Path(LAUNCHER_CONFIG).expanduser())


def parse_node_groups(text: str) -> list[NodeGroup]:
    """``EMOTIONS_NODE_GROUPS``'s value -> its groups; ConfigError, with the form it takes, for
    anything else."""
    try:
        groups = [
            NodeGroup(
                str(g["group"]),
                {str(k): float(v) for k, v in g["resources"].items()},
                int(g["maxReplicas"]),
            )
            for g in json.loads(text)
        ]
    except (ValueError, TypeError, KeyError, AttributeError) as error:
        raise ConfigError(
            f"{NODE_GROUPS_ENV} is not a list of worker groups ({error!r} in {text!r}). It takes a JSON "
            f"list with one object per autoscaling worker group, e.g. {NODE_GROUPS_EXAMPLE}; unset it "
            "to plan from the nodes up now."
        ) from None
    if any(g.max_count < -1 or any(v < 0 for v in g.resources.values()) for g in groups):
        raise ConfigError(f"{NODE_GROUPS_ENV}: negative counts or resources in {text!r}")
    return groups


def launcher_node_groups(path: Path) -> list[NodeGroup] | None:
    """The worker node types of a cluster launcher config (what ``ray up`` leaves on the head for
    its autoscaler), or None where there is no such file or a type declares no ``resources`` (the
    launcher fills those in from the instance type at run time, which the driver cannot see)."""
    import yaml

    if not path.is_file():
        return None
    config = yaml.safe_load(path.read_text()) or {}
    types = config.get("available_node_types") or {}
    head = config.get("head_node_type")
    groups = []
    for name, spec in types.items():
        if name == head:
            continue
        if not spec.get("resources"):
            log.info("%s: node type %s declares no resources; the autoscaler's largest size is unknown", path, name)
            return None
        limit = spec.get("max_workers", config.get("max_workers", 2))
        groups.append(NodeGroup(name, {k: float(v) for k, v in spec["resources"].items()}, int(limit)))
    return groups or None


def check_state_api() -> None:
    """Ray Train frees a stopped trial's placement group through a cleaner that asks the state API
    (served by the dashboard) whether the trial's controller is alive. Without it, every trial
    Tune stops keeps its CPUs/GPUs and later trials wait forever for a worker group."""
    import ray
    from ray.util.state import list_actors

    try:
        # The connected cluster's own address: without one, the state API guesses among the Ray
        # instances on this machine and refuses when there are several.
        list_actors(address=ray.get_runtime_context().gcs_address, limit=1, timeout=10, raise_on_missing_output=False)
    except Exception as error:  # noqa: BLE001 - any failure means the same thing here
        raise RuntimeError(
            "Ray's state API is not reachable, so Ray Train could not free the resources of the "
            "trials Tune stops and the sweep would hang. Start Ray with its dashboard: "
            "`pip install 'ray[default]'` and `ray start --head` (or ray.init(include_dashboard=True)). "
            f"Underlying error: {error}"
        ) from error


# ----------------------------------------------------------------------------- Ray Train layout


def resolve_scaling(
    scaling: ScalingSettings, nodes_up: list[dict[str, float]], nodes_at_max: list[dict[str, float]] | None = None
) -> tuple[ScalingSettings, str]:
    """``scaling`` with every ``auto`` replaced by a number, and one line saying how it was chosen.

    ``nodes_up``: the resources of each node up now (``{"CPU": 8, "GPU": 1}``); ``nodes_at_max``:
    each node the autoscaler may run at its largest (None without an autoscaler). Of the two, the
    one that holds more workers is used. CPU training counts the nodes without GPUs (all nodes
    with CPUs if every node has a GPU). Explicit values are kept as given; ``cpus_per_worker``
    auto beside an explicit ``num_workers`` is 1, as it always was. ConfigError if auto finds no
    node to train on."""
    if scaling.num_workers != AUTO:
        cpus = 1 if scaling.cpus_per_worker == AUTO else scaling.cpus_per_worker
        resolved = dataclasses.replace(scaling, cpus_per_worker=cpus)
        if scaling.placement == "strict_pack":
            _check_one_node_holds(resolved, nodes_up, nodes_at_max)
        return resolved, f"{describe_layout(resolved)}: scaling.num_workers={scaling.num_workers} as given"
    choices = [("up now", nodes_up)] + ([("at the autoscaler's maximum", nodes_at_max)] if nodes_at_max else [])
    best = None
    for where, nodes in choices:
        layout = _layout_on(scaling, nodes)
        if layout and (best is None or layout[0] > best[0][0]):
            best = layout, where, nodes
    if best is None:
        raise ConfigError(_no_node_message(scaling, nodes_up, nodes_at_max))
    (workers, cpus, how), where, nodes = best
    resolved = dataclasses.replace(scaling, num_workers=workers, cpus_per_worker=cpus)
    return resolved, (
        f"{describe_layout(resolved)}: scaling.num_workers=auto, {how} (nodes {where}: {_describe_nodes(nodes)})"
    )


def describe_layout(scaling: ScalingSettings) -> str:
    """``2 workers x 1 CPU (1 torch thread each), CPU`` for concrete settings."""
    n, c = scaling.num_workers, scaling.cpus_per_worker
    device = "1 GPU each" if scaling.use_gpu else "CPU"
    layout = f"{n} worker{'s' * (n != 1)} x {c} CPU{'s' * (c != 1)} ({c} torch thread{'s' * (c != 1)} each), {device}"
    if n > 1:
        layout += f", placement {scaling.placement}, gradient compression {scaling.gradient_compression}"
    return layout


def _fits_one_node(scaling: ScalingSettings, node: dict[str, float]) -> bool:
    """Whether ``node`` alone holds every worker of concrete ``scaling`` (strict_pack)."""
    gpus_ok = not scaling.use_gpu or node.get("GPU", 0) >= scaling.num_workers
    return gpus_ok and node.get("CPU", 0) >= scaling.num_workers * scaling.cpus_per_worker


def _check_one_node_holds(scaling: ScalingSettings, nodes_up: list, nodes_at_max: list | None) -> None:
    """strict_pack puts every worker on one node. Ray Train retries a worker group it cannot place
    without end, so a layout no node can hold would wait forever: refused here when the autoscaler's
    largest cluster is known, warned about when only the nodes up now are."""
    if any(_fits_one_node(scaling, n) for n in [*nodes_up, *(nodes_at_max or [])]):
        return
    need = f"{scaling.num_workers * scaling.cpus_per_worker} CPUs" + (
        f" and {scaling.num_workers} GPUs" if scaling.use_gpu else ""
    )
    message = (
        f"scaling.placement=strict_pack puts all {scaling.num_workers} workers on one node, which needs "
        f"{need} on a single node ({describe_seen(nodes_up, nodes_at_max)})"
    )
    if nodes_at_max is None:
        log.warning("%s: Ray Train waits until such a node joins", message)
        return
    raise ConfigError(
        f"{message}; no node of this cluster can hold them. Lower scaling.num_workers (or "
        "scaling.cpus_per_worker), add a node group that large, or use scaling.placement=pack"
    )


def _layout_on(scaling: ScalingSettings, nodes: list[dict[str, float]]) -> tuple[int, int, str] | None:
    """(workers, CPUs per worker, how) for ``num_workers: auto`` on these nodes; None if none fits.
    With strict_pack, what the largest single node holds."""
    if scaling.placement == "strict_pack" and nodes:
        layouts = [_layout_on(dataclasses.replace(scaling, placement="pack"), [n]) for n in nodes]
        best = max((layout for layout in layouts if layout), default=None)
        return best and (best[0], best[1], f"{best[2]}, the largest single node (strict_pack)")
    auto_cpus = scaling.cpus_per_worker == AUTO
    if scaling.use_gpu:
        hosts = [n for n in nodes if n.get("GPU", 0) >= 1]
        if not hosts:
            return None
        per_gpu = min(max(1, int(n.get("CPU", 0) // n["GPU"])) for n in hosts)  # a node's CPUs per GPU
        cpus = per_gpu if auto_cpus else scaling.cpus_per_worker
        return sum(int(n["GPU"]) for n in hosts), cpus, f"one worker per GPU on {len(hosts)} GPU node(s)"
    hosts = [n for n in nodes if n.get("CPU", 0) >= 1 and not n.get("GPU")] or [
        n for n in nodes if n.get("CPU", 0) >= 1
    ]
    counts = sorted(int(n["CPU"]) for n in hosts)
    if not counts:
        return None
    if auto_cpus:
        how = "one worker per CPU node"
        if counts[0] != counts[-1]:
            how += (
                f"; the CPU nodes have {counts[0]} to {counts[-1]} CPUs and each worker takes the "
                f"smallest's {counts[0]} (set scaling.cpus_per_worker to choose)"
            )
        return len(counts), counts[0], how
    workers = sum(c // scaling.cpus_per_worker for c in counts)
    how = f"as many {scaling.cpus_per_worker}-CPU workers as the {len(counts)} CPU node(s) hold"
    return (workers, scaling.cpus_per_worker, how) if workers else None


def describe_seen(nodes_up: list[dict[str, float]], nodes_at_max: list[dict[str, float]] | None) -> str:
    """``nodes up now: 1 x (CPU 0); at the autoscaler's largest: 2 x (CPU 8, GPU 1)``: the two lists
    of ``nodes()`` a layout was chosen from, for messages and logs."""
    largest = f"at the autoscaler's largest: {_describe_nodes(nodes_at_max)}" if nodes_at_max else "no autoscaler seen"
    return f"nodes up now: {_describe_nodes(nodes_up)}; {largest}"


def _describe_nodes(nodes: list[dict[str, float]]) -> str:
    """``1 x (CPU 0), 2 x (CPU 8, GPU 1)``: how many nodes of each size."""
    sizes = collections.Counter(
        f"CPU {n.get('CPU', 0):g}" + (f", GPU {n['GPU']:g}" if n.get("GPU") else "") for n in nodes
    )
    return ", ".join(f"{count} x ({size})" for size, count in sizes.items()) or "none"


def _no_node_message(scaling: ScalingSettings, nodes_up: list, nodes_at_max: list | None) -> str:
    seen = describe_seen(nodes_up, nodes_at_max)
    if scaling.use_gpu:
        return (
            f"scaling.num_workers=auto with scaling.use_gpu=true found no GPU on this cluster ({seen}). "
            "Set scaling.use_gpu=false to train on CPUs, or scaling.num_workers=N to wait for N GPU "
            "workers."
        )
    if scaling.cpus_per_worker != AUTO:
        return (
            f"scaling.num_workers=auto found no node with scaling.cpus_per_worker={scaling.cpus_per_worker} "
            f"CPUs ({seen}). Lower scaling.cpus_per_worker, set it to auto (a whole node each), or set "
            "scaling.num_workers=N to wait for N workers."
        )
    return (
        f"scaling.num_workers=auto found no node with CPUs to train on ({seen}). Add CPU nodes (or "
        "connect to the cluster that has them: RAY_ADDRESS), or set scaling.num_workers=N and "
        "scaling.cpus_per_worker=C to wait for N workers of C CPUs."
    )
