"""Compile every Triton kernel with every autotuning config for an H100/H200 (sm_90) and report what the
machine code says: registers, spills, shared memory, Hopper tensor-core instructions. No GPU needed.

    python tools/kernel_audit.py                 # markdown table on stdout
    python tools/kernel_audit.py --dtypes bf16   # only the bfloat16 specialisations

A config that spills (stack frame + local loads/stores) or needs more shared memory than a Hopper
block can have (227 KB) is a config the autotuner would only waste GPU time on.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings

from sparsemoe.kernels.aot import HOPPER_SHARED_BYTES, autotuned_kernels, compile_config, resources


_BLOCK_NAMES = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_O", "BLOCK_I", "BLOCK_R")


def _block(kwargs: dict) -> str:
    return "x".join(str(kwargs[k]) for k in _BLOCK_NAMES if k in kwargs)


def audit(dtypes: list[str]) -> list[dict]:
    rows = []
    for dtype in dtypes:
        for label, spec, configs in autotuned_kernels(dtype):
            for config in configs:
                start = time.perf_counter()
                compiled = compile_config(spec, config)
                seconds = time.perf_counter() - start
                res = resources(compiled)
                rows.append({
                    "kernel": label, "dtype": dtype, "block": _block(config.kwargs), "warps": config.num_warps,
                    "stages": config.num_stages, "registers": res.registers, "stack": res.stack_bytes,
                    "shared_kb": res.shared_bytes / 1024, "hgmma": res.instructions["HGMMA"],
                    "hmma": res.instructions["HMMA"], "spills": res.spills,
                    "fits": res.shared_bytes <= HOPPER_SHARED_BYTES, "compile_s": seconds,
                })  # fmt: skip
                print(_line(rows[-1]), flush=True)
    return rows


HEADER = (
    "| kernel | dtype | block | warps | stages | registers | stack B | shared KB | HGMMA | HMMA | verdict "
    "| compile s |\n|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|"
)


def _line(r: dict) -> str:
    verdict = "spills" if r["spills"] else ("too much shared memory" if not r["fits"] else "ok")
    cells = [r["kernel"], r["dtype"], r["block"], r["warps"], r["stages"], r["registers"], r["stack"]]
    cells += [f"{r['shared_kb']:.0f}", r["hgmma"], r["hmma"], verdict, f"{r['compile_s']:.1f}"]
    return "| " + " | ".join(str(c) for c in cells) + " |"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--dtypes", default="bf16,fp32", help="comma-separated: bf16, fp16, fp32 (default: %(default)s)"
    )
    args = parser.parse_args(argv)
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    bad = [d for d in dtypes if d not in ("bf16", "fp16", "fp32")]
    if bad or not dtypes:
        parser.error(f"unknown dtype(s) {bad}; accepted: bf16, fp16, fp32")
    warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")
    print(HEADER)
    rows = audit(dtypes)
    bad_rows = [r for r in rows if r["spills"] or not r["fits"]]
    print(f"\n{len(rows)} configs compiled for sm_90; {len(bad_rows)} spill or overflow shared memory; "
          f"{sum(r['compile_s'] for r in rows):.0f} s of compilation")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
