"""The decode step's blocks as prepared native calls (sparsemoe/model/native_decode.py): the same logits, bit
for bit, as the blocks run as modules, over the model options it takes; the modules wherever it does not."""

from __future__ import annotations

import pytest
import torch

from sparsemoe.model import MoETransformer, preset
from sparsemoe.model import native_decode as native_module
from sparsemoe.ops import cpu_kernels
from sparsemoe.ops import linear as linear_module

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="native CPU kernels unavailable")


@pytest.fixture(autouse=True, params=["native projections", "BLAS projections"])
def projections(request, monkeypatch):
    """The tiny test models' float32 projections are below the size where `linear` takes the native kernel: run
    each test as they are (F.linear in float32) and with the kernel taken from any size."""
    if request.param == "native projections":
        monkeypatch.setattr(linear_module, "MIN_WEIGHTS", dict.fromkeys(linear_module.MIN_WEIGHTS, 0))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _model(dtype=torch.float32, **overrides) -> MoETransformer:
    torch.manual_seed(0)
    return MoETransformer(preset("tiny", **{"n_heads": 4, "dim": 64, **overrides})).to(dtype).eval()


def _decode(model, ids, steps):
    """Logits of the prompt's last position and of `steps` greedy steps after it [B, steps + 1, V], float32."""
    cache = model.new_cache(ids.shape[0])
    out = []
    with torch.no_grad():
        logits = model(ids, cache=cache, last_only=True).logits
        out.append(logits.float())
        for _ in range(steps):
            logits = model(logits[:, -1].float().argmax(-1, keepdim=True), cache=cache, last_only=True).logits
            out.append(logits.float())
    return torch.cat(out, 1), cache


def _modules_only(monkeypatch):
    monkeypatch.setattr(native_module, "_prepare", lambda *args: None)


def _counting_runs(monkeypatch) -> list[int]:
    runs = []
    real = native_module.NativeDecode.run

    def run(self, *args):
        runs.append(self.B)
        return real(self, *args)

    monkeypatch.setattr(native_module.NativeDecode, "run", run)
    return runs


@pytest.mark.parametrize(
    "overrides",
    [dict(), dict(sliding_window=5), dict(nope_layers=[1]), dict(rotary_dim=4), dict(attention_multiplier=0.3),
     dict(n_kv_heads=1), dict(first_dense_layers=1), dict(score_func="sigmoid", route_scale=2.0, top_k=1),
     dict(activation="geglu"), dict(tie_embeddings=True)],
)  # fmt: skip
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 2])
def test_native_decode_gives_the_modules_logits_bit_for_bit(monkeypatch, overrides, dtype, batch):
    model = _model(dtype, **overrides)
    ids = torch.randint(0, 256, (batch, 7), generator=torch.Generator().manual_seed(1))
    runs = _counting_runs(monkeypatch)
    native, _ = _decode(model, ids, 12)
    assert runs == [batch] * 12  # every step after the prompt
    with monkeypatch.context() as patch:
        _modules_only(patch)
        modules, _ = _decode(model, ids, 12)
    assert torch.equal(native, modules)


@pytest.mark.parametrize(
    "overrides",
    [dict(qk_norm=True), dict(attention_gate=True), dict(qkv_bias=True), dict(norm_placement="post"),
     dict(norm_placement="sandwich"), dict(residual_multiplier=0.5), dict(attention="mla"),
     dict(bias_balancing=True), dict(num_shared_experts=1), dict(eval_capacity_factor=1.0),
     dict(router="group_limited", num_groups=2, topk_groups=1)],
)  # fmt: skip
def test_what_the_native_step_does_not_take_runs_as_modules(monkeypatch, overrides):
    model = _model(**overrides)
    ids = torch.randint(0, 256, (2, 5))
    runs = _counting_runs(monkeypatch)
    logits, cache = _decode(model, ids, 3)
    assert runs == [] and cache.__dict__.get("_native_decode", {}).get(2) is None
    assert torch.isfinite(logits).all()


def test_hooks_autocast_and_gradients_take_the_modules(monkeypatch):
    model = _model()
    ids = torch.randint(0, 256, (1, 5))
    runs = _counting_runs(monkeypatch)
    seen = []
    handle = model.layers[1].ffn.register_forward_hook(lambda *args: seen.append(1))
    _decode(model, ids, 2)
    handle.remove()
    assert runs == [] and len(seen) == 3  # the prompt and two steps
    _decode(model, ids, 2)
    assert runs == [1, 1]


def _statistics_per_step(model, ids, steps):
    """[(aux_loss, tokens per expert, router entropy) of each MoE layer] after the prompt and each greedy step."""
    cache = model.new_cache(ids.shape[0])
    seen = []
    with torch.no_grad():
        x = ids
        for _ in range(steps + 1):
            logits = model(x, cache=cache, last_only=True).logits
            seen.append([(m.aux_loss, m.stats.tokens_per_expert, m.stats.router_entropy) for m in model.moe_layers])
            x = logits[:, -1].float().argmax(-1, keepdim=True)
    return seen


