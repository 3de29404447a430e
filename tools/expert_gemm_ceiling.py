"""The GEMM ceiling of a MoE layer's forward+backward: how fast BLAS runs the experts' matrix products alone.

A MoE layer of E experts multiplies E groups of about T*K/E rows where the dense ideal multiplies one
group of T*K rows: the same FLOPs, but smaller products, which a BLAS library runs less efficiently. This
times exactly the six products of a SwiGLU forward+backward (in-projection, out-projection, and in the
backward the two data gradients and two weight gradients) per expert, on rows already in expert order and
already in memory (no routing, gather, activation or combine), against the same six products of the dense
ideal, interleaved, and prints their ratio: the speed relative to the dense ideal that the layer could
reach if everything but the GEMMs were free. The layer's own ratio (`sparsemoe bench`) divided by this is
the efficiency of everything else.

    python tools/expert_gemm_ceiling.py [--configs fine-grained,mixtral-mini] [--tokens 2048] [--threads 2]
"""

from __future__ import annotations

import argparse

import torch

from sparsemoe.bench.configs import BENCH_CONFIGS
from sparsemoe.bench.measure import environment, time_interleaved


def six_products(groups: int, rows: int, dim: int, hidden: int, dtype: torch.dtype):
    """A callable doing the six GEMMs of a gated MLP's forward+backward for `groups` groups of `rows` rows."""
    I = 2 * hidden  # noqa: E741 - the in-projection rows, as in the dispatch legend
    x = torch.randn(groups, rows, dim, dtype=dtype)
    w_in, w_out = torch.randn(groups, I, dim, dtype=dtype), torch.randn(groups, dim, hidden, dtype=dtype)
    a, g, dH = (torch.randn(groups, rows, n, dtype=dtype) for n in (hidden, dim, I))
    h, o, dA = (torch.empty(groups, rows, n, dtype=dtype) for n in (I, dim, hidden))
    dw_in, dw_out, dx = torch.empty_like(w_in), torch.empty_like(w_out), torch.empty_like(x)

    def run() -> None:
        for e in range(groups):
            torch.mm(x[e], w_in[e].t(), out=h[e])  # forward
            torch.mm(a[e], w_out[e].t(), out=o[e])
            torch.mm(g[e], w_out[e], out=dA[e])  # backward: out-projection
            torch.mm(g[e].t(), a[e], out=dw_out[e])
            torch.mm(dH[e].t(), x[e], out=dw_in[e])  # backward: in-projection
            torch.mm(dH[e], w_in[e], out=dx[e])

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default="fine-grained,mixtral-mini", help="comma-separated bench configs")
    parser.add_argument("--tokens", type=int, default=2048, help="tokens T (default 2048)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    env = environment(torch.device("cpu"))
    print(f"torch {env['torch']}, {env['device_name']}, {env['threads']} threads, {args.dtype}, T={args.tokens}")
    dtype = getattr(torch, args.dtype)
    print("| config | rows per expert | expert GEMMs ms | dense ideal GEMMs ms | ceiling (dense / experts) |")
    print("|---|---|---|---|---|")
    for name in args.configs.split(","):
        cfg = BENCH_CONFIGS[name]
        E, K, D, F = cfg.num_experts, cfg.top_k, cfg.dim, cfg.hidden_dim
        rows = args.tokens * K // E
        fns = {
            "experts": six_products(E, rows, D, F, dtype),
            "dense": six_products(1, args.tokens * K, D, F, dtype),
        }
        t = time_interleaved(fns, args.repeats, warmup=2)
        experts, dense = t["experts"]["min_ms"], t["dense"]["min_ms"]
        print(f"| {name} | {rows} | {experts:.1f} | {dense:.1f} | {dense / experts:.2f} |")


if __name__ == "__main__":
    main()
