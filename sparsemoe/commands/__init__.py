"""Subcommands of the `sparsemoe` CLI, one module each (see sparsemoe/cli.py)."""


class CommandError(Exception):
    """A user mistake: printed as one line ("sparsemoe: error: ..."), exit status 2, no traceback."""
