"""The small-batch native backward (sparsemoe/ops/csrc/expert_backward.c) and the forward that keeps h for it,
against float64 autograd, and the fused expert op's two paths (native kernels / per-expert loop) against
each other."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_cpu_kernels import _case

from sparsemoe.dispatch import fused
from sparsemoe.experts import activate, in_rows
from sparsemoe.ops import cpu_kernels
from sparsemoe.ops.expert_backward import expert_backward

needs_kernel = pytest.mark.skipif(
    not cpu_kernels.available(),
    reason="native CPU kernels unavailable here (no C compiler, or SPARSEMOE_CPU_KERNELS=0)",
)


def _reference_grads(g_TD, x_TD, token_ids, weights, offsets, w_in, w_out, activation):
    """(y, h, dx, d weights, d w_in, d w_out) of the expert stage in float64 autograd, from the same values;
    with bfloat16 inputs h is rounded to bfloat16 as the op keeps it (its gradient passed straight through)."""
    x, wts, wi, wo = (t.detach().double().requires_grad_() for t in (x_TD, weights, w_in, w_out))
    y = torch.zeros(x.shape, dtype=torch.float64)
    hs, lo = [], 0
    half = x_TD.dtype == torch.bfloat16
    for e, hi in enumerate(offsets.tolist()):
        rows = token_ids[lo:hi]
        h = x[rows] @ wi[e].t()
        if half:
            h = h + (h.bfloat16().double() - h).detach()
        hs.append(h)
        a = activate(h, activation)
        if half and hi - lo <= 8 and cpu_kernels.bfloat16_dot_products():  # as the forward kernel rounds it
            a = a + (a.bfloat16().double() - a).detach()
        y = y.index_add(0, rows, wts[lo:hi, None] * (a @ wo[e].t()))
        lo = hi
    y.backward(g_TD.double())
    grads = [x.grad, wts.grad, wi.grad, wo.grad]
    grads[1][lo:] = 0  # rows past the last offset are dropped
    return (y.detach(), torch.cat(hs).detach(), *grads)


@needs_kernel
@settings(max_examples=60, deadline=None)
@given(
    counts=st.lists(st.integers(0, 9), min_size=1, max_size=6),  # experts without rows, 1-4 rows, more
    dim=st.integers(1, 150),  # below, at and past the 16- and 32-float blocks, and past a 128-column block
    hidden=st.integers(1, 40),
    activation=st.sampled_from(sorted(cpu_kernels.ACTIVATION_CODES)),
    threads=st.sampled_from([1, 2, 3]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    tokens=st.integers(1, 12),
    dropped=st.integers(0, 3),
)
def test_forward_keeping_h_and_backward_match_float64(counts, dim, hidden, activation, threads, dtype, tokens, dropped):
    """float32: within float32 rounding of float64 on the same values. bfloat16: h is rounded once (as the op
    keeps it) and each gradient once, so the tolerance is bfloat16's."""
    x, tok, wts, offsets, w_in, w_out = _case(counts, dim, hidden, activation, dtype=dtype, tokens=tokens,
                                              dropped=dropped)  # fmt: skip
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    N, kept = tok.shape[0], int(offsets[-1])
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        h = torch.full((N, w_in.shape[1]), float("nan"), dtype=dtype)
        y = cpu_kernels.decode_mlp(x, tok, wts, offsets, w_in, w_out, activation, h_keep=h)
        dx, d_wts, dw_in, dw_out = expert_backward(g, x, tok, wts, offsets, w_in, w_out, h, activation)
    finally:
        torch.set_num_threads(before)
    y_ref, h_ref, *grads_ref = _reference_grads(g, x, tok, wts, offsets, w_in, w_out, activation)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(h[:kept].double(), h_ref, **tol)
    torch.testing.assert_close(y.double(), y_ref, **tol)
    assert dx.dtype == d_wts.dtype == torch.float32 and dw_in.dtype == dw_out.dtype == dtype
    for name, got, want in zip(("dx", "d weights", "d w_in", "d w_out"), (dx, d_wts, dw_in, dw_out), grads_ref):
        assert got.shape == want.shape, name
        if not want.numel():
            continue
        scale = want.abs().max().clamp_min(1.0)  # the gradients' scale: absolute error relative to it
        err = (got.double() - want).abs().max()
        assert err <= tol["atol"] * scale, f"{name}: max error {err.item():.3g} (scale {scale.item():.3g})"


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_does_not_depend_on_the_thread_count(dtype):
    """No sum is split between threads: 1, 2 and 3 threads give the same bits."""
    x, tok, wts, offsets, w_in, w_out = _case([3, 0, 5, 1, 7], 150, 37, "swiglu", dtype=dtype, tokens=9)
    g = torch.randn(x.shape).to(dtype)
    h = torch.empty(tok.shape[0], w_in.shape[1], dtype=dtype)
    cpu_kernels.decode_mlp(x, tok, wts, offsets, w_in, w_out, "swiglu", h_keep=h)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(expert_backward(g, x, tok, wts, offsets, w_in, w_out, h, "swiglu"))
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


@needs_kernel
def test_backward_refuses_inputs_that_do_not_fit():
    x, tok, wts, offsets, w_in, w_out = _case([2, 1], 8, 4, "swiglu")
    g = torch.randn(x.shape)
    h = torch.zeros(tok.shape[0], w_in.shape[1])
    with pytest.raises(ValueError, match="do not fit"):
        expert_backward(g, x, tok, wts, offsets, w_in, w_out, h[:, :3], "swiglu")
    with pytest.raises(ValueError, match="do not fit"):
        expert_backward(g, x, tok, wts, offsets, w_in, w_out.double(), h, "swiglu")
    with pytest.raises(ValueError, match="outside"):
        expert_backward(g, x, tok.clone().fill_(99), wts, offsets, w_in, w_out, h, "swiglu")
    with pytest.raises(ValueError, match="offsets"):
        expert_backward(g, x, tok, wts, offsets.flip(0), w_in, w_out, h, "swiglu")
    with pytest.raises(ValueError, match="h_keep"):
        cpu_kernels.decode_mlp(x, tok, wts, offsets, w_in, w_out, "swiglu", h_keep=h.bfloat16())
    assert not cpu_kernels.supports(x.double(), w_in.double(), w_out.double(), "swiglu")


