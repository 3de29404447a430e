"""sparsemoe as a transformers experts implementation: every layout flag, every backend, outputs and all
gradients against a per-token reference loop; registration; errors; no weight copies."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

transformers = pytest.importorskip("transformers")
moe_integration = pytest.importorskip("transformers.integrations.moe")

from transformers.activations import ACT2FN  # noqa: E402

import sparsemoe.hf  # noqa: E402,F401  (registers "sparsemoe")
from sparsemoe.dispatch import backend_names  # noqa: E402
from sparsemoe.hf import experts_implementation as impl  # noqa: E402
from sparsemoe.hf.experts_implementation import UnsupportedExperts, read_layout, register_experts  # noqa: E402

use_experts_implementation = moe_integration.use_experts_implementation
LIMIT = 1.5  # a clamp that bites: inputs below reach |h| > 2


def _reference(module, x_TD, ids_TK, weights_TK):
    """The declared MLP, token by token (what every decorated class's eager loop computes)."""
    E = module.down_proj.shape[0]
    gated = module.has_gate
    w_in = module.gate_up_proj if gated else module.up_proj
    rows = []
    for t in range(x_TD.shape[0]):
        y = x_TD[t].float() * 0  # in the graph even when every choice is a placeholder
        for k in range(ids_TK.shape[1]):
            e = int(ids_TK[t, k])
            if not 0 <= e < E:
                continue
            h = x_TD[t] @ w_in[e] if module.is_transposed else w_in[e] @ x_TD[t]
            if module.has_bias:
                h = h + (module.gate_up_proj_bias if gated else module.up_proj_bias)[e]
            a = module._apply_gate(h[None])[0] if gated else module.act_fn(h)
            o = a @ module.down_proj[e] if module.is_transposed else module.down_proj[e] @ a
            if module.has_bias:
                o = o + module.down_proj_bias[e]
            if module.has_post_expert_norm:
                o = module.post_expert_norm(o[None])[0]
            y = y + weights_TK[t, k].float() * o.float()
        rows.append(y)
    return torch.stack(rows).to(x_TD.dtype) if rows else x_TD * 0  # [0, D], in the graph


def _interleaved_clamped_gate(self, gate_up):  # gpt-oss's gate: interleaved [g0, u0, g1, u1, ...], clamped
    gate, up = gate_up[..., ::2], gate_up[..., 1::2]
    gate, up = gate.clamp(max=LIMIT), up.clamp(-LIMIT, LIMIT)
    return (up + 1) * gate * torch.sigmoid(gate * 1.702)


def _clamped_gate(self, gate_up):  # DeepSeek-V4's: concatenated, clamped SwiGLU
    gate, up = gate_up.chunk(2, dim=-1)
    return self.act_fn(gate.clamp(max=LIMIT)) * up.clamp(-LIMIT, LIMIT)


def experts_class(gate_fn=None, **flags):
    """A decorated experts class with these flags (and gate function); its own forward is the reference."""

    class Experts(nn.Module):
        def __init__(self, config, E=5, D=24, F=20, act="silu", dtype=torch.float32):
            super().__init__()
            self.config, self.num_experts = config, E
            gated, transposed = flags.get("has_gate", True), flags.get("is_transposed", False)
            I = 2 * F if gated else F
            gen = torch.Generator().manual_seed(E * 100 + D)

            def param(*shape):
                return nn.Parameter((torch.randn(*shape, generator=gen) * 0.3).to(dtype))

            setattr(self, "gate_up_proj" if gated else "up_proj", param(*((E, D, I) if transposed else (E, I, D))))
            self.down_proj = param(*((E, F, D) if transposed else (E, D, F)))
            if flags.get("has_bias"):
                setattr(self, "gate_up_proj_bias" if gated else "up_proj_bias", param(E, I))
                self.down_proj_bias = param(E, D)
            if flags.get("has_post_expert_norm"):
                self.post_expert_norm = nn.LayerNorm(D, dtype=dtype)
                with torch.no_grad():
                    self.post_expert_norm.weight.uniform_(0.5, 1.5, generator=gen)
            self.act_fn = ACT2FN[act]

        def forward(self, hidden_states, top_k_index, top_k_weights):
            return _reference(self, hidden_states, top_k_index, top_k_weights)

    if gate_fn is not None:
        Experts._apply_gate = gate_fn
    return use_experts_implementation(Experts, **flags)


# Every flag of the decorator, and the activations and gate functions transformers' families use.
LAYOUTS = {
    "swiglu": ({}, None, "silu"),
    "swiglu-transposed": (dict(is_transposed=True), None, "silu"),
    "geglu-tanh": ({}, None, "gelu_pytorch_tanh"),
    "gated-exact-gelu": ({}, None, "gelu"),
    "relu-no-gate": (dict(has_gate=False), None, "relu"),
    "relu2-no-gate-transposed": (dict(has_gate=False, is_transposed=True), None, "relu2"),
    "gelu-tanh-no-gate": (dict(has_gate=False), None, "gelu_pytorch_tanh"),
    "clamped-swiglu": ({}, _clamped_gate, "silu"),
    "gpt-oss": (dict(is_concatenated=False, is_transposed=True, has_bias=True), _interleaved_clamped_gate, "silu"),
    "bias-transposed": (dict(is_transposed=True, has_bias=True), None, "silu"),
    "post-norm": (dict(has_post_expert_norm=True), None, "silu"),
    "everything": (
        dict(is_concatenated=False, is_transposed=True, has_bias=True, has_post_expert_norm=True),
        _interleaved_clamped_gate, "silu",
    ),
}  # fmt: skip
NATIVE = {"swiglu": "swiglu", "swiglu-transposed": "swiglu", "geglu-tanh": "geglu", "relu-no-gate": "relu",
          "gelu-tanh-no-gate": "gelu"}  # fmt: skip
BACKENDS = [b for b in backend_names() if b != "triton"]  # triton: tests/test_gpu.py and the interpreter tests


@pytest.fixture(scope="module", autouse=True)
def _backend_names():
    for backend in BACKENDS:
        register_experts(f"sparsemoe_{backend}", backend=backend)


def make_experts(layout: str, implementation: str, dtype=torch.float32, **sizes):
    flags, gate, act = LAYOUTS[layout]
    config = SimpleNamespace(_experts_implementation=implementation)
    return experts_class(gate, **flags)(config, act=act, dtype=dtype, **sizes)


def routing(T, E, K, seed=0, placeholders=False, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)]) if T else torch.zeros(0, K).long()
    if placeholders and T:  # transformers' expert-parallel sentinels: ids >= E with weight 0
        ids[0, 0] = E
    weights = torch.rand(T, K, generator=gen).to(dtype)
    if placeholders and T:
        weights[0, 0] = 0
    return ids, weights