def test_moe_statistics_and_losses_after_native_steps_are_the_modules(monkeypatch):
    """Read after every step, and kept from earlier steps: the native step overwrites its routing buffers
    at each step, and what was read from them must not change."""
    model = _model()
    ids = torch.randint(0, 256, (2, 5))
    runs = _counting_runs(monkeypatch)
    native = _statistics_per_step(model, ids, 3)
    assert runs == [2] * 3
    _modules_only(monkeypatch)
    modules = _statistics_per_step(model, ids, 3)
    for native_step, modules_step in zip(native, modules):
        for native_layer, modules_layer in zip(native_step, modules_step):
            assert all(torch.equal(a, b) for a, b in zip(native_layer, modules_layer))


def _after_one_native_step(monkeypatch, **overrides):
    """(model, ids [1, 5], cache, runs): the prompt's forward and one decode step, counted in runs."""
    model = _model(**overrides)
    ids = torch.randint(0, 256, (1, 5))
    cache = model.new_cache(1)
    runs = _counting_runs(monkeypatch)
    with torch.no_grad():
        model(ids, cache=cache)
        model(ids[:, :1], cache=cache)
    return model, ids, cache, runs


def _next_step_both_ways(monkeypatch, model, ids, cache):
    """The next step's logits as the model runs it, then the same step again as modules: (first, modules)."""
    with torch.no_grad():
        first = model(ids[:, 1:2], cache=cache).logits
    prepared = cache.__dict__.pop("_native_decode")  # (kept on the cache: the modules must not find it)
    with monkeypatch.context() as patch:
        _modules_only(patch)
        cache.length -= 1
        with torch.no_grad():
            modules = model(ids[:, 1:2], cache=cache).logits
    cache._native_decode = prepared
    return first, modules


def test_a_replaced_weight_is_seen_at_the_next_step(monkeypatch):
    """The prepared calls hold weight addresses: a parameter replaced, or moved in memory, prepares them again."""
    model, ids, cache, runs = _after_one_native_step(monkeypatch)
    first = cache._native_decode[1]
    with torch.no_grad():
        layer = model.layers[0].attn.o_proj
        layer.weight = torch.nn.Parameter(layer.weight * 2)
        expert = model.layers[1].ffn.experts
        expert.w_in.data = expert.w_in.data.clone() * 0.5
    native, modules = _next_step_both_ways(monkeypatch, model, ids, cache)
    assert runs == [1, 1] and cache._native_decode[1] is not first
    assert torch.equal(native, modules)


@pytest.mark.parametrize("replaced", ["head", "norm weight"])
@pytest.mark.parametrize("tied", [False, True])
def test_a_replaced_head_is_seen_at_the_next_step(monkeypatch, tied, replaced):
    """The final norm and LM head run from the prepared step too: a new head module or norm weight is seen."""
    from sparsemoe.ops.linear import Linear

    model, ids, cache, runs = _after_one_native_step(monkeypatch, tie_embeddings=tied)
    first = cache._native_decode[1]
    if replaced == "head":
        model.lm_head = Linear(model.config.dim, model.config.vocab_size, bias=False)  # untied now, in both cases
    else:
        model.norm.weight = torch.nn.Parameter(torch.rand(model.config.dim))
    native, modules = _next_step_both_ways(monkeypatch, model, ids, cache)
    assert runs == [1, 1] and cache._native_decode[1] is not first
    assert torch.equal(native, modules)


def test_a_hook_on_the_head_takes_the_modules(monkeypatch):
    model = _model()
    ids = torch.randint(0, 256, (1, 5))
    runs = _counting_runs(monkeypatch)
    seen = []
    handle = model.norm.register_forward_hook(lambda *args: seen.append(1))
    _decode(model, ids, 2)
    handle.remove()
    assert runs == [] and len(seen) == 3


def test_an_overflowing_moe_output_raises_the_modules_error(monkeypatch):
    """The output check fails after the block's attention: the modules run again from the block's input."""
    model, ids, cache, runs = _after_one_native_step(monkeypatch)
    with torch.no_grad():
        model.layers[1].ffn.experts.w_out.fill_(float("inf"))
        with pytest.raises(ValueError, match="output is"):
            model(ids[:, 1:2], cache=cache)
    assert runs == [1, 1]


def test_non_finite_router_logits_raise_the_modules_error(monkeypatch):
    model = _model()
    ids = torch.randint(0, 256, (1, 5))
    cache = model.new_cache(1)
    with torch.no_grad():
        model(ids, cache=cache)
        model.layers[1].ffn.router.weight.fill_(float("nan"))
        with pytest.raises(ValueError, match="router logits are"):
            model(ids[:, :1], cache=cache)


@pytest.mark.parametrize("scheme", [("int8", None), ("int4", 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_experts_decode_natively_with_the_modules_logits(monkeypatch, scheme, dtype):
    from sparsemoe.quant import quantize

    model = quantize(_model(dtype, dim=128), *scheme)
    ids = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(2))
    runs = _counting_runs(monkeypatch)
    native, _ = _decode(model, ids, 8)
    assert runs == [1] * 8
    with monkeypatch.context() as patch:
        _modules_only(patch)
        modules, _ = _decode(model, ids, 8)
    assert torch.equal(native, modules)


def test_a_new_moe_config_is_seen_at_the_next_step(monkeypatch):
    """A layer given another config (here another backend) is prepared again: it then runs as modules."""
    from dataclasses import replace

    model, ids, cache, runs = _after_one_native_step(monkeypatch)
    with torch.no_grad():
        layer = model.layers[1].ffn
        layer.config = replace(layer.config, backend="reference")
        model(ids[:, 1:2], cache=cache)
    assert runs == [1] and cache._native_decode[1] is None
