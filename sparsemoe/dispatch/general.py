"""The general path: any two-projection expert MLP over expert-sorted rows, with plain autograd.

Legend: T tokens, D model width, F hidden width, I in-projection rows (2F gated, F otherwise), E experts,
N plan rows (sorted by expert; dropped rows last, with expert id E).

    for each expert e with rows (its rows tok of the plan, sorted by expert):
        h = x[tok] @ w_in[e]^T (+ b_in[e])      one GEMM with the bias in its epilogue (F.linear)
        a = hidden(h)                           any function [n, I] -> [n, F]: a model's own gate
        o = a @ w_out[e]^T (+ b_out[e])
        o = post(o)                             optional, e.g. a norm after each expert
        y[tok] += weight * o                    float32 combine

The fused backends (`grouped`, `decode`, `triton`) compute the expert MLPs that `sparsemoe.experts`
names (SwiGLU, GeGLU, ReLU, GELU; no biases). This path is for the rest: a gate function given as
Python (a clamped SwiGLU with its own constants, an interleaved gate/up layout), biases on either
projection, a norm after each expert. It loops over the experts that got rows (never over tokens), one
expert's rows at a time so that its intermediates stay in cache (a whole batch's [N, I] would not), and is
plain PyTorch, so autograd gives every gradient, including the functions' own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from sparsemoe.dispatch.plan import DispatchPlan


@dataclass
class GeneralExperts:
    """What the general path reads: stacked weights (any strides) and the functions between them."""

    w_in: Tensor  # [E, I, D]; a transposed view of an [E, D, I] tensor is read in place
    w_out: Tensor  # [E, D, F]; likewise
    hidden: Callable[[Tensor], Tensor]  # in-projection rows [n, I] -> hidden activations [n, F]
    b_in: Optional[Tensor] = None  # [E, I]
    b_out: Optional[Tensor] = None  # [E, D]
    post: Optional[Callable[[Tensor], Tensor]] = None  # expert output rows [n, D] -> [n, D], before weighting


def general_forward(x_TD: Tensor, plan: DispatchPlan, experts: GeneralExperts) -> Tensor:
    """y [T, D] float32 = sum over each token's kept rows of weight * expert MLP (see the module docstring)."""
    T, D = x_TD.shape
    y_TD = x_TD.new_zeros(T, D, dtype=torch.float32)
    # Device-to-host sync: the loop over experts needs the group bounds on the host (free on the CPU).
    bounds = [0] + plan.offsets.tolist()
    for e in range(plan.num_experts):
        lo, hi = bounds[e], bounds[e + 1]
        if hi == lo:
            continue
        tok = plan.token_ids[lo:hi]
        b_in = experts.b_in[e] if experts.b_in is not None else None
        b_out = experts.b_out[e] if experts.b_out is not None else None
        h_nI = F.linear(x_TD.index_select(0, tok), experts.w_in[e], b_in)
        o_nD = F.linear(experts.hidden(h_nI), experts.w_out[e], b_out)
        if experts.post is not None:
            o_nD = experts.post(o_nD)
        y_TD.index_add_(0, tok, o_nD.float() * plan.weights[lo:hi, None])  # in place: no [T, D] copy per expert
    if bounds[-1] == 0:  # no kept row: still an output of x's graph (an empty sum, so NaN-safe)
        y_TD = y_TD + x_TD.narrow(1, 0, 0).sum().float()
    return y_TD
