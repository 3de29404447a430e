"""The `sparsemoe` command: a thin shell over importable functions.

Each subcommand lives in `sparsemoe/commands/<name>.py` and exposes
`register(subparsers) -> argparse.ArgumentParser` whose parser has `func(args) -> int` set as its
default. Subcommands are discovered, so adding one is adding a file.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys
from typing import Optional, Sequence

import sparsemoe
import sparsemoe.commands
from sparsemoe.commands import CommandError
from sparsemoe.ops.memory import keep_freed_memory


class _Parser(argparse.ArgumentParser):
    """argparse, with a bad argument reported in one line (argparse prints the usage too), status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="sparsemoe",
        description="Sparse Mixture-of-Experts: train and sample a small MoE language model, benchmark, "
        "profile and convert MoE layers and checkpoints.",
    )
    parser.add_argument("--version", action="version", version=f"sparsemoe {sparsemoe.__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(sparsemoe.commands.__path__), key=lambda m: m.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"sparsemoe.commands.{info.name}").register(subparsers)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    command = None
    try:  # Ctrl-C at any moment, start-up included (imports, argument parsing): one line, status 130
        parser = build_parser()
        args = parser.parse_args(argv)
        command = args.command
        if not getattr(args, "func", None):
            parser.print_help()
            return 2
        keep_freed_memory()  # step after step the same buffers, without fresh pages each time (ops.memory)
        return int(args.func(args) or 0)
    except CommandError as err:
        print(f"sparsemoe {command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"sparsemoe{f' {command}' if command else ''}: interrupted", file=sys.stderr)
        if command is None and argv is None:  # the command line's start-up: end the process here (below)
            _exit_interrupted()
        return 130


def _exit_interrupted() -> None:
    """Exit with status 130 now, skipping the interpreter's shutdown: Ctrl-C during start-up can land inside
    an extension module's import (torch's), and finalising a half-imported extension may raise the
    interrupt again at exit, which Python then reports by dying of SIGINT instead of exiting with 130
    (3 of 21 runs interrupted 0.5-2.8 s in did). Nothing has been written yet: nothing to clean up."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(130)


if __name__ == "__main__":  # `python -m sparsemoe.cli`: run the module's canonical copy, not __main__'s twin
    from sparsemoe.cli import main as _main

    sys.exit(_main())
