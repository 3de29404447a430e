"""The main benchmark grid: configs x tokens x dtypes x routings, every implementation side by side.

For each case the implementations are timed (forward, then forward+backward) in each requested context
(CONTEXTS: interleaved round by round, each alone, or mixed with the attention half of a training step),
their peak memory is measured over one forward+backward, and the small-batch bound (reading the active
experts' weights once at the copy bandwidth measured in this run) is attached.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from sparsemoe.bench.configs import BENCH_CONFIGS, DEFAULT_CONFIGS, DEFAULT_TOKENS, ROUTINGS, make_routing
from sparsemoe.bench.impls import BenchCase, Impl, build_impls, implementation_names, make_case
from sparsemoe.bench.measure import (
    check_names, copy_bandwidth, environment, peak_memory_bytes, synchronize, time_alone, time_interleaved,
)  # fmt: skip
from sparsemoe.bench.workload import attention_step

MODES = ("forward", "backward")  # backward = forward + backward
# What runs between two timed calls of an implementation.
CONTEXTS = {
    "interleaved": "one call of each implementation per round",
    "alone": "each implementation's calls back to back, nothing else in between (the layer timed on its own)",
    "mixed": "interleaved, with the attention half of a training step (norm, QKV, causal attention, output "
    "projection, backward, AdamW) at the layer's width and T run before every call: the layer inside a model",
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class SuiteOptions:
    configs: tuple[str, ...] = DEFAULT_CONFIGS
    tokens: tuple[int, ...] = DEFAULT_TOKENS
    dtypes: tuple[str, ...] = ("float32", "bfloat16")
    routings: tuple[str, ...] = ROUTINGS
    modes: tuple[str, ...] = MODES
    backward_min_tokens: int = 1  # time forward+backward only for T at or above this (decode sizes: forward only)
    memory: bool = True  # measure peak memory of forward+backward
    impls: Optional[tuple[str, ...]] = None  # shell-style patterns on implementation names; None = all
    repeats: int = 5
    warmup: int = 1
    device: str = "cpu"
    seed: int = 0
    recompute: bool = True  # include the grouped backend with activation recomputation
    clock: str = "wall"  # wall | cpu (process CPU time; see sparsemoe.bench.measure.CLOCKS)
    contexts: tuple[str, ...] = ("interleaved",)  # keys of CONTEXTS; each is timed and reported on its own
    log: Callable[[str], None] = field(default=lambda line: print(line, flush=True), repr=False)


def _selected(name: str, patterns: Optional[tuple[str, ...]]) -> bool:
    return patterns is None or any(_matches(name, p) for p in patterns)


def _matches(name: str, pattern: str) -> bool:
    return fnmatch.fnmatch(name, pattern) or pattern == name


def unmatched_patterns(patterns: Optional[tuple[str, ...]]) -> list[str]:
    """The --impls patterns that match no implementation name (a typo would otherwise give an empty report)."""
    names = implementation_names()
    return [p for p in patterns or () if not any(_matches(n, p) for n in names)]


def _step(impl: Impl, mode: str, grads: dict, device: torch.device) -> Callable[[], None]:
    if mode == "forward":

        def forward_only() -> None:
            with torch.no_grad():
                impl.forward()
            synchronize(device)

        return forward_only

    def forward_backward() -> None:
        impl.clear_grads()
        y = impl.forward()
        y.backward(grads[(tuple(y.shape), y.dtype)])
        synchronize(device)

    return forward_backward


# Largest deviation from the oracle, relative to the oracle's largest output, above which a report
# flags an implementation as computing something else (bfloat16/float16: rounding of the output alone
# is 2^-8 / 2^-11 of it, plus accumulation in another order).
AGREEMENT_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}
ORACLES = ("sparsemoe reference", "sparsemoe grouped")


def _first_forwards(impls: list[Impl], seed: int, dtype: torch.dtype, errors: dict) -> tuple[list[Impl], dict, dict]:
    """One forward of each implementation: (those that ran, a fixed random output gradient per output
    shape/dtype, {"oracle", "tolerance", "max_rel_error": {name: error}}). One that raises is reported in
    `errors` and left out.

    Every output is compared with the oracle's (the reference loop where it runs, else the grouped
    backend, else the first), so a table never times an implementation that computes something else
    unnoticed. The dense ideal computes another function (T*K rows) and is not compared.
    """
    grads: dict = {}
    gen = torch.Generator().manual_seed(seed + 1)
    comparable = [i for i in impls if i.name != "dense ideal"]
    oracle = next((i for name in ORACLES for i in comparable if i.name == name), comparable[0] if comparable else None)
    ordered = ([oracle] if oracle else []) + [i for i in impls if i is not oracle]
    want, failed = None, set()
    agreement = {"oracle": None, "tolerance": AGREEMENT_TOLERANCE[dtype], "max_rel_error": {}}
    for impl in ordered:
        try:
            with torch.no_grad():
                y = impl.forward()
        except Exception as err:  # noqa: BLE001 - a peer's limitation is a result to report
            errors[impl.name] = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
            failed.add(impl.name)
            continue
        key = (tuple(y.shape), y.dtype)
        if key not in grads:
            grads[key] = torch.randn(y.shape, generator=gen).to(y.device, y.dtype)
        if impl is oracle:
            want, agreement["oracle"] = y.float(), impl.name
        elif want is not None and impl.name != "dense ideal":
            error = (y.float() - want).abs().max() / want.abs().max().clamp_min(1e-30)
            agreement["max_rel_error"][impl.name] = error.item()
        del y
    return [i for i in impls if i.name not in failed], grads, agreement


def _usable(impls: list[Impl], modes: tuple[str, ...], grads: dict, device, errors: dict) -> list[Impl]:
    """Run each implementation once per mode; one that raises is reported, not fatal."""
    ok = []
    for impl in impls:
        try:
            for mode in modes:
                _step(impl, mode, grads, device)()
            ok.append(impl)
        except Exception as err:  # noqa: BLE001 - a peer's limitation is a result to report
            errors[impl.name] = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
    return ok


def _timer(opts: SuiteOptions, case: BenchCase, context: str) -> Callable[[dict], dict]:
    """How the calls of one context are timed: steps {name: step} -> timings {name: {...}}."""
    if context == "alone":
        return lambda steps: time_alone(steps, opts.repeats, opts.warmup, opts.clock)
    between = None
    if context == "mixed":
        attention = attention_step(case.config.dim, case.tokens, case.dtype, case.device, opts.seed)

        def between() -> None:
            attention()
            synchronize(case.device)

    return lambda steps: time_interleaved(steps, opts.repeats, opts.warmup, opts.clock, between=between)


def run_case(case: BenchCase, opts: SuiteOptions, bandwidth: float) -> list[dict]:
    """One case: the implementations built and checked once, then timed in each of opts.contexts (one result
    each, in that order); the peak memory of forward+backward is measured once, into the first result."""
    device = case.device
    impls, skipped = build_impls(case, opts.recompute, wanted=lambda name: _selected(name, opts.impls))
    errors: dict[str, str] = {}
    impls, grads, agreement = _first_forwards(impls, opts.seed, case.dtype, errors)
    modes = tuple(m for m in opts.modes if m != "backward" or case.tokens >= opts.backward_min_tokens)
    impls = _usable(impls, modes, grads, device, errors)
    cfg = case.config
    active = case.active_experts()
    element = torch.empty((), dtype=case.dtype).element_size()
    weight_bytes = active * cfg.expert_bytes(element)
    common = {
        "config": cfg.name,
        "tokens": case.tokens,
        "dtype": str(case.dtype).replace("torch.", ""),
        "routing": case.routing,
        "active_experts": active,
        "active_weight_bytes": weight_bytes,
        "weight_read_ms": weight_bytes / bandwidth * 1e3,
        "notes": {i.name: i.note for i in impls if i.note},
        "skipped": skipped,
        "errors": errors,
        "agreement": agreement,
    }
    results = []
    for context in opts.contexts:
        timer = _timer(opts, case, context)
        timings = {mode: timer({impl.name: _step(impl, mode, grads, device) for impl in impls}) for mode in modes}
        results.append(dict(common, context=context, timings=timings, memory={}))
    if opts.memory and "backward" in modes:
        for impl in impls:
            impl.clear_grads()
            peak = peak_memory_bytes(_step(impl, "backward", grads, device), device)
            grad_bytes = sum(t.grad.numel() * t.grad.element_size() for t in impl.leaves if t.grad is not None)
            results[0]["memory"][impl.name] = {"peak_mb": peak / 2**20, "grads_mb": grad_bytes / 2**20}
            impl.clear_grads()
    return results


def check_options(opts: SuiteOptions) -> None:
    """ValueError for a config name or an --impls pattern that names nothing (before anything runs)."""
    check_names("context", opts.contexts, CONTEXTS)
    check_names("benchmark config", opts.configs, BENCH_CONFIGS)
    unmatched = unmatched_patterns(opts.impls)
    if unmatched:
        raise ValueError(
            f"--impls {', '.join(map(repr, unmatched))} matches no implementation; the names are: "
            + ", ".join(implementation_names())
        )


def run_suite(opts: SuiteOptions) -> dict:
    """Run the grid; returns {"environment", "copy_bandwidth_gbs", "options", "cases": [...]}."""
    check_options(opts)
    device = torch.device(opts.device)
    bandwidth = copy_bandwidth(device)
    env = environment(device)
    env["clock"] = opts.clock
    opts.log(
        f"torch {env['torch']} | {env['device']} ({env['device_name']}) | threads {env['threads']} | "
        f"copy bandwidth {bandwidth / 1e9:.1f} GB/s"
    )
    cases = []
    for config_name in opts.configs:
        cfg = BENCH_CONFIGS[config_name]
        opts.log(f"config {cfg.name}: D={cfg.dim} F={cfg.hidden_dim} E={cfg.num_experts} k={cfg.top_k} {cfg.activation}")
        for dtype_name in opts.dtypes:
            for routing in opts.routings:
                for T in opts.tokens:
                    ids_TK, weights_TK = make_routing(routing, T, cfg.num_experts, cfg.top_k, opts.seed)
                    case = make_case(cfg, T, DTYPES[dtype_name], device, routing, ids_TK, weights_TK, opts.seed)
                    for result in run_case(case, opts, bandwidth):
                        cases.append(result)
                        opts.log(_summary_line(result))
    return {
        "environment": env,
        "copy_bandwidth_gbs": bandwidth / 1e9,
        "options": {k: v for k, v in opts.__dict__.items() if k != "log"},
        "cases": cases,
    }


def _summary_line(result: dict) -> str:
    context = "" if result["context"] == "interleaved" else f" ({result['context']})"
    parts = [f"  {result['config']} {result['dtype']} {result['routing']} T={result['tokens']}{context}:"]
    for mode, timings in result["timings"].items():
        dense = timings.get("dense ideal", {}).get("min_ms")
        auto = timings.get("sparsemoe auto")
        best = (auto["min_ms"], "auto") if auto else None
        if best:
            ratio = f" = {dense / best[0]:.2f}x dense" if dense else ""
            parts.append(f"{mode} {best[1]} {best[0]:.2f} ms{ratio};")
    return " ".join(parts)
