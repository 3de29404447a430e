"""sparsemoe <-> Hugging Face: Mixtral and GLM-4.5 export, exact round trips, `sparsemoe convert`, clear errors."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
safetensors = pytest.importorskip("safetensors")

from safetensors import safe_open  # noqa: E402
from test_hf_load import VOCAB, hf_greedy, save_hf, tiny_hf_model  # noqa: E402

from sparsemoe.cli import main  # noqa: E402
from sparsemoe.hf import HFFormatError, load_hf, write_safetensors  # noqa: E402
from sparsemoe.hf.export import export_hf, export_hf_mixtral  # noqa: E402
from sparsemoe.model import ModelConfig, MoETransformer  # noqa: E402
from sparsemoe.train.checkpoint import load_model  # noqa: E402


def tiny_model(**overrides) -> MoETransformer:
    cfg = dict(
        dim=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        num_experts=4,
        top_k=2,
        moe_hidden_dim=24,
        max_seq_len=64,
        init_std=0.2,
    )
    return MoETransformer(ModelConfig(**{**cfg, **overrides})).eval()


def ids(n=12, seed=0):
    return torch.randint(0, VOCAB, (2, n), generator=torch.Generator().manual_seed(seed))


EXPORTS = [(False, 5 << 30, "before_topk"), (True, 20_000, "after_topk")]


@pytest.mark.parametrize("fused,shard_bytes,order", EXPORTS, ids=["per-expert", "fused-sharded-tied-after_topk"])
def test_export_loads_in_transformers_and_round_trips_exactly(fused, shard_bytes, order, tmp_path):
    # Training-only settings too: Mixtral's config has no key for them, sparsemoe's export keeps them.
    model = tiny_model(
        tie_embeddings=fused,
        score_order=order,
        z_loss_coef=1e-3,
        capacity_factor=1.25,
        eval_capacity_factor=float("inf"),
    )
    export_hf_mixtral(model, tmp_path / "hf", fused=fused, max_shard_bytes=shard_bytes)
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file() == fused
    assert type(_matches_in_transformers_and_round_trips(model, tmp_path)).__name__ == "MixtralForCausalLM"


def _matches_in_transformers_and_round_trips(model, tmp_path):
    """transformers' model of the export in tmp_path/hf computes `model`'s logits, and loading the export
    back (as written, and as transformers re-saves it) gives the same tensors, config and logits."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x).logits, atol=2e-5, rtol=1e-4)
    hf.save_pretrained(tmp_path / "resaved")
    for folder in ("hf", "resaved"):
        back = load_hf(tmp_path / folder).model
        state, back_state = model.state_dict(), back.state_dict()
        assert state.keys() == back_state.keys()
        assert all(torch.equal(state[k], back_state[k]) for k in state)
        assert back.config == model.config  # training settings included
        with torch.no_grad():
            assert torch.equal(back(x).logits, model(x).logits)
    return hf


# Models only GLM-4.5 can express: DeepSeek-V3 routing (sigmoid, selection bias, groups, scale), shared experts,
# dense first blocks, q/k/v biases, per-head q/k norms, RoPE on part of each head.
GLM_MODELS = {
    "grouped-biased-shared": dict(
        n_layers=3, score_func="sigmoid", router="group_limited", num_groups=2, topk_groups=1, route_scale=2.0,
        bias_balancing=True, num_shared_experts=1, first_dense_layers=1, qkv_bias=True, qk_norm=True, rotary_dim=4,
        z_loss_coef=1e-3,
    ),
    "topk-unbiased-tied": dict(score_func="sigmoid", renormalize=False, tie_embeddings=True, dense_hidden_dim=40),
}
MLA = dict(attention="mla", head_dim=8, kv_lora_rank=16, qk_nope_head_dim=8, v_head_dim=12)
YARN_MLA = dict(type="yarn", factor=4.0, original_max_position_embeddings=16, mscale=0.707, mscale_all_dim=0.707)
# Under Multi-head Latent Attention: DeepSeek-V3 (GLM-4.5's routing) and DeepSeek-V2 (softmax) express these.
DEEPSEEK_MODELS = {
    "grouped-biased-shared": dict(GLM_MODELS["grouped-biased-shared"], **MLA, qkv_bias=False, qk_norm=False,
                                  rotary_dim=None, q_lora_rank=24),
    "yarn-full-rank-q": dict(
        MLA, score_func="sigmoid", bias_balancing=True,
        rope_scaling=YARN_MLA,
    ),
    # DeepSeek-V2: softmax without renormalisation, groups ranked by their best expert, interleaved RoPE.
    "v2-grouped-shared": dict(
        MLA, n_layers=3, router="group_limited", num_groups=2, topk_groups=1, group_score="max", renormalize=False,
        route_scale=1.5, num_shared_experts=2, first_dense_layers=1, q_lora_rank=24,
    ),
    "v2-yarn": dict(MLA, renormalize=False, rope_scaling=YARN_MLA),
}


