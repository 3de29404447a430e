"""Quantized experts measured: the expert stage per scheme against its weight-read bound and torchao, whole-
model greedy decode, and a trained checkpoint's validation loss per scheme.

    result = run_quant_bench(QuantBenchOptions())        # `sparsemoe bench --quant`

Legend: T tokens, D model width, F expert hidden width, E experts, K experts per token.

* layers: for each shape and T, the expert stage alone (the plan built once from one random routing, so
  every implementation computes the same thing): sparsemoe `auto` with float32, bfloat16, int8 and int4
  experts (the native kernels at a few rows per expert; past that, the experts dequantized and the float
  GEMMs), and torchao's int8 weight-only `nn.Linear` on the same int8 weights, expert by expert. Calls are
  interleaved round by round. The weight-read bound is the bytes of the experts the step uses, in each
  scheme's storage (scales included), read once at the copy bandwidth measured in the same run; at large T
  the stage is compute bound and the table shows the time beside float32's instead.
* model: greedy decode of one model in each scheme (the weights that stay floating point, and the
  computation, in float32, or in bfloat16 for the rows that say so): ms per token after the first, against
  the bytes one token must read (every weight but the experts it is not routed to; the embedding table
  counts one row).
* loss (with a trained checkpoint): validation loss and perplexity of the checkpoint's model in each
  scheme on the same windows of its corpus, and the relative change from float32.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from sparsemoe.bench.configs import BENCH_CONFIGS, BenchConfig, make_routing
from sparsemoe.bench.measure import copy_bandwidth, environment, time_interleaved
from sparsemoe.dispatch import run_backend
from sparsemoe.dispatch.plan import plan_from_topk
from sparsemoe.experts import Experts, activate
from sparsemoe.model import ModelConfig, MoETransformer, generate
from sparsemoe.quant import QuantizedExperts, QuantizedWeight, quantization_of, quantize
from sparsemoe.quant.schemes import QuantScheme

FLOAT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
SCHEME_NAMES = ("float32", "bfloat16", "int8", "int4")
TORCHAO = "torchao int8"
# The whole-model shape: Mixtral's proportions at D = 1024, 8 layers, a 32k vocabulary (0.66 B parameters,
# 0.2 B active per token); its experts do not fit in a CPU's caches.
MODEL_SHAPES = {
    "mixtral-1k": dict(vocab_size=32000, dim=1024, n_layers=8, n_heads=8, n_kv_heads=2, max_seq_len=512,
                       num_experts=8, top_k=2, moe_hidden_dim=2816),  # fmt: skip
}


@dataclass
class QuantBenchOptions:
    configs: tuple[str, ...] = ("mixtral-mini", "fine-grained", "mixtral-1k")
    tokens: tuple[int, ...] = (1, 16, 2048)
    group_size: int = 64  # int4
    repeats: int = 20
    model: Optional[str] = "mixtral-1k"  # a MODEL_SHAPES name, or None for no whole-model decode
    checkpoint: Optional[str] = None  # a run or checkpoint folder: decode and validation loss of that model
    decode_tokens: int = 32
    eval_batches: int = 16
    torchao: bool = True
    clock: str = "wall"


# --- the expert stage -----------------------------------------------------------------------------------


def _torchao_stage(experts: Experts) -> Optional[Callable[[Tensor, Any], Tensor]]:
    """The expert stage with torchao's int8 weight-only linears (one per expert and projection), or None
    when torchao is not installed."""
    torchao = _import_torchao()
    if torchao is None:
        return None
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    E = experts.num_experts
    layers = nn.ModuleList()
    for e in range(E):
        pair = nn.Sequential(nn.Linear(experts.dim, experts.w_in.shape[1], bias=False),
                             nn.Linear(experts.hidden_dim, experts.dim, bias=False))  # fmt: skip
        with torch.no_grad():
            pair[0].weight.copy_(experts.w_in[e])
            pair[1].weight.copy_(experts.w_out[e])
        layers.append(pair)
    quantize_(layers, Int8WeightOnlyConfig())

    def stage(x_TD: Tensor, plan) -> Tensor:
        bounds = [0] + plan.offsets.tolist()
        y_TD = torch.zeros_like(x_TD)
        for e in range(E):
            lo, hi = bounds[e], bounds[e + 1]
            if hi > lo:
                rows = plan.token_ids[lo:hi]
                o = layers[e][1](activate(layers[e][0](x_TD[rows]), experts.activation))
                y_TD.index_add_(0, rows, o * plan.weights[lo:hi, None])
        return y_TD

    return stage


def expert_bytes(experts: nn.Module, used: int) -> int:
    """Bytes of `used` experts' weights as stored (quantized: data and scales)."""
    total = 0
    for w in (experts.w_in, experts.w_out):
        total += w.nbytes() if isinstance(w, QuantizedWeight) else w.numel() * w.element_size()
    return total * used // experts.num_experts


