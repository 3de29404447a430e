"""Native CPU kernels: built on first use with the system C compiler, cached on disk, called through ctypes.

Legend: N rows sorted by expert, n rows, E experts, D model width, F hidden width, I in-projection rows
(2F gated: gate then up).

    decode_mlp(x_TD, token_ids [N], weights [N], offsets [E], w_in [E, I, D], w_out [E, D, F], activation,
               h_keep=None)
        -> y_TD [T, D] float32, the whole expert stage of a decode step (gather, both GEMMs, activation,
        weighted combine): y[t] = sum over the kept rows r of token t of weights[r] w_out[e] act(w_in[e] x[t]),
        rows sorted by expert (expert e: rows [offsets[e - 1], offsets[e])), rows past offsets[-1] ignored;
        x and the weights float32 or bfloat16 (read as they are, widened to float32 in registers), sums and
        activations in float32; with h_keep [N, I] the in-projection outputs are kept there for a backward
        (sparsemoe.ops.expert_backward: the small-batch backward of a training step). On CPUs with
        AVX512-BF16 (`bfloat16_dot_products()`), bfloat16 weights of experts with up to 8 rows are multiplied
        by the CPU's bfloat16 pair dot products, against x as it is and act(h) rounded to bfloat16 (as
        PyTorch's bfloat16 GEMMs round it): widening the weights bounded the kernel below the memory speed
    linear_many(x_nK, (w_1 [O_1, K], ...)) -> [x w_1^T, ...] in x's dtype (or float32): several linear layers of
        one input, a few rows of it, in one call (an attention layer's q, k and v projections at a decode step)
    decode_mlp_choices(x_TD, expert_ids [T*K], weights [T*K], K, w_in, w_out, activation) -> y_TD float32: the same
        stage from a router's token-major top-k choices, the rows grouped by expert inside the call
    grouped_linear(x_NK, offsets [E], w [E, O, K]) -> y_NO float32, one linear layer per expert over rows
        sorted by expert: y[r] = W[e] x[r], W stored [E, O, K] (nn.Linear's layout) or [E, K, O], each weight
        read once; for a few rows per expert of the expert MLPs whose activation runs in PyTorch
        (sparsemoe.dispatch.general)
    decode_mlp_quantized(x_TD, token_ids, weights, offsets, (data, scale) of w_in, of w_out, bits, group,
        hidden width, activation) -> y_TD float32: the same stage with quantized expert weights (int8 per
        output channel or int4 group-wise, sparsemoe.quant.schemes), read in their stored bytes and widened
        in registers; x float32 or bfloat16
    decode_mlp_quantized_choices(x_TD, expert_ids [T*K], weights [T*K], K, ...) -> the same from a router's top-k
        choices, the rows grouped by expert inside the call
    dequantize(data, scale, bits, group, K, dtype) -> the float weight [..., O, K] in float32 or bfloat16
    scatter_add_rows(y_TD, token_ids [n], rows_nD, weights [n] or None) -> y, in place:
        y[token_ids[r]] += weights[r] rows[r] in float32, rows float32 or bfloat16 (the expert op's combine
        and its backward's input gradient: one pass, threads over columns, no float32 copy of the rows)
    (and in sparsemoe.ops.small_kernels: the small parts of a step, each in one pass: finiteness checks, the
    plan's sort, top-k routing, RMSNorm, one-position attention, greedy argmax; and, called by
    sparsemoe.model.native_decode only, a decode step's block in two calls, csrc/decode_block.c)
    activate(h_nI, activation) -> a_nF = act(h)
    activation_backward(h_nI, dA_nF, w_n, activation) -> (aw_nF, dH_nI, d_w_n float32)
        for o = w * (W_out act(h)) with dA = d loss / d act(h) before the weighting: aw = w act(h)
        (so that d W_out = dy^T aw), d_w = <dA, act(h)> per row, dH = d loss / d h
        h, dA, a, aw, dH float32 or bfloat16 (computed in float32, rounded once when stored)

Why: with a few rows per expert (decoding) the expert GEMMs are bounded by reading the weights, and BLAS
GEMMs on 1-16 rows run several times below that bound (`sparsemoe bench` reports the fraction); the
decode kernel (`csrc/decode_mlp.c`) streams each weight row once and runs the whole expert stage in one
call. The activation kernels (`csrc/activation.c`) do in one pass over each row what takes PyTorch six
to ten elementwise ops (and as many trips through memory) in the expert backward. All use OpenMP
threads (`torch.get_num_threads()`) and the same float32 arithmetic as PyTorch up to rounding. In
bfloat16 they round less often than PyTorch, whose bfloat16 ops each round their result: the decode
kernel keeps h and act(h) in float32, and the activation kernels round each output once.

The library is compiled once per source, compiler and CPU into the cache folder (`SPARSEMOE_CACHE_DIR`,
else `$XDG_CACHE_HOME/sparsemoe`, else `~/.cache/sparsemoe`) with `-O3 -march=native -fopenmp`, falling
back to plainer flags when the compiler refuses them. Set `SPARSEMOE_CPU_KERNELS=0` to turn it off;
without a C compiler (`$CC`, `cc`, `gcc` or `clang`), or if the build fails, `available()` is False and
the callers keep their PyTorch path. Nothing is downloaded.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import math
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode

log = logging.getLogger(__name__)

CSRC = Path(__file__).with_name("csrc")
SOURCES = (CSRC / "decode_mlp.c", CSRC / "activation.c", CSRC / "scatter_rows.c", CSRC / "finite.c",
           CSRC / "decode_attention.c", CSRC / "norm.c", CSRC / "expert_backward.c", CSRC / "decode_block.c")
HEADERS = (CSRC / "vec.h", CSRC / "activation.h", CSRC / "activation_rows.h", CSRC / "decode_gemm.h",
           CSRC / "quant_gemm.h", CSRC / "expert_rows.h")
ENV_SWITCH = "SPARSEMOE_CPU_KERNELS"
ENV_CACHE = "SPARSEMOE_CACHE_DIR"
# Tried in order; the first set the compiler accepts is used.
FLAG_SETS = (
    ("-O3", "-march=native", "-fopenmp"),
    ("-O3", "-fopenmp"),
    ("-O3",),
)
_COMMON_FLAGS = ("-std=gnu11", "-fPIC", "-shared", "-Wno-psabi")
ACTIVATION_CODES = {"swiglu": 0, "geglu": 1, "relu": 2, "gelu": 3}


def cache_dir() -> Path:
    if os.environ.get(ENV_CACHE):
        return Path(os.environ[ENV_CACHE])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sparsemoe"


def find_compiler() -> Optional[str]:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_identity() -> str:
    """What `-march=native` depends on: a binary built for one CPU may not run on another."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [line for line in f if line.startswith(("model name", "flags", "Features", "CPU part"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor() + platform.machine()


