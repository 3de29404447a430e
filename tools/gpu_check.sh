#!/usr/bin/env bash
# The GPU checks of the Triton backend in one run, sized for a short lease of one GPU: the `gpu`-marked
# tests, then `sparsemoe bench --gpu` one config at a time (each under its own time limit, so one that
# runs long still leaves the other's report). Nothing is installed: the package runs from this checkout
# with the machine's PyTorch and Triton. Logs and reports go to $OUT (default gpu-check/), at most
# 8 files, two folders deep; the benchmark tables are printed last.
#
#   bash tools/gpu_check.sh                       # tests + both configs
#   bash tools/gpu_check.sh --tokens 1,16384      # extra arguments go to every `sparsemoe bench` call
#
# The tests run with SPARSEMOE_TRITON_AUTOTUNE=0 (one tile per kernel: correctness, not tuning); the
# benchmark autotunes. Time limits in seconds (environment): TEST_TIMEOUT (150), BENCH_TIMEOUT (220 per
# config); together under the 10 minutes of one call.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu-check}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# The autotuner prints the config it picks for each kernel and shape: kept in the logs.
export TRITON_PRINT_AUTOTUNING=1

{
    python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__); print(torch.cuda.get_device_properties(0))"
    nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu,power.draw --format=csv
    echo "== pytest -m gpu tests/test_kernels.py"
    SPARSEMOE_TRITON_AUTOTUNE=0 timeout "${TEST_TIMEOUT:-150}" \
        python3 -m pytest -q -m gpu -p no:cacheprovider -o addopts="-ra" tests/test_kernels.py
    echo "tests exit status: $?"
} 2>&1 | tee "$OUT/gpu_tests.log"

# The configs of `sparsemoe bench --gpu`, one process each.
configs=$(python3 -c "from sparsemoe.commands.bench import GPU; print(*GPU['configs'])") || exit 1
status=0
for config in $configs; do
    echo "== sparsemoe bench --gpu --configs $config $*"
    timeout "${BENCH_TIMEOUT:-220}" python3 -m sparsemoe bench --gpu --configs "$config" --no-plots \
        --out "$OUT/$config" "$@" > "$OUT/$config.log" 2>&1
    rc=$?
    echo "bench $config exit status: $rc"
    [ "$rc" -eq 0 ] || { status=1; tail -n 30 "$OUT/$config.log"; }
done

grep -E "passed|failed|error|exit status" "$OUT/gpu_tests.log" | tail -n 5
for config in $configs; do
    [ -f "$OUT/$config/bench.md" ] && sed -n '/^## /,$p' "$OUT/$config/bench.md"
done
exit $status
