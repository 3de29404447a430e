"""Export a sparsemoe `MoETransformer` to a Hugging Face folder (config.json + safetensors), in the first of
these formats that expresses the model (or the one asked for):

* Mixtral: softmax top-k routing with renormalised weights, every block MoE, no shared experts, plain
  GQA attention (with a sliding window on every layer or on none).
* Qwen2-MoE: softmax top-k (renormalised or not), one sigmoid-gated shared expert, dense blocks as a
  prefix plus every n-th, optional q/k/v biases, a sliding window on any layers.
* Qwen3-MoE: softmax top-k, no shared experts, dense blocks as Qwen2-MoE, q/k norms per head, a sliding
  window on every layer or on none.
* OLMoE: softmax top-k, every block MoE, no shared experts, q/k norms over the whole projections.
* FlexOlmo: the same in OLMo 2's blocks, whose norms act on each branch's output (norm_placement="post").
* Granite-MoE: softmax over the top-k logits (renormalised top-k), every block MoE, no shared experts,
  and Granite's scalar multipliers (embedding, attention, residual, logits).
* GraniteMoeShared: the same with one ungated shared expert of any width.
* GLM-4.5: DeepSeek-V3's routing (sigmoid scores, a selection bias, optional group-limited selection by
  top-2 sums, optional renormalisation and a route scale), ungated shared experts, a prefix of dense
  blocks, optional q/k/v biases and per-head q/k norms, RoPE over part of each head.
* EXAONE-MoE: GLM-4.5's routing and blocks with per-head q/k norms, a sliding window on any layers (its
  config requires one) and no RoPE on the layers without it.
* DeepSeek-V3: the same routing and blocks under Multi-head Latent Attention (YaRN included), written with
  `rope_interleave=False` so that q and k rows need no permutation.
* DeepSeek-V2: softmax top-k without renormalisation (a route scale, groups ranked by their best expert)
  with DeepSeek's blocks under latent attention; its RoPE pairs are interleaved, so the q and k rows are
  permuted back from sparsemoe's rotate-half pairs.
* ERNIE 4.5: softmax top-k chosen by probability + selection bias (bias_on_probs), renormalised, ungated
  shared experts, MoE blocks every n-th after a dense prefix; its RoPE pairs are interleaved too.
* AFMoE: DeepSeek-V3's sigmoid routing without groups, renormalised, ungated shared experts, a dense
  prefix; gated attention with per-head q/k norms, sandwich norms, a sliding window with RoPE on exactly the
  sliding layers, and muP's embedding scale sqrt(dim) if any.
All but the DeepSeek formats have GQA attention; all have gated experts and no capacity in evaluation; only
the Granite formats hold multipliers other than 1, only Mixtral, the Qwen formats and EXAONE-MoE a sliding
window, only EXAONE-MoE and AFMoE layers without RoPE, only FlexOlmo post-norm blocks, and only AFMoE
gated attention and sandwich norms.
A model none can express is refused with every format's reasons, never exported approximately. The
weights are written in the layout of the published checkpoints (Mixtral's per-expert
`block_sparse_moe.experts.{j}.w1/w2/w3`, Granite's stacked `block_sparse_moe.input_linear` and
`output_linear`, the others' per-expert `mlp.experts.{j}.gate_proj/up_proj/down_proj`), which every
transformers version loads (transformers 5 fuses them on load), or with `fused=True` in transformers 5's
3-D layout. Tensors are written one at a time (see `sparsemoe.hf.io.write_safetensors`), sharded above
`max_shard_bytes` with an index file; the selection bias stays float32 whatever `dtype` is (EXAONE-MoE's
own layout keeps it on the block, `mlp.e_score_correction_bias`; the others, and fused, on the gate).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from sparsemoe.hf.config_map import INTERLEAVED_ROPE_FAMILIES, SAVED_KEY, MappedConfig
from sparsemoe.hf.io import INDEX_FILE, HFFormatError, write_safetensors
from sparsemoe.hf.load import has_selection_bias
from sparsemoe.hf.weights import Layout, model_pieces
from sparsemoe.model.config import SCALAR_MULTIPLIERS

_HIDDEN_ACT = {"swiglu": "silu", "geglu": "gelu_pytorch_tanh"}


@dataclass(frozen=True)
class _Format:
    """What an export format can hold of the model around its routing; every format's checks read it."""

    name: str  # as the reasons name it
    attention: str = "gqa"  # gqa (grouped-query) or mla (DeepSeek's latent attention)
    multipliers: bool = False  # Granite's embedding, attention, residual and logits multipliers
    sliding: Optional[str] = None  # a sliding window: None (never), "all" (on every layer), "any" (any layers)
    global_nope: bool = False  # with a window, the layers without it have no RoPE (EXAONE-MoE); else all have
    norm_placement: str = "pre"  # the blocks' norms: on each branch's input (pre), output (post, OLMo 2) or both
    attention_gate: bool = False  # gated attention (AFMoE): required where True, refused where False


