"""The native passes for the small parts of a step (`csrc/finite.c`, `csrc/norm.c`, `csrc/decode_attention.c`,
the counting sort in `csrc/scatter_rows.c`), each where PyTorch runs several small ops with their temporaries,
which at a one-token decode step cost more than their arithmetic.

    all_finite(values) -> whether no value is NaN or inf (one pass, no temporaries)
    sort_by_expert(expert_ids [N], E) -> (order, sorted ids, slots, counts [E], ends [E]): the dispatch plan's
        stable sort by expert as one counting sort
    topk_route(logits, K, score_func, renormalize, scale) -> (ids, weights, probs): token-choice top-k routing
        in one pass per token (inference)
    rms_norm(x, weight, eps) -> RMSNorm over the last dim in one pass (inference)
    argmax_rows(x [n, V]) -> [n] int64: torch.argmax over the last dim (greedy decoding's pick)
    decode_attention(q, k, v, (cos, sin), cache_k, cache_v, past, window, scale) -> [B, H, Hd]: one new
        position of grouped-query attention (RoPE, the KV cache write, softmax over the cached positions)

Each returns None where it does not take its inputs (not plain contiguous CPU tensors of the dtypes it
reads, autograd, or the kernels off): the caller then runs its PyTorch path. Built and loaded with the
other kernels (`sparsemoe.ops.cpu_kernels`).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from sparsemoe.ops.cpu_kernels import KERNEL_DTYPES, PLAIN_TYPES, check_status, eager_mode, load, plain_eager


def all_finite(values: Tensor) -> Optional[bool]:
    """Whether every value is finite (no NaN, no inf), or None when the kernel does not take the tensor (not a
    plain contiguous float32 or bfloat16 CPU tensor, or the kernels are off): then ask PyTorch."""
    if not plain_eager(values) or values.dtype not in KERNEL_DTYPES or not values.is_contiguous():
        return None
    lib = load()
    if lib is None:
        return None
    return bool(lib.sparsemoe_all_finite(values.data_ptr(), values.numel(), int(values.dtype == torch.bfloat16),
                                         torch.get_num_threads()))  # fmt: skip


def sort_by_expert(expert_ids: Tensor, num_experts: int) -> Optional[tuple[Tensor, Tensor, Tensor, Tensor, Tensor]]:
    """The stable sort of N assignments by expert (ids in [0, E]; E marks a dropped one, sorted last), as one
    counting sort: (order [N], sorted ids [N], slots [N]: each row's position within its expert, counts [E]:
    rows per expert, dropped ones left out, ends [E]: their inclusive cumsum), all int64. None where not
    taken (not a plain contiguous int64 CPU tensor, or the kernels are off): then sort with PyTorch."""
    if not plain_eager(expert_ids) or expert_ids.dtype != torch.int64 or expert_ids.dim() != 1:
        return None
    lib = load()
    if lib is None:
        return None
    ids = expert_ids.contiguous()
    N = ids.shape[0]
    order, sorted_ids, slots = (torch.empty(N, dtype=torch.int64) for _ in range(3))
    counts, ends = torch.empty(num_experts, dtype=torch.int64), torch.empty(num_experts, dtype=torch.int64)
    status = lib.sparsemoe_sort_by_expert(ids.data_ptr(), N, num_experts, order.data_ptr(), sorted_ids.data_ptr(),
                                          slots.data_ptr(), counts.data_ptr(), ends.data_ptr())  # fmt: skip
    if status == -2:
        raise ValueError(f"sort_by_expert: an expert id is outside [0, {num_experts}]")
    check_status(status, "sparsemoe_sort_by_expert")
    return order, sorted_ids, slots, counts, ends


def topk_route(
    logits_TE: Tensor, top_k: int, score_func: str, renormalize: bool, route_scale: float
) -> Optional[tuple[Tensor, Tensor, Tensor]]:
    """Token-choice top-k routing in one pass per token (csrc/norm.c): (ids [T, K] int64, largest first;
    weights [T, K] float32: the chosen scores, renormalised and scaled; probs [T, E]: the scores summing to
    1). scores: softmax or sigmoid of the logits. None where not taken (not plain contiguous float32 CPU
    logits, autograd, or the kernels off)."""
    if (not plain_eager(logits_TE) or logits_TE.dtype != torch.float32 or logits_TE.dim() != 2
            or not logits_TE.is_contiguous() or (torch.is_grad_enabled() and logits_TE.requires_grad)):
        return None  # fmt: skip
    T, E = logits_TE.shape
    lib = load()
    if lib is None or not 1 <= top_k <= E:
        return None
    probs = torch.empty(T, E)
    ids, weights = torch.empty(T, top_k, dtype=torch.int64), torch.empty(T, top_k)
    lib.sparsemoe_topk_route(logits_TE.data_ptr(), T, E, top_k, int(score_func == "sigmoid"), int(renormalize),
                             route_scale, probs.data_ptr(), ids.data_ptr(), weights.data_ptr())  # fmt: skip
    return ids, weights, probs


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Optional[Tensor]:
    """x / sqrt(mean(x^2) + eps) * weight over the last dim, in float32 from the values as they are, rounded once
    to x's dtype (csrc/norm.c); None where not taken (not plain contiguous float32 or bfloat16 CPU tensors of
    one dtype, autograd, or the kernels off): then the caller's PyTorch path."""
    if (not (plain_eager(x) and plain_eager(weight)) or x.dtype not in KERNEL_DTYPES or weight.dtype != x.dtype
            or not (x.is_contiguous() and weight.is_contiguous()) or weight.shape != x.shape[-1:]
            or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))):
        return None  # fmt: skip
    lib = load()
    if lib is None:
        return None
    D = x.shape[-1]
    out = torch.empty_like(x)
    getattr(lib, f"sparsemoe_rms_norm_{KERNEL_DTYPES[x.dtype]}")(
        x.data_ptr(), weight.data_ptr(), x.numel() // max(D, 1), D, eps, out.data_ptr(), torch.get_num_threads()
    )
    return out


