"""Print the coverage table (docs/transformers-experts.md) of experts_implementation="sparsemoe": every MoE family of the installed
transformers, checked as `tests/test_hf_families.py` checks it (a tiny random model, logits and one backward's
gradients against "eager").

    python tools/hf_experts_coverage.py            # markdown table and the "N of M families" line
"""

from __future__ import annotations

import sys
import warnings

import transformers

import sparsemoe.hf  # noqa: F401  (registers "sparsemoe")
from sparsemoe.hf.families import check_parity, experts_families


def main() -> int:
    warnings.simplefilter("ignore")
    transformers.logging.set_verbosity_error()
    families = experts_families()
    results = [check_parity(family) for family in families.values()]
    passed = [r for r in results if r.passed]
    print(f"transformers {transformers.__version__}: {len(passed)} of {len(results)} families with a decorated "
          f"experts class match eager; {sum(r.native for r in passed)} run on the fused backends, the others on "
          "the general path.\n")  # fmt: skip
    print("| family | model class | path | logits error | worst gradient error | float64-checked gradients |")
    print("|---|---|---|---|---|---|")
    for r in results:
        status = ("fused" if r.native else "general") if r.passed else f"FAILED: {r.reason}"
        checked = ", ".join(r.float64_checked) or "-"
        errors = f"{r.output_error:.1e} | {r.gradient_error:.1e}"
        print(f"| {r.family} | {r.model_class} | {status} | {errors} | {checked} |")
    return 0 if len(passed) == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