def layer_rows(cfg: BenchConfig, T: int, opts: QuantBenchOptions, bandwidth: float) -> list[dict]:
    """One row per implementation for shape `cfg` at T tokens."""
    torch.manual_seed(0)
    base = Experts(cfg.num_experts, cfg.dim, cfg.hidden_dim, cfg.activation).eval()
    variants: dict[str, nn.Module] = {
        "float32": base,
        "bfloat16": copy.deepcopy(base).to(torch.bfloat16),
        "int8": QuantizedExperts.from_experts(base, QuantScheme.make("int8")),
        "int4": QuantizedExperts.from_experts(base, QuantScheme.make("int4", opts.group_size)),
    }
    ids_TK, weights_TK = make_routing("random", T, cfg.num_experts, cfg.top_k)
    plan = plan_from_topk(ids_TK, weights_TK, cfg.num_experts)
    used = int((torch.bincount(ids_TK.flatten(), minlength=cfg.num_experts) > 0).sum())
    x = torch.randn(T, cfg.dim)
    inputs = {name: x.to(torch.bfloat16) if name == "bfloat16" else x for name in variants}
    fns: dict[str, Callable[[], Any]] = {
        name: (lambda m=m, xi=inputs[name]: run_backend("auto", xi, plan, m)) for name, m in variants.items()
    }
    byte_counts = {name: expert_bytes(m, used) for name, m in variants.items()}
    torchao_stage = _torchao_stage(variants["float32"]) if opts.torchao and T <= 64 else None
    if torchao_stage is not None:
        fns[TORCHAO] = lambda: torchao_stage(x, plan)
        byte_counts[TORCHAO] = byte_counts["int8"]
    with torch.no_grad():
        reference = run_backend("auto", x, plan, base)
        for name, fn in fns.items():  # every implementation computes the same stage (quantization error aside)
            err = ((fn().float() - reference).norm() / reference.norm()).item()
            if not err < 0.2:
                raise RuntimeError(f"{name} on {cfg.name} at T={T}: relative error {err:.3f} against float32")
        times = time_interleaved(fns, opts.repeats, warmup=2, clock=opts.clock)
    rows = []
    for name, t in times.items():
        ms = t["min_ms"]
        bound_ms = byte_counts[name] / bandwidth * 1e3
        rows.append({
            "config": cfg.name, "T": T, "impl": name, "min_ms": ms, "median_ms": t["median_ms"],
            "bytes": byte_counts[name], "bound_ms": bound_ms, "bound_fraction": bound_ms / ms,
            "speedup_vs_bfloat16": times["bfloat16"]["min_ms"] / ms,
            "speedup_vs_float32": times["float32"]["min_ms"] / ms,
        })  # fmt: skip
    return rows


# --- whole models ---------------------------------------------------------------------------------------


def decode_bytes_per_token(model: MoETransformer) -> int:
    """Bytes one decode step must read: every weight except the experts a token is not routed to, and of
    the embedding table one row (unless it is also the LM head)."""
    routed = [(layer.experts, layer.config.top_k) for layer in model.moe_layers]
    routed_tensors = {id(t) for experts, _ in routed for t in (*experts.parameters(), *experts.buffers())}
    total = sum(expert_bytes(experts, top_k) for experts, top_k in routed)
    for t in model.parameters():
        if id(t) in routed_tensors:
            continue
        one_row = t is model.embed.weight and model.lm_head is not None
        total += (t.shape[1] if one_row else t.numel()) * t.element_size()
    for module in model.modules():  # quantized shared experts: buffers, not parameters
        if isinstance(module, QuantizedWeight) and id(module.data) not in routed_tensors:
            total += module.nbytes()
    return total


