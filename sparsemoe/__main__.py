"""`python -m sparsemoe ...` is the `sparsemoe` command."""

import sys

try:
    from sparsemoe.cli import main
except KeyboardInterrupt:  # Ctrl-C while the command itself is being imported
    print("sparsemoe: interrupted", file=sys.stderr)
    sys.exit(130)

sys.exit(main())
