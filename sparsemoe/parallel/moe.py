"""The expert-parallel MoE layer: experts sharded over a process group, tokens moved by all-to-all.

Legend: T tokens on this rank, D model width, E experts in the model, R ranks in the expert-parallel
group, L = E / R experts held by each rank, K experts per token, N plan rows on this rank, S rows this
rank sends (its kept assignments), M rows it receives (assignments to its L experts from all ranks).

Forward on every rank:
    route the local tokens with the replicated router (same as the single-process layer)
    -> plan (sorted by expert, capacity applied per rank)
    -> exchange per-expert row counts (all-to-all of R*L integers)
    -> send each row to the rank holding its expert (all-to-all with uneven splits)
    -> local experts on the received rows through the configured dispatch backend
    -> send the outputs back (the reverse all-to-all) -> weighted combine (as the single-process layer).
Both all-to-alls are differentiable: their backward is the reverse exchange.

Semantics (what equals the single-process layer, and on which batch):
* Outputs: rank r's outputs equal `MoE(x_r)` with the full weights. Token-choice dropless routing is
  per token, so this is also the global batch's output. Capacity and expert-choice decide per rank
  (GShard's local dispatch): C = ceil(cf * T_r * K / E) slots per expert for each rank's tokens, so an
  expert receives at most R * C rows.
* Losses are global-batch losses. The per-expert counts and token/sequence totals are summed over
  `stats_group` (all ranks by default) with one all-reduce, and each rank's `aux_loss` is its share:
  the mean over ranks of the per-rank values equals the single-process loss on the global batch (the
  concatenation of every rank's tokens), and so does the mean of their gradients, which is what data
  parallel gradient averaging computes. The Switch/GShard loss uses the global f_e on every rank; the
  z-loss and the sequence-wise loss are means over the global batch's tokens and sequences.
* The bias balancer updates from the global counts (the `reduce_counts` hook), so the selection bias
  stays identical on every rank and equal to the single-process layer's on the global batch (with
  bias_update="step", the global counts are summed until `update_expert_biases`, on every rank alike).
* Randomness (router noise, expert dropout, hidden dropout) is drawn by each rank from its own generator.
Every collective runs on every rank whatever the data (a rank with no tokens still exchanges empty
tensors), so ranks never wait on each other for a collective that one of them skipped.
"""

from __future__ import annotations

import copy
from functools import partial
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from sparsemoe.balancing import router_z_loss, sequence_aux_loss, tokens_per_expert
from sparsemoe.dispatch import DispatchPlan, run_backend
from sparsemoe.dispatch.grouped import combine
from sparsemoe.experts import Experts
from sparsemoe.layer import MoE
from sparsemoe.parallel.comm import all_reduce_sum, all_to_all_rows, exchange_counts
from sparsemoe.routing import RoutingResult, expert_choice


def group_size(group) -> int:
    return dist.get_world_size(group)


def group_rank(group) -> int:
    return dist.get_rank(group)


def check_divisible(num_experts: int, ep_size: int, where: str = "MoE") -> None:
    if num_experts % ep_size:
        ok = [d for d in range(1, num_experts + 1) if num_experts % d == 0]
        raise ValueError(
            f"{where}: num_experts={num_experts} is not divisible by the expert-parallel size {ep_size}; "
            f"accepted expert-parallel sizes: {ok}"
        )


