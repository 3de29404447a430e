"""Patching live transformers models: sparsemoe layers over the same weight storage, same outputs."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from test_hf_load import FAMILIES, VOCAB, hf_greedy, tiny_hf_model  # noqa: E402

from sparsemoe import moe_layers, update_expert_biases  # noqa: E402
from sparsemoe.hf.patch import PatchedMoeBlock, patch_hf_model, unpatch_hf_model  # noqa: E402


def _ids(seed=0):
    return torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_patched_model_matches_original_and_shares_weights(family):
    hf = tiny_hf_model(family)
    x = _ids()
    with torch.no_grad():
        expected = hf(x).logits
    expected_tokens = hf_greedy(hf, x[:1, :4], 5)
    blocks = {
        name: m
        for name, m in hf.named_modules()
        if type(m).__name__
        in (
            "MixtralSparseMoeBlock",
            "Qwen2MoeSparseMoeBlock",
            "Qwen3MoeSparseMoeBlock",
            "OlmoeSparseMoeBlock",
            "FlexOlmoSparseMoeBlock",
            "GraniteMoeMoE",
            "GraniteMoeSharedMoE",
            "DeepseekV2Moe",
            "DeepseekV3MoE",
            "Glm4MoeMoE",
            "Dots1MoE",
            "ExaoneMoeSparseMoEBlock",
            "Ernie4_5_MoeSparseMoeBlock",
            "AfmoeSparseMoeBlock",
            "MiniMaxM2SparseMoeBlock",
        )
    }
    # ERNIE's and AFMoE's frozen selection-bias parameters become the patched layer's bias buffer (same storage).
    biases = ("e_score_correction_bias", "expert_bias")
    params_before = {id(p) for n, p in hf.named_parameters() if not n.endswith(biases)}

    report = patch_hf_model(hf, backend="grouped")

    assert [e.name for e in report.patched] == list(blocks) and not report.skipped
    for name, block in blocks.items():
        patched = hf.get_submodule(name)
        assert isinstance(patched, PatchedMoeBlock) and patched.moe.config.backend == "grouped"
        router_name = {"granitemoe": "router", "granitemoeshared": "router", "afmoe": "router.gate"}.get(family, "gate")
        router = block.get_submodule(router_name)
        assert patched.moe.router.weight is router.weight  # the same Parameter: no copy
        assert patched.moe.experts.w_in is block.experts.gate_up_proj
        assert patched.moe.experts.w_out is block.experts.down_proj
        if family in ("deepseek_v3", "glm4_moe", "dots1", "exaone_moe"):
            assert patched.moe.router.expert_bias is block.gate.e_score_correction_bias
        if family == "afmoe":  # a parameter on the block
            assert patched.moe.router.expert_bias.data_ptr() == block.expert_bias.data_ptr()
        if family == "ernie4_5_moe":  # its [1, E] parameter, viewed as [E]: the same storage
            held = block.gate.moe_statics.e_score_correction_bias
            assert patched.moe.router.expert_bias.data_ptr() == held.data_ptr()
        if family == "minimax_m2":
            assert patched.moe.router.expert_bias is block.e_score_correction_bias
    assert {id(p) for p in hf.parameters()} == params_before  # nothing added, nothing copied
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, expected, atol=2e-5, rtol=1e-4)
    assert torch.equal(hf_greedy(hf, x[:1, :4], 5), expected_tokens)

    assert unpatch_hf_model(hf) == len(blocks)
    assert all(hf.get_submodule(name) is block for name, block in blocks.items())


def test_gradients_reach_the_shared_parameters():
    hf = tiny_hf_model("mixtral").train()
    patch_hf_model(hf, backend="reference")
    hf(_ids()).logits.square().mean().backward()
    gate_up = hf.model.layers[0].mlp.original.experts.gate_up_proj
    assert gate_up.grad is not None and gate_up.grad.abs().sum() > 0


def _checkpointed_loss_grads(bias_update: str, checkpointing: bool):
    torch.manual_seed(0)
    hf = tiny_hf_model("deepseek_v3").train()
    patch_hf_model(hf, backend="grouped", bias_update=bias_update)
    for layer in moe_layers(hf):
        layer.config = dataclasses.replace(layer.config, bias_update_rate=0.1)  # a step that changes routing
    if checkpointing and hasattr(hf, "activation_checkpointing_enable"):  # its name from transformers 5.2x on
        hf.activation_checkpointing_enable({"use_reentrant": False})
    elif checkpointing:
        hf.gradient_checkpointing_enable({"use_reentrant": False})
    hf(_ids()).logits.square().mean().backward()
    before = [layer.router.expert_bias.clone() for layer in moe_layers(hf)]
    assert update_expert_biases(hf) == (len(moe_layers(hf)) if bias_update == "step" else 0)
    grads = {n: p.grad.clone() for n, p in hf.named_parameters() if p.grad is not None}
    moves = [layer.router.expert_bias - b for layer, b in zip(moe_layers(hf), before)]
    return grads, moves


def test_gradient_checkpointing_of_a_patched_model_with_a_selection_bias():
    """transformers' gradient checkpointing recomputes each decoder layer in the backward. A DeepSeek-V3
    model's patched layers move their selection bias in training: with bias_update="step" the gradients equal
    those without checkpointing; with "forward" the recomputation is refused, never silently wrong."""
    want, want_bias = _checkpointed_loss_grads("step", checkpointing=False)
    got, got_bias = _checkpointed_loss_grads("step", checkpointing=True)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)
    for got_move, want_move in zip(got_bias, want_bias):  # one step of 0.1 (or none) per expert, as without
        torch.testing.assert_close(got_move, want_move)
        one_step = torch.isclose(got_move.abs(), torch.tensor(0.1)) | (got_move == 0)
        assert one_step.all() and got_move.abs().max() > 0
    with pytest.raises(RuntimeError, match="bias_update='step'"):
        _checkpointed_loss_grads("forward", checkpointing=True)


def test_report_says_what_was_not_patched_and_why():
    hf = tiny_hf_model("mixtral")

    class LegacyExperts(nn.Module):  # one module per expert, as older transformers versions keep them
        def __init__(self):
            super().__init__()
            self.experts = nn.ModuleList(nn.Linear(32, 32) for _ in range(4))

    class MixtralSparseMoeBlockOld(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate = nn.Linear(32, 4, bias=False)
            self.experts = LegacyExperts().experts

    hf.model.layers[1].mlp = MixtralSparseMoeBlockOld()
    report = patch_hf_model(hf)
    assert [e.name for e in report.patched] == ["model.layers.0.mlp", "model.layers.2.mlp"]
    (skipped,) = report.skipped
    assert skipped.name == "model.layers.1.mlp" and "not supported" in skipped.reason
    assert "not patched: block class MixtralSparseMoeBlockOld" in str(report)

    # A supported class whose experts are per-expert modules cannot share storage: reported, not copied.
    block = tiny_hf_model("mixtral").model.layers[0].mlp
    block.experts = nn.ModuleList(nn.Linear(32, 24) for _ in range(4))
    hf.model.layers[1].mlp = block
    report = patch_hf_model(hf)
    assert "per-expert modules" in report.skipped[0].reason


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(bias_update="bogus"), "patch_hf_model: bias_update='bogus' is invalid"),
        (dict(backend="bogus"), "patch_hf_model: backend='bogus' is invalid"),
        (dict(aux_loss_coef=-1.0), "patch_hf_model: aux_loss_coef=-1.0 is invalid"),
    ],
)
def test_bad_arguments_are_refused_before_anything_is_patched(kwargs, message):
    hf = tiny_hf_model("deepseek_v3")
    blocks = [m for m in hf.modules()]
    with pytest.raises(ValueError, match=message):
        patch_hf_model(hf, **kwargs)
    assert [m for m in hf.modules()] == blocks


def test_unsupported_model_type_is_reported():
    config = transformers.HunYuanMoEV1Config(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=16,
        num_experts=4,
        moe_topk=2,
        head_dim=8,
    )
    hf = transformers.HunYuanMoEV1ForCausalLM(config).eval()
    x = _ids()
    with torch.no_grad():
        expected = hf(x).logits
    report = patch_hf_model(hf, backend="grouped", experts_fallback=False)
    assert not report.patched and len(report.skipped) == 2  # every MoE block, each with the reason
    assert all("model_type 'hunyuan_v1_moe' is not supported" in e.reason for e in report.skipped)
    assert all("experts_implementation='sparsemoe'" in e.reason for e in report.skipped)  # where to go instead
    assert not report.experts_only and hf.config._experts_implementation != "sparsemoe_grouped"

    # By default the blocks it cannot map still run their experts on sparsemoe's backends.
    report = patch_hf_model(hf, backend="grouped")
    assert not report.patched and [e.experts_implementation for e in report.experts_only] == ["sparsemoe_grouped"] * 2
    assert hf.config._experts_implementation == "sparsemoe_grouped"
    assert "the experts of 2 more run on sparsemoe's backends" in str(report)
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, expected, atol=1e-5, rtol=1e-5)