def _scaled(c) -> dict[str, Any]:
    """The model's multipliers that are not neutral (attention_multiplier: other than 1/sqrt(head_dim))."""
    scaled = {name: getattr(c, name) for name in SCALAR_MULTIPLIERS if getattr(c, name) != 1.0}
    if c.attention_scale != c.head_dim**-0.5:
        scaled["attention_multiplier"] = c.attention_multiplier
    return scaled


def _shared_incompatibilities(model: nn.Module, f: _Format) -> list[str]:
    """What no export format can hold, and what format `f` lacks of the attention, multipliers and windows."""
    c = model.config
    problems = []
    if c.sliding_window is not None and (f.sliding is None or (f.sliding == "all" and c.sliding_layers is not None)):
        has = "no sliding window" if f.sliding is None else "a sliding window on every layer or on none"
        problems.append(f"sliding_window={c.sliding_window}, sliding_layers={c.sliding_layers} ({f.name} has {has})")
    if c.norm_placement != f.norm_placement:
        problems.append(f"norm_placement={c.norm_placement!r} ({f.name}: {f.norm_placement!r})")
    if c.attention_gate != f.attention_gate:
        problems.append(f"attention_gate={c.attention_gate} ({f.name}: {f.attention_gate})")
    global_layers = [i for i in range(c.n_layers) if c.window_of(i) is None]
    nope = (global_layers or None) if f.global_nope and c.sliding_window is not None else None
    if c.nope_layers != nope:
        has = "RoPE on every layer" if not f.global_nope else "RoPE exactly on the sliding-window layers, if any"
        problems.append(f"nope_layers={c.nope_layers} ({f.name} has {has}: nope_layers={nope})")
    if not f.multipliers:
        scaled = _scaled(c)
        if scaled:
            settings = ", ".join(f"{k}={v}" for k, v in scaled.items())
            problems.append(f"{settings} ({f.name} has no multipliers; the Granite formats have)")
    if getattr(c, "attention", "gqa") != f.attention:
        kind = "grouped-query attention" if f.attention == "gqa" else "Multi-head Latent Attention"
        problems.append(f"attention={c.attention!r} ({f.name} has {kind}, attention={f.attention!r})")
    if c.activation not in _HIDDEN_ACT:
        problems.append(f"activation={c.activation!r} ({f.name} experts are gated: swiglu or geglu)")
    if c.moe_config().capacity_factor_for(training=False) is not None:
        problems.append("a capacity in evaluation drops tokens (set eval_capacity_factor=float('inf'))")
    if c.noise == "gaussian":
        problems.append(f"noise='gaussian' has learned noise weights {f.name} cannot hold")
    return problems


@dataclass(frozen=True)
class _SoftmaxFormat(_Format):
    """A softmax top-k format (Mixtral, Qwen, OLMoE, FlexOlmo, Granite): what it holds besides routing."""

    dense_blocks: bool = False  # dense blocks (Qwen's mlp_only_layers / decoder_sparse_step)
    shared_expert: Optional[str] = None  # None, or exactly one shared expert: "gated" by a sigmoid (Qwen2-MoE)
    #                                      or "ungated" (GraniteMoeShared)
    qkv_bias: bool = False  # optional q/k/v biases
    qk_norm: Optional[str] = None  # the q/k norm every layer has: None, "head" or "full"
    renormalizes: bool = False  # the top-k weights are always renormalised (Mixtral)
    head_dim_from_width: bool = False  # head_dim must be dim / n_heads (OLMoE's k norm assumes it)


