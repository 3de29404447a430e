"""`sparsemoe bench`: our backends, the dense ideal and the peers side by side, in one process.

Writes bench.md, bench.json and PNG plots into --out; --sweep adds the top-k x capacity-factor sweep
with utilisation plots, --router the router-only benchmark, --comm the communication report.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from sparsemoe.commands import CommandError
from sparsemoe.commands._device import add_device_argument
from sparsemoe.commands._measure import command_line, csv_list, output_dir, positive_int, setup_device, thread_count

# Presets: their values stand where the corresponding option is not given on the command line.
QUICK = dict(configs=("tiny",), tokens=(1, 16, 128), dtypes=("float32",), routings=("random",), repeats=1)
# The GPU targets (Triton kernels): full-size layers in bfloat16 beside the dense ideal (cuBLAS on T*K
# rows), plain torch._grouped_mm and Hugging Face's grouped_mm experts; decode sizes and a large batch.
GPU = dict(
    configs=("mixtral-8x7b", "fine-grained-xl"), tokens=(1, 16, 64, 16384), dtypes=("bfloat16",),
    routings=("random",), repeats=10, recompute=False, backward_min_tokens=1024,
    impls=("sparsemoe auto", "sparsemoe triton", "sparsemoe grouped", "dense ideal", "torch._grouped_mm", "hf grouped_mm"),
)  # fmt: skip


def _capacity_factor(text: str):
    if text in ("none", "dropless", "inf"):
        return None
    value = float(text)
    if not value > 0:
        raise ValueError
    return value


def register(subparsers) -> argparse.ArgumentParser:
    from sparsemoe.bench.configs import BENCH_CONFIGS, DEFAULT_CONFIGS, DEFAULT_TOKENS, ROUTINGS
    from sparsemoe.bench.inference import ENGINES, MODELS, SCHEMES, InferenceBenchOptions
    from sparsemoe.bench.suite import CONTEXTS, DTYPES, MODES
    from sparsemoe.bench.train_step import PRECISIONS, TRAIN_BENCH_PRESETS
    from sparsemoe.model import PRESETS

    p = subparsers.add_parser(
        "bench",
        help="benchmark the MoE layer against the dense ideal and Hugging Face / torch peers",
        description="Time every dispatch backend, `auto`, the dense ideal, Hugging Face's Mixtral experts "
        "(eager and grouped_mm) and plain torch._grouped_mm on the same inputs; write markdown, JSON and plots.",
    )
    p.add_argument("--configs", type=csv_list("configs", BENCH_CONFIGS), default=None,
                   help=f"comma-separated: {', '.join(BENCH_CONFIGS)} (default: {','.join(DEFAULT_CONFIGS)})")
    p.add_argument("--tokens", type=csv_list("token counts", convert=positive_int), default=None,
                   help=f"comma-separated token counts T (default: {','.join(map(str, DEFAULT_TOKENS))})")
    p.add_argument("--dtypes", type=csv_list("dtypes", DTYPES), default=None,
                   help="comma-separated: float32, bfloat16, float16 (default: float32,bfloat16)")
    p.add_argument("--routings", type=csv_list("routings", ROUTINGS), default=None,
                   help="comma-separated: balanced, random, skewed (Zipf) (default: all)")
    p.add_argument("--modes", type=csv_list("modes", MODES), default=MODES,
                   help="comma-separated: forward, backward (= forward+backward) (default: both)")
    p.add_argument("--context", type=csv_list("contexts", CONTEXTS), default=("interleaved",),
                   help="comma-separated, each timed and reported on its own: interleaved (default: one call of each "
                   "implementation per round), alone (each implementation's calls back to back: the layer timed on "
                   "its own), mixed (interleaved, with the attention half of a training step at the layer's width "
                   "and T run before every call: the layer inside a model). alone,mixed gives both figures; "
                   "tables of alone and mixed add each call's page faults and system CPU time")
    p.add_argument("--backward-min-tokens", type=positive_int, default=None,
                   help="time forward+backward only for T at or above this; smaller T (decode) forward only "
                   "(default 1: every T)")
    p.add_argument("--impls", type=csv_list("implementation patterns"), default=None,
                   help="only these implementations (shell patterns, e.g. 'sparsemoe*,dense ideal,hf grouped_mm')")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--no-recompute", action="store_true", help="leave out the grouped backend with recomputation")
    p.add_argument("--repeats", type=positive_int, default=None, help="timed rounds per case (default 5)")
    p.add_argument("--threads", type=thread_count, default=None, help="torch threads (default: torch's)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall time (default), or this process's CPU time: steadier on a machine shared with "
                   "other work, best with --threads 1")
    add_device_argument(p)
    p.add_argument("--out", default="bench-results", help="output folder (default bench-results)")
    p.add_argument("--no-plots", action="store_true", help="do not write PNG plots")
    p.add_argument("--sweep", action="store_true", help="also sweep top-k and capacity factor (utilisation plots)")
    p.add_argument("--sweep-config", default=None, help="config of the sweep (default: the first of --configs)")
    p.add_argument("--sweep-tokens", type=positive_int, default=2048, help="T of the sweep (default 2048)")
    p.add_argument("--sweep-ks", type=csv_list("k values", convert=positive_int), default=(1, 2, 4, 8))
    p.add_argument("--sweep-cfs", type=csv_list("capacity factors", convert=_capacity_factor),
                   default=(1.0, 1.25, 2.0, None), help="comma-separated; 'dropless' for none (default 1,1.25,2,dropless)")
    p.add_argument("--sweep-routing", choices=ROUTINGS, default="skewed")
    p.add_argument("--router", action="store_true", help="also run the router-only benchmark")
    p.add_argument("--comm", action="store_true", help="also run the expert-parallel communication report")
    p.add_argument("--hf-block", action="store_true",
                   help="also time whole Hugging Face Mixtral MoE blocks (router included): transformers' eager "
                   "and grouped_mm against the same block patched by sparsemoe.hf.patch_hf_model "
                   "(first of --configs and --dtypes, every --tokens; needs transformers)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: tiny config, T=1,16,128, float32, random routing, 1 repeat, small sweep, router and HF "
                   "block bench (options given on the command line take precedence)")
    p.add_argument("--gpu", action="store_true",
                   help="the GPU targets: --device cuda, configs mixtral-8x7b,fine-grained-xl, T=1,16,64,16384, bfloat16, "
                   "random routing, 10 repeats, forward+backward from T=1024 on; sparsemoe auto/triton/grouped, dense "
                   "ideal, torch._grouped_mm, hf grouped_mm (options given on the command line take precedence; "
                   "--device cpu with small --configs and --tokens is a dry run of the preset on the CPU)")
    q = p.add_argument_group(
        "quantized experts (--quant: this benchmark instead of the suite above; CPU)",
        "The expert stage with float32, bfloat16, int8 and int4 experts and torchao's int8 weight-only linears "
        "(if installed) on the same weights against each scheme's weight-read bound; whole-model greedy decode in "
        "every scheme; with --checkpoint, that model's decode and validation loss in every scheme (a quantized "
        "checkpoint: as it is). --configs and --tokens choose the layer shapes (default mixtral-mini, fine-grained, "
        "mixtral-1k at T=1,16,2048). Writes quant.md and quant.json.",
    )  # fmt: skip
    q.add_argument("--quant", action="store_true", help="run the quantized-experts benchmark")
    q.add_argument("--checkpoint", metavar="RUN", default=None,
                   help="a sparsemoe run or checkpoint folder (float or quantized) to decode and evaluate")
    q.add_argument("--model", choices=("mixtral-1k", "none"), default="mixtral-1k",
                   help="random whole model to decode in every scheme: mixtral-1k (D=1024, F=2816, 8 experts, top-2, "
                   "8 layers, vocabulary 32000; 0.66 B parameters) or none (default mixtral-1k)")
    q.add_argument("--group-size", type=positive_int, default=64, metavar="N",
                   help="int4 input columns per scale, a multiple of 32 (default 64)")
    q.add_argument("--decode-tokens", type=positive_int, default=32, metavar="N",
                   help="tokens generated per timed decode (default 32)")
    t = p.add_argument_group(
        "model-level training speed (--train: this benchmark instead of the suite above; CPU)",
        "The trainer's step (forward, backward, clipping, AdamW) of each preset's MoE model and of its dense twin "
        "(dense MLPs of the same active width), interleaved step by step on the same random byte batches, in each "
        "precision; training tokens/s and the MoE model's share of its twin's. --repeats timed steps per model "
        "(default 5). Writes train.md and train.json.",
    )  # fmt: skip
    t.add_argument("--train", action="store_true", help="run the model-level training benchmark")
    t.add_argument("--presets", type=csv_list("presets", PRESETS), default=TRAIN_BENCH_PRESETS,
                   help=f"comma-separated model presets (default: {','.join(TRAIN_BENCH_PRESETS)})")
    t.add_argument("--precisions", type=csv_list("precisions", PRECISIONS), default=PRECISIONS,
                   help="comma-separated: fp32, bf16 (autocast) (default: both)")
    t.add_argument("--batch-size", type=positive_int, default=16, help="sequences per step (default 16)")
    t.add_argument("--seq-len", type=positive_int, default=256, help="tokens per sequence (default 256)")
    i = p.add_argument_group(
        "whole-model inference (--inference: this benchmark instead of the suite above; CPU)",
        "Prefill and greedy decode of one random model per --models and scheme, the same weights run by sparsemoe, "
        "by transformers (the model exported as Mixtral; experts_implementation eager and grouped_mm; float32 and "
        "bfloat16) and by llama.cpp (written as GGUF; needs llama-cpp-python: pip install 'sparsemoe[llamacpp]', "
        "skipped otherwise), calls interleaved round by round (--repeats rounds, default 3); tokens/s, ms per token "
        "and the fraction of the decode step's weight-read bound at the copy bandwidth measured in the same run. "
        "--decode-tokens N tokens per timed decode. Writes inference.md and inference.json.",
    )  # fmt: skip
    i.add_argument("--inference", action="store_true", help="run the whole-model inference benchmark")
    i.add_argument("--models", type=csv_list("models", MODELS), default=InferenceBenchOptions.models,
                   help=f"comma-separated: {', '.join(MODELS)} (default: {','.join(InferenceBenchOptions.models)}; "
                   "mixtral-1k: D=1024, 8 experts of 2816, top-2, 8 layers, vocabulary 32000)")
    i.add_argument("--schemes", type=csv_list("schemes", SCHEMES), default=SCHEMES,
                   help="comma-separated: float32, bfloat16, int8, int4 (quantized experts, the rest bfloat16; "
                   "transformers runs only the first two) (default: all)")
    i.add_argument("--engines", type=csv_list("engines", ENGINES), default=ENGINES,
                   help=f"comma-separated: {', '.join(ENGINES)} (default: all)")
    i.add_argument("--prefill", type=positive_int, default=InferenceBenchOptions.prefill_tokens,
                   help=f"prefill tokens, at most the model's context (default {InferenceBenchOptions.prefill_tokens})")
    i.add_argument("--prompt", type=positive_int, default=InferenceBenchOptions.prompt_tokens,
                   help=f"prompt tokens before decoding (default {InferenceBenchOptions.prompt_tokens})")
    p.set_defaults(func=run)
    return p


def _run_train(args: argparse.Namespace) -> int:
    from sparsemoe.bench.train_step import TrainBenchOptions, run_train_bench, train_bench_markdown

    _on_this_cpu(args, "--train measures the CPU")
    opts = TrainBenchOptions(
        presets=args.presets, precisions=args.precisions, batch_size=args.batch_size, seq_len=args.seq_len,
        repeats=args.repeats or TrainBenchOptions.repeats, clock=args.clock,
    )  # fmt: skip
    try:
        result = run_train_bench(opts)
    except ValueError as err:
        raise CommandError(str(err)) from None
    return _write_report(output_dir(args.out), "train", result, train_bench_markdown)


def _run_inference(args: argparse.Namespace) -> int:
    from sparsemoe.bench.inference import InferenceBenchOptions, inference_markdown, run_inference_bench

    _on_this_cpu(args, "--inference measures the CPU")
    if args.decode_tokens < 2:
        raise CommandError(f"--decode-tokens {args.decode_tokens}: at least 2 with --inference")
    opts = InferenceBenchOptions(
        models=args.models, schemes=args.schemes, engines=args.engines, prefill_tokens=args.prefill,
        prompt_tokens=args.prompt, decode_tokens=args.decode_tokens, repeats=args.repeats or InferenceBenchOptions.repeats,
        clock=args.clock,
    )  # fmt: skip
    result = run_inference_bench(opts, progress=lambda what: print(f"... {what}", flush=True))
    return _write_report(output_dir(args.out), "inference", result, inference_markdown)


def _on_this_cpu(args: argparse.Namespace, what: str) -> None:
    """For the CPU-only benchmarks: refuse another --device, apply --threads."""
    if args.device not in ("auto", "cpu"):
        raise CommandError(f"{what}; leave out --device (or give --device cpu)")
    if args.threads:
        torch.set_num_threads(args.threads)


def _write_report(out: Path, stem: str, result: dict, render) -> int:
    """STEM.json and STEM.md (render(result, command line)) into `out`; the markdown is printed too."""
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    text = render(result, command_line("bench"))
    (out / f"{stem}.md").write_text(text)
    print(text)
    print(f"wrote {out / f'{stem}.md'}, {out / f'{stem}.json'}")
    return 0


def _run_quant(args: argparse.Namespace) -> int:
    from sparsemoe.bench.quant import QuantBenchOptions, quant_markdown, run_quant_bench
    from sparsemoe.quant import QuantizationError
    from sparsemoe.train import CheckpointError

    _on_this_cpu(args, "--quant measures the CPU kernels")
    out = output_dir(args.out)
    defaults = QuantBenchOptions()
    opts = QuantBenchOptions(
        configs=args.configs or defaults.configs, tokens=args.tokens or defaults.tokens,
        group_size=args.group_size, repeats=args.repeats or defaults.repeats,
        model=None if args.model == "none" else args.model, checkpoint=args.checkpoint,
        decode_tokens=args.decode_tokens, clock=args.clock,
    )  # fmt: skip
    try:
        result = run_quant_bench(opts, progress=lambda what: print(f"... {what}", flush=True))
    except (QuantizationError, CheckpointError) as err:
        raise CommandError(str(err)) from None
    return _write_report(out, "quant", result, quant_markdown)


def run(args: argparse.Namespace) -> int:
    from sparsemoe.bench.configs import BENCH_CONFIGS
    from sparsemoe.bench.plots import plot_suite, plot_utilisation
    from sparsemoe.bench.report import write_reports
    from sparsemoe.bench.suite import SuiteOptions, check_options, run_suite
    from sparsemoe.bench.sweeps import router_markdown, run_router_bench, run_sweep, sweep_markdown

    if args.quick and args.gpu:
        raise CommandError("--quick and --gpu are two different presets; pick one")
    chosen = [flag for flag in ("quant", "train", "inference") if getattr(args, flag)]
    if len(chosen) > 1:
        raise CommandError(f"--{' and --'.join(chosen)} are different benchmarks; run them one at a time")
    if args.inference:
        return _run_inference(args)
    if args.quant:
        return _run_quant(args)
    if args.train:
        return _run_train(args)
    if args.checkpoint is not None:
        raise CommandError("--checkpoint belongs to --quant (the quantized-experts benchmark); add --quant")
    if args.gpu and args.device == "auto":
        if not torch.cuda.is_available():
            raise CommandError(
                "--gpu needs a CUDA GPU and none is available here; without --gpu the benchmark runs on the CPU "
                "(--gpu --device cpu with small --configs/--tokens: a dry run of the preset)"
            )
        args.device = "cuda"
    device = setup_device(args)
    out = output_dir(args.out)
    command = command_line("bench")
    preset = QUICK if args.quick else GPU if args.gpu else {}
    defaults = SuiteOptions()
    chosen = {
        key: getattr(args, key) if getattr(args, key) is not None else preset.get(key, getattr(defaults, key))
        for key in ("configs", "tokens", "dtypes", "routings", "repeats", "impls", "backward_min_tokens")
    }
    opts = SuiteOptions(
        **chosen, modes=args.modes, memory=not args.no_memory, device=str(device),
        recompute=not args.no_recompute and preset.get("recompute", True), clock=args.clock, contexts=args.context,
    )  # fmt: skip
    try:
        check_options(opts)
    except ValueError as err:
        raise CommandError(str(err)) from None
    result = run_suite(opts)
    written = write_reports(result, out, command)
    print((out / "bench.md").read_text())
    if not args.no_plots:
        written += plot_suite(result, out)
    extra_md: list[str] = []
    if args.sweep or args.quick:
        name = args.sweep_config or opts.configs[0]
        if name not in BENCH_CONFIGS:
            raise CommandError(f"--sweep-config {name!r} is not known; accepted: {', '.join(BENCH_CONFIGS)}")
        tokens = 128 if args.quick else args.sweep_tokens
        ks = (1, 2) if args.quick else args.sweep_ks
        cfs = (1.0, None) if args.quick else args.sweep_cfs
        sweep = run_sweep(BENCH_CONFIGS[name], tokens, args.sweep_routing, ks, cfs, repeats=1 if args.quick else 3)
        (out / "sweep.json").write_text(json.dumps(sweep, indent=1))
        extra_md += sweep_markdown(sweep)
        written.append(out / "sweep.json")
        if not args.no_plots:
            written += plot_utilisation(sweep, out)
    if args.router or args.quick:
        cfg = BENCH_CONFIGS[opts.configs[0]]
        bench = run_router_bench(cfg, (16, 128) if args.quick else (128, 2048, 8192), repeats=1 if args.quick else 5)
        (out / "router.json").write_text(json.dumps(bench, indent=1))
        extra_md += router_markdown(bench)
        written.append(out / "router.json")
    if args.hf_block or args.quick:
        from sparsemoe.bench.hf_block import hf_block_markdown, run_hf_block_bench

        cfg = BENCH_CONFIGS[opts.configs[0]]
        dtype = getattr(torch, opts.dtypes[0])
        block = run_hf_block_bench(cfg, opts.tokens, dtype, repeats=opts.repeats, clock=args.clock)
        (out / "hf_block.json").write_text(json.dumps(block, indent=1))
        extra_md += hf_block_markdown(block)
        written.append(out / "hf_block.json")
    if extra_md:
        with open(out / "bench.md", "a") as f:
            f.write("\n" + "\n".join(extra_md))
        print("\n".join(extra_md))
    if args.comm:
        written += _comm_report(out, args.quick)
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def _comm_report(out: Path, quick: bool) -> list[Path]:
    try:
        from sparsemoe.parallel.comm_report import run_comm_report
    except ImportError as err:
        raise CommandError(
            f"--comm needs sparsemoe.parallel.comm_report, which cannot be imported here ({err}); "
            "run without --comm"
        ) from None
    run_comm_report(str(out), quick=quick)
    return [out / "comm_report.md", out / "comm_report.json"]
