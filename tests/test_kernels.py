"""Triton kernels: the interpreter suite (run in its own process), the router backward, the backend's
availability rules, and GPU-only checks of the compiled kernels (marked `gpu`, skipped without CUDA).

Why a subprocess: Triton chooses compiled or interpreted kernels when they are defined, i.e. when
`sparsemoe` is first imported, and other test modules import it long before this one runs. The
interpreter cases live in tests/test_kernels_interp.py and run here under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton", reason="Triton is not installed")

from sparsemoe import MoE, MoEConfig, kernels  # noqa: E402
from sparsemoe.dispatch import build_plan, resolve_backend  # noqa: E402
from sparsemoe.dispatch import triton_backend as tb  # noqa: E402
from sparsemoe.routing import token_choice  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.skipif(kernels.INTERPRET, reason="this process already interprets; test_kernels_interp.py runs directly")
def test_interpreter_suite_in_a_subprocess(request):
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(ROOT / "tests" / "test_kernels_interp.py")]
    markers = request.config.getoption("markexpr")
    if markers:  # e.g. -m "not slow" applies inside too
        cmd += ["-m", markers]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    report = (done.stdout + done.stderr)[-6000:]
    assert done.returncode == 0, f"interpreter suite failed:\n{report}"
    assert " passed" in report and " skipped" not in report.splitlines()[-1], report


# --- pure PyTorch pieces (no kernel launch) -------------------------------------------------------------------


@pytest.mark.parametrize("mode,renormalize", [(0, True), (0, False), (1, True), (1, False), (2, True)])
def test_router_backward_formula_matches_autograd(mode, renormalize):
    torch.manual_seed(mode)
    T, E, K = 9, 7, 3
    logits = torch.randn(T, E, dtype=torch.float64, requires_grad=True)
    ids, weights = tb._topk_torch(logits, None, K, mode, renormalize, 1.7)
    dweights = torch.randn_like(weights)
    (want,) = torch.autograd.grad(weights, logits, dweights)
    got = tb.router_weights_backward(logits.detach(), ids, dweights, mode, renormalize, 1.7)
    torch.testing.assert_close(got, want)


def test_fused_topk_matches_token_choice_where_the_kernel_cannot_run():
    cfg = MoEConfig(dim=8, num_experts=6, top_k=2, score_func="sigmoid", bias_balancing=True)
    logits, bias = torch.randn(5, 6), torch.randn(6)
    if tb.available(logits):
        pytest.skip("the kernel runs here; the interpreter suite covers it")
    want = token_choice(logits, cfg, training=False, bias_E=bias)
    ids, weights = tb.fused_topk(logits, 2, "sigmoid", bias_E=bias)
    torch.testing.assert_close(ids.reshape(-1), want.expert_ids)
    torch.testing.assert_close(weights.reshape(-1), want.weights)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(top_k=0), "top_k=0 is invalid"),
        (dict(top_k=2, score_func="sigmoid", score_order="after_topk"), "not supported"),
        (dict(top_k=2, bias_E=torch.zeros(3)), r"bias_E must have shape \[6\]"),
    ],
)
def test_fused_topk_rejects_bad_arguments_clearly(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tb.fused_topk(torch.randn(4, 6), **kwargs)


@pytest.mark.skipif(kernels.INTERPRET, reason="under the interpreter the CPU is claimed on purpose")
def test_cpu_tensors_are_not_claimed_without_the_interpreter():
    model = MoE(MoEConfig(dim=8, num_experts=4, top_k=2))
    x = torch.randn(5, 8)
    plan = build_plan(model.router.route(model.router.logits(x)), None)
    assert not tb.available(x)
    assert resolve_backend("auto", x, plan).name != "triton"
    with pytest.raises(ValueError, match="'triton' cannot run on cpu"):
        resolve_backend("triton", x, plan)


def test_autotune_pruning_keeps_small_row_blocks_for_decode_batches():
    from triton import Config

    from sparsemoe.kernels._common import prune_row_blocks

    cands = [Config({"BLOCK_M": m}) for m in (16, 32, 64, 128)]
    small = prune_row_blocks(cands, {"N_BUCKET": 16, "E": 8})  # 2 rows per expert
    assert [c.kwargs["BLOCK_M"] for c in small] == [16]
    large = prune_row_blocks(cands, {"N_BUCKET": 32768, "E": 8})
    assert [c.kwargs["BLOCK_M"] for c in large] == [16, 32, 64, 128]
    assert [c.kwargs["BLOCK_M"] for c in prune_row_blocks(cands[1:], {"N_BUCKET": 1, "E": 8})] == [32]


def test_every_pruned_config_list_keeps_one_that_fits_any_gpu():
    """Autotuning skips configs that overflow shared memory, but it needs one that fits: float32 with
    the gated kernel's two weight tiles is the largest case (the small config needs ~36 KB on sm_90)."""
    from sparsemoe.kernels._common import prune_row_blocks
    from sparsemoe.kernels.expert_mm import _DOWN_BWD_CONFIGS, _DUAL_CONFIGS, _ROW_CONFIGS

    def fits(c):  # bytes of one stage of A + two W tiles in float32, times the stages
        k = c.kwargs
        return (k["BLOCK_M"] * k["BLOCK_K"] + 2 * k["BLOCK_K"] * k["BLOCK_N"]) * 4 * c.num_stages <= 96 * 1024

    for candidates in (_ROW_CONFIGS, _DUAL_CONFIGS, _DOWN_BWD_CONFIGS):
        for bucket in (1, 64, 4096, 1 << 20):
            assert any(fits(c) for c in prune_row_blocks(candidates, {"N_BUCKET": bucket, "E": 128})), bucket


