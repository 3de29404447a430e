"""The MoE language model: config, parameter layout, losses, KV cache and sampling."""

import math

import pytest
import torch

from sparsemoe import MoE
from sparsemoe.model import PRESETS, DenseMLP, ModelConfig, MoETransformer, generate, preset, sample_next


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny matrices: a second thread only adds synchronisation (and the CI box has two cores).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny(**overrides):
    return preset("tiny", **overrides)


# --- config ---------------------------------------------------------------------------------------


def test_presets_build_and_mixtral_has_mixtral_shape():
    for name in ("tiny", "demo"):
        MoETransformer(preset(name))
    mixtral = preset("mixtral")  # config only: 47B parameters do not belong in a test
    assert (mixtral.dim, mixtral.n_layers, mixtral.n_heads, mixtral.n_kv_heads) == (4096, 32, 32, 8)
    assert (mixtral.num_experts, mixtral.top_k, mixtral.moe_hidden_dim, mixtral.vocab_size) == (8, 2, 14336, 32000)
    assert set(PRESETS) >= {"tiny", "demo", "mixtral"}


@pytest.mark.parametrize(
    "field, value, expected",
    [
        ("dim", 0, "ModelConfig.dim=0"),
        ("n_kv_heads", 3, "ModelConfig.n_kv_heads=3"),
        ("dropout", 1.0, "ModelConfig.dropout=1.0"),
        ("top_k", 9, "ModelConfig.top_k=9"),
        ("moe_hidden_dim", 0, "ModelConfig.moe_hidden_dim=0"),
        ("moe_backend", "nope", "ModelConfig.moe_backend='nope'"),
        ("router", "expert_choice", "not causal"),
        ("qk_norm", "yes", "ModelConfig.qk_norm='yes'"),
        ("qk_norm_scope", "layer", "ModelConfig.qk_norm_scope='layer'"),
        ("rotary_dim", 3, "ModelConfig.rotary_dim=3"),
        ("rotary_dim", 64, "ModelConfig.rotary_dim=64"),
        ("embedding_multiplier", 0.0, "ModelConfig.embedding_multiplier=0.0"),
        ("residual_multiplier", float("inf"), "ModelConfig.residual_multiplier=inf"),
        ("logits_divisor", -1.0, "ModelConfig.logits_divisor=-1.0"),
        ("attention_multiplier", 0, "ModelConfig.attention_multiplier=0"),
        ("sliding_window", 0, "ModelConfig.sliding_window=0"),
        ("sliding_layers", [0], "expected None when sliding_window is None"),
        ("nope_layers", [2], "a list of distinct layer indices"),
        ("norm_placement", "peri", "ModelConfig.norm_placement='peri'"),
        ("attention_gate", 1, "ModelConfig.attention_gate=1"),
    ],
)
def test_config_errors_name_the_field(field, value, expected):
    with pytest.raises(ValueError, match=expected.replace("(", r"\(").replace(".", r"\.")):
        tiny(**{field: value})


def test_sliding_layers_are_checked_and_normalised():
    with pytest.raises(ValueError, match=r"sliding_layers=\[0, 2\] is invalid: expected None or a list"):
        tiny(sliding_window=4, sliding_layers=[0, 2])  # tiny has 2 layers
    with pytest.raises(ValueError, match=r"sliding_layers=\[1, 1\]"):
        tiny(sliding_window=4, sliding_layers=[1, 1])
    assert tiny(sliding_window=4, sliding_layers=(1, 0)).sliding_layers is None  # every layer: same as None
    config = tiny(n_layers=3, sliding_window=4, sliding_layers=(2, 0))
    assert config.sliding_layers == [0, 2] and [config.window_of(i) for i in range(3)] == [4, None, 4]


def test_attention_only_options_are_refused_with_latent_attention():
    mla = dict(attention="mla", head_dim=8, kv_lora_rank=16, qk_nope_head_dim=8, v_head_dim=8)
    with pytest.raises(ValueError, match="attention_multiplier=0.5 is invalid: expected None with mla"):
        tiny(**mla, attention_multiplier=0.5)
    with pytest.raises(ValueError, match="sliding_window=4 is invalid: expected None with mla"):
        tiny(**mla, sliding_window=4)
    with pytest.raises(ValueError, match=r"nope_layers=\[1\] is invalid: expected None with mla"):
        tiny(**mla, nope_layers=[1])
    with pytest.raises(ValueError, match="attention_gate=True is invalid: expected False with mla"):
        tiny(**mla, attention_gate=True)
    assert tiny(nope_layers=[]).nope_layers is None


