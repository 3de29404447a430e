"""The small-batch (decode) backend: only the experts that got rows, their weights read once.

Legend: T tokens, D model width, F hidden width, I in-projection rows (2F gated), E experts, N plan rows,
n rows of one expert (a handful when decoding).

With a few rows per expert the expert GEMMs are bounded by reading the weights, not by arithmetic, and
a BLAS `x @ W^T` on a few rows reads them several times more slowly than a copy would. In float32 and
bfloat16 on the CPU the whole expert stage (gather, every expert, weighted combine) runs in one call of
the native kernel (`sparsemoe.ops.cpu_kernels`: each weight row streamed once against the expert's rows,
OpenMP threads over blocks of weight rows; bfloat16 weights read as they are and widened in registers).
In plain eager mode the op's function is called directly: the `torch.library` dispatcher costs a
visible share of a one-token step, and only the compiler and dispatch modes need the op. Weights that
kernel does not take, stored [in, out] and read through a transposed view (as some Hugging Face families
keep them), go through the native grouped linear kernel one projection at a time. Without the native
kernels (no C compiler), in bfloat16/float16 the native grouped GEMM (`torch._grouped_mm`) is faster
than per-expert calls and is used; in float32 the loop below runs each GEMM weight-stationary, `W @ x^T`
with W split into one row block per thread as one `bmm`, for experts with up to `_STATIONARY_MAX_ROWS`
rows. Inputs are gathered and outputs combined once for all experts (N is small).
Without gradients this path runs as plain tensor code; with gradients it hands over to the fused op
(`sparsemoe.dispatch.fused`), whose backward is exact and shared with the grouped backend.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from sparsemoe.dispatch.fused import add_rows
from sparsemoe.dispatch.grouped import grouped_forward
from sparsemoe.dispatch.plan import DispatchPlan
from sparsemoe.experts import Experts, activate
from sparsemoe.ops import cpu_kernels
from sparsemoe.ops.grouped_mm import native_grouped_mm, use_native

# The native kernel (sparsemoe.ops.cpu_kernels) beats BLAS's grouped GEMMs up to about this many rows per
# expert on average: 40 in float32, 8 in bfloat16 (on a CPU with AVX512-BF16, whose bfloat16 dot products
# the BLAS GEMMs use while the kernel computes in float32). Measured by `sparsemoe bench` forward over T
# (mixtral-mini, fine-grained: decode ahead up to 64 rows a layer with random routing) and by whole-model
# prefill of mixtral-1k in float32, whose routing is uneven (docs/benchmarks.md): decode ahead at 32 rows
# per expert on average, behind from 48; above that the expert GEMMs are compute bound and BLAS is faster.
KERNEL_MAX_ROWS_PER_EXPERT = {torch.float32: 40, torch.bfloat16: 8}

# Up to this many rows per expert the weight-stationary form wins (measured with torch.mm / torch.bmm on
# the expert shapes of `sparsemoe bench`, 2 threads: at 1-16 rows `x @ W^T` takes 3-6x the time of
# summing W; the split `W @ x^T` 1.0-1.1x for one row and 1.2-3.5x up to 16).
_STATIONARY_MAX_ROWS = 16


def _row_blocks(rows: int) -> int:
    """Row blocks of W for `bmm`, one per thread, so that a one-row GEMV uses every core's bandwidth."""
    threads = torch.get_num_threads()
    for parts in (threads, 2):
        if 1 < parts <= threads and rows % parts == 0:
            return parts
    return 1


