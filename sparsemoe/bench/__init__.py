"""Benchmark and profiling harness behind `sparsemoe bench` and `sparsemoe profile`.

Every timing is taken side by side in one process on the same inputs, and reported as ratios to a
reference measured in the same run: the dense ideal (an expert-shaped MLP over T*K rows, the same
FLOPs with no routing) for large batches, and the time to read the active experts' weights at the
measured copy bandwidth for small ones.
"""

from sparsemoe.bench.configs import BENCH_CONFIGS, ROUTINGS, BenchConfig, make_routing
from sparsemoe.bench.suite import SuiteOptions, run_suite

__all__ = ["BENCH_CONFIGS", "ROUTINGS", "BenchConfig", "SuiteOptions", "make_routing", "run_suite"]
