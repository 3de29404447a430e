"""Route once into a plan: assignments sorted by expert, counts, offsets, capacity slots and drops.

Legend: T tokens, E experts, K experts per token, N assignments, C capacity (slots per expert).

Every backend consumes the same `DispatchPlan`, so capacity decisions are made once and identically
for all of them. Rows are sorted by expert (stable), by priority inside an expert, and the assignments
that overflow an expert's capacity are moved to the end with expert id E and weight 0.

Priority when an expert is over capacity:
* ``position``: all first choices before any second choice (GShard/Switch), then token order;
* ``weight``: highest combine weight first across the batch (batch-prioritised routing, Riquelme 2021).
All shapes are static (N = T*K or E*C), so the plan traces under `torch.compile(fullgraph=True)`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch
from torch import Tensor

from sparsemoe.ops import small_kernels
from sparsemoe.routing import RoutingResult, assignment_tokens


@dataclass
class DispatchPlan:
    token_ids: Tensor  # [N] long: source token of each sorted row
    expert_ids: Tensor  # [N] long: expert of each sorted row; E for dropped rows (always last)
    weights: Tensor  # [N] float32: combine weight of each sorted row; 0 for dropped rows (keeps grad)
    slots: Tensor  # [N] long: position of the row inside its expert's batch; < C when kept
    counts: Tensor  # [E] long: rows kept per expert
    offsets: Tensor  # [E] long: inclusive cumsum of counts, the end of each expert's group of rows
    num_tokens: int  # T
    num_experts: int  # E
    capacity: Optional[int]  # C, or None when dropless

    @property
    def num_rows(self) -> int:
        return self.token_ids.shape[0]

    @property
    def num_dropped(self) -> Tensor:
        """Assignments dropped by capacity (a 0-dim long tensor, no sync)."""
        return self.num_rows - self.counts.sum()


def _priority_order(routing: RoutingResult, priority: str) -> Tensor:
    """Permutation of the N assignments, highest priority first."""
    N = routing.expert_ids.shape[0]
    if priority == "weight":
        return torch.sort(routing.weights.detach(), descending=True, stable=True).indices
    # position: assignment n = t*K + k, so slot-major order is the transpose of the [T, K] grid.
    K = routing.top_k
    return torch.arange(N, device=routing.expert_ids.device).view(N // K, K).t().reshape(-1)


def _segment_positions(sorted_expert_ids: Tensor, num_experts: int) -> tuple[Tensor, Tensor, Tensor]:
    """For rows sorted by expert: (position of each row within its expert, rows per expert [E], the end of
    each expert's rows [E])."""
    N = sorted_expert_ids.shape[0]
    counts = torch.zeros(num_experts + 1, device=sorted_expert_ids.device, dtype=torch.long)
    counts.scatter_add_(0, sorted_expert_ids, torch.ones_like(sorted_expert_ids))
    ends = counts.cumsum(0)
    positions = torch.arange(N, device=sorted_expert_ids.device) - (ends - counts)[sorted_expert_ids]
    return positions, counts[:num_experts], ends[:num_experts]


def build_plan(routing: RoutingResult, capacity: Optional[int], priority: str = "position") -> DispatchPlan:
    """Sort the assignments by expert and apply the capacity C (None = dropless)."""
    E = routing.num_experts
    if capacity is None or routing.expert_choice:  # dropless; expert-choice is exactly C per expert
        plan = sort_assignments(routing.token_ids, routing.expert_ids, routing.weights, routing.num_tokens, E)
        return plan if capacity is None else replace(plan, capacity=capacity)
    order = _priority_order(routing, priority)
    order = order[torch.sort(routing.expert_ids[order], stable=True).indices]
    expert_ids = routing.expert_ids[order]
    slots, counts, _ = _segment_positions(expert_ids, E)
    keep = slots < capacity
    # Move overflowing rows to the end (expert id E); kept rows stay grouped and in priority order.
    marked = torch.where(keep, expert_ids, torch.full_like(expert_ids, E))
    regroup = torch.sort(marked, stable=True).indices
    order, expert_ids, slots, keep = order[regroup], marked[regroup], slots[regroup], keep[regroup]
    counts = counts.clamp(max=capacity)
    return DispatchPlan(
        token_ids=routing.token_ids[order],
        expert_ids=expert_ids,
        weights=routing.weights[order] * keep,
        slots=slots,
        counts=counts,
        offsets=counts.cumsum(0),
        num_tokens=routing.num_tokens,
        num_experts=E,
        capacity=capacity,
    )


def sort_assignments(
    token_ids: Tensor, expert_ids: Tensor, weights: Tensor, num_tokens: int, num_experts: int
) -> DispatchPlan:
    """The dropless plan of N assignments [N] (stable sort by expert). An expert id of E marks a dropped
    assignment: it sorts last, past offsets[-1], where no backend computes it (give it weight 0)."""
    native = small_kernels.sort_by_expert(expert_ids, num_experts)  # one counting sort on the CPU
    if native is not None:
        order, sorted_ids, slots, counts, offsets = native
    else:
        order = torch.sort(expert_ids, stable=True).indices
        sorted_ids = expert_ids[order]
        slots, counts, offsets = _segment_positions(sorted_ids, num_experts)
    return DispatchPlan(
        token_ids=token_ids[order],
        expert_ids=sorted_ids,
        weights=weights[order],
        slots=slots,
        counts=counts,
        offsets=offsets,
        num_tokens=num_tokens,
        num_experts=num_experts,
        capacity=None,
    )


def plan_from_topk(expert_ids_TK: Tensor, weights_TK: Tensor, num_experts: int) -> DispatchPlan:
    """The dropless plan of top-k choices made by another router (e.g. a Hugging Face model's):
    expert_ids_TK [T, K] long, weights_TK [T, K] (any float dtype; the plan's are float32 and carry its
    gradient). An id outside [0, E) (an expert-parallel placeholder) becomes a dropped row of weight 0."""
    T, K = expert_ids_TK.shape
    ids = expert_ids_TK.reshape(-1).long()
    valid = (ids >= 0) & (ids < num_experts)
    ids = torch.where(valid, ids, torch.full_like(ids, num_experts))
    weights = torch.where(valid, weights_TK.reshape(-1).float(), 0.0)
    token_ids = assignment_tokens(T, K, ids.device)
    return sort_assignments(token_ids, ids, weights, T, num_experts)
