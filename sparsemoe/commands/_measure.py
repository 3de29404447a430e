"""What `sparsemoe bench`, `hf-bench` and `profile` share: argument types, device, output folder, command line."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

import torch

from sparsemoe.commands import CommandError
from sparsemoe.commands._device import device_from_args


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError
    return value


# More threads than this is a typo, not a setting (torch would try to start them all).
MAX_THREADS = max(256, 4 * (os.cpu_count() or 1))


def thread_count(text: str) -> int:
    """An argparse type for --threads: an integer in [1, MAX_THREADS]."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= MAX_THREADS:
        raise argparse.ArgumentTypeError(f"expected an integer from 1 to {MAX_THREADS}, got {text!r}")
    return value


def csv_list(kind: str, accepted=None, convert=str):
    """An argparse type: a comma-separated list of `kind`, each converted and (if given) one of `accepted`."""

    def parse(text: str):
        items = [t.strip() for t in text.split(",") if t.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {kind}")
        try:
            values = tuple(convert(t) for t in items)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {kind}, got {text!r}") from None
        if accepted is not None:
            bad = [v for v in values if v not in accepted]
            if bad:
                raise argparse.ArgumentTypeError(f"unknown {kind} {bad}; accepted: {', '.join(map(str, accepted))}")
        return values

    return parse


def setup_device(args: argparse.Namespace) -> torch.device:
    """Apply --threads and resolve --device (see sparsemoe.device.resolve_device)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    return device_from_args(args)


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
