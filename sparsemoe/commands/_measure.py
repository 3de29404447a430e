"""What `sparsemoe bench` and `sparsemoe profile` share: argument types, device, output folder, command line."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import torch

from sparsemoe.cli import CommandError


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError
    return value


def setup_device(name: str, threads) -> torch.device:
    """Apply --threads and parse --device (cpu or an available cuda device)."""
    if threads:
        torch.set_num_threads(threads)
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CommandError(f"--device {name!r} is not a device; accepted: cpu, cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CommandError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise CommandError(f"--device {name!r} is not supported; accepted: cpu, cuda")
    return device


def output_dir(path: str) -> Path:
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CommandError(f"cannot create output folder {out}: {err.strerror}") from None
    return out


def command_line(command: str) -> str:
    """The command as typed (for reports), or just its name when called from Python."""
    if sys.argv[1:2] == [command]:
        return "sparsemoe " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    return f"sparsemoe {command}"
