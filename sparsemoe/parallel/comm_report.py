"""Communication report for expert parallelism: what the all-to-alls cost, planned and measured.

Two parts:

1. Planned (a model, nothing measured): for 8 to 1024 ranks and common interconnects, the bytes each
   token moves per MoE layer and the ratio of expert compute time to all-to-all time for one training
   step. The cost model, every constant of which is written into the report:
       forward all-to-all bytes / token / layer  = 2 * K * D * b * (R - 1) / R   (dispatch + combine)
       training bytes / token / layer            = 2 * forward  (the backward exchanges the same rows)
       expert FLOPs / token / layer (forward)    = K * (2*D*I + 2*F*D),  I = 2F (gated) or F
       training FLOPs                            = 3 * forward
       compute time  = T * training FLOPs / (peak FLOP/s * utilisation)
       comm time     = 4 all-to-alls * (alpha * (R - 1) + T * K * D * b * (R - 1) / R / bandwidth)
   with T tokens per rank, b bytes per element, a flat network where every rank reaches every other
   through one link of the given per-direction bandwidth, and no overlap of compute and communication.
   A ratio above 1 means the all-to-alls can hide behind the expert compute; below 1 they dominate.
   Expert parallelism needs R <= E (R divides E), so rows with more ranks than experts are n/a.
2. Measured on this machine: all-to-all times of the layer's row exchange with 2 and 4 local gloo
   processes, next to the local expert compute on the same rows.

`run_comm_report(out_dir, quick)` prints the markdown and writes comm_report.json and comm_report.md.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Optional

import torch

RANKS = (8, 16, 32, 64, 128, 256, 512, 1024)

# Nominal per-GPU, per-direction bandwidths in GB/s (10^9 bytes/s). Achieved all-to-all bandwidth is
# lower (protocol overhead, congestion), so the ratios below are upper bounds for a given link.
INTERCONNECTS_GBPS = {
    "100GbE RoCE": 12.5,
    "IB HDR 200Gb/s": 25.0,
    "PCIe 4.0 x16": 32.0,
    "IB NDR 400Gb/s": 50.0,
    "NVLink 4 (H100)": 450.0,
    "NVLink 5 (GB200)": 900.0,
}

# Published MoE shapes: D model width, F expert hidden width, E routed experts, K experts per token.
MODELS = {
    "sparsemoe demo": dict(dim=128, hidden_dim=128, num_experts=8, top_k=2, gated=True),
    "Mixtral-8x7B": dict(dim=4096, hidden_dim=14336, num_experts=8, top_k=2, gated=True),
    "Qwen3-235B-A22B": dict(dim=4096, hidden_dim=1536, num_experts=128, top_k=8, gated=True),
    "DeepSeek-V3": dict(dim=7168, hidden_dim=2048, num_experts=256, top_k=8, gated=True),
    "Switch-C": dict(dim=2080, hidden_dim=6144, num_experts=2048, top_k=1, gated=False),
}

ASSUMPTIONS = {
    "bytes_per_element": 2,  # bf16 activations on the wire
    "tokens_per_rank": 8192,  # T: tokens each rank routes per step and layer
    "peak_tflops": 989.0,  # H100 SXM dense bf16 peak
    "utilisation": 0.4,  # share of peak the expert GEMMs reach
    "alpha_us": 5.0,  # latency per peer message of an all-to-all
}


def bytes_per_token(model: dict[str, Any], ranks: int, bytes_per_element: int) -> dict[str, float]:
    """All-to-all bytes one token sends per MoE layer (uniform routing: (R-1)/R of its rows leave the rank)."""
    remote = (ranks - 1) / ranks
    forward = 2 * model["top_k"] * model["dim"] * bytes_per_element * remote
    return {"forward": forward, "training": 2 * forward}


def flops_per_token(model: dict[str, Any]) -> dict[str, float]:
    D, F, K = model["dim"], model["hidden_dim"], model["top_k"]
    in_rows = 2 * F if model["gated"] else F
    forward = K * (2 * D * in_rows + 2 * F * D)
    return {"forward": float(forward), "training": 3.0 * forward}


def compute_to_comm_ratio(model: dict[str, Any], ranks: int, gbps: float, a: dict[str, Any]) -> Optional[float]:
    """Expert compute time / all-to-all time for one training step of one layer; None when R > E."""
    if ranks > model["num_experts"] or model["num_experts"] % ranks:
        return None
    T = a["tokens_per_rank"]
    compute_s = T * flops_per_token(model)["training"] / (a["peak_tflops"] * 1e12 * a["utilisation"])
    per_exchange_bytes = T * bytes_per_token(model, ranks, a["bytes_per_element"])["forward"] / 2
    comm_s = 4 * (a["alpha_us"] * 1e-6 * (ranks - 1) + per_exchange_bytes / (gbps * 1e9))
    return compute_s / comm_s


def planned(assumptions: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for name, model in MODELS.items():
        rows = {}
        for R in RANKS:
            rows[str(R)] = {
                "bytes_per_token_per_layer": bytes_per_token(model, R, assumptions["bytes_per_element"]),
                "compute_to_comm": {
                    link: compute_to_comm_ratio(model, R, gbps, assumptions) for link, gbps in INTERCONNECTS_GBPS.items()
                },
            }
        out[name] = {"config": model, "flops_per_token_per_layer": flops_per_token(model), "ranks": rows}
    return out


# --- measured -----------------------------------------------------------------------------------------------


def _slowest_median(fn, reps: int) -> float:
    """Median over reps of the slowest rank's time for fn() (seconds), after one warm-up call."""
    import torch.distributed as dist

    fn()
    samples = []
    for _ in range(reps):
        dist.barrier()
        start = time.perf_counter()
        fn()
        elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the slowest rank sets the pace
        samples.append(float(elapsed))
    return statistics.median(samples)


