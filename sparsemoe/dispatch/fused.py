"""The whole expert stage as one op: gather -> GEMM -> activation -> GEMM -> weighted combine, and its backward.

Legend: T tokens, D model width, F hidden width, I in-projection rows (2F gated, F otherwise), E experts,
N plan rows, n rows of one expert.

    y_TD = expert_mlp(x_TD, plan, w_in [E, I, D], w_out [E, D, F])    (float32, like every backend)
    y[t] = sum over the kept plan rows r of token t:  weight[r] * w_out[e_r] @ act(w_in[e_r] @ x[t])

Why one op rather than autograd over gather / grouped GEMM / activation / scatter-add:
* memory: it saves only the in-projection outputs h [N, I] (or nothing with `recompute=True`; then the
  backward recomputes them with one extra GEMM), where autograd keeps the gathered rows, h, the
  activation's intermediates and the hidden activations, i.e. about twice as much;
* speed: rows are gathered, multiplied, activated and combined a run of experts at a time (about
  `_CHUNK_ROWS` rows) while they are in cache, so the [N, D] row buffers of the unfused path (and their
  zero-filling) are never made;
* the router-weight gradient needs no saved expert output: d weight[r] = <dy[t], a_r W_out^T> =
  <dy[t] W_out, a_r>, and dy[t] W_out is the down projection's input gradient, computed anyway.
* the activation, and in backward the activation's gradient together with the router-weight gradient,
  are one pass over each row with the native CPU kernels (`sparsemoe.ops.cpu_kernels`) in float32 on
  the CPU, and PyTorch elementwise ops otherwise.
The loop runs over experts (never tokens) and skips experts without rows, so a decode step reads only
the weights of the experts it uses.

With a few rows per expert (a small batch: `NATIVE_MAX_ROWS_PER_EXPERT`) the per-expert BLAS calls run far
below the memory bound and a layer of many experts costs hundreds of calls; there, on the CPU, the forward
is the decode kernel keeping h (`cpu_kernels.decode_mlp(..., h_keep=)`) and the backward one native call
that reads each weight once and writes each weight gradient once (`sparsemoe.ops.expert_backward`).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from sparsemoe.experts import activate
from sparsemoe.ops import cpu_kernels
from sparsemoe.ops.expert_backward import expert_backward as native_backward
from sparsemoe.ops.memory import empty_huge

_GATED = ("swiglu", "geglu")

# `sparsemoe profile` turns this on to label the stages below for torch.profiler; off, a label costs
# one global lookup, so the hot loop carries no profiler overhead.
_LABEL_STAGES = False


def label_stages(enabled: bool) -> None:
    """Label the op's stages (permute, gemm_in, activation, gemm_out, combine and backward; native: the whole
    stage in one native call, small batches) for the profiler."""
    global _LABEL_STAGES
    _LABEL_STAGES = enabled


_NO_LABEL = contextlib.nullcontext()  # reusable: entering it does nothing


def _stage(name: str):
    return torch.profiler.record_function("sparsemoe." + name) if _LABEL_STAGES else _NO_LABEL


def _bounds(offsets: Tensor) -> list[int]:
    # Device-to-host sync: the per-expert loop needs the group sizes on the host. On the CPU it is free.
    return [0] + offsets.tolist()


# Up to this many rows per expert with rows, on average, the native small-batch kernels run the op (module
# docstring). Measured forward+backward against the per-expert loop on the same inputs, 2 threads, random
# routing, SwiGLU (native / loop): float32, fine-grained (D=512, F=256, 64 experts, top-8) 2 rows per
# expert 0.46-0.59, 8 rows 0.66-0.75, 12 rows 0.77, 16 rows 0.84, 24 rows 0.95, 32 rows 1.01; mixtral-mini
# (D=512, F=1408, 8 experts, top-2) 4 rows 0.49-0.63, 16 rows 0.67-0.92, 24 rows 1.02, 32 rows 0.92-1.19.
# bfloat16 (the loop's GEMMs use the CPU's bfloat16 dot products, the kernels widen to float32):
# fine-grained 2 rows 0.41-0.54, 8 rows 0.61-0.78, 12 rows 0.89, 16 rows 0.94-1.30; mixtral-mini 4 rows
# 0.62-0.75, 16 rows 1.41-1.88.
NATIVE_MAX_ROWS_PER_EXPERT = {torch.float32: 16, torch.bfloat16: 6}


def _native_rows(x_TD: Tensor, w_in: Tensor, w_out: Tensor, activation: str, bounds: list[int]) -> bool:
    """Whether the native small-batch kernels run the op: few rows per expert with rows, and inputs they take."""
    limit = NATIVE_MAX_ROWS_PER_EXPERT.get(x_TD.dtype, 0)
    if not cpu_kernels.supports(x_TD, w_in, w_out, activation):  # the backward kernel's conditions too
        return False
    used = sum(hi > lo for lo, hi in zip(bounds, bounds[1:]))
    return bounds[-1] <= limit * used


def _hidden(h_nI: Tensor, activation: str) -> Tensor:
    if cpu_kernels.supports_activation(h_nI, activation):
        return cpu_kernels.activate(h_nI, activation)  # one pass instead of three elementwise ops
    return activate(h_nI, activation)


def _hidden_and_gate(h_nI: Tensor, activation: str) -> tuple[Tensor, Optional[Tensor]]:
    """(act(h) [n, F], the activated gate [n, F] for gated activations, else None).

    Same arithmetic as `experts.activate`; the activated gate is kept so the backward need not redo it.
    """
    if activation not in _GATED:
        return activate(h_nI, activation), None
    gate, up = h_nI.chunk(2, dim=-1)
    act_gate = F.silu(gate) if activation == "swiglu" else F.gelu(gate, approximate="tanh")
    return act_gate * up, act_gate


def _activation_backward(dA_nF: Tensor, h_nI: Tensor, activation: str, act_gate: Optional[Tensor]) -> Tensor:
    """d loss / d h [n, I] from d loss / d act(h) [n, F]: the exact derivative of `experts.activate`."""
    aten = torch.ops.aten
    if activation in _GATED:
        half = h_nI.shape[1] // 2
        gate, up = h_nI[:, :half], h_nI[:, half:]
        dH = torch.empty_like(h_nI)
        torch.mul(dA_nF, act_gate, out=dH[:, half:])
        d_act_gate = dA_nF.mul_(up)  # dA is not needed after this: reuse its memory
        if activation == "swiglu":
            dH[:, :half] = aten.silu_backward(d_act_gate, gate)
        else:
            dH[:, :half] = aten.gelu_backward(d_act_gate, gate, approximate="tanh")
        return dH
    if activation == "relu":
        return aten.threshold_backward(dA_nF, h_nI, 0)
    return aten.gelu_backward(dA_nF, h_nI, approximate="tanh")


# Rows are gathered and combined for a run of consecutive experts at once (at least this many rows, or
# all of them when there are fewer): fewer small index ops, a few MiB of buffers whatever T is.
_CHUNK_ROWS = 1024


def _chunks(bounds: list[int]) -> Iterator[tuple[int, int, list[tuple[int, int, int]]]]:
    """(first row, end row, [(expert, lo, hi) relative to the first row]) over the experts that have rows.

    The plan sorts rows by expert, so a run of consecutive experts owns one contiguous range of rows.
    """
    run: list[tuple[int, int, int]] = []
    start = 0
    for e in range(len(bounds) - 1):
        lo, hi = bounds[e], bounds[e + 1]
        if hi == lo:
            continue
        if not run:
            start = lo
        run.append((e, lo - start, hi - start))
        if hi - start >= _CHUNK_ROWS:
            yield start, hi, run
            run = []
    if run:
        yield start, start + run[-1][2], run


# bfloat16 and float16 GEMMs on the CPU run on oneDNN, which builds a kernel for every new shape (and caches
# it): the GEMM of an expert of about 1,000 rows (D=128, F=256) took 0.60-0.68 ms on row counts not seen
# before and 0.19-0.23 ms on the same again (`python tools/gemm_new_shapes.py --threads 2`; float32 0.32-0.34
# both ways). An expert's row count changes from step to step, so nearly every expert GEMM of a bfloat16 training step
# built a new kernel (186 of the demo model's 192 per step, `ONEDNN_VERBOSE=2`). There the loop runs each
# expert's GEMMs on its rows rounded up to a bucket of 1/_BUCKETS_PER_OCTAVE of their power of two (at most
# 1/16 more rows, 16 shapes per power of two), reading the rows that follow (the next expert's, or zero rows
# of slack after the last) and writing rows that the next expert overwrites, or slack. Rows added to a
# reduction (the weight gradients) are zero on one side. float32 GEMMs (MKL) have no per-shape cost. Below 64
# rows the bucket is 4 rows: a 256-token bfloat16 prefill of mixtral-1k (about 64 rows per expert) took 287
# ms with these buckets, 299 with buckets of at least 16 rows, and 281 on exact row counts whose kernels were
# built already (the same prompt again; one process, 6 interleaved rounds).
_BUCKETS_PER_OCTAVE = 16
_MIN_BUCKET_ROWS = 4


def _bucketing(x: Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16)


def _bucket(n: int, bucketing: bool) -> int:
    """The rows an expert's GEMMs run on: n, or with bucketing n rounded up to its bucket."""
    if not bucketing or n == 0:
        return n
    step = max(_MIN_BUCKET_ROWS, (1 << (n.bit_length() - 1)) // _BUCKETS_PER_OCTAVE)
    return -(-n // step) * step


def _slack(bucketing: bool, bounds: list[int]) -> int:
    """Rows past the end of a buffer of plan rows that a bucketed GEMM may read or write."""
    if not bucketing:
        return 0
    return max((_bucket(hi - lo, True) - (hi - lo) for lo, hi in zip(bounds, bounds[1:])), default=0)


def _gather(x_TD: Tensor, tok: Tensor, slack: int) -> Tensor:
    """x rows tok [n, D] followed by `slack` zero rows."""
    if not slack:
        return x_TD.index_select(0, tok)
    out = x_TD.new_empty(tok.shape[0] + slack, x_TD.shape[1])
    torch.index_select(x_TD, 0, tok, out=out[: tok.shape[0]])
    out[tok.shape[0] :].zero_()
    return out


def _zero_padded(rows: Tensor, nb: int) -> Tensor:
    """rows [n, K] followed by zero rows up to nb (rows itself when nb = n)."""
    if nb == rows.shape[0]:
        return rows
    out = rows.new_empty(nb, rows.shape[1])
    out[: rows.shape[0]] = rows
    out[rows.shape[0] :].zero_()
    return out


@torch.library.custom_op("sparsemoe::expert_mlp", mutates_args=())
def expert_mlp_forward(
    x_TD: Tensor,
    token_ids: Tensor,
    weights: Tensor,
    offsets: Tensor,
    w_in: Tensor,
    w_out: Tensor,
    activation: str,
    save_hidden: bool,
) -> tuple[Tensor, Tensor]:
    """(y [T, D] float32, h [N, I] saved for backward, or an empty tensor when `save_hidden` is False)."""
    N, I = token_ids.shape[0], w_in.shape[1]
    bounds = _bounds(offsets)
    if _native_rows(x_TD, w_in, w_out, activation, bounds):
        h_NI = empty_huge(N if save_hidden else 0, I, dtype=x_TD.dtype, device=x_TD.device)
        with _stage("native"):
            y_TD = cpu_kernels.decode_mlp(
                x_TD, token_ids, weights, offsets, w_in, w_out, activation, h_keep=h_NI if save_hidden else None
            )
        return y_TD, h_NI
    slack = _slack(_bucketing(x_TD), bounds)  # the bucketed GEMMs may write past row N
    h_buffer = empty_huge(N + slack if save_hidden else 0, I, dtype=x_TD.dtype, device=x_TD.device)
    y_TD = forward_by_expert(
        x_TD, token_ids, weights, offsets, lambda e: (w_in[e], w_out[e]), activation, h_buffer if save_hidden else None,
        bounds,
    )
    return y_TD, h_buffer[:N] if save_hidden else h_buffer


def forward_by_expert(
    x_TD: Tensor, token_ids: Tensor, weights: Tensor, offsets: Tensor,
    expert_weights: Callable[[int], tuple[Tensor, Tensor]], activation: str, h_NI: Optional[Tensor] = None,
    bounds: Optional[list[int]] = None,
) -> Tensor:
    """y [T, D] float32 over expert-sorted plan rows, a run of experts at a time (the module docstring), with
    expert e's weights (w_in [I, D], w_out [D, F]) from `expert_weights(e)`, asked for once per expert with
    rows and used before the next is asked for (so it may return the same buffers each time, refilled).
    h_NI [N + slack, I]: where to keep the in-projection outputs for a backward (rows past N: scratch of the
    bucketed GEMMs, see _bucket), or None. bounds: `_bounds(offsets)` where the caller has them already (on a
    GPU reading the offsets waits for the device)."""
    T, D = x_TD.shape
    y_TD = x_TD.new_zeros(T, D, dtype=torch.float32)
    bounds = _bounds(offsets) if bounds is None else bounds
    bucketing = _bucketing(x_TD)
    slack = _slack(bucketing, bounds)
    for start, end, run in _chunks(bounds):
        tok = token_ids[start:end]
        with _stage("permute"):
            x_cD = _gather(x_TD, tok, slack)
        o_cD = x_TD.new_empty(end - start + slack, D)
        for e, lo, hi in run:
            w_in_e, w_out_e = expert_weights(e)
            nb = _bucket(hi - lo, bucketing)
            with _stage("gemm_in"):
                w = w_in_e.t()
                if h_NI is None:
                    h_bI = x_cD[lo : lo + nb] @ w
                else:
                    h_bI = torch.mm(x_cD[lo : lo + nb], w, out=h_NI[start + lo : start + lo + nb])
            with _stage("activation"):
                a_bF = _hidden(h_bI, activation)  # rows past hi - lo: discarded
            with _stage("gemm_out"):
                torch.mm(a_bF, w_out_e.t(), out=o_cD[lo : lo + nb])
        with _stage("combine"):
            add_rows(y_TD, tok, o_cD[: end - start], weights[start:end])
    return y_TD


def add_rows(y_TD: Tensor, token_ids: Tensor, rows_nD: Tensor, weights: Optional[Tensor] = None) -> None:
    """y[token_ids[r]] += weights[r] * rows[r] in float32 (weights None: 1); rows is scratch (may be overwritten).

    One pass of the native kernel on the CPU; elsewhere a float32 copy, a multiply and index_add_ (on the CPU
    those three took 12.9 ms where the native pass takes 2.0 ms, a [16384, 512] bfloat16 combine, 2 threads)."""
    if cpu_kernels.supports_scatter(y_TD, rows_nD):
        cpu_kernels.scatter_add_rows(y_TD, token_ids, rows_nD, weights)
        return
    rows_nD = rows_nD.float()  # no copy when float32
    y_TD.index_add_(0, token_ids, rows_nD if weights is None else rows_nD.mul_(weights[:, None]))


@expert_mlp_forward.register_fake
def _expert_mlp_forward_fake(x_TD, token_ids, weights, offsets, w_in, w_out, activation, save_hidden):
    N = token_ids.shape[0] if save_hidden else 0
    return x_TD.new_empty(x_TD.shape, dtype=torch.float32), x_TD.new_empty(N, w_in.shape[1])


@torch.library.custom_op("sparsemoe::expert_mlp_backward", mutates_args=())
def expert_mlp_backward(
    grad_y_TD: Tensor,
    x_TD: Tensor,
    token_ids: Tensor,
    weights: Tensor,
    offsets: Tensor,
    w_in: Tensor,
    w_out: Tensor,
    h_NI: Tensor,
    activation: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(d x [T, D], d weights [N] float32, d w_in [E, I, D], d w_out [E, D, F]).

    h_NI is the saved in-projection output, or empty: then each expert's h is recomputed here.
    """
    dtype = x_TD.dtype
    recompute = h_NI.shape[0] == 0
    bounds = _bounds(offsets)
    if _native_rows(x_TD, w_in, w_out, activation, bounds):
        if recompute:  # h as the forward computed it: float32 sums, rounded to the activation dtype
            with _stage("backward.recompute"):
                h_NI = cpu_kernels.grouped_linear(x_TD.index_select(0, token_ids), offsets, w_in).to(dtype)
        with _stage("backward.native"):
            dx_TD, d_weights, dw_in, dw_out = native_backward(
                grad_y_TD, x_TD, token_ids, weights, offsets, w_in, w_out, h_NI, activation
            )
        return dx_TD.to(dtype), d_weights, dw_in, dw_out
    g_TD = grad_y_TD.to(dtype)  # the expert GEMMs run in the activation dtype; float32 stays float32
    w_N1 = weights.to(dtype).unsqueeze(1)
    dx_TD = torch.zeros(x_TD.shape, dtype=torch.float32, device=x_TD.device)
    d_weights = torch.zeros(token_ids.shape[0], dtype=torch.float32, device=x_TD.device)
    # E experts' weight gradients: fresh, large, and written once; huge pages save most of the page faults.
    dw_in = empty_huge(*w_in.shape, dtype=w_in.dtype, device=w_in.device)
    dw_out = empty_huge(*w_out.shape, dtype=w_out.dtype, device=w_out.device)
    for e in range(w_in.shape[0]):
        if bounds[e + 1] == bounds[e]:  # an expert without rows gets a zero gradient
            dw_in[e].zero_()
            dw_out[e].zero_()
    bucketing = _bucketing(x_TD)
    slack = _slack(bucketing, bounds)
    for start, end, run in _chunks(bounds):
        tok = token_ids[start:end]
        with _stage("backward.permute"):
            x_cD = _gather(x_TD, tok, slack)
            g_cD = _gather(g_TD, tok, slack)
        dx_cD = x_TD.new_empty(end - start + slack, x_TD.shape[1])
        for e, lo, hi in run:
            rows = slice(start + lo, start + hi)  # this expert's plan rows
            n, nb = hi - lo, _bucket(hi - lo, bucketing)  # GEMMs over nb rows (see _bucket)
            if recompute:
                with _stage("backward.recompute"):
                    h_nI = (x_cD[lo : lo + nb] @ w_in[e].t())[:n]
            else:
                h_nI = h_NI[rows]
            with _stage("backward.gemm_out"):
                dAu_nF = (g_cD[lo : lo + nb] @ w_out[e])[:n]  # d loss / d a of the expert output before weighting
            with _stage("backward.activation"):
                # aw and dH over nb rows, the added ones zero: in the products below they add nothing
                aw_bF, dH_bI, d_weights[rows] = _activation_and_backward(h_nI, dAu_nF, w_N1[rows], activation, nb)
            with _stage("backward.gemm_out"):
                torch.mm(g_cD[lo : lo + nb].t(), aw_bF, out=dw_out[e])  # = (w dy)^T act(h)
            with _stage("backward.gemm_in"):
                torch.mm(dH_bI.t(), x_cD[lo : lo + nb], out=dw_in[e])
                torch.mm(dH_bI, w_in[e], out=dx_cD[lo : lo + nb])
        with _stage("backward.permute"):
            add_rows(dx_TD, tok, dx_cD[: end - start])
    return dx_TD.to(dtype), d_weights, dw_in, dw_out


def _activation_and_backward(
    h_nI: Tensor, dAu_nF: Tensor, w_n1: Tensor, activation: str, rows: int
) -> tuple[Tensor, Tensor, Tensor]:
    """(aw = w act(h) [rows, F], dH [rows, I], d weights [n] float32) for the n rows weighted by w, given dAu
    (see above); aw and dH have `rows` >= n rows, those past n zero (for the bucketed GEMMs, see _bucket).

    aw gives the out-projection's weight gradient dy^T aw; d weights[r] = <dAu[r], act(h[r])>; dH =
    act'(h) * (w dAu). One pass of the native CPU kernel in float32 and bfloat16 on the CPU, written
    straight into the padded buffers, else PyTorch ops (dAu is overwritten).
    """
    n, I = h_nI.shape
    if cpu_kernels.supports_activation(h_nI, activation):
        aw_bF, dH_bI = h_nI.new_empty(rows, dAu_nF.shape[1]), h_nI.new_empty(rows, I)
        aw_bF[n:].zero_()
        dH_bI[n:].zero_()
        _, _, d_w = cpu_kernels.activation_backward(
            h_nI, dAu_nF, w_n1.reshape(-1), activation, out=(aw_bF[:n], dH_bI[:n])
        )
        return aw_bF, dH_bI, d_w
    a_nF, act_gate = _hidden_and_gate(h_nI, activation)
    d_w = _row_dot(dAu_nF, a_nF)
    dH_nI = _activation_backward(dAu_nF.mul_(w_n1), h_nI, activation, act_gate)
    return _zero_padded(a_nF.mul_(w_n1), rows), _zero_padded(dH_nI, rows), d_w


def _row_dot(a_nF: Tensor, b_nF: Tensor) -> Tensor:
    """Row-wise dot products in float32 -> [n]."""
    if a_nF.dtype == torch.float32:
        return (a_nF * b_nF).sum(1)
    return (a_nF.float() * b_nF.float()).sum(1)


@expert_mlp_backward.register_fake
def _expert_mlp_backward_fake(grad_y_TD, x_TD, token_ids, weights, offsets, w_in, w_out, h_NI, activation):
    return (
        torch.empty_like(x_TD),
        x_TD.new_empty(token_ids.shape[0], dtype=torch.float32),
        torch.empty_like(w_in),
        torch.empty_like(w_out),
    )


def _setup_context(ctx, inputs, output) -> None:
    x_TD, token_ids, weights, offsets, w_in, w_out, activation, _save_hidden = inputs
    ctx.activation = activation
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)  # else autograd zero-fills a gradient [N, I] for the saved h
    ctx.save_for_backward(x_TD, token_ids, weights, offsets, w_in, w_out, output[1])


def _backward(ctx, grad_y_TD: Tensor, _grad_h):
    if grad_y_TD is None:  # gradients are not materialised: y did not reach the loss
        return (None,) * 8
    x_TD, token_ids, weights, offsets, w_in, w_out, h_NI = ctx.saved_tensors
    dx, d_weights, dw_in, dw_out = expert_mlp_backward(
        grad_y_TD.contiguous(), x_TD, token_ids, weights, offsets, w_in, w_out, h_NI, ctx.activation
    )
    needs = ctx.needs_input_grad
    return (
        dx if needs[0] else None,
        None,
        d_weights if needs[2] else None,
        None,
        dw_in if needs[4] else None,
        dw_out if needs[5] else None,
        None,
        None,
    )


expert_mlp_forward.register_autograd(_backward, setup_context=_setup_context)


def expert_mlp(
    x_TD: Tensor, token_ids: Tensor, weights: Tensor, offsets: Tensor, w_in: Tensor, w_out: Tensor, activation: str,
    recompute: bool = False,
) -> Tensor:
    """The expert stage over expert-sorted plan rows -> y [T, D] float32 (see the module docstring)."""
    save = not recompute and torch.is_grad_enabled() and any(
        t.requires_grad for t in (x_TD, weights, w_in, w_out)
    )
    y_TD, _ = expert_mlp_forward(x_TD.contiguous(), token_ids, weights, offsets, w_in, w_out, activation, save)
    return y_TD
