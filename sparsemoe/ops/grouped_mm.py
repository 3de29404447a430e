"""Grouped matrix multiply over expert-sorted rows, as a `torch.library` custom op.

Legend: N rows (token-expert assignments sorted by expert), I input width, O output width, E experts.

    grouped_mm(x [N, I], w [E, O, I], offsets [E]) -> y [N, O]
    y[r] = x[r] @ w[e].T  for rows r in group e = [offsets[e-1], offsets[e]),  offsets[-1] <= N
    rows r >= offsets[-1] (dropped assignments) are zero.
    With transpose_w=False, w is [E, I, O] and y[r] = x[r] @ w[e] (used by the input gradient).

`w` uses nn.Linear's layout per expert ([out, in]). Why a custom op rather than `torch._grouped_mm`
directly: on the CPU its meta function accepts only bfloat16 (so `torch.compile` fails on float32), it
requires 16-byte aligned strides, and it leaves rows past the last offset uninitialised. The op is opaque
to the compiler (a fake implementation gives the output shape) and picks, at run time, `_grouped_mm`
where it applies or a loop over experts (not tokens) where it does not.
"""

from __future__ import annotations

import torch
from torch import Tensor

_ALIGN_BYTES = 16


def use_native(x: Tensor, w: Tensor) -> bool:
    """Whether `torch._grouped_mm` applies: low-precision, contiguous, rows of 16-byte multiples.

    On the CPU the native kernel wins for bfloat16/float16; for float32 a loop of `mm` calls over the
    experts is as fast (measured by `sparsemoe bench`) and has no alignment constraints.
    """
    if not hasattr(torch, "_grouped_mm") or x.dtype not in (torch.bfloat16, torch.float16):
        return False
    size = x.element_size()
    return (
        x.is_contiguous()
        and w.is_contiguous()
        and (w.shape[1] * size) % _ALIGN_BYTES == 0
        and (w.shape[2] * size) % _ALIGN_BYTES == 0
    )


def native_grouped_mm(x: Tensor, w: Tensor, offsets: Tensor, transpose_w: bool = True) -> Tensor:
    """`torch._grouped_mm` on nn.Linear-layout weights (check `use_native` first) -> [N, O].

    Rows past offsets[-1] are left uninitialised: call it directly only when offsets[-1] == N.
    """
    mat_b = w.transpose(1, 2) if transpose_w else w
    return torch._grouped_mm(x, mat_b, offs=offsets.to(torch.int32))


def _group_bounds(offsets: Tensor) -> list[int]:
    # Device-to-host sync: the per-expert loop needs the group sizes on the host. On the CPU it is free.
    return [0] + offsets.tolist()


def _out_dim(w: Tensor, transpose_w: bool) -> int:
    return w.shape[1] if transpose_w else w.shape[2]


@torch.library.custom_op("sparsemoe::grouped_mm", mutates_args=())
def grouped_mm(x: Tensor, w: Tensor, offsets: Tensor, transpose_w: bool = True) -> Tensor:
    """y[N, O] with y[r] = x[r] @ w[e].T for the rows of group e; rows past offsets[-1] are zero."""
    n_rows, out_dim = x.shape[0], _out_dim(w, transpose_w)
    if use_native(x, w):
        y = native_grouped_mm(x, w, offsets, transpose_w)
        # The native kernel leaves rows past the last group uninitialised; zero them without a sync.
        tail = torch.arange(n_rows, device=x.device) >= offsets[-1]
        return y.masked_fill_(tail[:, None], 0)
    y = x.new_zeros(n_rows, out_dim)
    bounds = _group_bounds(offsets)
    for e in range(w.shape[0]):
        lo, hi = bounds[e], bounds[e + 1]
        if hi > lo:
            torch.mm(x[lo:hi], w[e].t() if transpose_w else w[e], out=y[lo:hi])
    return y


@grouped_mm.register_fake
def _grouped_mm_fake(x: Tensor, w: Tensor, offsets: Tensor, transpose_w: bool = True) -> Tensor:
    return x.new_empty(x.shape[0], _out_dim(w, transpose_w))


@torch.library.custom_op("sparsemoe::grouped_weight_grad", mutates_args=())
def grouped_weight_grad(grad_y: Tensor, x: Tensor, offsets: Tensor, num_groups: int) -> Tensor:
    """dW[E, O, I] with dW[e] = grad_y[rows_e].T @ x[rows_e]  (the weight gradient of grouped_mm)."""
    out_dim, in_dim = grad_y.shape[1], x.shape[1]
    dw = grad_y.new_zeros(num_groups, out_dim, in_dim)
    bounds = _group_bounds(offsets)
    for e in range(num_groups):
        lo, hi = bounds[e], bounds[e + 1]
        if hi > lo:
            torch.mm(grad_y[lo:hi].t(), x[lo:hi], out=dw[e])
    return dw


@grouped_weight_grad.register_fake
def _grouped_weight_grad_fake(grad_y: Tensor, x: Tensor, offsets: Tensor, num_groups: int) -> Tensor:
    return grad_y.new_empty(num_groups, grad_y.shape[1], x.shape[1])


def _setup_context(ctx, inputs, output) -> None:
    x, w, offsets, transpose_w = inputs
    ctx.transpose_w = transpose_w
    ctx.save_for_backward(x, w, offsets)


def _backward(ctx, grad_y: Tensor):
    x, w, offsets = ctx.saved_tensors
    grad_y = grad_y.contiguous()
    grad_x = grad_w = None
    if ctx.needs_input_grad[0]:
        # y = x w^T  ->  dx = dy w ;  y = x w  ->  dx = dy w^T
        grad_x = grouped_mm(grad_y, w, offsets, not ctx.transpose_w)
    if ctx.needs_input_grad[1]:
        if ctx.transpose_w:  # w[e] is [O, I]: dw[e] = dy_e^T x_e
            grad_w = grouped_weight_grad(grad_y, x, offsets, w.shape[0])
        else:  # w[e] is [I, O]: dw[e] = x_e^T dy_e
            grad_w = grouped_weight_grad(x, grad_y, offsets, w.shape[0])
    return grad_x, grad_w, None, None


grouped_mm.register_autograd(_backward, setup_context=_setup_context)
