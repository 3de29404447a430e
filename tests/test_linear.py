"""sparsemoe.ops.linear: the native kernel for a few rows, F.linear everywhere else, the same results."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import sparsemoe.ops.linear as native_linear
from sparsemoe.ops import cpu_kernels, small_kernels
from sparsemoe.ops.linear import Linear, linear, linear_float32, linears

needs_kernels = pytest.mark.skipif(not cpu_kernels.available(), reason="native CPU kernels unavailable (no C compiler)")


@pytest.fixture
def small_weights_count(monkeypatch):
    """Let the native path take small weights too, so that the tests stay fast."""
    monkeypatch.setattr(native_linear, "MIN_WEIGHTS", dict.fromkeys(native_linear.MIN_WEIGHTS, 1))


@needs_kernels
@settings(max_examples=60, deadline=None)
@given(rows=st.integers(0, 20), K=st.integers(1, 150), O=st.integers(1, 150), bias=st.booleans(),
       bf16=st.booleans(), batch=st.sampled_from([(), (2,)]), seed=st.integers(0, 1000))  # fmt: skip
def test_matches_f_linear(rows, K, O, bias, bf16, batch, seed):
    torch.manual_seed(seed)
    native_linear.MIN_WEIGHTS, saved = dict.fromkeys(native_linear.MIN_WEIGHTS, 1), native_linear.MIN_WEIGHTS  # small weights take the native path too
    try:
        _check_against_f_linear(rows, K, O, bias, bf16, batch)
    finally:
        native_linear.MIN_WEIGHTS = saved


def _check_against_f_linear(rows, K, O, bias, bf16, batch):
    dtype = torch.bfloat16 if bf16 else torch.float32
    x = torch.randn(*batch, rows, K).to(dtype)
    w, b = torch.randn(O, K).to(dtype), torch.randn(O).to(dtype) if bias else None
    with torch.no_grad():
        y = linear(x, w, b)
    expected = F.linear(x.double(), w.double(), None if b is None else b.double())
    assert y.shape == expected.shape and y.dtype == dtype
    tol = 2e-2 if bf16 else 1e-5  # bfloat16: the result rounded once (float32 sums), BLAS rounds its own way
    scale = expected.abs().max().item() if expected.numel() else 0.0
    assert torch.allclose(y.double(), expected, rtol=tol, atol=tol * (scale + 1))


@needs_kernels
def test_native_path_taken_only_where_it_applies(monkeypatch, small_weights_count):
    calls = []
    real = cpu_kernels.linear_many
    monkeypatch.setattr(cpu_kernels, "linear_many", lambda *a: calls.append(1) or real(*a))
    layer = Linear(32, 48)
    x = torch.randn(3, 32)
    with torch.no_grad():
        layer(x)
    assert calls == [1]
    layer(x).sum().backward()  # autograd: F.linear, whose backward exists
    assert calls == [1] and layer.weight.grad is not None
    with torch.no_grad():
        layer(torch.randn(17, 32))  # past MAX_ROWS
        layer(torch.randn(5, 32, dtype=torch.float64).to(torch.float32).t().contiguous().t())  # non-contiguous x is fine
        layer.to(torch.float64)(torch.randn(2, 32, dtype=torch.float64))  # float64: F.linear
        layer.to(torch.bfloat16)(torch.randn(5, 32, dtype=torch.bfloat16))  # bfloat16 past its 4 rows
    assert len(calls) == 2


def test_linear_module_keeps_nn_linear_state():
    layer = Linear(8, 4)
    assert isinstance(layer, torch.nn.Linear) and set(layer.state_dict()) == {"weight", "bias"}


def test_compiles_fullgraph(small_weights_count):
    layer = Linear(16, 8).eval()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 16)
    with torch.no_grad():
        assert torch.allclose(compiled(x), F.linear(x, layer.weight, layer.bias), atol=1e-6)


@needs_kernels
@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 16), K=st.integers(1, 90), outs=st.lists(st.integers(1, 150), min_size=1, max_size=4),
       bf16=st.booleans(), seed=st.integers(0, 1000))  # fmt: skip
def test_linear_many_matches_each_product(rows, K, outs, bf16, seed):
    torch.manual_seed(seed)
    dtype = torch.bfloat16 if bf16 else torch.float32
    x = torch.randn(rows, K).to(dtype)
    weights = [torch.randn(O, K).to(dtype) for O in outs]
    for float_output in (False, True):
        got = cpu_kernels.linear_many(x, weights, float_output)
        for y, w in zip(got, weights):
            exact = x.double() @ w.double().t()
            assert y.dtype == (torch.float32 if float_output else dtype) and y.shape == exact.shape
            if bf16 and not float_output:  # the float32 sum rounded once: within one bfloat16 step of the exact value
                assert torch.allclose(y.double(), exact, rtol=2**-8, atol=1e-5 * (exact.abs().max().item() + 1))
            else:
                assert torch.allclose(y.double(), exact, rtol=1e-5, atol=1e-5 * (exact.abs().max().item() + 1))
    with pytest.raises(ValueError, match="linear_many"):
        cpu_kernels.linear_many(x, [torch.randn(3, K + 1).to(dtype)])


@needs_kernels
def test_linears_run_plain_linears_in_one_call(monkeypatch, small_weights_count):
    calls = []
    real = cpu_kernels.linear_many
    monkeypatch.setattr(cpu_kernels, "linear_many", lambda *a: calls.append(len(a[1])) or real(*a))
    torch.manual_seed(0)
    layers = [Linear(32, 48, bias=False), torch.nn.Linear(32, 8), Linear(32, 16, bias=False)]
    x = torch.randn(1, 2, 32)
    with torch.no_grad():
        got = linears(x, layers)
        assert calls == [3]
        for y, layer in zip(got, layers):
            assert y.shape == (1, 2, layer.out_features)
            torch.testing.assert_close(y, F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)

        class Scaled(torch.nn.Linear):  # a subclass computes something else: it runs as itself
            def forward(self, x):
                return 2 * super().forward(x)

        odd = Scaled(32, 4)
        got = linears(x, [layers[0], odd])
        torch.testing.assert_close(got[1], odd(x))
        assert calls == [3, 1]  # layers[0] alone, through Linear's own call
    got = linears(x.requires_grad_(), layers)  # autograd: each layer as itself
    got[0].sum().backward()
    assert calls == [3, 1] and x.grad is not None


@needs_kernels
def test_linear_float32_is_the_widened_product(monkeypatch, small_weights_count):
    calls = []
    real = cpu_kernels.linear_many
    monkeypatch.setattr(cpu_kernels, "linear_many", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        x, w = torch.randn(3, 40).to(dtype), torch.randn(8, 40).to(dtype)
        with torch.no_grad():
            got = linear_float32(x, w)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, x.float() @ w.float().t(), rtol=1e-6, atol=1e-5)
    assert calls == [1, 1]  # the native kernel, in both dtypes
    x = torch.randn(3, 40, requires_grad=True)
    assert linear_float32(x, w.float()).requires_grad  # with autograd: PyTorch's product


@needs_kernels
def test_all_finite():
    for dtype in (torch.float32, torch.bfloat16):
        for n in (1, 17, 70_000):  # the last takes the threaded loop
            x = torch.randn(n).to(dtype)
            assert small_kernels.all_finite(x) is True
            for bad in (float("nan"), float("inf"), float("-inf")):
                for where in (0, n // 2, n - 1):
                    y = x.clone()
                    y[where] = bad
                    assert small_kernels.all_finite(y) is False
        big = torch.full((4,), torch.finfo(dtype).max, dtype=dtype)  # the largest finite values are finite
        assert small_kernels.all_finite(big) is True
    assert small_kernels.all_finite(torch.randn(4, 4).t()) is None  # not contiguous: not taken
    assert small_kernels.all_finite(torch.randn(4, dtype=torch.float64)) is None