def _compiler_version(compiler: str) -> str:
    try:
        return subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def build(compiler: str, out_dir: Path, flags: tuple[str, ...]) -> Path:
    """Compile the kernels into `out_dir` (atomically: concurrent processes may race) -> the library path.

    Raises RuntimeError with the compiler's message when it fails.
    """
    source = b"".join(p.read_bytes() for p in (*SOURCES, *HEADERS))
    key = hashlib.sha256(
        b"\0".join(
            [source, compiler.encode(), _compiler_version(compiler).encode(), " ".join(flags).encode(),
             _cpu_identity().encode(), platform.machine().encode()]
        )
    ).hexdigest()[:20]
    path = out_dir / f"sparsemoe_cpu-{key}.so"
    if path.exists():
        return path
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
    os.close(fd)
    try:
        cmd = [compiler, *flags, *_COMMON_FLAGS, *map(str, SOURCES), "-o", tmp, "-lm"]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stderr.strip()}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _bind(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))  # CDLL releases the GIL during calls
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    signatures = {
        "sparsemoe_decode_mlp_f32": ([p, p, p, i64, p, i64, p, p, i64, i64, i64, i64, i32, p, p, i32], ctypes.c_int),
        "sparsemoe_decode_mlp_bf16": ([p, p, p, i64, p, i64, p, p, i64, i64, i64, i64, i32, p, p, i32], ctypes.c_int),
        "sparsemoe_expert_backward_f32": (
            [p, p, p, p, i64, p, i64, p, p, p, i64, i64, i64, i64, i32, p, p, p, p, i32], ctypes.c_int),
        "sparsemoe_expert_backward_bf16": (
            [p, p, p, p, i64, p, i64, p, p, p, i64, i64, i64, i64, i32, p, p, p, p, i32], ctypes.c_int),
        "sparsemoe_decode_mlp_choices_f32": ([p, p, p, i64, i64, i64, p, p, i64, i64, i64, i32, p, i32], ctypes.c_int),
        "sparsemoe_decode_mlp_choices_bf16": ([p, p, p, i64, i64, i64, p, p, i64, i64, i64, i32, p, i32], ctypes.c_int),
        "sparsemoe_decode_mlp_quant": (
            [p, i32, p, p, i64, p, i64, p, p, p, p, i32, i64, i64, i64, i64, i64, i32, p, i32], ctypes.c_int),
        "sparsemoe_decode_mlp_quant_choices": (
            [p, i32, p, p, i64, i64, i64, p, p, p, p, i32, i64, i64, i64, i64, i32, p, i32], ctypes.c_int),
        "sparsemoe_dequantize": ([p, p, i32, i64, i64, i64, i64, p, i32, i32], ctypes.c_int),
        "sparsemoe_vnni_activations_int8": ([], ctypes.c_int),
        "sparsemoe_bfloat16_dot_products": ([], ctypes.c_int),
        "sparsemoe_grouped_linear_f32": ([p, i64, p, i64, p, i64, i64, i32, p, i32], ctypes.c_int),
        "sparsemoe_grouped_linear_bf16": ([p, i64, p, i64, p, i64, i64, i32, p, i32], ctypes.c_int),
        "sparsemoe_linear_many_f32": ([p, i32, i64, i64, i64, p, p, p, i32, i32], ctypes.c_int),
        "sparsemoe_linear_many_bf16": ([p, i32, i64, i64, i64, p, p, p, i32, i32], ctypes.c_int),
        "sparsemoe_activate_f32": ([p, p, i64, i64, i64, i32, i32], None),
        "sparsemoe_activate_bf16": ([p, p, i64, i64, i64, i32, i32], None),
        "sparsemoe_activation_backward_f32": ([p, p, p, p, p, p, i64, i64, i64, i32, i32], None),
        "sparsemoe_activation_backward_bf16": ([p, p, p, p, p, p, i64, i64, i64, i32, i32], None),
        "sparsemoe_scatter_add_rows": ([p, i64, p, p, i32, p, i64, i64, i32], ctypes.c_int),
        "sparsemoe_all_finite": ([p, i64, i32, i32], ctypes.c_int),
        "sparsemoe_sort_by_expert": ([p, i64, i64, p, p, p, p, p], ctypes.c_int),
        "sparsemoe_topk_route": ([p, i64, i64, i64, i32, i32, ctypes.c_float, p, p, p], None),
        "sparsemoe_argmax_rows": ([p, i32, i64, i64, p], None),
        "sparsemoe_rms_norm_f32": ([p, p, i64, i64, ctypes.c_float, p, i32], None),
        "sparsemoe_rms_norm_bf16": ([p, p, i64, i64, ctypes.c_float, p, i32], None),
        "sparsemoe_decode_attention_f32": (
            [p, p, p, p, p, p, p, i64, i64, i64, i64, i64, i64, i64, i64, ctypes.c_float, p, i32], ctypes.c_int),
        "sparsemoe_decode_attention_bf16": (
            [p, p, p, p, p, p, p, i64, i64, i64, i64, i64, i64, i64, i64, ctypes.c_float, p, i32], ctypes.c_int),
        "sparsemoe_decode_attention_half_f32": ([p, p, p, p, i64, p, p, i64], ctypes.c_int),
        "sparsemoe_decode_attention_half_bf16": ([p, p, p, p, i64, p, p, i64], ctypes.c_int),
        "sparsemoe_decode_moe_half_f32": ([p, p, p], ctypes.c_int),
        "sparsemoe_decode_moe_half_bf16": ([p, p, p], ctypes.c_int),
    }
    for name, (argtypes, restype) in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, restype
    return lib