def _softmax_incompatibilities(model: nn.Module, f: _SoftmaxFormat) -> list[str]:
    c = model.config
    problems = _shared_incompatibilities(model, f)
    if c.dense or (not f.dense_blocks and c.moe_layer_ids != list(range(c.n_layers))):
        problems.append("every block must be MoE (dense=False, first_dense_layers=0, moe_every=1)")
    if c.qkv_bias and not f.qkv_bias:
        problems.append(f"qkv_bias=True ({f.name} has no q/k/v biases)")
    if (c.qk_norm_scope if c.qk_norm else None) != f.qk_norm:
        has = {None: "no q/k norms", "head": "q/k norms per head", "full": "q/k norms over the whole projections"}
        problems.append(f"qk_norm={c.qk_norm}, qk_norm_scope={c.qk_norm_scope!r} ({f.name} has {has[f.qk_norm]})")
    if f.head_dim_from_width and c.head_dim * c.n_heads != c.dim:
        problems.append(f"head_dim={c.head_dim} ({f.name} needs dim / n_heads = {c.dim / c.n_heads:g})")
    if c.rotary_dim != c.head_dim:
        problems.append(f"rotary_dim={c.rotary_dim} ({f.name} rotates the whole head, head_dim={c.head_dim})")
    if c.router != "topk" or c.score_func != "softmax":
        problems.append(f"router={c.router!r}, score_func={c.score_func!r} ({f.name}: 'topk', 'softmax')")
    # after_topk (softmax over the k chosen logits) equals renormalised softmax probabilities.
    if f.renormalizes and not c.renormalize and c.score_order == "before_topk" and c.top_k > 1:
        problems.append(f"renormalize=False ({f.name} renormalises the top-k weights)")
    if c.route_scale != 1.0:
        problems.append(f"route_scale={c.route_scale} ({f.name}: 1.0)")
    if f.shared_expert:
        if c.num_shared_experts != 1 or c.shared_expert_gate != (f.shared_expert == "gated"):
            kind = "sigmoid-gated" if f.shared_expert == "gated" else "ungated"
            problems.append(
                f"num_shared_experts={c.num_shared_experts}, shared_expert_gate={c.shared_expert_gate} "
                f"({f.name} has one {kind} shared expert)"
            )
    elif c.num_shared_experts:
        problems.append(f"num_shared_experts={c.num_shared_experts} ({f.name} has none)")
    problems += _selection_bias_incompatibilities(model, f.name, held=False)
    return problems


def _selection_bias_incompatibilities(model: nn.Module, name: str, held: bool) -> list[str]:
    """A non-zero selection bias that a format without one would lose (held=False), or that the model's
    settings ignore while the format would apply it (held=True)."""
    if held == model.config.bias_balancing or not has_selection_bias(model):
        return []
    if held:
        return [f"a non-zero selection bias that bias_balancing=False ignores ({name} would apply it)"]
    return [f"a non-zero selection bias (bias_balancing), which {name} lacks"]


_SOFTMAX_FORMATS = {
    "mixtral": _SoftmaxFormat("Mixtral", renormalizes=True, sliding="all"),
    "qwen2_moe": _SoftmaxFormat(
        "Qwen2-MoE", dense_blocks=True, shared_expert="gated", qkv_bias=True, sliding="any"
    ),
    "qwen3_moe": _SoftmaxFormat("Qwen3-MoE", dense_blocks=True, qk_norm="head", sliding="all"),
    "olmoe": _SoftmaxFormat("OLMoE", qk_norm="full", head_dim_from_width=True),
    "flex_olmo": _SoftmaxFormat("FlexOlmo", qk_norm="full", norm_placement="post"),
    "granitemoe": _SoftmaxFormat("Granite-MoE", renormalizes=True, multipliers=True),
    "granitemoeshared": _SoftmaxFormat(
        "GraniteMoeShared", renormalizes=True, multipliers=True, shared_expert="ungated"
    ),
}


def mixtral_incompatibilities(model: nn.Module) -> list[str]:
    """Why `model` cannot be written as Mixtral (empty when it can)."""
    return _softmax_incompatibilities(model, _SOFTMAX_FORMATS["mixtral"])


@dataclass(frozen=True)
class _DeepSeekFormat(_Format):
    """A format with DeepSeek's blocks (ungated shared experts, a prefix of dense blocks) and its routing."""

    score_func: str = "sigmoid"  # sigmoid (DeepSeek-V3, GLM-4.5, EXAONE-MoE) or softmax (DeepSeek-V2)
    group_score: str = "top2_sum"  # how groups are ranked for group-limited selection
    selection_bias: bool = True  # the router has e_score_correction_bias (and may renormalise); else it never
    #                              renormalises
    normed_windowed_gqa: bool = False  # GQA with per-head q/k norms always, no biases, RoPE over whole heads,
    #                                    and a sliding window (EXAONE-MoE's and AFMoE's configs are written with one)


_DEEPSEEK_FORMATS = {
    "glm4_moe": _DeepSeekFormat("GLM-4.5"),
    "exaone_moe": _DeepSeekFormat("EXAONE-MoE", sliding="any", global_nope=True, normed_windowed_gqa=True),
    "deepseek_v3": _DeepSeekFormat("DeepSeek-V3", attention="mla"),
    "deepseek_v2": _DeepSeekFormat(
        "DeepSeek-V2", attention="mla", score_func="softmax", group_score="max", selection_bias=False
    ),
}


