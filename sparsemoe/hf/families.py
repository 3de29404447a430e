"""The transformers MoE families whose experts use the experts interface, and random models of any size.

    families = experts_families()          # {"mixtral": Family(...), "gpt_oss": ..., ...}: the installed ones
    model = random_model(families["gpt_oss"], ModelSize())           # a tiny random model, eval mode
    model = random_model(families["mixtral"], ModelSize(hidden=1024, moe_hidden=2816, layers=4))

A family is a transformers model folder (`transformers.models.<name>`) that defines at least one
experts class decorated with `use_experts_implementation`; they are found by reading the installed
transformers, not from a list, so a new release's families are covered the day it is installed.

A random model is built from the family's own config class: its defaults, with every size field that
the config has (widths, heads, experts, layers, vocabulary, ...) set from `ModelSize`, per-layer
patterns cut to the fewest layers that still hold each kind of layer (so hybrid attention/state-space
stacks keep an MoE layer), and the model class picked by trying, in order, a causal LM, a text model,
then any model of the family, keeping the first that builds and holds an experts module. A few families
ship defaults that build no MoE at all (an MoE switch off, a per-layer list left empty); `_HINTS` gives
those the fields that turn their experts on, nothing else.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import warnings
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Optional

import torch
from torch import nn

from sparsemoe.hf.experts_implementation import is_decorated_experts

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Family:
    name: str  # the transformers model folder, e.g. "qwen3_moe"
    module: str  # its modeling module
    experts_classes: tuple[str, ...]  # the decorated experts classes it defines

    def modeling(self):
        return importlib.import_module(self.module)

    def classes(self) -> tuple[type, ...]:
        modeling = self.modeling()
        return tuple(getattr(modeling, name) for name in self.experts_classes)


@dataclass(frozen=True)
class ModelSize:
    """The sizes a random model is built with (each applied where the config has the field)."""

    hidden: int = 64  # model width D
    moe_hidden: int = 32  # routed expert hidden width F
    dense_hidden: int = 96  # dense MLP and shared-expert width
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 16
    experts: int = 8
    top_k: int = 2
    layers: int = 2  # at least; more when a per-layer pattern needs them to hold every kind of layer
    max_layers: int = 8
    vocab: int = 256
    sliding_window: int = 8  # at most (small, so that sliding-window attention is exercised in short inputs)


@lru_cache(maxsize=None)
def experts_families() -> dict[str, Family]:
    """Every family of the installed transformers with a decorated experts class ({} without transformers)."""
    try:
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES, model_type_to_module_name
    except ImportError:
        return {}
    found: dict[str, Family] = {}
    for model_type in CONFIG_MAPPING_NAMES:
        folder = model_type_to_module_name(model_type)
        if folder in found:
            continue
        name = f"transformers.models.{folder}.modeling_{folder}"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                modeling = importlib.import_module(name)
        except Exception as err:  # a family needing an absent optional package is not installed here
            log.debug("skipping %s: %s", name, err)
            continue
        classes = tuple(
            cls_name
            for cls_name, cls in vars(modeling).items()
            if inspect.isclass(cls) and cls.__module__ == name and is_decorated_experts(cls)
        )
        if classes:
            found[folder] = Family(folder, name, classes)
    return dict(sorted(found.items()))


# Families whose default config builds no routed experts: the fields that turn them on.
_HINTS: dict[str, dict[str, Any]] = {
    "gemma4": {"enable_moe_block": True},
    "diffusion_gemma": {"enable_moe_block": True},
    "deepseek_ocr2": {"mlp_layer_types": ["dense", "sparse"]},
    "lfm2_moe": {"layer_types": ["conv", "full_attention"], "num_dense_layers": 1},
    "granitemoehybrid": {"layer_types": ["linear_attention", "full_attention"]},  # all state-space by default
    "qwen4_exp": {"indexer_n_heads": 2, "indexer_kv_heads": 1, "indexer_head_dim": 16, "indexer_budget": 8,
                  "indexer_compress_ratio": 4},
    # Its RoPE falls back to a multimodal section layout sized for the released head width: make it explicit,
    # so that it is scaled with the rest.
    "ernie4_5_vl_moe": {"rope_parameters": {"rope_theta": 500000.0, "rope_type": "default",
                                            "mrope_section": [22, 22, 20]}},
    "glm4v_moe": {"rope_parameters": {"rope_theta": 10000.0, "rope_type": "default", "partial_rotary_factor": 0.5,
                                      "mrope_section": [8, 12, 12]}},
}


def _size_fields(size: ModelSize) -> dict[str, int]:
    """Config fields set to a size (when the config has them, or has them as None)."""
    fields = {
        "hidden": ("hidden_size", "d_model", "moe_hidden_size"),
        "moe_hidden": ("moe_intermediate_size", "expert_intermediate_size", "expert_ffn_hidden_size"),
        "dense_hidden": ("intermediate_size", "ffn_hidden_size", "dense_intermediate_size",
                         "first_dense_intermediate_size", "mlp_only_intermediate_size", "shared_intermediate_size",
                         "shared_expert_intermediate_size", "shared_experts_intermediate_size",
                         "moe_shared_expert_intermediate_size", "share_expert_dim"),
        "heads": ("num_attention_heads", "linear_num_heads", "num_heads"),
        "kv_heads": ("num_key_value_heads",),
        "head_dim": ("head_dim", "v_head_dim", "linear_key_head_dim", "linear_value_head_dim", "linear_head_dim",
                     "mamba_head_dim", "indexer_head_dim", "index_head_dim", "hidden_size_per_layer_input"),
        "experts": ("num_experts", "n_routed_experts", "num_local_experts", "moe_num_experts"),
        "vocab": ("vocab_size", "unpadded_vocab_size", "vocab_size_per_layer_input"),
    }  # fmt: skip
    out = {key: getattr(size, attr) for attr, keys in fields.items() for key in keys}
    half = max(size.head_dim // 2, 2)
    out.update(
        kv_lora_rank=size.hidden // 4, q_lora_rank=size.hidden // 2, o_lora_rank=size.hidden // 2,
        qk_rope_head_dim=half, qk_nope_head_dim=half,
        ssm_state_size=16, mamba_d_state=16, chunk_size=16, mamba_num_heads=2 * size.hidden // size.head_dim,
        linear_num_value_heads=size.heads, linear_num_key_heads=size.kv_heads,
    )  # fmt: skip
    return out


# Fields capped (never raised): counts that must stay within the sizes above, and layer offsets.
_CAPS = {
    "n_group": 2, "num_expert_group": 2, "topk_group": 1, "first_k_dense_replace": 1, "num_dense_layers": 1,
    "moe_layer_start_index": 1,
    "n_shared_experts": 1, "num_shared_experts": 1, "moe_num_shared_experts": 1,
    "expert_layer_period": 2, "expert_layer_offset": 1, "attn_layer_period": 2, "attn_layer_offset": 1,
    "index_n_heads": 2, "index_num_heads": 2, "indexer_n_heads": 2,
}  # fmt: skip
# Experts per token, capped at ModelSize.top_k.
_TOP_K_FIELDS = ("num_experts_per_tok", "num_experts_per_token", "moe_k", "moe_topk", "top_k_experts")
# Fields that a family's defaults may leave unset (None) although its experts need them.
_FILL_WHEN_UNSET = (
    "num_experts", "n_routed_experts", "num_local_experts", "moe_num_experts", "moe_intermediate_size", "head_dim",
    "n_shared_experts", "sliding_window", *_TOP_K_FIELDS,
)  # fmt: skip


# (field, source): where a config's defaults have field == source, the field follows the source's new size
# (MLA configs whose head_dim is the RoPE part's width; multi-head attention stays multi-head).
_TIED = (("head_dim", "qk_rope_head_dim"), ("num_key_value_heads", "num_attention_heads"))


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _per_layer(config: dict, layers: int) -> dict[str, Any]:
    """Fields holding one entry per layer: lists or strings of length `layers`, and {layer index: {field:
    value}} override dicts."""
    out = {}
    for key, value in config.items():
        if isinstance(value, (list, str)) and len(value) == layers and layers > 1:
            out[key] = value
        elif _is_layer_dict(value):
            out[key] = value
    return out


def _is_layer_dict(value) -> bool:
    """{layer index: {field: value}} (the index an int or a digit string, as "05" in a saved config)."""
    return isinstance(value, dict) and bool(value) and all(
        str(k).isdigit() and isinstance(v, dict) for k, v in value.items()
    )


def _layers_kept(per_layer: dict[str, Any], size: ModelSize) -> list[int]:
    """The layers kept, in order: the first `size.layers`, and the first layer of each kind in every per-layer
    pattern (so that a hybrid stack keeps an attention layer, an MoE layer, ...), at most `size.max_layers`."""
    keep = set(range(size.layers))
    for value in per_layer.values():
        if not isinstance(value, dict):
            first: dict[str, int] = {}
            for i, kind in enumerate(value):
                first.setdefault(repr(kind), i)
            keep.update(first.values())
    return sorted(keep)[: size.max_layers]


def _rescale_sections(sections: list[int], total: int) -> list[int]:
    """Integer sections in the same proportions that sum to `total` (multimodal RoPE's mrope_section)."""
    scaled = [max(1, s * total // sum(sections)) for s in sections]
    scaled[-1] += total - sum(scaled)  # the first sections (height, width) often must stay equal
    return scaled


def shrink_config(config: dict, size: ModelSize) -> dict[str, Any]:
    """The fields of a config (as `to_dict()`) to change for a random model of `size` (nested configs too)."""
    changes: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict) and all(isinstance(k, str) for k in value) and not _is_layer_dict(value):
            # a sub-config (text, vision, RoPE, ...)
            nested = shrink_config(value, size)
            if nested:
                changes[key] = nested if "model_type" in value else {**value, **nested}
    sizes = _size_fields(size)
    caps = {**_CAPS, **dict.fromkeys(_TOP_K_FIELDS, size.top_k), "sliding_window": size.sliding_window}
    for key, value in config.items():
        if value is None and key in _FILL_WHEN_UNSET:
            changes[key] = sizes.get(key, caps.get(key))
        elif _is_int(value) and value != 0 and key in sizes:  # a zero (a part switched off) stays off
            changes[key] = sizes[key]
        elif isinstance(value, list) and value and all(map(_is_int, value)) and key in sizes:
            changes[key] = [sizes[key]] * len(value)  # e.g. one width per modality's experts
        elif _is_int(value) and key in caps:
            changes[key] = min(value, caps[key])
    for field, source in _TIED:  # e.g. MLA configs whose head_dim is the RoPE part's width
        if field in changes and source in changes and config.get(field) == config.get(source):
            changes[field] = changes[source]
    layers = config.get("num_hidden_layers")
    if isinstance(layers, int):
        per_layer = _per_layer(config, layers)
        keep = _layers_kept(per_layer, size)
        changes["num_hidden_layers"] = len(keep)
        for key, value in per_layer.items():
            if isinstance(value, dict):  # per-layer overrides: the kept layers' (renumbered), sizes shrunk too
                new_index = {old: new for new, old in enumerate(keep)}
                changes[key] = {
                    type(i)(str(new_index[int(i)]).zfill(len(str(i)))): {**v, **shrink_config(v, size)}
                    for i, v in value.items() if int(i) in new_index
                }  # fmt: skip
            else:
                picked = [value[i] for i in keep]
                changes[key] = "".join(picked) if isinstance(value, str) else picked
    vocab = changes.get("vocab_size", config.get("vocab_size"))
    for key, value in config.items():  # special tokens inside the smaller vocabulary
        if key.endswith("token_id") and isinstance(value, int) and isinstance(vocab, int) and value >= vocab:
            changes[key] = vocab - 1
    rope = config.get("rope_parameters") or config.get("rope_scaling")
    if isinstance(rope, dict) and isinstance(rope.get("mrope_section"), list):
        rotary = changes.get("qk_rope_head_dim") or int(size.head_dim * rope.get("partial_rotary_factor", 1.0))
        key = "rope_parameters" if "rope_parameters" in config else "rope_scaling"
        changes[key] = {**rope, "mrope_section": _rescale_sections(rope["mrope_section"], rotary // 2)}
    return {k: v for k, v in changes.items() if config.get(k) != v}


def _model_classes(family: Family) -> list[type]:
    """The family's model classes, most wanted first: causal LMs, then text models, then any model."""
    from transformers import PreTrainedModel

    modeling = family.modeling()
    ranked = []
    for name, cls in vars(modeling).items():
        if not (inspect.isclass(cls) and cls.__module__ == modeling.__name__ and issubclass(cls, PreTrainedModel)):
            continue
        if name.endswith("PreTrainedModel") or getattr(cls, "config_class", None) is None:
            continue
        kind = 0 if name.endswith("ForCausalLM") else 1 if name.endswith("Model") else 2
        ranked.append(((kind, "Text" not in name, len(name), name), cls))
    return [cls for _, cls in sorted(ranked, key=lambda item: item[0])]


def _config(config_class, family: Family, size: ModelSize, overrides: dict):
    hints = _HINTS.get(family.name, {})
    defaults = {**config_class().to_dict(), **hints}
    return config_class(**{**hints, **shrink_config(defaults, size), **overrides})


class ModelBuildError(RuntimeError):
    """No model class of a family could be built with an experts module (the message lists each try)."""


def random_model(family: Family, size: ModelSize = ModelSize(), seed: int = 0, **overrides) -> nn.Module:
    """A random model of `family` at `size` (float32, eval mode) holding at least one experts module.

    `overrides` go to the config class as they are (e.g. experts_implementation="sparsemoe").
    """
    experts = family.classes()
    tries = []
    for model_class in _model_classes(family):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                config = _config(model_class.config_class, family, size, overrides)
                torch.manual_seed(seed)
                model = model_class(config).eval()
        except Exception as err:
            tries.append(f"{model_class.__name__}: {type(err).__name__}: {str(err).strip()[:200]}")
            continue
        if any(isinstance(m, experts) for m in model.modules()):
            return model
        tries.append(f"{model_class.__name__}: built, but holds no {'/'.join(family.experts_classes)}")
    raise ModelBuildError(f"{family.name}: no model class builds with its experts:\n  " + "\n  ".join(tries))


def count_experts(model: nn.Module, family: Optional[Family] = None) -> int:
    """How many decorated experts modules a model holds (of `family`'s classes, or of any family)."""
    if family is not None:
        classes = family.classes()
        return sum(isinstance(m, classes) for m in model.modules())
    return sum(is_decorated_experts(m) for m in model.modules())


@dataclass
class Parity:
    """How a family's random model runs with one experts implementation against transformers' "eager"."""

    family: str
    model_class: str = ""
    implementation: str = "sparsemoe"
    output_error: float = float("nan")  # max |ours - eager| / max |eager| over the output (logits)
    gradient_error: float = float("nan")  # the same, worst parameter gradient
    float64_checked: tuple[str, ...] = ()  # gradients beyond the tolerance, checked against a float64 run
    native: bool = False  # whether the experts ran on our fused backends (else the general path)
    passed: bool = False
    reason: str = ""  # why it failed, when it did


def _output(out):
    logits = getattr(out, "logits", None)
    return logits if logits is not None else out.last_hidden_state


def _run(model: nn.Module, implementation: str, ids: torch.Tensor):
    """Output and every parameter gradient of a fixed random projection of the output."""
    model.set_experts_implementation(implementation)
    model.zero_grad(set_to_none=True)
    y = _output(model(input_ids=ids))
    projection = torch.randn(y.shape, generator=torch.Generator().manual_seed(5)).to(y.dtype)
    (y * projection).sum().backward()
    grads = {n: p.grad.detach().double() for n, p in model.named_parameters() if p.grad is not None}
    return y.detach().double(), grads


def _relative(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item() if expected.numel() else 0.0


def check_parity(
    family: Family, implementation: str = "sparsemoe", size: ModelSize = ModelSize(), tol: float = 1e-5,
    float64_factor: float = 4.0,
) -> Parity:
    """Logits and one backward's gradients of `implementation` against "eager" on a random float32 model.

    Passes when the output and every gradient are within `tol` of eager's (relative to each tensor's
    largest value). A gradient that float32 cannot compute to `tol` at all (eager's own float32 gradient
    differs from a float64 run by more: cancellation in normalised routing weights, recurrent state-space
    layers) passes when ours is within `float64_factor` x eager's own error of the float64 run.
    """
    import copy

    result = Parity(family.name, implementation=implementation)
    try:
        model = random_model(family, size)
    except ModelBuildError as err:
        result.reason = str(err)
        return result
    result.model_class = type(model).__name__
    ids = torch.randint(0, size.vocab, (2, 11), generator=torch.Generator().manual_seed(1))
    try:
        y_eager, g_eager = _run(model, "eager", ids)
        y_ours, g_ours = _run(model, implementation, ids)
    except Exception as err:
        result.reason = f"{type(err).__name__}: {str(err).strip()[:300]}"
        return result
    result.native = any(
        getattr(m.__dict__.get("_sparsemoe_layout"), "activation", None) is not None for m in model.modules()
    )
    result.output_error = _relative(y_ours, y_eager)
    if g_ours.keys() != g_eager.keys():
        result.reason = f"gradients of {sorted(g_ours.keys() ^ g_eager.keys())} are missing on one side"
        return result
    errors = {n: _relative(g_ours[n], g_eager[n]) for n in g_eager}
    result.gradient_error = max(errors.values(), default=0.0)
    beyond = sorted(n for n, e in errors.items() if e > tol)
    if beyond:
        truth_model = copy.deepcopy(model).double()
        _, g_truth = _run(truth_model, "eager", ids)
        for name in beyond:
            ours, eager = _relative(g_ours[name], g_truth[name]), _relative(g_eager[name], g_truth[name])
            if ours > max(tol, float64_factor * eager):
                result.reason = (f"gradient of {name}: {ours:.2g} from float64 (eager float32: {eager:.2g}; "
                                 f"{errors[name]:.2g} from eager float32)")  # fmt: skip
                return result
        result.float64_checked = tuple(beyond)
    if result.output_error > tol:
        result.reason = f"output differs from eager by {result.output_error:.2g} (relative)"
        return result
    result.passed = True
    return result