def test_multipliers_equal_the_weights_they_stand_for():
    """Each multiplier computes what scaling the matching weights would: embedding_multiplier m is
    embeddings * m, logits_divisor d is lm_head / d, attention_multiplier a is q_proj * a*sqrt(Hd) with
    the default scale, residual_multiplier r is o_proj and the MLP outputs * r."""
    torch.manual_seed(0)
    scaled = MoETransformer(
        tiny(embedding_multiplier=3.0, logits_divisor=2.5, attention_multiplier=0.3, residual_multiplier=0.5)
    ).eval()
    plain = MoETransformer(tiny()).eval()
    plain.load_state_dict(scaled.state_dict())
    hd = plain.config.head_dim
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        unscaled = plain(ids).logits
        plain.embed.weight.mul_(3.0)
        plain.lm_head.weight.div_(2.5)
        for block in plain.layers:
            block.attn.q_proj.weight.mul_(0.3 * hd**0.5)
            block.attn.o_proj.weight.mul_(0.5)
            block.ffn.experts.w_out.mul_(0.5)
    with torch.no_grad():
        expected, got = plain(ids).logits, scaled(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert (got - unscaled).abs().max() > 1e-2  # the multipliers change the model


def test_unknown_field_from_dict():
    with pytest.raises(ValueError, match="unknown field"):
        ModelConfig.from_dict({**tiny().to_dict(), "bogus": 1})
    assert ModelConfig.from_dict(tiny().to_dict()) == tiny()


# Every parameter and buffer kind the model can have: norms (pre, sandwich, q/k), attention biases and
# gate, routers with noise and a selection bias, a gated shared expert, a dense first layer, MLA.
_EVERY_PART = [
    dict(qkv_bias=True, qk_norm=True, attention_gate=True, norm_placement="sandwich", num_shared_experts=1,
         shared_expert_gate=True, noise="gaussian", bias_balancing=True, score_func="sigmoid", first_dense_layers=1),
    dict(attention="mla", q_lora_rank=16, head_dim=8, kv_lora_rank=16, qk_nope_head_dim=8, v_head_dim=8),
]  # fmt: skip


@pytest.mark.parametrize("fields", _EVERY_PART, ids=["gqa", "mla"])
def test_reset_parameters_sets_every_parameter_and_buffer(fields):
    """reset_parameters() leaves nothing of what was there: filled with NaN first, nothing stays NaN; norms
    come back as ones, the selection bias as zero, the RoPE tables as a fresh model's."""
    torch.manual_seed(0)
    model = MoETransformer(tiny(**fields))
    fresh = {name: t.clone() for name, t in model.named_buffers()}
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            t.fill_(float("nan"))
    model.reset_parameters()
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        assert torch.isfinite(t).all(), name
        if name.endswith("norm.weight"):
            assert (t == 1).all(), name
        if name.endswith("expert_bias"):
            assert (t == 0).all(), name
    for name, t in fresh.items():
        if name.startswith("rope"):
            torch.testing.assert_close(getattr(model, name), t, rtol=0, atol=0)


def test_a_model_built_on_the_meta_device_runs_there_and_initialises_after_to_empty():
    """Deferred initialisation: a forward on meta tensors gives shapes without memory; to_empty() then
    reset_parameters() gives a model that trains like one built directly (same init statistics)."""
    config = tiny(**_EVERY_PART[0])
    with torch.device("meta"):
        model = MoETransformer(config)
    ids = torch.randint(0, 256, (2, 9))
    out = model(ids.to("meta"), targets=ids.to("meta"))
    assert out.logits.shape == (2, 9, 256) and out.logits.device.type == "meta" and out.loss.shape == ()
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.reset_parameters()
    torch.manual_seed(0)
    direct = MoETransformer(config)
    for (name, got), (_, want) in zip(model.named_parameters(), direct.named_parameters()):
        assert got.shape == want.shape
        assert abs(got.float().std() - want.float().std()) <= 0.2 * want.float().std() + 1e-6, name
        assert abs(got.float().mean() - want.float().mean()) <= 0.05 + 1e-6, name
    loss = model(ids, targets=ids).loss
    assert abs(loss.item() - math.log(256)) < 0.5  # a freshly initialised model predicts about uniformly
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_activation_checkpointing_gives_the_same_loss_and_gradients_with_less_memory():
    """Each block recomputed in the backward: the same loss and gradients (dropout, router noise and the
    step-mode bias counts replayed or kept exactly), a lower peak; eval, no_grad and KV-cache steps unchanged."""
    from sparsemoe import update_expert_biases
    from sparsemoe.bench.measure import peak_memory_bytes

    config = tiny(dropout=0.1, noise="jitter", bias_balancing=True, bias_update="step", n_layers=3)
    torch.manual_seed(0)
    plain = MoETransformer(config).train()
    checkpointed = MoETransformer(config).train()
    checkpointed.load_state_dict(plain.state_dict())
    checkpointed.set_activation_checkpointing()
    ids = torch.randint(0, 256, (4, 48))

    def step(model):
        torch.manual_seed(3)
        out = model(ids[:, :-1], targets=ids[:, 1:])
        (out.loss + out.aux_loss).backward()
        update_expert_biases(model)
        return out.loss

    torch.testing.assert_close(step(checkpointed), step(plain), rtol=0, atol=0)
    for (name, p), q in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-6, atol=1e-7, msg=name)
    for a, b in zip(plain.moe_layers, checkpointed.moe_layers):
        assert torch.equal(a.router.expert_bias, b.router.expert_bias) and a.router.expert_bias.any()
    peaks = {}
    for name, model in (("plain", plain), ("checkpointed", checkpointed)):
        model.zero_grad()
        peaks[name] = peak_memory_bytes(lambda: step(model))
    assert peaks["checkpointed"] < 0.8 * peaks["plain"], peaks
    checkpointed.eval()
    with torch.no_grad():
        torch.testing.assert_close(checkpointed(ids).logits, plain.eval()(ids).logits)