@pytest.mark.parametrize(
    "family,name,fused,shard_bytes",
    [
        ("glm4_moe", "grouped-biased-shared", False, 5 << 30),
        ("glm4_moe", "topk-unbiased-tied", True, 20_000),
        ("deepseek_v3", "grouped-biased-shared", False, 5 << 30),
        ("deepseek_v3", "yarn-full-rank-q", True, 20_000),
        ("deepseek_v2", "v2-grouped-shared", False, 5 << 30),
        ("deepseek_v2", "v2-yarn", True, 20_000),
    ],
)
def test_deepseek_style_export_loads_in_transformers_and_round_trips_exactly(family, name, fused, shard_bytes,
                                                                            tmp_path):
    model = tiny_model(**(GLM_MODELS if family == "glm4_moe" else DEEPSEEK_MODELS)[name])
    if model.config.bias_balancing:
        with torch.no_grad():
            for layer in model.moe_layers:
                layer.router.expert_bias.normal_(0, 0.1)  # a trained selection bias
    export_hf(model, tmp_path / "hf", fused=fused, max_shard_bytes=shard_bytes)  # auto: no softmax format can
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == family
    _matches_in_transformers_and_round_trips(model, tmp_path)


# EXAONE-MoE: GLM-4.5's blocks and routing with per-head q/k norms, sliding layers and global layers without RoPE.
EXAONE_MODEL = dict(
    GLM_MODELS["grouped-biased-shared"], qkv_bias=False, rotary_dim=None, sliding_window=5, sliding_layers=[0, 1],
    nope_layers=[2],
)


@pytest.mark.parametrize(
    "global_layers,fused", [(True, False), (False, True)], ids=["global-nope", "all-sliding-fused"]
)
def test_exaone_export_loads_in_transformers_and_round_trips_exactly(global_layers, fused, tmp_path):
    settings = EXAONE_MODEL if global_layers else dict(EXAONE_MODEL, sliding_layers=None, nope_layers=None)
    model = tiny_model(**settings)
    with torch.no_grad():
        for layer in model.moe_layers:
            layer.router.expert_bias.normal_(0, 0.1)  # a trained selection bias
    export_hf(model, tmp_path / "hf", fused=fused)  # auto: GLM-4.5 has no sliding window
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "exaone_moe"
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as f:  # where each layout keeps the bias
        owner = "mlp.gate" if fused else "mlp"
        assert f.get_tensor(f"model.layers.1.{owner}.e_score_correction_bias").dtype == torch.float32
    _matches_in_transformers_and_round_trips(model, tmp_path)
    with pytest.raises(HFFormatError, match=r"nope_layers=None \(EXAONE-MoE has RoPE exactly on the sliding"):
        export_hf(tiny_model(**dict(EXAONE_MODEL, nope_layers=None)), tmp_path / "x", family="exaone_moe")
    with pytest.raises(HFFormatError, match=r"sliding_window=None \(EXAONE-MoE is written with a window"):
        export_hf(tiny_model(**dict(EXAONE_MODEL, sliding_window=None, sliding_layers=None, nope_layers=None)),
                  tmp_path / "y", family="exaone_moe")


