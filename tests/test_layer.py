"""The MoE layer as a user sees it: inputs, errors, routing variants, noise, dropout, shared experts, compile."""

from __future__ import annotations

import pytest
import torch
from helpers import forward_backward

from sparsemoe import MoE, MoEConfig
from sparsemoe.experts import mlp


def _layer(**fields) -> MoE:
    return MoE(MoEConfig(**{"dim": 12, "hidden_dim": 10, "num_experts": 6, "top_k": 2, **fields}))


# --- inputs ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(12,), (5, 12), (2, 3, 12), (2, 2, 2, 12)])
def test_any_leading_shape(shape):
    layer = _layer()
    x = torch.randn(shape)
    y = layer(x)
    assert y.shape == x.shape
    flat = layer(x.reshape(-1, 12)).reshape(shape)
    assert torch.allclose(y, flat, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dtypes_round_trip(dtype):
    layer = MoE(MoEConfig(dim=12, hidden_dim=10, num_experts=4), dtype=dtype)
    y = layer(torch.randn(3, 12, dtype=dtype))
    assert y.dtype == dtype and torch.isfinite(y.float()).all()
    assert layer.router.logits(torch.randn(3, 12, dtype=dtype)).dtype == torch.float32  # router math in fp32


def test_empty_input():
    layer = _layer()
    y = layer(torch.randn(0, 12))
    assert y.shape == (0, 12) and float(layer.aux_loss) == 0.0
    x = torch.randn(2, 0, 12, requires_grad=True)  # e.g. a micro-batch without tokens, in training
    layer.train()(x).sum().backward()  # as with an empty nn.Linear: a (zero) gradient, no error
    assert x.grad.shape == x.shape


@pytest.mark.parametrize(
    "x,error,match",
    [
        (torch.randn(4, 11), ValueError, r"shape \[\.\.\., 12\].*\(4, 11\)"),
        (torch.tensor(1.0), ValueError, r"shape \[\.\.\., 12\]"),
        (torch.ones(4, 12, dtype=torch.long), TypeError, "floating input"),
        (torch.randn(4, 12, dtype=torch.float64), TypeError, "differs from the layer's weights"),
        ([[0.0] * 12], TypeError, "torch.Tensor"),
    ],
)
def test_bad_input_gets_one_clear_error(x, error, match):
    with pytest.raises(error, match=match):
        _layer()(x)


def test_non_finite_logits_are_reported():
    layer = _layer()
    x = torch.randn(5, 12)
    x[2, 3] = float("nan")
    with pytest.raises(ValueError, match="not finite.*1 of 5 tokens"):
        layer(x)
    x[2, 3] = float("inf")
    with pytest.raises(ValueError, match="not finite"):
        layer(x)



# --- routing variants --------------------------------------------------------------------------------------


def test_mixtral_routing_by_hand():
    layer = _layer(backend="grouped")
    layer.eval()
    x = torch.randn(7, 12)
    probs = torch.softmax(x @ layer.router.weight.t(), dim=-1)
    top_w, top_i = probs.topk(2, dim=-1)
    top_w = top_w / top_w.sum(-1, keepdim=True)
    expected = torch.zeros_like(x)
    for t in range(7):
        for k in range(2):
            e = int(top_i[t, k])
            expected[t] += top_w[t, k] * mlp(x[t : t + 1], layer.experts.w_in[e], layer.experts.w_out[e], "swiglu")[0]
    assert torch.allclose(layer(x), expected, atol=1e-5)


def test_group_limited_routing_stays_inside_the_chosen_groups():
    layer = _layer(num_experts=8, top_k=2, router="group_limited", num_groups=4, topk_groups=1)
    routing = layer.router.route(layer.router.logits(torch.randn(50, 12)))
    groups = routing.expert_ids.view(50, 2) // 2
    assert torch.all(groups[:, 0] == groups[:, 1])


def test_noise_only_in_training():
    for noise in ("jitter", "gaussian", "gumbel"):
        layer = _layer(noise=noise, noise_eps=0.5)
        x = torch.randn(64, 12)
        layer.eval()
        assert torch.equal(layer(x), layer(x)), noise
        layer.train()
        routing_a = layer.router.route(layer.router.logits(x))
        routing_b = layer.router.route(layer.router.logits(x))
        assert not torch.equal(routing_a.weights, routing_b.weights) or not torch.equal(
            routing_a.expert_ids, routing_b.expert_ids
        ), noise


def test_gaussian_noise_weights_are_learned():
    layer = _layer(noise="gaussian")
    layer.train()
    layer(torch.randn(32, 12)).square().sum().backward()
    assert layer.router.noise_weight.grad is not None and layer.router.noise_weight.grad.abs().sum() > 0


def test_gumbel_noise_moves_selection_not_weights():
    layer = _layer(noise="gumbel", noise_eps=1.0, renormalize=False)
    layer.train()
    x = torch.randn(200, 12)
    logits = layer.router.logits(x)
    routing = layer.router.route(logits)
    probs = torch.softmax(logits, -1)
    assert torch.allclose(routing.weights, probs.gather(1, routing.expert_ids.view(200, 2)).reshape(-1))
    clean = probs.topk(2, -1).indices
    assert not torch.equal(routing.expert_ids.view(200, 2), clean)  # sampling changed some selections


def test_expert_dropout_renormalises_over_the_kept_experts():
    layer = _layer(num_experts=8, top_k=2, expert_dropout=0.5)
    layer.train()
    x = torch.randn(40, 12)
    torch.manual_seed(3)
    routing = layer.router.route(layer.router.logits(x))
    used = routing.expert_ids.unique()
    assert 2 <= used.numel() < 8  # some experts dropped, at least top_k kept
    assert torch.allclose(routing.weights.view(40, 2).sum(-1), torch.ones(40))
    never_chosen = [e for e in range(8) if e not in used.tolist()]
    dropped = routing.probs[:, never_chosen].amax(0) == 0  # dropped experts get zero probability
    assert dropped.any()
    layer.eval()
    assert layer.router.route(layer.router.logits(x)).expert_ids.unique().numel() > used.numel()


def test_dropout_inside_experts_only_in_training():
    layer = _layer(dropout=0.5, backend="grouped")
    x = torch.randn(16, 12)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    assert not torch.equal(layer(x), layer(x))


def test_eval_capacity_factor_and_dropped_fraction():
    layer = _layer(capacity_factor=0.5, eval_capacity_factor=float("inf"))
    x = torch.randn(48, 12)
    layer.train()
    layer(x)
    assert layer.stats.dropped_fraction > 0
    layer.eval()
    layer(x)
    assert float(layer.stats.dropped_fraction) == 0.0


def test_dropped_tokens_contribute_zero():
    layer = _layer(num_experts=2, top_k=1, capacity_factor=0.25, backend="grouped")
    layer.train()
    x = torch.randn(16, 12)
    y = layer(x)
    zero_rows = (y.abs().sum(-1) == 0).sum().item()
    assert zero_rows == round(16 * float(layer.stats.dropped_fraction))  # residual carries those tokens
    assert zero_rows >= 16 - 2 * 2


def test_shared_experts_add_an_always_on_mlp():
    layer = _layer(num_shared_experts=2, backend="grouped")
    assert layer.shared_experts.hidden_dim == 20
    x = torch.randn(9, 12)
    routed_only = _layer(backend="grouped")
    routed_only.load_state_dict({k: v for k, v in layer.state_dict().items() if not k.startswith("shared_experts")})
    shared = mlp(x, layer.shared_experts.w_in[0], layer.shared_experts.w_out[0], "swiglu")
    assert torch.allclose(layer(x), routed_only(x) + shared, atol=1e-5)


def test_expert_weights_are_stacked_with_linear_layout():
    layer = _layer(activation="swiglu")
    assert layer.experts.w_in.shape == (6, 20, 12) and layer.experts.w_out.shape == (6, 12, 10)
    assert _layer(activation="relu").experts.w_in.shape == (6, 10, 12)
    names = {n for n, _ in layer.named_parameters()}
    assert names == {"router.weight", "experts.w_in", "experts.w_out"}


def test_drop_in_for_a_feed_forward_block_in_a_training_loop():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 12), _layer(backend="auto"), torch.nn.Linear(12, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randn(128, 8)
    target = x[:, :1] * x[:, 1:2]
    losses = []
    for _ in range(60):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


# --- compile ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields",
    [
        dict(backend="grouped", num_shared_experts=1, seq_aux_loss_coef=0.01, z_loss_coef=1e-3),
        dict(backend="capacity", capacity_factor=1.0, capacity_priority="weight", score_func="sigmoid"),
        dict(backend="auto", router="expert_choice"),
    ],
    ids=["grouped", "capacity", "expert-choice"],
)
def test_compile_fullgraph_matches_eager(fields):
    torch._dynamo.reset()
    layer = _layer(**fields)
    layer.train()
    x = torch.randn(2, 7, 12)
    y_eager, g_eager = forward_backward(layer, x)
    g_eager = {k: v.clone() for k, v in g_eager.items()}
    aux_eager, stats_eager = layer.aux_loss.clone(), layer.stats
    layer.zero_grad()
    compiled = torch.compile(layer, fullgraph=True)
    y_comp, g_comp = forward_backward(compiled, x)
    g_comp = {k.removeprefix("_orig_mod."): v for k, v in g_comp.items()}
    assert torch.allclose(y_comp, y_eager, atol=1e-5)
    for name in g_eager:
        assert torch.allclose(g_comp[name], g_eager[name], atol=1e-5), name
    assert layer.stats is not stats_eager  # the compiled forward's own statistics
    assert torch.allclose(layer.aux_loss, aux_eager)
    torch.testing.assert_close(layer.stats.tokens_per_expert, stats_eager.tokens_per_expert)
    torch.testing.assert_close(layer.stats.router_entropy, stats_eager.router_entropy)


