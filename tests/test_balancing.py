"""Load balancing really works: aux loss and bias balancing even out a skewed load; z-loss shrinks logits.

Also: loss values on known inputs, and how losses reach the gradient (inject vs return, no double count).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from sparsemoe import MoE, MoEConfig, set_aux_loss_scale, update_expert_biases
from sparsemoe.balancing import router_z_loss, sequence_aux_loss, switch_aux_loss, tokens_per_expert
from sparsemoe.routing import token_choice

D, E, K, T = 16, 8, 2, 256


def _skewed_layer(**fields) -> tuple[MoE, torch.Tensor]:
    """A layer whose router sends almost every token of `x` to experts 0 and 1 (max/mean load ~4)."""
    cfg = MoEConfig(dim=D, hidden_dim=8, num_experts=E, top_k=K, **fields)
    layer = MoE(cfg)
    direction = torch.nn.functional.normalize(torch.randn(D), dim=0)
    x = 0.6 * torch.randn(T, D) + direction  # every token shares one direction...
    with torch.no_grad():
        layer.router.weight.normal_(0, 0.05)
        layer.router.weight[0] += 3 * direction  # ...which experts 0 and 1 like
        layer.router.weight[1] += 2.5 * direction
    return layer, x


def _load_ratio(layer: MoE, x: torch.Tensor) -> float:
    layer(x)
    return float(layer.stats.load_imbalance)


def test_aux_loss_training_balances_a_skewed_router():
    layer, x = _skewed_layer(aux_loss_coef=1.0, aux_loss_mode="return")
    before = _load_ratio(layer, x)
    opt = torch.optim.Adam(layer.router.parameters(), lr=0.05)
    for _ in range(60):  # train only the router, only on the auxiliary loss
        opt.zero_grad()
        layer(x)
        layer.aux_loss.backward()
        opt.step()
    after = _load_ratio(layer, x)
    assert before > 3.0, before
    assert after < 1.5 and after < 0.4 * before, (before, after)


def test_sequence_aux_loss_training_balances_a_skewed_router():
    layer, x = _skewed_layer(aux_loss_coef=0.0, seq_aux_loss_coef=1.0, aux_loss_mode="return")
    x = x.view(8, T // 8, D)  # 8 sequences
    before = _load_ratio(layer, x)
    opt = torch.optim.Adam(layer.router.parameters(), lr=0.05)
    for _ in range(60):
        opt.zero_grad()
        layer(x)
        layer.aux_loss.backward()
        opt.step()
    after = _load_ratio(layer, x)
    assert after < 1.5 and after < 0.4 * before, (before, after)


@pytest.mark.parametrize(
    "score_func,rate,on_probs", [("sigmoid", 0.005, False), ("softmax", 0.02, False), ("softmax", 0.002, True)]
)
def test_bias_balancing_evens_the_load_without_gradients(score_func, rate, on_probs):
    layer, x = _skewed_layer(
        aux_loss_coef=0.0, bias_balancing=True, bias_update_rate=rate, score_func=score_func, bias_on_probs=on_probs
    )
    layer.train()
    before = _load_ratio(layer, x)
    weight_before = layer.router.weight.detach().clone()
    with torch.no_grad():
        for _ in range(150):  # each training forward updates the bias from the observed load
            layer(x)
    after = _load_ratio(layer, x)
    assert before > 3.0, before
    assert after < 1.5 and after < 0.4 * before, (before, after)
    assert torch.equal(layer.router.weight, weight_before)  # only the bias moved
    assert layer.router.expert_bias[0] < 0 < layer.router.expert_bias[7]


def test_bias_update_step_moves_once_from_the_load_of_every_forward_since():
    """bias_update="step": forwards only count; update_expert_biases applies the summed load once."""
    rate = 0.01
    layer, x = _skewed_layer(aux_loss_coef=0.0, bias_balancing=True, bias_update="step", bias_update_rate=rate)
    layer.train()
    counts = torch.zeros(E)
    for half in x.chunk(2):  # two micro-batches of one step
        layer(half)
        counts += layer.stats.tokens_per_expert
        assert torch.all(layer.router.expert_bias == 0)  # nothing moves before the update
    torch.testing.assert_close(layer.router.pending_load, counts)
    assert update_expert_biases(torch.nn.Sequential(layer, torch.nn.Linear(D, D))) == 1
    torch.testing.assert_close(layer.router.expert_bias, rate * torch.sign(counts.mean() - counts))
    assert torch.all(layer.router.pending_load == 0)
    layer.eval()
    layer(x)  # evaluation counts nothing
    assert torch.all(layer.router.pending_load == 0)
    assert "pending_load" not in layer.state_dict()  # a step's count is not model state
    forward_mode, _ = _skewed_layer(bias_balancing=True)
    assert forward_mode.router.pending_load is None and update_expert_biases(forward_mode) == 0


def test_bias_update_step_evens_the_load():
    layer, x = _skewed_layer(
        aux_loss_coef=0.0, bias_balancing=True, bias_update="step", bias_update_rate=0.005, score_func="sigmoid"
    )
    layer.train()
    before = _load_ratio(layer, x)
    with torch.no_grad():
        for _ in range(150):
            layer(x)
            update_expert_biases(layer)
    after = _load_ratio(layer, x)
    assert after < 1.5 and after < 0.4 * before, (before, after)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_the_selection_bias_and_the_counts_stay_float32_when_the_layer_is_cast(dtype):
    """In bfloat16 a bias of 1 could not move by 1e-3 and counts past 256 would round: casting the layer
    casts its weights, not these buffers (same tensors, exact values); moving it still moves them."""
    layer, x = _skewed_layer(bias_balancing=True, bias_update="step", score_func="sigmoid")
    with torch.no_grad():
        layer.router.expert_bias.copy_(torch.linspace(0.999, 1.001, E))
    bias, values = layer.router.expert_bias, layer.router.expert_bias.clone()
    layer.to(dtype).train()
    assert layer.router.weight.dtype == layer.experts.w_in.dtype == dtype
    assert layer.router.expert_bias is bias and torch.equal(bias, values)
    assert layer.router.pending_load.dtype == torch.float32
    layer(x.to(dtype))
    update_expert_biases(layer)
    moved = layer.router.expert_bias - values
    assert torch.all(torch.isclose(moved.abs(), torch.tensor(1e-3), rtol=1e-3) | (moved == 0)) and moved.any()
    with torch.device("meta"):
        meta = MoE(layer.config).to(dtype)
    meta.to_empty(device="cpu")
    assert meta.router.expert_bias.dtype == meta.router.pending_load.dtype == torch.float32


def _checkpointed_step(fields: dict, checkpointed: bool, reentrant: bool):
    torch.manual_seed(0)
    layer, x = _skewed_layer(**fields)
    layer.train()
    x = x.clone().requires_grad_(True)
    y = checkpoint(layer, x, use_reentrant=reentrant) if checkpointed else layer(x)
    y.square().sum().backward()
    update_expert_biases(layer)
    grads = [x.grad] + [p.grad for p in layer.parameters()]
    return grads, layer.router.expert_bias.clone()


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_activation_checkpointing_with_bias_update_step_gives_the_plain_gradients(reentrant):
    """The recomputed forward must route as the first did: with bias_update="step" the bias holds still
    until the update, and the recomputation's tokens are not counted twice."""
    fields = dict(bias_balancing=True, bias_update="step", bias_update_rate=0.1, score_func="sigmoid")
    want_grads, want_bias = _checkpointed_step(fields, checkpointed=False, reentrant=reentrant)
    got_grads, got_bias = _checkpointed_step(fields, checkpointed=True, reentrant=reentrant)
    for got, want in zip(got_grads, want_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert torch.equal(got_bias, want_bias) and want_bias.abs().sum() > 0


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_activation_checkpointing_with_bias_update_forward_is_refused(reentrant):
    """bias_update="forward" moves the bias in the first forward; its recomputation would route elsewhere
    (gradients off by O(1) when it was allowed), so the recomputed forward refuses to run."""
    fields = dict(bias_balancing=True, bias_update_rate=0.1, score_func="sigmoid")
    with pytest.raises(RuntimeError, match="bias_update='step'"):
        _checkpointed_step(fields, checkpointed=True, reentrant=reentrant)
    _checkpointed_step(dict(fields, bias_balancing=False), checkpointed=True, reentrant=reentrant)  # no bias: fine


def test_compiled_activation_checkpointing_with_bias_update_step_gives_the_plain_gradients():
    """torch.compile around checkpoint(layer): dynamo refuses a checkpointed forward's side effects (the layer
    stores aux_loss and stats, and counts load) unless told they need not be replayed in the backward, which
    is the behaviour wanted here; then the gradients and the bias update are those without checkpointing."""
    torch._dynamo.reset()
    fields = dict(bias_balancing=True, bias_update="step", bias_update_rate=0.1, score_func="sigmoid")
    want_grads, want_bias = _checkpointed_step(fields, checkpointed=False, reentrant=False)
    torch.manual_seed(0)
    layer, x = _skewed_layer(**fields)
    layer.train()
    x = x.clone().requires_grad_(True)
    with torch._dynamo.config.patch(skip_fwd_side_effects_in_bwd_under_checkpoint=True):
        step = torch.compile(lambda x: checkpoint(layer, x, use_reentrant=False), fullgraph=True)
        step(x).square().sum().backward()
    update_expert_biases(layer)
    for got, want in zip([x.grad] + [p.grad for p in layer.parameters()], want_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert torch.equal(layer.router.expert_bias, want_bias)


def test_bias_update_step_counts_under_compile():
    torch._dynamo.reset()
    layer, x = _skewed_layer(bias_balancing=True, bias_update="step", score_func="sigmoid")
    layer.train()
    compiled = torch.compile(layer, fullgraph=True)
    compiled(x).sum().backward()
    compiled(x).sum().backward()
    counts = layer.stats.tokens_per_expert
    torch.testing.assert_close(layer.router.pending_load, 2 * counts)
    update_expert_biases(layer)
    torch.testing.assert_close(layer.router.expert_bias, 1e-3 * torch.sign(counts.mean() - counts))


def test_bias_is_not_updated_in_eval_and_does_not_touch_weights():
    layer, x = _skewed_layer(aux_loss_coef=0.0, bias_balancing=True, score_func="sigmoid", renormalize=False)
    layer.eval()
    layer(x)
    assert torch.all(layer.router.expert_bias == 0)
    # A bias changes which experts are selected but the combine weights stay the raw scores.
    with torch.no_grad():
        layer.router.expert_bias.copy_(torch.linspace(-1, 1, E))
    logits = layer.router.logits(x)
    routing = layer.router.route(logits)
    scores = torch.sigmoid(logits).gather(1, routing.expert_ids.view(T, K)).reshape(-1)
    assert torch.allclose(routing.weights, scores)


def test_softmax_bias_moves_logits_or_probabilities():
    """bias_on_probs (ERNIE 4.5) selects by softmax(logits) + bias; the default by softmax(logits + bias).
    Both keep the unbiased probabilities, renormalised, as combine weights."""
    logits = torch.tensor([[2.0, 1.9, 0.0, -3.0]])
    bias = torch.tensor([0.0, 0.0, 0.6, 0.0])
    probs = torch.softmax(logits, dim=-1)  # [0.49, 0.44, 0.06, 0.003]: +0.6 lifts expert 2 to 0.66
    for on_probs, chosen in [(True, [2, 0]), (False, [0, 1])]:  # as a logit, +0.6 leaves expert 2 at 0.6
        cfg = MoEConfig(dim=4, num_experts=4, top_k=2, bias_balancing=True, bias_on_probs=on_probs)
        routing = token_choice(logits, cfg, training=False, bias_E=bias)
        assert routing.expert_ids.tolist() == chosen
        expected = probs[0, chosen] / probs[0, chosen].sum()
        torch.testing.assert_close(routing.weights, expected)


def test_the_fused_router_is_bypassed_for_a_bias_on_probabilities(monkeypatch):
    """The fused GPU router biases softmax logits only: with bias_on_probs the PyTorch routing runs instead."""
    import sparsemoe.routing as routing

    def fused_would_be_wrong(*args):
        raise AssertionError("the fused router was called")

    monkeypatch.setattr(routing, "_fused_topk", (fused_would_be_wrong, lambda logits: True))
    cfg = MoEConfig(dim=4, num_experts=4, top_k=2, bias_balancing=True, bias_on_probs=True)
    logits, bias = torch.tensor([[2.0, 1.9, 0.0, -3.0]]), torch.tensor([0.0, 0.0, 0.6, 0.0])
    assert token_choice(logits, cfg, training=False, bias_E=bias).expert_ids.tolist() == [2, 0]
    with pytest.raises(AssertionError, match="fused router was called"):  # the stand-in is used otherwise
        token_choice(logits, dataclasses.replace(cfg, bias_on_probs=False), training=False, bias_E=bias)


@pytest.mark.parametrize(
    "fields,message",
    [
        (dict(bias_on_probs=True), "unless bias_balancing=True with score_func='softmax'"),
        (dict(bias_on_probs=True, bias_balancing=True, score_func="sigmoid"), "unless bias_balancing=True"),
        (dict(bias_on_probs=True, bias_balancing=True, score_order="after_topk"), "score_order='after_topk'"),
    ],
)
def test_bias_on_probs_needs_softmax_bias_balancing(fields, message):
    with pytest.raises(ValueError, match=message):
        MoEConfig(dim=4, num_experts=4, top_k=2, **fields)


def test_z_loss_shrinks_router_logits():
    layer, x = _skewed_layer(aux_loss_coef=0.0, z_loss_coef=1.0, aux_loss_mode="return")
    with torch.no_grad():
        layer.router.weight.mul_(3)
    def magnitude() -> tuple[float, float]:  # per token, averaged: |logsumexp(logits)|, largest logit
        logits = layer.router.logits(x)
        return logits.logsumexp(-1).abs().mean().item(), logits.max(-1).values.mean().item()

    before = magnitude()
    opt = torch.optim.Adam(layer.router.parameters(), lr=0.1)
    for _ in range(60):
        opt.zero_grad()
        layer(x)
        layer.aux_loss.backward()
        opt.step()
    after = magnitude()
    assert after[0] < 0.25 * before[0] and after[1] < 0.25 * before[1], (before, after)


def test_loss_values_on_known_routing():
    # Perfectly uniform routing: both balance losses equal 1.
    probs = torch.full((8, 4), 0.25)
    ids_TK = torch.tensor([[0, 1], [2, 3]] * 4)
    counts = tokens_per_expert(ids_TK.reshape(-1), 4)
    assert switch_aux_loss(probs, counts, 2).item() == pytest.approx(1.0)
    assert sequence_aux_loss(probs, ids_TK, seq_len=4).item() == pytest.approx(1.0)
    # Balanced over the batch but each sequence uses only half the experts: sequence-wise loss sees it.
    ids_TK = torch.tensor([[0, 1]] * 4 + [[2, 3]] * 4)
    counts = tokens_per_expert(ids_TK.reshape(-1), 4)
    probs = torch.cat([torch.tensor([[0.5, 0.5, 0, 0]] * 4), torch.tensor([[0, 0, 0.5, 0.5]] * 4)])
    assert switch_aux_loss(probs, counts, 2).item() == pytest.approx(1.0)
    assert sequence_aux_loss(probs, ids_TK, seq_len=4).item() == pytest.approx(2.0)
    # z-loss of zero logits is log(E)^2.
    assert router_z_loss(torch.zeros(3, 4)).item() == pytest.approx(torch.log(torch.tensor(4.0)).item() ** 2)


def _router_grad(layer: MoE, x: torch.Tensor, add_returned_aux: bool) -> torch.Tensor:
    layer.zero_grad()
    y = layer(x)
    loss = y.square().mean()
    if add_returned_aux:
        loss = loss + layer.aux_loss
    loss.backward()
    return layer.router.weight.grad.clone()


def test_injected_losses_equal_returned_losses_and_cannot_double_count():
    cfg = MoEConfig(dim=D, hidden_dim=8, num_experts=E, top_k=K, aux_loss_coef=0.3, z_loss_coef=0.1, seq_aux_loss_coef=0.2)
    inject = MoE(cfg)
    ret = MoE(dataclasses.replace(cfg, aux_loss_mode="return"))
    ret.load_state_dict(inject.state_dict())
    x = torch.randn(4, 16, D)
    g_inject = _router_grad(inject, x, add_returned_aux=False)
    g_return = _router_grad(ret, x, add_returned_aux=True)
    assert torch.allclose(g_inject, g_return, atol=1e-7)
    assert torch.allclose(inject.aux_loss, ret.aux_loss.detach())
    # In inject mode the exposed value is detached: adding it again leaves the gradient unchanged.
    assert not inject.aux_loss.requires_grad
    assert torch.allclose(_router_grad(inject, x, add_returned_aux=True), g_inject, atol=1e-7)
    # Without the losses the router gradient differs (so the test above is not vacuous).
    plain = MoE(dataclasses.replace(cfg, aux_loss_coef=0.0, z_loss_coef=0.0, seq_aux_loss_coef=0.0))
    plain.load_state_dict(inject.state_dict())
    assert not torch.allclose(_router_grad(plain, x, add_returned_aux=False), g_inject, atol=1e-6)


def test_aux_loss_scale_scales_only_the_injected_gradient():
    cfg = MoEConfig(dim=D, hidden_dim=8, num_experts=E, top_k=K, aux_loss_coef=1.0)
    layer = MoE(cfg)
    x = torch.randn(32, D)
    layer.zero_grad()
    layer(x).sum().mul(0).backward()  # only the injected aux gradient reaches the router
    full = layer.router.weight.grad.clone()
    set_aux_loss_scale(layer, 0.25)
    layer.zero_grad()
    layer(x).sum().mul(0).backward()
    assert full.abs().sum() > 0
    assert torch.allclose(layer.router.weight.grad, 0.25 * full, atol=1e-8)


def test_stats_are_detached_and_consistent():
    layer = MoE(MoEConfig(dim=D, hidden_dim=8, num_experts=4, top_k=2, capacity_factor=0.5))
    layer.train()
    layer(torch.randn(40, D))
    s = layer.stats
    assert not any(t.requires_grad for t in (s.tokens_per_expert, s.dropped_fraction, s.router_entropy))
    assert s.tokens_per_expert.sum().item() == pytest.approx(80 * (1 - s.dropped_fraction.item()))
    assert torch.all(s.tokens_per_expert <= 10)  # C = ceil(0.5 * 40 * 2 / 4)
    assert 0 < s.router_entropy.item() <= torch.log(torch.tensor(4.0)).item() + 1e-6
    assert set(s.losses) == {"aux_loss"}
    assert set(s.as_floats()) >= {"dropped_fraction", "router_entropy", "load_imbalance", "aux_loss"}