def test_activation_checkpointing_refuses_a_bias_that_moves_every_forward():
    model = MoETransformer(tiny(bias_balancing=True))
    with pytest.raises(ValueError, match="needs bias_update='step'"):
        model.set_activation_checkpointing()
    assert not model.activation_checkpointing
    MoETransformer(tiny(bias_balancing=True, dense=True)).set_activation_checkpointing()  # no MoE layer: fine


def test_set_bias_update_switches_a_built_model_and_loses_no_count():
    """E.g. a model loaded from a Hugging Face checkpoint (bias_update="forward") before checkpointing."""
    from sparsemoe import update_expert_biases

    model = MoETransformer(tiny(bias_balancing=True, bias_update_rate=0.01)).train()
    model.set_bias_update("step")
    model.set_activation_checkpointing()
    assert model.config.bias_update == "step" and all(m.config.bias_update == "step" for m in model.moe_layers)
    ids = torch.randint(0, 256, (2, 17))
    model(ids[:, :-1], targets=ids[:, 1:]).loss.backward()
    pending = [m.router.pending_load.clone() for m in model.moe_layers]
    assert all(p.sum() == 2 * 16 * model.config.top_k for p in pending)  # every token, counted once
    with pytest.raises(ValueError, match="turn activation checkpointing off first"):
        model.set_bias_update("forward")
    model.set_activation_checkpointing(False)
    model.set_bias_update("forward")  # applies what was counted, then moves the bias every forward again
    for layer, counts in zip(model.moe_layers, pending):
        assert layer.router.pending_load is None
        torch.testing.assert_close(layer.router.expert_bias, 0.01 * torch.sign(counts.mean() - counts))
    assert update_expert_biases(model) == 0
    with pytest.raises(ValueError, match="bias_update='never' is invalid"):
        model.set_bias_update("never")


