"""The expert stage's backward for a few rows per expert in one native call (`csrc/expert_backward.c`).

Legend: T tokens, D model width, F hidden width, I in-projection rows (2F gated), E experts, N plan rows
sorted by expert.

    expert_backward(g_TD, x_TD, token_ids [N], weights [N], offsets [E], w_in [E, I, D], w_out [E, D, F],
                    h_NI, activation) -> (dx [T, D] float32, d weights [N] float32, d w_in, d w_out)

the gradients of y[t] = sum over the kept rows r of token t of weights[r] w_out[e] act(w_in[e] x[t]) (the
fused expert op, `sparsemoe.dispatch.fused`), from its output gradient g and the in-projection outputs h
that its forward kept (`cpu_kernels.decode_mlp(..., h_keep=h)`). Why: with a handful of rows per expert
(a training step of a small batch) the per-expert BLAS products run far below the memory bound, and the
weight gradients are outer products; the kernel reads each weight once and writes each weight gradient
once, experts without rows getting zeros. Float32 or bfloat16 (one dtype for x, g, h and the weights;
sums in float32, each bfloat16 output rounded once); the result does not depend on the thread count.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sparsemoe.ops.cpu_kernels import ACTIVATION_CODES, check_status, typed_kernel
from sparsemoe.ops.memory import empty_huge


def expert_backward(
    g_TD: Tensor, x_TD: Tensor, token_ids: Tensor, weights: Tensor, offsets: Tensor, w_in: Tensor, w_out: Tensor,
    h_NI: Tensor, activation: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx [T, D] float32, d weights [N] float32 (zero past the kept rows), d w_in [E, I, D], d w_out [E, D, F]
    in the weights' dtype). g, x and h are taken in the weights' dtype. Check `cpu_kernels.supports` first
    (the decode kernel's conditions, which this kernel shares)."""
    dtype = w_in.dtype
    kernel = typed_kernel("expert_backward", dtype)
    E, I, D = w_in.shape
    F = w_out.shape[2]
    T, N = x_TD.shape[0], token_ids.shape[0]
    if (x_TD.shape != (T, D) or g_TD.shape != (T, D) or w_out.shape != (E, D, F) or h_NI.shape != (N, I)
            or offsets.shape != (E,) or weights.shape != (N,) or w_out.dtype != dtype
            or token_ids.dtype != torch.int64 or offsets.dtype != torch.int64
            or not (w_in.is_contiguous() and w_out.is_contiguous())):
        raise ValueError(f"expert_backward: g {tuple(g_TD.shape)}, x {tuple(x_TD.shape)}, token_ids "
                         f"{tuple(token_ids.shape)} {token_ids.dtype}, weights {tuple(weights.shape)}, offsets "
                         f"{tuple(offsets.shape)} {offsets.dtype}, w_in {tuple(w_in.shape)} {w_in.dtype}, w_out "
                         f"{tuple(w_out.shape)} {w_out.dtype}, h {tuple(h_NI.shape)} do not fit, or the weights "
                         "are not contiguous")  # fmt: skip
    g_TD, x_TD, h_NI = (t.to(dtype).contiguous() for t in (g_TD, x_TD, h_NI))
    token_ids, offsets, weights = token_ids.contiguous(), offsets.contiguous(), weights.float().contiguous()
    dx_TD = x_TD.new_empty(T, D, dtype=torch.float32)
    d_weights = x_TD.new_empty(N, dtype=torch.float32)
    # fresh, large and written once: huge pages save most of the page faults
    dw_in = empty_huge(*w_in.shape, dtype=dtype, device=w_in.device)
    dw_out = empty_huge(*w_out.shape, dtype=dtype, device=w_out.device)
    status = kernel(
        g_TD.data_ptr(), x_TD.data_ptr(), token_ids.data_ptr(), weights.data_ptr(), N, offsets.data_ptr(), E,
        w_in.data_ptr(), w_out.data_ptr(), h_NI.data_ptr(), T, D, F, I, ACTIVATION_CODES[activation],
        dx_TD.data_ptr(), d_weights.data_ptr(), dw_in.data_ptr(), dw_out.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    check_status(status, kernel.__name__)
    return dx_TD, d_weights, dw_in, dw_out
