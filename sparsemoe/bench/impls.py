"""The implementations put side by side, each built over the same weights, inputs and routing.

Legend: T tokens, D model width, F expert hidden width, I in-projection rows (2F), E experts, K top-k,
N = T*K rows.

An implementation is a `forward() -> y` closure plus the leaf tensors whose gradients a backward
produces. The expert stage is timed from the routing (ids [T, K], weights [T, K]) to the combined
output [T, D]; the router is the same few ops for everyone and has its own benchmark.

* sparsemoe:<backend>  our dispatch backends (plan building included) and `auto`;
* dense ideal          one expert-shaped MLP over N rows: the same FLOPs, no routing;
* hf eager / hf grouped_mm   transformers' MixtralExperts (the experts of MixtralSparseMoeBlock) with
                       `experts_implementation` = "eager" and "grouped_mm";
* torch._grouped_mm    the obvious code a user would write with the native grouped GEMM.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import Tensor

from sparsemoe.bench.configs import BenchConfig
from sparsemoe.dispatch import backend_names, build_plan, resolve_backend
from sparsemoe.experts import Experts, activate, mlp
from sparsemoe.routing import RoutingResult

# The per-token reference loop is an oracle, not a contender: it runs only on this many rows or fewer.
REFERENCE_MAX_ROWS = 64
# Dropless, the capacity backend pads every expert to T slots: run it only while that is at most
# this many times the real rows.
CAPACITY_MAX_PADDING = 4


@dataclass
class BenchCase:
    """One input: a shape, a dtype, a routing, and the master weights every implementation copies."""

    config: BenchConfig
    tokens: int
    dtype: torch.dtype
    device: torch.device
    routing: str
    ids_TK: Tensor
    weights_TK: Tensor
    x_TD: Tensor
    w_in: Tensor  # [E, I, D]
    w_out: Tensor  # [E, D, F]

    @property
    def rows(self) -> int:
        return self.tokens * self.config.top_k

    def active_experts(self) -> int:
        return int(torch.unique(self.ids_TK).numel())


@dataclass
class Impl:
    name: str
    forward: Callable[[], Tensor]
    leaves: list[Tensor] = field(default_factory=list)
    note: str = ""  # e.g. which backend `auto` chose

    def clear_grads(self) -> None:
        for t in self.leaves:
            t.grad = None


def make_case(config: BenchConfig, tokens: int, dtype: torch.dtype, device: torch.device, routing: str,
              ids_TK: Tensor, weights_TK: Tensor, seed: int = 0) -> BenchCase:
    gen = torch.Generator().manual_seed(seed)
    E, D, F = config.num_experts, config.dim, config.hidden_dim
    # nn.Linear-style initialisation in float32, made on the device (billions of weights at full size),
    # seeded without touching the caller's random state.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        experts = Experts(E, D, F, config.activation, device=device)
    x_TD = torch.randn(tokens, D, generator=gen)
    return BenchCase(
        config, tokens, dtype, device, routing,
        ids_TK.to(device), weights_TK.to(device),
        x_TD.to(device, dtype), experts.w_in.detach().to(dtype), experts.w_out.detach().to(dtype),
    )


def _leaf(t: Tensor) -> Tensor:
    return t.detach().clone().requires_grad_(True)


def _ours(case: BenchCase, backend: str, recompute: bool = False) -> Impl:
    cfg = case.config
    experts = Experts(
        cfg.num_experts, cfg.dim, cfg.hidden_dim, cfg.activation, recompute_activations=recompute,
        device=case.device, dtype=case.dtype,
    )  # fmt: skip
    with torch.no_grad():
        experts.w_in.copy_(case.w_in)
        experts.w_out.copy_(case.w_out)
    x, w_TK = _leaf(case.x_TD), _leaf(case.weights_TK)
    T, K, E = case.tokens, cfg.top_k, cfg.num_experts
    scores = torch.zeros(T, E, device=case.device)  # not read by the plan; RoutingResult carries it for losses

    def routing() -> RoutingResult:
        token_ids = torch.arange(T, device=case.device).repeat_interleave(K)
        return RoutingResult(token_ids, case.ids_TK.reshape(-1), w_TK.reshape(-1), scores, scores, K, False)

    plan0 = build_plan(routing(), None)
    chosen = resolve_backend(backend, x, plan0).name

    def forward() -> Tensor:
        plan = build_plan(routing(), None)
        return resolve_backend(backend, x, plan).forward(x, plan, experts).to(x.dtype)

    name = f"sparsemoe {backend}" + (" +recompute" if recompute else "")
    return Impl(name, forward, [x, w_TK, experts.w_in, experts.w_out], note=chosen if backend == "auto" else "")


def _dense(case: BenchCase) -> Impl:
    K = case.config.top_k
    x_ND = _leaf(case.x_TD.repeat_interleave(K, dim=0))
    w_in, w_out = _leaf(case.w_in[0]), _leaf(case.w_out[0])
    act = case.config.activation
    return Impl("dense ideal", lambda: mlp(x_ND, w_in, w_out, act), [x_ND, w_in, w_out])


def _hf(case: BenchCase, implementation: str) -> Optional[Impl]:
    try:
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralExperts
    except ImportError:
        return None
    cfg = case.config
    hf_config = MixtralConfig(
        hidden_size=cfg.dim, intermediate_size=cfg.hidden_dim, num_local_experts=cfg.num_experts,
        num_experts_per_tok=cfg.top_k, hidden_act="silu", experts_implementation=implementation,
    )
    with torch.device(case.device):  # allocated where it runs, not first on the host
        experts = MixtralExperts(hf_config).to(case.dtype)
    with torch.no_grad():
        experts.gate_up_proj.copy_(case.w_in)  # same layout: [E, 2F, D], gate rows first
        experts.down_proj.copy_(case.w_out)
    x, w_TK = _leaf(case.x_TD), _leaf(case.weights_TK)
    ids_TK = case.ids_TK
    return Impl(f"hf {implementation}", lambda: experts(x, ids_TK, w_TK), [x, w_TK, experts.gate_up_proj, experts.down_proj])


def _torch_grouped_mm(case: BenchCase) -> Optional[Impl]:
    grouped = getattr(torch.nn.functional, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
    if grouped is None:
        return None
    cfg = case.config
    T, K, E, act = case.tokens, cfg.top_k, cfg.num_experts, cfg.activation
    x, w_TK, w_in, w_out = _leaf(case.x_TD), _leaf(case.weights_TK), _leaf(case.w_in), _leaf(case.w_out)

    def forward() -> Tensor:
        ids_N = case.ids_TK.reshape(-1)
        order = torch.argsort(ids_N, stable=True)
        offsets = torch.bincount(ids_N, minlength=E).cumsum(0).to(torch.int32)
        token_ids = order // K
        h_NI = grouped(x[token_ids], w_in.transpose(1, 2), offs=offsets)
        o_ND = grouped(activate(h_NI, act), w_out.transpose(1, 2), offs=offsets)
        y = x.new_zeros(T, cfg.dim, dtype=torch.float32)
        return y.index_add(0, token_ids, o_ND.float() * w_TK.reshape(-1)[order, None]).to(x.dtype)

    return Impl("torch._grouped_mm", forward, [x, w_TK, w_in, w_out])


HF_IMPLEMENTATIONS = ("eager", "grouped_mm")


def implementation_names() -> tuple[str, ...]:
    """Every implementation name `build_impls` may produce (what --impls patterns are matched against)."""
    ours = tuple(f"sparsemoe {backend}" for backend in backend_names())
    hf = tuple(f"hf {name}" for name in HF_IMPLEMENTATIONS)
    return (*ours, "sparsemoe grouped +recompute", "dense ideal", *hf, "torch._grouped_mm")


def build_impls(
    case: BenchCase, with_recompute: bool = True, wanted: Callable[[str], bool] = lambda name: True
) -> tuple[list[Impl], dict[str, str]]:
    """The implementations that apply to this case and that `wanted` accepts (each holds its own copy of
    the weights, so only those are built), and {name: why not} for those skipped."""
    impls: list[Impl] = []
    skipped: dict[str, str] = {}
    cfg = case.config
    for backend in backend_names():
        name = f"sparsemoe {backend}"
        if not wanted(name):
            continue
        if backend == "reference" and case.rows > REFERENCE_MAX_ROWS:
            skipped[name] = f"per-token loop, run only up to {REFERENCE_MAX_ROWS} rows"
            continue
        if backend == "capacity" and cfg.num_experts * case.tokens > CAPACITY_MAX_PADDING * case.rows:
            skipped[name] = f"dropless pads every expert to T rows, more than {CAPACITY_MAX_PADDING}x the work"
            continue
        try:
            impls.append(_ours(case, backend))
        except ValueError as err:  # e.g. a GPU-only kernel on the CPU
            skipped[name] = str(err)
    if with_recompute and wanted("sparsemoe grouped +recompute"):
        impls.append(_ours(case, "grouped", recompute=True))
    if wanted("dense ideal"):
        impls.append(_dense(case))
    for implementation in HF_IMPLEMENTATIONS:
        name = f"hf {implementation}"
        if not wanted(name):
            continue
        if cfg.activation != "swiglu":
            skipped[name] = "Mixtral experts are SwiGLU only"
        elif (impl := _hf(case, implementation)) is None:
            skipped[name] = "transformers is not installed"
        else:
            impls.append(impl)
    if wanted("torch._grouped_mm"):
        impl = _torch_grouped_mm(case)
        if impl is None:
            skipped["torch._grouped_mm"] = "not in this torch"
        else:
            impls.append(impl)
    return impls, skipped
