"""The options every command that runs a model shares: `--device` and `--dtype` (see sparsemoe.device), and
`--no-verify` for the commands that read a checkpoint."""

from __future__ import annotations

import argparse
from typing import Optional

import torch

from sparsemoe.commands import CommandError
from sparsemoe.device import DeviceError, resolve_device

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device",
        default="auto",
        metavar="DEVICE",
        help="where to run: auto (the CUDA GPU when there is one, else the CPU), cpu, cuda or cuda:N (default auto)",
    )


def add_dtype_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dtype",
        choices=("auto", *DTYPES),
        default="auto",
        help="the weights' dtype while running: auto (bfloat16 on CUDA; on the CPU the dtype the checkpoint stores, "
        "so a bfloat16 checkpoint runs in bfloat16), float32 or bfloat16 (routers' selection bias stays float32) "
        "(default auto)",
    )


def add_verify_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--no-verify",
        action="store_true",
        help="do not check the checkpoint's files against their SHA-256 checksums (checked by default: a changed "
        "byte is reported with the file named, before anything runs)",
    )


def device_from_args(args: argparse.Namespace) -> torch.device:
    """args.device as a torch.device; a device that cannot be used here is one CommandError line."""
    try:
        return resolve_device(args.device)
    except DeviceError as err:
        raise CommandError(f"--{err}") from None


def dtype_from_args(args: argparse.Namespace, device: torch.device) -> Optional[torch.dtype]:
    """The dtype to load a checkpoint in; None: the one it stores (`load_model`'s default)."""
    if args.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return DTYPES[args.dtype]
