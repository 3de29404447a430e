"""The fixed cost of one call of the quantized decode kernel, beside the same call on one token.

    python tools/quant_call_cost.py

For each benchmark shape (int4, groups of 64): the expert stage of one token (its K experts) and the same
call with every row dropped (no expert read: the Python wrapper, the ctypes call and the OpenMP region
only), in microseconds, the best of 200 interleaved calls.
"""

import torch

from sparsemoe.bench.configs import BENCH_CONFIGS
from sparsemoe.bench.measure import time_interleaved
from sparsemoe.experts import Experts
from sparsemoe.quant import QuantizedExperts, QuantScheme
from sparsemoe.quant.experts import kernel_forward


def main() -> None:
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name in ("mixtral-mini", "fine-grained", "mixtral-1k"):
        cfg = BENCH_CONFIGS[name]
        E, K = cfg.num_experts, cfg.top_k
        experts = Experts(E, cfg.dim, cfg.hidden_dim, cfg.activation)
        q = QuantizedExperts.from_experts(experts, QuantScheme.make("int4", 64))
        x = torch.randn(1, cfg.dim)
        token_ids, weights = torch.zeros(K, dtype=torch.long), torch.full((K,), 1 / K)
        none = torch.zeros(E, dtype=torch.long)  # every row dropped
        first_k = (torch.arange(E) < K).long().cumsum(0)  # one row for each of experts 0..K-1
        with torch.no_grad():
            times = time_interleaved({
                "no rows": lambda: kernel_forward(x, token_ids, weights, none, q),
                "one token": lambda: kernel_forward(x, token_ids, weights, first_k, q),
            }, repeats=200, warmup=5)  # fmt: skip
        us = {k: 1e3 * v["min_ms"] for k, v in times.items()}
        print(f"{name}: one token {us['one token']:.1f} us, of which the call without rows {us['no rows']:.1f} us")


if __name__ == "__main__":
    main()
