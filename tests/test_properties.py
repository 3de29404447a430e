"""Property tests of routing and the dispatch plan (hypothesis): weights, top-k, capacity, conservation."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsemoe import MoEConfig, build_plan
from sparsemoe.routing import Router

SETTINGS = settings(max_examples=40, deadline=None)


@st.composite
def routing_setups(draw, router="topk"):
    E = draw(st.integers(1, 12))
    K = draw(st.integers(1, E))
    T = draw(st.integers(1, 40))
    fields = dict(
        dim=8,
        hidden_dim=4,
        num_experts=E,
        top_k=K,
        router=router,
        score_func=draw(st.sampled_from(["softmax", "sigmoid"])),
        renormalize=draw(st.booleans()),
        route_scale=draw(st.sampled_from([1.0, 2.5])),
    )
    if fields["score_func"] == "softmax":
        fields["score_order"] = draw(st.sampled_from(["before_topk", "after_topk"]))
    if draw(st.booleans()):
        fields["capacity_factor"] = draw(st.floats(0.1, 3.0))
        fields["capacity_priority"] = draw(st.sampled_from(["position", "weight"]))
    seed = draw(st.integers(0, 2**16))
    return MoEConfig(**fields), T, seed


def _route(cfg: MoEConfig, T: int, seed: int):
    torch.manual_seed(seed)
    router = Router(cfg)
    router.weight.data.normal_(0, 1.0)
    x = torch.randn(T, cfg.dim)
    capacity = cfg.capacity(T, training=True)
    routing = router.route(router.logits(x), capacity)
    return routing, build_plan(routing, capacity, cfg.capacity_priority), capacity


@SETTINGS
@given(routing_setups())
def test_token_choice_weights_and_topk(setup):
    cfg, T, seed = setup
    routing, _, _ = _route(cfg, T, seed)
    K = cfg.top_k
    ids_TK = routing.expert_ids.view(T, K)
    w_TK = routing.weights.view(T, K)
    # Each token reaches exactly K distinct experts.
    assert torch.all(ids_TK.sort(dim=1).values.diff(dim=1) > 0) if K > 1 else True
    assert torch.all((ids_TK >= 0) & (ids_TK < cfg.num_experts))
    assert torch.all(w_TK >= 0)
    sums = w_TK.sum(dim=1)
    if cfg.score_order == "after_topk" or cfg.renormalize:
        assert torch.allclose(sums, torch.full_like(sums, cfg.route_scale), atol=1e-5)
    else:  # unnormalised: the chosen probabilities (softmax) sum to at most 1, sigmoid scores to at most K
        bound = cfg.route_scale * (1.0 if cfg.score_func == "softmax" else K)
        assert torch.all(sums <= bound + 1e-5)
    # The chosen experts are the top-K by score: no unchosen expert scores higher than a chosen one.
    if cfg.noise == "none" and not cfg.bias_balancing:
        probs = routing.probs
        chosen_min = probs.gather(1, ids_TK).min(dim=1).values
        mask = torch.ones_like(probs, dtype=torch.bool).scatter_(1, ids_TK, False)
        unchosen_max = probs.masked_fill(~mask, -1).max(dim=1).values
        assert torch.all(unchosen_max <= chosen_min + 1e-6)


@SETTINGS
@given(routing_setups())
def test_plan_conserves_assignments_and_respects_capacity(setup):
    cfg, T, seed = setup
    routing, plan, capacity = _route(cfg, T, seed)
    E, N = cfg.num_experts, T * cfg.top_k
    assert plan.num_rows == N
    kept = plan.expert_ids < E
    # Conservation: every assignment appears exactly once, kept (with its expert) or dropped.
    original = list(zip(routing.token_ids.tolist(), routing.expert_ids.tolist()))
    kept_pairs = list(zip(plan.token_ids[kept].tolist(), plan.expert_ids[kept].tolist()))
    assert len(set(kept_pairs)) == len(kept_pairs) and set(kept_pairs) <= set(original)
    assert sorted(plan.token_ids.tolist()) == sorted(t for t, _ in original)
    assert len(kept_pairs) + int((~kept).sum()) == N
    # Counts, offsets and the sorted layout agree; kept rows come first, grouped by expert.
    counts = torch.bincount(plan.expert_ids[kept], minlength=E)
    assert torch.equal(counts, plan.counts)
    assert torch.equal(plan.offsets, counts.cumsum(0))
    assert torch.all(plan.expert_ids[kept].diff() >= 0)
    assert torch.all(kept[: int(kept.sum())])
    # Capacity is never exceeded, and nothing is dropped where it was not needed.
    if capacity is None:
        assert bool(kept.all())
    else:
        assert int(plan.counts.max()) <= capacity
        demand = torch.bincount(routing.expert_ids, minlength=E)
        assert torch.equal(plan.counts, demand.clamp(max=capacity))
        assert torch.all(plan.slots[kept] < capacity)
    # Dropped rows carry zero weight.
    assert torch.all(plan.weights[~kept] == 0)


@SETTINGS
@given(routing_setups(router="expert_choice"))
def test_expert_choice_gives_each_expert_exactly_c_tokens(setup):
    cfg, T, seed = setup
    routing, plan, capacity = _route(cfg, T, seed)
    E = cfg.num_experts
    cf = cfg.capacity_factor or 1.0
    expected_c = max(1, min(T, math.ceil(round(cf * T * cfg.top_k / E, 6))))
    assert capacity == expected_c
    assert torch.equal(plan.counts, torch.full((E,), capacity, dtype=torch.long))
    for e in range(E):  # distinct tokens per expert
        tokens = plan.token_ids[plan.expert_ids == e]
        assert tokens.unique().numel() == capacity


@SETTINGS
@given(routing_setups(), st.sampled_from(["position", "weight"]))
def test_capacity_keeps_the_highest_priority(setup, priority):
    cfg, T, seed = setup
    if cfg.capacity_factor is None:
        return
    cfg.capacity_priority = priority
    routing, plan, capacity = _route(cfg, T, seed)
    E, K = cfg.num_experts, cfg.top_k
    kept = plan.expert_ids < E
    weight_of = {(t, e): w for t, e, w in zip(routing.token_ids.tolist(), routing.expert_ids.tolist(), routing.weights.tolist())}
    slot_of = {(t, e): n % K for n, (t, e) in enumerate(zip(routing.token_ids.tolist(), routing.expert_ids.tolist()))}
    kept_pairs = set(zip(plan.token_ids[kept].tolist(), plan.expert_ids[kept].tolist()))
    for (t, e), w in weight_of.items():
        if (t, e) in kept_pairs:
            continue
        # A dropped assignment's expert is full of assignments of at least its priority.
        rivals = [p for p in kept_pairs if p[1] == e]
        assert len(rivals) == capacity
        for r in rivals:
            if priority == "weight":
                assert weight_of[r] >= w - 1e-7
            else:
                assert (slot_of[r], r[0]) < (slot_of[(t, e)], t)