def _deepseek_incompatibilities(model: nn.Module, f: _DeepSeekFormat) -> list[str]:
    c = model.config
    name = f.name
    problems = _shared_incompatibilities(model, f)
    if c.dense or c.moe_layer_ids != list(range(c.first_dense_layers, c.n_layers)):
        problems.append("the MoE blocks must follow a prefix of dense blocks (dense=False, moe_every=1)")
    if f.attention == "mla" and (c.qkv_bias or c.qk_norm):
        problems.append(f"qkv_bias={c.qkv_bias}, qk_norm={c.qk_norm} ({name}'s latent attention has neither)")
    if f.normed_windowed_gqa and (c.qkv_bias or not c.qk_norm or c.rotary_dim != c.head_dim):
        problems.append(
            f"qkv_bias={c.qkv_bias}, qk_norm={c.qk_norm}, rotary_dim={c.rotary_dim} ({name} has no q/k/v "
            f"biases, q/k norms per head, and RoPE over the whole head, head_dim={c.head_dim})"
        )
    if f.normed_windowed_gqa and c.sliding_window is None:
        problems.append(f"sliding_window=None ({name} is written with a window)")
    if c.qk_norm and c.qk_norm_scope != "head":
        problems.append(f"qk_norm_scope='full' ({name} normalises q and k per head)")
    if c.rope_scaling is not None and f.attention == "gqa":
        problems.append(f"rope_scaling (YaRN) is not written for {name}")
    if c.score_func != f.score_func or c.score_order != "before_topk":
        problems.append(
            f"score_func={c.score_func!r}, score_order={c.score_order!r} ({name}: {f.score_func!r}, 'before_topk')"
        )
    if c.router == "group_limited" and c.num_groups > 1 and c.group_score != f.group_score:
        problems.append(f"group_score={c.group_score!r} ({name} ranks groups by {f.group_score!r})")
    problems += _selection_bias_incompatibilities(model, name, held=f.selection_bias)
    if not f.selection_bias and c.renormalize and c.top_k > 1:
        problems.append(f"renormalize=True ({name} does not renormalise the top-k weights)")
    return problems + _ungated_shared_incompatibilities(c, name)


def _ungated_shared_incompatibilities(c, name: str) -> list[str]:
    """Shared experts a format with DeepSeek's (ungated, num_shared_experts * moe_hidden_dim wide) cannot hold."""
    problems = []
    if c.num_shared_experts and c.shared_expert_gate:
        problems.append(f"shared_expert_gate=True ({name}'s shared experts are not gated)")
    if c.num_shared_experts and c.moe_config().shared_dim != c.num_shared_experts * c.moe_hidden_dim:
        problems.append(
            f"shared_hidden_dim={c.shared_hidden_dim} ({name}'s shared MLP is num_shared_experts * moe_hidden_dim "
            f"= {c.num_shared_experts * c.moe_hidden_dim} wide)"
        )
    return problems


def glm4_incompatibilities(model: nn.Module) -> list[str]:
    """Why `model` cannot be written as GLM-4.5 (`glm4_moe`; empty when it can)."""
    return _deepseek_incompatibilities(model, _DEEPSEEK_FORMATS["glm4_moe"])


def ernie_incompatibilities(model: nn.Module) -> list[str]:
    """Why `model` cannot be written as ERNIE 4.5 (`ernie4_5_moe`; empty when it can): softmax top-k chosen by
    probability + selection bias, renormalised, ungated shared experts, MoE blocks every n-th after a prefix,
    plain GQA attention with RoPE's dims paired interleaved (the exporter permutes q and k rows back)."""
    c, name = model.config, "ERNIE 4.5"
    problems = _shared_incompatibilities(model, _Format(name))
    if c.dense or not c.moe_layer_ids:
        problems.append("dense=True (ERNIE 4.5 has MoE blocks)")
    if c.qkv_bias or c.qk_norm or c.rotary_dim != c.head_dim or c.rope_scaling is not None:
        problems.append(
            f"qkv_bias={c.qkv_bias}, qk_norm={c.qk_norm}, rotary_dim={c.rotary_dim}, rope_scaling={c.rope_scaling} "
            f"({name} has no q/k/v biases, no q/k norms, and plain RoPE over the whole head)"
        )
    if c.router != "topk" or c.score_func != "softmax" or c.score_order != "before_topk" or not c.renormalize:
        problems.append(
            f"router={c.router!r}, score_func={c.score_func!r}, score_order={c.score_order!r}, renormalize="
            f"{c.renormalize} ({name}: 'topk', 'softmax', 'before_topk', True)"
        )
    if c.route_scale != 1.0:
        problems.append(f"route_scale={c.route_scale} ({name}: 1.0)")
    problems += _selection_bias_incompatibilities(model, name, held=True)
    if c.bias_balancing and not c.bias_on_probs:
        problems.append(f"bias_on_probs=False ({name} adds the selection bias to the probabilities)")
    return problems + _ungated_shared_incompatibilities(c, name)