@pytest.mark.parametrize("backend", ["auto", "grouped", "capacity", "decode", "reference"])
def test_autocast_runs_experts_in_the_autocast_dtype(backend):
    layer = _layer(backend=backend, capacity_factor=2.0 if backend == "capacity" else None)
    x = torch.randn(3, 4, 12, requires_grad=True)
    expected = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        assert layer.router.logits(x.reshape(-1, 12)).dtype == torch.float32  # router math stays fp32
    y.float().square().sum().backward()
    assert y.dtype == torch.float32  # the input's dtype
    assert torch.allclose(y, expected, atol=5e-2, rtol=5e-2)  # bf16 expert GEMMs
    assert not torch.equal(y, expected)
    assert x.grad is not None and layer.experts.w_in.grad.dtype == torch.float32


def test_compile_fullgraph_inference_with_the_decode_backend():
    torch._dynamo.reset()
    layer = _layer(backend="decode", num_experts=8, top_k=2)
    layer.eval()
    x = torch.randn(1, 3, 12)  # a decode-sized batch: T*K <= 4E
    with torch.no_grad():
        eager = layer(x)
        compiled = torch.compile(layer, fullgraph=True)(x)
    assert torch.allclose(compiled, eager, atol=1e-6)


def test_decode_backend_under_fake_tensors_runs_the_ops_fake_implementation():
    """Tracing with fake tensors (as torch.export and the compiler do) must not reach the native kernel."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    layer = _layer(backend="decode", num_experts=8, top_k=2, check_finite=False)
    layer.eval()
    with torch.no_grad(), FakeTensorMode(allow_non_fake_inputs=True) as mode:
        y = layer(mode.from_tensor(torch.randn(1, 3, 12)))
    assert y.shape == (1, 3, 12) and type(y) is not torch.Tensor


def test_stats_are_computed_when_read_from_the_last_forward():
    """Statistics are computed on first read: reading them late gives the last forward's, and a value
    read earlier is not changed by later forwards."""
    layer = _layer(num_experts=4, top_k=2, capacity_factor=0.5)
    layer.eval()
    x_a, x_b = torch.randn(20, 12), torch.randn(6, 12)
    with torch.inference_mode():
        layer(x_a)
        stats_a = layer.stats
        counts_a = stats_a.tokens_per_expert.clone()
        layer(x_b)
        layer(x_a)
        layer(x_b)  # never read in between
        late_b = layer.stats
        layer(x_b)
        fresh_b = layer.stats
    assert torch.equal(stats_a.tokens_per_expert, counts_a)
    assert late_b is not fresh_b and late_b.as_floats() == fresh_b.as_floats()
    assert torch.equal(late_b.tokens_per_expert, fresh_b.tokens_per_expert)
    assert late_b.tokens_per_expert.sum() == round(6 * 2 * (1 - late_b.dropped_fraction.item()))
    assert not torch.equal(counts_a, late_b.tokens_per_expert)


def _graph_holders(obj, path: str, seen: set) -> list[str]:
    """Paths of the tensors reachable from obj's attributes that carry an autograd graph."""
    if id(obj) in seen:
        return []
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return [path] if obj.grad_fn is not None else []
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    elif hasattr(obj, "__dict__"):
        items = vars(obj).items()
    else:
        return []
    return [p for key, value in items for p in _graph_holders(value, f"{path}.{key}", seen)]


