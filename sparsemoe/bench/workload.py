"""What a mixed process runs between timed calls: the attention half of a training step, at the layer's size.

A layer timed on its own meets a process that has run nothing else: its allocator, page tables and caches
hold what its own previous call left. Inside a model, attention, norms and the optimizer run between two
MoE layers, allocate and free their own buffers and evict the caches. `attention_step` is that work, sized
from the MoE case (width D, T tokens): RMSNorm, a fused QKV projection, causal scaled-dot-product attention
over sequences of up to 256 tokens, the output projection, its backward and an AdamW step on its weights.
`sparsemoe bench --context mixed` runs it (untimed) before every timed call.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

SEQ_LEN = 256  # tokens per sequence of the attention workload (fewer when T is smaller)
HEAD_DIM = 64


def attention_step(dim: int, tokens: int, dtype: torch.dtype, device: torch.device, seed: int = 0) -> Callable[[], None]:
    """A callable running one forward+backward+AdamW step of a causal attention block on [tokens, dim]."""
    gen = torch.Generator().manual_seed(seed)
    seq = min(tokens, SEQ_LEN)
    batch = math.ceil(tokens / seq)
    heads = max(1, dim // HEAD_DIM)
    head_dim = dim // heads

    def weight(rows: int, cols: int) -> torch.Tensor:
        w = torch.randn(rows, cols, generator=gen) / math.sqrt(cols)
        return w.to(device, dtype).requires_grad_(True)

    w_qkv, w_o = weight(3 * heads * head_dim, dim), weight(dim, heads * head_dim)
    norm = torch.ones(dim, device=device, dtype=dtype, requires_grad=True)
    params = [w_qkv, w_o, norm]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    x = torch.randn(batch, seq, dim, generator=gen).to(device, dtype)

    def step() -> None:
        h = F.rms_norm(x, (dim,), norm)
        q, k, v = (h @ w_qkv.t()).view(batch, seq, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y = a.transpose(1, 2).reshape(batch, seq, heads * head_dim) @ w_o.t()
        (x + y).float().square().mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step