def afmoe_incompatibilities(model: nn.Module) -> list[str]:
    """Why `model` cannot be written as AFMoE (`afmoe`; empty when it can): DeepSeek-V3's sigmoid routing with
    a selection bias, renormalised, x route_scale, without groups; ungated shared experts; a dense prefix;
    gated GQA attention with per-head q/k norms, sandwich norms, a sliding window with RoPE on exactly the
    sliding layers; optionally muP's embedding scale sqrt(dim)."""
    c, f = model.config, _DeepSeekFormat(
        "AFMoE", sliding="any", global_nope=True, norm_placement="sandwich", attention_gate=True, multipliers=True,
        normed_windowed_gqa=True,
    )  # fmt: skip
    problems = _deepseek_incompatibilities(model, f)
    scaled = _scaled(c)
    if scaled.pop("embedding_multiplier", c.dim**0.5) != c.dim**0.5 or scaled:
        problems.append(
            f"multipliers other than 1 or an embedding_multiplier of sqrt(dim)={c.dim**0.5:g} (AFMoE's muP): "
            + ", ".join(f"{k}={v}" for k, v in {**scaled, "embedding_multiplier": c.embedding_multiplier}.items())
        )
    if c.router != "topk" or not c.renormalize:
        problems.append(f"router={c.router!r}, renormalize={c.renormalize} (AFMoE: 'topk', True)")
    return problems


_INCOMPATIBILITIES = {
    **{name: partial(_softmax_incompatibilities, f=f) for name, f in _SOFTMAX_FORMATS.items()},
    **{name: partial(_deepseek_incompatibilities, f=f) for name, f in _DEEPSEEK_FORMATS.items()},
    "ernie4_5_moe": ernie_incompatibilities,
    "afmoe": afmoe_incompatibilities,
}
EXPORT_FAMILIES = tuple(_INCOMPATIBILITIES)  # in the order `export_family` tries them


def export_family(model: nn.Module, family: str = "auto") -> str:
    """The format to write `model` as: `family` (one of EXPORT_FAMILIES) if it expresses the model, or for
    "auto" the first of EXPORT_FAMILIES that does. HFFormatError with every reason otherwise."""
    if family != "auto" and family not in _INCOMPATIBILITIES:
        raise HFFormatError(f"cannot export as {family!r}; formats: auto, {', '.join(EXPORT_FAMILIES)}")
    candidates = EXPORT_FAMILIES if family == "auto" else (family,)
    reasons = {name: _INCOMPATIBILITIES[name](model) for name in candidates}
    for name, problems in reasons.items():
        if not problems:
            return name
    if family != "auto":
        raise HFFormatError(f"this model cannot be exported as {family}: " + "; ".join(reasons[family]))
    raise HFFormatError(
        "this model cannot be exported to Hugging Face: "
        + " / ".join(f"as {name}: " + "; ".join(problems) for name, problems in reasons.items())
    )


def _config_json_common(c, dtype: torch.dtype) -> dict[str, Any]:
    """The keys both formats share (the model around its MoE blocks)."""
    rope_extra = {}
    if c.rope_scaling is not None:  # YaRN: same keys in transformers' rope_parameters
        rope_extra = {k: v for k, v in c.rope_scaling.items() if k != "type"}
        rope_extra["rope_type"] = "yarn"
    return {
        "vocab_size": c.vocab_size,
        "hidden_size": c.dim,
        "num_hidden_layers": c.n_layers,
        "num_attention_heads": c.n_heads,
        "num_key_value_heads": c.n_kv_heads,
        "head_dim": c.head_dim,
        "hidden_act": _HIDDEN_ACT[c.activation],
        "max_position_embeddings": c.max_seq_len,
        "rms_norm_eps": c.norm_eps,
        "rope_theta": c.rope_theta,  # read by transformers 4.x
        "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta, **rope_extra},  # transformers 5
        "num_experts_per_tok": c.top_k,
        "output_router_logits": False,
        "tie_word_embeddings": c.tie_embeddings,
        "attention_dropout": 0.0,
        "initializer_range": c.init_std,
        "use_cache": True,
        "dtype": str(dtype).removeprefix("torch."),
        "torch_dtype": str(dtype).removeprefix("torch."),
        SAVED_KEY: c.to_dict(),  # training settings the format has no key for; read back by sparsemoe.hf
    }


def _layer_types(c) -> list[str]:
    """transformers' spelling of which layers slide a window."""
    return ["sliding_attention" if c.window_of(i) else "full_attention" for i in range(c.n_layers)]


