"""The static-shape capacity backend (GShard/Switch): padded per-expert batches [E, C, D] and bmm.

Legend: T tokens, D model width, E experts, C capacity (slots per expert), I in-projection rows, N rows.
Every shape depends on T, E and C only, never on the routing, so it compiles to one static graph and
suits fixed-shape accelerators. Dropless use pads every expert to C = T slots (correct, but wasteful).
"""

from __future__ import annotations

import torch
from torch import Tensor

from sparsemoe.dispatch.grouped import combine, expert_hidden
from sparsemoe.dispatch.plan import DispatchPlan
from sparsemoe.experts import Experts


def capacity_forward(x_TD: Tensor, plan: DispatchPlan, experts: Experts) -> Tensor:
    T, D = x_TD.shape
    E = plan.num_experts
    C = plan.capacity if plan.capacity is not None else T
    kept = plan.expert_ids < E
    # Slot E*C is a scratch row that takes every dropped assignment and is never computed.
    slot_index = torch.where(kept, plan.expert_ids * C + plan.slots, torch.full_like(plan.slots, E * C))
    buffer = x_TD.new_zeros(E * C + 1, D).index_add(0, slot_index, x_TD[plan.token_ids])
    h_ECI = torch.bmm(buffer[: E * C].view(E, C, D), experts.w_in.transpose(1, 2))
    o_ECD = torch.bmm(expert_hidden(h_ECI, experts), experts.w_out.transpose(1, 2))
    o_rows = torch.cat([o_ECD.reshape(E * C, D), o_ECD.new_zeros(1, D)])[slot_index]
    return combine(o_rows, plan, D)