def test_autotuned_winners_are_kept_on_disk_where_triton_can():
    import inspect

    import triton

    from sparsemoe.kernels import expert_mm

    supported = "cache_results" in inspect.signature(triton.autotune).parameters
    for kernel in (expert_mm._up_kernel, expert_mm._scatter_kernel, expert_mm._down_bwd_kernel, expert_mm._wgrad_kernel):
        assert getattr(kernel, "cache_results", False) == supported


@pytest.mark.skipif(kernels.INTERPRET, reason="the interpreter always runs its one small config")
def test_autotuning_can_be_switched_off_for_one_mid_sized_tile_per_kernel():
    code = (
        "from sparsemoe.kernels import expert_mm as m\n"
        "for k in (m._up_kernel, m._scatter_kernel, m._down_bwd_kernel, m._wgrad_kernel):\n"
        "    print(len(k.configs), sorted(k.configs[0].kwargs.items()), k.configs[0].num_warps)\n"
    )
    env = {**os.environ, "SPARSEMOE_TRITON_AUTOTUNE": "0"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 4 and all(line.startswith("1 ") for line in lines), lines
    assert "('BLOCK_M', 64), ('BLOCK_N', 64)" in lines[0] and "('BLOCK_O', 64)" in lines[3]


def test_unsupported_activation_is_named():
    with pytest.raises(ValueError, match="activation 'tanh' is not supported"):
        kernels.up_projection(torch.randn(2, 4), torch.randn(1, 4, 4), torch.zeros(2, dtype=torch.long), torch.tensor([2]), "tanh", False)


# --- ahead-of-time compilation for a GPU target (no GPU needed) --------------------------------------------------

_ROW = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8)
_AOT_CASES = {
    # kernel: (pointer types, constexprs); bf16 activations, fp32 outputs of the atomics and of dy. Unit
    # strides are constants, as a launch on contiguous weights specialises them (see sparsemoe.kernels.aot).
    "up-swiglu": ("_up_kernel", dict(x_ptr="bf16", w_ptr="bf16", h_ptr="bf16", a_ptr="bf16"),
                  dict(ACT=1, GATED=True, STORE_H=True, PRECISION="tf32", BLOCK_E=8, EVEN_K=True, stride_wk=1, **_ROW)),
    "up-gelu-fp32": ("_up_kernel", dict(x_ptr="fp32", w_ptr="fp32", h_ptr="fp32", a_ptr="fp32"),
                     dict(ACT=4, GATED=False, STORE_H=False, PRECISION="ieee", BLOCK_E=128, EVEN_K=False, stride_wk=1, **_ROW)),
    "scatter": ("_scatter_kernel", dict(a_ptr="bf16", w_ptr="bf16", scale_ptr="fp32", y_ptr="fp32"),
                dict(HAS_SCALE=True, PRECISION="tf32", BLOCK_E=8, EVEN_K=True, stride_wk=1, **_ROW)),
    "scatter-input-grad": ("_scatter_kernel", dict(a_ptr="bf16", w_ptr="bf16", scale_ptr="bf16", y_ptr="fp32"),
                           dict(HAS_SCALE=False, PRECISION="tf32", BLOCK_E=8, EVEN_K=False, stride_wn=1, **_ROW)),
    "down-bwd-geglu": ("_down_bwd_kernel", dict(dy_ptr="fp32", w_ptr="bf16", scale_ptr="fp32", h_ptr="bf16", a_ptr="bf16", dh_ptr="bf16", dscale_ptr="fp32"),
                       dict(ACT=2, GATED=True, PRECISION="tf32", BLOCK_E=8, EVEN_K=False, stride_wn=1, **_ROW)),
    "wgrad": ("_wgrad_kernel", dict(g_ptr="fp32", x_ptr="bf16", scale_ptr="fp32", dw_ptr="bf16"),
              dict(GATHER_G=True, GATHER_X=True, HAS_SCALE=True, PRECISION="tf32", BLOCK_O=64, BLOCK_I=64, BLOCK_R=32)),
    "router": ("_router_kernel", dict(logits_ptr="fp32", bias_ptr="fp32", weights_ptr="fp32", route_scale="fp32"),
               dict(K=8, SCORE=1, RENORM=True, HAS_BIAS=True, BLOCK_T=4, BLOCK_E=128, BLOCK_K=8)),
}  # fmt: skip


