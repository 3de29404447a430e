"""The native CPU decode kernel (sparsemoe/ops/csrc/decode_mlp.c) against PyTorch, and its build and fallbacks."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsemoe.experts import activate, in_rows
from sparsemoe.ops import cpu_kernels, small_kernels

needs_kernel = pytest.mark.skipif(
    not cpu_kernels.available(),
    reason="native CPU kernels unavailable here (no C compiler, or SPARSEMOE_CPU_KERNELS=0)",
)


def _reference(x_TD, token_ids, weights, offsets, w_in, w_out, activation):
    """The decode step in float64, row by row: y[tok[r]] += weights[r] * expert_e(x[tok[r]]); act(h) rounded to
    bfloat16 where the kernel rounds it (bfloat16 weights on the CPU's bfloat16 dot products, experts of up to
    8 rows)."""
    y = torch.zeros(x_TD.shape, dtype=torch.float64)
    dot_products = w_out.dtype == torch.bfloat16 and cpu_kernels.bfloat16_dot_products()
    lo = 0
    for e, hi in enumerate(offsets.tolist()):
        for r in range(lo, hi):
            t = int(token_ids[r])
            h = x_TD[t].double() @ w_in[e].double().t()
            a = activate(h[None], activation)[0]
            if dot_products and hi - lo <= 8:
                a = a.bfloat16().double()
            y[t] += float(weights[r]) * (a @ w_out[e].double().t())
        lo = hi
    return y.float()


def _case(counts, dim, hidden, activation, seed=0, dtype=torch.float32, tokens=None, dropped=0):
    """A decode step: `counts` kept rows per expert (rows sorted by expert), then `dropped` rows past the
    last offset; token ids drawn from `tokens` (default: as many as kept rows), combine weights in [0, 1).

    Returns (x_TD, token_ids, weights, offsets, w_in, w_out)."""
    gen = torch.Generator().manual_seed(seed)
    E, kept = len(counts), sum(counts)
    T = tokens or max(kept, 1)
    token_ids = torch.randint(0, T, (kept + dropped,), generator=gen)
    weights = torch.rand(kept + dropped, generator=gen)
    offsets = torch.tensor(counts, dtype=torch.int64).cumsum(0)
    x = torch.randn(T, dim, generator=gen)
    w_in = torch.randn(E, in_rows(hidden, activation), dim, generator=gen) / math.sqrt(dim)
    w_out = torch.randn(E, dim, hidden, generator=gen) / math.sqrt(hidden)
    return x.to(dtype), token_ids, weights, offsets, w_in.to(dtype), w_out.to(dtype)


@needs_kernel
@settings(max_examples=60, deadline=None)
@given(
    counts=st.lists(st.integers(0, 19), min_size=1, max_size=6),  # 0 rows, the 1-4 row path, the tiled path
    dim=st.integers(1, 70),  # below, at and past the 16-float vector width
    hidden=st.integers(1, 40),
    activation=st.sampled_from(sorted(cpu_kernels.ACTIVATION_CODES)),
    threads=st.sampled_from([1, 2, 3]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    tokens=st.integers(1, 12),  # tokens with several rows, and tokens with none
    dropped=st.integers(0, 3),
)
def test_decode_kernel_matches_pytorch(counts, dim, hidden, activation, threads, dtype, tokens, dropped):
    """Against float64 on the same values: bfloat16 weights are widened exactly and summed in float32, so
    the error is float32 rounding in both dtypes. Rows past the last offset (dropped) add nothing."""
    case = _case(counts, dim, hidden, activation, dtype=dtype, tokens=tokens, dropped=dropped)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = cpu_kernels.decode_mlp(*case, activation)
    finally:
        torch.set_num_threads(before)
    expected = _reference(*case, activation)
    assert out.shape == expected.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_kernel_on_bench_sized_experts(dtype):
    """Rows past a 64-row work block and a model width of 512: the sizes `sparsemoe bench` runs."""
    case = _case([1, 4, 0, 7, 16, 33], 512, 200, "swiglu", seed=3, dtype=dtype, tokens=40)
    torch.testing.assert_close(
        cpu_kernels.decode_mlp(*case, "swiglu"), _reference(*case, "swiglu"), rtol=1e-5, atol=1e-5
    )


@needs_kernel
@pytest.mark.parametrize("activation", sorted(cpu_kernels.ACTIVATION_CODES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_kernel_propagates_nan_like_pytorch(activation, dtype):
    x, token_ids, weights, offsets, w_in, w_out = _case([3, 2], 20, 8, activation, dtype=dtype)
    token_ids = torch.tensor([0, 1, 2, 3, 1])  # token 4 has no rows: its output is 0
    x[1] = float("nan")
    out = cpu_kernels.decode_mlp(x, token_ids, weights, offsets, w_in, w_out, activation)
    assert out[1].isnan().all()
    assert out[[0, 2, 3]].isfinite().all() and (out[4] == 0).all()


@needs_kernel
def test_decode_kernel_rejects_bad_inputs_before_reading_memory():
    x, tok, w, offsets, w_in, w_out = _case([2, 3], 16, 8, "swiglu", tokens=4, dropped=1)

    def call(**change):
        args = dict(x_TD=x, token_ids=tok, weights=w, offsets=offsets, w_in=w_in, w_out=w_out)
        return cpu_kernels.decode_mlp(**{**args, **change}, activation="swiglu")

    with pytest.raises(ValueError, match="do not fit"):
        call(x_TD=x[:, :15])
    with pytest.raises(ValueError, match="do not fit"):
        call(weights=w[:-1])
    with pytest.raises(ValueError, match="token id is outside"):
        call(x_TD=x[:2])  # tokens 2 and 3 do not exist
    with pytest.raises(ValueError, match="token id is outside"):
        call(token_ids=torch.where(tok == tok[0], -1, tok))
    with pytest.raises(ValueError, match="offsets decrease or pass"):
        call(offsets=torch.tensor([3, 2]))
    with pytest.raises(ValueError, match="offsets decrease or pass"):
        call(offsets=torch.tensor([2, 7]))  # 6 rows
    with pytest.raises(ValueError, match="int64"):
        call(token_ids=tok.int())
    with pytest.raises(ValueError, match="share one dtype"):
        call(w_in=w_in.bfloat16())
    with pytest.raises(ValueError, match="share one dtype"):
        call(w_in=w_in.bfloat16(), w_out=w_out.bfloat16())  # float32 input, bfloat16 weights
    with pytest.raises(ValueError, match="contiguous"):
        call(w_in=w_in.transpose(1, 2).contiguous().transpose(1, 2))


def test_supports_only_float32_or_bfloat16_cpu_contiguous_known_activations():
    x, _, _, _, w_in, w_out = _case([2], 16, 8, "swiglu")
    ok = cpu_kernels.available()
    assert cpu_kernels.supports(x, w_in, w_out, "swiglu") == ok
    assert cpu_kernels.supports(x.bfloat16(), w_in.bfloat16(), w_out.bfloat16(), "swiglu") == ok
    assert not cpu_kernels.supports(x.half(), w_in.half(), w_out.half(), "swiglu")
    assert not cpu_kernels.supports(x, w_in.bfloat16(), w_out, "swiglu")  # one dtype for all three
    assert not cpu_kernels.supports(x, w_in.bfloat16(), w_out.bfloat16(), "swiglu")
    assert not cpu_kernels.supports(x, w_in.transpose(1, 2), w_out, "swiglu")
    assert not cpu_kernels.supports(x, w_in, w_out, "tanh")


@needs_kernel
def test_build_is_cached_and_keyed_by_flags(tmp_path):
    compiler = cpu_kernels.find_compiler()
    first = cpu_kernels.build(compiler, tmp_path, ("-O2",))
    stamp = first.stat().st_mtime_ns
    assert cpu_kernels.build(compiler, tmp_path, ("-O2",)) == first and first.stat().st_mtime_ns == stamp
    assert cpu_kernels.build(compiler, tmp_path, ("-O1",)) != first
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".so", ".so"]  # no temporary files left


@needs_kernel
def test_portable_build_computes_what_the_native_build_does(tmp_path, monkeypatch):
    """Without -march=native (no AVX-512) the bfloat16 loads and stores take the generic vector code: the
    activations give the same results up to float32 rounding (FMA contraction differs), so within one
    bfloat16 rounding; the decode kernel matches the float64 reference in both builds (the native one may
    run bfloat16 dot products, which the reference follows)."""
    case = _case([1, 3, 0, 9, 17], 45, 21, "swiglu", dtype=torch.bfloat16, tokens=20, dropped=2)
    gen = torch.Generator().manual_seed(1)
    h = (torch.randn(7, 2 * 37, generator=gen) * 3).bfloat16()
    dA, w = torch.randn(7, 37, generator=gen).bfloat16(), torch.rand(7, generator=gen)

    def run():
        decoded = cpu_kernels.decode_mlp(*case, "swiglu")
        torch.testing.assert_close(decoded, _reference(*case, "swiglu"), rtol=1e-5, atol=1e-5)
        return cpu_kernels.activate(h, "geglu"), *cpu_kernels.activation_backward(h, dA, w, "swiglu")

    native = run()
    portable = cpu_kernels._bind(cpu_kernels.build(cpu_kernels.find_compiler(), tmp_path, ("-O3",)))
    monkeypatch.setattr(cpu_kernels, "load", lambda: portable)
    assert not cpu_kernels.bfloat16_dot_products()
    for got, expected in zip(run(), native):
        assert got.dtype == expected.dtype
        rtol = 2**-8 if got.dtype == torch.bfloat16 else 1e-5
        torch.testing.assert_close(got.float(), expected.float(), rtol=rtol, atol=1e-5)


def test_every_kernel_source_and_header_is_built_from_and_shipped():
    """The build hashes and compiles what is in csrc/, and a wheel carries all of it (package-data), so an
    installed copy can build the kernels too."""
    import tomllib

    csrc = cpu_kernels.CSRC
    used = set(cpu_kernels.SOURCES) | set(cpu_kernels.HEADERS)
    assert used == {f for f in csrc.iterdir() if f.suffix in (".c", ".h")}
    root = csrc.parents[2]
    package_data = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    shipped = {f for pattern in package_data["sparsemoe.ops"] for f in csrc.parent.glob(pattern)}
    assert used <= shipped


def test_failed_build_raises_with_the_compiler_message_and_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError, match="failed"):
        cpu_kernels.build("false", tmp_path, ("-O3",))  # `false` exits 1, like a compiler that rejects the source
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("why", ["switched off", "no compiler", "every build fails"])
def test_load_falls_back_to_none(why, monkeypatch, tmp_path):
    monkeypatch.setenv(cpu_kernels.ENV_CACHE, str(tmp_path))
    if why == "switched off":
        monkeypatch.setenv(cpu_kernels.ENV_SWITCH, "0")
    elif why == "no compiler":
        monkeypatch.setattr(cpu_kernels, "find_compiler", lambda: None)
    else:
        monkeypatch.setattr(cpu_kernels, "find_compiler", lambda: "false")
    cpu_kernels.load.cache_clear()
    try:
        assert cpu_kernels.load() is None
    finally:
        cpu_kernels.load.cache_clear()  # the next caller rebuilds (or finds) the real library


def _activation_reference(h, dA, w, activation):
    """a = act(h), aw = w a, d_w = <dA, a> per row and dH = d/dh of sum(w * <dA, act(h)>), by autograd in
    float64."""
    h64 = h.double().requires_grad_(True)
    a = activate(h64, activation)
    (a * dA.double() * w.double()[:, None]).sum().backward()
    a = a.detach()
    return a.float(), (a * w.double()[:, None]).float(), h64.grad.float(), (a * dA.double()).sum(1).float()


@needs_kernel
@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 9),
    hidden=st.integers(1, 50),  # vector tails, a single float, several vectors
    activation=st.sampled_from(sorted(cpu_kernels.ACTIVATION_CODES)),
    scale=st.sampled_from([0.1, 3.0, 30.0]),  # 30: exp saturates in silu, gelu and their derivatives
    threads=st.sampled_from([1, 2]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
)
def test_activation_kernels_match_autograd(rows, hidden, activation, scale, threads, dtype):
    """Against float64 autograd on the same values. bfloat16 outputs are float32 results rounded once, so
    they are within one bfloat16 rounding (2^-8 relative, with float32's error on top); d_w stays float32."""
    gen = torch.Generator().manual_seed(rows * 100 + hidden)
    h = (torch.randn(rows, in_rows(hidden, activation), generator=gen) * scale).to(dtype)
    dA = torch.randn(rows, hidden, generator=gen).to(dtype)
    w = torch.rand(rows, generator=gen)
    a_ref, aw_ref, dH_ref, dw_ref = _activation_reference(h, dA, w, activation)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a_fwd = cpu_kernels.activate(h, activation)
        aw, dH, d_w = cpu_kernels.activation_backward(h, dA, w, activation)
    finally:
        torch.set_num_threads(before)
    assert a_fwd.dtype == aw.dtype == dH.dtype == dtype and d_w.dtype == torch.float32
    rtol = 2e-5 if dtype == torch.float32 else 2**-8
    tol = dict(rtol=rtol, atol=2e-5 * scale)
    torch.testing.assert_close(a_fwd.float(), a_ref, **tol)
    torch.testing.assert_close(aw.float(), aw_ref, **tol)
    torch.testing.assert_close(dH.float(), dH_ref, **tol)
    torch.testing.assert_close(d_w, dw_ref, rtol=2e-5, atol=2e-5 * scale * hidden)


@needs_kernel
def test_bfloat16_outputs_are_rounded_to_nearest_even_like_pytorch():
    """aw = w relu(h) is one float32 product per value: rounded once, it must equal PyTorch's bit for bit,
    ties (to even) and overflow to infinity included."""
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(64, 37, generator=gen).bfloat16()
    h[0, :4] = torch.tensor([float("nan"), float("inf"), 3.0e38, 1.0])
    w = torch.rand(64, generator=gen)
    w[1] = 1 + 2**-8  # 1.0 * w lands exactly halfway between two bfloat16 values: a tie
    w[0] = 2.0  # 3e38 * 2 overflows to inf
    aw, _, _ = cpu_kernels.activation_backward(h, torch.ones_like(h), w, "relu")
    expected = (h.float().relu() * w[:, None]).bfloat16()
    assert expected[1].float().sub(h[1].float().relu()).abs().max() > 0  # the tie rounded somewhere
    nan = expected.isnan()
    assert torch.equal(aw.isnan(), nan)  # NaN stays NaN (its bits carry no meaning)
    assert torch.equal(aw[~nan].view(torch.int16), expected[~nan].view(torch.int16))


@needs_kernel
@pytest.mark.parametrize("activation", sorted(cpu_kernels.ACTIVATION_CODES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_activation_kernels_propagate_nan_and_infinity_like_pytorch(activation, dtype):
    h = torch.tensor([[float("nan"), 1.0, -2.0, float("inf"), float("-inf"), 0.5]], dtype=dtype)
    if activation in ("swiglu", "geglu"):
        h = torch.cat([h, torch.ones_like(h)], 1)  # gate | up
    expected = activate(h, activation)
    torch.testing.assert_close(cpu_kernels.activate(h, activation), expected, equal_nan=True)
    aw, dH, _ = cpu_kernels.activation_backward(h, torch.ones(1, 6, dtype=dtype), torch.ones(1), activation)
    torch.testing.assert_close(aw, expected, equal_nan=True)  # w = 1
    assert dH[0, 0].isnan() or activation == "relu"  # relu passes the gradient of a NaN through, as PyTorch does


@needs_kernel
def test_activation_kernels_reject_bad_shapes():
    with pytest.raises(ValueError, match="I even"):
        cpu_kernels.activate(torch.randn(2, 5), "swiglu")
    with pytest.raises(ValueError, match="do not fit"):
        cpu_kernels.activation_backward(torch.randn(2, 6), torch.randn(2, 4), torch.rand(2), "swiglu")
    with pytest.raises(ValueError, match="do not fit"):  # dA in another dtype than h
        cpu_kernels.activation_backward(torch.randn(2, 6).bfloat16(), torch.randn(2, 3), torch.rand(2), "swiglu")
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        cpu_kernels.activate(torch.randn(2, 6).half(), "swiglu")


@needs_kernel
@settings(max_examples=60, deadline=None)
@given(
    counts=st.lists(st.integers(0, 20), min_size=1, max_size=6), width=st.integers(1, 70), out=st.integers(1, 140),
    dropped=st.integers(0, 3), threads=st.sampled_from([1, 2]), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    stored_in_out=st.booleans(),
)  # fmt: skip
def test_grouped_linear_matches_float64(counts, width, out, dropped, threads, dtype, stored_in_out):
    """One linear layer per expert over rows sorted by expert (the general path's decode projections), with
    the weights stored [E, out, in] or [E, in, out]."""
    gen = torch.Generator().manual_seed(len(counts) * 1000 + width)
    E, kept = len(counts), sum(counts)
    x = torch.randn(kept + dropped, width, generator=gen)
    if stored_in_out:
        w = torch.randn(E, width, out, generator=gen).to(dtype).transpose(1, 2)  # the [E, out, in] view
    else:
        w = torch.randn(E, out, width, generator=gen).to(dtype)
    offsets = torch.tensor(counts).cumsum(0)
    torch.set_num_threads(threads)
    try:
        y = cpu_kernels.grouped_linear(x, offsets, w)
    finally:
        torch.set_num_threads(2)
    expected = torch.zeros(kept + dropped, out, dtype=torch.float64)
    lo = 0
    for e, hi in enumerate(offsets.tolist()):
        expected[lo:hi] = x[lo:hi].double() @ w[e].double().t()
        lo = hi
    assert y.dtype == torch.float32 and y.shape == expected.shape
    torch.testing.assert_close(y.double(), expected, atol=1e-4 * math.sqrt(width), rtol=1e-5)


@needs_kernel
def test_grouped_linear_rejects_bad_inputs():
    w = torch.randn(3, 8, 5)
    with pytest.raises(ValueError, match="grouped_linear: x .* expected to fit"):
        cpu_kernels.grouped_linear(torch.randn(4, 6), torch.tensor([1, 2, 4]), w)
    with pytest.raises(ValueError, match="offsets decrease"):
        cpu_kernels.grouped_linear(torch.randn(4, 5), torch.tensor([3, 1, 4]), w)
    with pytest.raises(ValueError, match="offsets decrease or pass"):
        cpu_kernels.grouped_linear(torch.randn(4, 5), torch.tensor([1, 2, 9]), w)
    assert cpu_kernels.supports_linear(torch.randn(4, 5), torch.randn(3, 5, 8).transpose(1, 2))  # [E, K, O]
    assert not cpu_kernels.supports_linear(torch.randn(4, 5), w[:, ::2])  # neither layout contiguous


@needs_kernel
@settings(max_examples=40, deadline=None)
@given(
    tokens=st.integers(1, 40), rows=st.integers(0, 300), width=st.integers(1, 150), weighted=st.booleans(),
    threads=st.sampled_from([1, 2, 3]), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
)  # fmt: skip
def test_scatter_add_rows_matches_index_add(tokens, rows, width, weighted, threads, dtype):
    """Repeated token ids, odd widths (vector tails), any thread count: what index_add_ computes, and the
    same bits whatever the thread count (each element is summed by one thread in row order)."""
    gen = torch.Generator().manual_seed(rows * 1000 + width)
    y = torch.randn(tokens, width, generator=gen)
    token_ids = torch.randint(0, tokens, (rows,), generator=gen)
    rows_nD = torch.randn(rows, width, generator=gen).to(dtype)
    weights = torch.rand(rows, generator=gen) if weighted else None
    want = y.clone().index_add_(0, token_ids, rows_nD.float() * (weights[:, None] if weighted else 1.0))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = cpu_kernels.scatter_add_rows(y.clone(), token_ids, rows_nD, weights)
        torch.set_num_threads(1)
        serial = cpu_kernels.scatter_add_rows(y.clone(), token_ids, rows_nD, weights)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(got, serial)


@needs_kernel
def test_scatter_add_rows_rejects_bad_inputs_and_writes_nothing():
    y = torch.zeros(4, 8)
    with pytest.raises(ValueError, match="outside"):
        cpu_kernels.scatter_add_rows(y, torch.tensor([0, 4]), torch.ones(2, 8))
    assert not y.any()
    with pytest.raises(ValueError, match="do not fit"):
        cpu_kernels.scatter_add_rows(y, torch.tensor([0, 1]), torch.ones(2, 7))
    with pytest.raises(ValueError, match="weights"):
        cpu_kernels.scatter_add_rows(y, torch.tensor([0, 1]), torch.ones(2, 8), torch.ones(3))
    with pytest.raises(ValueError, match="float32 and contiguous"):
        cpu_kernels.scatter_add_rows(y.double(), torch.tensor([0]), torch.ones(1, 8))
    assert not cpu_kernels.supports_scatter(y.t(), torch.ones(1, 4))  # y not contiguous


@needs_kernel
@settings(max_examples=60, deadline=None)
@given(experts=st.integers(1, 70), ids=st.lists(st.integers(0, 70), max_size=300))
def test_sort_by_expert_is_the_stable_sort_with_segment_positions(experts, ids):
    from sparsemoe.dispatch.plan import _segment_positions

    expert_ids = torch.tensor([min(i, experts) for i in ids], dtype=torch.int64)  # E: dropped, sorted last
    order, sorted_ids, slots, counts, ends = small_kernels.sort_by_expert(expert_ids, experts)
    expected_order = torch.sort(expert_ids, stable=True).indices
    expected_slots, expected_counts, expected_ends = _segment_positions(expert_ids[expected_order], experts)
    assert torch.equal(order, expected_order) and torch.equal(sorted_ids, expert_ids[expected_order])
    assert torch.equal(slots, expected_slots)
    assert torch.equal(counts, expected_counts) and torch.equal(ends, expected_ends)


@needs_kernel
def test_sort_by_expert_refuses_ids_out_of_range_and_declines_what_it_does_not_take():
    with pytest.raises(ValueError, match="outside"):
        small_kernels.sort_by_expert(torch.tensor([0, 5]), 4)
    with pytest.raises(ValueError, match="outside"):
        small_kernels.sort_by_expert(torch.tensor([-1]), 4)
    assert small_kernels.sort_by_expert(torch.tensor([0, 1], dtype=torch.int32), 4) is None
    assert small_kernels.sort_by_expert(torch.zeros(2, 2, dtype=torch.int64), 4) is None


@needs_kernel
@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 80), width=st.integers(1, 300), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       threads=st.sampled_from([1, 2]), seed=st.integers(0, 1000))  # fmt: skip
def test_rms_norm_matches_the_pytorch_formula(rows, width, dtype, threads, seed):
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    x, w = (torch.randn(rows, width) * 3).to(dtype), torch.randn(width).to(dtype)
    got = small_kernels.rms_norm(x, w, 1e-5)
    x32 = x.float()
    expected = (x32 * torch.rsqrt(x32.square().mean(-1, keepdim=True) + 1e-5) * w.float()).to(dtype)
    assert got.dtype == dtype and got.shape == x.shape
    tol = 1e-5 if dtype == torch.float32 else 2**-7  # bfloat16: at most one rounding step apart
    torch.testing.assert_close(got.float(), expected.float(), rtol=tol, atol=tol)


@needs_kernel
def test_rms_norm_declines_what_it_does_not_take():
    x = torch.randn(2, 8)
    assert small_kernels.rms_norm(x, torch.ones(8, dtype=torch.float64), 1e-5) is None  # dtypes differ
    assert small_kernels.rms_norm(x.t(), torch.ones(2), 1e-5) is None  # not contiguous
    assert small_kernels.rms_norm(x.requires_grad_(), torch.ones(8), 1e-5) is None  # autograd: PyTorch's


@needs_kernel
@settings(max_examples=60, deadline=None)
@given(rows=st.integers(0, 4), width=st.integers(1, 300), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       ties=st.booleans(), specials=st.lists(st.sampled_from(["nan", "inf", "-inf"]), max_size=3),
       seed=st.integers(0, 1000))  # fmt: skip
def test_argmax_rows_is_torch_argmax(rows, width, dtype, ties, specials, seed):
    """The same index as torch.argmax: the first of tied values (few distinct values make ties), NaN largest."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 3, (rows, width), generator=generator).float() if ties else torch.randn(rows, width, generator=generator)
    for i, special in enumerate(specials):
        if rows:
            x[i % rows, (7 * i + seed) % width] = float(special)
    x = x.to(dtype)
    assert torch.equal(small_kernels.argmax_rows(x), x.argmax(dim=-1))


@needs_kernel
@pytest.mark.parametrize("width", [1, 15, 16, 17, 40])
@pytest.mark.parametrize("fill", [float("-inf"), 0.0, float("inf"), float("nan")])
def test_argmax_rows_of_constant_rows(width, fill):
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.full((2, width), fill, dtype=dtype)
        x[1, -1] = 1.0  # a larger value last, or a number after NaNs
        assert torch.equal(small_kernels.argmax_rows(x), x.argmax(dim=-1))


@needs_kernel
def test_argmax_rows_declines_what_it_does_not_take():
    assert small_kernels.argmax_rows(torch.randn(3, 4).t()) is None  # not contiguous
    assert small_kernels.argmax_rows(torch.randn(3, 4, dtype=torch.float64)) is None
    assert small_kernels.argmax_rows(torch.randn(4)) is None  # not [n, V]
    assert small_kernels.argmax_rows(torch.randn(2, 0)) is None  # nothing to pick from


@needs_kernel
@settings(max_examples=60, deadline=None)
@given(tokens=st.integers(0, 40), experts=st.integers(1, 70), k=st.integers(1, 8), sigmoid=st.booleans(),
       renormalize=st.booleans(), scale=st.sampled_from([1.0, 2.5]), seed=st.integers(0, 1000))  # fmt: skip
def test_topk_route_is_the_routers_pytorch_path(tokens, experts, k, sigmoid, renormalize, scale, seed):
    from sparsemoe.config import MoEConfig
    from sparsemoe.routing import token_choice

    k = min(k, experts)
    torch.manual_seed(seed)
    cfg = MoEConfig(dim=4, num_experts=experts, top_k=k, score_func="sigmoid" if sigmoid else "softmax",
                    renormalize=renormalize, route_scale=scale)  # fmt: skip
    logits = torch.randn(tokens, experts) * 3
    native = token_choice(logits, cfg, False, None)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(small_kernels, "topk_route", lambda *args: None)
        plain = token_choice(logits, cfg, False, None)
    # The kernel ranks by the logits, PyTorch by the scores: two logits an ulp apart can round to one score, and
    # the tie then goes to the lower id there. The chosen experts' scores are the same either way.
    ids_native, ids_plain = native.expert_ids.view(tokens, k), plain.expert_ids.view(tokens, k)
    scores = plain.probs if not sigmoid else torch.sigmoid(logits)
    assert torch.equal(scores.gather(1, ids_native), scores.gather(1, ids_plain))
    assert torch.equal(native.token_ids, plain.token_ids)
    torch.testing.assert_close(native.weights, plain.weights, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(native.probs, plain.probs, rtol=1e-6, atol=1e-7)
    assert native.logits is logits and native.top_k == plain.top_k
