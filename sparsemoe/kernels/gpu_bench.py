"""GPU benchmark of the Triton expert kernels beside the dense ideal and torch._grouped_mm.

    python -m sparsemoe.kernels.gpu_bench [--out triton_bench.json] [--repeats 20]

Legend: T tokens, D model width, F expert hidden width, E experts, K experts per token, N = T*K rows.

Cases (bfloat16 by default):
  * large batches, forward and forward+backward: Mixtral (D=4096 F=14336 E=8 K=2) and fine-grained
    (D=4096 F=1024 E=128 K=8), T=16384, beside
      - dense ideal: one expert-shaped SwiGLU MLP over N rows with cuBLAS (the same FLOPs, no routing);
      - torch._grouped_mm: gather rows, two native grouped GEMMs, weighted index_add;
      - sparsemoe grouped: the package's default backend;
  * decode, forward only, T in {1, 16, 64}: latency against the weight-read bound, the time to read
    the active experts' weights once at the HBM copy bandwidth measured in the same run.
Every implementation is timed from the routing (expert ids and weights) to the combined output, so the
sort into a plan is inside the timing; runs are interleaved round by round and the median is kept.
Prints a markdown table and writes JSON. `--tiny` runs small shapes (on the CPU under
TRITON_INTERPRET=1, for testing the script itself; its timings mean nothing).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from sparsemoe.dispatch import build_plan
from sparsemoe.dispatch.grouped import grouped_forward
from sparsemoe.dispatch.triton_backend import triton_forward
from sparsemoe.experts import Experts, activate, mlp
from sparsemoe.kernels._common import INTERPRET
from sparsemoe.routing import RoutingResult


@dataclass(frozen=True)
class Shape:
    name: str
    dim: int  # D
    hidden: int  # F
    experts: int  # E
    top_k: int  # K


SHAPES = [Shape("mixtral", 4096, 14336, 8, 2), Shape("fine-grained", 4096, 1024, 128, 8)]
TINY_SHAPES = [Shape("tiny", 40, 48, 4, 2)]
LARGE_TOKENS, DECODE_TOKENS = 16384, (1, 16, 64)


# --- timing -------------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_ms(fn: Callable[[], None], device: torch.device) -> float:
    if device.type != "cuda":
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    fn()
    end.record()
    end.synchronize()
    return begin.elapsed_time(end)


def time_interleaved(
    fns: dict[str, Callable[[], None]], device: torch.device, repeats: int, warmup: int, errors: Optional[dict] = None
) -> dict[str, float]:
    """Median milliseconds per callable; `warmup` untimed calls first (autotuning, compilation).

    With `errors` given, a callable that raises on its first call is left out and its error recorded
    there (e.g. a torch without `_grouped_mm`'s backward), so one failing contender does not end the run.
    """
    live = {}
    for name, fn in fns.items():
        try:
            for _ in range(max(warmup, 1 if errors is not None else 0)):
                fn()
            live[name] = fn
        except Exception as exc:  # noqa: BLE001 - reported in the table, the other contenders still run
            if errors is None:
                raise
            errors[name] = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
    _sync(device)
    samples: dict[str, list[float]] = {name: [] for name in live}
    for _ in range(repeats):
        for name, fn in live.items():
            samples[name].append(_time_ms(fn, device))
    return {name: statistics.median(s) for name, s in samples.items()}


def copy_bandwidth(device: torch.device, nbytes: int) -> float:
    """Device copy bandwidth in bytes/s: (bytes read + bytes written) / time, median of 10 copies."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).fill_(1)
    dst = torch.empty_like(src)
    ms = time_interleaved({"copy": lambda: dst.copy_(src)}, device, repeats=10, warmup=2)["copy"]
    return 2 * nbytes / (ms / 1e3)


# --- the contenders ----------------------------------------------------------------------------------------


@dataclass
class Case:
    shape: Shape
    tokens: int
    x: Tensor  # [T, D] leaf
    weights_TK: Tensor  # [T, K] float32 leaf
    ids_TK: Tensor  # [T, K] long
    experts: Experts

    def leaves(self) -> list[Tensor]:
        return [self.x, self.weights_TK, self.experts.w_in, self.experts.w_out]


def make_case(shape: Shape, tokens: int, dtype: torch.dtype, device: torch.device, seed: int = 0) -> Case:
    torch.manual_seed(seed)
    experts = Experts(shape.experts, shape.dim, shape.hidden, "swiglu", device=device, dtype=dtype)
    logits = torch.randn(tokens, shape.experts, device=device)
    top = torch.softmax(logits, -1).topk(shape.top_k, dim=-1)
    weights = (top.values / top.values.sum(-1, keepdim=True)).requires_grad_()
    x = torch.randn(tokens, shape.dim, device=device, dtype=dtype).requires_grad_()
    return Case(shape, tokens, x, weights, top.indices, experts)


def _plan(case: Case):
    T, E, K = case.tokens, case.shape.experts, case.shape.top_k
    routing = RoutingResult(
        token_ids=torch.arange(T, device=case.x.device).repeat_interleave(K),
        expert_ids=case.ids_TK.reshape(-1),
        weights=case.weights_TK.reshape(-1),
        probs=case.weights_TK.new_zeros(T, E),  # unused by the plan
        logits=case.weights_TK.new_zeros(T, E),
        top_k=K,
        expert_choice=False,
    )
    return build_plan(routing, None)


def _torch_grouped_mm(case: Case) -> Tensor:
    E, K = case.shape.experts, case.shape.top_k
    ids_N = case.ids_TK.reshape(-1)
    order = torch.argsort(ids_N, stable=True)
    offsets = torch.bincount(ids_N, minlength=E).cumsum(0).to(torch.int32)
    token_ids = order // K
    h_NI = torch._grouped_mm(case.x[token_ids], case.experts.w_in.transpose(1, 2), offs=offsets)
    o_ND = torch._grouped_mm(activate(h_NI, "swiglu"), case.experts.w_out.transpose(1, 2), offs=offsets)
    y = case.x.new_zeros(case.tokens, case.shape.dim, dtype=torch.float32)
    return y.index_add(0, token_ids, o_ND.float() * case.weights_TK.reshape(-1)[order, None])


def contenders(case: Case, with_dense: bool) -> dict[str, tuple[Callable[[], Tensor], list[Tensor]]]:
    """{name: (forward from the routing to y [T, D], the leaves whose gradients its backward makes)}."""
    leaves = case.leaves()
    fns = {
        "sparsemoe triton": (lambda: triton_forward(case.x, _plan(case), case.experts), leaves),
        "sparsemoe grouped": (lambda: grouped_forward(case.x, _plan(case), case.experts), leaves),
    }
    if hasattr(torch, "_grouped_mm") and case.x.device.type == "cuda":
        fns["torch._grouped_mm"] = (lambda: _torch_grouped_mm(case), leaves)
    if with_dense:
        K = case.shape.top_k
        x_ND = case.x.detach().repeat_interleave(K, dim=0).requires_grad_()
        w_in = case.experts.w_in[0].detach().clone().requires_grad_()
        w_out = case.experts.w_out[0].detach().clone().requires_grad_()
        fns["dense ideal"] = (lambda: mlp(x_ND, w_in, w_out, "swiglu"), [x_ND, w_in, w_out])
    return fns


def _forward(fn: Callable[[], Tensor]) -> Callable[[], None]:
    def run() -> None:
        with torch.no_grad():
            fn()

    return run


def _forward_backward(fn: Callable[[], Tensor], leaves: list[Tensor]) -> Callable[[], None]:
    grads: dict[torch.dtype, Tensor] = {}

    def run() -> None:
        for leaf in leaves:
            leaf.grad = None
        y = fn()
        if y.dtype not in grads:  # one fixed output gradient per output dtype, made outside the timing
            grads[y.dtype] = torch.randn(y.shape, device=y.device, generator=torch.Generator(y.device).manual_seed(1)).to(y.dtype)
        y.backward(grads[y.dtype])

    return run


# --- the run ---------------------------------------------------------------------------------------------------


def _flops(shape: Shape, tokens: int) -> float:
    """Forward FLOPs of the expert MLPs: N rows x (D -> 2F) and (F -> D), 2 per multiply-add."""
    return 2.0 * tokens * shape.top_k * (shape.dim * 2 * shape.hidden + shape.hidden * shape.dim)


def run_large(shape: Shape, tokens: int, dtype, device, repeats: int, warmup: int) -> list[dict]:
    case = make_case(shape, tokens, dtype, device)
    fns = contenders(case, with_dense=True)
    rows = []
    for mode in ("forward", "forward+backward"):
        if mode == "forward":
            steps = {name: _forward(fn) for name, (fn, _) in fns.items()}
        else:
            steps = {name: _forward_backward(fn, leaves) for name, (fn, leaves) in fns.items()}
        errors: dict[str, str] = {}
        times = time_interleaved(steps, device, repeats, warmup, errors)
        flops = _flops(shape, tokens) * (1 if mode == "forward" else 3)
        for name, ms in times.items():
            row = {"shape": shape.name, "tokens": tokens, "mode": mode, "impl": name, "ms": ms}
            row["tflops"] = flops / (ms / 1e3) / 1e12
            if "dense ideal" in times:
                row["vs_dense_ideal"] = times["dense ideal"] / ms
            rows.append(row)
        rows += [{"shape": shape.name, "tokens": tokens, "mode": mode, "impl": n, "error": e} for n, e in errors.items()]
        del steps
    return rows


def run_decode(shape: Shape, tokens: int, dtype, device, repeats: int, warmup: int, bandwidth: float) -> list[dict]:
    case = make_case(shape, tokens, dtype, device)
    active = int(torch.unique(case.ids_TK).numel())
    element = torch.finfo(dtype).bits // 8
    weight_bytes = active * (2 * shape.hidden * shape.dim + shape.dim * shape.hidden) * element
    bound_ms = weight_bytes / bandwidth * 1e3
    steps = {name: _forward(fn) for name, (fn, _) in contenders(case, False).items()}
    errors: dict[str, str] = {}
    times = time_interleaved(steps, device, repeats, warmup, errors)
    rows = [
        {
            "shape": shape.name, "tokens": tokens, "mode": "decode forward", "impl": name, "ms": ms,
            "active_experts": active, "weight_read_bound_ms": bound_ms, "vs_bound": bound_ms / ms,
        }
        for name, ms in times.items()
    ]  # fmt: skip
    return rows + [{"shape": shape.name, "tokens": tokens, "mode": "decode forward", "impl": n, "error": e} for n, e in errors.items()]


def environment(device: torch.device, bandwidth: float) -> dict:
    import triton

    env = {"torch": torch.__version__, "triton": triton.__version__, "device": str(device), "copy_bandwidth_GBps": bandwidth / 1e9}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def markdown(rows: list[dict]) -> str:
    lines = [
        "| shape | T | mode | implementation | ms | TFLOP/s | vs dense ideal | vs weight-read bound |",
        "|---|---:|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['shape']} | {r['tokens']} | {r['mode']} | {r['impl']} | failed: {r['error']} | | | |")
            continue
        tflops = f"{r['tflops']:.1f}" if "tflops" in r else ""
        dense = f"{r['vs_dense_ideal']:.2f}" if "vs_dense_ideal" in r else ""
        bound = f"{r['vs_bound']:.2f} ({r['weight_read_bound_ms']:.3f} ms)" if "vs_bound" in r else ""
        lines.append(f"| {r['shape']} | {r['tokens']} | {r['mode']} | {r['impl']} | {r['ms']:.3f} | {tflops} | {dense} | {bound} |")
    return "\n".join(lines)


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m sparsemoe.kernels.gpu_bench", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="triton_bench.json", help="JSON report path (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=20, help="timed rounds per case, >= 1 (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls first (autotuning), >= 0 (default: %(default)s)")
    parser.add_argument("--shapes", default="mixtral,fine-grained", help="comma-separated subset of: mixtral, fine-grained")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16"))
    parser.add_argument("--tiny", action="store_true", help="small shapes; on the CPU under TRITON_INTERPRET=1 (tests)")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0:
        parser.error("--repeats must be >= 1 and --warmup >= 0")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.tiny:
        shapes, large_tokens, decode_tokens = TINY_SHAPES, 24, (2,)
        device = torch.device("cpu" if INTERPRET else "cuda")
    else:
        known = {s.name: s for s in SHAPES}
        wanted = [n.strip() for n in args.shapes.split(",") if n.strip()]
        unknown = [n for n in wanted if n not in known]
        if unknown or not wanted:
            print(f"gpu_bench: error: unknown shape(s) {unknown}; accepted: {sorted(known)}", file=sys.stderr)
            return 2
        shapes, large_tokens, decode_tokens = [known[n] for n in wanted], LARGE_TOKENS, DECODE_TOKENS
        device = torch.device("cuda")
    if device.type == "cuda" and (INTERPRET or not torch.cuda.is_available()):
        print("gpu_bench: error: needs a CUDA GPU and TRITON_INTERPRET unset (or --tiny under the interpreter)", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    bandwidth = copy_bandwidth(device, 2**30 if device.type == "cuda" else 2**24)
    rows: list[dict] = []
    for shape in shapes:
        rows += run_large(shape, large_tokens, dtype, device, args.repeats, args.warmup)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        for tokens in decode_tokens:
            rows += run_decode(shape, tokens, dtype, device, args.repeats, args.warmup, bandwidth)
    report = {"environment": environment(device, bandwidth), "dtype": args.dtype, "results": rows}
    with open(args.out, "w") as fh:
        json.dump(report, fh, indent=2)
    env = report["environment"]
    print(f"{env.get('gpu', env['device'])}, torch {env['torch']}, triton {env['triton']}, {args.dtype}, "
          f"copy bandwidth {env['copy_bandwidth_GBps']:.0f} GB/s, median of {args.repeats} interleaved rounds")  # fmt: skip
    print(markdown(rows))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