class ExpertParallelMoE(MoE):
    """An `MoE` whose routed experts are sharded over `ep_group`; build it with `shard_experts`.

    The state-dict keys are those of `MoE`; `experts.w_in` / `experts.w_out` hold this rank's L experts,
    global experts [expert_offset, expert_offset + L). `load_state_dict` accepts full (E-expert)
    tensors and keeps this rank's slice, so a single-process checkpoint loads on any world size.
    """

    ep_group: Optional[dist.ProcessGroup]
    stats_group: Optional[dist.ProcessGroup]

    def __init__(self, *args, **kwargs) -> None:
        raise TypeError(
            "ExpertParallelMoE is built from an existing layer: use shard_experts(model, groups) or "
            "ExpertParallelMoE.from_moe(moe, ep_group)"
        )

    @classmethod
    def from_moe(cls, moe: MoE, ep_group=None, stats_group=None) -> "ExpertParallelMoE":
        """A sharded copy of `moe` sharing its router and shared experts; `moe` is left untouched."""
        ep_size, ep_rank = group_size(ep_group), group_rank(ep_group)
        cfg = moe.config
        check_divisible(cfg.num_experts, ep_size)
        layer = cls.__new__(cls)
        # Carry every attribute of the built layer (modules, hooks, aux_loss_scale, training flag) so the
        # wrapper follows MoE as it gains fields; the dicts are copied so the two objects stay independent.
        layer.__dict__.update({k: copy.copy(v) if isinstance(v, dict) else v for k, v in moe.__dict__.items()})
        layer.ep_group, layer.stats_group = ep_group, stats_group
        layer.ep_size, layer.ep_rank = ep_size, ep_rank
        layer.num_local_experts = cfg.num_experts // ep_size
        layer.expert_offset = ep_rank * layer.num_local_experts
        layer.experts = _slice_experts(moe.experts, layer.expert_offset, layer.num_local_experts)
        layer.reduce_counts = partial(all_reduce_sum, group=stats_group)
        return layer

    # --- forward: MoE.forward with the hooks below --------------------------------------------------------
    _runs_empty_batches = True  # a rank with no tokens still takes part in every collective
    _lazy_balance = False  # the losses' statistics are all-reduced: every rank computes them in every forward

    # --- pieces ----------------------------------------------------------------------------------------
    def _route(self, logits_TE: Tensor, capacity: Optional[int]) -> RoutingResult:
        if self.config.router == "expert_choice" and logits_TE.shape[0] == 0:
            return expert_choice(logits_TE, self.config, 0)  # Router.route would ask for C >= 1 of 0 tokens
        return self.router.route(logits_TE, capacity)

    def _dispatch(self, x_TD: Tensor, plan: DispatchPlan) -> Tensor:
        """Send rows to their experts' ranks, run the local experts, bring the outputs back, combine."""
        R, L, D = self.ep_size, self.num_local_experts, x_TD.shape[1]
        counts_RL = plan.counts.view(R, L)
        recv_RL = exchange_counts(counts_RL, self.ep_group)
        # Device-to-host sync: all_to_all_single takes its split sizes as host integers, which an
        # exchange of data-dependent size cannot avoid. One sync for both directions.
        send_splits, recv_splits = torch.stack([counts_RL.sum(1), recv_RL.sum(1)]).tolist()
        S = sum(send_splits)
        # Kept rows come first in the plan, sorted by expert, so rank j's rows are one contiguous block.
        sent_SD = x_TD[plan.token_ids[:S]]
        recv_MD = all_to_all_rows(sent_SD, recv_splits, send_splits, self.ep_group)
        local = _local_plan(recv_RL, sum(recv_splits))
        # Each received row has one assignment of weight 1, so the backend's float32 output is the
        # expert's output exactly; casting back to the activation dtype loses nothing.
        out_MD = run_backend(self.config.backend, recv_MD, local, self.experts).to(x_TD.dtype)
        back_SD = all_to_all_rows(out_MD, send_splits, recv_splits, self.ep_group)
        rows_ND = torch.cat([back_SD, back_SD.new_zeros(plan.num_rows - S, D)])  # dropped rows: zero
        return combine(rows_ND, plan, D)

    def _balance(self, routing: RoutingResult, seq_len: int) -> tuple[dict[str, Tensor], Optional[Tensor]]:
        """Global-batch losses (this rank's share) and the global per-expert load for the bias update."""
        totals = self._global_totals(routing, seq_len)
        losses = self._losses_global(routing, seq_len, totals)
        load_E = totals[: self.config.num_experts] if self.training and self.config.bias_balancing else None
        return losses, load_E

    def _global_totals(self, routing: RoutingResult, seq_len: int) -> Tensor:
        """[E + 2] float32 summed over `stats_group`: assignments per expert (before capacity), tokens, sequences."""
        E, T = routing.num_experts, routing.num_tokens
        if routing.expert_choice or T == 0:
            counts = routing.logits.new_zeros(E, dtype=torch.float32)
        else:
            counts = tokens_per_expert(routing.expert_ids.detach(), E)
        seqs = T // seq_len if T % seq_len == 0 else 1
        local = torch.cat([counts, counts.new_tensor([T, seqs if T else 0])])
        cfg = self.config
        needed = cfg.aux_loss_coef > 0 or cfg.seq_aux_loss_coef > 0 or cfg.z_loss_coef > 0
        if not (needed or (self.training and cfg.bias_balancing)):
            return local  # nothing reads the totals; the condition is the same on every rank
        return self.reduce_counts(local)

    def _losses_global(self, routing: RoutingResult, seq_len: int, totals: Tensor) -> dict[str, Tensor]:
        """This rank's share of each global-batch loss (mean over ranks = the single-process value)."""
        cfg = self.config
        E, T, K = routing.num_experts, routing.num_tokens, routing.top_k
        losses: dict[str, Tensor] = {}
        if T == 0:
            return losses
        R = group_size(self.stats_group)
        T_all = totals[E].clamp_min(1)
        if not routing.expert_choice and cfg.aux_loss_coef > 0:
            f_E = totals[:E] / (T_all * K)  # global fraction of selections, identical on every rank
            P_sum_E = routing.probs.sum(dim=0)  # this rank's part of the global sum of probabilities
            losses["aux_loss"] = cfg.aux_loss_coef * E * (f_E * P_sum_E).sum() * (R / T_all)
        if not routing.expert_choice and cfg.seq_aux_loss_coef > 0:
            S = seq_len if T % seq_len == 0 else T
            B = T // S
            per_seq_mean = sequence_aux_loss(routing.probs, routing.expert_ids.view(T, K), S)
            losses["seq_aux_loss"] = cfg.seq_aux_loss_coef * per_seq_mean * (B * R / totals[E + 1].clamp_min(1))
        if cfg.z_loss_coef > 0:
            losses["z_loss"] = cfg.z_loss_coef * router_z_loss(routing.logits) * (T * R / T_all)
        return losses

    # --- checkpoints -------------------------------------------------------------------------------------
    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Full checkpoints (E experts) are sliced to this rank's experts; shards of size L load as they are.
        E, L, lo = self.config.num_experts, self.num_local_experts, self.expert_offset
        for name in ("experts.w_in", "experts.w_out"):
            t = state_dict.get(prefix + name)
            if t is not None and L != E and t.dim() > 0 and t.shape[0] == E:
                state_dict[prefix + name] = t[lo : lo + L]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (
            super().extra_repr()
            + f", ep_size={self.ep_size}, ep_rank={self.ep_rank}, local_experts=[{self.expert_offset}, "
            f"{self.expert_offset + self.num_local_experts})"
        )


