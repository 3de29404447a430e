"""`python -m sparsemoe ...` is the `sparsemoe` command."""

import os
import sys

try:
    from sparsemoe.cli import main
except KeyboardInterrupt:  # Ctrl-C while the command itself (and torch with it) is being imported
    print("sparsemoe: interrupted", file=sys.stderr)
    sys.stderr.flush()
    # Not sys.exit: finalising a half-imported extension can raise the interrupt again at shutdown, and the
    # process would die of SIGINT instead of exiting with 130 (see sparsemoe.cli._exit_interrupted).
    os._exit(130)

sys.exit(main())