@functools.lru_cache(maxsize=None)
def load() -> Optional[ctypes.CDLL]:
    """The compiled library, or None (switched off, no compiler, or every build failed; logged)."""
    if os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    compiler = find_compiler()
    if compiler is None:
        log.info("sparsemoe CPU kernels: no C compiler found; using BLAS")
        return None
    error: Exception = RuntimeError("no flags tried")
    for flags in FLAG_SETS:
        try:
            return _bind(build(compiler, cache_dir(), flags))
        except (RuntimeError, OSError, AttributeError, subprocess.SubprocessError) as err:
            log.info("sparsemoe CPU kernels: build with %s failed: %s", " ".join(flags), err)
            error = err
    log.warning(
        "sparsemoe CPU kernels could not be built, using PyTorch/BLAS instead (set %s=0 to skip trying): %s",
        ENV_SWITCH, error,
    )
    return None


@torch.compiler.assume_constant_result  # a host-side fact: torch.compile reads it once, never traces the build
def available() -> bool:
    """Whether the kernels are built and loaded (building them on the first call)."""
    return load() is not None


# The tensor dtypes the kernels take (weights of the decode kernel; h and its kin for the activation
# kernels), by the suffix of their C functions.
KERNEL_DTYPES = {torch.float32: "f32", torch.bfloat16: "bf16"}


def supports(x: Tensor, w_in: Tensor, w_out: Tensor, activation: str) -> bool:
    """Whether `decode_mlp` takes these inputs: CPU tensors, float32 or bfloat16 (input and weights of one
    dtype), contiguous weights, a known activation."""
    return (
        all(t.device.type == "cpu" for t in (x, w_in, w_out))
        and x.dtype == w_in.dtype == w_out.dtype
        and x.dtype in KERNEL_DTYPES
        and w_in.is_contiguous()
        and w_out.is_contiguous()
        and activation in ACTIVATION_CODES
        and available()
    )


def supports_activation(h: Tensor, activation: str) -> bool:
    """Whether `activate` / `activation_backward` take h: float32 or bfloat16 on the CPU, a known activation."""
    return h.device.type == "cpu" and h.dtype in KERNEL_DTYPES and activation in ACTIVATION_CODES and available()


def _library() -> ctypes.CDLL:
    lib = load()
    if lib is None:
        raise RuntimeError(f"sparsemoe CPU kernels are not available (C compiler, or {ENV_SWITCH}=0)")
    return lib


def _hidden_width(h_nI: Tensor, activation: str) -> int:
    gated = activation in ("swiglu", "geglu")
    if h_nI.dim() != 2 or (gated and h_nI.shape[1] % 2):
        raise ValueError(f"activation {activation!r}: h must be [n, I] with I even when gated, got {tuple(h_nI.shape)}")
    return h_nI.shape[1] // 2 if gated else h_nI.shape[1]


def typed_kernel(name: str, dtype: torch.dtype):
    """The C function `name` for tensors of `dtype` (sparsemoe_<name>_f32 / _bf16)."""
    if dtype not in KERNEL_DTYPES:
        raise ValueError(f"{name}: float32 or bfloat16 tensors expected, got {dtype}")
    return getattr(_library(), f"sparsemoe_{name}_{KERNEL_DTYPES[dtype]}")


