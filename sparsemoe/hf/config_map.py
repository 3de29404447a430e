"""Hugging Face `config.json` -> sparsemoe `ModelConfig`, per model family.

Supported families (`model_type`): mixtral, qwen2_moe, qwen3_moe, olmoe, flex_olmo, granitemoe,
granitemoeshared, deepseek_v2, deepseek_v3, glm4_moe, dots1, exaone_moe, ernie4_5_moe, afmoe, minimax_m2.
The config is read as plain JSON, so loading and converting need no `transformers` install; defaults for
keys a config leaves out are those of the transformers config classes.

How each family routes, and the MoEConfig fields it maps to:

| family      | scores  | selection                        | combine weights                   | shared experts   |
|-------------|---------|----------------------------------|-----------------------------------|------------------|
| mixtral     | softmax | top-k                            | renormalised                      | none             |
| qwen2_moe   | softmax | top-k                            | renormalised iff norm_topk_prob   | 1, sigmoid-gated |
| qwen3_moe   | softmax | top-k                            | renormalised iff norm_topk_prob   | none             |
| olmoe       | softmax | top-k                            | renormalised iff norm_topk_prob   | none             |
| flex_olmo   | as olmoe (FlexOlmo: OLMo 2's blocks, each branch's output normalised: norm_placement="post")      |
| granitemoe  | softmax | top-k logits, softmax over those | (so always renormalised)          | none             |
| granitemoeshared | as granitemoe                       |                                   | 1, ungated       |
| deepseek_v2 | softmax | top-k, or groups ranked by max   | x routed_scaling_factor           | n_shared_experts |
| deepseek_v3 | sigmoid | score + e_score_correction_bias, | renormalised iff norm_topk_prob,  | n_shared_experts |
|             |         | groups ranked by top-2 sum       | x routed_scaling_factor           |                  |
| glm4_moe    | as deepseek_v3 (GLM-4.5 routes as DeepSeek-V3 does; its attention is GQA, not MLA)                |
| dots1       | as deepseek_v3 (dots.llm1; GQA attention with Qwen3's per-head q/k norm)                           |
| exaone_moe  | as deepseek_v3 (K-EXAONE; per-head q/k norm, sliding layers, global layers without RoPE)          |
| ernie4_5_moe | softmax | probability + e_score_correction_bias | renormalised                    | moe_num_shared_… |
| afmoe       | sigmoid | score + expert_bias, top-k       | renormalised, x route_scale       | num_shared_...   |
| minimax_m2  | sigmoid | score + e_score_correction_bias, top-k | renormalised                     | none             |

RoPE: plain, or YaRN (`rope_type` "yarn", DeepSeek's context extension) as `ModelConfig.rope_scaling`;
a `partial_rotary_factor` (GLM-4.5 rotates half of each head) as `ModelConfig.rotary_dim`. A sliding
window as `ModelConfig.sliding_window`, on the layers transformers slides it over (`sliding_layers`).
Granite's scalar multipliers (embedding_multiplier, attention_multiplier, residual_multiplier,
logits_scaling) are the ModelConfig fields of the same names (`logits_divisor` for logits_scaling).
Anything a family does that sparsemoe's model cannot reproduce (other RoPE scalings, biases sparsemoe's
attention lacks, dense layers that are not a prefix, ...) raises `HFFormatError` naming the config key,
instead of loading a model that would silently compute something else.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from sparsemoe.hf.io import HFFormatError
from sparsemoe.model.rope import YARN_KEYS

FAMILIES = (
    "mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "flex_olmo", "granitemoe", "granitemoeshared", "deepseek_v2",
    "deepseek_v3", "glm4_moe", "dots1", "exaone_moe", "ernie4_5_moe", "afmoe", "minimax_m2",
)  # fmt: skip
GRANITE_FAMILIES = ("granitemoe", "granitemoeshared")
# Families that always pair RoPE dims interleaved, (2i, 2i+1): their q/k rows are permuted to rotate-half
# pairs at load time and back on export. DeepSeek-V3 does so unless its config says rope_interleave=False.
INTERLEAVED_ROPE_FAMILIES = ("deepseek_v2", "ernie4_5_moe")
# Families whose MoE block holds a selection bias (`e_score_correction_bias`), DeepSeek-V3 style: on the
# router (`gate.`), or on the block itself for MiniMax-M2 (and in EXAONE-MoE's own checkpoints); ERNIE 4.5
# keeps it, [1, E], in a `moe_statics` module (on the gate, or on the block in its own checkpoints); AFMoE
# keeps it on the block as `expert_bias`.
SELECTION_BIAS_FAMILIES = ("deepseek_v3", "glm4_moe", "dots1", "exaone_moe", "ernie4_5_moe", "afmoe", "minimax_m2")

# Expert activations: Hugging Face hidden_act -> sparsemoe activation (both gated).
_ACTIVATIONS = {"silu": "swiglu", "swish": "swiglu", "gelu_pytorch_tanh": "geglu", "gelu_new": "geglu"}

_REQUIRED = object()


@dataclass
class MappedConfig:
    """The sparsemoe model config for a Hugging Face config, and what the loader must know besides."""

    family: str
    model_config: Any  # sparsemoe.model.ModelConfig
    rope_interleaved: bool = False  # rotary pairs are (2i, 2i+1) (DeepSeek, ERNIE 4.5): permute q/k rows at load time
    notes: list[str] = field(default_factory=list)  # behaviour differences worth telling the user


def read_hf_config(directory: Union[str, Path]) -> dict[str, Any]:
    path = Path(directory) / "config.json"
    if not Path(directory).is_dir():
        raise HFFormatError(f"{str(directory)!r} is not a directory (expected a Hugging Face model folder)")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise HFFormatError(f"{str(directory)!r} has no config.json (expected a Hugging Face model folder)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise HFFormatError(f"{str(path)!r} is corrupt or truncated ({err})") from None
    if not isinstance(cfg, dict):
        raise HFFormatError(f"{str(path)!r} does not hold a JSON object")
    return cfg


def family_of(cfg: dict[str, Any]) -> str:
    """The supported family of a Hugging Face config, or an HFFormatError naming what was found."""
    model_type = cfg.get("model_type")
    if model_type in FAMILIES:
        return model_type
    arch = ", ".join(cfg.get("architectures") or []) or "unknown"
    raise HFFormatError(
        f"unsupported architecture {arch} (model_type {model_type!r}); supported model_type values: "
        + ", ".join(FAMILIES)
        + f". {EXPERTS_IMPLEMENTATION_HINT}"
    )


# Where the converter and the patcher send a family they do not map.
EXPERTS_IMPLEMENTATION_HINT = (
    "Any transformers MoE model runs its experts on sparsemoe's backends without conversion: load it with "
    "transformers and experts_implementation='sparsemoe' (after `import sparsemoe.hf`)"
)


# transformers' attribute_map aliases: a config.json may spell the expert counts and top-k any of these ways.
_ALIASES = {
    "num_experts": ("num_local_experts", "n_routed_experts", "moe_num_experts"),
    "num_local_experts": ("num_experts", "n_routed_experts"),
    "n_routed_experts": ("num_experts", "num_local_experts"),
    "n_shared_experts": ("num_shared_experts",),  # EXAONE-MoE's spelling
    "num_experts_per_tok": ("moe_k",),  # ERNIE 4.5's spelling
}


def _get(cfg: dict[str, Any], key: str, default: Any = _REQUIRED) -> Any:
    value = cfg.get(key)
    for alias in _ALIASES.get(key, ()):
        value = cfg.get(alias) if value is None else value
    if value is None:
        if default is _REQUIRED:
            raise HFFormatError(f"config.json lacks {key!r}, which a {cfg.get('model_type')} model needs")
        return default
    return value


def _unsupported(key: str, value: Any, accepted: str) -> HFFormatError:
    return HFFormatError(f"config.json {key}={value!r} is not supported: sparsemoe's model needs {accepted}")


def _activation(cfg: dict[str, Any]) -> str:
    act = _get(cfg, "hidden_act", "silu")
    if act not in _ACTIVATIONS:
        raise _unsupported("hidden_act", act, "one of " + ", ".join(map(repr, _ACTIVATIONS)))
    return _ACTIVATIONS[act]


def _rope(cfg: dict[str, Any], default_theta: float) -> dict[str, Any]:
    """rope_theta and rope_scaling, from transformers 5's rope_parameters or the older rope_theta/rope_scaling keys."""
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    source = params if params.get("rope_type") not in (None, "default") else scaling
    rope_type = source.get("rope_type") or source.get("type") or "default"
    theta = float(params.get("rope_theta") or cfg.get("rope_theta") or default_theta)
    if rope_type == "default":
        return {"rope_theta": theta, "rope_scaling": None}
    if rope_type != "yarn":
        key = "rope_parameters" if source is params else "rope_scaling"
        raise _unsupported(key, {"rope_type": rope_type}, "plain RoPE or YaRN (rope_type 'default' or 'yarn')")
    if source.get("partial_rotary_factor", 1.0) != 1.0:
        raise _unsupported("partial_rotary_factor", source["partial_rotary_factor"], "1.0")
    yarn = {k: source[k] for k in YARN_KEYS + ("attention_factor", "truncate") if source.get(k) is not None}
    yarn.setdefault("original_max_position_embeddings", int(_get(cfg, "max_position_embeddings")))
    if "factor" not in yarn:
        raise _unsupported("rope_scaling", source, "a 'factor' for YaRN")
    return {"rope_theta": theta, "rope_scaling": {"type": "yarn", **yarn}}