# ERNIE 4.5: softmax routing whose selection bias moves the probabilities, shared experts, MoE blocks every
# other one after a dense one, interleaved RoPE pairs (q and k rows are permuted back on export).
ERNIE_MODEL = dict(
    n_layers=4, first_dense_layers=1, moe_every=2, bias_balancing=True, bias_on_probs=True, num_shared_experts=1,
    dense_hidden_dim=40,
)


@pytest.mark.parametrize("fused,tied", [(False, False), (True, True)], ids=["per-expert", "fused-tied"])
def test_ernie_export_loads_in_transformers_and_round_trips_exactly(fused, tied, tmp_path):
    model = tiny_model(**ERNIE_MODEL, tie_embeddings=tied)
    with torch.no_grad():
        for layer in model.moe_layers:
            layer.router.expert_bias.normal_(0, 0.1)  # a trained selection bias
    export_hf(model, tmp_path / "hf", fused=fused)  # auto: no other format adds the bias to probabilities
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    layers = (config["moe_layer_start_index"], config["moe_layer_interval"])
    assert (config["model_type"], layers) == ("ernie4_5_moe", (1, 2))
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as f:
        owner = "mlp.gate.moe_statics" if fused else "mlp.moe_statics"
        assert f.get_tensor(f"model.layers.1.{owner}.e_score_correction_bias").shape == (1, 4)
    _matches_in_transformers_and_round_trips(model, tmp_path)
    with pytest.raises(HFFormatError, match=r"bias_on_probs=False \(ERNIE 4.5 adds the selection bias"):
        export_hf(tiny_model(**dict(ERNIE_MODEL, bias_on_probs=False)), tmp_path / "x", family="ernie4_5_moe")


# AFMoE: sigmoid routing with a selection bias and a route scale, gated attention, sandwich norms, sliding
# layers with RoPE and a global one without, muP's embedding scale.
AFMOE_MODEL = dict(
    n_layers=3, score_func="sigmoid", bias_balancing=True, route_scale=2.0, num_shared_experts=1,
    first_dense_layers=1, qk_norm=True, attention_gate=True, norm_placement="sandwich", sliding_window=5,
    sliding_layers=[0, 1], nope_layers=[2], embedding_multiplier=32**0.5, dense_hidden_dim=40,
)


@pytest.mark.parametrize("fused", [False, True], ids=["per-expert", "fused"])
def test_afmoe_export_loads_in_transformers_and_round_trips_exactly(fused, tmp_path):
    model = tiny_model(**AFMOE_MODEL, tie_embeddings=fused)
    with torch.no_grad():
        for layer in model.moe_layers:
            layer.router.expert_bias.normal_(0, 0.1)  # a trained selection bias
    export_hf(model, tmp_path / "hf", fused=fused)  # auto: no other format has gated attention
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["model_type"], config["mup_enabled"]) == ("afmoe", True)
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.layers.1.mlp.expert_bias").dtype == torch.float32
    _matches_in_transformers_and_round_trips(model, tmp_path)
    with pytest.raises(HFFormatError, match=r"embedding_multiplier=2.0"):
        export_hf(tiny_model(**dict(AFMOE_MODEL, embedding_multiplier=2.0)), tmp_path / "x", family="afmoe")
    with pytest.raises(HFFormatError, match=r"attention_gate=True \(GLM-4.5: False\)"):
        export_hf(tiny_model(**AFMOE_MODEL), tmp_path / "y", family="glm4_moe")