def activate(h_nI: Tensor, activation: str) -> Tensor:
    """a [n, F] = act(h) (gated: act(gate) * up) in h's dtype, like `sparsemoe.experts.activate`."""
    kernel = typed_kernel("activate", h_nI.dtype)
    h_nI = h_nI.contiguous()
    n, I = h_nI.shape
    F = _hidden_width(h_nI, activation)
    a_nF = h_nI.new_empty(n, F)
    kernel(
        h_nI.data_ptr(), a_nF.data_ptr(), n, F, I, ACTIVATION_CODES[activation], torch.get_num_threads()
    )
    return a_nF


def activation_backward(
    h_nI: Tensor, dA_nF: Tensor, w_n: Tensor, activation: str, out: Optional[tuple[Tensor, Tensor]] = None
) -> tuple[Tensor, Tensor, Tensor]:
    """(aw = w act(h) [n, F], dH [n, I] in h's dtype, d_w [n] float32) for o = w * (W_out act(h)), from
    dA = d loss / d act(h) before weighting (see the module docstring); aw and dH written into `out` (two
    contiguous tensors of those shapes and h's dtype) when given."""
    kernel = typed_kernel("activation_backward", h_nI.dtype)
    h_nI, dA_nF, w_n = h_nI.contiguous(), dA_nF.contiguous(), w_n.float().contiguous()
    n, I = h_nI.shape
    F = _hidden_width(h_nI, activation)
    if dA_nF.shape != (n, F) or w_n.shape != (n,) or dA_nF.dtype != h_nI.dtype:
        raise ValueError(f"activation_backward: h {tuple(h_nI.shape)} {h_nI.dtype}, dA {tuple(dA_nF.shape)} "
                         f"{dA_nF.dtype}, w {tuple(w_n.shape)} do not fit")
    if out is None:
        aw_nF, dH_nI = h_nI.new_empty(n, F), torch.empty_like(h_nI)
    else:
        aw_nF, dH_nI = out
        if (aw_nF.shape != (n, F) or dH_nI.shape != (n, I) or not (aw_nF.dtype == dH_nI.dtype == h_nI.dtype)
                or not (aw_nF.is_contiguous() and dH_nI.is_contiguous())):
            raise ValueError(f"activation_backward: out must be contiguous [{n}, {F}] and [{n}, {I}] {h_nI.dtype} "
                             f"tensors, got {tuple(aw_nF.shape)} and {tuple(dH_nI.shape)}")  # fmt: skip
    d_w = h_nI.new_empty(n, dtype=torch.float32)
    kernel(
        h_nI.data_ptr(), dA_nF.data_ptr(), w_n.data_ptr(), aw_nF.data_ptr(), dH_nI.data_ptr(), d_w.data_ptr(),
        n, F, I, ACTIVATION_CODES[activation], torch.get_num_threads(),
    )
    return aw_nF, dH_nI, d_w


PLAIN_TYPES = (Tensor, torch.nn.Parameter)


def plain_eager(x: Tensor) -> bool:
    """Whether x is a plain CPU tensor with memory, outside the compiler and any dispatch mode (fake tensors,
    tracing): then a kernel may be handed its memory directly, and an op's function called without the op."""
    return type(x) in PLAIN_TYPES and x.is_cpu and eager_mode()


def eager_mode() -> bool:
    """Outside the compiler and any dispatch mode."""
    return not torch.compiler.is_compiling() and _get_current_dispatch_mode() is None


def supports_scatter(y_TD: Tensor, rows_nD: Tensor) -> bool:
    """Whether `scatter_add_rows` takes these: CPU tensors, y float32 and contiguous, rows float32 or bfloat16."""
    return (
        y_TD.device.type == rows_nD.device.type == "cpu"
        and y_TD.dtype == torch.float32
        and y_TD.is_contiguous()
        and rows_nD.dtype in KERNEL_DTYPES
        and available()
    )


def scatter_add_rows(y_TD: Tensor, token_ids: Tensor, rows_nD: Tensor, weights: Optional[Tensor] = None) -> Tensor:
    """y[token_ids[r]] += weights[r] * rows[r] for every row r, in place and in float32 (weights None: 1);
    y [T, D] float32 contiguous, rows [n, D] float32 or bfloat16, token_ids [n], weights [n]. Returns y."""
    if not supports_scatter(y_TD, rows_nD):
        raise ValueError(f"scatter_add_rows: y must be float32 and contiguous and rows float32 or bfloat16 on the CPU, "
                         f"got y {y_TD.dtype}, rows {rows_nD.dtype}")
    rows_nD, token_ids = rows_nD.contiguous(), token_ids.to(torch.int64).contiguous()
    n, D = rows_nD.shape
    if y_TD.dim() != 2 or y_TD.shape[1] != D or token_ids.shape != (n,):
        raise ValueError(f"scatter_add_rows: y {tuple(y_TD.shape)}, rows {tuple(rows_nD.shape)}, token_ids "
                         f"{tuple(token_ids.shape)} do not fit")
    if weights is not None:
        weights = weights.float().contiguous()
        if weights.shape != (n,):
            raise ValueError(f"scatter_add_rows: weights {tuple(weights.shape)} for {n} rows")
    status = _library().sparsemoe_scatter_add_rows(
        y_TD.data_ptr(), y_TD.shape[0], token_ids.data_ptr(), rows_nD.data_ptr(), int(rows_nD.dtype == torch.bfloat16),
        None if weights is None else weights.data_ptr(), n, D, torch.get_num_threads(),
    )  # fmt: skip
    if status == -2:
        raise ValueError("scatter_add_rows: a token id is outside [0, T)")
    return y_TD


