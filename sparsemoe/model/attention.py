"""Grouped-query self-attention with rotary positions, through `scaled_dot_product_attention`, and a KV cache.

Legend: B batch, S new positions, P cached positions before them, H query heads, G key/value heads,
Hd head width, D model width.

Layers with a sliding window (ModelConfig.sliding_window, on the layers of sliding_layers) see only the
last `window` keys up to each position; the KV cache still keeps every position. Layers in
ModelConfig.nope_layers attend without positions (NoPE): the causal mask is their only order.

RoPE (sparsemoe.model.rope) uses the "rotate half" layout, the layout of Hugging Face's Llama/Mixtral/Qwen
checkpoints, so their q/k weights load without a permutation.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparsemoe.model.config import ModelConfig
from sparsemoe.model.rope import apply_rope
from sparsemoe.ops import small_kernels
from sparsemoe.ops.linear import Linear, linears


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 and returned in the input dtype."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:  # inference: one native pass where it applies (the same float32 math)
            y = small_kernels.rms_norm(x, self.weight, self.eps)
            if y is not None:
                return y
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.square().mean(dim=-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


def causal_mask(S: int, past: int, window: Optional[int], device) -> tuple[Optional[Tensor], bool]:
    """(attn_mask, is_causal) for SDPA: S new positions after `past` cached ones, each seeing the keys up to
    itself and, with a `window`, only the last `window` of them (itself included, as transformers counts).

    The mask is [S, past + S] bool (True = attend), or None where is_causal or no mask expresses it. With
    a window, a one-position step (S == 1) expects the keys already cut to the window.
    """
    if window is not None and (past + S <= window or S == 1):
        window = None  # every key a position may see is within its window
    if window is None:
        if past == 0:
            return None, True
        if S == 1:
            return None, False  # one new position sees every cached one
        # SDPA's is_causal aligns the mask top-left; new position s sees keys 0..past+s.
        return torch.ones(S, past + S, dtype=torch.bool, device=device).tril(diagonal=past), False
    query_pos = torch.arange(past, past + S, device=device)[:, None]
    key_pos = torch.arange(past + S, device=device)[None, :]
    return (key_pos <= query_pos) & (key_pos > query_pos - window), False


class KVCache:
    """Keys and values of the positions seen so far, one preallocated [B, G, max_len, Hd] pair per layer.

    `length` is the number of positions stored; the model advances it once per forward.
    """

    def __init__(self, config: ModelConfig, batch_size: int, device=None, dtype=torch.float32) -> None:
        k_shape = v_shape = (batch_size, config.n_kv_heads, config.max_seq_len, config.head_dim)
        if config.attention == "mla":  # MLA caches its normalised latent [B, 1, L, R] and rotary key [B, 1, L, Rd]
            k_shape = (batch_size, 1, config.max_seq_len, config.kv_lora_rank)
            v_shape = (batch_size, 1, config.max_seq_len, config.head_dim)
        self.keys = [torch.zeros(k_shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.values = [torch.zeros(v_shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.max_len = config.max_seq_len
        self.length = 0

    def reset(self) -> None:
        self.length = 0

    def update(self, layer: int, k_BGSd: Tensor, v_BGSd: Tensor) -> tuple[Tensor, Tensor]:
        """Store the new positions after the cached ones; return all keys/values [B, G, P+S, Hd]."""
        start, end = self.length, self.length + k_BGSd.shape[2]
        self.keys[layer][:, :, start:end] = k_BGSd
        self.values[layer][:, :, start:end] = v_BGSd
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


class Attention(nn.Module):
    """Parameters: q_proj [H*Hd, D], k_proj/v_proj [G*Hd, D] (+ biases when qkv_bias), o_proj [D, H*Hd],
    q_norm/k_norm when qk_norm: [Hd] each (qk_norm_scope "head"), or [H*Hd] and [G*Hd] (scope "full"),
    gate_proj [H*Hd, D] when attention_gate."""

    def __init__(self, config: ModelConfig, layer_id: int) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        D, Hd = config.dim, config.head_dim
        self.q_proj = Linear(D, self.n_heads * Hd, bias=config.qkv_bias)
        self.k_proj = Linear(D, self.n_kv_heads * Hd, bias=config.qkv_bias)
        self.v_proj = Linear(D, self.n_kv_heads * Hd, bias=config.qkv_bias)
        self.o_proj = Linear(self.n_heads * Hd, D, bias=False)
        self.gate_proj = Linear(D, self.n_heads * Hd, bias=False) if config.attention_gate else None
        self.norm_full_width = config.qk_norm_scope == "full"
        q_width, k_width = (self.n_heads * Hd, self.n_kv_heads * Hd) if self.norm_full_width else (Hd, Hd)
        self.q_norm = RMSNorm(q_width, config.norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(k_width, config.norm_eps) if config.qk_norm else None
        self.dropout = config.dropout
        # The q.k softmax scale; None: SDPA's own 1/sqrt(head_dim).
        self.scale = None if config.attention_multiplier is None else float(config.attention_multiplier)
        self.window = config.window_of(layer_id)  # None: full causal attention
        self.rope = config.nope_layers is None or layer_id not in config.nope_layers  # False: NoPE

    def forward(self, x_BSD: Tensor, cos_Sd: Tensor, sin_Sd: Tensor, cache: Optional[KVCache] = None) -> Tensor:
        B, S, _ = x_BSD.shape
        q, k, v = linears(x_BSD, (self.q_proj, self.k_proj, self.v_proj))
        if self.q_norm is not None and self.norm_full_width:
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(B, S, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None and not self.norm_full_width:
            q, k = self.q_norm(q), self.k_norm(k)
        if S == 1 and cache is not None and not self.training:
            y = self._decode_step(q, k, v, cos_Sd, sin_Sd, cache)
            if y is not None:
                return self._output(y.view(B, S, self.n_heads * self.head_dim), x_BSD)
        if self.rope:
            q, k = apply_rope(q, cos_Sd, sin_Sd), apply_rope(k, cos_Sd, sin_Sd)

        past = 0
        if cache is not None:
            past = cache.length
            k, v = cache.update(self.layer_id, k, v)
        if S == 1 and self.window is not None and past >= self.window:
            # One new position sees only the last `window` keys: slice them instead of masking the rest.
            k, v = k[:, :, past + 1 - self.window :], v[:, :, past + 1 - self.window :]
        mask, causal = causal_mask(S, past, self.window, x_BSD.device)
        dtype = q.dtype
        if S == 1 and q.device.type == "cpu" and dtype in (torch.bfloat16, torch.float16):
            # One new position: PyTorch's half-precision CPU attention takes 2-6x float32's here (48 to 500
            # cached positions, 2 threads), widening first is faster and rounds once.
            dtype = torch.float32
        y = F.scaled_dot_product_attention(
            q.to(dtype),
            k.to(dtype),
            v.to(dtype),
            attn_mask=mask,
            is_causal=causal,
            dropout_p=self.dropout if self.training else 0.0,
            scale=self.scale,
            enable_gqa=self.n_kv_heads != self.n_heads,
        ).to(q.dtype)
        return self._output(y.transpose(1, 2).reshape(B, S, self.n_heads * self.head_dim), x_BSD)

    def _output(self, y_BSX: Tensor, x_BSD: Tensor) -> Tensor:
        """o_proj of the heads' outputs [B, S, H*Hd] (gated first with attention_gate)."""
        if self.gate_proj is not None:  # gated attention: each head's channels scaled by a sigmoid of the input
            y_BSX = y_BSX * torch.sigmoid(self.gate_proj(x_BSD))
        return self.o_proj(y_BSX)

    def _decode_step(self, q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, cache: KVCache) -> Optional[Tensor]:
        """One new position (q [B, H, 1, Hd], k and v [B, G, 1, Hd] before RoPE) through the native kernel:
        RoPE, the cache write and attention in one call; [B, H, 1, Hd], or None where the kernel does not
        apply (then nothing was written)."""
        scale = self.scale if self.scale is not None else self.head_dim**-0.5
        rope = (cos[0], sin[0]) if self.rope else None
        cache_k, cache_v = cache.keys[self.layer_id], cache.values[self.layer_id]
        return small_kernels.decode_attention(q.squeeze(2), k.squeeze(2), v.squeeze(2), rope, cache_k, cache_v,
                                            cache.length, self.window, scale)  # fmt: skip