def mixtral_config_json(c, dtype: torch.dtype) -> dict[str, Any]:
    jitter = c.noise_eps if c.noise == "jitter" else 0.0
    return {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "intermediate_size": c.moe_hidden_dim,
        "rope_scaling": {"type": "yarn", **c.rope_scaling} if c.rope_scaling else None,  # transformers 4.x
        "sliding_window": c.sliding_window,  # on every layer (or None)
        "num_local_experts": c.num_experts,
        "router_aux_loss_coef": c.aux_loss_coef,
        "router_jitter_noise": jitter,
        **_config_json_common(c, dtype),
    }


def _qwen_layers(c) -> dict[str, Any]:
    """Qwen's spelling of which blocks are dense: a prefix (mlp_only_layers) and every decoder_sparse_step-th."""
    return {"mlp_only_layers": list(range(c.first_dense_layers)), "decoder_sparse_step": c.moe_every}


def _softmax_routing_json(c) -> dict[str, Any]:
    # after_topk (softmax over the k chosen logits) is the renormalised softmax probabilities.
    return {
        "num_experts": c.num_experts,
        "norm_topk_prob": c.renormalize or c.score_order == "after_topk",
        "router_aux_loss_coef": c.aux_loss_coef,
    }


def qwen_moe_config_json(c, dtype: torch.dtype, family: str) -> dict[str, Any]:
    """Qwen2-MoE (one gated shared expert, optional q/k/v biases) or Qwen3-MoE (per-head q/k norms)."""
    if family == "qwen2_moe":
        specific = {"shared_expert_intermediate_size": c.moe_config().shared_dim, "qkv_bias": c.qkv_bias}
        specific["layer_types"] = _layer_types(c)  # which layers slide (transformers 5 reads it)
    else:
        specific = {"attention_bias": False}
    return {
        "architectures": ["Qwen2MoeForCausalLM" if family == "qwen2_moe" else "Qwen3MoeForCausalLM"],
        "model_type": family,
        "intermediate_size": c.dense_hidden_dim,
        "moe_intermediate_size": c.moe_hidden_dim,
        "use_sliding_window": c.sliding_window is not None,
        "sliding_window": c.sliding_window,
        **specific,
        **_qwen_layers(c),
        **_softmax_routing_json(c),
        **_config_json_common(c, dtype),
    }


def olmoe_config_json(c, dtype: torch.dtype, family: str) -> dict[str, Any]:
    """OLMoE, or FlexOlmo (OLMo 2's blocks, each branch's output normalised)."""
    # FlexOlmo's config defaults to its tokenizer's ids, beyond sparsemoe's vocabulary: written as unset.
    specific = {"clip_qkv": None} if family == "olmoe" else {"pad_token_id": None, "eos_token_id": None}
    return {
        "architectures": ["OlmoeForCausalLM" if family == "olmoe" else "FlexOlmoForCausalLM"],
        "model_type": family,
        "intermediate_size": c.moe_hidden_dim,
        "attention_bias": False,
        **specific,
        **_softmax_routing_json(c),
        **_config_json_common(c, dtype),
    }


def granite_config_json(c, dtype: torch.dtype, family: str) -> dict[str, Any]:
    """Granite-MoE, or GraniteMoeShared (one ungated shared expert): softmax over the top-k logits, multipliers."""
    specific = {"shared_intermediate_size": c.moe_config().shared_dim} if family == "granitemoeshared" else {}
    return {
        "architectures": ["GraniteMoeForCausalLM" if family == "granitemoe" else "GraniteMoeSharedForCausalLM"],
        "model_type": family,
        "intermediate_size": c.moe_hidden_dim,
        "num_local_experts": c.num_experts,
        "router_aux_loss_coef": c.aux_loss_coef,
        "attention_bias": False,
        "embedding_multiplier": c.embedding_multiplier,
        "attention_multiplier": c.attention_scale,
        "residual_multiplier": c.residual_multiplier,
        "logits_scaling": c.logits_divisor,
        **specific,
        **_config_json_common(c, dtype),
    }


def _deepseek_routing_json(c) -> dict[str, Any]:
    """DeepSeek's routing keys (GLM-4.5 has the same), and the blocks around it."""
    grouped = c.router == "group_limited"
    return {
        "intermediate_size": c.dense_hidden_dim,
        "moe_intermediate_size": c.moe_hidden_dim,
        "n_routed_experts": c.num_experts,
        "n_shared_experts": c.num_shared_experts,
        "n_group": c.num_groups if grouped else 1,
        "topk_group": c.topk_groups if grouped else 1,
        "norm_topk_prob": c.renormalize,
        "routed_scaling_factor": c.route_scale,
        "first_k_dense_replace": c.first_dense_layers,
        "num_nextn_predict_layers": 0,
    }


