"""Export a sparsemoe `MoETransformer` to a Hugging Face Mixtral folder (config.json + safetensors).

The weights are written in the per-expert layout of the original Mixtral checkpoints
(`block_sparse_moe.experts.{j}.w1/w2/w3`), which every transformers version loads (transformers 5
fuses them on load), or with `fused=True` in transformers 5's 3-D layout. Tensors are written one at a
time (see `sparsemoe.hf.io.write_safetensors`), sharded above `max_shard_bytes` with an index file.

Mixtral computes softmax top-k routing with renormalised weights, every block MoE, no shared experts,
plain GQA attention; a model outside that is refused with the reasons, not exported approximately.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from sparsemoe.hf.config_map import SAVED_KEY, MappedConfig
from sparsemoe.hf.io import INDEX_FILE, HFFormatError, write_safetensors
from sparsemoe.hf.weights import Layout, model_pieces

_HIDDEN_ACT = {"swiglu": "silu", "geglu": "gelu_pytorch_tanh"}


def mixtral_incompatibilities(model: nn.Module) -> list[str]:
    """Why `model` cannot be written as Mixtral (empty when it can)."""
    c = model.config
    problems = []
    if c.dense or c.moe_layer_ids != list(range(c.n_layers)):
        problems.append("every block must be MoE (dense=False, first_dense_layers=0, moe_every=1)")
    if getattr(c, "attention", "gqa") != "gqa":
        problems.append(f"attention={c.attention!r} (Mixtral has grouped-query attention)")
    if c.qkv_bias or c.qk_norm:
        problems.append("qkv_bias/qk_norm must be False")
    if c.rotary_dim != c.head_dim:
        problems.append(f"rotary_dim={c.rotary_dim} (Mixtral rotates the whole head, head_dim={c.head_dim})")
    if c.activation not in _HIDDEN_ACT:
        problems.append(f"activation={c.activation!r} (Mixtral experts are gated: swiglu or geglu)")
    if c.router != "topk" or c.score_func != "softmax":
        problems.append(f"router={c.router!r}, score_func={c.score_func!r} (Mixtral: 'topk', 'softmax')")
    # after_topk (softmax over the k chosen logits) equals renormalised softmax probabilities.
    if not c.renormalize and c.score_order == "before_topk" and c.top_k > 1:
        problems.append("renormalize=False (Mixtral renormalises the top-k weights)")
    if c.route_scale != 1.0:
        problems.append(f"route_scale={c.route_scale} (Mixtral: 1.0)")
    if c.num_shared_experts:
        problems.append(f"num_shared_experts={c.num_shared_experts} (Mixtral has none)")
    if c.moe_config().capacity_factor_for(training=False) is not None:
        problems.append("a capacity in evaluation drops tokens (set eval_capacity_factor=float('inf'))")
    if c.noise == "gaussian":
        problems.append("noise='gaussian' has learned noise weights Mixtral cannot hold")
    for i, layer in enumerate(getattr(model, "moe_layers", [])):
        if c.bias_balancing and bool(layer.router.expert_bias.ne(0).any()):
            problems.append(f"MoE layer {i} has a non-zero selection bias (bias_balancing), which Mixtral lacks")
            break
    return problems


def mixtral_config_json(c, dtype: torch.dtype) -> dict[str, Any]:
    jitter = c.noise_eps if c.noise == "jitter" else 0.0
    rope_extra = {}
    if c.rope_scaling is not None:  # YaRN: same keys in transformers' rope_parameters
        rope_extra = {k: v for k, v in c.rope_scaling.items() if k != "type"}
        rope_extra["rope_type"] = "yarn"
    return {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "vocab_size": c.vocab_size,
        "hidden_size": c.dim,
        "intermediate_size": c.moe_hidden_dim,
        "num_hidden_layers": c.n_layers,
        "num_attention_heads": c.n_heads,
        "num_key_value_heads": c.n_kv_heads,
        "head_dim": c.head_dim,
        "hidden_act": _HIDDEN_ACT[c.activation],
        "max_position_embeddings": c.max_seq_len,
        "rms_norm_eps": c.norm_eps,
        "rope_theta": c.rope_theta,  # read by transformers 4.x
        "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta, **rope_extra},  # transformers 5
        "rope_scaling": {"type": "yarn", **c.rope_scaling} if c.rope_scaling else None,  # transformers 4.x
        "sliding_window": None,
        "num_local_experts": c.num_experts,
        "num_experts_per_tok": c.top_k,
        "router_aux_loss_coef": c.aux_loss_coef,
        "router_jitter_noise": jitter,
        "output_router_logits": False,
        "tie_word_embeddings": c.tie_embeddings,
        "attention_dropout": 0.0,
        "initializer_range": c.init_std,
        "use_cache": True,
        "dtype": str(dtype).removeprefix("torch."),
        "torch_dtype": str(dtype).removeprefix("torch."),
        SAVED_KEY: c.to_dict(),  # training settings Mixtral has no key for; read back by sparsemoe.hf
    }


def _shards(
    items: list[tuple[str, torch.Tensor]], max_bytes: int, itemsize: int
) -> list[list[tuple[str, torch.Tensor]]]:
    shards: list[list[tuple[str, torch.Tensor]]] = [[]]
    size = 0
    for name, t in items:
        nbytes = t.numel() * itemsize
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, t))
        size += nbytes
    return shards


def export_hf_mixtral(
    model: nn.Module,
    out_dir: Union[str, Path],
    *,
    dtype: Optional[torch.dtype] = None,
    fused: bool = False,
    max_shard_bytes: int = 5 * 2**30,
) -> Path:
    """Write `model` (a sparsemoe MoETransformer) as a Hugging Face Mixtral folder; returns the folder.

    dtype: cast each tensor while writing (default: the model's own dtype).
    fused: write transformers 5's fused expert tensors instead of the per-expert layout.
    """
    problems = mixtral_incompatibilities(model)
    if problems:
        raise HFFormatError("this model cannot be exported as Mixtral: " + "; ".join(problems))
    c = model.config
    dtype = dtype or model.embed.weight.dtype
    layout = Layout(prefix="model.", mixtral_block="mlp" if fused else "block_sparse_moe", fused_experts=fused)
    state = model.state_dict()
    items = []
    for piece in model_pieces(MappedConfig("mixtral", c), layout):
        t = state[piece.dst]
        items.append((piece.src, (t[piece.index] if piece.index else t).detach()))  # views: no copy yet
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    itemsize = torch.empty((), dtype=dtype).element_size()
    shards = _shards(items, max_shard_bytes, itemsize)
    meta = {"format": "pt"}
    if len(shards) == 1:
        write_safetensors(out / "model.safetensors", shards[0], meta, dtype)
    else:
        weight_map, total = {}, 0
        for n, shard in enumerate(shards, 1):
            name = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
            write_safetensors(out / name, shard, meta, dtype)
            for key, t in shard:
                weight_map[key] = name
                total += t.numel() * itemsize
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / INDEX_FILE).write_text(json.dumps(index, indent=2), encoding="utf-8")
    (out / "config.json").write_text(json.dumps(mixtral_config_json(c, dtype), indent=2) + "\n", encoding="utf-8")
    return out
