"""Subcommands of the `sparsemoe` CLI, one module each (see sparsemoe/cli.py)."""