def test_layer_placement_first_dense_and_every_nth():
    cfg = tiny(n_layers=6, first_dense_layers=1, moe_every=2)
    assert cfg.moe_layer_ids == [1, 3, 5]
    model = MoETransformer(cfg)
    kinds = [type(b.ffn) for b in model.layers]
    assert kinds == [DenseMLP, MoE, DenseMLP, MoE, DenseMLP, MoE]
    assert tiny(dense=True).moe_layer_ids == []


def test_state_dict_layout():
    model = MoETransformer(tiny(qkv_bias=True, qk_norm=True, n_kv_heads=1, first_dense_layers=1, num_shared_experts=1))
    keys = set(model.state_dict())
    expected = {
        "embed.weight",
        "layers.0.attn_norm.weight",
        "layers.0.attn.q_proj.weight",
        "layers.0.attn.q_proj.bias",
        "layers.0.attn.k_proj.weight",
        "layers.0.attn.v_proj.bias",
        "layers.0.attn.o_proj.weight",
        "layers.0.attn.q_norm.weight",
        "layers.0.attn.k_norm.weight",
        "layers.0.ffn_norm.weight",
        "layers.0.ffn.w_in",
        "layers.0.ffn.w_out",
        "layers.1.ffn.router.weight",
        "layers.1.ffn.router.expert_bias",
        "layers.1.ffn.experts.w_in",
        "layers.1.ffn.experts.w_out",
        "layers.1.ffn.shared_experts.w_in",
        "norm.weight",
        "lm_head.weight",
    }
    assert expected <= keys
    assert not any("rope" in k for k in keys)
    assert model.state_dict()["layers.0.attn.k_proj.weight"].shape == (16, 32)  # 1 KV head of 16
    tied = MoETransformer(tiny(tie_embeddings=True))
    assert "lm_head.weight" not in tied.state_dict()


def test_dense_baseline_has_same_active_params_but_the_routers():
    cfg = tiny(num_shared_experts=1)
    moe, dense = MoETransformer(cfg), MoETransformer(cfg.dense_baseline())
    routers = sum(layer.router.weight.numel() for layer in moe.moe_layers)
    assert dense.config.dense_hidden_dim == cfg.top_k * cfg.moe_hidden_dim + cfg.moe_hidden_dim
    assert dense.num_active_params() + routers == moe.num_active_params()
    assert moe.num_params() > moe.num_active_params()


# --- forward and losses ---------------------------------------------------------------------------


def test_forward_shapes_and_losses():
    torch.manual_seed(0)
    model = MoETransformer(tiny())
    ids = torch.randint(0, 256, (3, 17))
    out = model(ids, ids)
    assert out.logits.shape == (3, 17, 256)
    assert out.loss.ndim == 0 and 4.5 < out.loss.item() < 6.5  # about ln(256) at init
    expected_aux = sum(layer.aux_loss for layer in model.moe_layers)
    assert torch.equal(out.aux_loss, expected_aux)
    assert out.aux_loss.item() > 0 and not out.aux_loss.requires_grad  # inject: detached, for logging
    assert model(ids).loss is None
    assert model(ids, last_only=True).logits.shape == (3, 1, 256)


def test_inject_and_return_modes_give_the_same_gradient():
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    grads = {}
    for mode in ("inject", "return"):
        torch.manual_seed(0)
        model = MoETransformer(tiny(aux_loss_mode=mode, z_loss_coef=1e-2))
        out = model(ids, ids)
        assert out.aux_loss.requires_grad == (mode == "return")
        (out.loss + out.aux_loss).backward()
        grads[mode] = {n: p.grad.clone() for n, p in model.named_parameters()}
    router = "layers.0.ffn.router.weight"
    assert grads["inject"][router].abs().sum() > 0
    for name in grads["inject"]:
        torch.testing.assert_close(grads["inject"][name], grads["return"][name], rtol=1e-5, atol=1e-7)


def test_too_long_input_is_refused():
    model = MoETransformer(tiny())
    with pytest.raises(ValueError, match="max_seq_len=64"):
        model(torch.zeros(1, 65, dtype=torch.long))


def test_bf16_autocast_forward_backward():
    torch.manual_seed(0)
    model = MoETransformer(tiny())
    ids = torch.randint(0, 256, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, ids)
    (out.loss + out.aux_loss).backward()
    assert torch.isfinite(out.loss) and model.embed.weight.grad is not None