def run(module, implementation, x, ids, weights, seed=3):
    """Output and every gradient (x, routing weights, parameters) of a fixed random projection."""
    module.config._experts_implementation = implementation
    module.zero_grad()
    x = x.detach().clone().requires_grad_(True)
    w = weights.detach().clone().requires_grad_(True)
    y = module(x, ids, w)
    proj = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed)).to(y.dtype)
    (y.float() * proj.float()).sum().backward()
    grads = {"x": x.grad, "top_k_weights": w.grad}
    grads.update({n: p.grad for n, p in module.named_parameters()})
    return y.detach(), grads


def assert_grads_match(grads, expected_grads, tol, what=""):
    assert grads.keys() == expected_grads.keys()
    for name, expected in expected_grads.items():
        got = grads[name]
        if expected is None:  # not reached by the reference (an empty batch): ours may give None or zeros
            assert got is None or not got.any(), f"{name} {what}"
            continue
        assert got is not None, f"{name} {what}: no gradient"
        assert_close_relative(got, expected, tol, f"{name} {what}")


def assert_close_relative(got, expected, tol, what):
    """Max error relative to the tensor's largest value, or to 0.1 when that is smaller: inputs here are at
    unit scale, and a gradient that is small only by cancellation (a routing weight's <dy, expert output>
    over a few columns) carries the rounding of its unit-scale terms."""
    assert got.shape == expected.shape, f"{what}: shape {tuple(got.shape)} != {tuple(expected.shape)}"
    if not expected.numel():
        return
    scale = expected.float().abs().max().clamp_min(0.1)
    err = ((got.float() - expected.float()).abs().max() / scale).item()
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_reference_outputs_and_gradients(layout, backend):
    module = make_experts(layout, "eager")
    x = torch.randn(7, 24, generator=torch.Generator().manual_seed(1)) * 2
    ids, weights = routing(7, 5, 3, placeholders=True)
    expected, expected_grads = run(module, "eager", x, ids, weights)
    got, grads = run(module, f"sparsemoe_{backend}", x, ids, weights)
    assert_close_relative(got, expected, 1e-5, "output")
    assert_grads_match(grads, expected_grads, 1e-5)
    assert read_layout(module).activation == NATIVE.get(layout)


