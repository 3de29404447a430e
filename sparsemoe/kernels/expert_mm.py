"""Scatter/gather expert GEMMs (the ScatterMoE idea): tokens are read in their original order through the
plan's token ids and results are written (or atomically added) straight to where they belong, so no
permuted copy of the activations [N, D] is ever materialised.

Legend: T tokens, D model width, F hidden width, I in-projection rows (2F gated, F otherwise),
E experts, N plan rows sorted by expert (rows past offsets[-1] are dropped and never touched).

Kernels (each a `@triton.jit` function with its host launcher below it):
    up      a[n] = act(x[tok[n]] @ w_in[e]^T)         gather rows, SwiGLU/GEGLU fused in the epilogue;
                                                      also stores h (pre-activation) when training
    scatter y[tok[n]] += s[n] * (a[n] @ w[e]^T)       grouped rows in, fp32 atomic scatter-add out
                                                      (the down projection with the combine weights
                                                      folded in; also the input gradient)
    down_bwd  g[n] = dy[tok[n]] @ w_out[e]            gather dy; epilogue: ds[n] = <g[n], a[n]>,
              dh[n] = act'(h[n]) * s[n] g[n]          the combine-weight and activation backward
    wgrad   dW[e] = sum_{n in e} (s[n] G[gi[n]])^T X[xi[n]]   expert weight gradients, either side gathered
Every kernel finds its expert and rows from the offsets on the device, so launches never sync.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from sparsemoe.kernels._common import (
    AUTOTUNE_CACHE,
    GATED_CODES,
    act_backward,
    act_forward,
    activation_code,
    configs,
    device_key,
    dot_precision,
    expert_row_block,
    grouped_program_id,
    mma,
    next_pow2,
    prune_row_blocks,
    row_block_grid,
    rows_bucket,
)

# GROUP_M=2 under the interpreter so that the grouped program order really regroups tiny grids.
_TINY = triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 2}, num_warps=1, num_stages=1)


def _mnk(m: int, n: int, k: int, warps: int, stages: int, group_m: int = 8) -> triton.Config:
    return triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": group_m}, num_warps=warps, num_stages=stages)


# Row-block GEMMs. The small-BLOCK_M entries serve decode batches (a handful of rows per expert), where
# the kernel is bound by reading the weights; the rest are the usual Hopper/Ampere GEMM tiles. In
# bfloat16 every entry of these lists compiles for sm_90 without spilling registers and within the
# shared memory (`python tools/kernel_audit.py` prints the table; tests/test_kernels.py checks it), so
# the autotuner spends no GPU time on tiles that cannot win. In float32 (twice the bytes per tile) a few
# of the largest tiles do not fit; the autotuner skips those. The last entry of each list is small
# enough for any case (float32 with the gated kernel's two weight tiles: ~72 KB of shared memory):
# decode batches prune a list to its BLOCK_M=16 entries, and one of those must fit.
_ROW_CONFIGS = [
    _mnk(*c)
    for c in [  # (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages)
        (128, 256, 64, 8, 3),
        (128, 128, 64, 8, 3),
        (128, 128, 32, 4, 4),
        (128, 64, 64, 4, 4),
        (64, 128, 64, 4, 4),
        (64, 64, 64, 4, 4),
        (32, 128, 64, 4, 4),
        (16, 128, 64, 4, 4),
        (16, 64, 128, 4, 4),
        (16, 64, 64, 4, 2),
    ]
]
# The gated up-projection keeps two accumulators (gate and up) and the down-projection backward a tile
# of the hidden activations beside its own: at 4 warps, tiles of 128 rows or 128x128 run out of
# registers, so their large tiles take 8 warps (two warpgroups).
_DUAL_CONFIGS = [
    _mnk(*c)
    for c in [  # (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages)
        (128, 64, 64, 8, 3),
        (128, 64, 64, 8, 4),
        (64, 128, 64, 8, 3),
        (128, 64, 32, 8, 4),
        (64, 64, 64, 4, 3),
        (32, 64, 64, 4, 4),
        (16, 128, 64, 4, 4),
        (16, 64, 128, 4, 4),
        (16, 64, 64, 4, 2),
    ]
]
_DOWN_BWD_CONFIGS = [
    _mnk(*c)
    for c in [  # (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages)
        (128, 64, 64, 8, 3),
        (128, 64, 64, 8, 4),
        (64, 128, 64, 8, 3),
        (64, 128, 64, 8, 4),
        (64, 64, 64, 4, 3),
        (32, 128, 64, 4, 4),
        (16, 128, 64, 4, 4),
        (16, 64, 64, 4, 2),
    ]
]
_WGRAD_CONFIGS = [
    triton.Config({"BLOCK_O": o, "BLOCK_I": i, "BLOCK_R": r}, num_warps=w, num_stages=s)
    for (o, i, r, w, s) in [
        (128, 128, 64, 8, 3),
        (128, 128, 32, 4, 4),
        (128, 64, 64, 4, 4),
        (64, 128, 64, 4, 4),
        (64, 64, 64, 4, 4),
        (64, 64, 32, 4, 3),
    ]
]
_WGRAD_TINY = triton.Config({"BLOCK_O": 16, "BLOCK_I": 16, "BLOCK_R": 16}, num_warps=1, num_stages=1)
# The one tile of each list used with SPARSEMOE_TRITON_AUTOTUNE=0 (see _common.configs).
_UNTUNED_ROWS = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64}
_UNTUNED_WGRAD = {"BLOCK_O": 64, "BLOCK_I": 64, "BLOCK_R": 32}

# Autotuning keys: the row-count bucket, the shapes and the GPU model. With AUTOTUNE_CACHE the winner is
# also written to Triton's cache folder (TRITON_CACHE_DIR, default ~/.triton/cache) under a hash of these
# keys, the kernel source, the Triton version and the target, so a later process skips the benchmarking.
_ROW_KEY = ["N_BUCKET", "E", "N_OUT", "K_DIM", "DEVICE_KEY"]
_EVEN_K = triton.heuristics({"EVEN_K": lambda args: args["K_DIM"] % args["BLOCK_K"] == 0})


@triton.jit
def _rows_times_w(
    a_ptr,
    a_rows,
    stride_am,
    w_ptr,
    cols,
    stride_wn,
    stride_wk,
    second_cols,
    K_DIM,
    DUAL: tl.constexpr,
    EVEN_K: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """acc[m, n] = sum_k A[a_rows[m], k] * W[cols[n], k] (and W[cols[n] + second_cols, k] when DUAL).

    A's rows are arbitrary (gathered) row indices of a row-major matrix; W is strided, so the same loop
    serves w [O, K] (nn.Linear layout) and its transpose. A is cast to W's dtype; products sum in fp32.
    `a_rows` and `cols` must be in bounds: callers wrap the lanes past the block's end onto valid rows
    and columns and drop those results when storing. The loop then needs no row or column masks (only
    a K mask on a partial last K block), which saves a predicate per loaded element and up to ~15 % of
    the registers of the sm_90 build (e.g. 92 -> 80 for the 64x64x64 scatter tile; tools/kernel_audit.py).
    """
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + a_rows[:, None] * stride_am + ks[None, :]
    w_ptrs = w_ptr + cols[None, :] * stride_wn + ks[:, None] * stride_wk
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K_DIM, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs)
            w = tl.load(w_ptrs)
        else:
            k_mask = (k0 + ks) < K_DIM
            a = tl.load(a_ptrs, mask=k_mask[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_mask[:, None], other=0.0)
        a = a.to(w.dtype)
        acc = mma(a, w, acc, PRECISION)
        if DUAL:
            w2_ptrs = w_ptrs + second_cols * stride_wn
            if EVEN_K:
                w2 = tl.load(w2_ptrs)
            else:
                w2 = tl.load(w2_ptrs, mask=k_mask[:, None], other=0.0)
            acc2 = mma(a, w2, acc2, PRECISION)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * stride_wk
    return acc, acc2


@triton.jit
def _block_rows_cols(pid_n, row_start, row_end, N_OUT, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(rows, row mask, cols, col mask, in-bounds cols) of a program's output block.

    The in-bounds columns wrap past N_OUT (`% N_OUT`, which keeps the runs of contiguous columns that
    vectorised loads need when N_OUT is a multiple of 16); their results are masked out when stored.
    """
    rows = row_start + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return rows, rows < row_end, cols, cols < N_OUT, cols % N_OUT