def _op_grads(x, tok, wts, offsets, w_in, w_out, activation, recompute, g):
    leaves = [t.detach().clone().requires_grad_() for t in (x, wts, w_in, w_out)]
    y = fused.expert_mlp(leaves[0], tok, leaves[1], offsets, leaves[2], leaves[3], activation, recompute=recompute)
    y.backward(g)
    return [y.detach()] + [t.grad for t in leaves]


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("activation", ["swiglu", "relu"])
def test_fused_op_native_path_matches_its_loop(monkeypatch, dtype, recompute, activation):
    """The fused op with few rows per expert (the native kernels) and with the per-expert loop forced, on the
    same inputs: outputs and every gradient, with recomputation too."""
    counts = [2, 0, 3, 1, 0, 4, 2]
    x, tok, wts, offsets, w_in, w_out = _case(counts, 45, 29, activation, dtype=dtype, tokens=6, dropped=2)
    g = torch.randn(x.shape, dtype=torch.float32)
    assert fused._native_rows(x, w_in, w_out, activation, fused._bounds(offsets))
    native = _op_grads(x, tok, wts, offsets, w_in, w_out, activation, recompute, g)
    monkeypatch.setitem(fused.NATIVE_MAX_ROWS_PER_EXPERT, dtype, 0)
    assert not fused._native_rows(x, w_in, w_out, activation, fused._bounds(offsets))
    loop = _op_grads(x, tok, wts, offsets, w_in, w_out, activation, recompute, g)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
    for name, a, b in zip(("y", "dx", "d weights", "d w_in", "d w_out"), native, loop):
        assert a.dtype == b.dtype, name
        torch.testing.assert_close(a.float(), b.float(), **tol, msg=name)


def test_native_rows_follows_the_rows_per_expert_and_the_inputs():
    E, D, F = 4, 8, 6
    w_in, w_out = torch.randn(E, in_rows(F, "swiglu"), D), torch.randn(E, D, F)
    x = torch.randn(3, D)
    limit = fused.NATIVE_MAX_ROWS_PER_EXPERT[torch.float32]
    few = [0, limit, limit, 2 * limit]  # two experts with rows, `limit` rows each
    many = [0, limit + 1, limit + 1, 2 * limit + 2]
    assert fused._native_rows(x, w_in, w_out, "swiglu", few) == cpu_kernels.available()
    assert not fused._native_rows(x, w_in, w_out, "swiglu", many)
    assert not fused._native_rows(x.double(), w_in.double(), w_out.double(), "swiglu", few)


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 1 << 20))
def test_bucketed_rows_add_at_most_a_sixteenth_and_give_sixteen_shapes_per_power_of_two(n):
    """bfloat16 expert GEMMs on the CPU run on rows rounded up to a bucket (oneDNN builds a kernel per new
    shape): never fewer rows, at most max(15, n/16) more, and 16 buckets between two powers of two."""
    nb = fused._bucket(n, True)
    assert n <= nb <= n + max(fused._MIN_BUCKET_ROWS - 1, n // fused._BUCKETS_PER_OCTAVE)
    assert fused._bucket(nb, True) == nb and fused._bucket(n, False) == n
    octave = 1 << (n.bit_length() - 1)
    buckets = {fused._bucket(m, True) for m in range(octave, 2 * octave, max(1, octave // 64))}
    assert len(buckets) <= max(fused._BUCKETS_PER_OCTAVE, octave // fused._MIN_BUCKET_ROWS + 1)


def test_bfloat16_loop_gemms_see_only_bucketed_row_counts(monkeypatch):
    """Every per-expert GEMM of the bfloat16 loop (forward and backward) runs on a bucketed row count, while
    the op's results match its float64 reference (the added rows read neighbours or zeros, and are dropped)."""
    counts = [37, 0, 21, 50, 3]  # no bucket boundary: every expert's GEMMs need added rows
    x, tok, wts, offsets, w_in, w_out = _case(counts, 24, 20, "swiglu", dtype=torch.bfloat16, tokens=40)
    monkeypatch.setitem(fused.NATIVE_MAX_ROWS_PER_EXPERT, torch.bfloat16, 0)
    seen = []
    real_mm = torch.mm

    def recording_mm(a, b, **kwargs):
        seen.append((a.shape[0], a.shape[1], b.shape[1]))
        return real_mm(a, b, **kwargs)

    monkeypatch.setattr(torch, "mm", recording_mm)
    g = torch.randn(x.shape)
    y, dx, d_wts, dw_in, dw_out = _op_grads(x, tok, wts, offsets, w_in, w_out, "swiglu", False, g)
    monkeypatch.undo()
    buckets = {fused._bucket(c, True) for c in counts if c}
    assert seen and all(m in buckets or k in buckets for m, k, _ in seen)  # rows are M, or K for weight grads
    y_ref, _h, *grads_ref = _reference_grads(g, x, tok, wts, offsets, w_in, w_out, "swiglu")
    torch.testing.assert_close(y.double(), y_ref, rtol=3e-2, atol=3e-2)
    for got, want in zip((dx, d_wts, dw_in, dw_out), grads_ref):
        torch.testing.assert_close(got.double(), want, rtol=5e-2, atol=5e-2 * float(want.abs().max()))
