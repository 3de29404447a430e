"""Apply expert parallelism to a built model from outside: `shard_experts(model, groups)`.

The model code stays single-device. Every rank builds the same model (same configuration; weights are
made identical by broadcasting them from the first rank, as DistributedDataParallel does), then each
`MoE` layer is replaced in place by an `ExpertParallelMoE` keeping only its local experts.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Optional, Union

import torch
import torch.distributed as dist
from torch import nn

from sparsemoe.layer import MoE
from sparsemoe.parallel.comm import collective
from sparsemoe.parallel.groups import ParallelGroups
from sparsemoe.parallel.moe import ExpertParallelMoE, check_divisible, group_size


def shard_experts(
    model: nn.Module,
    groups: Union[ParallelGroups, dist.ProcessGroup, None] = None,
    *,
    stats_group: Optional[dist.ProcessGroup] = None,
    broadcast: bool = True,
) -> nn.Module:
    """Shard the experts of every MoE layer of `model` over an expert-parallel group; collective.

    groups: a `ParallelGroups` (from `init_parallel`/`make_groups`), or the expert-parallel process
        group itself (None = all ranks).
    stats_group: the ranks whose tokens form the global batch for the balancing losses and the bias
        balancer (default: every rank; with a `ParallelGroups`, its world group).
    broadcast: copy every parameter and buffer from the first rank of `stats_group` first, so the
        replicated weights (router, shared experts, the rest of the model) start identical.

    Raises ValueError, on every rank, when the model differs between ranks (MoE configs, parameter
    names, shapes or dtypes) or when num_experts is not divisible by the expert-parallel size.
    Returns `model` (or the new layer when `model` is itself an MoE).
    """
    if isinstance(groups, ParallelGroups):
        ep_group, stats_group = groups.ep_group, groups.world_group
    else:
        ep_group = groups
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, MoE) and not isinstance(m, ExpertParallelMoE)]
    if not layers:
        raise ValueError(f"shard_experts: {type(model).__name__} has no unsharded MoE layer to shard")
    ep_size = group_size(ep_group)
    check_same_model(model, layers, ep_size, stats_group)  # first: the checks below then agree on every rank
    for name, layer in layers:
        check_divisible(layer.config.num_experts, ep_size, f"MoE layer {name or '(model)'!r}")
    if broadcast:
        broadcast_model(model, stats_group)
    if isinstance(model, MoE):
        return ExpertParallelMoE.from_moe(model, ep_group, stats_group)
    for name, layer in layers:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, ExpertParallelMoE.from_moe(layer, ep_group, stats_group))
    return model


def expert_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The sharded parameters (local experts of every `ExpertParallelMoE`)."""
    return [p for m in model.modules() if isinstance(m, ExpertParallelMoE) for p in m.experts.parameters()]


# --- consistency ------------------------------------------------------------------------------------------


def model_description(model: nn.Module, layers: list[tuple[str, MoE]], ep_size: int) -> dict[str, Any]:
    """What must agree on every rank: MoE configs, parameter/buffer names, shapes and dtypes, ep size."""
    tensors = {k: [list(v.shape), str(v.dtype)] for k, v in model.state_dict().items()}
    return {
        "expert_parallel_size": ep_size,
        "moe_configs": {name or "(model)": layer.config.to_dict() for name, layer in layers},
        "tensors": tensors,
    }


def _digest(description: dict[str, Any]) -> int:
    text = json.dumps(description, sort_keys=True, default=str)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:7], "little")  # 56 bits: exact in int64


def check_same_model(model: nn.Module, layers: list[tuple[str, MoE]], ep_size: int, group=None) -> None:
    """Raise ValueError on every rank unless every rank of `group` built the same model."""
    description = model_description(model, layers, ep_size)
    device = _device_of(model)
    mine = torch.tensor([_digest(description)], dtype=torch.int64, device=device)
    gathered = [torch.zeros_like(mine) for _ in range(group_size(group))]
    with collective("model consistency check (all-gather)", group):
        dist.all_gather(gathered, mine, group=group)
    if all(int(g) == int(gathered[0]) for g in gathered):
        return
    # Rare path: gather the descriptions themselves to name what differs.
    everyone: list[Any] = [None] * group_size(group)
    with collective("model consistency check (all-gather of descriptions)", group):
        dist.all_gather_object(everyone, description, group=group)
    rank = next(i for i, d in enumerate(everyone) if d != everyone[0])
    what = _first_difference(everyone[0], everyone[rank])
    raise ValueError(
        f"shard_experts: the model differs between ranks: {what} (rank 0 vs rank {rank}); every rank must "
        "build the same model with the same MoE configuration"
    )


def _first_difference(a: Any, b: Any, path: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b), key=str):
            if key not in a or key not in b:
                return f"{path}{key} is {'missing' if key not in b else 'extra'} on the other rank"
            if a[key] != b[key]:
                return _first_difference(a[key], b[key], f"{path}{key}.")
    return f"{path.rstrip('.')} = {a!r} vs {b!r}"


def broadcast_model(model: nn.Module, group=None) -> None:
    """Copy every parameter and buffer from the first rank of `group` (in place)."""
    src = 0 if group is None or group is dist.group.WORLD else dist.get_global_rank(group, 0)
    with torch.no_grad(), collective("broadcast of the model weights", group):
        for t in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(t.data, src=src, group=group)


def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")