_DECODE_ERRORS = {
    -1: (MemoryError, "out of memory"),
    -2: (ValueError, "a kept row's token id is outside [0, T)"),
    -3: (ValueError, "the offsets decrease or pass the number of rows"),
    -4: (ValueError, "an expert id is outside [0, E)"),
}


def check_status(status: int, function: str) -> None:
    """The C functions' status codes (0: done) as the Python error each stands for."""
    if status != 0:
        error, why = _DECODE_ERRORS[status]
        raise error(f"{function}: {why}")


def decode_mlp(
    x_TD: Tensor, token_ids: Tensor, weights: Tensor, offsets: Tensor, w_in: Tensor, w_out: Tensor, activation: str,
    h_keep: Optional[Tensor] = None,
) -> Tensor:
    """y [T, D] float32: the expert stage of a decode step in one call (see the module docstring).

    Check `supports` first; token_ids int64 and offsets int64 as a `DispatchPlan` holds them. h_keep: None,
    or a contiguous [N, I] tensor of x's dtype that receives the in-projection outputs of the kept rows (for
    a backward, `sparsemoe.ops.expert_backward`; in bfloat16 the activation then runs on h rounded to it).
    """
    kernel = typed_kernel("decode_mlp", w_in.dtype)
    if not x_TD.dtype == w_in.dtype == w_out.dtype:
        raise ValueError(f"decode_mlp: the input and both weights must share one dtype (float32 or bfloat16), "
                         f"got {x_TD.dtype}, {w_in.dtype} and {w_out.dtype}")
    if not (w_in.is_contiguous() and w_out.is_contiguous()):
        raise ValueError("decode_mlp: the expert weights must be contiguous")
    E, I, D = w_in.shape
    F = w_out.shape[2]
    N = token_ids.shape[0]
    if (x_TD.dim() != 2 or x_TD.shape[1] != D or w_out.shape[:2] != (E, D) or offsets.shape != (E,)
            or token_ids.shape != (N,) or weights.shape != (N,)):
        raise ValueError(f"decode_mlp: shapes x {tuple(x_TD.shape)}, token_ids {tuple(token_ids.shape)}, weights "
                         f"{tuple(weights.shape)}, offsets {tuple(offsets.shape)}, w_in {tuple(w_in.shape)}, "
                         f"w_out {tuple(w_out.shape)} do not fit")
    if token_ids.dtype != torch.int64 or offsets.dtype != torch.int64:
        raise ValueError(f"decode_mlp: token_ids and offsets must be int64, got {token_ids.dtype}, {offsets.dtype}")
    if h_keep is not None and (h_keep.shape != (N, I) or h_keep.dtype != x_TD.dtype or not h_keep.is_contiguous()):
        raise ValueError(f"decode_mlp: h_keep must be a contiguous [{N}, {I}] {x_TD.dtype} tensor, got "
                         f"{tuple(h_keep.shape)} {h_keep.dtype}")
    x_TD, token_ids, offsets = x_TD.contiguous(), token_ids.contiguous(), offsets.contiguous()
    weights = weights.float().contiguous()
    T = x_TD.shape[0]
    y_TD = x_TD.new_empty(T, D, dtype=torch.float32)
    status = kernel(
        x_TD.data_ptr(), token_ids.data_ptr(), weights.data_ptr(), N, offsets.data_ptr(), E, w_in.data_ptr(),
        w_out.data_ptr(), T, D, F, I, ACTIVATION_CODES[activation], y_TD.data_ptr(),
        None if h_keep is None else h_keep.data_ptr(), torch.get_num_threads(),
    )
    check_status(status, kernel.__name__)
    return y_TD


def decode_mlp_choices(
    x_TD: Tensor, expert_ids: Tensor, weights: Tensor, top_k: int, w_in: Tensor, w_out: Tensor, activation: str
) -> Tensor:
    """y [T, D] float32: `decode_mlp` from a router's top-k choices, expert_ids [T*K] int64 and weights [T*K]
    token-major (choice t*K + k belongs to token t), the rows grouped by expert inside the call instead of
    by a plan built in PyTorch. Check `supports` first."""
    kernel = typed_kernel("decode_mlp_choices", w_in.dtype)
    E, I, D = w_in.shape
    T = x_TD.shape[0]
    if (x_TD.dtype != w_in.dtype or w_out.dtype != w_in.dtype or x_TD.shape != (T, D) or w_out.shape[:2] != (E, D)
            or expert_ids.shape != (T * top_k,) or weights.shape != (T * top_k,) or expert_ids.dtype != torch.int64
            or not (w_in.is_contiguous() and w_out.is_contiguous())):
        raise ValueError(f"decode_mlp_choices: x {x_TD.dtype} {tuple(x_TD.shape)}, expert_ids {tuple(expert_ids.shape)} "
                         f"{expert_ids.dtype}, weights {tuple(weights.shape)}, top_k {top_k}, w_in {w_in.dtype} "
                         f"{tuple(w_in.shape)}, w_out {tuple(w_out.shape)} do not fit")  # fmt: skip
    x_TD, expert_ids, weights = x_TD.contiguous(), expert_ids.contiguous(), weights.float().contiguous()
    y_TD = x_TD.new_empty(T, D, dtype=torch.float32)
    status = kernel(x_TD.data_ptr(), expert_ids.data_ptr(), weights.data_ptr(), T, top_k, E, w_in.data_ptr(),
                    w_out.data_ptr(), D, w_out.shape[2], I, ACTIVATION_CODES[activation], y_TD.data_ptr(),
                    torch.get_num_threads())  # fmt: skip
    check_status(status, kernel.__name__)
    return y_TD


