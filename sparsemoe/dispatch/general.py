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
plain PyTorch, so autograd gives every gradient, including the functions' own. Without gradients and with
a few rows per expert (decoding) on the CPU, the projections run on the native kernel that streams each
weight once (`cpu_kernels.grouped_linear`, weights stored [out, in] or [in, out]; BLAS reads them at about
0.6 and 0.8 of copy speed in one-row products), with the module's functions between them as before.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from sparsemoe.dispatch.decode import KERNEL_MAX_ROWS_PER_EXPERT
from sparsemoe.dispatch.fused import add_rows
from sparsemoe.dispatch.plan import DispatchPlan
from sparsemoe.ops import cpu_kernels


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
    # Device-to-host sync: the loop over experts needs the group bounds on the host (free on the CPU).
    bounds = [0] + plan.offsets.tolist()
    if _streams_weights(x_TD, plan, experts, bounds[-1]):
        return _few_rows_forward(x_TD, plan, experts, bounds)
    y_TD = x_TD.new_zeros(T, D, dtype=torch.float32)
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


def _streams_weights(x_TD: Tensor, plan: DispatchPlan, experts: GeneralExperts, kept: int) -> bool:
    """Whether to run the few-rows path: no gradient wanted, CPU, and few rows per expert (decoding)."""
    tensors = (x_TD, plan.weights, experts.w_in, experts.w_out, experts.b_in, experts.b_out)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return False
    limit = KERNEL_MAX_ROWS_PER_EXPERT.get(experts.w_in.dtype, 0)
    return x_TD.device.type == "cpu" and cpu_kernels.available() and kept <= limit * plan.num_experts


def _linear_rows(x_nK: Tensor, offsets: Tensor, w_EOK: Tensor, bounds: list[int]) -> Tensor:
    """float32 [n, O]: each expert's rows times its weights, streaming them once (the native kernel) when
    they are stored contiguous, [out, in] or [in, out], else one BLAS product per expert with rows."""
    if cpu_kernels.supports_linear(x_nK, w_EOK):
        return cpu_kernels.grouped_linear(x_nK, offsets, w_EOK)
    y_nO = x_nK.new_zeros(x_nK.shape[0], w_EOK.shape[1], dtype=torch.float32)
    for e in range(len(bounds) - 1):
        lo, hi = bounds[e], bounds[e + 1]
        if hi > lo:
            y_nO[lo:hi] = torch.mm(x_nK[lo:hi].to(w_EOK.dtype), w_EOK[e].t())
    return y_nO


def _add_bias_(rows_nO: Tensor, bias_EO: Optional[Tensor], bounds: list[int]) -> Tensor:
    if bias_EO is not None:
        for e in range(len(bounds) - 1):
            if bounds[e + 1] > bounds[e]:
                rows_nO[bounds[e] : bounds[e + 1]] += bias_EO[e]
    return rows_nO


def _few_rows_forward(x_TD: Tensor, plan: DispatchPlan, experts: GeneralExperts, bounds: list[int]) -> Tensor:
    """The forward alone for a few rows per expert (decoding): the projections in float32 from weights read
    once; the module's functions in the input's dtype, as the per-expert loop runs them."""
    kept = bounds[-1]
    tok = plan.token_ids[:kept]
    h_nI = _add_bias_(_linear_rows(x_TD.index_select(0, tok), plan.offsets, experts.w_in, bounds), experts.b_in, bounds)
    a_nF = experts.hidden(h_nI.to(x_TD.dtype))
    o_nD = _add_bias_(_linear_rows(a_nF, plan.offsets, experts.w_out, bounds), experts.b_out, bounds)
    if experts.post is not None:
        o_nD = experts.post(o_nD.to(x_TD.dtype))
    y_TD = x_TD.new_zeros(x_TD.shape, dtype=torch.float32)
    add_rows(y_TD, tok, o_nD, plan.weights[:kept])
    return y_TD