def variants_of(model: MoETransformer, group_size: int) -> dict[str, MoETransformer]:
    """The model in every scheme: float32, bfloat16, and int8 / int4 experts with the other weights (and the
    computation) in float32 and in bfloat16. A quantized model: only as it is."""
    quantized = quantization_of(model)
    if quantized is not None:
        return {quantized["scheme"]: model}
    half = copy.deepcopy(model).to(torch.bfloat16)
    variants = {"float32": model, "bfloat16": half}
    for scheme, group in (("int8", None), ("int4", group_size)):
        variants[scheme] = quantize(copy.deepcopy(model), scheme, group)
        variants[f"{scheme} + bfloat16"] = quantize(copy.deepcopy(half), scheme, group)
    return variants


def decode_ms_per_token(model: MoETransformer, prompt: Tensor, new_tokens: int) -> float:
    """Greedy decode with the KV cache: ms per token after the first (the prompt's forward left out)."""
    stamps: list[float] = []
    with torch.no_grad():
        generate(model, prompt, new_tokens, temperature=0, on_token=lambda _: stamps.append(time.perf_counter()))
    return (stamps[-1] - stamps[0]) / (len(stamps) - 1) * 1e3


def model_rows(models: dict[str, MoETransformer], label: str, opts: QuantBenchOptions, bandwidth: float) -> list[dict]:
    prompt = torch.randint(0, models[next(iter(models))].config.vocab_size, (16,), generator=torch.Generator().manual_seed(0))
    best = {name: float("inf") for name in models}
    for name, m in models.items():  # warm-up (kernel build, allocator)
        decode_ms_per_token(m, prompt, 4)
    for _ in range(3):  # interleaved rounds, the best of each
        for name, m in models.items():
            best[name] = min(best[name], decode_ms_per_token(m, prompt, opts.decode_tokens))
    rows = []
    for name, m in models.items():
        nbytes = decode_bytes_per_token(m)
        bound_ms = nbytes / bandwidth * 1e3
        rows.append({
            "model": label, "scheme": name, "ms_per_token": best[name], "tokens_per_s": 1e3 / best[name],
            "bytes_per_token": nbytes, "bound_ms": bound_ms, "bound_fraction": bound_ms / best[name],
            "speedup_vs_float32": best.get("float32", best[name]) / best[name],
            "speedup_vs_bfloat16": best.get("bfloat16", best[name]) / best[name],
        })  # fmt: skip
    return rows


def loss_rows(models: dict[str, MoETransformer], opts: QuantBenchOptions) -> list[dict]:
    """Validation loss of each scheme on the same windows of the default corpus's validation split."""
    from sparsemoe.train.data import eval_batches, load_corpus

    first = models[next(iter(models))]
    batches = eval_batches(load_corpus().val, 8, first.config.max_seq_len, opts.eval_batches)
    rows = []
    for name, m in models.items():
        with torch.no_grad():
            losses = [m(x, targets=y).loss.float().item() for x, y in batches]
        loss = sum(losses) / len(losses)
        rows.append({"scheme": name, "val_loss": loss, "perplexity": float(torch.tensor(loss).exp()),
                     "tokens": sum(x.numel() for x, _ in batches)})  # fmt: skip
    base = next((r["val_loss"] for r in rows if r["scheme"] == "float32"), None)
    for r in rows:
        r["change_vs_float32"] = None if base is None else r["val_loss"] / base - 1
    return rows


