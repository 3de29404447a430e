"""Shared pieces of the expert kernels: the run mode, autotuning keys, activations, row-block mapping.

Legend: N plan rows (sorted by expert), E experts, F hidden width, BM rows per block.

Run mode: Triton decides at decoration time whether `@triton.jit` builds a GPU kernel or an
interpreted one (TRITON_INTERPRET=1), so `INTERPRET` is read once, at import, before any kernel is
defined; a process that sets the variable later keeps the compiled kernels and must not claim the CPU.
"""

from __future__ import annotations

import inspect
import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")

# Activation codes shared by host and kernels (constexpr ints select the epilogue at compile time).
ACT_CODES = {"swiglu": 1, "geglu": 2, "relu": 3, "gelu": 4}
GATED_CODES = (1, 2)

_SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)  # a constexpr: kernels may read only those globals
# The interpreter multiplies bfloat16 tiles as their raw uint16 bit patterns (Triton 3.x numpy
# emulation), so under it the dot operands are widened to float32 first. Compiled kernels are unchanged.
_WIDEN_DOT = tl.constexpr(INTERPRET)


def activation_code(activation: str) -> int:
    if activation not in ACT_CODES:
        raise ValueError(f"Triton expert kernels: activation {activation!r} is not supported; accepted: {sorted(ACT_CODES)}")
    return ACT_CODES[activation]


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def rows_bucket(num_rows: int) -> int:
    """Autotuning key for the row count: powers of two, so a new batch size rarely re-tunes."""
    return min(next_pow2(num_rows), 1 << 20)


_DEVICE_KEYS: dict[int, int] = {}


def device_key(t: torch.Tensor) -> int:
    """An integer naming the device model, part of every autotuning key (configs are per shape AND device)."""
    if t.device.type != "cuda":
        return 0
    index = t.device.index if t.device.index is not None else torch.cuda.current_device()
    if index not in _DEVICE_KEYS:
        props = torch.cuda.get_device_properties(index)
        # Stable across runs, unlike hash(): capability, SM count and memory pick out the model.
        _DEVICE_KEYS[index] = (props.major * 100 + props.minor) * 1_000_000 + props.multi_processor_count * 1000 + (
            props.total_memory >> 30
        )
    return _DEVICE_KEYS[index]


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs use IEEE products unless PyTorch itself allows TF32, so results match torch.mm."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


# Keep the autotuner's winners on disk across processes where this Triton can (`cache_results`, 3.4+).
AUTOTUNE_CACHE = {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}


# SPARSEMOE_TRITON_AUTOTUNE=0: each kernel runs one mid-sized tile of its list and nothing is benchmarked
# (a quick start, e.g. for correctness tests on a GPU); read once, at import, like TRITON_INTERPRET.
AUTOTUNE = os.environ.get("SPARSEMOE_TRITON_AUTOTUNE", "1").strip().lower() not in ("0", "false", "off", "no")


def configs(gpu: list[triton.Config], interpreter: triton.Config, untuned: dict) -> list[triton.Config]:
    """The autotuning list: the GPU list; only its entry with the `untuned` block sizes when AUTOTUNE is
    off; one small config under the interpreter (no benchmarking there)."""
    if INTERPRET:
        return [interpreter]
    if AUTOTUNE:
        return gpu
    matches = [c for c in gpu if all(c.kwargs.get(k) == v for k, v in untuned.items())]
    if len(matches) != 1:
        raise ValueError(f"the untuned config {untuned} must match exactly one entry of the list, not {len(matches)}")
    return matches


def prune_row_blocks(configs_in, named_args, **kwargs):
    """Drop configs whose row block is far larger than an expert's average group (decode batches)."""
    rows_per_expert = max(1, named_args["N_BUCKET"] // max(1, named_args["E"]))
    limit = max(16, next_pow2(rows_per_expert))
    kept = [c for c in configs_in if c.kwargs["BLOCK_M"] <= limit]
    return kept or [min(configs_in, key=lambda c: c.kwargs["BLOCK_M"])]


# --- device helpers --------------------------------------------------------------------------------


@triton.jit
def mma(a, b, acc, PRECISION: tl.constexpr):
    """acc + a @ b with fp32 accumulation (tl.dot; see _WIDEN_DOT for the interpreter)."""
    if _WIDEN_DOT:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def gelu_tanh(x):
    # 0.5 * (1 + tanh(u)) == sigmoid(2u): no tanh primitive is needed.
    u = _SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)
    return x * tl.sigmoid(2.0 * u)