def _compile_or_skip(compile_fn):
    try:
        return compile_fn()
    except RuntimeError as err:  # no CUDA backend / ptxas in this Triton build
        if "ptxas" in str(err) or "backend" in str(err).lower():
            pytest.skip(f"this Triton cannot compile for CUDA here: {err}")
        raise


@pytest.mark.skipif(kernels.INTERPRET, reason="the interpreter defines no compilable kernels")
@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")
@pytest.mark.parametrize("case", sorted(_AOT_CASES))
def test_kernels_compile_for_an_h100_without_one(case):
    """Type-check and lower each kernel to a cubin for an sm_90 (H100) target with Triton's bundled
    ptxas, so a kernel that only the interpreter accepts (it is far more permissive: it let a plain
    float global through) fails here rather than on a GPU. About a second per kernel, then cached."""
    from sparsemoe.kernels.aot import KernelSpec, compile_for_target

    name, pointers, constexprs = _AOT_CASES[case]
    spec = KernelSpec(name, pointers, constexprs)
    compiled = _compile_or_skip(lambda: compile_for_target(spec, num_warps=4, num_stages=3))
    assert compiled.asm.get("cubin")
    if name != "_router_kernel":  # the GEMM main loops are pipelined (cp.async into shared memory)
        assert "async_copy_global_to_local" in compiled.asm["ttgir"]
        # ... into Hopper's warpgroup MMAs, except exact float32 (PRECISION="ieee"), which has no tensor-core form
        assert ("wgmma.mma_async" in compiled.asm["ptx"]) == (constexprs["PRECISION"] != "ieee")


@pytest.mark.slow
@pytest.mark.skipif(kernels.INTERPRET, reason="the interpreter defines no compilable kernels")
@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")
def test_no_bfloat16_autotuning_config_spills_registers_on_hopper():
    """Every config the autotuner may try compiles for sm_90 in bfloat16 without spilling registers to
    local memory, within Hopper's shared memory, and tiles of 64+ rows use the warpgroup tensor-core
    instructions (HGMMA). A spilling config costs autotuning time on the GPU and cannot win. (About 40 s:
    every kernel with every config; `python tools/kernel_audit.py` prints the table.)"""
    from sparsemoe.kernels.aot import HOPPER_SHARED_BYTES, autotuned_kernels, compile_config, cuobjdump_path, resources

    try:
        cuobjdump_path()
    except RuntimeError as err:
        pytest.skip(str(err))
    problems = []
    for label, spec, configs in autotuned_kernels("bf16"):
        for config in configs:
            res = resources(_compile_or_skip(lambda: compile_config(spec, config)))  # noqa: B023 - called at once
            blocks = config.kwargs
            name = f"{label} {blocks} warps={config.num_warps} stages={config.num_stages}"
            if res.spills:
                problems.append(f"{name}: spills ({res.registers} registers, {res.stack_bytes} B stack)")
            if res.shared_bytes > HOPPER_SHARED_BYTES:
                problems.append(f"{name}: {res.shared_bytes} B of shared memory")
            if blocks.get("BLOCK_M", blocks.get("BLOCK_O", 0)) >= 64 and res.instructions["HGMMA"] == 0:
                problems.append(f"{name}: no HGMMA")
    assert not problems, "\n".join(problems)


# --- GPU: the compiled kernels ----------------------------------------------------------------------------------


def _cuda_pair(cfg: MoEConfig, dtype: torch.dtype, oracle: str = "grouped") -> tuple[MoE, MoE]:
    torch.manual_seed(0)
    ref = MoE(MoEConfig(**{**cfg.to_dict(), "backend": oracle}), device="cuda", dtype=dtype)
    tri = MoE(MoEConfig(**{**cfg.to_dict(), "backend": "triton"}), device="cuda", dtype=dtype)
    tri.load_state_dict(ref.state_dict())
    return ref, tri


