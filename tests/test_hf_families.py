"""Every MoE family of the installed transformers, run with experts_implementation="sparsemoe" against
"eager": a tiny random model of each, logits and one backward's gradients (the coverage figure of the README and docs/transformers-experts.md)."""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("transformers.integrations.moe")

import sparsemoe.hf  # noqa: E402,F401  (registers "sparsemoe")
from sparsemoe.hf.families import ModelSize, check_parity, count_experts, experts_families, random_model  # noqa: E402

FAMILIES = experts_families()
# Families whose routed experts run on our fused backends in the tiny models (the rest declare a gate function,
# biases or a post-expert norm, and run the general path); a regression to the slower path fails here.
NATIVE = {"mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "glm4_moe", "granitemoe", "jamba"}


def test_families_are_found_in_the_installed_transformers():
    assert len(FAMILIES) >= 15
    assert {"mixtral", "qwen3_moe", "deepseek_v3", "gpt_oss"} <= set(FAMILIES)
    for family in FAMILIES.values():
        assert family.experts_classes and all("Expert" in c for c in family.experts_classes)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_family_matches_eager(name):
    result = check_parity(FAMILIES[name])
    assert result.passed, result.reason
    assert result.output_error <= 1e-5
    if name in NATIVE:
        assert result.native, f"{name} fell back to the general path"


def test_random_model_sizes_follow_model_size():
    family = FAMILIES["mixtral"]
    model = random_model(family, ModelSize(hidden=48, dense_hidden=40, experts=6, layers=3, vocab=100))
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_local_experts, cfg.num_hidden_layers, cfg.vocab_size) == (48, 6, 3, 100)
    experts = model.model.layers[0].mlp.experts
    assert tuple(experts.down_proj.shape) == (6, 48, 40)  # Mixtral's experts are intermediate_size wide
    assert count_experts(model, family) == 3 and count_experts(model) == 3


def test_hybrid_pattern_keeps_every_kind_of_layer():
    """A state-space/attention stack cut down to a few layers still holds attention and MoE layers."""
    model = random_model(FAMILIES["nemotron_h"])
    kinds = set(model.config.layers_block_type)
    assert {"moe", "full_attention"} <= kinds and model.config.num_hidden_layers <= ModelSize().max_layers


def test_from_pretrained_and_set_experts_implementation(tmp_path):
    family = FAMILIES["qwen3_moe"]
    model = random_model(family)
    model.save_pretrained(tmp_path)
    ids = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(0))
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, experts_implementation="sparsemoe").eval()
    assert loaded.config._experts_implementation == "sparsemoe"
    with torch.no_grad():
        ours = loaded(ids).logits
        loaded.set_experts_implementation("eager")
        eager = loaded(ids).logits
    torch.testing.assert_close(ours, eager, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # greedy generation with the KV cache, one token at a time (the decode path)
        loaded.set_experts_implementation("sparsemoe")
        a = loaded.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
        loaded.set_experts_implementation("eager")
        b = loaded.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["mixtral", "gpt_oss", "deepseek_v3", "nemotron_h"])
def test_bfloat16_experts_as_accurate_as_eager(name):
    """In a bfloat16 model, each experts call (its inputs captured in an eager forward) is as close to a float32
    evaluation as transformers' eager is. (Whole-model logits are no yardstick in bfloat16: a rounding
    difference in one layer flips a near-tied routing choice in the next.)"""
    family = FAMILIES[name]
    model = random_model(family).to(torch.bfloat16)
    calls = []
    hooks = [
        m.register_forward_hook(lambda mod, args, out: calls.append((mod, [a.detach() for a in args])))
        for m in model.modules() if isinstance(m, family.classes())
    ]  # fmt: skip
    with torch.no_grad():
        model.set_experts_implementation("eager")
        model(input_ids=torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(1)))
    for hook in hooks:
        hook.remove()
    assert calls
    for module, (x, ids, weights) in calls:
        reference = copy.deepcopy(module).float()
        with torch.no_grad():
            reference.config._experts_implementation = "eager"
            truth = reference(x.float(), ids, weights.float())
            errors = {}
            for implementation in ("eager", "sparsemoe"):
                module.config._experts_implementation = implementation
                y = module(x, ids, weights)
                assert y.dtype == torch.bfloat16
                errors[implementation] = ((y.float() - truth).abs().max() / truth.abs().max()).item()
        assert errors["sparsemoe"] <= 2 * errors["eager"] + 2e-3, errors


def test_training_steps_match_eager():
    """Three AdamW steps of a tiny model: the same losses with either implementation."""
    losses = {}
    for implementation in ("eager", "sparsemoe"):
        model = random_model(FAMILIES["olmoe"]).train()
        model.set_experts_implementation(implementation)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(2))
        losses[implementation] = []
        for _ in range(3):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses[implementation].append(loss.item())
    torch.testing.assert_close(torch.tensor(losses["sparsemoe"]), torch.tensor(losses["eager"]), rtol=1e-5, atol=1e-5)


def test_hf_bench_command_writes_reports(tmp_path, capsys):
    import json

    from sparsemoe.cli import main

    out = tmp_path / "hf"
    rc = main(["hf-bench", "--quick", "--families", "mixtral,gpt_oss", "--dtypes", "float32", "--out", str(out)])
    assert rc == 0
    result = json.loads((out / "hf_bench.json").read_text())
    assert [c["family"] for c in result["cases"]] == ["mixtral", "gpt_oss"]
    for case in result["cases"]:
        names = [r["implementation"] for r in case["rows"]]
        assert names[:3] == ["eager", "grouped_mm", "sparsemoe"] and len(names) == 4  # + the no-op experts run
        ours = case["rows"][2]
        assert ours["logits_error_vs_eager"] < 1e-5 and ours["prefill_ms"] > 0 and case["decode_expert_bound_ms"] > 0
    text = (out / "hf_bench.md").read_text()
    assert "## mixtral (MixtralForCausalLM" in text and "| sparsemoe |" in text


@pytest.mark.parametrize(
    "argv, message",
    [(["--families", "nosuch"], "--families: nosuch not found"), (["--decode", "1"], "--decode must be at least 2"),
     (["--impls", "eager,fastest"], "--impls: fastest not registered")],
)  # fmt: skip
def test_hf_bench_bad_arguments(argv, message, tmp_path, capsys):
    from sparsemoe.cli import main

    assert main(["hf-bench", "--quick", "--out", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_hf_bench_unknown_dtype_is_an_argument_error(tmp_path, capsys):
    from sparsemoe.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["hf-bench", "--quick", "--dtypes", "float16", "--out", str(tmp_path)])
    assert exit_.value.code == 2
    assert "unknown dtypes ['float16']; accepted: float32, bfloat16" in capsys.readouterr().err


def test_torch_compile_runs_the_model():
    """torch.compile over a model whose experts run on sparsemoe (the fused backends are custom ops with
    fake implementations; the general path's host-side loop is a graph break, not an error)."""
    model = random_model(FAMILIES["mixtral"])
    model.set_experts_implementation("sparsemoe")
    ids = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        got = torch.compile(model)(input_ids=ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
