"""What a GEMM costs the first time PyTorch sees its shape on the CPU, by dtype.

    python tools/gemm_new_shapes.py [--threads 2]

An expert's row count changes from step to step. For each dtype, `torch.mm` of [M, 128] x [128, 256] (an
expert of the demo model) over 40 row counts M near 1,024 never seen before in the process, then over the
same 40 again, and over one row count repeated: ms per call. bfloat16 GEMMs run on oneDNN, which builds and
caches a kernel per shape (the reason the fused expert op buckets bfloat16 row counts, sparsemoe.dispatch.fused).
"""

import argparse
import time

import torch


def _ms_per_call(a: torch.Tensor, b: torch.Tensor, rows: list[int]) -> float:
    start = time.perf_counter()
    for m in rows:
        torch.mm(a[:m], b)
    return (time.perf_counter() - start) / len(rows) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for offset, dtype in enumerate((torch.float32, torch.bfloat16)):
        a, b = torch.randn(2048, 128, dtype=dtype), torch.randn(128, 256, dtype=dtype)
        _ms_per_call(a, b, [1024] * 20)  # warm up the library and the one fixed shape
        unseen = [901 + 2 * i + offset * 100 for i in range(40)]  # a fresh set of row counts per dtype
        new = _ms_per_call(a, b, unseen)
        again = _ms_per_call(a, b, unseen)
        fixed = _ms_per_call(a, b, [1024] * 40)
        print(f"{str(dtype):15s} new row counts {new:.3f} ms/call, the same again {again:.3f}, "
              f"one row count {fixed:.3f}")


if __name__ == "__main__":
    main()
