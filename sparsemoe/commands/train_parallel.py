"""`sparsemoe train-parallel`: data + expert parallel training of the MoE language model, under torchrun.

    torchrun --standalone --nproc-per-node 4 -m sparsemoe train-parallel --ep-size 2 --preset tiny

Every option of `sparsemoe train`, plus --ep-size / --dist-backend / --dist-timeout; every rank runs
`sparsemoe.parallel.train.run_parallel_training`. Without torchrun it is a world of one process.
"""

from __future__ import annotations

import argparse
from typing import Optional

from sparsemoe.commands import CommandError
from sparsemoe.commands import train as train_command


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "train-parallel",
        help="data + expert parallel training under torchrun (every option of `train`, plus --ep-size)",
        description="Data + expert parallel training under torchrun, e.g. `torchrun --standalone --nproc-per-node 4 "
        "-m sparsemoe train-parallel --ep-size 2 --preset tiny`: each global batch is split over the processes "
        "(losses match a single-process run), experts are sharded over groups of --ep-size ranks, checkpoints "
        "are the single-process format (resumable on any world size). Every option of `sparsemoe train`, plus:",
    )
    train_command.add_arguments(p)
    p.add_argument("--ep-size", type=int, default=1, help="processes that share one copy of the experts (divides "
                   "the number of processes and num_experts; default 1 = data parallel only)")
    p.add_argument("--dist-backend", default=None, choices=("gloo", "nccl"), help="default: nccl with GPUs, else gloo")
    p.add_argument("--dist-timeout", type=float, default=600.0, metavar="SECONDS", help="how long a collective "
                   "waits for a peer that died or stalled before the run stops with an error (default 600)")
    p.set_defaults(func=run)
    return p


def dist_backend(device: str, backend: Optional[str]) -> Optional[str]:
    """The process-group backend for `--device` (every process takes the same kind of device: with NCCL
    the GPU of its LOCAL_RANK, with gloo the CPU): cpu -> gloo, cuda -> nccl, auto -> --dist-backend's
    default (NCCL where there are GPUs). A named GPU or a contradicting --dist-backend is refused."""
    import torch

    wanted = {"auto": backend, "cpu": "gloo", "cuda": "nccl"}
    if device not in wanted:
        raise CommandError(f"--device {device!r}: under torchrun give auto, cpu or cuda (each process takes the "
                           "GPU of its LOCAL_RANK)")
    if backend is not None and wanted[device] not in (None, backend):
        raise CommandError(f"--device {device} runs on {wanted[device]}, not --dist-backend {backend}")
    if wanted[device] == "nccl" and not torch.cuda.is_available():
        raise CommandError("--device cuda was asked for, but no CUDA GPU is available here; use cpu (or auto)")
    return wanted[device]


def run(args) -> int:
    import torch
    import torch.distributed as dist

    from sparsemoe.parallel.comm import ExpertParallelError
    from sparsemoe.parallel.groups import init_parallel
    from sparsemoe.parallel.train import run_parallel_training
    from sparsemoe.train import CheckpointError, DataError
    from sparsemoe.train.run import run_exists

    rank = 0
    try:
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        groups = init_parallel(args.ep_size, dist_backend(args.device, args.dist_backend), args.dist_timeout)
        rank = groups.rank
        model_cfg, train_cfg, run_dir = train_command.build_configs(args)
        if args.resume and not run_exists(run_dir):
            raise CommandError(f"--resume: no checkpoint in {str(run_dir)!r} to resume")
        if not args.resume and run_exists(run_dir):
            raise CommandError(f"run folder {str(run_dir)!r} already holds a checkpoint; pass --resume or another --run-dir")
        summary = run_parallel_training(
            model_cfg, train_cfg, run_dir, groups, data=args.data, tokenizer=args.tokenizer, resume=args.resume,
            progress=not args.no_progress, max_bytes=args.max_bytes, peak_tflops=args.peak_tflops,
            verify=not args.no_verify,
        )  # fmt: skip
    except (CommandError, DataError, CheckpointError, ValueError, ExpertParallelError) as err:
        raise CommandError(f"(rank {rank}) {err}") from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if rank == 0:
        val = f", validation loss {summary['val_loss']:.4f} at step {summary['val_step']}" if "val_loss" in summary else ""
        print(f"{'stopped' if summary['stopped_early'] else 'finished'} at step {summary['step']}{val}; "
              f"{train_command.speed_summary(summary)}; report {summary['report']}")
    return 0