@triton.jit
def gelu_tanh_grad(x):
    u = _SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)
    s = tl.sigmoid(2.0 * u)
    du = _SQRT_2_OVER_PI * (1.0 + 3.0 * 0.044715 * x * x)
    return s + x * s * (1.0 - s) * 2.0 * du


@triton.jit
def act_forward(g, u, ACT: tl.constexpr):
    """a = act(gate) * up for gated codes (1 swiglu, 2 geglu); act(g) otherwise (3 relu, 4 gelu)."""
    if ACT == 1:
        return g * tl.sigmoid(g) * u
    elif ACT == 2:
        return gelu_tanh(g) * u
    elif ACT == 3:
        return tl.maximum(g, 0.0)
    else:
        return gelu_tanh(g)


@triton.jit
def act_backward(da, g, u, ACT: tl.constexpr):
    """(d gate, d up) from d a; for ungated codes the second value repeats the first and is unused."""
    if ACT == 1:
        s = tl.sigmoid(g)
        dg = da * u * s * (1.0 + g * (1.0 - s))
        return dg, da * g * s
    elif ACT == 2:
        dg = da * u * gelu_tanh_grad(g)
        return dg, da * gelu_tanh(g)
    elif ACT == 3:
        dg = tl.where(g > 0.0, da, 0.0)
        return dg, dg
    else:
        dg = da * gelu_tanh_grad(g)
        return dg, dg


@triton.jit
def expert_row_block(pid_m, offsets_ptr, E, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    """Map row-block `pid_m` to (expert, first row, end row of that expert's group).

    Each expert's group of rows [offsets[e-1], offsets[e]) is cut into ceil(count/BLOCK_M) blocks and
    the blocks are numbered expert by expert. The mapping is computed here, on the device, from the
    plan's offsets, so the host never reads the counts (no sync) and any autotuned BLOCK_M works.
    Blocks past the last one get expert >= E and do nothing.
    """
    e = tl.arange(0, BLOCK_E)
    in_range = e < E
    ends = tl.load(offsets_ptr + e, mask=in_range, other=0)
    starts = tl.load(offsets_ptr + e - 1, mask=in_range & (e > 0), other=0)
    blocks = (ends - starts + BLOCK_M - 1) // BLOCK_M
    last_block = tl.cumsum(blocks, axis=0)  # inclusive: blocks of experts 0..e
    expert = tl.sum((last_block <= pid_m).to(tl.int32), axis=0)
    this = e == expert
    first_block = tl.sum(tl.where(this, last_block - blocks, 0), axis=0)
    row_start = tl.sum(tl.where(this, starts, 0), axis=0) + (pid_m - first_block) * BLOCK_M
    row_end = tl.sum(tl.where(this, ends, 0), axis=0)
    return expert, row_start, row_end


def row_block_grid(num_rows: int, num_experts: int, block_m: int) -> int:
    """Upper bound on the row blocks: sum_e ceil(c_e/BM) <= ceil(N/BM) + E, and <= N (blocks are non-empty)."""
    return max(1, min(triton.cdiv(num_rows, block_m) + num_experts, num_rows))


@triton.jit
def grouped_program_id(N_ROWS, E, N_OUT, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row block, column block) of this program, visiting GROUP_M row blocks per sweep over the columns.

    A plain row-major order would stream every weight column tile past each row block, or every row
    block past each column tile; sweeping a group of row blocks keeps both the group's gathered rows and
    the current weight tiles in L2 (the usual grouped ordering of Triton GEMMs).
    """
    pid = tl.program_id(0)
    blocks_m = tl.minimum((N_ROWS + BLOCK_M - 1) // BLOCK_M + E, N_ROWS)  # = row_block_grid on the host
    blocks_n = (N_OUT + BLOCK_N - 1) // BLOCK_N
    per_group = GROUP_M * blocks_n
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(blocks_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m
    return pid_m, pid_n