def _slice_experts(full: Experts, offset: int, count: int) -> Experts:
    """An `Experts` holding experts [offset, offset + count) of `full` (copied, so `full` can be freed)."""
    local = Experts(
        count, full.dim, full.hidden_dim, full.activation, full.dropout, full.recompute_activations, device="meta"
    )
    for name in ("w_in", "w_out"):
        src = getattr(full, name)
        piece = src.detach()[offset : offset + count].clone()
        setattr(local, name, nn.Parameter(piece, requires_grad=src.requires_grad))
    local.train(full.training)
    return local


def _local_plan(recv_RL: Tensor, num_rows: int) -> DispatchPlan:
    """A plan over the M received rows, one assignment each (weight 1), grouped by local expert.

    Dropless (capacity None): capacity was applied by the senders; a rank cannot bound what it receives
    from its own C because the other ranks' batches may be larger.

    Rows arrive source-rank by source-rank, each source's rows already sorted by expert; a stable sort
    by local expert groups them while keeping source order inside an expert.
    """
    R, L = recv_RL.shape
    device = recv_RL.device
    expert_of_row = torch.arange(L, device=device).repeat(R).repeat_interleave(recv_RL.reshape(-1), output_size=num_rows)
    order = torch.sort(expert_of_row, stable=True).indices
    expert_ids = expert_of_row[order]
    counts_L = recv_RL.sum(dim=0)
    starts_L = counts_L.cumsum(0) - counts_L
    slots = torch.arange(num_rows, device=device) - starts_L[expert_ids]
    return DispatchPlan(
        token_ids=order,
        expert_ids=expert_ids,
        weights=torch.ones(num_rows, device=device, dtype=torch.float32),
        slots=slots,
        counts=counts_L,
        offsets=counts_L.cumsum(0),
        num_tokens=num_rows,
        num_experts=L,
        capacity=None,
    )
