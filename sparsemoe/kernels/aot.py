"""Ahead-of-time compilation of the kernels for a GPU target, on any machine: no GPU needed.

Triton lowers a kernel for a named target (here sm_90, the H100/H200) with the `ptxas` it bundles, and
the resulting cubin already answers questions that otherwise cost GPU time: does the kernel compile at
all (the interpreter accepts far more), does its main loop use Hopper's tensor-core instructions
(`HGMMA` in the machine code) fed by asynchronous copies, and does a block-size config fit in registers
(a stack frame means spills to local memory) and shared memory. The tests compile every kernel this way;
`python tools/kernel_audit.py` reports every autotuning config.

A launch specialises what it sees: integer arguments equal to 1 become constants, and pointers and
integers divisible by 16 are marked so. The specs here do the same as a launch on contiguous tensors
whose widths are multiples of 16 (the case that matters for speed): unit strides are given as
constants, the other strides and widths as multiples of 16. Which axis is contiguous decides whether
loads are vectorised, so a spec that got it wrong would audit different machine code.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass, field

import triton

from sparsemoe.kernels import expert_mm, router

HOPPER = 90  # compute capability of the H100 and H200
HOPPER_SHARED_BYTES = 227 * 1024  # the most shared memory one program (thread block) may have on sm_90
# Integer arguments that are widths or strides (divisible by 16 on the fast path); others (counts) are not.
_ALIGNED_INTS = ("K_DIM", "N_OUT", "O_DIM", "I_DIM")


@dataclass(frozen=True)
class KernelSpec:
    """One specialisation of a kernel: its pointer element types and its compile-time constants."""

    kernel: str  # function name in sparsemoe.kernels.expert_mm or .router
    pointers: dict = field(default_factory=dict)  # argument -> Triton type ("bf16", "fp32"); others i64/i32
    constexprs: dict = field(default_factory=dict)

    def jit_function(self) -> triton.runtime.jit.JITFunction:
        fn = getattr(expert_mm, self.kernel, None) or getattr(router, self.kernel)
        while not isinstance(fn, triton.runtime.jit.JITFunction):  # unwrap autotune / heuristics
            fn = fn.fn
        return fn


def compile_for_target(spec: KernelSpec, num_warps: int = 4, num_stages: int = 3, capability: int = HOPPER):
    """Triton's CompiledKernel of `spec` for CUDA compute capability `capability` (cubin included)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = spec.jit_function()
    signature, attrs = {}, {}
    for index, arg in enumerate(fn.arg_names):
        if arg in spec.constexprs:
            signature[arg] = "constexpr"
            continue
        if arg in spec.pointers:
            kind = spec.pointers[arg]
            signature[arg] = kind if not arg.endswith("_ptr") else "*" + kind
        else:
            signature[arg] = "*i64" if arg.endswith("_ptr") else "i32"
        if arg.endswith("_ptr") or arg.startswith("stride") or arg in _ALIGNED_INTS:
            attrs[(index,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn, signature, constexprs=spec.constexprs, attrs=attrs)
    target = GPUTarget("cuda", capability, 32)
    return triton.compile(source, target=target, options={"num_warps": num_warps, "num_stages": num_stages})


def compile_config(spec: KernelSpec, config: triton.Config, capability: int = HOPPER):
    """`compile_for_target` with an autotuning config's block sizes, warps and stages."""
    full = KernelSpec(spec.kernel, spec.pointers, {**spec.constexprs, **config.kwargs})
    return compile_for_target(full, config.num_warps, config.num_stages, capability)


def cuobjdump_path() -> str:
    """The cuobjdump that Triton's CUDA backend ships (RuntimeError if this build has none)."""
    import triton.backends.nvidia as nvidia

    path = os.path.join(os.path.dirname(nvidia.__file__), "bin", "cuobjdump")
    if not os.path.exists(path):
        raise RuntimeError(f"this Triton build has no cuobjdump at {path}")
    return path


# Machine-code instructions worth counting: tensor-core MMAs (Hopper's warpgroup HGMMA, the older warp
# HMMA), asynchronous global->shared copies (LDGSTS) and TMA loads (UTMALDG), local-memory traffic
# (LDL/STL: spills), and global atomics/reductions.
_INSTRUCTIONS = ("HGMMA", "HMMA", "LDGSTS", "UTMALDG", "LDL", "STL", "REDG", "RED", "ATOMG")


@dataclass(frozen=True)
class Resources:
    registers: int  # per thread (255 is the hardware limit)
    stack_bytes: int  # per thread; > 0 with LDL/STL means registers spilled to local memory
    shared_bytes: int  # dynamic shared memory per program (the pipeline's buffers)
    instructions: dict  # name -> count in the machine code, for _INSTRUCTIONS

    @property
    def spills(self) -> bool:
        return self.stack_bytes > 0 and (self.instructions.get("LDL", 0) + self.instructions.get("STL", 0)) > 0


def resources(compiled) -> Resources:
    """Registers, stack, shared memory and instruction counts of a compiled kernel's cubin."""
    tool = cuobjdump_path()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as fh:
            fh.write(compiled.asm["cubin"])
        usage = subprocess.run([tool, "-res-usage", path], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([tool, "-sass", path], capture_output=True, text=True, check=True).stdout
    match = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    if match is None:
        raise RuntimeError(f"cannot read the resource usage from cuobjdump:\n{usage[:500]}")
    opcodes = re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", sass)
    counts = {name: 0 for name in _INSTRUCTIONS}
    for op in opcodes:
        if op in counts:
            counts[op] += 1
    return Resources(int(match.group(1)), int(match.group(2)), int(compiled.metadata.shared), counts)


def autotuned_kernels(dtype: str) -> list[tuple[str, KernelSpec, list]]:
    """(label, spec without block sizes, the autotuning configs) as the launchers call each kernel.

    Unit strides are given as constants, as a launch specialises them: the contiguous axis of each
    weight decides whether its loads are vectorised, so it must be the real one.
    """
    d, prec = dtype, "tf32"
    up_ptrs = dict(x_ptr=d, w_ptr=d, h_ptr=d, a_ptr=d)
    up_consts = dict(ACT=1, GATED=True, PRECISION=prec, BLOCK_E=8, EVEN_K=True, stride_wk=1)
    up_train = KernelSpec("_up_kernel", up_ptrs, dict(up_consts, STORE_H=True))
    up_inference = KernelSpec("_up_kernel", up_ptrs, dict(up_consts, STORE_H=False))
    scatter = dict(a_ptr=d, w_ptr=d, scale_ptr="fp32", y_ptr="fp32")
    return [
        ("up swiglu (train)", up_train, expert_mm._DUAL_CONFIGS),
        ("up swiglu (inference)", up_inference, expert_mm._DUAL_CONFIGS),
        # y += s * a @ w_out[e]^T: w_out [E, D, F] read along F (its rows)
        ("scatter (down proj)", KernelSpec("_scatter_kernel", scatter,
         dict(HAS_SCALE=True, PRECISION=prec, BLOCK_E=8, EVEN_K=True, stride_wk=1)), expert_mm._ROW_CONFIGS),
        # dx += dh @ w_in[e]: w_in [E, 2F, D] read along D (across its rows)
        ("scatter (input grad)", KernelSpec("_scatter_kernel", scatter,
         dict(HAS_SCALE=False, PRECISION=prec, BLOCK_E=8, EVEN_K=True, stride_wn=1)), expert_mm._ROW_CONFIGS),
        ("down backward swiglu", KernelSpec("_down_bwd_kernel", dict(dy_ptr="fp32", w_ptr=d, scale_ptr="fp32", h_ptr=d,
         a_ptr=d, dh_ptr=d, dscale_ptr="fp32"), dict(ACT=1, GATED=True, PRECISION=prec, BLOCK_E=8, EVEN_K=True,
         stride_wn=1)), expert_mm._DOWN_BWD_CONFIGS),
        ("wgrad w_out (gather dy)", KernelSpec("_wgrad_kernel", dict(g_ptr="fp32", x_ptr=d, scale_ptr="fp32", dw_ptr=d),
         dict(GATHER_G=True, GATHER_X=False, HAS_SCALE=True, PRECISION=prec)), expert_mm._WGRAD_CONFIGS),
        ("wgrad w_in (gather x)", KernelSpec("_wgrad_kernel", dict(g_ptr=d, x_ptr=d, scale_ptr="fp32", dw_ptr=d),
         dict(GATHER_G=False, GATHER_X=True, HAS_SCALE=False, PRECISION=prec)), expert_mm._WGRAD_CONFIGS),
    ]  # fmt: skip