# --- KV cache and sampling ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"n_kv_heads": 1, "qkv_bias": True, "qk_norm": True, "tie_embeddings": True, "first_dense_layers": 1},
        {"embedding_multiplier": 2.0, "attention_multiplier": 0.2, "residual_multiplier": 0.6, "logits_divisor": 3.0},
        {"sliding_window": 5},  # shorter than the prompt, the chunk and the sequence
        {"sliding_window": 9, "sliding_layers": [1], "n_kv_heads": 1, "nope_layers": [1], "norm_placement": "post"},
        {"norm_placement": "sandwich", "attention_gate": True},
    ],
)
def test_cached_logits_match_full_forward(overrides):
    torch.manual_seed(0)
    model = MoETransformer(tiny(**overrides)).eval()
    ids = torch.randint(0, 256, (2, 20))
    full = model(ids).logits
    cache = model.new_cache(2)
    parts = [model(ids[:, :7], cache=cache).logits]
    parts += [model(ids[:, 7:12], cache=cache).logits]  # a multi-token chunk after cached positions
    parts += [model(ids[:, t : t + 1], cache=cache).logits for t in range(12, 20)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-4, atol=1e-5)


def test_a_window_of_one_attends_to_each_position_alone():
    """Independent of any mask code: with window 1 the softmax has one key, so attention returns o_proj(v)."""
    from sparsemoe.model.attention import Attention

    torch.manual_seed(0)
    config = tiny(sliding_window=1)
    attn = Attention(config, 0).eval()
    x = torch.randn(2, 9, config.dim)
    cos, sin = MoETransformer(config).rope_cos[:9], MoETransformer(config).rope_sin[:9]
    with torch.no_grad():
        torch.testing.assert_close(attn(x, cos, sin), attn.o_proj(attn.v_proj(x)), rtol=1e-5, atol=1e-6)


def test_sliding_window_changes_only_positions_past_the_window():
    torch.manual_seed(0)
    full = MoETransformer(tiny()).eval()
    windowed = MoETransformer(tiny(sliding_window=6, sliding_layers=[0])).eval()
    windowed.load_state_dict(full.state_dict())
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        a, b = full(ids).logits, windowed(ids).logits
    torch.testing.assert_close(b[:, :6], a[:, :6])  # positions 0..5 see no more than 6 keys either way
    assert (b[:, 6:] - a[:, 6:]).abs().amax(dim=-1).min() > 1e-4  # every later position loses keys


def test_nope_layers_attend_without_positions():
    """Attention without RoPE is blind to the order of the keys: in a one-layer NoPE model (deeper layers'
    keys depend on each position's prefix), the last position's logits do not change when two earlier
    tokens swap places; with RoPE they do."""
    torch.manual_seed(0)
    nope = MoETransformer(tiny(n_layers=1, nope_layers=[0], init_std=0.3)).eval()  # peaked attention
    rope = MoETransformer(tiny(n_layers=1, init_std=0.3)).eval()
    rope.load_state_dict(nope.state_dict())
    ids = torch.randint(0, 256, (1, 10))
    swapped = ids.clone()
    swapped[0, [2, 5]] = ids[0, [5, 2]]
    with torch.no_grad():
        torch.testing.assert_close(nope(swapped).logits[:, -1], nope(ids).logits[:, -1], rtol=1e-5, atol=1e-5)
        assert (rope(swapped).logits[:, -1] - rope(ids).logits[:, -1]).abs().max() > 1e-3