def glm4_config_json(c, dtype: torch.dtype) -> dict[str, Any]:
    out = _config_json_common(c, dtype)
    partial_rotary = c.rotary_dim / c.head_dim
    out["rope_parameters"]["partial_rotary_factor"] = partial_rotary
    return {
        "architectures": ["Glm4MoeForCausalLM"],
        "model_type": "glm4_moe",
        "partial_rotary_factor": partial_rotary,  # transformers 4.x
        "attention_bias": c.qkv_bias,
        "use_qk_norm": c.qk_norm,
        **_deepseek_routing_json(c),
        **out,
    }


def exaone_config_json(c, dtype: torch.dtype) -> dict[str, Any]:
    """EXAONE-MoE: DeepSeek-V3's routing (its own key names for the expert counts), per-head q/k norms, the
    sliding layers as layer_types (the others attend without RoPE when there is a window)."""
    routing = _deepseek_routing_json(c)
    routing["num_experts"] = routing.pop("n_routed_experts")
    routing["num_shared_experts"] = routing.pop("n_shared_experts")
    return {
        "architectures": ["ExaoneMoeForCausalLM"],
        "model_type": "exaone_moe",
        "sliding_window": c.sliding_window,
        "layer_types": _layer_types(c),
        "mlp_layer_types": ["sparse" if c.is_moe_layer(i) else "dense" for i in range(c.n_layers)],
        **routing,
        **_config_json_common(c, dtype),
    }


def ernie_config_json(c, dtype: torch.dtype) -> dict[str, Any]:
    """ERNIE 4.5: its own key names for the experts and for which blocks are MoE (every moe_layer_interval-th
    from moe_layer_start_index to the last)."""
    return {
        "architectures": ["Ernie4_5_MoeForCausalLM"],
        "model_type": "ernie4_5_moe",
        "intermediate_size": c.dense_hidden_dim,
        "moe_intermediate_size": c.moe_hidden_dim,
        "moe_num_experts": c.num_experts,
        "moe_k": c.top_k,
        "moe_num_shared_experts": c.num_shared_experts,
        "moe_layer_start_index": c.first_dense_layers,
        "moe_layer_end_index": c.n_layers - 1,
        "moe_layer_interval": c.moe_every,
        "use_bias": False,
        "router_aux_loss_coef": c.aux_loss_coef,
        **_config_json_common(c, dtype),
    }


def afmoe_config_json(c, dtype: torch.dtype) -> dict[str, Any]:
    """AFMoE: the sliding layers as layer_types (the others attend without RoPE), muP as mup_enabled."""
    return {
        "architectures": ["AfmoeForCausalLM"],
        "model_type": "afmoe",
        "intermediate_size": c.dense_hidden_dim,
        "moe_intermediate_size": c.moe_hidden_dim,
        "num_experts": c.num_experts,
        "num_shared_experts": c.num_shared_experts,
        "num_dense_layers": c.first_dense_layers,
        "route_scale": c.route_scale,
        "sliding_window": c.sliding_window,
        "layer_types": _layer_types(c),
        "mup_enabled": c.embedding_multiplier != 1.0,
        "attention_bias": False,
        **_config_json_common(c, dtype),
    }


def deepseek_config_json(c, dtype: torch.dtype, family: str) -> dict[str, Any]:
    """DeepSeek-V3 (sigmoid routing, selection bias) or DeepSeek-V2 (softmax routing): latent attention."""
    out = _config_json_common(c, dtype)
    out["num_key_value_heads"] = c.n_heads  # latent attention: every head reads the shared latent
    if family == "deepseek_v3":
        # sparsemoe's rotate-half pairs as they are: no permutation of q or k rows
        specific = {"topk_method": "noaux_tc", "rope_interleave": False}
    else:  # DeepSeek-V2 always pairs RoPE dims interleaved: the exporter permutes q and k rows back
        grouped = c.router == "group_limited" and c.num_groups > 1
        specific = {"topk_method": "group_limited_greedy" if grouped else "greedy", "moe_layer_freq": 1,
                    "aux_loss_alpha": c.aux_loss_coef}
    return {
        "architectures": ["DeepseekV3ForCausalLM" if family == "deepseek_v3" else "DeepseekV2ForCausalLM"],
        "model_type": family,
        "q_lora_rank": c.q_lora_rank,
        "kv_lora_rank": c.kv_lora_rank,
        "qk_rope_head_dim": c.head_dim,
        "qk_nope_head_dim": c.qk_nope_head_dim,
        "v_head_dim": c.v_head_dim,
        "rope_scaling": {"type": "yarn", **c.rope_scaling} if c.rope_scaling else None,  # transformers 4.x
        "attention_bias": False,
        **specific,
        **_deepseek_routing_json(c),
        **out,
    }


