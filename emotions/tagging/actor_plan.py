"""How many tagging actors, and what each reserves from Ray (``plan_actors`` -> ``ActorPlan``).

    settings + nodes up now + nodes at the autoscaler's largest (``cluster.nodes()``)
        -> plan_actors -> ActorPlan: min..max actors (and how many start at once), CPUs reserved
           and torch threads each, GPUs each, Tokenizer actors and their CPUs, and why

Which nodes. The pool is planned over the nodes the autoscaler can run at its largest where they
are known (``cluster.node_groups``: a KubeRay cron starts on a head without CPUs or GPUs, its
workers scale from 0), else over the nodes up now; of the two, the one that holds more actors. Nodes without CPUs (such
a head) host no actor and no read task, and count for nothing.

Pool size. Ray Data's autoscaling actor pool (``ActorPoolStrategy(min_size, max_size,
initial_size)``, see ``emotions.tagging.pipeline``): at most what ``--actors`` asks for (default:
what the planned nodes hold), never more GPU actors than the autoscaler can ever provide; at least
``--min-actors`` (default 1), so a night that gets fewer GPUs than it asked for runs on those
instead of waiting for a full pool until its deadline; starting with the whole pool. Ray Data does
not wait for the actors it starts (only tasks wait, for an actor that is up), and each pending
actor is a demand the autoscaler answers at once: a cron that starts on a bare head gets all its
GPU nodes in parallel. A pool started with fewer grows only as Ray Data's cluster autoscaler
asks for more nodes, once the running actors are busy (``rate_based_cluster_autoscaler.py``, at
most doubling a request at a time): one wave of cold GPU pods (a 20 GB image pull each) after
another.

Actor sizing. Read and merge tasks need ``ROOM_CPUS`` on some node while the actors run; a pool
that reserves every CPU leaves them unschedulable and the pipeline hangs without a word. So by
default there is one actor per ``cpus_per_actor`` CPUs (per ``gpus_per_actor`` GPUs on GPU), each
running ``cpus_per_actor`` torch threads, but each *reserves* only so much that every node keeps
``ROOM_CPUS`` free when it hosts its share of the largest pool: on one 2-CPU node, 2 actors x 1
thread that reserve 0.75 CPU each; on 1-CPU nodes, one actor each reserving 0.5. Reads and merges
are light next to the encoder, so running them beside the actors costs little. A smaller pool (the
autoscaler has not brought every node yet) reserves the same per actor, so it leaves more room.

On GPU runs (or with ``tokenize_stage=True``) there is one Tokenizer actor per tagging actor,
reserving up to ``TOKENIZER_CPUS`` each (see ``emotions.tagging.pipeline``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from emotions.cluster import describe_seen
from emotions.tagging.settings import TaggingError, TaggingSettings

log = logging.getLogger("emotions.tagging")


READ_CPUS = 0.25  # per read task: decoding a few Parquet columns is light next to the encoder
TOKENIZER_CPUS = 1.0  # per Tokenizer actor, when tokenizing is a stage of its own
MERGE_CPUS = 0.25  # per merge task: reading parts and writing one file is I/O
ROOM_CPUS = READ_CPUS + MERGE_CPUS  # kept free on every node beside the actors (see Actor sizing)


@dataclass(frozen=True)
class ActorPlan:
    max_actors: int  # the pool's max_size: what the planned nodes hold, or --actors
    cpus_reserved: float  # per actor: what Ray schedules on (see the module docstring)
    gpus: float  # per actor
    threads: int  # torch threads per actor
    min_actors: int = 1  # the pool's min_size: the run goes on with these if no more can be had
    initial_actors: int = 1  # the pool's initial_size: all of it (see Pool size)
    tokenizers: int = 0  # the most Tokenizer actors ahead of the encoder (0: the actors tokenize)
    tokenizer_cpus: float = 0.0  # reserved per Tokenizer actor
    why: str = ""  # which nodes it was planned over, and what capped it (logged, and in the manifest)


def plan_actors(
    s: TaggingSettings, nodes_up: list[dict[str, float]], nodes_at_max: list[dict[str, float]] | None = None
) -> ActorPlan:
    """The actor pool for ``s`` on these nodes (``nodes_up``: the resources of each node up now,
    ``{"CPU": 8, "GPU": 1}``; ``nodes_at_max``: of each node the autoscaler may run at its
    largest, None without an autoscaler, as ``cluster.nodes()`` returns them). Reservations leave
    ROOM_CPUS on every node for the read and merge tasks, each node hosting its share of the
    largest pool. TaggingError for a GPU pool on a cluster whose autoscaler can bring no GPU, or
    for more --min-actors GPU actors than it can bring."""
    choices = [("up now", nodes_up)] + ([("at the autoscaler's largest", nodes_at_max)] if nodes_at_max else [])
    where, nodes = max(choices, key=lambda choice: _actors_held(s, choice[1]))  # ties: up now
    seen = describe_seen(nodes_up, nodes_at_max)
    cpus = [float(n.get("CPU", 0)) for n in nodes if n.get("CPU", 0) > 0]
    if not cpus:  # nothing known to hold an actor: plan as for one 1-CPU node, and say so
        log.warning("no node with CPUs (%s): planning the pool as for one 1-CPU node", seen)
        cpus = [1.0]
    held, now = _actors_held(s, nodes), _actors_held(s, nodes_up)
    smallest = s.min_actors or 1
    if s.gpus_per_actor > 0:
        largest, cap = _gpu_pool(s, held, nodes_at_max is not None, seen)
    else:
        largest = max(s.num_actors or max(1, held), smallest)
        cap = "as --actors asked" if s.num_actors else f"one per {s.cpus_per_actor} CPU(s) of the nodes {where}"
    stage = s.gpus_per_actor > 0 if s.tokenize_stage is None else s.tokenize_stage
    tokenizers = largest if stage else 0  # one CPU tokenizer keeps one GPU encoder fed (MiniLM)
    members, total = largest + tokenizers, sum(cpus)
    # A node of c CPUs hosts about members * c / total of the pool (Ray spreads the actors).
    room = [(c - ROOM_CPUS) / max(1, math.ceil(members * c / total)) for c in cpus if c > ROOM_CPUS]
    share = max(0.01, float(np.floor(100 * min(room or [0.01])) / 100))
    reserved = min(float(s.cpus_per_actor), share)
    if largest * s.cpus_per_actor > total:
        log.warning("%d actors x %d threads oversubscribe the %.0f CPUs planned for", largest, s.cpus_per_actor, total)
    why = f"{smallest}..{largest} actors ({cap}), all started at once (the nodes up now hold {now}); {seen}"
    return ActorPlan(
        max_actors=largest,
        cpus_reserved=reserved,
        gpus=s.gpus_per_actor,
        threads=s.cpus_per_actor,
        min_actors=smallest,
        initial_actors=largest,
        tokenizers=tokenizers,
        tokenizer_cpus=min(TOKENIZER_CPUS, share) if tokenizers else 0.0,
        why=why,
    )


def _actors_held(s: TaggingSettings, nodes: list[dict[str, float]]) -> int:
    """Actors these nodes hold at one per gpus_per_actor GPUs (GPU pools), else one per
    cpus_per_actor CPUs."""
    if s.gpus_per_actor > 0:
        return sum(int(n.get("GPU", 0) // s.gpus_per_actor) for n in nodes)
    return sum(int(n.get("CPU", 0) // s.cpus_per_actor) for n in nodes)


def _gpu_pool(s: TaggingSettings, held: int, bounded: bool, seen: str) -> tuple[int, str]:
    """(the most GPU actors, why). ``held``: what the planned nodes hold; ``bounded``: the
    autoscaler's largest cluster is known, so no more GPUs than ``held`` can ever come."""
    asked, smallest = s.num_actors, s.min_actors or 1
    if bounded and held == 0:
        raise TaggingError(
            f"--gpus-per-actor {s.gpus_per_actor:g} asks for GPUs, but this cluster has none and its "
            f"autoscaler can bring none ({seen}): drop --gpus-per-actor to tag on CPUs, or add a GPU "
            "node group"
        )
    if bounded and smallest > held:
        raise TaggingError(
            f"--min-actors {smallest} needs {smallest * s.gpus_per_actor:g} GPUs, but the autoscaler can "
            f"bring at most {held} actors' worth ({seen}): lower --min-actors"
        )
    if bounded and asked and asked > held:
        # A fixed pool of `asked` would never start; max_size above what can be had only makes
        # Ray Data ask the autoscaler for GPUs it cannot provide (and shrinks every CPU share).
        log.warning(
            "--actors %d x %g GPUs asks for more than the autoscaler can ever bring (%s): planning at most %d",
            asked,
            s.gpus_per_actor,
            seen,
            held,
        )
        return held, f"--actors {asked} capped at what the autoscaler's largest cluster holds"
    if asked:
        return max(asked, smallest), "as --actors asked"
    if held == 0:  # no autoscaler seen and no GPU up yet: one actor waits for one
        log.warning("no GPU is up and no autoscaler was seen (%s): the pool waits for one GPU node", seen)
        return smallest, "no GPU seen: --min-actors"
    return max(held, smallest), f"one per {s.gpus_per_actor:g} GPU"