def _linear(x_nK: Tensor, w_OK: Tensor) -> Tensor:
    """x @ w.T [n, O] for n rows, in the weight-stationary form (W @ x^T) when n is small."""
    n = x_nK.shape[0]
    if n > _STATIONARY_MAX_ROWS:
        return torch.mm(x_nK, w_OK.t())
    O, K = w_OK.shape
    parts = _row_blocks(O)
    if parts == 1:
        return torch.mm(w_OK, x_nK.t()).t()
    h = torch.bmm(w_OK.view(parts, O // parts, K), x_nK.t().expand(parts, K, n))  # [parts, O/parts, n]
    return h.view(O, n).t()


def _forward_only(x_TD: Tensor, weights: Optional[Tensor], experts: Experts) -> bool:
    """No gradient wanted from the expert stage and no dropout: what the paths without autograd need (weights
    None: the combine weights carry no gradient)."""
    weights_grad = weights is not None and weights.requires_grad
    needs_grad = torch.is_grad_enabled() and (
        x_TD.requires_grad or weights_grad or experts.w_in.requires_grad or experts.w_out.requires_grad
    )
    return not needs_grad and not (experts.dropout > 0 and experts.training)


def decode_forward(x_TD: Tensor, plan: DispatchPlan, experts: Experts) -> Tensor:
    if not _forward_only(x_TD, plan.weights, experts):
        return grouped_forward(x_TD, plan, experts)  # the same exact backward as `grouped`
    op = _decode_mlp if cpu_kernels.plain_eager(x_TD) else decode_mlp
    return op(
        x_TD.contiguous(), plan.token_ids, plan.weights, plan.offsets, experts.w_in, experts.w_out, experts.activation
    )


def decode_from_choices_applies(x_TD: Tensor, weights: Optional[Tensor], experts) -> bool:
    """Whether `decode_from_choices` takes these: plain `Experts` whose weights the kernel takes, a plain CPU
    tensor, no gradient (weights: the combine weights, or None for none) and no dropout."""
    return (
        type(experts) is Experts
        and cpu_kernels.plain_eager(x_TD)
        and _forward_only(x_TD, weights, experts)
        and cpu_kernels.supports(x_TD, experts.w_in, experts.w_out, experts.activation)
    )


def decode_from_choices(x_TD: Tensor, expert_ids: Tensor, weights: Tensor, top_k: int, experts: Experts) -> Tensor:
    """The expert stage straight from a router's token-major top-k choices ([T*K] each), with no plan: one
    call of the native kernel, which groups the rows itself. Check `decode_from_choices_applies` first."""
    return cpu_kernels.decode_mlp_choices(x_TD, expert_ids, weights, top_k, experts.w_in, experts.w_out, experts.activation)


def _decode_mlp(
    x_TD: Tensor, token_ids: Tensor, weights: Tensor, offsets: Tensor, w_in: Tensor, w_out: Tensor, activation: str
) -> Tensor:
    """Forward only: y [T, D] float32 from the expert-sorted plan rows (rows past offsets[-1] dropped)."""
    if cpu_kernels.supports(x_TD, w_in, w_out, activation):
        # float32 / bfloat16: the native CPU kernel runs the whole stage in one call (gather, every expert,
        # combine), close to the weight-read bound.
        return cpu_kernels.decode_mlp(x_TD, token_ids, weights, offsets, w_in, w_out, activation)
    T, D = x_TD.shape
    # Device-to-host sync: the loop needs the group bounds on the host; free on the CPU.
    bounds = [0] + offsets.tolist()
    kept = bounds[-1]
    x_ND = x_TD.index_select(0, token_ids[:kept])
    y_TD = torch.zeros(T, D, dtype=torch.float32, device=x_TD.device)
    if cpu_kernels.supports_linear(x_ND, w_in) and cpu_kernels.supports_linear(x_ND, w_out):
        # Weights the whole-stage kernel does not take (stored [in, out], read through a transposed view):
        # each projection streamed once by the grouped linear kernel, h and act(h) in float32 as there.
        a_NF = activate(cpu_kernels.grouped_linear(x_ND, offsets, w_in), activation)
        o_ND = cpu_kernels.grouped_linear(a_NF, offsets, w_out)
    elif use_native(x_ND, w_in) and use_native(x_ND, w_out):
        # bfloat16/float16: the native grouped kernel beats per-expert BLAS calls at every small T measured.
        # x_ND holds exactly the kept rows (offsets[-1] of them), so no row is left past the last group.
        a_NF = activate(native_grouped_mm(x_ND, w_in, offsets), activation)
        o_ND = native_grouped_mm(a_NF, w_out, offsets).float()
    else:
        o_ND = torch.empty(kept, D, dtype=torch.float32, device=x_TD.device)
        for e in range(w_in.shape[0]):
            lo, hi = bounds[e], bounds[e + 1]
            if hi > lo:
                o_ND[lo:hi] = _linear(activate(_linear(x_ND[lo:hi], w_in[e]), activation), w_out[e])
    add_rows(y_TD, token_ids[:kept], o_ND, weights[:kept])
    return y_TD


# The same function as an opaque op (with a fake implementation) for the compiler: its loop's bounds come
# from the data.
decode_mlp = torch.library.custom_op("sparsemoe::decode_mlp", _decode_mlp, mutates_args=())


@decode_mlp.register_fake
def _decode_mlp_fake(x_TD, token_ids, weights, offsets, w_in, w_out, activation):
    return x_TD.new_empty(x_TD.shape, dtype=torch.float32)
