"""Multi-head Latent Attention (DeepSeek-V2/V3), with a KV cache of the compressed latent.

Legend: B batch, S new positions, P cached positions, L = P + S, H heads, D model width,
R kv_lora_rank (latent width), Q q_lora_rank, N qk_nope_head_dim, Rd rotary width (= config.head_dim),
V v_head_dim.

Keys and values are not projected per head from x: x is compressed to a latent c [R] (normalised) plus
one rotary key k_rot [Rd] shared by all heads, and the heads' keys and values are expanded from c by
kv_b_proj. The cache stores only (c, k_rot), R + Rd numbers per position instead of H*(N+Rd+V), which
is the point of MLA. RoPE uses the rotate-half layout; DeepSeek's interleaved checkpoints are permuted
into it when loaded (see sparsemoe.hf.weights.interleaved_to_half).

Parameters (nn.Linear layout, no biases):
    q_proj     [H*(N+Rd), D]            when q_lora_rank is None, else
    q_a_proj   [Q, D], q_a_norm [Q], q_b_proj [H*(N+Rd), Q]
    kv_a_proj  [R+Rd, D], kv_a_norm [R], kv_b_proj [H*(N+V), R]
    o_proj     [D, H*V]
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparsemoe.model.attention import KVCache, RMSNorm
from sparsemoe.model.config import ModelConfig
from sparsemoe.model.rope import apply_rope, yarn_softmax_scale
from sparsemoe.ops.linear import Linear

# DeepSeek's latent norms use a fixed epsilon, not rms_norm_eps (their reference code and transformers agree).
LATENT_NORM_EPS = 1e-6


class MultiHeadLatentAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int) -> None:
        super().__init__()
        self.layer_id = layer_id
        D, H = config.dim, config.n_heads
        self.n_heads, self.rope_dim = H, config.head_dim
        self.nope_dim, self.v_dim, self.kv_rank = config.qk_nope_head_dim, config.v_head_dim, config.kv_lora_rank
        q_out = H * (self.nope_dim + self.rope_dim)
        self.q_proj = self.q_a_proj = self.q_a_norm = self.q_b_proj = None
        if config.q_lora_rank is None:
            self.q_proj = Linear(D, q_out, bias=False)
        else:
            self.q_a_proj = Linear(D, config.q_lora_rank, bias=False)
            self.q_a_norm = RMSNorm(config.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = Linear(config.q_lora_rank, q_out, bias=False)
        self.kv_a_proj = Linear(D, self.kv_rank + self.rope_dim, bias=False)
        self.kv_a_norm = RMSNorm(self.kv_rank, LATENT_NORM_EPS)
        self.kv_b_proj = Linear(self.kv_rank, H * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = Linear(H * self.v_dim, D, bias=False)
        self.scale = (self.nope_dim + self.rope_dim) ** -0.5 * yarn_softmax_scale(config.rope_scaling)
        self.dropout = config.dropout

    def reset_parameters(self, std: float, out_std: float) -> None:
        """Normal(0, std) projections, the residual output projection at out_std (the model's GPT-2 scheme)."""
        for proj in (self.q_proj, self.q_a_proj, self.q_b_proj, self.kv_a_proj, self.kv_b_proj):
            if proj is not None:
                nn.init.normal_(proj.weight, std=std)
        nn.init.normal_(self.o_proj.weight, std=out_std)  # its norms: MoETransformer.reset_parameters, as every RMSNorm

    def _queries(self, x_BSD: Tensor) -> Tensor:
        q = self.q_proj(x_BSD) if self.q_proj is not None else self.q_b_proj(self.q_a_norm(self.q_a_proj(x_BSD)))
        B, S, _ = x_BSD.shape
        return q.view(B, S, self.n_heads, self.nope_dim + self.rope_dim).transpose(1, 2)  # [B, H, S, N+Rd]

    def forward(self, x_BSD: Tensor, cos_Sd: Tensor, sin_Sd: Tensor, cache: Optional[KVCache] = None) -> Tensor:
        B, S, _ = x_BSD.shape
        H = self.n_heads
        q_nope, q_rot = self._queries(x_BSD).split([self.nope_dim, self.rope_dim], dim=-1)
        c_BSR, k_rot_BSd = self.kv_a_proj(x_BSD).split([self.kv_rank, self.rope_dim], dim=-1)
        c_B1SR = self.kv_a_norm(c_BSR).unsqueeze(1)
        q_rot = apply_rope(q_rot, cos_Sd, sin_Sd)
        k_rot_B1Sd = apply_rope(k_rot_BSd.unsqueeze(1), cos_Sd, sin_Sd)

        past = 0
        if cache is not None:
            past = cache.length
            c_B1SR, k_rot_B1Sd = cache.update(self.layer_id, c_B1SR, k_rot_B1Sd)  # now all L positions
        L = c_B1SR.shape[2]
        kv = self.kv_b_proj(c_B1SR.squeeze(1).to(x_BSD.dtype)).view(B, L, H, self.nope_dim + self.v_dim).transpose(1, 2)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        k = torch.cat([k_nope, k_rot_B1Sd.to(k_nope.dtype).expand(B, H, L, self.rope_dim)], dim=-1)
        q = torch.cat([q_nope, q_rot], dim=-1)

        if past == 0:
            mask, causal = None, True
        elif S == 1:
            mask, causal = None, False  # one new position sees every cached one
        else:
            # SDPA's is_causal aligns the mask top-left; new position s sees keys 0..past+s.
            mask = torch.ones(S, L, dtype=torch.bool, device=x_BSD.device).tril(diagonal=past)
            causal = False
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=causal,
            dropout_p=self.dropout if self.training else 0.0,
            scale=self.scale,
        )
        return self.o_proj(y.transpose(1, 2).reshape(B, S, H * self.v_dim))
