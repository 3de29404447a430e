"""Sweeps over top-k and capacity factor (with expert utilisation), and the router-only benchmark.

Legend: T tokens, D model width, E experts, K experts per token, C capacity (slots per expert).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from sparsemoe.bench.configs import BenchConfig, make_routing
from sparsemoe.bench.measure import time_interleaved
from sparsemoe.config import MoEConfig
from sparsemoe.dispatch import build_plan, resolve_backend
from sparsemoe.experts import Experts
from sparsemoe.routing import Router, RoutingResult

DEFAULT_KS = (1, 2, 4, 8)
DEFAULT_CAPACITY_FACTORS = (1.0, 1.25, 2.0, None)  # None = dropless


def run_sweep(
    cfg: BenchConfig,
    tokens: int,
    routing: str = "skewed",
    ks: Sequence[int] = DEFAULT_KS,
    capacity_factors: Sequence[Optional[float]] = DEFAULT_CAPACITY_FACTORS,
    dtype: torch.dtype = torch.float32,
    repeats: int = 3,
    seed: int = 0,
) -> dict:
    """Time the grouped and capacity backends for each (k, capacity factor); record utilisation and drops."""
    T, E = tokens, cfg.num_experts
    experts = Experts(E, cfg.dim, cfg.hidden_dim, cfg.activation, dtype=dtype)
    x = torch.randn(T, cfg.dim, generator=torch.Generator().manual_seed(seed)).to(dtype).requires_grad_(True)
    grad_TD = torch.randn(T, cfg.dim, generator=torch.Generator().manual_seed(seed + 1))
    points = []
    for k in (k for k in ks if k <= E):
        ids_TK, weights_TK = make_routing(routing, T, E, k, seed)
        w_N = weights_TK.reshape(-1).requires_grad_(True)
        token_ids = torch.arange(T).repeat_interleave(k)
        scores = torch.zeros(T, E)
        for cf in capacity_factors:
            capacity = MoEConfig(dim=cfg.dim, hidden_dim=cfg.hidden_dim, num_experts=E, top_k=k, capacity_factor=cf).capacity(T, True)

            assignments = RoutingResult(token_ids, ids_TK.reshape(-1), w_N, scores, scores, k, False)

            def plan_now(assignments=assignments, capacity=capacity):
                return build_plan(assignments, capacity)  # timed: each step builds its plan

            plan = plan_now()
            steps: dict[str, Callable[[], None]] = {}
            for backend in ("grouped", "capacity"):
                padded = E * (capacity if capacity is not None else T)
                if backend == "capacity" and padded > 4 * T * k:
                    continue  # dropless capacity pads every expert to T rows: not a sensible point
                steps[f"{backend} forward"] = _forward_step(backend, x, plan_now, experts)
                steps[f"{backend} forward+backward"] = _backward_step(backend, x, plan_now, experts, grad_TD, [x, w_N])
            timings = time_interleaved(steps, repeats)
            points.append(
                {
                    "top_k": k,
                    "capacity_factor": cf,
                    "capacity": capacity,
                    "tokens_per_expert": plan.counts.tolist(),
                    "dropped_fraction": plan.num_dropped.item() / plan.num_rows,
                    "load_imbalance": (plan.counts.max() / plan.counts.float().mean()).item(),
                    "timings": timings,
                }
            )
    return {"config": cfg.name, "tokens": T, "routing": routing, "dtype": str(dtype).replace("torch.", ""), "points": points}


def _forward_step(backend, x, plan_now, experts):
    def step() -> None:
        with torch.no_grad():
            plan = plan_now()
            resolve_backend(backend, x, plan).forward(x, plan, experts)

    return step


def _backward_step(backend, x, plan_now, experts, grad_TD, leaves):
    def step() -> None:
        for t in [*leaves, *experts.parameters()]:
            t.grad = None
        plan = plan_now()
        resolve_backend(backend, x, plan).forward(x, plan, experts).backward(grad_TD)

    return step


def sweep_markdown(sweep: dict) -> list[str]:
    lines = [
        f"## k and capacity-factor sweep: {sweep['config']}, T={sweep['tokens']}, routing {sweep['routing']}, {sweep['dtype']}",
        "",
        "| k | capacity factor | C | dropped | max/mean load | grouped fwd ms | grouped fwd+bwd ms | capacity fwd ms | capacity fwd+bwd ms |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for p in sweep["points"]:
        t = p["timings"]

        def cell(name: str, t=t) -> str:
            return f"{t[name]['min_ms']:.2f}" if name in t else "–"

        cf = "dropless" if p["capacity_factor"] is None else f"{p['capacity_factor']}"
        lines.append(
            f"| {p['top_k']} | {cf} | {p['capacity'] or '–'} | {100 * p['dropped_fraction']:.1f}% | {p['load_imbalance']:.2f} | "
            f"{cell('grouped forward')} | {cell('grouped forward+backward')} | {cell('capacity forward')} | "
            f"{cell('capacity forward+backward')} |"
        )
    return lines + [""]


# --- router-only benchmark -------------------------------------------------------------------------------

ROUTER_VARIANTS = {
    "topk softmax (Mixtral)": dict(),
    "topk sigmoid + bias (DeepSeek-V3)": dict(score_func="sigmoid", bias_balancing=True),
    "group-limited (DeepSeek-V3)": dict(router="group_limited", score_func="sigmoid", num_groups=4, topk_groups=2),
    "expert-choice": dict(router="expert_choice"),
}


def run_router_bench(cfg: BenchConfig, token_counts: Sequence[int], repeats: int = 5, seed: int = 0) -> dict:
    """Router logits + selection (+ plan) in float32, forward and forward+backward, with HF's router beside."""
    rows = []
    for T in token_counts:
        x = torch.randn(T, cfg.dim, generator=torch.Generator().manual_seed(seed)).requires_grad_(True)
        steps: dict[str, Callable[[], None]] = {}
        for name, fields in ROUTER_VARIANTS.items():
            if fields.get("router") == "group_limited" and cfg.num_experts % fields["num_groups"]:
                continue
            mcfg = MoEConfig(dim=cfg.dim, hidden_dim=cfg.hidden_dim, num_experts=cfg.num_experts, top_k=cfg.top_k, **fields)
            router = Router(mcfg)
            capacity = mcfg.capacity(T, True)
            steps[name] = _router_step(router, x, capacity, with_plan=False)
            steps[name + " + plan"] = _router_step(router, x, capacity, with_plan=True)
        hf = _hf_router(cfg)
        if hf is not None:
            steps["hf MixtralTopKRouter"] = lambda hf=hf, x=x: hf(x)[1].sum().backward()
        timings = time_interleaved(steps, repeats)
        rows.append({"tokens": T, "timings": timings})
    return {"config": cfg.name, "rows": rows}


