"""Named benchmark shapes and synthetic routings (balanced, random, skewed).

Legend: T tokens, D model width, F expert hidden width, E experts, K experts per token.
The routing is generated outside the layers so that every implementation sees the same assignments;
the router itself has its own benchmark (`sparsemoe.bench.sweeps.run_router_bench`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class BenchConfig:
    name: str
    dim: int  # D
    hidden_dim: int  # F
    num_experts: int  # E
    top_k: int  # K
    activation: str = "swiglu"

    def expert_bytes(self, element_size: int) -> int:
        """Bytes of one expert's weights: the fused [gate; up] in-projection (2F x D) and the out-projection."""
        return (2 * self.hidden_dim * self.dim + self.dim * self.hidden_dim) * element_size

    def as_dict(self) -> dict:
        return asdict(self)


BENCH_CONFIGS = {
    "mixtral-mini": BenchConfig("mixtral-mini", dim=512, hidden_dim=1408, num_experts=8, top_k=2),
    "fine-grained": BenchConfig("fine-grained", dim=512, hidden_dim=256, num_experts=64, top_k=8),
    # Mixtral's proportions at D=1024: two experts' weights (69 MB in float32) are larger than a CPU's
    # last-level cache, so a decode step reads them from memory (the quantization benchmark's third shape).
    "mixtral-1k": BenchConfig("mixtral-1k", dim=1024, hidden_dim=2816, num_experts=8, top_k=2),
    # A few-millisecond shape for smoke runs (`--quick`) and tests.
    "tiny": BenchConfig("tiny", dim=64, hidden_dim=96, num_experts=8, top_k=2),
    # Full-size layers for a GPU (`--gpu`): Mixtral 8x7B's experts, and a fine-grained layer of 128 small
    # experts (DeepSeek/Qwen-MoE style) at the same model width.
    "mixtral-8x7b": BenchConfig("mixtral-8x7b", dim=4096, hidden_dim=14336, num_experts=8, top_k=2),
    "fine-grained-xl": BenchConfig("fine-grained-xl", dim=4096, hidden_dim=1024, num_experts=128, top_k=8),
}
DEFAULT_CONFIGS = ("mixtral-mini", "fine-grained")
DEFAULT_TOKENS = (1, 16, 128, 2048, 8192)
ROUTINGS = ("balanced", "random", "skewed")
ZIPF_EXPONENT = 1.2  # skewed routing: expert of popularity rank r is drawn with probability ~ r^-1.2


def make_routing(kind: str, num_tokens: int, num_experts: int, top_k: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """(expert ids [T, K] long, combine weights [T, K] float32 that sum to 1 per token).

    balanced: token t takes experts (t*K + j) mod E, so every expert gets T*K/E rows (within one);
    random:   K distinct experts uniformly at random per token;
    skewed:   K distinct experts drawn with Zipf probabilities ~ rank^-ZIPF_EXPONENT (a few hot experts).
    """
    if kind not in ROUTINGS:
        raise ValueError(f"routing {kind!r} is not known; accepted: {', '.join(ROUTINGS)}")
    T, E, K = num_tokens, num_experts, top_k
    gen = torch.Generator().manual_seed(seed)
    if kind == "balanced":
        ids_TK = (torch.arange(T).unsqueeze(1) * K + torch.arange(K)) % E
    else:
        if kind == "random":
            probs_E = torch.ones(E)
        else:
            probs_E = torch.arange(1, E + 1, dtype=torch.float64).pow(-ZIPF_EXPONENT).float()
            probs_E = probs_E[torch.randperm(E, generator=gen)]  # hot experts anywhere, not only at id 0
        ids_TK = torch.multinomial(probs_E.expand(T, E), K, replacement=False, generator=gen)
    weights_TK = torch.softmax(torch.randn(T, K, generator=gen), dim=-1)
    return ids_TK, weights_TK