def _measure_shape(rank: int, world: int, dim: int, tokens: int, top_k: int, reps: int) -> dict[str, Any]:
    from sparsemoe.dispatch.grouped import expert_hidden
    from sparsemoe.experts import Experts
    from sparsemoe.ops import grouped_mm
    from sparsemoe.parallel.comm import all_to_all_rows

    g = torch.Generator().manual_seed(rank)
    rows = tokens * top_k
    x = torch.randn(rows, dim, generator=g)
    splits = [rows // world + (1 if j < rows % world else 0) for j in range(world)]  # uniform routing
    experts = Experts(2, dim, dim, "swiglu")  # two local experts of hidden width F = D
    recv = torch.randn(world * splits[rank], dim, generator=g)
    offsets = torch.tensor([recv.shape[0] // 2, recv.shape[0]])

    def exchange() -> None:
        all_to_all_rows(x, [splits[rank]] * world, splits)

    @torch.no_grad()
    def compute() -> None:
        h = grouped_mm(recv, experts.w_in, offsets)
        grouped_mm(expert_hidden(h, experts), experts.w_out, offsets)

    a2a_s, experts_s = _slowest_median(exchange, reps), _slowest_median(compute, reps)
    remote_bytes = (rows - splits[rank]) * dim * 4  # float32 rows leaving this rank
    return {
        "dim": dim,
        "tokens_per_rank": tokens,
        "top_k": top_k,
        "all_to_all_ms": a2a_s * 1e3,
        "experts_forward_ms": experts_s * 1e3,
        "bytes_sent_per_rank": remote_bytes,
        "achieved_GBps": remote_bytes / a2a_s / 1e9,
        # forward = 2 exchanges (dispatch, combine) around one expert forward
        "compute_to_comm": experts_s / (2 * a2a_s),
    }


def _measure_worker(rank: int, world: int, shapes: list[tuple[int, int]], top_k: int, reps: int) -> list[dict[str, Any]]:
    """Times (max over ranks, median over reps) of one row all-to-all and of the local experts' forward."""
    return [_measure_shape(rank, world, dim, tokens, top_k, reps) for dim, tokens in shapes]


def measured(quick: bool) -> dict[str, Any]:
    from sparsemoe.parallel.local import run_local

    shapes = [(128, 512), (512, 512)] if quick else [(128, 512), (128, 4096), (1024, 512), (1024, 2048)]
    reps = 5 if quick else 10
    out = {}
    for world in (2, 4):
        out[str(world)] = run_local(_measure_worker, world, shapes, 2, reps, threads=1)[0]
    return out


def environment() -> dict[str, Any]:
    return {
        "torch": torch.__version__,
        "backend": "gloo (CPU, 127.0.0.1)",
        "threads_per_process": 1,
        "cpu_count": os.cpu_count(),
        "machine": f"{platform.system()} {platform.machine()} {platform.processor() or ''}".strip(),
        "python": platform.python_version(),
    }


# --- report -------------------------------------------------------------------------------------------------


def _fmt_ratio(value: Optional[float]) -> str:
    if value is None:
        return "n/a"
    return f"{value:.2f}" if value < 10 else f"{value:.0f}"


def to_markdown(report: dict[str, Any]) -> str:
    a = report["assumptions"]
    links = list(report["interconnects_GBps"])
    lines = [
        "# Expert-parallel communication report",
        "",
        "## Planned: all-to-all volume and compute-to-communication ratio",
        "",
        (
            f"Assumptions: {a['bytes_per_element']}-byte activations, T = {a['tokens_per_rank']} tokens per rank per "
            f"layer, expert compute at {a['utilisation']:.0%} of {a['peak_tflops']:.0f} TFLOP/s (H100 SXM dense bf16), "
            f"{a['alpha_us']} us latency per peer message, uniform routing, a flat network of one link per rank, "
            "no overlap. Ratio = expert compute time / all-to-all time for one training step of one layer "
            "(> 1: the exchange can hide behind compute). Bandwidths are nominal per direction, GB/s: "
            + ", ".join(f"{k} {v:g}" for k, v in report["interconnects_GBps"].items())
            + "."
        ),
        "",
    ]
    for name, entry in report["planned"].items():
        c = entry["config"]
        lines += [
            f"### {name} (D={c['dim']}, F={c['hidden_dim']}, E={c['num_experts']}, K={c['top_k']})",
            "",
            "| ranks | fwd bytes/token/layer | train bytes/token/layer | " + " | ".join(links) + " |",
            "|---:|---:|---:|" + "---:|" * len(links),
        ]
        for R, row in entry["ranks"].items():
            b = row["bytes_per_token_per_layer"]
            ratios = " | ".join(_fmt_ratio(row["compute_to_comm"][link]) for link in links)
            lines.append(f"| {R} | {b['forward']:,.0f} | {b['training']:,.0f} | {ratios} |")
        lines.append("")
    env = report["environment"]
    lines += [
        "## Measured: row all-to-all on local gloo processes",
        "",
        (
            "One all-to-all of T*K float32 rows per rank (K=2, uniform splits), the slowest rank's time, median "
            "of repeats; next to the forward of the rank's local experts (2 SwiGLU experts, F = D) on the rows "
            f"it receives. torch {env['torch']}, {env['backend']}, {env['threads_per_process']} thread per process, "
            f"{env['cpu_count']} CPU cores ({env['machine']}). Loopback TCP, so these show the software path, "
            "not an interconnect."
        ),
        "",
        "| processes | D | T/rank | all-to-all ms | bytes sent/rank | GB/s | experts fwd ms | compute/comm (fwd) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for world, rows in report["measured"].items():
        for r in rows:
            lines.append(
                f"| {world} | {r['dim']} | {r['tokens_per_rank']} | {r['all_to_all_ms']:.3f} | {r['bytes_sent_per_rank']:,} "
                f"| {r['achieved_GBps']:.2f} | {r['experts_forward_ms']:.3f} | {r['compute_to_comm']:.2f} |"
            )
    lines.append("")
    return "\n".join(lines)


def run_comm_report(out_dir: str, quick: bool = False) -> dict:
    """Compute the planned tables, measure 2 and 4 local processes, print markdown, write JSON + markdown."""
    report = {
        "assumptions": dict(ASSUMPTIONS),
        "interconnects_GBps": dict(INTERCONNECTS_GBPS),
        "planned": planned(ASSUMPTIONS),
        "measured": measured(quick),
        "environment": environment(),
        "quick": quick,
    }
    markdown = to_markdown(report)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "comm_report.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    (out / "comm_report.md").write_text(markdown, encoding="utf-8")
    print(markdown)
    return report


if __name__ == "__main__":
    import sys

    run_comm_report(sys.argv[1] if len(sys.argv) > 1 else "comm_report", quick="--quick" in sys.argv)
