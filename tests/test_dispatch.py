"""Every dispatch backend against the reference loop: outputs and every gradient, odd shapes, dtypes."""

from __future__ import annotations

import pytest
import torch
from helpers import forward_backward, twin

from sparsemoe import MoE, MoEConfig
from sparsemoe.dispatch import backend_names, resolve_backend

FAST_BACKENDS = [b for b in backend_names() if b not in ("auto", "reference")] + ["auto"]

# (config fields, input shape): odd D, E=3 and E=64, k from 1 to 4, one token, experts that get no token.
CASES = {
    "mixtral-like": (dict(dim=24, hidden_dim=20), (3, 5, 24)),
    "odd-D-E3-k1": (dict(dim=19, hidden_dim=13, num_experts=3, top_k=1, activation="gelu"), (17, 19)),
    "E64-k4-sparse": (dict(dim=21, hidden_dim=9, num_experts=64, top_k=4, activation="relu"), (6, 21)),
    "single-token-k3": (dict(dim=15, hidden_dim=11, num_experts=5, top_k=3, activation="geglu"), (1, 15)),
    "capacity-position": (dict(dim=16, hidden_dim=12, num_experts=4, top_k=2, capacity_factor=0.5), (2, 9, 16)),
    "capacity-weight": (
        dict(dim=16, hidden_dim=12, num_experts=4, top_k=2, capacity_factor=0.75, capacity_priority="weight"),
        (4, 5, 16),
    ),
    "expert-choice": (dict(dim=18, hidden_dim=10, num_experts=6, top_k=2, router="expert_choice"), (2, 7, 18)),
    "sigmoid-groups-shared": (
        dict(
            dim=20,
            hidden_dim=8,
            num_experts=8,
            top_k=3,
            router="group_limited",
            num_groups=4,
            topk_groups=2,
            score_func="sigmoid",
            route_scale=2.5,
            num_shared_experts=2,
            shared_expert_gate=True,
            seq_aux_loss_coef=0.01,
            z_loss_coef=1e-3,
        ),
        (3, 4, 20),
    ),
    "after-topk-no-renorm": (dict(dim=12, hidden_dim=6, score_order="after_topk", num_experts=5, top_k=2), (11, 12)),
    "shazeer-no-renorm": (dict(dim=12, hidden_dim=6, renormalize=False, num_experts=7, top_k=2), (13, 12)),
}


def _make(fields: dict, dtype=torch.float32) -> MoE:
    layer = MoE(MoEConfig(backend="reference", **fields), dtype=dtype)
    layer.train()
    return layer


def _assert_close(actual, expected, name, atol, rtol):
    assert actual is not None and expected is not None, f"{name}: missing gradient"
    scale = expected.float().abs().max().clamp_min(1e-6)
    err = (actual.float() - expected.float()).abs().max()
    assert err <= atol + rtol * scale, f"{name}: max error {err.item():.3g} (scale {scale.item():.3g})"


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_backend_matches_reference_float32(backend, case, native_kernels):
    fields, shape = CASES[case]
    ref = _make(fields)
    x = torch.randn(shape)
    fast = twin(ref, backend=backend)
    if not _backend_runs(fast, x):
        pytest.skip(f"backend {backend} does not run on this device")
    y_ref, g_ref = forward_backward(ref, x)
    y, g = forward_backward(fast, x)
    _assert_close(y, y_ref, "output", 1e-5, 1e-5)
    assert set(g) == set(g_ref)
    for name in g_ref:
        _assert_close(g[name], g_ref[name], name, 1e-5, 1e-4)
    # The aux losses come from the shared routing, so they agree exactly.
    assert torch.equal(fast.aux_loss, ref.aux_loss)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("case", ["mixtral-like", "capacity-position", "sigmoid-groups-shared", "odd-D-E3-k1"])
def test_backend_matches_reference_bfloat16(backend, case, native_kernels):
    """With the native CPU kernels (decode and activations in bfloat16) and without them (PyTorch ops)."""
    fields, shape = CASES[case]
    ref = _make(fields, dtype=torch.bfloat16)
    x = torch.randn(shape, dtype=torch.bfloat16)
    fast = twin(ref, backend=backend)
    if not _backend_runs(fast, x):
        pytest.skip(f"backend {backend} does not run on this device")
    y_ref, g_ref = forward_backward(ref, x)
    y, g = forward_backward(fast, x)
    assert y.dtype == torch.bfloat16
    _assert_close(y, y_ref, "output", 1e-2, 3e-2)
    for name in g_ref:
        _assert_close(g[name], g_ref[name], name, 1e-2, 5e-2)


@pytest.mark.parametrize("backend", ["grouped", "capacity"])
def test_float16_runs_and_matches(backend):
    fields, shape = CASES["mixtral-like"]
    ref = _make(fields, dtype=torch.float16)
    x = torch.randn(shape, dtype=torch.float16)
    y_ref, _ = forward_backward(ref, x)
    y, _ = forward_backward(twin(ref, backend=backend), x)
    _assert_close(y, y_ref, "output", 1e-2, 3e-2)


def test_experts_without_tokens_get_zero_gradient():
    fields, shape = CASES["E64-k4-sparse"]
    layer = _make(fields)
    layer.config.backend = "grouped"
    x = torch.randn(shape)
    forward_backward(layer, x)
    used = layer.stats.tokens_per_expert > 0
    assert (~used).sum() >= 64 - shape[0] * 4
    per_expert_grad = layer.experts.w_in.grad.abs().flatten(1).sum(1)
    assert torch.all(per_expert_grad[~used] == 0)
    assert torch.all(per_expert_grad[used] > 0)


def _backend_runs(layer: MoE, x: torch.Tensor) -> bool:
    try:
        from sparsemoe.dispatch import build_plan

        x_TD = x.reshape(-1, x.shape[-1])
        routing = layer.router.route(layer.router.logits(x_TD), layer.config.capacity(x_TD.shape[0], True))
        resolve_backend(layer.config.backend, x_TD, build_plan(routing, None))
        return True
    except ValueError:
        return False


@pytest.mark.parametrize("capacity_factor", [None, 1.0])
@pytest.mark.parametrize("router", ["topk", "expert_choice"])
def test_plan_is_the_same_with_the_native_sort_and_pytorchs(monkeypatch, capacity_factor, router):
    from sparsemoe.dispatch.plan import build_plan
    from sparsemoe.ops import cpu_kernels, small_kernels

    if not cpu_kernels.available():
        pytest.skip("native CPU kernels unavailable")
    torch.manual_seed(0)
    layer = MoE(MoEConfig(dim=16, hidden_dim=8, num_experts=6, top_k=2, capacity_factor=capacity_factor, router=router))
    x = torch.randn(37, 16)
    routing = layer.router.route(layer.router.logits(x), layer.config.capacity(37, True))
    native = build_plan(routing, layer.config.capacity(37, True))
    monkeypatch.setattr(small_kernels, "sort_by_expert", lambda *args: None)
    plain = build_plan(routing, layer.config.capacity(37, True))
    for field in ("token_ids", "expert_ids", "weights", "slots", "counts", "offsets"):
        assert torch.equal(getattr(native, field), getattr(plain, field)), field