# Softmax models only a Qwen, OLMoE or Granite config can express (each fails Mixtral and the formats tried
# before it).
SOFTMAX_MODELS = {
    "qwen2_moe": dict(
        n_layers=3, first_dense_layers=1, num_shared_experts=1, shared_expert_gate=True, shared_hidden_dim=20,
        qkv_bias=True, renormalize=False, dense_hidden_dim=36,
    ),
    "qwen3_moe": dict(n_layers=4, moe_every=2, qk_norm=True, head_dim=16, tie_embeddings=True, z_loss_coef=1e-3),
    "olmoe": dict(qk_norm=True, qk_norm_scope="full", renormalize=False, top_k=3),
    "flex_olmo": dict(qk_norm=True, qk_norm_scope="full", norm_placement="post", head_dim=16),
    "granitemoe": dict(
        embedding_multiplier=3.0, attention_multiplier=0.3, residual_multiplier=0.5, logits_divisor=2.5,
        score_order="after_topk",
    ),
    # attention_multiplier left at None (1/sqrt(head_dim)): written explicitly, read back as None.
    "granitemoeshared": dict(
        num_shared_experts=1, shared_hidden_dim=20, embedding_multiplier=2.0, residual_multiplier=0.7,
        tie_embeddings=True,
    ),
}


# Sliding windows (of 5, shorter than the 12 positions compared): Mixtral and Qwen3-MoE on every layer,
# Qwen2-MoE on any layers (written as layer_types).
SLIDING_MODELS = {
    "mixtral": dict(sliding_window=5),
    "qwen2_moe": dict(SOFTMAX_MODELS["qwen2_moe"], sliding_window=5, sliding_layers=[0, 2]),
    "qwen3_moe": dict(SOFTMAX_MODELS["qwen3_moe"], sliding_window=5),
}
AUTO_EXPORTS = list(SOFTMAX_MODELS.items()) + list(SLIDING_MODELS.items())


@pytest.mark.parametrize(
    "family,settings", AUTO_EXPORTS, ids=list(SOFTMAX_MODELS) + [f"{f}-sliding" for f in SLIDING_MODELS]
)
def test_softmax_formats_export_load_in_transformers_and_round_trip_exactly(family, settings, tmp_path):
    model = tiny_model(**settings)
    export_hf(model, tmp_path / "hf")  # auto
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == family
    _matches_in_transformers_and_round_trips(model, tmp_path)


def test_a_window_no_format_holds_is_refused(tmp_path):
    with pytest.raises(HFFormatError, match=r"as mixtral: .*sliding_window=5, sliding_layers=\[1\] \(Mixtral has"):
        export_hf(tiny_model(sliding_window=5, sliding_layers=[1]), tmp_path / "a")
    with pytest.raises(HFFormatError, match=r"sliding_window=5, sliding_layers=None \(OLMoE has no sliding window"):
        export_hf(tiny_model(**SOFTMAX_MODELS["olmoe"], sliding_window=5), tmp_path / "b", family="olmoe")
    assert not list(tmp_path.iterdir())