@pytest.mark.parametrize("placement", ["post", "sandwich"])
def test_post_and_sandwich_norm_blocks_as_written_out_by_hand(placement):
    """"post" (OLMo 2): x + norm(attn(x)), then x + norm(mlp(x)); "sandwich" (Gemma 2, AFMoE): norms on both
    sides, x + post_norm(attn(norm(x))). Random norm weights, so that each norm matters."""
    torch.manual_seed(0)
    model = MoETransformer(tiny(n_layers=1, norm_placement=placement)).eval()
    block = model.layers[0]
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    ids = torch.randint(0, 256, (2, 7))
    cos, sin = model.rope_cos[:7], model.rope_sin[:7]
    with torch.no_grad():
        x = model.embed(ids)
        if placement == "post":
            x = x + block.attn_norm(block.attn(x, cos, sin, None))
            x = x + block.ffn_norm(block.ffn(x))
        else:
            x = x + block.attn_post_norm(block.attn(block.attn_norm(x), cos, sin, None))
            x = x + block.ffn_post_norm(block.ffn(block.ffn_norm(x)))
        expected = model.lm_head(model.norm(x))
        torch.testing.assert_close(model(ids).logits, expected)
        pre = MoETransformer(tiny(n_layers=1)).eval()
        pre.load_state_dict(model.state_dict(), strict=False)
        assert (pre(ids).logits - expected).abs().max() > 1e-3


def test_gated_attention_scales_each_channel_before_the_output_projection():
    """attention_gate: o_proj(attention * sigmoid(gate_proj(x))), checked with an identity o_proj, through
    which the same attention without a gate shows its channels."""
    from sparsemoe.model.attention import Attention

    torch.manual_seed(0)
    config = tiny(attention_gate=True)
    gated, plain = Attention(config, 0).eval(), Attention(tiny(), 0).eval()
    plain.load_state_dict(gated.state_dict(), strict=False)
    x = torch.randn(2, 6, config.dim)
    cos, sin = MoETransformer(config).rope_cos[:6], MoETransformer(config).rope_sin[:6]
    with torch.no_grad():
        for attn in (gated, plain):
            attn.o_proj.weight.copy_(torch.eye(config.dim))  # tiny: D == H*Hd
        channels = plain(x, cos, sin)
        torch.testing.assert_close(gated(x, cos, sin), channels * torch.sigmoid(gated.gate_proj(x)))


@pytest.mark.slow
def test_every_attention_and_block_option_compiles_fullgraph():
    """Sliding windows, NoPE layers, sandwich norms, gated attention and the multipliers: one graph, eager's
    numbers."""
    torch.manual_seed(0)
    config = tiny(
        n_layers=3, sliding_window=5, sliding_layers=[0, 1], nope_layers=[2], norm_placement="sandwich",
        attention_gate=True,
        embedding_multiplier=2.0, attention_multiplier=0.2, residual_multiplier=0.7, logits_divisor=3.0,
    )  # fmt: skip
    model = MoETransformer(config).train()
    ids = torch.randint(0, 256, (2, 16))
    eager = model(ids, ids)
    compiled = torch.compile(model, fullgraph=True)(ids, ids)
    torch.testing.assert_close(compiled.logits, eager.logits, rtol=1e-5, atol=1e-5)
    (compiled.loss + compiled.aux_loss).backward()
    assert model.layers[2].attn.q_proj.weight.grad is not None


def test_greedy_generation_with_and_without_cache_agree():
    torch.manual_seed(0)
    model = MoETransformer(tiny(max_seq_len=32))
    prompt = torch.tensor([[ord(c) for c in "def f(x):"], [ord(c) for c in "import os"]])
    # 60 new tokens with a 32-position window: the cache restarts twice, the uncached path slides the same way.
    with_cache = generate(model, prompt, 60, temperature=0, use_cache=True)
    without = generate(model, prompt, 60, temperature=0, use_cache=False)
    assert with_cache.shape == (2, 60)
    assert torch.equal(with_cache, without)
    assert model.training  # generation restores the mode it found


def test_streaming_and_seeded_sampling():
    torch.manual_seed(0)
    model = MoETransformer(tiny())
    prompt = torch.tensor([10, 100, 101])
    seen = []
    out = generate(
        model,
        prompt,
        12,
        temperature=1.0,
        top_k=20,
        top_p=0.9,
        generator=torch.Generator().manual_seed(3),
        on_token=seen.append,
    )
    again = generate(
        model, prompt, 12, temperature=1.0, top_k=20, top_p=0.9, generator=torch.Generator().manual_seed(3)
    )
    assert torch.equal(out, again)
    assert torch.equal(torch.stack(seen, dim=1), out)