@pytest.mark.parametrize("layout", ["swiglu", "swiglu-transposed", "gpt-oss", "post-norm"])
def test_bfloat16_close_to_float32_reference(layout):
    module = make_experts(layout, "eager")
    x = torch.randn(9, 24, generator=torch.Generator().manual_seed(2))
    ids, weights = routing(9, 5, 2)
    expected, expected_grads = run(module, "eager", x, ids, weights)
    module.to(torch.bfloat16)
    got, grads = run(module, "sparsemoe", x.bfloat16(), ids, weights.bfloat16())
    assert got.dtype == torch.bfloat16
    assert_close_relative(got, expected, 3e-2, "output")
    for name in ("x", "top_k_weights", "down_proj"):
        assert grads[name].dtype == torch.bfloat16
        assert_close_relative(grads[name], expected_grads[name], 5e-2, name)


@pytest.mark.parametrize("T", [0, 1])
def test_empty_and_single_token_batches(T):
    module = make_experts("gpt-oss", "eager")
    x = torch.randn(T, 24)
    ids, weights = routing(T, 5, 2)
    expected, _ = run(module, "eager", x, ids, weights)
    got, grads = run(module, "sparsemoe", x, ids, weights)
    assert got.shape == (T, 24)
    torch.testing.assert_close(got, expected)
    assert grads["x"].shape == (T, 24)


@settings(max_examples=30, deadline=None)
@given(
    T=st.integers(0, 9), E=st.integers(1, 6), K=st.integers(1, 3), D=st.sampled_from([8, 13]),
    F=st.sampled_from([4, 7]), layout=st.sampled_from(list(LAYOUTS)), placeholders=st.booleans(),
    seed=st.integers(0, 2**16),
)  # fmt: skip
def test_property_any_shape_and_routing(T, E, K, D, F, layout, placeholders, seed):
    K = min(K, E)
    module = make_experts(layout, "eager", E=E, D=D, F=F)
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(seed))
    ids, weights = routing(T, E, K, seed, placeholders)
    expected, expected_grads = run(module, "eager", x, ids, weights)
    got, grads = run(module, "sparsemoe", x, ids, weights)
    assert_close_relative(got, expected, 1e-5, "output")
    assert_grads_match(grads, expected_grads, 1e-5)


def test_no_weight_is_copied(monkeypatch):
    """The backends read the module's own tensors (a transposed layout as a view of the same storage)."""
    seen = {}
    real = impl.run_backend

    def spy(name, x, plan, experts):
        seen["w_in"], seen["w_out"] = experts.w_in, experts.w_out
        return real(name, x, plan, experts)

    monkeypatch.setattr(impl, "run_backend", spy)
    for layout in ("swiglu", "swiglu-transposed"):
        module = make_experts(layout, "sparsemoe")
        ids, weights = routing(4, 5, 2)
        module(torch.randn(4, 24), ids, weights)
        assert seen["w_in"].data_ptr() == module.gate_up_proj.data_ptr()
        assert seen["w_out"].data_ptr() == module.down_proj.data_ptr()


def test_autocast_runs_the_gemms_in_bfloat16():
    module = make_experts("swiglu", "eager")
    x = torch.randn(6, 24)
    ids, weights = routing(6, 5, 2)
    expected, _ = run(module, "eager", x, ids, weights)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, grads = run(module, "sparsemoe", x, ids, weights)
    assert got.dtype == torch.float32 and grads["gate_up_proj"].dtype == torch.float32
    assert_close_relative(got, expected, 3e-2, "output")


def test_unknown_flag_raises_naming_class_and_flag(monkeypatch):
    module = make_experts("swiglu", "sparsemoe")
    real = impl.inspect.signature

    def with_new_flag(fn):  # a future transformers whose decorator has a flag this module does not know
        sig = real(fn)
        if fn is use_experts_implementation:
            new = impl.inspect.Parameter("has_latent_proj", impl.inspect.Parameter.KEYWORD_ONLY, default=False)
            return sig.replace(parameters=[*sig.parameters.values(), new])
        return sig

    monkeypatch.setattr(impl.inspect, "signature", with_new_flag)
    module.has_latent_proj = True
    ids, weights = routing(3, 5, 2)
    with pytest.raises(UnsupportedExperts, match=r"Experts: has_latent_proj=True is not supported"):
        module(torch.randn(3, 24), ids, weights)
    module.has_latent_proj = False  # the default: nothing to refuse
    module.__dict__.pop(impl._CACHE_ATTR, None)
    module(torch.randn(3, 24), ids, weights)