def test_glm4_export_keeps_the_selection_bias_in_float32_and_refuses_a_bias_its_settings_ignore(tmp_path):
    export_hf(tiny_model(**GLM_MODELS["grouped-biased-shared"]), tmp_path / "bf16", dtype=torch.bfloat16)
    with safe_open(str(tmp_path / "bf16" / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.layers.1.mlp.gate.e_score_correction_bias").dtype == torch.float32
        assert f.get_tensor("model.layers.1.mlp.gate.weight").dtype == torch.bfloat16
    export_hf(tiny_model(**GLM_MODELS["topk-unbiased-tied"]), tmp_path / "glm")  # bias_balancing=False, zero bias
    path = tmp_path / "glm" / "model.safetensors"
    _rewrite(path, replace={"model.layers.0.mlp.gate.e_score_correction_bias": torch.full((4,), 0.5)})
    with pytest.raises(HFFormatError, match="non-zero e_score_correction_bias.*turn bias balancing off"):
        load_hf(tmp_path / "glm")


def test_export_picks_mixtral_when_it_can_and_lists_every_reason_when_nothing_can(tmp_path):
    export_hf(tiny_model(), tmp_path / "plain")
    assert json.loads((tmp_path / "plain" / "config.json").read_text())["model_type"] == "mixtral"
    both = "as mixtral: .*num_shared_experts=2.* / as glm4_moe: .*score_func='softmax'"
    with pytest.raises(HFFormatError, match=both):
        export_hf(tiny_model(num_shared_experts=2, shared_expert_gate=True), tmp_path / "none")
    with pytest.raises(HFFormatError, match=r"as mixtral: .*residual_multiplier=0.5 \(Mixtral has no multipliers"):
        export_hf(tiny_model(residual_multiplier=0.5, num_shared_experts=2), tmp_path / "none")
    with pytest.raises(HFFormatError, match="cannot be exported as glm4_moe: .*shared_expert_gate"):
        export_hf(tiny_model(score_func="sigmoid", num_shared_experts=1, shared_expert_gate=True), tmp_path / "x",
                  family="glm4_moe")
    ignored_bias = tiny_model(score_func="sigmoid")  # bias_balancing=False, yet a bias (set by hand)
    with torch.no_grad():
        ignored_bias.moe_layers[0].router.expert_bias.fill_(0.5)
    with pytest.raises(HFFormatError, match="selection bias that bias_balancing=False ignores"):
        export_hf(ignored_bias, tmp_path / "z", family="glm4_moe")
    with pytest.raises(HFFormatError, match="cannot export as 'dots1'"):  # read, never written
        export_hf(tiny_model(), tmp_path / "y", family="dots1")
    assert not any((tmp_path / name).exists() for name in ("none", "x", "y", "z"))


def test_saved_settings_yield_to_edited_hf_keys(tmp_path):
    export_hf_mixtral(tiny_model(z_loss_coef=1e-3), tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["num_experts_per_tok"] = 1  # someone edited the Hugging Face config after export
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    loaded = load_hf(tmp_path)
    assert loaded.model.config.top_k == 1 and loaded.model.config.z_loss_coef == 0.0
    assert any("disagrees with the Hugging Face keys on ['top_k']" in note for note in loaded.mapped.notes)


def test_per_expert_export_uses_original_mixtral_names(tmp_path):
    export_hf_mixtral(tiny_model(), tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("model.layers.1.block_sparse_moe.experts.3.w1.weight").shape == (24, 32)
    assert "model.layers.0.block_sparse_moe.gate.weight" in keys and "lm_head.weight" in keys
    assert json.loads((tmp_path / "config.json").read_text())["num_local_experts"] == 4


def test_export_refuses_models_mixtral_cannot_express(tmp_path):
    with pytest.raises(HFFormatError, match="num_shared_experts=1"):
        export_hf_mixtral(tiny_model(num_shared_experts=1), tmp_path)
    with pytest.raises(HFFormatError, match="score_func='sigmoid'"):
        export_hf_mixtral(tiny_model(score_func="sigmoid"), tmp_path)
    with pytest.raises(HFFormatError, match="every block must be MoE"):
        export_hf_mixtral(tiny_model(first_dense_layers=1), tmp_path)
    with pytest.raises(HFFormatError, match="rotary_dim="):
        export_hf_mixtral(tiny_model(rotary_dim=4), tmp_path)
    assert not list(tmp_path.iterdir())  # nothing written


def test_cli_convert_both_ways_and_generate(tmp_path, capsys):
    hf = tiny_hf_model("mixtral")
    src = save_hf(hf, tmp_path / "hf")
    assert main(["convert", str(src), str(tmp_path / "run")]) == 0
    assert "read mixtral" in capsys.readouterr().out
    model, meta = load_model(tmp_path / "run")
    assert meta["converted_from"]["family"] == "mixtral"

    prompt = "The"
    assert (
        main(
            [
                "generate",
                "--checkpoint",
                str(tmp_path / "run"),
                "--prompt",
                prompt,
                "--max-new-tokens",
                "6",
                "--temperature",
                "0",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    expected = hf_greedy(hf, torch.tensor([list(prompt.encode())]), 6)[0].tolist()
    assert printed.startswith(prompt)
    assert printed[len(prompt) :].rstrip("\n") == bytes(expected).decode("utf-8", errors="replace")

    assert main(["convert", str(tmp_path / "run"), str(tmp_path / "hf2"), "--dtype", "bfloat16"]) == 0
    assert "wrote Hugging Face mixtral folder" in capsys.readouterr().out
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf2")
    assert again.dtype == torch.bfloat16
    assert torch.equal(again.model.embed_tokens.weight, hf.model.embed_tokens.weight.to(torch.bfloat16))


def test_cli_offers_every_export_format():
    from sparsemoe.commands.convert import HF_FORMATS
    from sparsemoe.hf.export import EXPORT_FAMILIES

    assert HF_FORMATS == ("auto", *EXPORT_FAMILIES)


def test_cli_converts_glm4_both_ways(tmp_path, capsys):
    hf = tiny_hf_model("glm4_moe")
    assert main(["convert", str(save_hf(hf, tmp_path / "hf")), str(tmp_path / "run")]) == 0
    capsys.readouterr()
    assert main(["convert", str(tmp_path / "run"), str(tmp_path / "back")]) == 0
    assert "wrote Hugging Face glm4_moe folder" in capsys.readouterr().out
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(again(x).logits, hf(x).logits, atol=2e-5, rtol=1e-4)
    err = _cli_error(capsys, tmp_path / "run", tmp_path / "as-mixtral", "--hf-format", "mixtral")
    assert "cannot be exported as mixtral" in err and "score_func='sigmoid'" in err
    assert not (tmp_path / "as-mixtral").exists()


# --- errors: each one line from the CLI (exit 2), a named HFFormatError from the library ----------------


def _cli_error(capsys, *argv) -> str:
    capsys.readouterr()  # drop whatever earlier steps printed
    assert main(["convert", *map(str, argv)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err
    return err


def test_unsupported_architecture(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    err = _cli_error(capsys, tmp_path, tmp_path / "out")
    assert "unsupported architecture LlamaForCausalLM" in err and "mixtral" in err


def _rewrite(path, drop=(), replace=None):
    """Rewrite a safetensors file without some keys and/or with some tensors replaced."""
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if k not in drop}
    tensors.update(replace or {})
    write_safetensors(path, tensors.items())


def test_missing_mismatched_unexpected_and_truncated_weights(tmp_path, capsys):
    src = save_hf(tiny_hf_model("qwen3_moe"), tmp_path / "hf")
    weights = src / "model.safetensors"
    original = weights.read_bytes()
    key = "model.layers.1.mlp.experts.2.down_proj.weight"

    _rewrite(weights, drop=[key])
    err = _cli_error(capsys, src, tmp_path / "out")
    assert "lacks weight(s)" in err and key in err

    weights.write_bytes(original)
    _rewrite(weights, replace={key: torch.zeros(32, 17)})
    with pytest.raises(HFFormatError, match=r"has shape \(32, 17\) but .* needs \(32, 16\)"):
        load_hf(src)

    weights.write_bytes(original)
    _rewrite(weights, replace={"model.layers.0.mlp.surprise.weight": torch.zeros(2)})
    assert "does not account for" in _cli_error(capsys, src, tmp_path / "out")
    assert load_hf(src, strict=False).model is not None

    weights.write_bytes(original[: len(original) - 100])
    assert "truncated" in _cli_error(capsys, src, tmp_path / "out")
    weights.write_bytes(original[:5])
    assert "truncated" in _cli_error(capsys, src, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # a failed conversion writes nothing


def test_output_folder_and_checkpoint_errors(tmp_path, capsys):
    src = save_hf(tiny_hf_model("mixtral"), tmp_path / "hf")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("x")
    assert "not empty" in _cli_error(capsys, src, tmp_path / "busy")
    assert main(["convert", str(src), str(tmp_path / "busy"), "--overwrite"]) == 0
    assert (tmp_path / "busy" / "keep.txt").exists()  # --overwrite replaces converted files only
    capsys.readouterr()
    assert "does not exist" in _cli_error(capsys, tmp_path / "nowhere", tmp_path / "o", "--to", "hf")
    assert "no config.json" in _cli_error(capsys, tmp_path / "busy", tmp_path / "o", "--to", "sparsemoe")
