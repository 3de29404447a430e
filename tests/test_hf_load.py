"""Hugging Face -> sparsemoe: tiny random models of every supported family, built offline from configs.

Each is saved by transformers itself (both of its key layouts, sharded or not), loaded by
sparsemoe.hf, and compared with transformers' own forward on logits and on greedy generation.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from sparsemoe.hf import HFFormatError, load_hf, map_config  # noqa: E402
from sparsemoe.model import generate  # noqa: E402

VOCAB = 256  # byte-sized vocabulary: `sparsemoe generate` can run the converted models
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    initializer_range=0.2,  # large init: routing far from uniform, so it is tested
)
MLA = dict(num_key_value_heads=4, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=12)
# DeepSeek-V3's blocks and routing groups, which GLM-4.5 shares.
DEEPSEEK_BLOCKS = dict(
    intermediate_size=40,
    moe_intermediate_size=16,
    n_routed_experts=8,
    n_shared_experts=1,
    num_experts_per_tok=2,
    n_group=4,
    topk_group=2,
    first_k_dense_replace=1,
)

# name -> (transformers config class, model class, config kwargs)
FAMILIES = {
    "mixtral": (
        "MixtralConfig",
        "MixtralForCausalLM",
        dict(intermediate_size=24, num_local_experts=4, num_experts_per_tok=2),
    ),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        dict(
            intermediate_size=40,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=24,
            num_experts=6,
            num_experts_per_tok=2,
            norm_topk_prob=False,
            mlp_only_layers=[0],
        ),
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        dict(
            head_dim=16,
            intermediate_size=40,
            moe_intermediate_size=16,
            num_experts=6,
            num_experts_per_tok=2,
            norm_topk_prob=True,
            decoder_sparse_step=2,
            tie_word_embeddings=True,
        ),
    ),
    "olmoe": (
        "OlmoeConfig",
        "OlmoeForCausalLM",
        dict(intermediate_size=16, num_experts=6, num_experts_per_tok=3, norm_topk_prob=False),
    ),
    "flex_olmo": (
        "FlexOlmoConfig",
        "FlexOlmoForCausalLM",
        dict(intermediate_size=16, num_experts=6, num_experts_per_tok=2, norm_topk_prob=True, pad_token_id=0,
             eos_token_id=1),
    ),
    # Granite's multipliers away from 1, so that dropping any of them fails the logits test.
    "granitemoe": (
        "GraniteMoeConfig",
        "GraniteMoeForCausalLM",
        dict(
            intermediate_size=16, num_local_experts=6, num_experts_per_tok=2, tie_word_embeddings=True,
            embedding_multiplier=3.0, attention_multiplier=0.3, residual_multiplier=0.5, logits_scaling=2.5,
        ),
    ),
    "granitemoeshared": (
        "GraniteMoeSharedConfig",
        "GraniteMoeSharedForCausalLM",
        dict(
            intermediate_size=16, num_local_experts=6, num_experts_per_tok=3, shared_intermediate_size=24,
            embedding_multiplier=2.0, attention_multiplier=0.2, residual_multiplier=0.7, logits_scaling=4.0,
        ),
    ),
    "deepseek_v2": (
        "DeepseekV2Config",
        "DeepseekV2ForCausalLM",
        dict(
            MLA,
            intermediate_size=40,
            moe_intermediate_size=16,
            n_routed_experts=8,
            n_shared_experts=2,
            num_experts_per_tok=3,
            topk_method="group_limited_greedy",
            n_group=4,
            topk_group=2,
            first_k_dense_replace=1,
            q_lora_rank=None,
            routed_scaling_factor=1.5,
        ),
    ),
    "deepseek_v3": (
        "DeepseekV3Config",
        "DeepseekV3ForCausalLM",
        dict(MLA, **DEEPSEEK_BLOCKS, q_lora_rank=24),
    ),
    "glm4_moe": (
        "Glm4MoeConfig",
        "Glm4MoeForCausalLM",
        dict(
            DEEPSEEK_BLOCKS,
            routed_scaling_factor=2.5,
            attention_bias=True,
            use_qk_norm=True,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
            pad_token_id=0,
        ),
    ),
    "minimax_m2": (
        "MiniMaxM2Config",
        "MiniMaxM2ForCausalLM",
        dict(
            head_dim=8, intermediate_size=16, num_local_experts=6, num_experts_per_tok=2, rotary_dim=4,
            pad_token_id=0, bos_token_id=1, eos_token_id=2,
        ),
    ),
    # A window of 5 on layers 0 and 1 (layer 2 is global, without RoPE): the logits test uses 13 positions.
    "exaone_moe": (
        "ExaoneMoeConfig",
        "ExaoneMoeForCausalLM",
        dict(
            intermediate_size=40, moe_intermediate_size=16, num_experts=8, num_experts_per_tok=2, num_shared_experts=1,
            n_group=4, topk_group=2, first_k_dense_replace=1, routed_scaling_factor=2.5, sliding_window=5,
            sliding_window_pattern=3, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        ),
    ),
    "ernie4_5_moe": (
        "Ernie4_5_MoeConfig",
        "Ernie4_5_MoeForCausalLM",
        dict(
            intermediate_size=40, moe_intermediate_size=16, moe_num_experts=6, moe_k=2, moe_num_shared_experts=1,
            moe_layer_start_index=1, moe_layer_interval=1, tie_word_embeddings=False,
        ),
    ),
    # Layers 0 and 1 slide a window of 5 with RoPE, layer 2 is global without; muP scales the embeddings.
    "afmoe": (
        "AfmoeConfig",
        "AfmoeForCausalLM",
        dict(
            head_dim=8, intermediate_size=40, moe_intermediate_size=16, num_experts=6, num_experts_per_tok=2,
            num_shared_experts=1, num_dense_layers=1, route_scale=2.0, sliding_window=5, global_attn_every_n_layers=3,
            mup_enabled=True,
        ),
    ),
    "dots1": (
        "Dots1Config",
        "Dots1ForCausalLM",
        dict(
            intermediate_size=40,
            moe_intermediate_size=16,
            n_routed_experts=6,
            n_shared_experts=2,
            num_experts_per_tok=2,
            n_group=2,
            topk_group=1,
            first_k_dense_replace=1,
            routed_scaling_factor=1.5,
            norm_topk_prob=True,
        ),
    ),
}


def tiny_hf_model(family: str, seed: int = 0, **overrides):
    """A random transformers model of `family` in eval mode (the selection biases randomised too)."""
    config_cls, model_cls, kwargs = FAMILIES[family]
    torch.manual_seed(seed)
    config = getattr(transformers, config_cls)(**{**COMMON, **kwargs, **overrides})
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():
        for name, tensor in [*model.named_buffers(), *model.named_parameters()]:  # ERNIE's is a parameter
            if name.endswith(("e_score_correction_bias", "mlp.expert_bias")):  # the latter AFMoE's
                tensor.normal_(0, 0.1)
    return model


def save_hf(model, path, **kwargs):
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    model.save_pretrained(path, **kwargs)
    return path


def hf_greedy(model, ids, n):
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[:, ids.shape[1] :]


# Both key layouts for Mixtral, OLMoE, Granite (the released checkpoints of the first two are per-expert,
# Granite's stacked), EXAONE-MoE (its own layout keeps the selection bias on the block) and MiniMax-M2; one
# each for the other families.
CASES = [
    ("mixtral", True),
    ("mixtral", False),
    ("qwen2_moe", True),
    ("qwen3_moe", False),
    ("olmoe", True),
    ("olmoe", False),
    ("flex_olmo", True),
    ("granitemoe", True),
    ("granitemoe", False),
    ("granitemoeshared", True),
    ("granitemoeshared", False),
    ("deepseek_v2", True),
    ("deepseek_v3", False),
    ("glm4_moe", True),
    ("dots1", False),
    ("exaone_moe", True),
    ("exaone_moe", False),
    ("ernie4_5_moe", True),
    ("ernie4_5_moe", False),
    ("afmoe", True),
    ("minimax_m2", True),
    ("minimax_m2", False),
]


@pytest.mark.parametrize(
    "family,original_format", CASES, ids=[f"{f}-{'per-expert' if o else 'fused'}" for f, o in CASES]
)
def test_logits_and_greedy_tokens_match_transformers(family, original_format, tmp_path):
    hf = tiny_hf_model(family)
    if family == "minimax_m2" and "partial_rotary_factor" not in hf.config.rope_parameters:
        pytest.skip("this transformers ignores MiniMax-M2's rotary_dim (rotates whole heads); later versions read it")
    save_hf(hf, tmp_path, save_original_format=original_format)
    loaded = load_hf(tmp_path)
    assert loaded.mapped.family == family
    own_layout = "stacked" if family.startswith("granite") else "per-expert"
    assert loaded.layout == (own_layout if original_format else "fused")
    ids = torch.randint(0, VOCAB, (2, 13), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(ids).logits
        got = loaded.model(ids).logits
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
    prompt = ids[:1, :5]
    ours = generate(loaded.model, prompt[0], 6, temperature=0)
    assert torch.equal(ours, hf_greedy(hf, prompt, 6))


def test_routing_fields_per_family(tmp_path):
    """The routing each family computes, as MoEConfig fields (the logits test checks they are right)."""
    expect = {
        "mixtral": dict(score_func="softmax", renormalize=True, num_shared_experts=0, moe_layers=[0, 1, 2]),
        "qwen2_moe": dict(score_func="softmax", renormalize=False, shared_expert_gate=True, moe_layers=[1, 2]),
        "qwen3_moe": dict(score_func="softmax", renormalize=True, qk_norm=True, qk_norm_scope="head", moe_layers=[1]),
        "olmoe": dict(
            score_func="softmax", renormalize=False, qk_norm=True, qk_norm_scope="full", moe_layers=[0, 1, 2]
        ),
        "flex_olmo": dict(
            score_func="softmax", renormalize=True, qk_norm=True, qk_norm_scope="full", norm_placement="post",
            moe_layers=[0, 1, 2],
        ),
        "granitemoe": dict(
            score_func="softmax", score_order="after_topk", num_shared_experts=0, moe_layers=[0, 1, 2],
            embedding_multiplier=3.0, attention_multiplier=0.3, residual_multiplier=0.5, logits_divisor=2.5,
        ),
        "granitemoeshared": dict(
            score_order="after_topk", num_shared_experts=1, shared_hidden_dim=24, shared_expert_gate=False,
        ),
        "deepseek_v2": dict(
            router="group_limited", group_score="max", route_scale=1.5, num_shared_experts=2, moe_layers=[1, 2]
        ),
        "deepseek_v3": dict(
            score_func="sigmoid", bias_balancing=True, group_score="top2_sum", route_scale=2.5, moe_layers=[1, 2]
        ),
        "glm4_moe": dict(
            score_func="sigmoid", bias_balancing=True, group_score="top2_sum", route_scale=2.5, moe_layers=[1, 2],
            attention="gqa", qkv_bias=True, qk_norm=True, qk_norm_scope="head", head_dim=8, rotary_dim=4,
        ),
        "dots1": dict(
            score_func="sigmoid", bias_balancing=True, renormalize=True, num_groups=2, route_scale=1.5,
            num_shared_experts=2, qk_norm=True, moe_layers=[1, 2],
        ),
        "exaone_moe": dict(
            score_func="sigmoid", bias_balancing=True, group_score="top2_sum", num_groups=4, route_scale=2.5,
            num_shared_experts=1, qk_norm=True, qk_norm_scope="head", moe_layers=[1, 2], sliding_window=5,
            sliding_layers=[0, 1], nope_layers=[2],
        ),
        "ernie4_5_moe": dict(
            score_func="softmax", bias_balancing=True, bias_on_probs=True, renormalize=True, num_shared_experts=1,
            moe_layers=[1, 2], rope_theta=500000.0,
        ),
        "afmoe": dict(
            score_func="sigmoid", bias_balancing=True, renormalize=True, route_scale=2.0, num_shared_experts=1,
            moe_layers=[1, 2], qk_norm=True, attention_gate=True, norm_placement="sandwich", sliding_window=5,
            sliding_layers=[0, 1], nope_layers=[2], embedding_multiplier=32**0.5,
        ),
        "minimax_m2": dict(
            score_func="sigmoid", bias_balancing=True, renormalize=True, num_shared_experts=0, qk_norm=True,
            qk_norm_scope="full", head_dim=8, rotary_dim=4, moe_layers=[0, 1, 2],
        ),
    }
    for family, fields in expect.items():
        cfg = tiny_hf_model(family).config.to_dict()
        c = map_config(cfg).model_config
        for name, value in fields.items():
            assert (c.moe_layer_ids if name == "moe_layers" else getattr(c, name)) == value, (family, name)


def test_sharded_checkpoint_and_bfloat16(tmp_path):
    hf = tiny_hf_model("deepseek_v3")
    save_hf(hf, tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 2
    loaded = load_hf(tmp_path)
    ids = torch.randint(0, VOCAB, (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids).logits, hf(ids).logits, atol=2e-5, rtol=1e-4)
    half = load_hf(tmp_path, dtype="bfloat16").model
    assert half.embed.weight.dtype == torch.bfloat16
    assert half.layers[1].ffn.router.expert_bias.dtype == torch.float32  # router math stays float32
    assert torch.equal(half.embed.weight, hf.model.embed_tokens.weight.to(torch.bfloat16))


def test_kv_cache_matches_full_forward_with_mla(tmp_path):
    save_hf(tiny_hf_model("deepseek_v2", q_lora_rank=12), tmp_path)
    model = load_hf(tmp_path).model
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))
    cache = model.new_cache(2)
    with torch.no_grad():
        full = model(ids).logits
        parts = [
            model(ids[:, :5], cache=cache).logits,
            model(ids[:, 5:6], cache=cache).logits,
            model(ids[:, 6:], cache=cache).logits,
        ]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)
    assert cache.keys[0].shape[-1] == 16  # the cache holds the kv_lora_rank latent, not per-head keys


def test_interleaved_and_rotate_half_rope_both_load(tmp_path):
    hf = tiny_hf_model("deepseek_v3", rope_interleave=False)
    save_hf(hf, tmp_path)
    assert map_config(json.loads((tmp_path / "config.json").read_text())).rope_interleaved is False
    ids = torch.randint(0, VOCAB, (1, 10), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(load_hf(tmp_path).model(ids).logits, hf(ids).logits, atol=2e-5, rtol=1e-4)


YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16}


@pytest.mark.parametrize(
    "family,extra", [("deepseek_v2", {"mscale": 0.707, "mscale_all_dim": 0.707}), ("qwen3_moe", {})], ids=["mla", "gqa"]
)
def test_yarn_rope_matches_beyond_the_original_context(family, extra, tmp_path):
    hf = tiny_hf_model(family, rope_parameters={**YARN, **extra})
    save_hf(hf, tmp_path)
    model = load_hf(tmp_path).model
    assert model.config.rope_scaling["factor"] == 4.0
    x = torch.randint(0, VOCAB, (1, 40), generator=torch.Generator().manual_seed(5))  # 40 > 16 original positions
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, hf(x).logits, atol=2e-5, rtol=1e-4)


# (family, config overrides, the layers that slide); sequences of 30 positions against a window of 7.
SLIDING = [
    ("mixtral", {}, None),
    ("qwen2_moe", {"use_sliding_window": True, "max_window_layers": 3}, [0, 2]),  # layer_types derived
    ("qwen3_moe", {"use_sliding_window": True}, None),
    ("dots1", {"layer_types": ["full_attention", "sliding_attention", "full_attention"]}, [1]),
]


@pytest.mark.parametrize("family,extra,layers", SLIDING, ids=[case[0] for case in SLIDING])
def test_sliding_window_matches_transformers_beyond_the_window(family, extra, layers, tmp_path):
    hf = tiny_hf_model(family, sliding_window=7, **extra)
    save_hf(hf, tmp_path)
    model = load_hf(tmp_path).model
    assert (model.config.sliding_window, model.config.sliding_layers, model.config.max_seq_len) == (7, layers, 64)
    x = torch.randint(0, VOCAB, (2, 30), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        expected = hf(x).logits
        torch.testing.assert_close(model(x).logits, expected, atol=2e-5, rtol=1e-4)
        # The check can fail: full attention gives other logits past the window.
        without_window = type(model)(replace(model.config, sliding_window=None, sliding_layers=None)).eval()
        without_window.load_state_dict(model.state_dict())
        assert (without_window(x).logits - expected)[:, 7:].abs().max() > 1e-3
    prompt = x[:1, :12]
    assert torch.equal(generate(model, prompt[0], 10, temperature=0), hf_greedy(hf, prompt, 10))


def test_sliding_layers_derived_as_transformers_does_without_layer_types():
    cfg = {k: v for k, v in tiny_hf_model("dots1").config.to_dict().items() if k != "layer_types"}

    def window(**keys):
        c = map_config({**cfg, **keys}).model_config
        return c.sliding_window, c.sliding_layers

    assert window(sliding_window=16, max_window_layers=2) == (16, [2])
    assert window(sliding_window=16, max_window_layers=0) == (16, None)  # every layer
    assert window(sliding_window=16, max_window_layers=3) == (None, None)
    assert window(sliding_window=None, max_window_layers=0) == (None, None)
    exaone = {k: v for k, v in tiny_hf_model("exaone_moe").config.to_dict().items() if k != "layer_types"}
    every_second = map_config({**exaone, "sliding_window_pattern": 2}).model_config  # every 2nd layer is global
    assert (every_second.sliding_window, every_second.sliding_layers, every_second.nope_layers) == (5, [0, 2], [1])
    no_window = map_config({**exaone, "sliding_window": None, "sliding_window_pattern": 2}).model_config
    assert (no_window.sliding_window, no_window.nope_layers) == (None, None)  # RoPE everywhere, as transformers
    olmoe = tiny_hf_model("olmoe").config.to_dict()  # transformers' OLMoE never slides, whatever the key says
    assert map_config({**olmoe, "sliding_window": 4}).model_config.sliding_window is None


def test_unmappable_configs_name_the_key():
    base = tiny_hf_model("qwen2_moe").config.to_dict()
    with pytest.raises(HFFormatError, match="mlp_only_layers"):
        map_config({**base, "mlp_only_layers": [1]})
    with pytest.raises(HFFormatError, match="norm_topk_prob"):
        map_config({**tiny_hf_model("deepseek_v2").config.to_dict(), "norm_topk_prob": True})
    with pytest.raises(HFFormatError, match="rope_parameters.*'dynamic'"):
        map_config({**base, "rope_parameters": {"rope_type": "dynamic", "factor": 2.0}})
    with pytest.raises(HFFormatError, match="hidden_act"):
        map_config({**base, "hidden_act": "relu"})
    olmoe = tiny_hf_model("olmoe").config.to_dict()
    with pytest.raises(HFFormatError, match="clip_qkv"):
        map_config({**olmoe, "clip_qkv": 8.0})
    with pytest.raises(HFFormatError, match="attention_bias"):
        map_config({**olmoe, "attention_bias": True})
    with pytest.raises(HFFormatError, match="head_dim"):
        map_config({**olmoe, "head_dim": 16})
    with pytest.raises(HFFormatError, match="attention_bias"):
        map_config({**tiny_hf_model("granitemoe").config.to_dict(), "attention_bias": True})
    ernie = tiny_hf_model("ernie4_5_moe").config.to_dict()
    with pytest.raises(HFFormatError, match="use_bias"):
        map_config({**ernie, "use_bias": True})
    with pytest.raises(HFFormatError, match="attention_bias"):
        map_config({**tiny_hf_model("afmoe").config.to_dict(), "attention_bias": True})
    with pytest.raises(HFFormatError, match="moe_layer_end_index=1"):  # layer 2 would be dense in transformers
        map_config({**ernie, "moe_layer_end_index": 1})
    assert map_config({**ernie, "moe_layer_end_index": 2}).model_config.moe_layer_ids == [1, 2]
    with pytest.raises(HFFormatError, match="unsupported architecture LlamaForCausalLM"):
        map_config({"model_type": "llama", "architectures": ["LlamaForCausalLM"]})


def test_each_tensor_is_read_once_straight_into_the_model(tmp_path, monkeypatch):
    """Memory-aware loading: every stored tensor is read exactly once, into the model's own storage."""
    from sparsemoe.hf.io import CheckpointFiles

    save_hf(tiny_hf_model("qwen2_moe"), tmp_path, save_original_format=True)
    reads = []
    original_read = CheckpointFiles._read

    def counting_read(self, key, out):
        reads.append(key)
        return original_read(self, key, out)

    def no_temporaries(self, key):
        raise AssertionError(f"{key} was read into a temporary tensor")

    monkeypatch.setattr(CheckpointFiles, "_read", counting_read)
    monkeypatch.setattr(CheckpointFiles, "get", no_temporaries)  # float32 into float32: no copy needed
    load_hf(tmp_path)
    assert sorted(reads) == sorted(CheckpointFiles(tmp_path).keys())
