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

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from sparsemoe.routing import RoutingResult


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
    dropping = capacity is not None and not routing.expert_choice  # expert-choice is exactly C per expert
    order = _priority_order(routing, priority) if dropping else None
    ids = routing.expert_ids if order is None else routing.expert_ids[order]
    by_expert = torch.sort(ids, stable=True).indices
    order = by_expert if order is None else order[by_expert]
    expert_ids = routing.expert_ids[order]
    slots, counts, offsets = _segment_positions(expert_ids, E)
    keep = None
    if dropping:
        keep = slots < capacity
        # Move overflowing rows to the end (expert id E); kept rows stay grouped and in priority order.
        marked = torch.where(keep, expert_ids, torch.full_like(expert_ids, E))
        regroup = torch.sort(marked, stable=True).indices
        order, expert_ids, slots, keep = order[regroup], marked[regroup], slots[regroup], keep[regroup]
        counts = counts.clamp(max=capacity)
        offsets = counts.cumsum(0)
    weights = routing.weights[order]
    if keep is not None:
        weights = weights * keep
    return DispatchPlan(
        token_ids=routing.token_ids[order],
        expert_ids=expert_ids,
        weights=weights,
        slots=slots,
        counts=counts,
        offsets=offsets,
        num_tokens=routing.num_tokens,
        num_experts=E,
        capacity=capacity,
    )
