"""MoEConfig validation: every bad field gets one ValueError naming the field, the value and what is accepted."""

from __future__ import annotations

import math

import pytest

from sparsemoe import MoE, MoEConfig

BAD_FIELDS = [
    ("dim", 0, "integer >= 1"),
    ("dim", 3.5, "integer >= 1"),
    ("hidden_dim", -4, "integer >= 1"),
    ("num_experts", 0, "integer >= 1"),
    ("top_k", 9, "from 1 to num_experts=8"),
    ("top_k", 0, "integer >= 1"),
    ("activation", "swish", "'swiglu', 'geglu', 'relu', 'gelu'"),
    ("router", "hash", "'topk', 'group_limited', 'expert_choice'"),
    ("score_func", "tanh", "'softmax', 'sigmoid'"),
    ("score_order", "during", "'before_topk', 'after_topk'"),
    ("renormalize", "yes", "True or False"),
    ("route_scale", 0.0, "> 0"),
    ("noise", "uniform", "'none', 'jitter', 'gaussian', 'gumbel'"),
    ("noise_eps", -1.0, "> 0"),
    ("aux_loss_coef", -0.1, ">= 0"),
    ("seq_aux_loss_coef", float("nan"), ">= 0"),
    ("z_loss_coef", float("inf"), ">= 0"),
    ("aux_loss_mode", "add", "'inject', 'return'"),
    ("bias_update_rate", 0.0, "> 0"),
    ("bias_update", "never", "'forward', 'step'"),
    ("capacity_factor", -1.0, "None (dropless)"),
    ("capacity_factor", 0, "None (dropless)"),
    ("eval_capacity_factor", -2.0, "None (dropless)"),
    ("capacity_priority", "random", "'position', 'weight'"),
    ("num_shared_experts", -1, "integer >= 0"),
    ("shared_hidden_dim", 0, "integer >= 1"),
    ("expert_dropout", 1.0, "[0, 1)"),
    ("dropout", -0.1, "[0, 1)"),
    ("backend", "cuda-magic", "'auto'"),
]


@pytest.mark.parametrize("field,value,accepted", BAD_FIELDS)
def test_bad_field_gets_a_clear_error(field, value, accepted):
    with pytest.raises(ValueError) as err:
        MoEConfig(dim=16, **{field: value}) if field != "dim" else MoEConfig(dim=value)
    message = str(err.value)
    assert f"MoEConfig.{field}=" in message and repr(value) in message
    assert accepted in message


@pytest.mark.parametrize(
    "fields,field",
    [
        (dict(score_func="sigmoid", score_order="after_topk"), "score_order"),
        (dict(router="group_limited", num_groups=3), "num_groups"),
        (dict(router="group_limited", num_groups=4, topk_groups=5), "topk_groups"),
        (dict(router="group_limited", num_groups=8, topk_groups=1, top_k=2), "topk_groups"),
        (dict(router="expert_choice", bias_balancing=True), "bias_balancing"),
        (dict(router="expert_choice", expert_dropout=0.1), "expert_dropout"),
        (dict(noise="jitter", noise_eps=1.5), "noise_eps"),
        (dict(shared_expert_gate=True), "shared_expert_gate"),
    ],
)
def test_inconsistent_fields_name_the_culprit(fields, field):
    with pytest.raises(ValueError, match=f"MoEConfig.{field}="):
        MoEConfig(dim=16, **fields)


def test_defaults_are_mixtral():
    cfg = MoEConfig(dim=4096)
    assert (cfg.num_experts, cfg.top_k, cfg.activation) == (8, 2, "swiglu")
    assert cfg.hidden_dim == 14336 and cfg.renormalize and cfg.capacity_factor is None
    assert cfg.score_func == "softmax" and cfg.score_order == "before_topk"


def test_capacity_rules():
    cfg = MoEConfig(dim=8, num_experts=4, top_k=2, capacity_factor=1.25, eval_capacity_factor=math.inf)
    assert cfg.capacity(100, training=True) == math.ceil(1.25 * 100 * 2 / 4)
    assert cfg.capacity(100, training=False) is None  # inf = dropless in evaluation
    assert MoEConfig(dim=8, capacity_factor=2.0).capacity(10, training=False) == 5  # eval None: same as training
    assert MoEConfig(dim=8, num_experts=2, top_k=2, capacity_factor=10.0).capacity(3, True) == 3  # at most T
    assert MoEConfig(dim=8, router="expert_choice").capacity(16, True) == 4  # expert-choice: cf 1.0 by default
    assert MoEConfig(dim=8).capacity(16, True) is None


def test_dict_round_trip_and_unknown_fields():
    cfg = MoEConfig(dim=8, num_experts=4, top_k=1, router="expert_choice")
    assert MoEConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown field"):
        MoEConfig.from_dict({"dim": 8, "experts": 4})


def test_layer_takes_config_or_fields_not_both():
    assert MoE(dim=8, num_experts=2, top_k=1).config.num_experts == 2
    with pytest.raises(TypeError, match="not both"):
        MoE(MoEConfig(dim=8), top_k=1)
