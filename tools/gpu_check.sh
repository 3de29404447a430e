#!/usr/bin/env bash
# The GPU checks in one run, sized for one call of a short lease of one GPU (at most ~8 minutes):
#   1. the `gpu`-marked tests (kernels, training, resume across devices, generation, compile);
#   2. a short training run of the `gpu` preset and of its dense twin (tokens/s, MFU, peak memory, the
#      memory estimate beside it), each stopped by SIGTERM after TRAIN_SECONDS (it saves and reports);
#   3. `sparsemoe bench --gpu`, one config at a time (forward+backward at T=16384, decode T=1/16/64);
#   4. `sparsemoe hf-bench`: a whole transformers Mixtral-like model in bfloat16 with
#      experts_implementation eager, grouped_mm and sparsemoe (prefill 2048, greedy decode).
# Each step runs under its own time limit, so one that runs long still leaves the others' reports.
# Nothing is installed: the package runs from this checkout with the machine's PyTorch and Triton. Logs
# and reports go to $OUT (default gpu-check/: gpu_tests.log, train.log, per config a log, bench.md and
# bench.json, and hf-bench.log with hf-bench/hf_bench.md and .json: 11 files); the training runs' folders
# (checkpoints of several GB) go to $WORK (default: a temporary folder, removed at the end).
#
#   bash tools/gpu_check.sh                       # on the GPU
#   bash tools/gpu_check.sh --dry-run             # the same steps on the CPU with tiny shapes (CI runs it)
#   bash tools/gpu_check.sh --tokens 1,16384      # extra arguments go to every `sparsemoe bench` call
#
# The tests run with SPARSEMOE_TRITON_AUTOTUNE=0 (one tile per kernel: correctness, not tuning); the
# benchmark and the training runs autotune. Time limits in seconds (environment): TEST_TIMEOUT (120),
# TRAIN_SECONDS (60 per run, start-up included, then up to 40 more to save), BENCH_TIMEOUT (100 per config),
# HF_BENCH_TIMEOUT (60).
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
if [ "${1:-}" = "--dry-run" ]; then
    DRY=1
    shift
fi
OUT="${OUT:-gpu-check}"
mkdir -p "$OUT"
OWN_WORK=0
if [ -z "${WORK:-}" ]; then
    WORK=$(mktemp -d)
    OWN_WORK=1
fi
mkdir -p "$WORK"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# The autotuner prints the config it picks for each kernel and shape: kept in the logs.
export TRITON_PRINT_AUTOTUNING=1

if [ "$DRY" -eq 1 ]; then  # the same commands on the CPU, on shapes that take seconds
    TRAIN_SHAPE=(--device cpu --set dim=64 --set n_layers=2 --set n_heads=2 --set n_kv_heads=1
                 --set moe_hidden_dim=32 --batch-size 2 --seq-len 64 --max-steps 3 --max-bytes 200000)
    BENCH_SHAPE=(--device cpu --configs tiny --tokens 1,16,64,256 --repeats 1 --backward-min-tokens 64)
    HF_BENCH_SHAPE=(--device cpu --quick --families mixtral --dtypes float32)
    configs="tiny"
else
    TRAIN_SHAPE=()
    BENCH_SHAPE=()
    HF_BENCH_SHAPE=(--device cuda --families mixtral --dtypes bfloat16 --repeats 3)
    configs=$(python3 -c "from sparsemoe.commands.bench import GPU; print(*GPU['configs'])") || exit 1
fi
status=0

versions_and_tests() {
    python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
    if [ "$DRY" -eq 0 ]; then
        python3 -c "import torch; print(torch.cuda.get_device_properties(0))"
        nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu,power.draw --format=csv
    fi
    echo "== pytest -m gpu tests/test_kernels.py tests/test_gpu.py"
    SPARSEMOE_TRITON_AUTOTUNE=0 timeout "${TEST_TIMEOUT:-120}" \
        python3 -m pytest -q -m gpu -p no:cacheprovider -o addopts="-ra" tests/test_kernels.py tests/test_gpu.py
}
versions_and_tests 2>&1 | tee "$OUT/gpu_tests.log"
rc=${PIPESTATUS[0]}
echo "tests exit status: $rc" | tee -a "$OUT/gpu_tests.log"
[ "$rc" -eq 0 ] || status=1

# Training: the gpu preset and its dense twin (equal active parameters), eager, default precision (bf16).
for kind in moe dense; do
    flags=()
    [ "$kind" = dense ] && flags=(--dense)
    echo "== sparsemoe train --preset gpu ${flags[*]} (SIGTERM after ${TRAIN_SECONDS:-60} s: it saves, stops)" |
        tee -a "$OUT/train.log"
    timeout -s TERM -k 40 "${TRAIN_SECONDS:-60}" python3 -m sparsemoe train --preset gpu "${flags[@]}" \
        --run-dir "$WORK/train-$kind" --no-progress --log-interval 5 --eval-interval 100000 \
        --checkpoint-interval 100000 "${TRAIN_SHAPE[@]}" > "$WORK/train-$kind.log" 2>&1
    rc=$?
    cat "$WORK/train-$kind.log" >> "$OUT/train.log"
    echo "train $kind exit status: $rc" | tee -a "$OUT/train.log"
    [ "$rc" -eq 0 ] || { status=1; tail -n 30 "$WORK/train-$kind.log"; }
    rm -rf "$WORK/train-$kind"
done

# The benchmark: the configs of `sparsemoe bench --gpu`, one process each.
for config in $configs; do
    echo "== sparsemoe bench --gpu --configs $config ${BENCH_SHAPE[*]} $*"
    timeout "${BENCH_TIMEOUT:-100}" python3 -m sparsemoe bench --gpu --configs "$config" --no-plots \
        --out "$OUT/$config" "${BENCH_SHAPE[@]}" "$@" > "$OUT/$config.log" 2>&1
    rc=$?
    echo "bench $config exit status: $rc"
    [ "$rc" -eq 0 ] || { status=1; tail -n 30 "$OUT/$config.log"; }
done

# Whole transformers models by experts implementation (needs transformers; skipped with a line without it).
if python3 -c "import transformers.integrations.moe" 2>/dev/null; then
    echo "== sparsemoe hf-bench ${HF_BENCH_SHAPE[*]}"
    timeout "${HF_BENCH_TIMEOUT:-60}" python3 -m sparsemoe hf-bench "${HF_BENCH_SHAPE[@]}" --out "$OUT/hf-bench" \
        > "$OUT/hf-bench.log" 2>&1
    rc=$?
    echo "hf-bench exit status: $rc"
    [ "$rc" -eq 0 ] || { status=1; tail -n 30 "$OUT/hf-bench.log"; }
else
    echo "== sparsemoe hf-bench skipped: transformers with its experts interface is not installed"
fi

[ "$OWN_WORK" -eq 1 ] && rm -rf "$WORK"
grep -E "passed|failed|error|exit status" "$OUT/gpu_tests.log" | tail -n 5
grep -E "^== sparsemoe train|parameters|memory needed|^(finished|stopped) at step" "$OUT/train.log"
for config in $configs; do
    [ -f "$OUT/$config/bench.md" ] && sed -n '/^## /,$p' "$OUT/$config/bench.md"
done
[ -f "$OUT/hf-bench/hf_bench.md" ] && sed -n '/^## /,$p' "$OUT/hf-bench/hf_bench.md"
exit $status