def supports_linear(x: Tensor, w: Tensor) -> bool:
    """Whether `grouped_linear` takes these: CPU tensors, weights float32 or bfloat16, stored contiguous as
    [E, O, K] or [E, K, O] (w given as its [E, O, K] view either way)."""
    return (
        x.device.type == "cpu"
        and w.device.type == "cpu"
        and w.dtype in KERNEL_DTYPES
        and w.dim() == 3
        and (w.is_contiguous() or w.transpose(1, 2).is_contiguous())
        and available()
    )


def grouped_linear(x_NK: Tensor, offsets: Tensor, w_EOK: Tensor) -> Tensor:
    """y [N, O] float32: y[r] = x[r] @ w[e]^T for the rows r of expert e (rows sorted by expert, expert e's
    rows [offsets[e - 1], offsets[e])); rows past offsets[-1] are zero. w_EOK is the [E, O, K] view of
    weights stored contiguous as [E, O, K] (nn.Linear's layout) or [E, K, O] (read in place). Check
    `supports_linear` first; x is taken as float32, offsets as int64."""
    E, O, K = w_EOK.shape
    kn = not w_EOK.is_contiguous()
    stored = w_EOK.transpose(1, 2) if kn else w_EOK
    x_NK = x_NK.float().contiguous()
    if x_NK.dim() != 2 or x_NK.shape[1] != K or offsets.shape != (E,) or not stored.is_contiguous():
        raise ValueError(f"grouped_linear: x {tuple(x_NK.shape)}, offsets {tuple(offsets.shape)} and w "
                         f"{tuple(w_EOK.shape)} stored contiguous as [E, O, K] or [E, K, O] expected to fit")  # fmt: skip
    offsets = offsets.to(torch.int64).contiguous()
    N = x_NK.shape[0]
    y_NO = x_NK.new_empty(N, O)
    kernel = typed_kernel("grouped_linear", stored.dtype)
    status = kernel(x_NK.data_ptr(), N, offsets.data_ptr(), E, stored.data_ptr(), O, K, int(kn), y_NO.data_ptr(),
                    torch.get_num_threads())  # fmt: skip
    check_status(status, kernel.__name__)
    return y_NO


def linear_many(x_nK: Tensor, weights: Sequence[Tensor], float_output: bool = False) -> list[Tensor]:
    """[x @ w.T for w in weights], each [n, O_w] in x's dtype (float32 with float_output), in one call:
    weights [O_w, K] contiguous, of x's dtype (float32 or bfloat16), CPU; sums in float32, each output
    rounded once. For a few rows n (the kernel streams each weight row once against all n); no autograd."""
    n, K = x_nK.shape
    dtype = x_nK.dtype
    kernel = typed_kernel("linear_many", dtype)
    if any(w.dtype != dtype or w.dim() != 2 or w.shape[1] != K or not w.is_contiguous() for w in weights):
        raise ValueError(f"linear_many: weights [O, K={K}] contiguous of x's dtype {dtype} expected, got "
                         + ", ".join(f"{tuple(w.shape)} {w.dtype}" for w in weights))  # fmt: skip
    x_nK = x_nK.contiguous()
    out_dtype = torch.float32 if float_output else dtype
    outs = [x_nK.new_empty(n, w.shape[0], dtype=out_dtype) for w in weights]
    J = len(weights)
    w_ptrs = (ctypes.c_void_p * J)(*[w.data_ptr() for w in weights])
    rows = (ctypes.c_int64 * J)(*[w.shape[0] for w in weights])
    y_ptrs = (ctypes.c_void_p * J)(*[y.data_ptr() for y in outs])
    half_in, half_out = int(dtype == torch.bfloat16), int(out_dtype == torch.bfloat16)
    status = kernel(x_nK.data_ptr(), half_in, n, K, J, w_ptrs, rows, y_ptrs, half_out, torch.get_num_threads())
    check_status(status, kernel.__name__)
    return outs


# The quantized decode kernel beats dequantizing the experts and running BLAS up to about this many rows
# per expert on average, by the activations' dtype and the scheme (past 8 rows per expert its int4 weights
# are unpacked once per block of weight rows and the float32 tiles run on them, and int8 weights are
# widened in the tiles). float32 activations: 64 (dequantizing to float32 costs more than the kernel up to
# 64 and beyond). bfloat16: the dequantized experts run on the CPU's bfloat16 dot products, and the kernel
# stops winning early; measured by mixtral-1k's prefill with int8 / int4 experts and the rest bfloat16, T
# tokens, 2 threads (kernel / dequantized, ms): int4 T=16 (4 rows) 70 / 81, T=32 (8 rows) 135 / 101; int8
# T=32 (8 rows) 89 / 104, T=64 (16 rows) 153 / 142, T=256 (64 rows) 572 / 335.
QUANT_KERNEL_MAX_ROWS = {torch.float32: {"int8": 64, "int4": 64}, torch.bfloat16: {"int8": 12, "int4": 6}}
QUANT_BITS = {"int8": 8, "int4": 4}