@pytest.mark.parametrize(
    "layout,remove,flag",
    [("bias-transposed", "down_proj_bias", "has_bias=True"), ("post-norm", "post_expert_norm", "has_post_expert_norm"),
     ("swiglu", "gate_up_proj", "has_gate=True")],
)  # fmt: skip
def test_declared_part_missing_raises(layout, remove, flag):
    module = make_experts(layout, "sparsemoe")
    delattr(module, remove)
    ids, weights = routing(3, 5, 2)
    with pytest.raises(UnsupportedExperts, match=f"Experts declares {flag}.*no {remove}"):
        module(torch.randn(3, 24), ids, weights)


def test_bad_shapes_raise_one_clear_error():
    module = make_experts("swiglu", "sparsemoe")
    ids, weights = routing(3, 5, 2)
    with pytest.raises(ValueError, match=r"hidden states \[T, 23\] do not fit"):
        module(torch.randn(3, 23), ids, weights)
    with pytest.raises(ValueError, match="top_k_index .* must both be"):
        module(torch.randn(3, 24), ids, weights[:, :1])


def test_register_experts_rejects_unknown_backend():
    with pytest.raises(ValueError, match="backend 'fastest' is not one of"):
        register_experts("x", backend="fastest")


def test_layout_follows_changed_flags():
    module = make_experts("swiglu", "sparsemoe")
    assert read_layout(module).activation == "swiglu"
    module.act_fn = ACT2FN["gelu"]  # exact GELU: computed by the general path, with the module's function
    module.__dict__.pop(impl._CACHE_ATTR)
    assert read_layout(module).activation is None
    module.is_concatenated = False  # a flag change is seen without clearing anything
    assert read_layout(module).flags[0] is False


def test_every_combination_of_flags_is_handled():
    """All 32 combinations of the five flags either run and match the reference, or cannot be built."""
    for values in itertools.product([False, True], repeat=5):
        flags = dict(zip(impl.KNOWN_FLAGS, values))
        gate = _interleaved_clamped_gate if not flags["is_concatenated"] else None
        cls = experts_class(gate, **flags)
        module = cls(SimpleNamespace(_experts_implementation="eager"), E=4, D=8, F=6)
        x = torch.randn(5, 8)
        ids, weights = routing(5, 4, 2)
        expected, expected_grads = run(module, "eager", x, ids, weights)
        got, grads = run(module, "sparsemoe", x, ids, weights)
        assert_close_relative(got, expected, 1e-5, f"output {flags}")
        assert_grads_match(grads, expected_grads, 1e-5, str(flags))


def test_quantized_weights_are_refused_by_name():
    module = make_experts("swiglu", "sparsemoe")
    module.gate_up_proj = nn.Parameter(module.gate_up_proj.detach().to(torch.int8), requires_grad=False)
    ids, weights = routing(3, 5, 2)
    with pytest.raises(UnsupportedExperts, match=r"Experts: expert weights of dtype torch.int8/torch.float32"):
        module(torch.randn(3, 24), ids, weights)


@pytest.mark.parametrize("T", [1, 3, 40])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_inference_matches_reference(layout, T, native_kernels):
    """Without gradients (generation): the few-rows path (weights streamed once by the native kernel) and the
    per-expert loop, with and without the native CPU kernels."""
    module = make_experts(layout, "eager")
    x = torch.randn(T, 24, generator=torch.Generator().manual_seed(T)) * 2
    ids, weights = routing(T, 5, 3, placeholders=True)
    with torch.no_grad():
        expected = module(x, ids, weights)
        module.config._experts_implementation = "sparsemoe"
        got = module(x, ids, weights)
    assert_close_relative(got, expected, 1e-5, "output")


@pytest.mark.parametrize("layout", ["swiglu", "clamped-swiglu", "relu2-no-gate-transposed", "post-norm", "gpt-oss"])
def test_inference_bfloat16_close_to_float32(layout):
    module = make_experts(layout, "eager")
    x = torch.randn(2, 24, generator=torch.Generator().manual_seed(4))
    ids, weights = routing(2, 5, 2)
    with torch.no_grad():
        expected = module(x, ids, weights)
        module.to(torch.bfloat16).config._experts_implementation = "sparsemoe"
        got = module(x.bfloat16(), ids, weights.bfloat16())
    assert got.dtype == torch.bfloat16
    assert_close_relative(got, expected, 3e-2, "output")
