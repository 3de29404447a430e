"""Rotary position embeddings (RoPE): the tables, their application, and YaRN scaling.

Legend: B batch, H heads, S positions, d head width, r rotated dims of a head (ModelConfig.rotary_dim).

The "rotate half" layout (the first and second halves of each head are the pair), the layout of Hugging
Face's Llama/Mixtral/Qwen checkpoints; DeepSeek's interleaved checkpoints are permuted into it when loaded.
Shared by standard attention and Multi-head Latent Attention.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

YARN_KEYS = ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale", "mscale_all_dim")


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def yarn_frequencies(head_dim: int, theta: float, scaling: dict) -> tuple[Tensor, float]:
    """YaRN (Peng et al. 2023) RoPE: inverse frequencies [head_dim/2] (float64) and the cos/sin factor.

    Low frequencies (longer than the pre-training context) are interpolated by `factor`, high ones kept,
    with a linear ramp between the dimensions that make beta_fast and beta_slow rotations over
    original_max_position_embeddings positions. The cos/sin factor is mscale(factor, mscale) /
    mscale(factor, mscale_all_dim), or 0.1 ln(factor) + 1 without those keys (DeepSeek, transformers).
    """
    factor, original = float(scaling["factor"]), float(scaling["original_max_position_embeddings"])
    mscale, mscale_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
    attention = scaling.get("attention_factor")
    if attention is None:
        attention = (
            _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all)
            if mscale and mscale_all
            else _yarn_mscale(factor)
        )
    fast, slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

    def dim_of(rotations: float) -> float:  # the dimension that turns `rotations` times over the original context
        return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dim_of(fast), dim_of(slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    high = high + 0.001 if low == high else high  # avoid a zero-width ramp
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    extrapolated = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    inv_freq = extrapolated / factor * ramp + extrapolated * (1 - ramp)
    return inv_freq, float(attention)


def yarn_softmax_scale(scaling: Optional[dict]) -> float:
    """DeepSeek's extra attention-logit scale under YaRN: mscale(factor, mscale_all_dim)^2 (1 without YaRN)."""
    if not scaling or not scaling.get("mscale_all_dim"):
        return 1.0
    return _yarn_mscale(float(scaling["factor"]), float(scaling["mscale_all_dim"])) ** 2


def rope_table(width: int, max_len: int, theta: float, scaling: Optional[dict] = None) -> tuple[Tensor, Tensor]:
    """cos, sin [max_len, width] for the rotate-half layout over the `width` rotated dims of a head
    (ModelConfig.rotary_dim), in float32; `scaling` = ModelConfig.rope_scaling."""
    inv_freq = 1.0 / theta ** (torch.arange(0, width, 2, dtype=torch.float64) / width)
    factor = 1.0
    if scaling is not None:
        inv_freq, factor = yarn_frequencies(width, theta, scaling)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return (angles.cos() * factor).float(), (angles.sin() * factor).float()


def apply_rope(x_BHSd: Tensor, cos_Sr: Tensor, sin_Sr: Tensor) -> Tensor:
    """Rotate the first r = cos_Sr.shape[-1] dims of each head (rotate-half pairs); the rest pass through."""
    r = cos_Sr.shape[-1]
    if r < x_BHSd.shape[-1]:  # partial rotary (GLM-4.5)
        return torch.cat([apply_rope(x_BHSd[..., :r], cos_Sr, sin_Sr), x_BHSd[..., r:]], dim=-1)
    half = r // 2
    rotated = torch.cat([-x_BHSd[..., half:], x_BHSd[..., :half]], dim=-1)
    return (x_BHSd.float() * cos_Sr + rotated.float() * sin_Sr).to(x_BHSd.dtype)