_CONFIG_JSON = {
    "mixtral": mixtral_config_json,
    "qwen2_moe": partial(qwen_moe_config_json, family="qwen2_moe"),
    "qwen3_moe": partial(qwen_moe_config_json, family="qwen3_moe"),
    "olmoe": partial(olmoe_config_json, family="olmoe"),
    "flex_olmo": partial(olmoe_config_json, family="flex_olmo"),
    "granitemoe": partial(granite_config_json, family="granitemoe"),
    "granitemoeshared": partial(granite_config_json, family="granitemoeshared"),
    "glm4_moe": glm4_config_json,
    "exaone_moe": exaone_config_json,
    "ernie4_5_moe": ernie_config_json,
    "afmoe": afmoe_config_json,
    "deepseek_v3": partial(deepseek_config_json, family="deepseek_v3"),
    "deepseek_v2": partial(deepseek_config_json, family="deepseek_v2"),
}
def _stored_bytes(name: str, t: torch.Tensor, dtype: torch.dtype, keep: set[str]) -> int:
    kept = name in keep or not t.is_floating_point()
    return t.numel() * (t.element_size() if kept else torch.empty((), dtype=dtype).element_size())


def _shards(
    items: list[tuple[str, torch.Tensor]], max_bytes: int, dtype: torch.dtype, keep: set[str]
) -> list[list[tuple[str, torch.Tensor]]]:
    shards: list[list[tuple[str, torch.Tensor]]] = [[]]
    size = 0
    for name, t in items:
        nbytes = _stored_bytes(name, t, dtype, keep)
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, t))
        size += nbytes
    return shards


def export_hf(
    model: nn.Module,
    out_dir: Union[str, Path],
    *,
    family: str = "auto",
    dtype: Optional[torch.dtype] = None,
    fused: bool = False,
    max_shard_bytes: int = 5 * 2**30,
) -> Path:
    """Write `model` (a sparsemoe MoETransformer) as a Hugging Face folder; returns the folder.

    family: one of EXPORT_FAMILIES, or "auto" (the first of them that expresses the model).
    dtype: cast each tensor while writing (default: the model's own dtype).
    fused: write transformers 5's fused expert tensors instead of the per-expert layout.
    """
    family = export_family(model, family)
    c = model.config
    dtype = dtype or model.embed.weight.dtype
    block = "block_sparse_moe" if family == "mixtral" and not fused else "mlp"
    # EXAONE-MoE's and ERNIE's own checkpoints hold the selection bias on the block; transformers 5's on the gate.
    # (AFMoE's is on the block in both.)
    on_block = family in ("exaone_moe", "ernie4_5_moe") and not fused
    layout = Layout(prefix="model.", mixtral_block=block, fused_experts=fused, bias_on_block=on_block)
    state = model.state_dict()
    items = []
    # These families pair RoPE dims interleaved: their q and k rows are permuted back from rotate-half.
    mapped = MappedConfig(family, c, rope_interleaved=family in INTERLEAVED_ROPE_FAMILIES)
    pieces = model_pieces(mapped, layout)
    for piece in pieces:
        t = state[piece.dst]
        t = (t[piece.index] if piece.index else t).detach()  # a view: no copy yet
        items.append((piece.src, piece.to_hf(t) if piece.to_hf else t))
    # Written in its own dtype (float32): the selection bias is compared across experts at full precision.
    keep = {piece.src for piece in pieces if piece.dst.endswith(".router.expert_bias")}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shards = _shards(items, max_shard_bytes, dtype, keep)
    meta = {"format": "pt"}
    if len(shards) == 1:
        write_safetensors(out / "model.safetensors", shards[0], meta, dtype, keep_dtype=keep)
    else:
        weight_map, total = {}, 0
        for n, shard in enumerate(shards, 1):
            name = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
            write_safetensors(out / name, shard, meta, dtype, keep_dtype=keep)
            for key, t in shard:
                weight_map[key] = name
                total += _stored_bytes(key, t, dtype, keep)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / INDEX_FILE).write_text(json.dumps(index, indent=2), encoding="utf-8")
    config = _CONFIG_JSON[family](c, dtype)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return out


def export_hf_mixtral(model: nn.Module, out_dir: Union[str, Path], **kwargs) -> Path:
    """`export_hf(model, out_dir, family="mixtral", ...)`: refuse anything Mixtral cannot express."""
    return export_hf(model, out_dir, family="mixtral", **kwargs)