def _router_step(router: Router, x, capacity, with_plan: bool):
    def step() -> None:
        router.zero_grad(set_to_none=True)
        routing = router.route(router.logits(x), capacity)
        if with_plan:
            plan = build_plan(routing, capacity)
            plan.weights.sum().backward()
        else:
            routing.weights.sum().backward()

    return step


def _hf_router(cfg: BenchConfig):
    try:
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter
    except ImportError:
        return None
    router = MixtralTopKRouter(
        MixtralConfig(hidden_size=cfg.dim, num_local_experts=cfg.num_experts, num_experts_per_tok=cfg.top_k)
    )
    torch.nn.init.normal_(router.weight, std=0.02)
    return router


def router_markdown(bench: dict) -> list[str]:
    names = list(dict.fromkeys(n for r in bench["rows"] for n in r["timings"]))
    tokens = [r["tokens"] for r in bench["rows"]]
    lines = [
        f"## Router only: {bench['config']} (float32 router math; forward+backward to the router weights and input)",
        "",
        "| router, ms | " + " | ".join(f"T={t}" for t in tokens) + " |",
        "|---" * (len(tokens) + 1) + "|",
    ]
    for name in names:
        cells = [f"{r['timings'][name]['min_ms']:.3f}" if name in r["timings"] else "–" for r in bench["rows"]]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines + [""]
