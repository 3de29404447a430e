"""The general path: any two-projection expert MLP over expert-sorted rows, with plain autograd.

Legend: T tokens, D model width, F hidden width, I in-projection rows (2F gated, F otherwise), E experts,
N plan rows (sorted by expert; dropped rows last, with expert id E).

    h = x[tok] @ w_in[e]^T (+ b_in[e])      grouped GEMM (`sparsemoe::grouped_mm`, its own backward)
    a = hidden(h)                           any function [n, I] -> [n, F]: a model's own gate
    o = a @ w_out[e]^T (+ b_out[e])         grouped GEMM
    o = post(o)                             optional, e.g. a norm after each expert
    y[tok] += weight * o                    float32 combine

The fused backends (`grouped`, `decode`, `triton`) compute the expert MLPs that `sparsemoe.experts`
names (SwiGLU, GeGLU, ReLU, GELU; no biases). This path is for the rest: a gate function given as
Python (a clamped SwiGLU with its own constants, an interleaved gate/up layout), biases on either
projection, a norm after each expert. The GEMMs are still grouped (a loop over experts, never tokens);
everything between them is PyTorch, so autograd gives every gradient, including the functions' own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from sparsemoe.dispatch.grouped import combine
from sparsemoe.dispatch.plan import DispatchPlan
from sparsemoe.ops import grouped_mm


@dataclass
class GeneralExperts:
    """What the general path reads: stacked weights (any strides) and the functions between them."""

    w_in: Tensor  # [E, I, D]; a transposed view of an [E, D, I] tensor is read in place
    w_out: Tensor  # [E, D, F]; likewise
    hidden: Callable[[Tensor], Tensor]  # in-projection rows [n, I] -> hidden activations [n, F]
    b_in: Optional[Tensor] = None  # [E, I]
    b_out: Optional[Tensor] = None  # [E, D]
    post: Optional[Callable[[Tensor], Tensor]] = None  # expert output rows [n, D] -> [n, D], before weighting


def _add_bias(rows_NO: Tensor, bias_EO: Optional[Tensor], expert_ids_N: Tensor) -> Tensor:
    if bias_EO is None:
        return rows_NO
    # Dropped rows (expert id E) borrow the last expert's bias; they are masked out before the combine.
    return rows_NO + bias_EO[expert_ids_N.clamp(max=bias_EO.shape[0] - 1)].to(rows_NO.dtype)


def general_forward(x_TD: Tensor, plan: DispatchPlan, experts: GeneralExperts) -> Tensor:
    """y [T, D] float32 = sum over each token's kept rows of weight * expert MLP (see the module docstring)."""
    x_ND = x_TD[plan.token_ids]
    h_NI = _add_bias(grouped_mm(x_ND, experts.w_in, plan.offsets), experts.b_in, plan.expert_ids)
    o_ND = grouped_mm(experts.hidden(h_NI), experts.w_out, plan.offsets)
    o_ND = _add_bias(o_ND, experts.b_out, plan.expert_ids)
    if experts.post is not None:
        o_ND = experts.post(o_ND)
    if experts.b_in is not None or experts.b_out is not None or experts.post is not None:
        # A dropped row's output is not zero here (a bias, a norm's shift): keep NaN * 0 out of the sum too.
        kept = (plan.expert_ids < plan.num_experts).unsqueeze(1)
        o_ND = torch.where(kept, o_ND, o_ND.new_zeros(()))
    return combine(o_ND, plan, x_TD.shape[1])