# --- up projection: gather, GEMM, fused activation --------------------------------------------------


@triton.autotune(
    configs=configs(_DUAL_CONFIGS, _TINY, _UNTUNED_ROWS),
    key=_ROW_KEY,
    prune_configs_by={"early_config_prune": prune_row_blocks},
    **AUTOTUNE_CACHE,
)
@_EVEN_K
@triton.jit
def _up_kernel(
    x_ptr,
    w_ptr,
    tok_ptr,
    offsets_ptr,
    h_ptr,
    a_ptr,
    N_ROWS,
    E,
    K_DIM,
    N_OUT,
    stride_xt,
    stride_we,
    stride_wn,
    stride_wk,
    stride_h,
    stride_a,
    N_BUCKET,
    DEVICE_KEY,
    ACT: tl.constexpr,
    GATED: tl.constexpr,
    STORE_H: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    pid_m, pid_n = grouped_program_id(N_ROWS, E, N_OUT, BLOCK_M, BLOCK_N, GROUP_M)
    expert, row_start, row_end = expert_row_block(pid_m, offsets_ptr, E, BLOCK_M, BLOCK_E)
    if expert < E:
        rows, row_mask, cols, col_mask, w_cols = _block_rows_cols(pid_n, row_start, row_end, N_OUT, BLOCK_M, BLOCK_N)
        tok = tl.load(tok_ptr + rows, mask=row_mask, other=0)  # lanes past the block read token 0
        g, u = _rows_times_w(
            x_ptr, tok, stride_xt, w_ptr + expert * stride_we, w_cols, stride_wn, stride_wk,
            N_OUT, K_DIM, GATED, EVEN_K, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
        )  # fmt: skip
        # Round to the model dtype first: the backward reads h back in that dtype, and so does the
        # reference (nn.Linear output, then the activation).
        g = g.to(a_ptr.dtype.element_ty).to(tl.float32)
        u = u.to(a_ptr.dtype.element_ty).to(tl.float32)
        mask = row_mask[:, None] & col_mask[None, :]
        if STORE_H:
            h_ptrs = h_ptr + rows[:, None] * stride_h + cols[None, :]
            tl.store(h_ptrs, g.to(h_ptr.dtype.element_ty), mask=mask)
            if GATED:
                tl.store(h_ptrs + N_OUT, u.to(h_ptr.dtype.element_ty), mask=mask)
        a = act_forward(g, u, ACT)
        tl.store(a_ptr + rows[:, None] * stride_a + cols[None, :], a.to(a_ptr.dtype.element_ty), mask=mask)


def up_projection(
    x_TD: Tensor, w_in_EID: Tensor, token_ids_N: Tensor, offsets_E: Tensor, activation: str, store_hidden: bool
) -> tuple[Tensor, Tensor]:
    """(a [N, F], h [N, I] or an empty [0, I]): the activated hidden rows in expert order.

    Rows past offsets[-1] (dropped) are left uninitialised; nothing downstream reads them.
    """
    code = activation_code(activation)
    gated = code in GATED_CODES
    N, E = token_ids_N.shape[0], w_in_EID.shape[0]
    I, D = w_in_EID.shape[1], w_in_EID.shape[2]
    F = I // 2 if gated else I
    a_NF = x_TD.new_empty(N, F)
    h_NI = x_TD.new_empty(N if store_hidden else 0, I)
    grid = lambda meta: (row_block_grid(N, E, meta["BLOCK_M"]) * triton.cdiv(F, meta["BLOCK_N"]),)  # noqa: E731
    # With nothing to store, h's pointer is never dereferenced; a's stands in for the empty tensor's.
    h_arg = h_NI if store_hidden else a_NF
    _up_kernel[grid](
        x_TD, w_in_EID, token_ids_N, offsets_E, h_arg, a_NF,
        N, E, D, F,
        x_TD.stride(0), w_in_EID.stride(0), w_in_EID.stride(1), w_in_EID.stride(2),
        h_arg.stride(0), a_NF.stride(0),
        rows_bucket(N), device_key(x_TD),
        ACT=code, GATED=gated, STORE_H=store_hidden, PRECISION=dot_precision(x_TD.dtype), BLOCK_E=next_pow2(E),
    )  # fmt: skip
    return a_NF, h_NI


# --- grouped rows in, scattered (atomic) fp32 rows out -------------------------------------------------


@triton.autotune(
    configs=configs(_ROW_CONFIGS, _TINY, _UNTUNED_ROWS),
    key=_ROW_KEY,
    prune_configs_by={"early_config_prune": prune_row_blocks},
    reset_to_zero=["y_ptr"],  # atomics accumulate: every benchmark run must start from zeros
    **AUTOTUNE_CACHE,
)
@_EVEN_K
@triton.jit
def _scatter_kernel(
    a_ptr,
    w_ptr,
    tok_ptr,
    scale_ptr,
    offsets_ptr,
    y_ptr,
    N_ROWS,
    E,
    K_DIM,
    N_OUT,
    stride_am,
    stride_we,
    stride_wn,
    stride_wk,
    stride_y,
    N_BUCKET,
    DEVICE_KEY,
    HAS_SCALE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    pid_m, pid_n = grouped_program_id(N_ROWS, E, N_OUT, BLOCK_M, BLOCK_N, GROUP_M)
    expert, row_start, row_end = expert_row_block(pid_m, offsets_ptr, E, BLOCK_M, BLOCK_E)
    if expert < E:
        rows, row_mask, cols, col_mask, w_cols = _block_rows_cols(pid_n, row_start, row_end, N_OUT, BLOCK_M, BLOCK_N)
        # Lanes past the block re-read the expert's first row: in bounds, and their results are dropped.
        a_rows = tl.where(row_mask, rows, row_start)
        acc, _ = _rows_times_w(
            a_ptr, a_rows, stride_am, w_ptr + expert * stride_we, w_cols, stride_wn, stride_wk,
            0, K_DIM, False, EVEN_K, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
        )  # fmt: skip
        if HAS_SCALE:
            acc = acc * tl.load(scale_ptr + rows, mask=row_mask, other=0.0)[:, None]
        tok = tl.load(tok_ptr + rows, mask=row_mask, other=0)
        # Several rows (a token's K choices) land on one output row: fp32 atomic adds, order-free.
        tl.atomic_add(
            y_ptr + tok[:, None] * stride_y + cols[None, :],
            acc,
            mask=row_mask[:, None] & col_mask[None, :],
            sem="relaxed",
        )


def scatter_projection(
    a_NK: Tensor,
    w: Tensor,
    w_is_out_in: bool,
    token_ids_N: Tensor,
    offsets_E: Tensor,
    scale_N: Optional[Tensor],
    num_tokens: int,
) -> Tensor:
    """y [T, O] float32, y[tok[n]] += scale[n] * a[n] @ W_e, W_e = w[e]^T if `w_is_out_in` ([E, O, K]) else w[e] ([E, K, O])."""
    N, E = token_ids_N.shape[0], w.shape[0]
    if w_is_out_in:
        O, K = w.shape[1], w.shape[2]
        stride_wn, stride_wk = w.stride(1), w.stride(2)
    else:
        K, O = w.shape[1], w.shape[2]
        stride_wn, stride_wk = w.stride(2), w.stride(1)
    y_TO = torch.zeros(num_tokens, O, device=a_NK.device, dtype=torch.float32)
    grid = lambda meta: (row_block_grid(N, E, meta["BLOCK_M"]) * triton.cdiv(O, meta["BLOCK_N"]),)  # noqa: E731
    _scatter_kernel[grid](
        a_NK, w, token_ids_N, scale_N if scale_N is not None else a_NK, offsets_E, y_TO,
        N, E, K, O,
        a_NK.stride(0), w.stride(0), stride_wn, stride_wk, y_TO.stride(0),
        rows_bucket(N), device_key(a_NK),
        HAS_SCALE=scale_N is not None, PRECISION=dot_precision(w.dtype), BLOCK_E=next_pow2(E),
    )  # fmt: skip
    return y_TO


# --- backward of the down projection, the combine weights and the activation ----------------------------


@triton.autotune(
    configs=configs(_DOWN_BWD_CONFIGS, _TINY, _UNTUNED_ROWS),
    key=_ROW_KEY,
    prune_configs_by={"early_config_prune": prune_row_blocks},
    reset_to_zero=["dscale_ptr"],
    **AUTOTUNE_CACHE,
)
@_EVEN_K
@triton.jit
def _down_bwd_kernel(
    dy_ptr,
    w_ptr,
    tok_ptr,
    scale_ptr,
    offsets_ptr,
    h_ptr,
    a_ptr,
    dh_ptr,
    dscale_ptr,
    N_ROWS,
    E,
    K_DIM,
    N_OUT,
    stride_dy,
    stride_we,
    stride_wn,
    stride_wk,
    stride_h,
    stride_a,
    N_BUCKET,
    DEVICE_KEY,
    ACT: tl.constexpr,
    GATED: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    pid_m, pid_n = grouped_program_id(N_ROWS, E, N_OUT, BLOCK_M, BLOCK_N, GROUP_M)
    expert, row_start, row_end = expert_row_block(pid_m, offsets_ptr, E, BLOCK_M, BLOCK_E)
    if expert < E:
        rows, row_mask, cols, col_mask, w_cols = _block_rows_cols(pid_n, row_start, row_end, N_OUT, BLOCK_M, BLOCK_N)
        tok = tl.load(tok_ptr + rows, mask=row_mask, other=0)  # lanes past the block read token 0
        g, _ = _rows_times_w(
            dy_ptr, tok, stride_dy, w_ptr + expert * stride_we, w_cols, stride_wn, stride_wk,
            0, K_DIM, False, EVEN_K, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
        )  # fmt: skip
        mask = row_mask[:, None] & col_mask[None, :]
        a = tl.load(a_ptr + rows[:, None] * stride_a + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        # d combine weight[n] = <dy[tok n], a[n] @ w_out[e]^T> = <g[n], a[n]>, summed over column blocks
        # (the wrapped columns past N_OUT hold real products: leave them out).
        tl.atomic_add(dscale_ptr + rows, tl.sum(tl.where(mask, g * a, 0.0), axis=1), mask=row_mask, sem="relaxed")
        s = tl.load(scale_ptr + rows, mask=row_mask, other=0.0)
        da = g * s[:, None]
        h_ptrs = h_ptr + rows[:, None] * stride_h + cols[None, :]
        hg = tl.load(h_ptrs, mask=mask, other=0.0).to(tl.float32)
        if GATED:
            hu = tl.load(h_ptrs + N_OUT, mask=mask, other=0.0).to(tl.float32)
        else:
            hu = hg
        dg, du = act_backward(da, hg, hu, ACT)
        dh_ptrs = dh_ptr + rows[:, None] * stride_h + cols[None, :]
        tl.store(dh_ptrs, dg.to(dh_ptr.dtype.element_ty), mask=mask)
        if GATED:
            tl.store(dh_ptrs + N_OUT, du.to(dh_ptr.dtype.element_ty), mask=mask)


def down_backward(
    dy_TD: Tensor,
    w_out_EDF: Tensor,
    token_ids_N: Tensor,
    weights_N: Tensor,
    offsets_E: Tensor,
    h_NI: Tensor,
    a_NF: Tensor,
    activation: str,
) -> tuple[Tensor, Tensor]:
    """(dh [N, I] in the model dtype, d weights [N] float32; zero for dropped rows)."""
    code = activation_code(activation)
    N, E = token_ids_N.shape[0], w_out_EDF.shape[0]
    D, F = w_out_EDF.shape[1], w_out_EDF.shape[2]
    dh_NI = torch.empty_like(h_NI)
    dweights_N = torch.zeros(N, device=dy_TD.device, dtype=torch.float32)
    grid = lambda meta: (row_block_grid(N, E, meta["BLOCK_M"]) * triton.cdiv(F, meta["BLOCK_N"]),)  # noqa: E731
    _down_bwd_kernel[grid](
        dy_TD, w_out_EDF, token_ids_N, weights_N, offsets_E, h_NI, a_NF, dh_NI, dweights_N,
        N, E, D, F,
        dy_TD.stride(0), w_out_EDF.stride(0), w_out_EDF.stride(2), w_out_EDF.stride(1), h_NI.stride(0), a_NF.stride(0),
        rows_bucket(N), device_key(dy_TD),
        ACT=code, GATED=code in GATED_CODES, PRECISION=dot_precision(w_out_EDF.dtype), BLOCK_E=next_pow2(E),
    )  # fmt: skip
    return dh_NI, dweights_N


# --- expert weight gradients -------------------------------------------------------------------------------


@triton.autotune(
    configs=configs(_WGRAD_CONFIGS, _WGRAD_TINY, _UNTUNED_WGRAD),
    key=["N_BUCKET", "E", "O_DIM", "I_DIM", "DEVICE_KEY"],
    **AUTOTUNE_CACHE,
)
@triton.jit
def _wgrad_kernel(
    g_ptr,
    x_ptr,
    g_idx_ptr,
    x_idx_ptr,
    scale_ptr,
    offsets_ptr,
    dw_ptr,
    E,
    O_DIM,
    I_DIM,
    stride_g,
    stride_x,
    stride_we,
    stride_wo,
    N_BUCKET,
    DEVICE_KEY,
    GATHER_G: tl.constexpr,
    GATHER_X: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_O: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    pid = tl.program_id(0)
    expert = tl.program_id(1)
    blocks_i = tl.cdiv(I_DIM, BLOCK_I)
    o = (pid // blocks_i) * BLOCK_O + tl.arange(0, BLOCK_O)
    i = (pid % blocks_i) * BLOCK_I + tl.arange(0, BLOCK_I)
    o_mask = o < O_DIM
    i_mask = i < I_DIM
    start = tl.load(offsets_ptr + expert - 1, mask=expert > 0, other=0)
    end = tl.load(offsets_ptr + expert)
    acc = tl.zeros([BLOCK_O, BLOCK_I], dtype=tl.float32)
    r = tl.arange(0, BLOCK_R)
    # Experts with no rows skip the loop and store zeros, as their gradient is.
    for r0 in range(start, end, BLOCK_R):
        rows = r0 + r
        row_mask = rows < end
        if GATHER_G:
            g_rows = tl.load(g_idx_ptr + rows, mask=row_mask, other=0)
        else:
            g_rows = rows
        if GATHER_X:
            x_rows = tl.load(x_idx_ptr + rows, mask=row_mask, other=0)
        else:
            x_rows = rows
        x = tl.load(x_ptr + x_rows[:, None] * stride_x + i[None, :], mask=row_mask[:, None] & i_mask[None, :], other=0.0)
        g_t = tl.load(g_ptr + g_rows[None, :] * stride_g + o[:, None], mask=o_mask[:, None] & row_mask[None, :], other=0.0)
        if HAS_SCALE:
            g_t = g_t.to(tl.float32) * tl.load(scale_ptr + rows, mask=row_mask, other=0.0)[None, :]
        acc = mma(g_t.to(x.dtype), x, acc, PRECISION)
    dw_ptrs = dw_ptr + expert * stride_we + o[:, None] * stride_wo + i[None, :]
    tl.store(dw_ptrs, acc.to(dw_ptr.dtype.element_ty), mask=o_mask[:, None] & i_mask[None, :])


def weight_gradient(
    g_RO: Tensor,
    x_RI: Tensor,
    offsets_E: Tensor,
    num_rows: int,
    g_index_N: Optional[Tensor] = None,
    x_index_N: Optional[Tensor] = None,
    scale_N: Optional[Tensor] = None,
    out_dtype: Optional[torch.dtype] = None,
) -> Tensor:
    """dW [E, O, I], dW[e] = sum over rows n of group e of (scale[n] * g[gi(n)])^T x[xi(n)].

    gi / xi are `g_index` / `x_index` when given (rows read in token order through the plan) or n.
    """
    E, O, I = offsets_E.shape[0], g_RO.shape[1], x_RI.shape[1]
    dw_EOI = torch.empty(E, O, I, device=x_RI.device, dtype=out_dtype or x_RI.dtype)
    grid = lambda meta: (triton.cdiv(O, meta["BLOCK_O"]) * triton.cdiv(I, meta["BLOCK_I"]), E)  # noqa: E731
    _wgrad_kernel[grid](
        g_RO, x_RI,
        g_index_N if g_index_N is not None else offsets_E, x_index_N if x_index_N is not None else offsets_E,
        scale_N if scale_N is not None else g_RO, offsets_E, dw_EOI,
        E, O, I, g_RO.stride(0), x_RI.stride(0), dw_EOI.stride(0), dw_EOI.stride(1),
        rows_bucket(num_rows), device_key(x_RI),
        GATHER_G=g_index_N is not None, GATHER_X=x_index_N is not None, HAS_SCALE=scale_N is not None,
        PRECISION=dot_precision(x_RI.dtype),
    )  # fmt: skip
    return dw_EOI
