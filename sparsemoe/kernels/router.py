"""Fused token-choice router: logits -> softmax or sigmoid -> (biased) top-k -> renormalise, in one pass.

Legend: T tokens, E experts, K experts per token.

One program takes BLOCK_T tokens and holds their E logits in registers: the scores, the K selections
(K rounds of arg-max with the winner masked out) and the normalised weights never leave the chip.
Scoring modes (`SCORE`): 0 softmax over all E, then pick K (Mixtral); 1 sigmoid, then pick K
(DeepSeek-V3); 2 pick K logits, softmax over those K. `bias` [E] shifts the selection only.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from sparsemoe.kernels._common import INTERPRET, next_pow2


@triton.jit
def _router_kernel(
    logits_ptr,
    bias_ptr,
    ids_ptr,
    weights_ptr,
    T,
    E,
    stride_t,
    route_scale,
    K: tl.constexpr,
    SCORE: tl.constexpr,
    RENORM: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    row_mask = rows < T
    col_ok = cols[None, :] < E
    logits = tl.load(
        logits_ptr + rows[:, None] * stride_t + cols[None, :], mask=row_mask[:, None] & col_ok, other=float("-inf")
    ).to(tl.float32)
    # Padding rows (past T) get finite logits so that no NaN is computed; they are never stored.
    logits = tl.where(row_mask[:, None] | ~col_ok, logits, 0.0)
    if SCORE == 0:
        peak = tl.max(logits, axis=1)
        p = tl.exp(logits - peak[:, None])
        p = tl.where(col_ok, p, 0.0)
        scores = p / tl.sum(p, axis=1)[:, None]
    elif SCORE == 1:
        scores = tl.sigmoid(logits)
    else:
        scores = logits
    key = scores
    if HAS_BIAS:
        # As sparsemoe.routing: the bias moves sigmoid scores, but softmax logits (never probabilities).
        base = scores if SCORE == 1 else logits
        key = base + tl.load(bias_ptr + cols, mask=cols < E, other=0.0)[None, :]
    key = tl.where(col_ok, key, float("-inf"))

    kcols = tl.arange(0, BLOCK_K)
    chosen_ids = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.int32)
    chosen = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.float32)
    for k in tl.static_range(K):
        # max, then the lowest column holding it: two plain reductions compile to far less code than
        # an arg-max reduction (which carries value-index pairs) unrolled K times.
        peak_key = tl.max(key, axis=1)
        best = tl.min(tl.where(key == peak_key[:, None], cols[None, :], BLOCK_E), axis=1)
        hit = cols[None, :] == best[:, None]
        value = tl.sum(tl.where(hit, scores, 0.0), axis=1)
        chosen_ids = tl.where(kcols[None, :] == k, best[:, None], chosen_ids)
        chosen = tl.where(kcols[None, :] == k, value[:, None], chosen)
        key = tl.where(hit, float("-inf"), key)

    in_k = kcols[None, :] < K
    if SCORE == 2:
        peak = tl.max(tl.where(in_k, chosen, float("-inf")), axis=1)
        e = tl.where(in_k, tl.exp(chosen - peak[:, None]), 0.0)
        weights = e / tl.sum(e, axis=1)[:, None]
    elif RENORM:
        total = tl.sum(tl.where(in_k, chosen, 0.0), axis=1)
        weights = chosen / tl.maximum(total, 1e-20)[:, None]
    else:
        weights = chosen
    weights = weights * route_scale
    out = rows[:, None] * K + kcols[None, :]
    out_mask = row_mask[:, None] & in_k
    tl.store(ids_ptr + out, chosen_ids.to(tl.int64), mask=out_mask)
    tl.store(weights_ptr + out, weights, mask=out_mask)


def router_topk(
    logits_TE: Tensor,
    top_k: int,
    score_mode: int,
    renormalize: bool,
    route_scale: float,
    bias_E: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """(expert ids [T, K] long, weights [T, K] float32) for float32 logits [T, E]."""
    T, E = logits_TE.shape
    ids_TK = torch.empty(T, top_k, device=logits_TE.device, dtype=torch.long)
    weights_TK = torch.empty(T, top_k, device=logits_TE.device, dtype=torch.float32)
    block_e = max(16, next_pow2(E))
    # About 512 scores per program: larger tiles compile to huge code (K unrolled rounds of reductions
    # over the tile) for no gain, the kernel being bound by reading the logits. 16 tokens under the
    # interpreter so that tests cover several programs and a partial last one.
    block_t = 16 if INTERPRET else max(1, min(64, 512 // block_e))
    grid = (triton.cdiv(T, block_t),)
    _router_kernel[grid](
        logits_TE, bias_E if bias_E is not None else logits_TE, ids_TK, weights_TK,
        T, E, logits_TE.stride(0), float(route_scale),
        K=top_k, SCORE=score_mode, RENORM=renormalize, HAS_BIAS=bias_E is not None,
        BLOCK_T=block_t, BLOCK_E=block_e, BLOCK_K=max(2, next_pow2(top_k)),
        num_warps=4,
    )  # fmt: skip
    return ids_TK, weights_TK
