"""The speed paths against the reference: recomputed activations, the no-grad decode path, auto's choice,
and the fused op under torch.compile(fullgraph=True)."""

from __future__ import annotations

import pytest
import torch
from helpers import forward_backward, twin

from sparsemoe import MoE, MoEConfig
from sparsemoe.dispatch import _auto_name, build_plan, resolve_backend

CASES = {
    "swiglu-odd": (dict(dim=19, hidden_dim=13, num_experts=5, top_k=2), (2, 7, 19)),
    # 16-byte aligned rows in bfloat16: the decode path takes the native grouped GEMM there.
    "swiglu-aligned": (dict(dim=32, hidden_dim=24, num_experts=6, top_k=2), (5, 32)),
    "gelu-E64": (dict(dim=21, hidden_dim=9, num_experts=64, top_k=4, activation="gelu"), (6, 21)),
    "geglu-capacity": (dict(dim=16, hidden_dim=12, num_experts=4, top_k=2, activation="geglu", capacity_factor=0.5), (2, 9, 16)),
    "relu-expert-choice": (dict(dim=18, hidden_dim=10, num_experts=6, top_k=2, activation="relu", router="expert_choice"), (2, 7, 18)),
}


def _ref(fields: dict, dtype=torch.float32) -> MoE:
    layer = MoE(MoEConfig(backend="reference", **fields), dtype=dtype)
    layer.train()
    return layer


def _close(actual, expected, name, atol=1e-5, rtol=1e-4):
    scale = expected.float().abs().max().clamp_min(1e-6)
    err = (actual.float() - expected.float()).abs().max()
    assert err <= atol + rtol * scale, f"{name}: max error {err.item():.3g} (scale {scale.item():.3g})"


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("recompute", [True, False])
def test_fused_op_matches_reference_outputs_and_all_gradients(case, recompute, native_kernels):
    """The fused op with and without recomputation, its activations by the native kernel or by PyTorch."""
    fields, shape = CASES[case]
    ref = _ref(fields)
    fast = twin(ref, backend="grouped")
    fast.experts.recompute_activations = recompute
    x = torch.randn(shape)
    y_ref, g_ref = forward_backward(ref, x)
    y, g = forward_backward(fast, x)
    _close(y, y_ref, "output", 1e-5, 1e-5)
    for name in g_ref:
        _close(g[name], g_ref[name], name)


def test_recompute_saves_less_for_backward():
    """Recomputing keeps no [N, I] in-projection between forward and backward."""
    layer = MoE(MoEConfig(dim=32, hidden_dim=64, num_experts=4, top_k=2, backend="grouped"))
    x = torch.randn(256, 32, requires_grad=True)

    def saved_bytes(recompute: bool) -> int:
        layer.experts.recompute_activations = recompute
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            layer(x)
        return total

    stored, recomputed = saved_bytes(False), saved_bytes(True)
    rows_times_I = 256 * 2 * 128 * 4  # N = T*K rows of I = 2F float32 values
    assert stored - recomputed == rows_times_I


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_no_grad_matches_reference(case, dtype, native_kernels):
    """Both decode paths: the native CPU kernel (float32 and bfloat16 weights), and without a C compiler the
    BLAS loop (float32) or the native grouped GEMM (bfloat16)."""
    fields, shape = CASES[case]
    ref = _ref(fields, dtype=dtype).eval()
    fast = twin(ref, backend="decode").eval()
    x = torch.randn(shape, dtype=dtype)
    with torch.no_grad():
        y_ref, y = ref(x), fast(x)
    tol = (1e-5, 1e-5) if dtype == torch.float32 else (1e-2, 3e-2)
    _close(y, y_ref, "output", *tol)


def test_auto_picks_decode_for_few_rows_and_grouped_for_many(native_kernels):
    native = native_kernels
    cfg = MoEConfig(dim=16, hidden_dim=8, num_experts=8, top_k=2)
    layer = MoE(cfg)

    def plan_for(T, dtype=torch.float32):
        x = torch.randn(T, 16)
        return x.to(dtype), build_plan(layer.router.route(layer.router.logits(x)), None)

    # Tokens (2 rows each over 8 experts) up to which decode is chosen: rows per expert 40 (float32) and
    # 8 (bfloat16) with the native kernel, else 4.
    limits = {torch.float32: 160, torch.bfloat16: 32} if native else {torch.float32: 16, torch.bfloat16: 16}
    for dtype, limit in limits.items():
        assert _auto_name(*plan_for(1, dtype)) == "decode"
        assert _auto_name(*plan_for(limit, dtype)) == "decode"
        assert _auto_name(*plan_for(limit + 1, dtype)) == "grouped"
    assert _auto_name(*plan_for(17, torch.float16)) == "grouped"  # the kernel takes float32 and bfloat16
    x, plan = plan_for(1)
    assert resolve_backend("auto", x, plan).name == "decode"


def test_fused_op_traces_under_compile_fullgraph():
    fields, shape = CASES["swiglu-odd"]
    ref = _ref(fields)
    fast = twin(ref, backend="grouped", check_finite=False)
    x = torch.randn(shape)
    y_ref, g_ref = forward_backward(ref, x)
    compiled = torch.compile(fast, fullgraph=True, backend="aot_eager")
    x2 = x.clone().requires_grad_(True)
    y = compiled(x2)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.dtype)
    (y * g).sum().backward()
    _close(y.detach(), y_ref, "output", 1e-5, 1e-5)
    _close(x2.grad, g_ref["x"], "x")
    _close(fast.experts.w_in.grad, g_ref["experts.w_in"], "experts.w_in")


def test_decode_traces_under_compile_fullgraph_without_grad():
    fields, shape = CASES["swiglu-odd"]
    ref = _ref(fields).eval()
    fast = twin(ref, backend="decode", check_finite=False).eval()
    x = torch.randn(shape)
    compiled = torch.compile(fast, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        _close(compiled(x), ref(x), "output", 1e-5, 1e-5)
