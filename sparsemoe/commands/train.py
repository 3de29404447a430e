"""`sparsemoe train`: train the small MoE language model (or its dense baseline) and write a run folder."""

from __future__ import annotations

import argparse
import json
from dataclasses import fields
from pathlib import Path
from typing import Any

from sparsemoe.commands import CommandError
from sparsemoe.commands._device import add_device_argument, device_from_args
from sparsemoe.commands._measure import thread_count
from sparsemoe.device import PRECISIONS

# Training options: CLI flag -> TrainConfig field. Defaults are None so that the preset (or, on
# --resume, the checkpoint) supplies what the user did not give.
TRAIN_FLAGS = {
    "max_steps": (int, "optimizer steps to train for (tiny 40, demo 600); on --resume a larger value extends the "
                  "run and keeps its learning-rate schedule (see --schedule-steps)"),
    "batch_size": (int, "sequences per micro-batch (demo 16)"),
    "seq_len": (int, "tokens per training sequence; at most the model's max_seq_len (demo 256)"),
    "accum_steps": (int, "micro-batches accumulated per optimizer step (default 1)"),
    "lr": (float, "peak learning rate of AdamW (demo 3e-3)"),
    "min_lr_ratio": (float, "the cosine schedule ends at lr * this (default 0.1)"),
    "warmup_steps": (int, "linear warmup steps before the cosine decay (demo 50)"),
    "schedule_steps": (int, "the step where the cosine decay ends, at lr * min_lr_ratio (default: max-steps). On "
                       "--resume with another --max-steps the run keeps its own schedule unless this is given "
                       "(e.g. --schedule-steps equal to the new --max-steps stretches the cosine to the new end)"),
    "weight_decay": (float, "AdamW weight decay on matrices; norms and biases are never decayed (default 0.1)"),
    "grad_clip": (float, "clip the global gradient norm to this value; 0 turns clipping off (default 1.0)"),
    "expert_lr_mult": (float, "learning-rate multiplier for the routed experts' weights (default 1.0)"),
    "eval_interval": (int, "compute validation loss and perplexity every N steps (demo 100)"),
    "eval_batches": (int, "validation batches per evaluation, a fixed set of windows (demo 8)"),
    "log_interval": (int, "write one metrics line (metrics.jsonl) every N steps (demo 10)"),
    "checkpoint_interval": (int, "save a checkpoint every N steps, and always at the end (demo 200)"),
    "seed": (int, "random seed for initialisation, data order and dropout (default 0)"),
    "val_fraction": (float, "share of the corpus held out for validation (default 0.05)"),
}