def supports_quantized(x: Tensor, data: Tensor) -> bool:
    """Whether `decode_mlp_quantized` takes an input x (float32 or bfloat16) and stored data on the CPU."""
    return x.device.type == "cpu" and data.device.type == "cpu" and x.dtype in KERNEL_DTYPES and available()


def padded_width(scheme: str, K: int, group: int) -> int:
    """Kp: the stored input width of a quantized weight (K rounded up to whole groups for int4)."""
    return K if scheme == "int8" else -(-K // group) * group


def stored_layout(scheme: str, E: int, O: int, K: int, group: int) -> tuple[torch.Size, torch.Size, torch.dtype, torch.dtype]:
    """(data shape, scale shape, data dtype, scale dtype) of an [E, O, K] weight stored as `scheme` (the
    layouts of `sparsemoe.quant.schemes`, which the kernels read); group: int4's group size (> 0)."""
    if scheme == "int8":
        return torch.Size((E, O, K)), torch.Size((E, O)), torch.int8, torch.float32
    Kp = padded_width(scheme, K, group)
    return torch.Size((E, O, Kp // 2)), torch.Size((E, O, Kp // group)), torch.uint8, torch.bfloat16


def _check_quantized(function: str, x_TD: Tensor, w_in: tuple[Tensor, Tensor], w_out: tuple[Tensor, Tensor], scheme: str,
                     group_size: int, hidden_dim: int) -> tuple[int, int, int]:
    """(bits, E, I) of quantized expert weights that fit x, or ValueError naming what does not."""
    bits = QUANT_BITS[scheme]
    if bits == 4 and group_size <= 0:
        raise ValueError(f"{function}: int4 needs a positive group size, got {group_size}")
    (in_data, in_scale), (out_data, out_scale) = w_in, w_out
    T, D = x_TD.shape
    E, I = in_data.shape[:2]
    F = hidden_dim
    stored_in, stored_out = stored_layout(scheme, E, I, D, group_size), stored_layout(scheme, E, D, F, group_size)
    if ((in_data.shape, in_scale.shape, in_data.dtype, in_scale.dtype) != stored_in
            or (out_data.shape, out_scale.shape, out_data.dtype, out_scale.dtype) != stored_out
            or x_TD.dtype not in KERNEL_DTYPES
            or not all(t.is_contiguous() for t in (in_data, in_scale, out_data, out_scale))):
        raise ValueError(f"{function}: x {x_TD.dtype} {tuple(x_TD.shape)}, w_in {tuple(in_data.shape)} / "
                         f"{tuple(in_scale.shape)}, w_out {tuple(out_data.shape)} / {tuple(out_scale.shape)} do not fit "
                         f"{scheme} weights with hidden width {F} and group size {group_size}, or the stored weights "
                         "are not contiguous")  # fmt: skip
    return bits, E, I


def decode_mlp_quantized(
    x_TD: Tensor, token_ids: Tensor, weights: Tensor, offsets: Tensor, w_in: tuple[Tensor, Tensor],
    w_out: tuple[Tensor, Tensor], scheme: str, group_size: int, hidden_dim: int, activation: str,
) -> Tensor:
    """y [T, D] float32: `decode_mlp` with quantized expert weights, each given as (data, scale) in the
    layouts of `sparsemoe.quant.schemes` (int8: data [E, O, K], scale [E, O]; int4: data [E, O, Kp / 2],
    scale [E, O, Kp / G] bfloat16); rows past offsets[-1] dropped. Check `supports_quantized` first."""
    bits, E, I = _check_quantized("decode_mlp_quantized", x_TD, w_in, w_out, scheme, group_size, hidden_dim)
    (in_data, in_scale), (out_data, out_scale) = w_in, w_out
    T, D = x_TD.shape
    N = token_ids.shape[0]
    if offsets.shape != (E,) or token_ids.shape != (N,) or weights.shape != (N,):
        raise ValueError(f"decode_mlp_quantized: offsets {tuple(offsets.shape)}, token_ids {tuple(token_ids.shape)} and "
                         f"weights {tuple(weights.shape)} do not fit {E} experts")  # fmt: skip
    if token_ids.dtype != torch.int64 or offsets.dtype != torch.int64:
        raise ValueError(f"decode_mlp_quantized: token_ids and offsets must be int64, got {token_ids.dtype}, {offsets.dtype}")
    x_TD, token_ids, offsets = x_TD.contiguous(), token_ids.contiguous(), offsets.contiguous()
    weights = weights.float().contiguous()
    y_TD = x_TD.new_empty(T, D, dtype=torch.float32)
    status = _library().sparsemoe_decode_mlp_quant(
        x_TD.data_ptr(), int(x_TD.dtype == torch.bfloat16), token_ids.data_ptr(), weights.data_ptr(), N,
        offsets.data_ptr(), E, in_data.data_ptr(), in_scale.data_ptr(), out_data.data_ptr(), out_scale.data_ptr(),
        bits, group_size, T, D, hidden_dim, I, ACTIVATION_CODES[activation], y_TD.data_ptr(), torch.get_num_threads(),
    )
    check_status(status, "sparsemoe_decode_mlp_quant")
    return y_TD


def decode_mlp_quantized_choices(
    x_TD: Tensor, expert_ids: Tensor, weights: Tensor, top_k: int, w_in: tuple[Tensor, Tensor],
    w_out: tuple[Tensor, Tensor], scheme: str, group_size: int, hidden_dim: int, activation: str,
) -> Tensor:
    """y [T, D] float32: `decode_mlp_quantized` from a router's top-k choices, expert_ids [T*K] int64 and weights
    [T*K] token-major, the rows grouped by expert inside the call (the plan's rows, in its order). Check
    `supports_quantized` first."""
    bits, E, I = _check_quantized("decode_mlp_quantized_choices", x_TD, w_in, w_out, scheme, group_size, hidden_dim)
    (in_data, in_scale), (out_data, out_scale) = w_in, w_out
    T, D = x_TD.shape
    if expert_ids.shape != (T * top_k,) or weights.shape != (T * top_k,) or expert_ids.dtype != torch.int64:
        raise ValueError(f"decode_mlp_quantized_choices: expert_ids {tuple(expert_ids.shape)} {expert_ids.dtype} and "
                         f"weights {tuple(weights.shape)} do not fit {T} tokens of top-{top_k} choices")  # fmt: skip
    x_TD, expert_ids, weights = x_TD.contiguous(), expert_ids.contiguous(), weights.float().contiguous()
    y_TD = x_TD.new_empty(T, D, dtype=torch.float32)
    status = _library().sparsemoe_decode_mlp_quant_choices(
        x_TD.data_ptr(), int(x_TD.dtype == torch.bfloat16), expert_ids.data_ptr(), weights.data_ptr(), T, top_k, E,
        in_data.data_ptr(), in_scale.data_ptr(), out_data.data_ptr(), out_scale.data_ptr(), bits, group_size, D,
        hidden_dim, I, ACTIVATION_CODES[activation], y_TD.data_ptr(), torch.get_num_threads(),
    )
    check_status(status, "sparsemoe_decode_mlp_quant_choices")
    return y_TD


# Activation columns per int8 scale against int8 weights on the VNNI path (int4: the weights' group size).
INT8_ACTIVATION_GROUP = 64


def activations_int8() -> bool:
    """Whether quantized experts (int8, and int4 with a group size that is a multiple of 64) run, at up to 8
    rows per expert, against activations rounded to int8 per group (VNNI integer dot products, as llama.cpp's
    formats do; built where the CPU has AVX-512 VNNI). The float path computes dequantize-then-matmul to float
    rounding; this one also rounds each activation group to 255 levels (`quantize_activations`)."""
    return available() and bool(_library().sparsemoe_vnni_activations_int8())


def bfloat16_dot_products() -> bool:
    """Whether bfloat16 weights at up to 8 rows per weight (the decode kernel's experts, `linear_many`) run on
    the CPU's bfloat16 pair dot products (AVX512-BF16: products exact, float32 sums in pairs, bfloat16
    denormals read as zero), the decode kernel then rounding act(h) to bfloat16 for the out-projection;
    otherwise the weights are widened to float32 and act(h) stays float32."""
    return available() and bool(_library().sparsemoe_bfloat16_dot_products())


def quantize_activations(x_nK: Tensor, group_size: int) -> Tensor:
    """What the VNNI path computes with instead of x [n, K] (K a multiple of the group size): each group of
    `group_size` columns rounded to int8 with the scale max|x| / 127 (round half to even), dequantized.
    A reference for tests."""
    n, K = x_nK.shape
    groups = x_nK.float().reshape(n, K // group_size, group_size)
    amax = groups.abs().amax(dim=2, keepdim=True)
    inv = torch.where(amax > 0, torch.tensor(127.0) / amax, torch.zeros_like(amax))
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    return (torch.round(groups * inv) * scale).reshape(n, K)


def supports_dequantize(data: Tensor, dtype: torch.dtype) -> bool:
    """Whether `dequantize` takes stored data on the CPU, to float32 or bfloat16."""
    return data.device.type == "cpu" and dtype in KERNEL_DTYPES and available()


def dequantize(data: Tensor, scale: Tensor, scheme: str, group_size: int, K: int, dtype: torch.dtype,
               out: Optional[Tensor] = None) -> Tensor:
    """The float weight [..., O, K] in `dtype` (float32 or bfloat16) that stored (data, scale) stand for
    (`sparsemoe.quant.schemes.dequantize_weight`, computed by the native kernel in one pass), written into
    `out` (contiguous, of that shape and dtype) when given."""
    bits = QUANT_BITS[scheme]
    data, scale = data.contiguous(), scale.contiguous()
    rows = math.prod(data.shape[:-1])
    Kp = data.shape[-1] * (2 if bits == 4 else 1)
    shape = (*data.shape[:-1], K)
    if out is None:
        out = torch.empty(shape, dtype=dtype)
    elif tuple(out.shape) != shape or out.dtype != dtype or not out.is_contiguous():
        raise ValueError(f"dequantize: out must be a contiguous {dtype} tensor of shape {shape}")
    status = _library().sparsemoe_dequantize(
        data.data_ptr(), scale.data_ptr(), bits, rows, K, Kp, group_size, out.data_ptr(),
        int(dtype == torch.bfloat16), torch.get_num_threads(),
    )
    check_status(status, "sparsemoe_dequantize")
    return out
