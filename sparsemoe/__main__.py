"""`python -m sparsemoe ...` is the `sparsemoe` command."""

import sys

from sparsemoe.cli import main

sys.exit(main())
