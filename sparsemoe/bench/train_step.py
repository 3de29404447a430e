"""Model-level training speed: the MoE language model against its dense twin, one training step at a time.

A layer benchmark times the expert stage alone; a user trains a model. Here both models of a preset (the
MoE model and `ModelConfig.dense_baseline()`, the same model with dense MLPs of the same active feed-forward
parameters per token) run the trainer's own step (`Trainer.train_step`: forward, backward, gradient
clipping, AdamW, the load-balancing bookkeeping) on the same random byte batches, interleaved step by step,
in float32 and under bfloat16 autocast. The figure is training tokens per second, and the MoE model's
share of its twin's.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable

import torch

from sparsemoe.bench.measure import check_names, environment, time_interleaved
from sparsemoe.model import PRESETS, ModelConfig, MoETransformer, preset
from sparsemoe.train import TrainConfig
from sparsemoe.train.compare import model_sizes
from sparsemoe.train.data import RandomBatches
from sparsemoe.train.trainer import Trainer, build_optimizer

TRAIN_BENCH_PRESETS = ("demo", "wide")
PRECISIONS = ("fp32", "bf16")
VOCAB = 256  # byte-level, like the demo


@dataclass
class TrainBenchOptions:
    presets: tuple[str, ...] = TRAIN_BENCH_PRESETS  # model presets (sparsemoe.model.PRESETS)
    precisions: tuple[str, ...] = PRECISIONS  # fp32 | bf16 (autocast), as `sparsemoe train --precision`
    batch_size: int = 16  # sequences per step (the demo's)
    seq_len: int = 256  # tokens per sequence (the demo's)
    repeats: int = 5  # timed steps per model
    warmup: int = 2  # untimed steps per model first
    clock: str = "wall"
    seed: int = 0
    log: Callable[[str], None] = field(default=lambda line: print(line, flush=True), repr=False)


def check_train_options(opts: TrainBenchOptions) -> None:
    """ValueError naming what is wrong (before anything runs)."""
    check_names("model preset", opts.presets, PRESETS)
    check_names("precision", opts.precisions, PRECISIONS)
    for name in opts.presets:
        config = preset(name)
        if config.dense or config.num_experts < 2:
            raise ValueError(f"preset {name!r} has no MoE layers to compare with a dense twin")
        if opts.seq_len > config.max_seq_len:
            raise ValueError(f"--seq-len {opts.seq_len} is longer than preset {name!r}'s {config.max_seq_len}")


STREAM_TOKENS = 2**20  # the random byte stream the batches are windows of


def _trainer(model_config: ModelConfig, train_config: TrainConfig, seed: int) -> Trainer:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = MoETransformer(model_config)
    stream = torch.randint(0, VOCAB, (STREAM_TOKENS,), generator=torch.Generator().manual_seed(seed))
    batches = RandomBatches(stream, train_config.batch_size, train_config.seq_len, seed)  # the trainer's sampler
    return Trainer(model, build_optimizer(model, train_config), train_config, batches, [], progress=False)


def run_train_bench(opts: TrainBenchOptions) -> dict[str, Any]:
    """{"environment", "options", "cases": [{preset, precision, models: {moe, dense: {ms, tokens_per_s, ...}},
    tokens_per_s_ratio}]}: every case's two models timed step by step, interleaved."""
    check_train_options(opts)
    env = environment(torch.device("cpu"))
    env["clock"] = opts.clock
    opts.log(f"torch {env['torch']} | cpu ({env['device_name']}) | threads {env['threads']}")
    tokens = opts.batch_size * opts.seq_len
    cases = []
    for name in opts.presets:
        moe_config = preset(name, vocab_size=VOCAB)
        configs = {"moe": moe_config, "dense": moe_config.dense_baseline()}
        for precision in opts.precisions:
            train = replace(
                TrainConfig(), precision=precision, batch_size=opts.batch_size, seq_len=opts.seq_len, warmup_steps=0
            )
            trainers = {kind: _trainer(config, train, opts.seed) for kind, config in configs.items()}
            steps = {kind: trainer.train_step for kind, trainer in trainers.items()}
            timings = time_interleaved(steps, opts.repeats, opts.warmup, opts.clock)
            models = {}
            for kind, timing in timings.items():
                models[kind] = {
                    "ms_per_step": timing["min_ms"],
                    "median_ms_per_step": timing["median_ms"],
                    "tokens_per_s": tokens / timing["min_ms"] * 1e3,
                    "median_tokens_per_s": tokens / timing["median_ms"] * 1e3,
                    **model_sizes(configs[kind]),
                }
            case = {
                "preset": name,
                "precision": precision,
                "tokens_per_step": tokens,
                "models": models,
                "tokens_per_s_ratio": models["moe"]["tokens_per_s"] / models["dense"]["tokens_per_s"],
                "median_tokens_per_s_ratio": models["moe"]["median_tokens_per_s"] / models["dense"]["median_tokens_per_s"],
            }
            cases.append(case)
            opts.log(
                f"  {name} {precision}: MoE {models['moe']['tokens_per_s']:,.0f} tokens/s, dense twin "
                f"{models['dense']['tokens_per_s']:,.0f} tokens/s = {case['tokens_per_s_ratio']:.2f}"
            )
            del trainers, steps
    return {"environment": env, "options": {k: v for k, v in opts.__dict__.items() if k != "log"}, "cases": cases}


def _millions(n: int) -> str:
    return f"{n / 1e6:.1f} M"


def train_bench_markdown(result: dict[str, Any], command: str) -> str:
    env, opts = result["environment"], result["options"]
    lines = [
        "# sparsemoe bench --train: training tokens/s, MoE model against its dense twin",
        "",
        f"Command: `{command}`",
        "",
        f"torch {env['torch']}, python {env['python']}; cpu ({env['device_name']}), {env['threads']} threads; "
        f"{opts['batch_size']} x {opts['seq_len']} tokens per step of random bytes; the trainer's step (forward, "
        "backward, clipping, AdamW); the two models' steps interleaved, best of "
        f"{opts['repeats']} after {opts['warmup']} warmup steps each ({env.get('clock', 'wall')} clock; medians in "
        "the JSON). The dense twin has dense MLPs of the MoE layers' active width (top-k x expert width).",
        "",
        "| preset | precision | parameters MoE / dense (active) | MoE tokens/s | dense twin tokens/s | MoE / dense "
        "(median) |",
        "|---|---|---|---|---|---|",
    ]
    for case in result["cases"]:
        moe, dense = case["models"]["moe"], case["models"]["dense"]
        lines.append(
            f"| {case['preset']} | {case['precision']} | {_millions(moe['parameters'])} / "
            f"{_millions(dense['parameters'])} ({_millions(moe['active_parameters'])}) | "
            f"{moe['tokens_per_s']:,.0f} | {dense['tokens_per_s']:,.0f} | {case['tokens_per_s_ratio']:.2f} "
            f"({case['median_tokens_per_s_ratio']:.2f}) |"
        )
    return "\n".join(lines) + "\n"