def _grads(model: MoE, x: torch.Tensor, g: torch.Tensor) -> dict[str, torch.Tensor]:
    x = x.detach().clone().requires_grad_()
    model.zero_grad(set_to_none=True)
    y = model(x)
    (y.float() * g).sum().backward()
    out = {"y": y.float(), "x": x.grad.float()}
    out.update({n.removeprefix("_orig_mod."): p.grad.float() for n, p in model.named_parameters()})
    return out


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_gpu_layer_matches_grouped(dtype, tol, activation):
    cfg = MoEConfig(dim=200, hidden_dim=336, num_experts=8, top_k=2, activation=activation, aux_loss_coef=0.0)
    ref, tri = _cuda_pair(cfg, dtype)
    x, g = torch.randn(3, 171, 200, device="cuda", dtype=dtype), torch.randn(3, 171, 200, device="cuda")
    want, got = _grads(ref, x, g), _grads(tri, x, g)
    for name in want:
        err = (got[name] - want[name]).abs().max() / want[name].abs().max().clamp_min(1e-6)
        assert err < tol, f"{name}: relative error {err:.2e}"


@pytest.mark.gpu
@needs_cuda
def test_gpu_layer_matches_reference_with_drops_and_empty_experts():
    # E=64 experts for 20 tokens: most experts are empty; capacity drops some of the rest.
    cfg = MoEConfig(dim=96, hidden_dim=80, num_experts=64, top_k=4, capacity_factor=1.0, aux_loss_coef=0.0)
    ref, tri = _cuda_pair(cfg, torch.float32, oracle="reference")
    x, g = torch.randn(20, 96, device="cuda"), torch.randn(20, 96, device="cuda")
    want, got = _grads(ref, x, g), _grads(tri, x, g)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-4, rtol=1e-3, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("score_func,score_order", [("softmax", "before_topk"), ("sigmoid", "before_topk"), ("softmax", "after_topk")])
def test_gpu_fused_router_matches_token_choice(score_func, score_order):
    cfg = MoEConfig(dim=8, num_experts=128, top_k=8, score_func=score_func, score_order=score_order)
    logits = torch.randn(300, 128, device="cuda", requires_grad=True)
    want = token_choice(logits, cfg, training=False, bias_E=None)
    lg = logits.detach().clone().requires_grad_()
    ids, weights = tb.fused_topk(lg, 8, score_func, score_order)
    torch.testing.assert_close(ids.reshape(-1), want.expert_ids)
    torch.testing.assert_close(weights.reshape(-1), want.weights)
    dw = torch.randn(300 * 8, device="cuda")
    (weights.reshape(-1) * dw).sum().backward()
    (want.weights * dw).sum().backward()
    torch.testing.assert_close(lg.grad, logits.grad, atol=1e-6, rtol=1e-5)


@pytest.mark.gpu
@needs_cuda
def test_gpu_dropless_path_never_syncs_and_captures_in_a_cuda_graph():
    torch.manual_seed(0)
    model = MoE(MoEConfig(dim=128, hidden_dim=256, num_experts=8, top_k=2), device="cuda", dtype=torch.bfloat16)
    x = torch.randn(64, 128, device="cuda", dtype=torch.bfloat16)
    plan = build_plan(model.router.route(model.router.logits(x)), None)
    with torch.no_grad():
        eager = tb.triton_forward(x, plan, model.experts)  # also runs the autotuner (it syncs) before capture
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            tb.triton_forward(x, plan, model.experts)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = tb.triton_forward(x, plan, model.experts)
        graph.replay()
        torch.cuda.synchronize()
    torch.testing.assert_close(captured, eager)


@pytest.mark.gpu
@needs_cuda
def test_gpu_whole_layer_forward_never_syncs_and_captures_in_a_cuda_graph():
    """The layer as a user calls it (router, fused top-k, plan, kernels, stats, finite check), eval mode."""
    torch.manual_seed(0)
    cfg = MoEConfig(dim=128, hidden_dim=256, num_experts=8, top_k=2, backend="triton")
    model = MoE(cfg, device="cuda", dtype=torch.bfloat16).eval()
    x = torch.randn(4, 16, 128, device="cuda", dtype=torch.bfloat16)
    static_x = torch.zeros_like(x)
    with torch.no_grad():
        eager = model(x)  # the autotuner benchmarks (and syncs) the first time it sees these shapes
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            model(x)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = model(static_x)
        static_x.copy_(x)
        graph.replay()
        torch.cuda.synchronize()
    torch.testing.assert_close(captured, eager)


@pytest.mark.gpu
@needs_cuda
def test_gpu_compile_fullgraph_inductor():
    torch.manual_seed(0)
    model = MoE(MoEConfig(dim=128, hidden_dim=192, num_experts=8, top_k=2, backend="triton"), device="cuda")
    x = torch.randn(2, 33, 128, device="cuda")
    g = torch.randn_like(x)
    want = _grads(model, x, g)
    got = _grads(torch.compile(model, fullgraph=True), x, g)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-4, rtol=1e-3, msg=lambda m, name=name: f"{name}: {m}")
