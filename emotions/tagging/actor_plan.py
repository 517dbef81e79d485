"""How many tagging actors, and what each reserves from Ray (``plan_actors`` -> ``ActorPlan``).

    settings + CPUs of each node + GPUs of the cluster -> plan_actors -> ActorPlan:
        actors, CPUs reserved and torch threads each, GPUs each, Tokenizer actors and their CPUs

Actor sizing. Read and merge tasks need ``ROOM_CPUS`` on some node while the actors run; a pool
that reserves every CPU leaves them unschedulable and the pipeline hangs without a word. So by
default there is one actor per ``cpus_per_actor`` CPUs (per ``gpus_per_actor`` GPUs on GPU), each
running ``cpus_per_actor`` torch threads, but each *reserves* only so much that every node keeps
``ROOM_CPUS`` free when it hosts its share of the pool: on one 2-CPU node, 2 actors x 1 thread
that reserve 0.75 CPU each; on 1-CPU nodes, one actor each reserving 0.5. Reads and merges are
light next to the encoder, so running them beside the actors costs little.

On GPU runs (or with ``tokenize_stage=True``) there is one Tokenizer actor per tagging actor,
reserving up to ``TOKENIZER_CPUS`` each (see ``emotions.tagging.pipeline``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from emotions.tagging.settings import TaggingSettings

log = logging.getLogger("emotions.tagging")


READ_CPUS = 0.25  # per read task: decoding a few Parquet columns is light next to the encoder
TOKENIZER_CPUS = 1.0  # per Tokenizer actor, when tokenizing is a stage of its own
MERGE_CPUS = 0.25  # per merge task: reading parts and writing one file is I/O
ROOM_CPUS = READ_CPUS + MERGE_CPUS  # kept free on every node beside the actors (see Actor sizing)


@dataclass(frozen=True)
class ActorPlan:
    actors: int
    cpus_reserved: float  # per actor: what Ray schedules on (see the module docstring)
    gpus: float  # per actor
    threads: int  # torch threads per actor
    tokenizers: int = 0  # Tokenizer actors ahead of the encoder (0: the actors tokenize)
    tokenizer_cpus: float = 0.0  # reserved per Tokenizer actor


def plan_actors(s: TaggingSettings, node_cpus: list[float], cluster_gpus: float) -> ActorPlan:
    """Actor count and reservations that leave ROOM_CPUS on every node for the read and merge
    tasks, each node hosting its share of the pool (``node_cpus``: the CPUs of each node)."""
    nodes = [c for c in node_cpus if c > 0] or [1.0]
    if s.gpus_per_actor > 0:
        actors = s.num_actors or max(1, int(cluster_gpus // s.gpus_per_actor))
        if cluster_gpus < actors * s.gpus_per_actor:
            log.warning(
                "the pool asks for %.2f GPUs, the cluster has %.2f now: it waits for the autoscaler (or forever)",
                actors * s.gpus_per_actor,
                cluster_gpus,
            )
    else:
        actors = s.num_actors or max(1, sum(int(c // s.cpus_per_actor) for c in nodes))
    stage = s.gpus_per_actor > 0 if s.tokenize_stage is None else s.tokenize_stage
    tokenizers = actors if stage else 0  # one CPU tokenizer keeps one GPU encoder fed (MiniLM)
    members, total = actors + tokenizers, sum(nodes)
    # A node of c CPUs hosts about members * c / total of the pool (Ray spreads the actors).
    room = [(c - ROOM_CPUS) / max(1, math.ceil(members * c / total)) for c in nodes if c > ROOM_CPUS]
    share = max(0.01, float(np.floor(100 * min(room or [0.01])) / 100))
    reserved = min(float(s.cpus_per_actor), share)
    if actors * s.cpus_per_actor > total:
        log.warning("%d actors x %d threads oversubscribe the cluster's %.0f CPUs", actors, s.cpus_per_actor, total)
    return ActorPlan(
        actors=actors,
        cpus_reserved=reserved,
        gpus=s.gpus_per_actor,
        threads=s.cpus_per_actor,
        tokenizers=tokenizers,
        tokenizer_cpus=min(TOKENIZER_CPUS, share) if tokenizers else 0.0,
    )
