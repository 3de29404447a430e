"""sparsemoe.ops.linear: the native kernel for a few rows, F.linear everywhere else, the same results."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import sparsemoe.ops.linear as native_linear
from sparsemoe.ops import cpu_kernels
from sparsemoe.ops.linear import Linear, linear

needs_kernels = pytest.mark.skipif(not cpu_kernels.available(), reason="native CPU kernels unavailable (no C compiler)")


@pytest.fixture
def small_weights_count(monkeypatch):
    """Let the native path take small weights too, so that the tests stay fast."""
    monkeypatch.setattr(native_linear, "MIN_WEIGHTS", 1)


@needs_kernels
@settings(max_examples=60, deadline=None)
@given(rows=st.integers(0, 20), K=st.integers(1, 150), O=st.integers(1, 150), bias=st.booleans(),
       bf16=st.booleans(), batch=st.sampled_from([(), (2,)]), seed=st.integers(0, 1000))  # fmt: skip
def test_matches_f_linear(rows, K, O, bias, bf16, batch, seed):
    torch.manual_seed(seed)
    native_linear.MIN_WEIGHTS, saved = 1, native_linear.MIN_WEIGHTS  # small weights take the native path too
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
    real = cpu_kernels.grouped_linear
    monkeypatch.setattr(cpu_kernels, "grouped_linear", lambda *a: calls.append(1) or real(*a))
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