def argmax_rows(x_nV: Tensor) -> Optional[Tensor]:
    """x.argmax(dim=-1) of a [n, V] float32 or bfloat16 tensor, [n] int64, as torch computes it (the first of
    tied values; a NaN counts as the largest): one pass per row (csrc/norm.c). None where not taken (not a
    plain contiguous CPU tensor of those dtypes with V >= 1, or the kernels off)."""
    if (not plain_eager(x_nV) or x_nV.dtype not in KERNEL_DTYPES or x_nV.dim() != 2 or x_nV.shape[1] == 0
            or not x_nV.is_contiguous()):
        return None  # fmt: skip
    lib = load()
    if lib is None:
        return None
    out = torch.empty(x_nV.shape[0], dtype=torch.int64)
    lib.sparsemoe_argmax_rows(x_nV.data_ptr(), int(x_nV.dtype == torch.bfloat16), x_nV.shape[0], x_nV.shape[1],
                              out.data_ptr())  # fmt: skip
    return out


def decode_attention(
    q_BHd: Tensor, k_BGd: Tensor, v_BGd: Tensor, rope: Optional[tuple[Tensor, Tensor]], cache_k: Tensor,
    cache_v: Tensor, past: int, window: Optional[int], scale: float,
) -> Optional[Tensor]:
    """One new position of grouped-query attention with a KV cache (csrc/decode_attention.c): RoPE on q and k
    (rope = the float32 cos, sin rows [R] of position `past`, or None), k and v stored in the cache [B, G, L,
    Hd] at `past`, softmax(scale q.k) v over the cached positions (the last `window` with a sliding window);
    returns [B, H, Hd] in q's dtype. None where not taken (anything but plain contiguous float32 or bfloat16
    CPU tensors of one dtype, or the kernels off): then the caller runs its PyTorch path."""
    tensors = (q_BHd, k_BGd, v_BGd, cache_k, cache_v)
    if (not eager_mode() or q_BHd.dtype not in KERNEL_DTYPES
            or not all(type(t) in PLAIN_TYPES and t.is_cpu and t.dtype == q_BHd.dtype and t.is_contiguous() for t in tensors)
            or (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))):
        return None  # fmt: skip
    cos, sin = rope if rope is not None else (None, None)
    if cos is not None and not all(type(t) in PLAIN_TYPES and t.is_cpu and t.dtype == torch.float32 and t.is_contiguous()
                                   for t in (cos, sin)):
        return None  # fmt: skip
    lib = load()
    if lib is None:
        return None
    B, H, Hd = q_BHd.shape
    G, L = cache_k.shape[1], cache_k.shape[2]
    R = Hd if cos is None else cos.shape[-1]
    out = torch.empty_like(q_BHd)
    fn = getattr(lib, f"sparsemoe_decode_attention_{KERNEL_DTYPES[q_BHd.dtype]}")
    status = fn(q_BHd.data_ptr(), k_BGd.data_ptr(), v_BGd.data_ptr(), None if cos is None else cos.data_ptr(),
                None if sin is None else sin.data_ptr(), cache_k.data_ptr(), cache_v.data_ptr(), B, H, G, Hd, R, L,
                past, window or 0, scale, out.data_ptr(), torch.get_num_threads())  # fmt: skip
    if status == -3:
        raise ValueError(f"decode_attention: position {past} is outside the cache's {L}")
    check_status(status, fn.__name__)
    return out