@pytest.mark.parametrize("grad", [True, False])
def test_the_layer_holds_no_autograd_graph_after_a_forward(grad):
    """With or without gradients, what the layer keeps after a forward (aux_loss, statistics or what they
    are computed from) holds no graph, so a forward whose output is dropped frees its activations."""
    layer = _layer(num_experts=4, top_k=2)
    with torch.set_grad_enabled(grad):
        y = layer(torch.randn(9, 12, requires_grad=True))
    assert y.requires_grad == grad
    assert _graph_holders(layer, "layer", set()) == []
    assert layer.stats.tokens_per_expert.sum() == 18


@pytest.mark.parametrize("backend", ["auto", "grouped", "capacity", "decode"])
def test_the_layer_runs_on_the_meta_device_and_initialises_after_to_empty(backend):
    """On meta tensors the layer gives shapes and losses without memory (no autocast query may fail there);
    to_empty() and reset_parameters() then give a working layer with a zero selection bias."""
    layer = MoE(MoEConfig(dim=12, hidden_dim=10, num_experts=6, top_k=2, num_shared_experts=1,
                          shared_expert_gate=True, noise="gaussian", bias_balancing=True, backend=backend),
                device="meta")  # fmt: skip
    y = layer(torch.randn(3, 5, 12, device="meta"))
    assert y.shape == (3, 5, 12) and y.device.type == "meta" and layer.aux_loss.device.type == "meta"
    layer.to_empty(device="cpu")
    with torch.no_grad():
        for t in list(layer.parameters()) + list(layer.buffers()):
            t.fill_(float("nan"))
    layer.reset_parameters()
    assert all(torch.isfinite(t).all() for t in list(layer.parameters()) + list(layer.buffers()))
    assert (layer.router.expert_bias == 0).all() and (layer.shared_experts.gate_weight == 0).all()
    assert (layer.router.noise_weight == 0).all()
    assert torch.isfinite(layer(torch.randn(5, 12))).all()


