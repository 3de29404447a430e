"""A small decoder-only MoE language model built on `sparsemoe.MoE`: config, model, KV cache, sampling."""

from sparsemoe.model.attention import KVCache, RMSNorm
from sparsemoe.model.config import PRESETS, ModelConfig, preset
from sparsemoe.model.generate import generate, sample_next, stream
from sparsemoe.model.transformer import DenseMLP, ModelOutput, MoETransformer, empty_model

__all__ = [
    "PRESETS",
    "DenseMLP",
    "KVCache",
    "ModelConfig",
    "ModelOutput",
    "MoETransformer",
    "RMSNorm",
    "empty_model",
    "generate",
    "preset",
    "sample_next",
    "stream",
]