def _rotary_dim(cfg: dict[str, Any], head_dim: int) -> Optional[int]:
    """Rotated width per head from `partial_rotary_factor` (transformers 5's rope_parameters or a top-level
    key), as transformers computes it; None when the whole head rotates."""
    factor = (cfg.get("rope_parameters") or {}).get("partial_rotary_factor", cfg.get("partial_rotary_factor"))
    if factor is None and cfg.get("rotary_dim") is not None:  # MiniMax-M2's legacy key, as transformers reads it
        factor = int(cfg["rotary_dim"]) / head_dim
    if factor is None or float(factor) == 1.0:
        return None
    width = int(head_dim * float(factor))
    if not 0 < float(factor) < 1 or width < 2 or width % 2:
        accepted = f"a factor in (0, 1] that rotates an even number of head_dim={head_dim} dims"
        raise _unsupported("partial_rotary_factor", factor, accepted)
    return width


def _common(
    cfg: dict[str, Any], default_theta: float, default_eps: float, max_seq_len: Optional[int]
) -> dict[str, Any]:
    heads = int(_get(cfg, "num_attention_heads"))
    longest = int(_get(cfg, "max_position_embeddings"))
    head_dim = cfg.get("head_dim")
    return dict(
        vocab_size=int(_get(cfg, "vocab_size")),
        dim=int(_get(cfg, "hidden_size")),
        n_layers=int(_get(cfg, "num_hidden_layers")),
        n_heads=heads,
        n_kv_heads=int(_get(cfg, "num_key_value_heads", heads)),
        head_dim=head_dim,
        rotary_dim=_rotary_dim(cfg, int(head_dim or int(_get(cfg, "hidden_size")) // heads)),
        max_seq_len=min(longest, max_seq_len) if max_seq_len else longest,
        **_rope(cfg, default_theta),
        norm_eps=float(_get(cfg, "rms_norm_eps", default_eps)),
        tie_embeddings=bool(_get(cfg, "tie_word_embeddings", False)),
        activation=_activation(cfg),
        init_std=float(_get(cfg, "initializer_range", 0.02)),
        dropout=0.0,
    )


def _qwen_sparse_layers(cfg: dict[str, Any], n_layers: int) -> dict[str, Any]:
    """Qwen's `mlp_only_layers` + `decoder_sparse_step` as sparsemoe's `first_dense_layers` + `moe_every`."""
    step = int(_get(cfg, "decoder_sparse_step", 1))
    if step < 1:
        raise _unsupported("decoder_sparse_step", step, "an integer >= 1")
    dense_only = set(cfg.get("mlp_only_layers") or [])
    wanted = [i for i in range(n_layers) if i not in dense_only and (i + 1) % step == 0]
    for first in range(n_layers + 1):
        if [i for i in range(first, n_layers) if (i + 1) % step == 0] == wanted:
            return dict(first_dense_layers=first, moe_every=step)
    raise _unsupported(
        "mlp_only_layers",
        sorted(dense_only),
        "the dense layers to be a prefix of the model (layers 0..n-1) plus every decoder_sparse_step-th layer",
    )


# The families whose transformers code slides a window, with the defaults of the config keys that decide
# where: (sliding_window, max_window_layers) when config.json leaves them out.
_WINDOW_DEFAULTS = {
    "mixtral": (None, 0), "qwen2_moe": (4096, 28), "qwen3_moe": (4096, 28), "dots1": (4096, 62),
    "exaone_moe": (4096, 0),  # its layers slide by sliding_window_pattern instead
    "afmoe": (1024, 0),  # by global_attn_every_n_layers
}  # fmt: skip


def _sliding_layers(cfg: dict[str, Any], family: str, n_layers: int) -> list[bool]:
    """Which layers slide: config.json's layer_types where the family's transformers code reads them (Qwen2-MoE,
    dots1, EXAONE-MoE, AFMoE), else as transformers derives them."""
    types = cfg.get("layer_types") if family in ("qwen2_moe", "dots1", "exaone_moe", "afmoe") else None
    if types is not None:
        if len(types) != n_layers or not set(types) <= {"full_attention", "sliding_attention"}:
            accepted = f"{n_layers} entries of 'full_attention' or 'sliding_attention'"
            raise _unsupported("layer_types", types, accepted)
        return [t == "sliding_attention" for t in types]
    max_window_layers = cfg.get("max_window_layers")
    max_window_layers = int(_WINDOW_DEFAULTS[family][1] if max_window_layers is None else max_window_layers)
    if family == "qwen2_moe":  # every other layer below max_window_layers
        return [i % 2 == 0 and i < max_window_layers for i in range(n_layers)]
    if family == "dots1":  # the layers from max_window_layers on
        return [i >= max_window_layers for i in range(n_layers)]
    if family == "exaone_moe":  # every sliding_window_pattern-th layer is global, the others slide
        pattern = cfg.get("sliding_window_pattern", 4)
        if isinstance(pattern, bool) or not isinstance(pattern, int) or pattern < 1:
            raise _unsupported("sliding_window_pattern", pattern, "an integer >= 1 (or layer_types)")
        return [(i + 1) % pattern != 0 for i in range(n_layers)]
    if family == "afmoe":  # every global_attn_every_n_layers-th layer is global
        every = int(cfg.get("global_attn_every_n_layers") or 4)
        return [(i + 1) % every != 0 for i in range(n_layers)]
    return [True] * n_layers


def _sliding_window(cfg: dict[str, Any], family: str, n_layers: int) -> dict[str, Any]:
    """ModelConfig.sliding_window and sliding_layers, for the layers transformers slides a window over."""
    if family not in _WINDOW_DEFAULTS or (family.startswith("qwen") and not cfg.get("use_sliding_window")):
        return {}
    window = cfg.get("sliding_window", _WINDOW_DEFAULTS[family][0])
    slides = _sliding_layers(cfg, family, n_layers)
    if not window or not any(slides):
        return {}
    return dict(sliding_window=int(window), sliding_layers=[i for i, s in enumerate(slides) if s])


def _global_layers(cfg: dict[str, Any], family: str, n_layers: int) -> Optional[list[int]]:
    """The layers that do not slide (EXAONE-MoE's and AFMoE's global layers, which attend without RoPE)."""
    return [i for i, slides in enumerate(_sliding_layers(cfg, family, n_layers)) if not slides] or None


def _attention(cfg: dict[str, Any], family: str, base: dict[str, Any]) -> None:
    """The attention-side fields of the ModelConfig (`base`), per family."""
    base.update(_sliding_window(cfg, family, base["n_layers"]))
    if family == "qwen2_moe":
        base["qkv_bias"] = bool(_get(cfg, "qkv_bias", True))
    elif family == "qwen3_moe":
        if cfg.get("attention_bias"):
            raise _unsupported("attention_bias", True, "attention without biases (qwen3_moe also biases o_proj)")
        base["qk_norm"] = True
    elif family in ("olmoe", "flex_olmo"):
        if cfg.get("attention_bias"):
            raise _unsupported("attention_bias", True, f"attention without biases ({family} also biases o_proj)")
        if family == "olmoe":
            if cfg.get("clip_qkv") is not None:
                raise _unsupported("clip_qkv", cfg["clip_qkv"], "None (no clamping of q, k and v)")
            # OLMoE normalises the whole q and k projections, its k norm sized for heads of hidden_size / heads.
            if base["head_dim"] not in (None, base["dim"] // base["n_heads"]):
                raise _unsupported("head_dim", base["head_dim"], "hidden_size / num_attention_heads for olmoe")
        else:
            base["norm_placement"] = "post"  # FlexOlmo has OLMo 2's blocks: each branch's output is normalised
        base.update(qk_norm=True, qk_norm_scope="full")
    elif family == "glm4_moe":
        base.update(qkv_bias=bool(_get(cfg, "attention_bias", False)), qk_norm=bool(_get(cfg, "use_qk_norm", False)))
    elif family in GRANITE_FAMILIES:
        if cfg.get("attention_bias"):
            raise _unsupported("attention_bias", True, f"attention without biases ({family} also biases o_proj)")
        base.update(
            embedding_multiplier=float(_get(cfg, "embedding_multiplier", 1.0)),
            attention_multiplier=float(_get(cfg, "attention_multiplier", 1.0)),
            residual_multiplier=float(_get(cfg, "residual_multiplier", 1.0)),
            logits_divisor=float(_get(cfg, "logits_scaling", 1.0)),
        )
    elif family == "exaone_moe":
        # Per-head q/k norms; with a window configured, the global layers attend without RoPE ("global NoPE").
        base["qk_norm"] = True
        if cfg.get("sliding_window", _WINDOW_DEFAULTS[family][0]) is not None:
            base["nope_layers"] = _global_layers(cfg, family, base["n_layers"])
    elif family == "afmoe":
        if cfg.get("attention_bias"):
            raise _unsupported("attention_bias", True, "attention without biases")
        # Per-head q/k norms, gated attention, norms on both sides of each branch, and RoPE on the sliding
        # layers only (whether or not a window is set), as transformers' AFMoE computes.
        base.update(qk_norm=True, attention_gate=True, norm_placement="sandwich")
        base["nope_layers"] = _global_layers(cfg, family, base["n_layers"])
        if cfg.get("mup_enabled"):
            base["embedding_multiplier"] = float(base["dim"]) ** 0.5
    elif family == "ernie4_5_moe":
        if cfg.get("use_bias"):
            raise _unsupported("use_bias", True, "projections without biases")
        if base["rotary_dim"] is not None:
            raise _unsupported("partial_rotary_factor", cfg.get("partial_rotary_factor"), "1.0 for ernie4_5_moe")
    elif family == "minimax_m2":
        base.update(qk_norm=True, qk_norm_scope="full")  # transformers normalises q and k whatever use_qk_norm says
    elif family == "dots1":
        if cfg.get("attention_bias"):
            raise _unsupported("attention_bias", True, "attention without biases (dots1 also biases o_proj)")
        base["qk_norm"] = True
    elif family.startswith("deepseek"):
        if cfg.get("attention_bias"):
            raise _unsupported("attention_bias", True, "Multi-head Latent Attention without biases")
        if base["rotary_dim"] is not None:
            raise _unsupported("partial_rotary_factor", cfg.get("partial_rotary_factor"), "1.0 with MLA")
        base.update(
            attention="mla",
            n_kv_heads=base["n_heads"],
            head_dim=int(_get(cfg, "qk_rope_head_dim")),
            q_lora_rank=cfg.get("q_lora_rank"),
            kv_lora_rank=int(_get(cfg, "kv_lora_rank")),
            qk_nope_head_dim=int(_get(cfg, "qk_nope_head_dim")),
            v_head_dim=int(_get(cfg, "v_head_dim")),
        )


def _mixtral(cfg: dict[str, Any], n_layers: int, notes: list[str], family: str) -> dict[str, Any]:
    """Mixtral, and MiniMax-M2 (Mixtral's block with sigmoid scores and a selection bias)."""
    jitter = float(_get(cfg, "router_jitter_noise", 0.0))
    if 0 < jitter:
        notes.append(
            "router_jitter_noise: sparsemoe jitters the router input only (transformers also the experts' input)"
        )
    return dict(
        num_experts=int(_get(cfg, "num_local_experts")),
        top_k=int(_get(cfg, "num_experts_per_tok")),
        moe_hidden_dim=int(_get(cfg, "intermediate_size")),
        router="topk",
        score_func="sigmoid" if family == "minimax_m2" else "softmax",
        bias_balancing=family == "minimax_m2",  # e_score_correction_bias moves selection, as expert_bias does
        renormalize=True,
        aux_loss_coef=float(_get(cfg, "router_aux_loss_coef", 0.001)),
        noise="jitter" if 0 < jitter < 1 else "none",
        noise_eps=jitter if 0 < jitter < 1 else 1e-2,
    )


def _softmax_topk(cfg: dict[str, Any], expert_width_key: str, aux_default: float) -> dict[str, Any]:
    """Plain softmax top-k routing, as Qwen and OLMoE spell it."""
    return dict(
        top_k=int(_get(cfg, "num_experts_per_tok")),
        moe_hidden_dim=int(_get(cfg, expert_width_key)),
        router="topk",
        score_func="softmax",
        renormalize=bool(_get(cfg, "norm_topk_prob", False)),
        aux_loss_coef=float(_get(cfg, "router_aux_loss_coef", aux_default)),
    )


def _qwen(cfg: dict[str, Any], n_layers: int, notes: list[str], family: str) -> dict[str, Any]:
    experts = int(_get(cfg, "num_experts"))
    out = _softmax_topk(cfg, "moe_intermediate_size", 0.001)
    out["dense_hidden_dim"] = int(_get(cfg, "intermediate_size"))
    if experts == 0:
        out.update(dense=True, top_k=1)
    else:
        out["num_experts"] = experts
        out.update(_qwen_sparse_layers(cfg, n_layers))
    if family == "qwen2_moe":
        shared = int(_get(cfg, "shared_expert_intermediate_size", 5632))  # the transformers default
        if shared > 0:
            out.update(num_shared_experts=1, shared_hidden_dim=shared, shared_expert_gate=True)
    return out


def _olmoe(cfg: dict[str, Any], n_layers: int, notes: list[str], family: str) -> dict[str, Any]:
    return dict(_softmax_topk(cfg, "intermediate_size", 0.01), num_experts=int(_get(cfg, "num_experts")))


def _granite(cfg: dict[str, Any], n_layers: int, notes: list[str], family: str) -> dict[str, Any]:
    """IBM Granite MoE: softmax over the top-k router logits; GraniteMoeShared adds one ungated shared MLP."""
    out = dict(
        num_experts=int(_get(cfg, "num_local_experts")),
        top_k=int(_get(cfg, "num_experts_per_tok")),
        moe_hidden_dim=int(_get(cfg, "intermediate_size")),
        router="topk",
        score_func="softmax",
        score_order="after_topk",
        renormalize=True,
        aux_loss_coef=float(_get(cfg, "router_aux_loss_coef", 0.001)),
    )
    shared = int(_get(cfg, "shared_intermediate_size", 0)) if family == "granitemoeshared" else 0
    if shared > 0:
        out.update(num_shared_experts=1, shared_hidden_dim=shared)
    return out


def _ernie(cfg: dict[str, Any], n_layers: int, notes: list[str], family: str) -> dict[str, Any]:
    """ERNIE 4.5: selection by softmax probability + e_score_correction_bias, weights the probabilities
    renormalised; MoE layers every moe_layer_interval-th from moe_layer_start_index to the last."""
    start, interval = int(_get(cfg, "moe_layer_start_index", 1)), int(_get(cfg, "moe_layer_interval", 1))
    end = int(_get(cfg, "moe_layer_end_index", -1))
    if end != -1 and any((i + 1) % interval == 0 for i in range(max(start, end + 1), n_layers)):
        raise _unsupported("moe_layer_end_index", end, f"-1 or a layer after the last MoE one ({n_layers} layers)")
    return dict(
        num_experts=int(_get(cfg, "num_experts")),
        top_k=int(_get(cfg, "num_experts_per_tok")),
        moe_hidden_dim=int(_get(cfg, "moe_intermediate_size")),
        dense_hidden_dim=int(_get(cfg, "intermediate_size")),
        first_dense_layers=start,
        moe_every=interval,
        num_shared_experts=int(_get(cfg, "moe_num_shared_experts", 2)),
        router="topk",
        score_func="softmax",
        renormalize=True,
        bias_balancing=True,  # e_score_correction_bias moves selection, as sparsemoe's expert_bias does
        bias_on_probs=True,
        aux_loss_coef=float(_get(cfg, "router_aux_loss_coef", 0.001)),
    )


def _afmoe(cfg: dict[str, Any], n_layers: int, notes: list[str], family: str) -> dict[str, Any]:
    """AFMoE: sigmoid scores + the block's expert_bias for selection, renormalised, x route_scale; ungated
    shared experts; num_dense_layers dense blocks first."""
    return dict(
        num_experts=int(_get(cfg, "num_experts")),
        top_k=int(_get(cfg, "num_experts_per_tok")),
        moe_hidden_dim=int(_get(cfg, "moe_intermediate_size")),
        dense_hidden_dim=int(_get(cfg, "intermediate_size")),
        first_dense_layers=int(_get(cfg, "num_dense_layers", 1)),
        num_shared_experts=int(_get(cfg, "num_shared_experts", 2)),
        router="topk",
        score_func="sigmoid",
        renormalize=True,
        route_scale=float(_get(cfg, "route_scale", 1.0)),
        bias_balancing=True,  # expert_bias moves selection, as sparsemoe's expert_bias does
        aux_loss_coef=0.0,
    )


def _first_dense_layers(cfg: dict[str, Any], family: str) -> int:
    """DeepSeek's first_k_dense_replace, or EXAONE-MoE's mlp_layer_types when given (a dense prefix only)."""
    types = cfg.get("mlp_layer_types") if family == "exaone_moe" else None
    if types is None:
        return int(_get(cfg, "first_k_dense_replace", 0))
    first = next((i for i, t in enumerate(types) if t != "dense"), len(types))
    if any(t != "sparse" for t in types[first:]):
        raise _unsupported("mlp_layer_types", types, "'dense' layers as a prefix, then 'sparse' ones")
    return first


def _deepseek(cfg: dict[str, Any], n_layers: int, notes: list[str], family: str) -> dict[str, Any]:
    if cfg.get("mlp_bias"):
        raise _unsupported("mlp_bias", True, "MLPs without biases")
    if int(cfg.get("moe_layer_freq") or 1) != 1:
        raise _unsupported(
            "moe_layer_freq", cfg["moe_layer_freq"], "1 (every layer after first_k_dense_replace is MoE)"
        )
    groups, kept = cfg.get("n_group") or 1, cfg.get("topk_group") or 1
    out: dict[str, Any] = dict(
        num_experts=int(_get(cfg, "n_routed_experts")),
        top_k=int(_get(cfg, "num_experts_per_tok")),
        moe_hidden_dim=int(_get(cfg, "moe_intermediate_size")),
        dense_hidden_dim=int(_get(cfg, "intermediate_size")),
        first_dense_layers=_first_dense_layers(cfg, family),
        moe_every=1,
        num_shared_experts=int(_get(cfg, "n_shared_experts", 0)),
        route_scale=float(_get(cfg, "routed_scaling_factor", 1.0)),
    )
    method = cfg.get("topk_method") or ("greedy" if family == "deepseek_v2" else "noaux_tc")
    if family == "deepseek_v2":
        if cfg.get("norm_topk_prob"):
            # transformers ignores the key for V2, DeepSeek's own code renormalises and drops the scaling.
            raise _unsupported("norm_topk_prob", True, "False for deepseek_v2 (implementations disagree on it)")
        if method not in ("greedy", "group_limited_greedy"):
            raise _unsupported("topk_method", method, "'greedy' or 'group_limited_greedy' for deepseek_v2")
        out.update(score_func="softmax", renormalize=False, aux_loss_coef=float(cfg.get("aux_loss_alpha") or 0.001))
        if method == "group_limited_greedy":
            out.update(router="group_limited", num_groups=int(groups), topk_groups=int(kept), group_score="max")
        else:
            out.update(router="topk")
    else:
        if method != "noaux_tc":
            raise _unsupported("topk_method", method, "'noaux_tc' for deepseek_v3")
        out.update(
            score_func="sigmoid",
            renormalize=bool(_get(cfg, "norm_topk_prob", True)),
            bias_balancing=True,  # e_score_correction_bias moves selection, as sparsemoe's expert_bias does
            router="group_limited" if groups > 1 else "topk",
            num_groups=int(groups),
            topk_groups=int(kept),
            group_score="top2_sum",
            aux_loss_coef=0.0,
            seq_aux_loss_coef=float(cfg.get("aux_loss_alpha") or 1e-4),
        )
    return out


_ROUTING = {
    "mixtral": _mixtral,
    "qwen2_moe": _qwen,
    "qwen3_moe": _qwen,
    "olmoe": _olmoe,
    "flex_olmo": _olmoe,
    "granitemoe": _granite,
    "granitemoeshared": _granite,
    "deepseek_v2": _deepseek,
    "deepseek_v3": _deepseek,
    "glm4_moe": _deepseek,  # DeepSeek-V3's routing (sigmoid, selection bias, groups) under GQA attention
    "dots1": _deepseek,  # likewise
    "exaone_moe": _deepseek,  # likewise (GQA with per-head q/k norms, sliding layers, NoPE global layers)
    "ernie4_5_moe": _ernie,
    "afmoe": _afmoe,
    "minimax_m2": _mixtral,
}

# ModelConfig fields that describe the model around the MoE blocks, not the blocks themselves.
_NOT_MOE = ("dense_hidden_dim", "first_dense_layers", "moe_every", "dense")


def map_moe_config(cfg: dict[str, Any], **overrides: Any):
    """The `MoEConfig` of one MoE block of a Hugging Face config (attention and layout are not checked).

    Used to patch a live transformers model, where only the MoE blocks are replaced.
    """
    from sparsemoe.config import MoEConfig

    family = family_of(cfg)
    fields = _ROUTING[family](cfg, int(_get(cfg, "num_hidden_layers")), [], family)
    fields = {k: v for k, v in fields.items() if k not in _NOT_MOE}
    fields["hidden_dim"] = fields.pop("moe_hidden_dim")
    fields["activation"] = _activation(cfg)
    fields.update(overrides)
    try:
        return MoEConfig(dim=int(_get(cfg, "hidden_size")), **fields)
    except (TypeError, ValueError) as err:
        raise HFFormatError(f"the MoE blocks of this {family} model do not map to sparsemoe.MoE: {err}") from None


def map_config(cfg: dict[str, Any], max_seq_len: Optional[int] = None) -> MappedConfig:
    """Translate a Hugging Face config dict; raise HFFormatError for anything that does not map."""
    from sparsemoe.model import ModelConfig

    family = family_of(cfg)
    notes: list[str] = []
    theta = {"mixtral": 1e6, "minimax_m2": 5e6, "ernie4_5_moe": 5e5}.get(family, 1e4)  # the transformers defaults
    eps = 1e-5 if family in ("mixtral", "olmoe", "glm4_moe", "exaone_moe", "ernie4_5_moe", "afmoe") else 1e-6
    base = _common(cfg, theta, eps, max_seq_len)
    _attention(cfg, family, base)
    moe = _ROUTING[family](cfg, base["n_layers"], notes, family)
    interleaved = family in INTERLEAVED_ROPE_FAMILIES or (
        family == "deepseek_v3" and bool(cfg.get("rope_interleave", True))
    )
    try:
        model_config = ModelConfig(**base, **moe)
    except (TypeError, ValueError) as err:
        raise HFFormatError(f"config.json of this {family} model does not map to a sparsemoe model: {err}") from None
    return MappedConfig(family, _saved_settings(cfg, model_config, notes), interleaved, notes)


# Fields that do not change what a model computes in evaluation: the only ones a config saved by
# sparsemoe's export may set differently from what the Hugging Face keys say.
TRAINING_ONLY = (
    "aux_loss_coef", "seq_aux_loss_coef", "z_loss_coef", "aux_loss_mode", "noise", "noise_eps", "router_init_std",
    "bias_update_rate", "capacity_factor", "eval_capacity_factor", "capacity_priority", "expert_dropout", "dropout",
    "init_std", "score_order", "moe_backend", "dense_hidden_dim",
)  # fmt: skip
SAVED_KEY = "sparsemoe_model_config"  # written by sparsemoe.hf.export next to the Mixtral keys


def _saved_settings(cfg: dict[str, Any], mapped, notes: list[str]):
    """The ModelConfig sparsemoe saved on export (training settings included), if it still describes this model.

    Mixtral's config has no key for, e.g., z_loss_coef or a training capacity; keeping sparsemoe's own
    config beside them makes sparsemoe -> HF -> sparsemoe exact. It is used only when every field that
    affects the computation agrees with the Hugging Face keys (which win if someone edited them).
    """
    from dataclasses import replace

    from sparsemoe.model import ModelConfig

    saved = cfg.get(SAVED_KEY)
    if not isinstance(saved, dict):
        return mapped
    # transformers re-saves float("inf") (a dropless capacity) as {"__float__": "Infinity"}.
    saved = {k: float(v["__float__"]) if isinstance(v, dict) and "__float__" in v else v for k, v in saved.items()}
    try:
        config = ModelConfig.from_dict(saved)
        config = replace(config, max_seq_len=mapped.max_seq_len, moe_backend=mapped.moe_backend)
    except (TypeError, ValueError) as err:
        notes.append(f"ignored {SAVED_KEY}: {err}")
        return mapped
    differs = set(config.diff(mapped)) - set(TRAINING_ONLY)
    if config.moe_config().shared_dim == mapped.moe_config().shared_dim:
        differs.discard("shared_hidden_dim")  # the same width, spelt explicitly or as the default
    if config.attention == "mla":
        differs.discard("n_kv_heads")  # unused by latent attention
    if config.attention_scale == mapped.attention_scale:
        differs.discard("attention_multiplier")  # the same scale, spelt explicitly or as the default
    if not config.bias_balancing:
        # Formats with a selection bias (GLM-4.5) always map to bias_balancing=True; a zero bias routes as
        # none, which the loader checks once the bias is read (sparsemoe.hf.load).
        differs -= {"bias_balancing", "bias_on_probs"}
    differs = sorted(differs)
    if differs:
        notes.append(f"ignored {SAVED_KEY}: it disagrees with the Hugging Face keys on {differs}")
        return mapped
    return config
