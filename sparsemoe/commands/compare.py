"""`sparsemoe compare`: train the MoE model and its equal-active dense twin over several seeds, and compare."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from sparsemoe.commands import CommandError
from sparsemoe.commands._device import add_device_argument, device_from_args
from sparsemoe.commands._measure import thread_count
from sparsemoe.commands.train import TRAIN_FLAGS, add_train_flags, parse_overrides
from sparsemoe.device import PRECISIONS

# Every training flag of `sparsemoe train` but --seed (the seeds are this command's own), with the help of those
# that speak of --resume (which this command does by itself) said for a comparison.
_FLAGS = {name: spec for name, spec in TRAIN_FLAGS.items() if name != "seed"}
_FLAGS["max_steps"] = (int, "optimizer steps of every run (tiny 40, demo 600)")
_FLAGS["schedule_steps"] = (int, "the step where the cosine decay ends, at lr * min_lr_ratio (default: max-steps)")


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "compare",
        help="train the MoE model and its equal-active dense twin over several seeds; is the gap above the noise?",
        description="Train a preset's MoE model and its dense twin (every block a dense MLP with the same active "
        "feed-forward parameters per token) once per seed, with the same data and training config (only the seed "
        "changes). Computed: each model's final validation loss, mean and sample standard deviation (n-1) over "
        "the seeds, and bits per byte where the trainer reports it; the difference dense - MoE, the pooled "
        "standard deviation sqrt((s_moe^2 + s_dense^2)/2) and the difference in pooled stds; mean training "
        "tokens/s and its ratio MoE/dense; active and total parameters. Writes one run folder per model and seed "
        "(OUT/moe-seed0, OUT/dense-seed0, ...), then compare.json, compare.md (the table, also printed) and "
        "compare.png (validation loss against step: mean over seeds, band from the min to the max seed). Run "
        "again after an interruption: finished runs are reused, a partial one resumes.",
    )
    add_arguments(p)
    p.set_defaults(func=run)
    return p


def add_arguments(p: argparse.ArgumentParser) -> None:
    seeds = p.add_mutually_exclusive_group()
    seeds.add_argument("--seeds", type=int, default=None, metavar="N", help="train seeds 0..N-1, N >= 2 (default 3)")
    seeds.add_argument(
        "--seed-list", default=None, metavar="S,S,...", help="train these seeds instead, e.g. 0,5,7 (at least two)"
    )
    p.add_argument("--preset", default="demo", help="model and training preset: tiny, demo, wide, gpu, ... (default demo)")
    p.add_argument(
        "--data",
        default=None,
        metavar="PATH",
        help="the corpus, as for sparsemoe train --data (default: the Python standard library's .py sources)",
    )
    p.add_argument("--max-bytes", type=int, default=None, metavar="N", help="read at most N bytes of the corpus")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a field of the MoE model's config (the dense twin follows), e.g. --set num_experts=16; "
        "repeatable (see sparsemoe train --help)",
    )
    add_train_flags(p, _FLAGS)
    p.add_argument(
        "--precision", choices=PRECISIONS, default=None, help="the forward's precision (see sparsemoe train --help)"
    )
    p.add_argument("--out", default=None, metavar="DIR", help="output folder (default runs/compare-<preset>)")
    p.add_argument(
        "--tokenizer",
        default=None,
        metavar="SPEC",
        help="the tokenizer, as for sparsemoe train --tokenizer (default: bytes); bpe:N is trained and the text "
        "tokenized once, into OUT/data, for every run",
    )
    add_device_argument(p)
    p.add_argument(
        "--threads", type=thread_count, default=None, metavar="N", help="CPU threads for torch (default: torch's)"
    )


def parse_seeds(args) -> list[int]:
    """--seeds N (0..N-1) or --seed-list a,b,c; at least two distinct seeds."""
    if args.seed_list is not None:
        try:
            seeds = [int(t) for t in args.seed_list.split(",") if t.strip()]
        except ValueError:
            raise CommandError(f"--seed-list {args.seed_list!r}: expected integers separated by commas") from None
        if len(seeds) < 2 or len(set(seeds)) != len(seeds) or min(seeds) < 0:
            raise CommandError(f"--seed-list {args.seed_list!r}: expected at least two different seeds >= 0")
        return seeds
    count = 3 if args.seeds is None else args.seeds
    if count < 2:
        raise CommandError(f"--seeds {count}: a standard deviation over seeds needs at least 2 seeds")
    return list(range(count))


def build_configs(args):
    """(MoE ModelConfig, TrainConfig) from the preset, --set and the training flags."""
    from sparsemoe.model import PRESETS, ModelConfig
    from sparsemoe.train import TRAIN_PRESETS, TrainConfig

    if args.preset not in PRESETS:
        raise CommandError(f"--preset {args.preset!r} is unknown; accepted: {', '.join(PRESETS)}")
    train_over: dict[str, Any] = {name: getattr(args, name) for name in _FLAGS if getattr(args, name) is not None}
    if args.precision:
        train_over["precision"] = args.precision
    try:
        model_cfg = ModelConfig(**{**PRESETS[args.preset], **parse_overrides(args.set)})
        train_cfg = TrainConfig(**{**TRAIN_PRESETS[args.preset], **train_over})
    except ValueError as err:
        raise CommandError(str(err)) from None
    if model_cfg.dense:
        raise CommandError("--set dense=true: compare needs an MoE model; the dense twin is built from it")
    return model_cfg, train_cfg


def run(args) -> int:
    import torch

    from sparsemoe.train import CheckpointError, DataError
    from sparsemoe.train.compare import CompareStopped, compare, table_lines
    from sparsemoe.train.signals import StopOnSignal

    seeds = parse_seeds(args)
    if args.max_bytes is not None and args.max_bytes < 1:
        raise CommandError(f"--max-bytes {args.max_bytes}: expected an integer >= 1")
    model_cfg, train_cfg = build_configs(args)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = device_from_args(args)
    out = Path(args.out or f"runs/compare-{args.preset}")
    try:
        with StopOnSignal() as stopper:
            result = compare(
                model_cfg, train_cfg, out, seeds, data=args.data, max_bytes=args.max_bytes, device=device,
                tokenizer=args.tokenizer, setup=stopper.attach, describe={"preset": args.preset, "overrides": args.set},
            )  # fmt: skip
    except CompareStopped as stop:
        print(f"sparsemoe compare: {stop}", file=sys.stderr)
        return 130
    except (DataError, CheckpointError, ValueError) as err:
        raise CommandError(str(err)) from None
    print("\n".join(["", *table_lines(result), "", f"wrote {out / 'compare.md'}, compare.json and compare.png"]))
    return 0
