"""Whole transformers models with each experts implementation: prefill and greedy decode, side by side.

    result = run_hf_model_bench(HFModelBenchOptions(families=("mixtral",), dtypes=("bfloat16",)))

For each family and dtype one random model is built at `size` (`sparsemoe.hf.families.random_model`:
the family's own config class and model class), and every implementation in `implementations` runs it
in turn, on the same weights and inputs, calls interleaved round by round:

* prefill: one forward of `prefill_tokens` tokens (batch 1, no cache), tokens/s;
* decode: greedy `generate` with the KV cache; the time per new token is (t(N) - t(1)) / (N - 1) for
  N = `decode_tokens`, which leaves out the prompt and generate's set-up;
* the expert stage inside the model: each time minus the model's time with a no-op experts
  implementation registered for the run (attention, norms, routers and the LM head cost the same for
  every implementation, so what differs between them is there);
* the weight-read reference of a decode step's expert stage: the bytes of the K experts each token uses
  in every MoE layer, read once at the copy bandwidth measured in the same run; the fraction reached is
  reference / expert time (a read-only stream can run a little faster than a copy, so 1.0 is a yardstick,
  not a wall).

Before timing, every implementation's prefill logits are checked against "eager" (a rounding-level
difference is expected; in bfloat16 a near-tied routing choice may flip, so only float32 is enforced).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from sparsemoe.bench.measure import copy_bandwidth, environment, synchronize, time_interleaved
from sparsemoe.bench.report import format_ms
from sparsemoe.hf.experts_implementation import is_decorated_experts
from sparsemoe.hf.families import ModelSize, experts_families, random_model

IMPLEMENTATIONS = ("eager", "grouped_mm", "sparsemoe")
NO_EXPERTS = "no-op experts (the rest of the model)"
_NO_EXPERTS_KEY = "sparsemoe_bench_no_experts"
# A Mixtral-like model of realistic width (its experts 8 x [2 x 2816, 1024]), 4 layers: ~0.36 B parameters.
DEFAULT_SIZE = ModelSize(
    hidden=1024, moe_hidden=2816, dense_hidden=2816, heads=16, kv_heads=8, head_dim=64, experts=8, top_k=2,
    layers=4, vocab=32000, sliding_window=4096,
)  # fmt: skip
# Three layouts: concatenated gate/up (native SwiGLU); transposed, biased, interleaved clamped gate (the
# general path); no gate with ReLU² in a hybrid Mamba/attention stack.
DEFAULT_FAMILIES = ("mixtral", "gpt_oss", "nemotron_h")


@dataclass
class HFModelBenchOptions:
    families: tuple[str, ...] = DEFAULT_FAMILIES
    dtypes: tuple[str, ...] = ("float32", "bfloat16")
    implementations: tuple[str, ...] = IMPLEMENTATIONS
    size: ModelSize = DEFAULT_SIZE
    prefill_tokens: int = 2048
    decode_tokens: int = 16
    prompt_tokens: int = 8
    repeats: int = 3
    device: str = "cpu"
    clock: str = "wall"
    subtract_rest: bool = True  # also time the no-op experts implementation, for the expert stage alone


def _register_no_experts() -> None:
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register(_NO_EXPERTS_KEY, lambda module, hidden_states, ids, weights: hidden_states * 0)


def _timed(fn: Callable[[], None], device: torch.device) -> Callable[[], None]:
    def run() -> None:
        fn()
        synchronize(device)

    return run


def decode_expert_bytes(model: torch.nn.Module, top_k: int) -> int:
    """Bytes of expert weights one decode token reads: top_k experts of every experts module (whole
    projections and biases of one expert, times top_k)."""
    total = 0
    for module in model.modules():
        if is_decorated_experts(module):
            tensors = [t for t in module.parameters(recurse=False) if t.dim() >= 2]
            total += sum(t[0].numel() * t.element_size() for t in tensors) * top_k
    return total


def _case(family: str, dtype: str, opts: HFModelBenchOptions, device: torch.device, bandwidth: float) -> dict:
    model = random_model(experts_families()[family], opts.size).to(device=device, dtype=getattr(torch, dtype))
    params = sum(p.numel() for p in model.parameters())
    bound_ms = decode_expert_bytes(model, model_top_k(model, opts.size.top_k)) / bandwidth * 1e3
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, opts.size.vocab, (1, opts.prefill_tokens), generator=gen).to(device)
    names = list(opts.implementations) + ([NO_EXPERTS] if opts.subtract_rest else [])
    key = {name: _NO_EXPERTS_KEY if name == NO_EXPERTS else name for name in names}

    def prefill(name: str) -> torch.Tensor:
        model.set_experts_implementation(key[name])
        with torch.no_grad():
            return model(input_ids=prompt).logits

    def generate(name: str, new_tokens: int) -> None:
        model.set_experts_implementation(key[name])
        with torch.no_grad():
            model.generate(
                prompt[:, : opts.prompt_tokens], max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                do_sample=False, pad_token_id=0,
            )  # fmt: skip

    errors = {}
    reference = prefill("eager").float() if "eager" in names else None
    for name in opts.implementations:
        if reference is not None:
            got = prefill(name).float()
            errors[name] = ((got - reference).abs().max() / reference.abs().max()).item()
            if dtype == "float32" and errors[name] > 1e-4:
                raise RuntimeError(f"{family}: {name} logits differ from eager by {errors[name]:.3g} (relative)")
    fns = {("prefill", n): _timed(lambda n=n: prefill(n), device) for n in names}
    fns.update({("decode1", n): _timed(lambda n=n: generate(n, 1), device) for n in names})
    fns.update({("decodeN", n): _timed(lambda n=n: generate(n, opts.decode_tokens), device) for n in names})
    timings = time_interleaved(fns, opts.repeats, clock=opts.clock)
    rows = []
    for name in names:
        prefill_ms = timings["prefill", name]["min_ms"]
        decode_total = timings["decodeN", name]["min_ms"] - timings["decode1", name]["min_ms"]
        decode_ms = decode_total / (opts.decode_tokens - 1)
        rows.append({
            "implementation": name, "prefill_ms": prefill_ms,
            "prefill_tokens_per_s": opts.prefill_tokens / prefill_ms * 1e3, "decode_ms_per_token": decode_ms,
            "decode_tokens_per_s": 1e3 / decode_ms if decode_ms > 0 else float("inf"),
            "logits_error_vs_eager": errors.get(name),
        })  # fmt: skip
    if opts.subtract_rest:
        rest = rows[-1]
        for row in rows[:-1]:
            row["experts_prefill_ms"] = row["prefill_ms"] - rest["prefill_ms"]
            row["experts_decode_ms_per_token"] = row["decode_ms_per_token"] - rest["decode_ms_per_token"]
            row["decode_fraction_of_bound"] = bound_ms / row["experts_decode_ms_per_token"]
    return {
        "family": family, "model_class": type(model).__name__, "dtype": dtype, "parameters": params, "rows": rows,
        "decode_expert_bound_ms": bound_ms,
    }  # fmt: skip


def model_top_k(model: torch.nn.Module, default: int) -> int:
    """Experts per token as the model's config says (the size asked for may have been capped lower)."""
    config = getattr(model.config, "get_text_config", lambda: model.config)()
    for key in ("num_experts_per_tok", "num_experts_per_token", "moe_k", "moe_topk", "top_k_experts"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return default


def run_hf_model_bench(opts: HFModelBenchOptions) -> dict:
    """{"options", "environment", "cases": [{"family", "dtype", "rows": [...]}]} (see the module docstring)."""
    device = torch.device(opts.device)
    if opts.subtract_rest:
        _register_no_experts()
    known = experts_families()
    unknown = [f for f in opts.families if f not in known]
    if unknown:
        raise ValueError(f"unknown families {unknown}; the installed transformers has: {', '.join(known)}")
    bandwidth = copy_bandwidth(device)
    cases = []
    for family in opts.families:
        for dtype in opts.dtypes:
            start = time.perf_counter()
            cases.append(_case(family, dtype, opts, device, bandwidth))
            cases[-1]["seconds"] = time.perf_counter() - start
    env = environment(device)
    env["clock"] = opts.clock
    return {
        "options": {**asdict(opts), "size": asdict(opts.size)}, "environment": env, "cases": cases,
        "copy_bandwidth_gbs": bandwidth / 1e9,
    }  # fmt: skip


def _ms_cell(row: dict, key: str, base) -> str:
    """A time, with the speed-up over `base` (grouped_mm's row) in brackets; empty when the row lacks it."""
    if key not in row:
        return ""
    if base is None or row is base or row[key] <= 0:
        return format_ms(row[key])
    return f"{format_ms(row[key])} ({base[key] / row[key]:.2f}x)"


def hf_model_markdown(result: dict, command: str) -> str:
    opts, env = result["options"], result["environment"]
    size = opts["size"]
    lines = [
        "# sparsemoe hf-bench: whole transformers models by experts implementation",
        "",
        f"Command: `{command}`",
        "",
        f"torch {env['torch']}, transformers {env.get('transformers')}, python {env['python']}; device "
        f"{env['device']} ({env['device_name']}), {env['threads']} threads; native CPU kernels {env['cpu_kernels']}. "
        f"Random models: width {size['hidden']}, experts {size['experts']} x hidden {size['moe_hidden']}, top-"
        f"{size['top_k']}, {size['layers']}+ layers, vocabulary {size['vocab']}. Prefill: {opts['prefill_tokens']} "
        f"tokens, batch 1. Decode: greedy with the KV cache after a {opts['prompt_tokens']}-token prompt, "
        f"(t({opts['decode_tokens']} tokens) - t(1 token)) / {opts['decode_tokens'] - 1}. Minimum of "
        f"{opts['repeats']} interleaved rounds ({env.get('clock', 'wall')} clock). 'experts' = the time minus the "
        "same model's with a no-op experts implementation; brackets: speed-up over grouped_mm; 'of bound': the "
        "time to read the decode step's experts once (their bytes at the copy bandwidth, "
        f"{result['copy_bandwidth_gbs']:.1f} GB/s read + write, measured in this run) / the experts' ms/token. "
        "Logits are compared on the prefill; in bfloat16 a rounding difference may flip a near-tied routing "
        "choice of the random model, so only float32 differences are a check.",
        "",
    ]
    for case in result["cases"]:
        base = next((r for r in case["rows"] if r["implementation"] == "grouped_mm"), None)
        lines += [
            f"## {case['family']} ({case['model_class']}, {case['parameters'] / 1e6:.3g} M parameters), "
            f"{case['dtype']}",
            "",
            "| implementation | prefill ms | prefill tok/s | experts ms | decode ms/token | decode tok/s "
            f"| experts ms/token | of bound ({format_ms(case['decode_expert_bound_ms'])} ms) | logits vs eager |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for row in case["rows"]:
            err = row.get("logits_error_vs_eager")
            cells = [
                row["implementation"], _ms_cell(row, "prefill_ms", base), f"{row['prefill_tokens_per_s']:.0f}",
                _ms_cell(row, "experts_prefill_ms", base), _ms_cell(row, "decode_ms_per_token", base),
                f"{row['decode_tokens_per_s']:.1f}", _ms_cell(row, "experts_decode_ms_per_token", base),
                f"{row['decode_fraction_of_bound']:.2f}" if "decode_fraction_of_bound" in row else "",
                "" if err is None else f"{err:.1e}",
            ]  # fmt: skip
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines) + "\n"