def test_sample_next_filters():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.9]])
    gen = torch.Generator().manual_seed(0)
    assert sample_next(logits, temperature=0).item() == 1
    assert {sample_next(logits, 1.0, top_k=1, generator=gen).item() for _ in range(20)} == {1}
    assert {sample_next(logits, 1.0, top_k=2, generator=gen).item() for _ in range(200)} == {1, 3}
    # top_p=0.5: token 1 alone holds < 0.5 of the mass, so 1 and 3 stay, 2 and 0 go.
    assert {sample_next(logits, 1.0, top_p=0.5, generator=gen).item() for _ in range(200)} == {1, 3}
    with pytest.raises(ValueError, match="top_p"):
        generate(MoETransformer(tiny()), torch.tensor([1]), 1, top_p=0.0)


@pytest.mark.parametrize(
    "overrides",
    [
        {"capacity_factor": 1.0, "num_shared_experts": 1, "shared_expert_gate": True},
        {"router": "group_limited", "num_groups": 2, "topk_groups": 1, "score_func": "sigmoid", "bias_balancing": True},
        {"moe_every": 2, "dropout": 0.1, "noise": "jitter", "seq_aux_loss_coef": 1e-3, "z_loss_coef": 1e-3},
    ],
)
def test_moe_options_train_and_decode(overrides):
    """Each option reaches the MoE layers and the model trains and decodes with it."""
    torch.manual_seed(0)
    model = MoETransformer(tiny(**overrides))
    layer = model.moe_layers[0]
    for name, value in overrides.items():
        if name not in ("moe_every", "dropout"):
            assert getattr(layer.config, name) == value
    ids = torch.randint(0, 256, (2, 16))
    out = model(ids, ids)
    (out.loss + out.aux_loss).backward()
    assert layer.router.weight.grad.abs().sum() > 0
    tokens = generate(model, ids[0, :4], 6, temperature=0)
    assert tokens.shape == (1, 6)


def _decode_logits(model, ids, steps):
    """Greedy decode through the KV cache: the logits of each one-position step [B, steps, V] float32."""
    cache = model.new_cache(ids.shape[0])
    out = []
    with torch.no_grad():
        logits = model(ids, cache=cache, last_only=True).logits
        for _ in range(steps):
            logits = model(logits[:, -1].float().argmax(-1, keepdim=True), cache=cache, last_only=True).logits
            out.append(logits.float())
    return torch.cat(out, 1)


@pytest.mark.parametrize(
    "overrides",
    [dict(), dict(sliding_window=5), dict(nope_layers=[1]), dict(rotary_dim=4), dict(attention_multiplier=0.3),
     dict(qk_norm=True), dict(attention_gate=True), dict(n_kv_heads=1)],
)  # fmt: skip
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_decode_step_matches_the_pytorch_path(monkeypatch, overrides, dtype):
    """The one-position attention kernel (RoPE, cache write, softmax) and the native norms give what the
    PyTorch ops give, over steps that pass the sliding window (the blocks as modules, whose calls are counted
    here: tests/test_native_decode.py compares the native decode step with them)."""
    from sparsemoe.model import native_decode
    from sparsemoe.ops import cpu_kernels, small_kernels

    if not cpu_kernels.available():
        pytest.skip("native CPU kernels unavailable")
    monkeypatch.setattr(native_decode, "_prepare", lambda *args: None)
    torch.manual_seed(0)
    model = MoETransformer(preset("tiny", n_heads=4, **overrides)).to(dtype).eval()
    ids = torch.randint(0, 256, (2, 7))
    calls = {"attention": 0, "norm": 0}
    for name in calls:
        real = getattr(small_kernels, "decode_attention" if name == "attention" else "rms_norm")

        def counted(*args, real=real, name=name):
            out = real(*args)
            calls[name] += out is not None
            return out

        monkeypatch.setattr(small_kernels, "decode_attention" if name == "attention" else "rms_norm", counted)
    native = _decode_logits(model, ids, 12)
    assert calls["attention"] == 12 * model.config.n_layers and calls["norm"] > 0
    monkeypatch.setattr(small_kernels, "decode_attention", lambda *args: None)
    monkeypatch.setattr(small_kernels, "rms_norm", lambda *args: None)
    plain = _decode_logits(model, ids, 12)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert ((native - plain).abs().max() / plain.abs().max()).item() < tol
