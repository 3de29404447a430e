"""Native CPU kernels: built on first use with the system C compiler, cached on disk, called through ctypes.

Legend: N rows sorted by expert, E experts, D model width, F hidden width, I in-projection rows (2F gated).

    decode_mlp_f32(x_ND, bounds [E + 1], w_in [E, I, D], w_out [E, D, F], activation) -> o_ND [N, D]
    o[r] = w_out[e] @ act(w_in[e] @ x[r]) for the rows r in [bounds[e], bounds[e + 1])

Why: with a few rows per expert (decoding) the expert GEMMs are bounded by reading the weights, and BLAS
GEMMs on 1-16 rows run several times below that bound (`sparsemoe bench` reports the fraction). The C
source (`csrc/decode_mlp.c`) streams each weight row once and runs the whole expert stage in one call,
with OpenMP threads sharing the weight rows.

The library is compiled once per source, compiler and CPU into the cache folder (`SPARSEMOE_CACHE_DIR`,
else `$XDG_CACHE_HOME/sparsemoe`, else `~/.cache/sparsemoe`) with `-O3 -march=native -fopenmp`, falling
back to plainer flags when the compiler refuses them. Set `SPARSEMOE_CPU_KERNELS=0` to turn it off;
without a C compiler (`$CC`, `cc`, `gcc` or `clang`), or if the build fails, `available()` is False and
the callers keep their BLAS path. Nothing is downloaded.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "decode_mlp.c"
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
    source = SOURCE.read_bytes()
    key = hashlib.sha256(
        b"\0".join(
            [source, compiler.encode(), _compiler_version(compiler).encode(), " ".join(flags).encode(),
             _cpu_identity().encode(), platform.machine().encode()]
        )
    ).hexdigest()[:20]
    path = out_dir / f"decode_mlp-{key}.so"
    if path.exists():
        return path
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
    os.close(fd)
    try:
        cmd = [compiler, *flags, *_COMMON_FLAGS, str(SOURCE), "-o", tmp, "-lm"]
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
    fn = lib.sparsemoe_decode_mlp_f32
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    fn.argtypes = [p, p, i64, p, p, i64, i64, i64, ctypes.c_int, p, p, p, ctypes.c_int]
    fn.restype = ctypes.c_int
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
    for flags in FLAG_SETS:
        try:
            return _bind(build(compiler, cache_dir(), flags))
        except (RuntimeError, OSError, subprocess.SubprocessError) as err:
            log.info("sparsemoe CPU kernels: build with %s failed: %s", " ".join(flags), err)
    log.warning("sparsemoe CPU kernels could not be built; using BLAS (set %s=0 to skip trying)", ENV_SWITCH)
    return None


@torch.compiler.assume_constant_result  # a host-side fact: torch.compile reads it once, never traces the build
def available() -> bool:
    """Whether the kernels are built and loaded (building them on the first call)."""
    return load() is not None


def supports(x: Tensor, w_in: Tensor, w_out: Tensor, activation: str) -> bool:
    """Whether `decode_mlp_f32` takes these inputs: float32 CPU tensors, contiguous weights, a known activation."""
    return (
        x.device.type == "cpu"
        and all(t.dtype == torch.float32 for t in (x, w_in, w_out))
        and w_in.is_contiguous()
        and w_out.is_contiguous()
        and activation in ACTIVATION_CODES
        and available()
    )


def decode_mlp_f32(x_ND: Tensor, bounds: Tensor, w_in: Tensor, w_out: Tensor, activation: str) -> Tensor:
    """o [N, D]: each row through its expert's MLP (see the module docstring). Check `supports` first."""
    lib = load()
    if lib is None:
        raise RuntimeError(f"sparsemoe CPU kernels are not available (C compiler, or {ENV_SWITCH}=0)")
    E, I, D = w_in.shape
    F = w_out.shape[2]
    x_ND = x_ND.contiguous()
    bounds = bounds.to(torch.int64).contiguous()
    if bounds.shape != (E + 1,) or x_ND.shape[1] != D or w_out.shape[:2] != (E, D):
        raise ValueError(f"decode_mlp_f32: shapes x {tuple(x_ND.shape)}, bounds {tuple(bounds.shape)}, "
                         f"w_in {tuple(w_in.shape)}, w_out {tuple(w_out.shape)} do not fit")
    N = x_ND.shape[0]
    if int(bounds[-1]) != N:  # host read: free on the CPU
        raise ValueError(f"decode_mlp_f32: bounds end at {int(bounds[-1])}, x has {N} rows")
    h_NI = x_ND.new_empty(N, I)
    a_NF = x_ND.new_empty(N, F)
    o_ND = x_ND.new_empty(N, D)
    status = lib.sparsemoe_decode_mlp_f32(
        x_ND.data_ptr(), bounds.data_ptr(), E, w_in.data_ptr(), w_out.data_ptr(), D, F, I,
        ACTIVATION_CODES[activation], h_NI.data_ptr(), a_NF.data_ptr(), o_ND.data_ptr(), torch.get_num_threads(),
    )
    if status != 0:
        raise MemoryError("sparsemoe_decode_mlp_f32: out of memory")
    return o_ND
