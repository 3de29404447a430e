"""Process groups for data + expert parallelism.

The W ranks are laid out as W / ep_size expert-parallel groups of consecutive ranks (consecutive ranks
usually share a node, so the all-to-all stays on the fastest link):

    W = 4, ep_size = 2:   expert-parallel groups {0, 1}, {2, 3}    (each holds all E experts, E/2 per rank)
                          expert replica groups  {0, 2}, {1, 3}    (ranks holding the same expert shard)

Every rank is also a data-parallel rank: it reads its own slice of the global batch. Replicated
parameters (router, attention, embeddings, shared experts) average their gradients over all W ranks;
an expert shard's gradient is summed over its replica group and divided by W (see `sync_gradients`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist


@dataclass
class ParallelGroups:
    world_size: int  # W: every process in the job
    rank: int  # this process's global rank
    ep_size: int  # ranks that share one copy of the experts (E / ep_size experts each)
    ep_rank: int  # position inside the expert-parallel group: holds experts [ep_rank*E/ep, (ep_rank+1)*E/ep)
    ep_group: Optional[dist.ProcessGroup]  # this rank's expert-parallel group (the all-to-all runs here)
    replica_group: Optional[dist.ProcessGroup]  # ranks holding the same expert shard (W / ep_size of them)
    world_group: Optional[dist.ProcessGroup]  # all W ranks: global-batch statistics, replicated gradients

    @property
    def num_replicas(self) -> int:
        return self.world_size // self.ep_size


def make_groups(ep_size: int) -> ParallelGroups:
    """Create the groups on an initialised default process group (every rank must call this)."""
    if not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialised: call init_parallel() or dist.init_process_group() first")
    world, rank = dist.get_world_size(), dist.get_rank()
    if isinstance(ep_size, bool) or not isinstance(ep_size, int) or ep_size < 1 or world % ep_size:
        divisors = [d for d in range(1, world + 1) if world % d == 0]
        raise ValueError(f"ep_size={ep_size!r} must divide the world size {world}; accepted: {divisors}")
    ep_group = replica_group = None
    # new_group is collective: every rank creates every group, in the same order.
    for start in range(0, world, ep_size):
        ranks = list(range(start, start + ep_size))
        group = dist.group.WORLD if ep_size == world else dist.new_group(ranks)
        if rank in ranks:
            ep_group = group
    for first in range(ep_size):
        ranks = list(range(first, world, ep_size))
        group = dist.group.WORLD if ep_size == 1 else dist.new_group(ranks)
        if rank in ranks:
            replica_group = group
    return ParallelGroups(world, rank, ep_size, rank % ep_size, ep_group, replica_group, dist.group.WORLD)


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"


def init_parallel(ep_size: int = 1, backend: Optional[str] = None, timeout_s: float = 600.0) -> ParallelGroups:
    """Initialise torch.distributed from torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR, ...) and
    build the groups. `timeout_s` bounds how long a collective waits for a peer that died or stalled.

    With NCCL each process takes the GPU LOCAL_RANK. A single process run without torchrun works too
    (world size 1).
    """
    if not dist.is_initialized():
        backend = backend or default_backend()
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        if "RANK" not in os.environ:  # plain `python`: a world of one, no rendezvous
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return make_groups(ep_size)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