def run_quant_bench(opts: QuantBenchOptions, progress: Callable[[str], None] = lambda s: None) -> dict:
    for name in opts.configs:
        if name not in BENCH_CONFIGS:
            raise ValueError(f"config {name!r} is not known; accepted: {', '.join(BENCH_CONFIGS)}")
    if opts.model is not None and opts.model not in MODEL_SHAPES:
        raise ValueError(f"model {opts.model!r} is not known; accepted: {', '.join(MODEL_SHAPES)}")
    QuantScheme.make("int4", opts.group_size)  # a bad group size fails before anything runs
    bandwidth = copy_bandwidth()
    result: dict[str, Any] = {"options": asdict(opts), "environment": environment(torch.device("cpu")),
                              "copy_bandwidth_GBps": bandwidth / 1e9, "layers": [], "models": [], "loss": []}  # fmt: skip
    result["environment"]["torchao"] = _torchao_version()
    for name in opts.configs:
        for T in opts.tokens:
            progress(f"layer {name}, T={T}")
            result["layers"] += layer_rows(BENCH_CONFIGS[name], T, opts, bandwidth)
    if opts.model is not None:
        progress(f"model {opts.model}: building and quantizing")
        torch.manual_seed(0)
        model = MoETransformer(ModelConfig(**MODEL_SHAPES[opts.model])).eval()
        result["models"] += model_rows(variants_of(model, opts.group_size), opts.model, opts, bandwidth)
        del model
    if opts.checkpoint is not None:
        from sparsemoe.train.checkpoint import load_meta, load_model, resolve_checkpoint

        progress(f"checkpoint {opts.checkpoint}")
        # A float checkpoint in float32 (its other schemes are made from it); a quantized one as it is stored.
        quantized = load_meta(resolve_checkpoint(opts.checkpoint)).get("quantization")
        model, _ = load_model(opts.checkpoint, dtype=None if quantized else torch.float32)
        models = variants_of(model, opts.group_size)
        result["models"] += model_rows(models, str(opts.checkpoint), opts, bandwidth)
        result["loss"] = loss_rows(models, opts)
    return result


def _import_torchao():
    """torchao, or None when it is not installed; its import-time notes about CUDA-only extensions that
    a CPU build cannot load are kept off the console."""
    import logging

    loggers = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        import torchao
    except ImportError:
        return None
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
    return torchao


def _torchao_version() -> Optional[str]:
    torchao = _import_torchao()
    return None if torchao is None else torchao.__version__


# --- report ---------------------------------------------------------------------------------------------


def quant_markdown(result: dict, command: str) -> str:
    env = result["environment"]
    lines = [
        "# Quantized experts",
        "",
        f"`{command}`",
        "",
        f"torch {env['torch']}, torchao {env.get('torchao') or 'not installed'}, {env['threads']} threads, "
        f"{env['device_name']}; copy bandwidth {result['copy_bandwidth_GBps']:.1f} GB/s (measured in this run); "
        f"int4 group size {result['options']['group_size']}.",
        "",
        "## The expert stage (float32 activations; bfloat16 row: bfloat16 activations and weights)",
        "",
        "| shape | T | implementation | ms | vs bfloat16 | vs float32 | weight-read bound ms | of bound |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in result["layers"]:
        compute_bound = r["T"] > 64
        lines.append(
            f"| {r['config']} | {r['T']} | {r['impl']} | {r['min_ms']:.3f} | {r['speedup_vs_bfloat16']:.2f}x | "
            f"{r['speedup_vs_float32']:.2f}x | {'—' if compute_bound else format(r['bound_ms'], '.3f')} | "
            f"{'—' if compute_bound else format(r['bound_fraction'], '.2f')} |"
        )
    if result["models"]:
        lines += ["", "## Whole-model greedy decode (batch 1, KV cache)", "",
                  "| model | scheme | ms/token | tokens/s | vs float32 | vs bfloat16 | bytes/token | of bound |",
                  "|---|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
        for r in result["models"]:
            lines.append(
                f"| {r['model']} | {r['scheme']} | {r['ms_per_token']:.2f} | {r['tokens_per_s']:.1f} | "
                f"{r['speedup_vs_float32']:.2f}x | {r['speedup_vs_bfloat16']:.2f}x | {r['bytes_per_token'] / 1e6:.1f} MB | "
                f"{r['bound_fraction']:.2f} |"
            )
    if result["loss"]:
        lines += ["", f"## Validation loss of {result['options']['checkpoint']}", "",
                  "| scheme | loss | perplexity | change vs float32 |", "|---|---:|---:|---:|"]  # fmt: skip
        for r in result["loss"]:
            change = "—" if r["change_vs_float32"] is None else f"{100 * r['change_vs_float32']:+.2f}%"
            lines.append(f"| {r['scheme']} | {r['val_loss']:.4f} | {r['perplexity']:.3f} | {change} |")
    return "\n".join(lines) + "\n"
