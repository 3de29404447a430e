"""The grouped backend: rows sorted by expert, one GEMM per expert group, weighted combine. Dropless or not.

Legend: T tokens, D model width, I in-projection rows (2F gated, F otherwise), F hidden width, N plan rows.
No Python loop over tokens. The fast path is the fused expert-MLP op (`sparsemoe.dispatch.fused`) with
its own backward; training with hidden-activation dropout takes the unfused path below, whose pieces
(`sparsemoe::grouped_mm` and its autograd) also serve the capacity backend.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from sparsemoe.dispatch.fused import expert_mlp
from sparsemoe.dispatch.plan import DispatchPlan
from sparsemoe.experts import Experts, activate
from sparsemoe.ops import grouped_mm


def combine(rows_ND: Tensor, plan: DispatchPlan, dim: int) -> Tensor:
    """Weighted scatter-add of per-row outputs back to their tokens, accumulated in float32 -> [T, D]."""
    y_TD = rows_ND.new_zeros(plan.num_tokens, dim, dtype=torch.float32)
    return y_TD.index_add(0, plan.token_ids, rows_ND.float() * plan.weights.unsqueeze(1))


def expert_hidden(h_NI: Tensor, experts: Experts) -> Tensor:
    """Activation and (training) dropout on the in-projection outputs -> [N, F]."""
    a_NF = activate(h_NI, experts.activation)
    if experts.dropout > 0 and experts.training:
        a_NF = F.dropout(a_NF, experts.dropout, training=True)
    return a_NF


def unfused_forward(x_TD: Tensor, plan: DispatchPlan, experts: Experts) -> Tensor:
    x_ND = x_TD[plan.token_ids]  # rows in expert order; dropped rows sit past offsets[-1] and stay zero
    h_NI = grouped_mm(x_ND, experts.w_in, plan.offsets)
    o_ND = grouped_mm(expert_hidden(h_NI, experts), experts.w_out, plan.offsets)
    return combine(o_ND, plan, x_TD.shape[1])


def grouped_forward(x_TD: Tensor, plan: DispatchPlan, experts: Experts) -> Tensor:
    if experts.dropout > 0 and experts.training:  # the fused op has no dropout mask to replay in backward
        return unfused_forward(x_TD, plan, experts)
    return expert_mlp(
        x_TD, plan.token_ids, plan.weights, plan.offsets, experts.w_in, experts.w_out, experts.activation,
        recompute=experts.recompute_activations,
    )
