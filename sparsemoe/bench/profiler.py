"""Where the time goes in one MoE layer step: router, plan, permute, expert GEMMs, activation, combine,
and the backward of each; plus the step's peak memory.

Legend: T tokens, D model width, E experts, K experts per token.

The step is the layer's own forward (`MoE.__call__`) and backward, with torch.profiler labels put
around its router, plan and experts for the profiled steps only; the fused expert op labels its inner
stages itself (`sparsemoe.dispatch.fused.label_stages`). Time inside a part that no inner label covers is reported
as that part's "other" (Python and small ops).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from sparsemoe.bench.measure import environment, peak_memory_bytes, quiet_profiler_output, synchronize
from sparsemoe.dispatch import build_plan, fused, resolve_backend
from sparsemoe.layer import MoE

# "native": the fused op's whole stage in one native call (a few rows per expert: fused.NATIVE_MAX_ROWS_PER_EXPERT)
FORWARD_STAGES = ("native", "permute", "gemm_in", "activation", "gemm_out", "combine")
BACKWARD_STAGES = ("native", "permute", "recompute", "gemm_out", "activation", "gemm_in")


@dataclass
class ProfileOptions:
    steps: int = 3
    warmup: int = 1
    seed: int = 0


def _step(layer: MoE, x: torch.Tensor, grad: torch.Tensor) -> None:
    layer.zero_grad(set_to_none=True)
    x.grad = None
    with record_function("sparsemoe.forward"):
        y = layer(x)
    with record_function("sparsemoe.backward"):
        y.backward(grad.to(y.dtype))


def _labelled(name: str, fn):
    def wrapper(*args, **kwargs):
        with record_function("sparsemoe." + name):
            return fn(*args, **kwargs)

    return wrapper


@contextlib.contextmanager
def _stage_labels(layer: MoE):
    """Label the layer's own parts while profiling: the router, the plan and the experts (its dispatch hook).

    Instance attributes shadow the methods, and the layer module's `build_plan` is wrapped for the
    duration only, so the profiled step runs exactly `MoE.forward`.
    """
    import sparsemoe.layer as layer_module

    original_plan = layer_module.build_plan
    layer.router.logits = _labelled("router", layer.router.logits)
    layer.router.route = _labelled("router", layer.router.route)
    layer._dispatch = _labelled("experts", layer._dispatch)
    layer_module.build_plan = _labelled("plan", original_plan)
    fused.label_stages(True)
    try:
        yield
    finally:
        fused.label_stages(False)
        layer_module.build_plan = original_plan
        for obj, name in ((layer.router, "logits"), (layer.router, "route"), (layer, "_dispatch")):
            del obj.__dict__[name]


def profile_layer(layer: MoE, tokens: int, dtype: torch.dtype, opts: ProfileOptions) -> dict:
    """Per-stage milliseconds (mean over `opts.steps` steps), the total step time and the peak memory."""
    gen = torch.Generator().manual_seed(opts.seed)
    device = layer.experts.w_in.device
    x = torch.randn(tokens, layer.config.dim, generator=gen).to(device, dtype).requires_grad_(True)
    grad = torch.randn(tokens, layer.config.dim, generator=gen).to(device)
    for _ in range(opts.warmup):
        _step(layer, x, grad)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(opts.steps):
        _step(layer, x, grad)
    synchronize(device)
    step_ms = (time.perf_counter() - start) * 1e3 / opts.steps  # unlabelled, unprofiled: the true step time

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with quiet_profiler_output(), _stage_labels(layer), profile(activities=activities) as prof:
        for _ in range(opts.steps):
            _step(layer, x, grad)
    totals: dict[str, float] = {}
    for event in prof.key_averages():
        if event.key.startswith("sparsemoe."):
            totals[event.key[len("sparsemoe."):]] = event.cpu_time_total / 1e3 / opts.steps
    peak = peak_memory_bytes(lambda: _step(layer, x, grad), device)
    return {
        "stages": _stages(totals),
        "step_ms": step_ms,
        "profiled_step_ms": totals.get("forward", 0.0) + totals.get("backward", 0.0),
        "peak_memory_mb": peak / 2**20,
        "backend": _backend_label(layer, x),
    }


def _backend_label(layer: MoE, x: torch.Tensor) -> str:
    """The backend the profiled forward+backward runs: the decode backend hands the step over to the grouped
    backend's op when gradients are wanted, as here."""
    name = resolve_backend(layer.config.backend, x.detach(), _plan(layer, x)).name
    return "grouped (decode by shape; with gradients decode runs the grouped op)" if name == "decode" else name


def _plan(layer: MoE, x: torch.Tensor):
    with torch.no_grad():
        x_TD = x.reshape(-1, layer.config.dim)
        capacity = layer.config.capacity(x_TD.shape[0], layer.training)
        return build_plan(layer.router.route(layer.router.logits(x_TD), capacity), capacity)


def _stages(totals: dict[str, float]) -> dict[str, float]:
    """Ordered stage -> ms; the 'other' rows hold each part's time that no inner label covers."""
    stages = {"router": totals.get("router", 0.0), "plan": totals.get("plan", 0.0)}
    inner = 0.0
    for name in FORWARD_STAGES:
        if name in totals:
            stages[name] = totals[name]
            inner += totals[name]
    stages["experts other"] = max(totals.get("experts", 0.0) - inner, 0.0)
    outer = sum(totals.get(k, 0.0) for k in ("router", "plan", "experts"))
    stages["losses, stats, checks"] = max(totals.get("forward", 0.0) - outer, 0.0)
    inner = 0.0
    for name in BACKWARD_STAGES:
        key = "backward." + name
        if key in totals:
            label = "backward activation, router weights" if name == "activation" else key.replace(".", " ")
            stages[label] = totals[key]
            inner += totals[key]
    stages["backward other (router, plan, autograd)"] = max(totals.get("backward", 0.0) - inner, 0.0)
    return stages


def profile_markdown(result: dict, command: str) -> str:
    env = result["environment"]
    cfg = result["config"]
    total = sum(result["stages"].values()) or 1.0
    lines = [
        "# sparsemoe profile",
        "",
        f"Command: `{command}`",
        "",
        f"torch {env['torch']}; device {env['device']} ({env['device_name']}), {env['threads']} threads, "
        f"native CPU kernels {env.get('cpu_kernels', 'off')}; "
        f"layer D={cfg['dim']} F={cfg['hidden_dim']} E={cfg['num_experts']} k={cfg['top_k']} {cfg['activation']}, "
        f"T={result['tokens']}, {result['dtype']}, backend {result['backend']}"
        + (", recomputing activations" if result.get("recompute") else "") + ".",
        "",
        f"Step (forward + backward): {result['step_ms']:.2f} ms unprofiled; peak memory {result['peak_memory_mb']:.1f} MiB "
        "above the inputs and weights.",
        "",
        "| stage | ms per step | share |",
        "|---|---|---|",
    ]
    for name, ms in result["stages"].items():
        lines.append(f"| {name} | {ms:.3f} | {100 * ms / total:.1f}% |")
    lines += ["", "Stage times come from torch.profiler labels (the profiled step is a little slower than the unprofiled one).", ""]
    return "\n".join(lines)


def environment_for(device: torch.device) -> dict:
    return environment(device)