def test_autocast_accepts_inputs_in_the_autocast_dtype():
    model = torch.nn.Sequential(torch.nn.Linear(12, 12), _layer(backend="grouped"))
    x = torch.randn(5, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)  # the Linear hands the MoE a bfloat16 activation
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert model[1].experts.w_out.grad is not None
    with pytest.raises(TypeError, match="differs from the layer's weights"):
        model[1](x.to(torch.bfloat16))  # outside autocast the mismatch is still an error


def test_inference_defers_the_balancing_losses_until_read():
    """Without gradients the losses and statistics are computed when first read, and are what a forward
    with gradients computes; a model forward with with_aux_loss=False leaves them unread."""
    from sparsemoe.model import MoETransformer, preset

    torch.manual_seed(0)
    cfg = MoEConfig(dim=16, hidden_dim=8, num_experts=4, top_k=2, aux_loss_coef=0.01, z_loss_coef=0.001)
    layer = MoE(cfg).eval()
    x = torch.randn(5, 16)
    layer(x)  # with gradients: computed now
    eager_loss, eager_stats = layer.aux_loss.detach(), layer.stats
    with torch.no_grad():
        layer(x)
    assert layer.__dict__["_aux_loss"] is None  # deferred
    assert torch.allclose(layer.aux_loss, eager_loss) and eager_loss > 0
    assert torch.equal(layer.stats.tokens_per_expert, eager_stats.tokens_per_expert)
    with torch.no_grad():
        layer(x)
    assert torch.allclose(layer.stats.losses["z_loss"], eager_stats.losses["z_loss"])  # stats first, then the loss
    assert torch.allclose(layer.aux_loss, eager_loss)

    model = MoETransformer(preset("tiny")).eval()
    ids = torch.randint(0, 256, (1, 6))
    with torch.no_grad():
        assert model(ids, with_aux_loss=False).aux_loss is None
        assert all(m.__dict__["_aux_loss"] is None for m in model.moe_layers)
        deferred = model(ids).aux_loss
    assert torch.allclose(deferred, model(ids).aux_loss.detach())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 5])
def test_decode_step_from_the_routers_choices_matches_the_plan_path(monkeypatch, dtype, tokens):
    """A decode step runs the experts straight from the router's top-k choices (one native call, no plan):
    the same output and statistics as through the plan."""
    from sparsemoe import dispatch
    from sparsemoe.ops import cpu_kernels

    if not cpu_kernels.available():
        pytest.skip("native CPU kernels unavailable")
    torch.manual_seed(0)
    layer = MoE(MoEConfig(dim=32, hidden_dim=24, num_experts=6, top_k=2, aux_loss_coef=0.01)).to(dtype).eval()
    x = torch.randn(tokens, 32).to(dtype)
    calls = []
    real = cpu_kernels.decode_mlp_choices
    monkeypatch.setattr(cpu_kernels, "decode_mlp_choices", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        y = layer(x)
    stats, aux = layer.stats, layer.aux_loss
    assert calls == [1]
    monkeypatch.setattr(layer, "_decode_from_choices", lambda x_TD, routing: None)
    with torch.no_grad():
        expected = layer(x)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(y, expected, rtol=tol, atol=tol)
    assert torch.equal(stats.tokens_per_expert, layer.stats.tokens_per_expert)
    assert torch.allclose(aux, layer.aux_loss)
    assert dispatch.run_from_choices("grouped", x, layer.router.route(layer.router.logits(x)), layer.experts) is None
    with pytest.raises(ValueError, match="expert id"):
        real(x, torch.tensor([0, 6] * tokens), torch.ones(2 * tokens), 2, layer.experts.w_in, layer.experts.w_out, "swiglu")