def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "train",
        help="train the small MoE language model on the built-in corpus or your text",
        description="Train a small MoE language model. With no options: the 'demo' model on the Python standard "
        "library's sources (no download), about 3.5 minutes on a 2-core CPU. Where there is a CUDA GPU it trains "
        "there (bf16 autocast, fused AdamW, the Triton expert kernels), and --preset gpu is sized for it. "
        "Checkpoints, metrics.jsonl, loss.png, expert_load.png and report.md go to the run folder.",
    )
    add_arguments(p)
    p.set_defaults(func=run)
    return p


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Every option of `sparsemoe train` (`sparsemoe train-parallel` takes them all too)."""
    p.add_argument(
        "--preset",
        default=None,
        help="model and training preset: tiny, demo, wide (the demo 4x wider, 32 experts of 256, top-4; 54 M "
        "parameters), gpu (983 M parameters, 303 M active, for one 80-140 GB GPU) or mixtral (Mixtral-8x7B's shape, "
        "for shape checks) (default demo)",
    )
    p.add_argument(
        "--data",
        default=None,
        metavar="PATH",
        help="a text file, a JSONL file ({\"text\": ...} per line), a folder of them, a token-shard folder made by "
        "`sparsemoe prepare-data` (streamed: any size), or a built-in corpus: builtin:python-stdlib (the default, the "
        "standard library's .py sources) or builtin:python-docs (English prose: its docstrings and help topics)",
    )
    p.add_argument(
        "--tokenizer",
        default=None,
        metavar="SPEC",
        help="bytes (the default: vocabulary 256, text read into memory), bpe:N (a byte-level BPE of N tokens "
        "trained on the corpus; the text is tokenized once into RUN/data and streamed), or a tokenizer.json or a "
        "folder holding one. Saved as RUN/tokenizer/, which generate, inspect and convert use; the model's "
        "vocab_size is the tokenizer's. With a token-shard --data: the shards' own (default)",
    )
    p.add_argument(
        "--max-bytes", type=int, default=None, metavar="N", help="read at most N bytes of the corpus (quick runs)"
    )
    p.add_argument(
        "--run-dir",
        default=None,
        metavar="DIR",
        help="run folder (default runs/<preset>, runs/<preset>-dense with --dense)",
    )
    p.add_argument(
        "--resume", action="store_true", help="continue the run in --run-dir from its latest checkpoint, exactly"
    )
    p.add_argument(
        "--no-verify",
        action="store_true",
        help="on --resume, do not check the checkpoint's files against their SHA-256 checksums (checked by default: "
        "a changed byte stops the run with the file named)",
    )
    p.add_argument(
        "--dense",
        action="store_true",
        help="train the dense baseline: every block a dense MLP with the same "
        "active feed-forward parameters per token as the MoE model",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a model config field, "
        "e.g. --set num_experts=16 --set bias_balancing=true --set 'sliding_layers=[0, 2]' (lists and dicts as "
        "JSON; repeatable; see sparsemoe.model.ModelConfig)",
    )
    add_train_flags(p, TRAIN_FLAGS)
    add_device_argument(p)
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=None,
        help="the forward's precision: auto (bf16 on CUDA, fp32 on the CPU), fp32 (on CUDA with TF32 matmuls), or bf16 "
        "(bfloat16 autocast; weights, gradients and AdamW stay float32). float16 is not offered: it would need loss "
        "scaling (default: the preset's or the resumed run's, else auto)",
    )
    p.add_argument("--bf16", action="store_true", default=None, help="the same as --precision bf16")
    p.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        metavar="X",
        help="the device's peak TFLOP/s at this precision, for MFU where it is not known (known: H100, H200, H800, "
        "A100; the CPU never)",
    )
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile the model before training")
    p.add_argument(
        "--activation-checkpointing",
        action="store_true",
        default=None,
        help="recompute each block's activations in the backward instead of keeping them: less memory, about one "
        "more forward of compute (with bias_balancing, needs --set bias_update=step)",
    )
    p.add_argument(
        "--threads", type=thread_count, default=None, metavar="N", help="CPU threads for torch (default: torch's choice)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar (metrics still go to metrics.jsonl)")


def add_train_flags(p: argparse.ArgumentParser, flags: dict[str, tuple]) -> None:
    """One option per TrainConfig field of `flags` (name -> (type, help)), default None: the preset decides."""
    for name, (kind, help_text) in flags.items():
        metavar = "N" if kind is int else "X"
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=None, metavar=metavar, help=help_text)


def speed_summary(summary: dict[str, Any]) -> str:
    """"12000 tokens/s (13500 in training steps after the first), MFU 41.2%, peak memory 39.1 GiB"."""
    text = f"{summary['tokens_per_s']:.0f} tokens/s"
    text += f" ({summary['train_tokens_per_s']:.0f} in training steps after the first)"
    if "mfu" in summary:
        text += f", MFU {summary['mfu']:.1%}"
    if "peak_memory_bytes" in summary:
        text += f", peak memory {summary['peak_memory_bytes'] / 2**30:.1f} GiB"
    return text


def parse_value(text: str) -> Any:
    """A --set value: true/false, none/null, an int, a float, a JSON list or object (e.g. [0, 2] for a layer
    list), else the text itself."""
    if text.startswith(("[", "{")):
        try:
            return json.loads(text)
        except json.JSONDecodeError as err:
            raise CommandError(f"--set value {text!r} is not valid JSON ({err})") from None
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_overrides(items: list[str]) -> dict[str, Any]:
    from sparsemoe.model import ModelConfig

    known = {f.name for f in fields(ModelConfig)}
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep:
            raise CommandError(f"--set {item!r}: expected FIELD=VALUE, e.g. --set num_experts=16")
        if key not in known:
            raise CommandError(
                f"--set {item!r}: unknown model config field {key!r}; accepted: {', '.join(sorted(known))}"
            )
        out[key] = parse_value(value.strip())
    return out


def _train_overrides(args) -> dict[str, Any]:
    out = {name: getattr(args, name) for name in TRAIN_FLAGS if getattr(args, name) is not None}
    for name in ("compile", "activation_checkpointing"):
        if getattr(args, name):
            out[name] = True
    if args.bf16 and args.precision not in (None, "bf16"):
        raise CommandError(f"--bf16 and --precision {args.precision} contradict each other; give one")
    if args.bf16 or args.precision:
        out["precision"] = "bf16" if args.bf16 else args.precision
    return out


def build_configs(args):
    """(ModelConfig, TrainConfig, run_dir) from the arguments, the preset, and on --resume the checkpoint."""
    from sparsemoe.model import PRESETS, ModelConfig
    from sparsemoe.train import TRAIN_PRESETS, TrainConfig
    from sparsemoe.train.run import run_exists, saved_configs

    name = args.preset or "demo"
    if name not in PRESETS:
        raise CommandError(f"--preset {name!r} is unknown; accepted: {', '.join(PRESETS)}")
    run_dir = Path(args.run_dir or f"runs/{name}{'-dense' if args.dense else ''}")
    if run_dir.exists() and not run_dir.is_dir():
        raise CommandError(f"--run-dir {str(run_dir)!r} is a file, not a folder; choose a folder (created if missing)")
    overrides = parse_overrides(args.set)
    train_over = _train_overrides(args)
    if args.resume and not run_exists(run_dir):
        raise CommandError(f"--resume: no checkpoint in {str(run_dir)!r} to resume; start the run without --resume")
    try:
        if args.resume:
            saved_model, saved_train, _ = saved_configs(run_dir, not args.no_verify)
            model_cfg = saved_model
            if args.preset or args.dense:
                model_cfg = ModelConfig(**{**PRESETS[name], **overrides})
                model_cfg = model_cfg.dense_baseline() if args.dense else model_cfg
            elif overrides:  # on top of the run's own config (only training settings may change)
                model_cfg = ModelConfig(**{**saved_model.to_dict(), **overrides})
            train_cfg = TrainConfig(**{**saved_train.to_dict(), **train_over})
        else:
            model_cfg = ModelConfig(**{**PRESETS[name], **overrides})
            if args.dense:
                model_cfg = model_cfg.dense_baseline()
            train_cfg = TrainConfig(**{**TRAIN_PRESETS[name], **train_over})
    except ValueError as err:
        raise CommandError(str(err)) from None
    conflict = model_cfg.checkpointing_conflict()
    if train_cfg.activation_checkpointing and conflict:
        raise CommandError(f"--activation-checkpointing: {conflict}; add --set bias_update=step")
    return model_cfg, train_cfg, run_dir


def run(args) -> int:
    import torch

    from sparsemoe.train import CheckpointError, DataError
    from sparsemoe.train.run import run_exists, run_training

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.max_bytes is not None and args.max_bytes < 1:
        raise CommandError(f"--max-bytes {args.max_bytes}: expected an integer >= 1")
    if args.peak_tflops is not None and not 0 < args.peak_tflops < float("inf"):
        raise CommandError(f"--peak-tflops {args.peak_tflops}: expected a number > 0")
    device = device_from_args(args)
    model_cfg, train_cfg, run_dir = build_configs(args)
    if not args.resume and run_exists(run_dir):
        raise CommandError(
            f"run folder {str(run_dir)!r} already holds a checkpoint; pass --resume to continue it, "
            "or choose another --run-dir"
        )
    from sparsemoe.train.signals import StopOnSignal

    stopper = StopOnSignal()
    try:
        with stopper:
            summary = run_training(
                model_cfg,
                train_cfg,
                run_dir,
                data=args.data,
                tokenizer=args.tokenizer,
                resume=args.resume,
                progress=not args.no_progress,
                max_bytes=args.max_bytes,
                setup=stopper.attach,
                device=device,
                peak_tflops=args.peak_tflops,
                verify=not args.no_verify,
            )
    except (DataError, CheckpointError, ValueError) as err:
        raise CommandError(str(err)) from None
    val = (
        f", validation loss {summary['val_loss']:.4f} (perplexity {summary['val_ppl']:.2f}) at step "
        f"{summary['val_step']}"
        if "val_loss" in summary
        else ""
    )
    state = "stopped" if summary["stopped_early"] else "finished"
    print(f"{state} at step {summary['step']}{val}; {speed_summary(summary)}; report {summary['report']}")
    if summary["stopped_early"]:
        print(f"continue with: sparsemoe train --run-dir {run_dir} --resume")
    return 0
