"""Gradient averaging and world-size independent checkpoints for an expert-sharded model.

Gradient convention (the same as DistributedDataParallel's): each rank's loss is the mean over its own
tokens, and the gradient every rank applies is the mean over the W ranks of their gradients, i.e. the
gradient of the mean of the per-rank losses. A replicated parameter sums its W gradients and divides
by W. An expert shard's gradient already sums the contributions of its expert-parallel group's ranks
(the all-to-all's backward brought them), so it sums over its replica group only and divides by W.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from sparsemoe.parallel.comm import collective
from sparsemoe.parallel.groups import ParallelGroups
from sparsemoe.parallel.moe import ExpertParallelMoE
from sparsemoe.parallel.shard import expert_parameters


def sync_gradients(model: nn.Module, groups: ParallelGroups) -> None:
    """Average gradients over the data-parallel world after `backward()` (collective, in place).

    Parameters that got no gradient on this rank count as zero, so every rank runs the same
    all-reduces whatever its batch did.
    """
    if groups.world_size == 1:
        return
    experts = {id(p) for p in expert_parameters(model)}
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    replicated = [p for p in params if id(p) not in experts]
    sharded = [p for p in params if id(p) in experts]
    _all_reduce_grads(replicated, groups.world_group, groups.world_size)
    if groups.num_replicas > 1:
        _all_reduce_grads(sharded, groups.replica_group, groups.world_size)
    else:
        for p in sharded:
            p.grad.div_(groups.world_size)


def _all_reduce_grads(params: list[nn.Parameter], group, divisor: int) -> None:
    # One all-reduce per dtype over a flat buffer: far fewer collectives than one per parameter.
    by_dtype: dict[torch.dtype, list[nn.Parameter]] = {}
    for p in params:
        by_dtype.setdefault(p.grad.dtype, []).append(p)
    for group_params in by_dtype.values():
        grads = [p.grad for p in group_params]
        flat = _flatten_dense_tensors(grads)
        with collective("all-reduce of gradients", group):
            dist.all_reduce(flat, group=group)
        flat.div_(divisor)
        for g, reduced in zip(grads, _unflatten_dense_tensors(flat, grads)):
            g.copy_(reduced)


def full_state_dict(model: nn.Module, groups: Optional[ParallelGroups] = None) -> dict[str, Tensor]:
    """The model's state dict with every expert tensor gathered to its full [E, ...] size (collective).

    The result has exactly the keys and shapes of the unsharded model, so it loads on any world size:
    into a single-process model with `load_state_dict`, or into a sharded one (which keeps its slice).
    Tensors are detached CPU copies.
    """
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    for name, layer in model.named_modules():
        if not isinstance(layer, ExpertParallelMoE):
            continue
        prefix = f"{name}." if name else ""
        for pname in ("w_in", "w_out"):
            shard = getattr(layer.experts, pname).detach().contiguous()
            pieces = [torch.empty_like(shard) for _ in range(layer.ep_size)]
            with collective("all-gather of expert weights for a checkpoint", layer.ep_group):
                dist.all_gather(pieces, shard, group=layer.ep_group)
            state[f"{prefix}experts.{pname}"] = torch.cat(pieces).cpu()
    return state


def clip_grad_norm(model: nn.Module, max_norm: float, groups: ParallelGroups) -> float:
    """Clip to the norm of the whole (unsharded) model's gradient; call after `sync_gradients`.

    Replicated gradients are identical on every rank after the sync, so they count once; the expert
    shards of one expert-parallel group together are all the experts, so their squares are summed over
    that group. Every rank gets the same norm and the same clip coefficient, as one process would.
    """
    experts = {id(p) for p in expert_parameters(model)}
    params = [p for p in model.parameters() if p.grad is not None]
    device = params[0].grad.device if params else torch.device("cpu")
    rep_sq = torch.zeros((), device=device, dtype=torch.float64)
    exp_sq = torch.zeros((), device=device, dtype=torch.float64)
    for p in params:
        sq = p.grad.detach().double().square().sum()
        if id(p) in experts:
            exp_sq += sq
        else:
            rep_sq += sq
    if groups.ep_size > 1:
        with collective("all-reduce of the expert gradient norm", groups.ep_group):
            dist.all_reduce(exp_sq, group=groups.ep_group)
    total = float((rep_sq + exp_sq).sqrt())
    coef = max_norm / (total + 1e-6)  # the same formula as torch.nn.utils.clip_grad_norm_
    if coef < 1:
        for p in params:
            p.grad.detach().mul_(coef)
    return total


def _expert_slices(model: nn.Module) -> dict[str, tuple[ExpertParallelMoE, str]]:
    out = {}
    for name, layer in model.named_modules():
        if isinstance(layer, ExpertParallelMoE):
            prefix = f"{name}." if name else ""
            for pname in ("w_in", "w_out"):
                out[f"{prefix}experts.{pname}"] = (layer, pname)
    return out


def local_state_dict(model: nn.Module, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A full (unsharded) state dict with each expert tensor cut to this rank's slice (no collective)."""
    out = dict(state)
    for key, (layer, _) in _expert_slices(model).items():
        t = out.get(key)
        if t is not None and t.dim() > 0 and t.shape[0] == layer.config.num_experts:
            out[key] = t[layer.expert_offset : layer.expert_offset + layer.num_local_experts]
    return out


def _optimizer_experts(optimizer: torch.optim.Optimizer, model: nn.Module) -> dict[int, ExpertParallelMoE]:
    """Optimizer state index -> the layer whose expert shard that parameter is."""
    owner = {}
    for layer, pname in _expert_slices(model).values():
        owner[id(getattr(layer.experts, pname))] = layer
    index, out = 0, {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) in owner:
                out[index] = owner[id(p)]
            index += 1
    return out


def full_optimizer_state(optimizer: torch.optim.Optimizer, model: nn.Module) -> dict:
    """`optimizer.state_dict()` with the expert parameters' state tensors gathered to [E, ...] (collective)."""
    state = optimizer.state_dict()
    full = {"param_groups": state["param_groups"], "state": {}}
    experts = _optimizer_experts(optimizer, model)
    for index in sorted(state["state"]):
        per_param = dict(state["state"][index])
        layer = experts.get(index)
        if layer is not None:
            for name, value in per_param.items():
                if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == layer.num_local_experts:
                    pieces = [torch.empty_like(value) for _ in range(layer.ep_size)]
                    with collective("all-gather of optimizer state for a checkpoint", layer.ep_group):
                        dist.all_gather(pieces, value.contiguous(), group=layer.ep_group)
                    per_param[name] = torch.cat(pieces)
        full["state"][index] = per_param
    return full


def shard_optimizer_state(optimizer: torch.optim.Optimizer, model: nn.Module, state: dict) -> dict:
    """The inverse of `full_optimizer_state` for this rank: cut full expert state tensors to the local slice."""
    experts = _optimizer_experts(optimizer, model)
    out = {"param_groups": state["param_groups"], "state": {}}
    for index, per_param in state["state"].items():
        layer = experts.get(int(index))
        per_param = dict(per_param)
        if layer is not None:
            E, lo, L = layer.config.num_experts, layer.expert_offset, layer.num_local_experts
            for name, value in per_param.items():
                if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == E != L:
                    per_param[name] = value[lo : lo + L]
        out["state"][index] = per_param
    return out
