"""Which Hugging Face tensor goes where in sparsemoe's state dict, per family and per key layout.

A `Piece` says: Hugging Face tensor `src` is the part `index` of sparsemoe tensor `dst`. Loading copies
each piece into place (so stacked experts are filled expert by expert, never materialised twice);
exporting reads the same pieces the other way round.

Expert layouts accepted when loading (transformers writes either, see `save_original_format`):
  * per expert   `...experts.{j}.w1/w3/w2.weight` (Mixtral, MiniMax-M2) or
                 `...experts.{j}.gate_proj/up_proj/down_proj.weight` (the others)
  * fused 3-D    `...experts.gate_up_proj` [E, 2F, D] (gate rows first) and `...experts.down_proj` [E, D, F]
  * stacked 3-D  Granite's `...block_sparse_moe.input_linear.weight` [E, 2F, D] and `output_linear.weight`
                 [E, D, F], router `router.layer.weight` (transformers 5 renames them to the fused names,
                 router `router.weight`)
Mixtral's (and MiniMax-M2's) MoE block is `block_sparse_moe` in original checkpoints and `mlp` in
transformers 5's fused layout; Granite's is `block_sparse_moe` in both, its shared MLP `shared_mlp`. The
selection bias `e_score_correction_bias` sits on the router (`mlp.gate.`), on the block for MiniMax-M2,
and on the block in EXAONE-MoE's own checkpoints (`mlp.`; transformers 5 moves it to the gate).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from sparsemoe.hf.config_map import GRANITE_FAMILIES, SELECTION_BIAS_FAMILIES, MappedConfig


@dataclass(frozen=True)
class Piece:
    src: str  # Hugging Face key
    dst: str  # sparsemoe state-dict key
    index: tuple = ()  # the part of dst that src fills; () = all of it
    transform: Optional[Callable[[Tensor], Tensor]] = None  # applied to src when loading
    to_hf: Optional[Callable[[Tensor], Tensor]] = None  # its inverse, applied to dst's part when exporting


def interleaved_to_half(rows: int) -> Tensor:
    """Row order that turns RoPE's interleaved pairs (2i, 2i+1) into rotate-half pairs (i, i + rows/2).

    Attention only uses q.k, so permuting the rotary rows of q and k alike changes nothing but the
    pairing, which is what lets one rotate-half RoPE serve DeepSeek's interleaved checkpoints.
    """
    return torch.cat([torch.arange(0, rows, 2), torch.arange(1, rows, 2)])


def _rope_pair_fix(heads: int, nope: int, rope: int) -> tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]:
    """(load transform, its inverse for export) of a projection whose rotary rows are paired interleaved."""
    return _permute_rope_rows(heads, nope, rope), _permute_rope_rows(heads, nope, rope, inverse=True)


def _permute_rope_rows(heads: int, nope: int, rope: int, inverse: bool = False) -> Callable[[Tensor], Tensor]:
    """Permute the rotary rows of each head's block [nope | rope] of a projection weight [heads*(nope+rope), in]:
    interleaved -> rotate-half pairs, or back with `inverse`."""
    order = interleaved_to_half(rope)
    if inverse:
        order = torch.argsort(order)

    def apply(w: Tensor) -> Tensor:
        per_head = w.view(heads, nope + rope, *w.shape[1:])
        return torch.cat([per_head[:, :nope], per_head[:, nope:][:, order]], dim=1).reshape(w.shape)

    return apply


# Families that spell their MoE block Mixtral's way: `block_sparse_moe` (or `mlp` when fused), experts w1/w3/w2.
_MIXTRAL_NAMES = ("mixtral", "minimax_m2")


@dataclass(frozen=True)
class Layout:
    """How one Hugging Face checkpoint spells its keys."""

    prefix: str = "model."  # "model." for *ForCausalLM checkpoints, "" for bare *Model ones
    mixtral_block: str = "block_sparse_moe"  # Mixtral's MoE module name: block_sparse_moe | mlp
    fused_experts: bool = False  # 3-D gate_up_proj/down_proj instead of per-expert tensors
    bias_on_block: bool = False  # EXAONE-MoE's and ERNIE 4.5's own checkpoints: the selection bias on the block


def layout_name(layout: Layout, family: str) -> str:
    """How the checkpoint stores its experts: "fused" (transformers 5), "stacked" (Granite's own 3-D
    tensors) or "per-expert"."""
    if layout.fused_experts:
        return "fused"
    return "stacked" if family in GRANITE_FAMILIES else "per-expert"


def detect_layout(keys: set[str], family: str) -> Layout:
    prefix = "model." if any(k.startswith("model.layers.") or k == "model.embed_tokens.weight" for k in keys) else ""
    fused = any(k.endswith(".experts.gate_up_proj") for k in keys)
    block = "mlp" if family in _MIXTRAL_NAMES and any(".mlp." in k for k in keys) else "block_sparse_moe"
    own = (".mlp.e_score_correction_bias", ".mlp.moe_statics.e_score_correction_bias")  # EXAONE-MoE's, ERNIE's
    bias_on_block = any(k.endswith(own) for k in keys)
    return Layout(prefix=prefix, mixtral_block=block, fused_experts=fused, bias_on_block=bias_on_block)


def _experts(src: str, dst: str, family: str, E: int, F: int, fused: bool) -> list[Piece]:
    if fused:
        return [Piece(f"{src}.gate_up_proj", f"{dst}.w_in"), Piece(f"{src}.down_proj", f"{dst}.w_out")]
    gate, up, down = ("w1", "w3", "w2") if family in _MIXTRAL_NAMES else ("gate_proj", "up_proj", "down_proj")
    pieces = []
    for j in range(E):
        pieces += [
            Piece(f"{src}.{j}.{gate}.weight", f"{dst}.w_in", (j, slice(0, F))),
            Piece(f"{src}.{j}.{up}.weight", f"{dst}.w_in", (j, slice(F, 2 * F))),
            Piece(f"{src}.{j}.{down}.weight", f"{dst}.w_out", (j,)),
        ]
    return pieces


def _mlp(src: str, dst: str, F: int, expert_index: tuple = ()) -> list[Piece]:
    """A gate/up/down MLP into sparsemoe's fused [gate; up] w_in and w_out (dense blocks, shared experts)."""
    return [
        Piece(f"{src}.gate_proj.weight", f"{dst}.w_in", expert_index + (slice(0, F),)),
        Piece(f"{src}.up_proj.weight", f"{dst}.w_in", expert_index + (slice(F, 2 * F),)),
        Piece(f"{src}.down_proj.weight", f"{dst}.w_out", expert_index),
    ]


def _attention(src: str, dst: str, mapped: MappedConfig) -> list[Piece]:
    c = mapped.model_config
    if getattr(c, "attention", "gqa") != "mla":
        pieces = [Piece(f"{src}.{n}_proj.weight", f"{dst}.{n}_proj.weight") for n in "qkvo"]
        if mapped.rope_interleaved:  # ERNIE 4.5: every head's rows become rotate-half pairs, as DeepSeek's
            for i, heads in ((0, c.n_heads), (1, c.n_kv_heads)):
                pieces[i] = Piece(pieces[i].src, pieces[i].dst, (), *_rope_pair_fix(heads, 0, c.head_dim))
        if c.qkv_bias:
            pieces += [Piece(f"{src}.{n}_proj.bias", f"{dst}.{n}_proj.bias") for n in "qkv"]
        if c.qk_norm:
            pieces += [Piece(f"{src}.{n}_norm.weight", f"{dst}.{n}_norm.weight") for n in "qk"]
        if c.attention_gate:
            pieces.append(Piece(f"{src}.gate_proj.weight", f"{dst}.gate_proj.weight"))
        return pieces
    rope = c.head_dim
    q_fix = kv_fix = q_back = kv_back = None
    if mapped.rope_interleaved:
        q_fix, q_back = _rope_pair_fix(c.n_heads, c.qk_nope_head_dim, rope)
        kv_fix, kv_back = _rope_pair_fix(1, c.kv_lora_rank, rope)  # the single shared rotary key follows the latent
    if c.q_lora_rank is None:
        pieces = [Piece(f"{src}.q_proj.weight", f"{dst}.q_proj.weight", (), q_fix, q_back)]
    else:
        pieces = [
            Piece(f"{src}.q_a_proj.weight", f"{dst}.q_a_proj.weight"),
            Piece(f"{src}.q_a_layernorm.weight", f"{dst}.q_a_norm.weight"),
            Piece(f"{src}.q_b_proj.weight", f"{dst}.q_b_proj.weight", (), q_fix, q_back),
        ]
    return pieces + [
        Piece(f"{src}.kv_a_proj_with_mqa.weight", f"{dst}.kv_a_proj.weight", (), kv_fix, kv_back),
        Piece(f"{src}.kv_a_layernorm.weight", f"{dst}.kv_a_norm.weight"),
        Piece(f"{src}.kv_b_proj.weight", f"{dst}.kv_b_proj.weight"),
        Piece(f"{src}.o_proj.weight", f"{dst}.o_proj.weight"),
    ]


def _granite_moe_block(src: str, dst: str, mapped: MappedConfig, layout: Layout) -> list[Piece]:
    """Granite: the routed experts in `block_sparse_moe`, the shared MLP ([gate; up] rows) beside it."""
    c = mapped.model_config
    layer = src.rsplit(".", 1)[0]
    block = f"{layer}.block_sparse_moe"
    if layout.fused_experts:  # transformers 5's names
        pieces = [Piece(f"{block}.router.weight", f"{dst}.router.weight")]
        pieces += _experts(f"{block}.experts", f"{dst}.experts", mapped.family, c.num_experts, c.moe_hidden_dim, True)
    else:  # Granite's own: the experts are stacked already
        pieces = [
            Piece(f"{block}.router.layer.weight", f"{dst}.router.weight"),
            Piece(f"{block}.input_linear.weight", f"{dst}.experts.w_in"),
            Piece(f"{block}.output_linear.weight", f"{dst}.experts.w_out"),
        ]
    if c.num_shared_experts:
        pieces += [
            Piece(f"{layer}.shared_mlp.input_linear.weight", f"{dst}.shared_experts.w_in", (0,)),
            Piece(f"{layer}.shared_mlp.output_linear.weight", f"{dst}.shared_experts.w_out", (0,)),
        ]
    return pieces


def _selection_bias(src: str, dst: str, family: str, layout: Layout) -> Piece:
    """A block's e_score_correction_bias: on its router (`gate.`), or on the block itself (MiniMax-M2,
    EXAONE-MoE's own layout); ERNIE 4.5 keeps it as [1, E] in a moe_statics module, read through a [None] view;
    AFMoE on the block as `expert_bias`."""
    if family == "ernie4_5_moe":
        owner = f"{src}.moe_statics" if layout.bias_on_block else f"{src}.gate.moe_statics"
        return Piece(f"{owner}.e_score_correction_bias", f"{dst}.router.expert_bias", (None,))
    if family == "afmoe":
        return Piece(f"{src}.expert_bias", f"{dst}.router.expert_bias")
    on_block = family == "minimax_m2" or (family == "exaone_moe" and layout.bias_on_block)
    return Piece(f"{src if on_block else src + '.gate'}.e_score_correction_bias", f"{dst}.router.expert_bias")


def _moe_block(src: str, dst: str, mapped: MappedConfig, layout: Layout) -> list[Piece]:
    c, family = mapped.model_config, mapped.family
    E, F = c.num_experts, c.moe_hidden_dim
    if family in GRANITE_FAMILIES:
        return _granite_moe_block(src, dst, mapped, layout)
    if family in _MIXTRAL_NAMES:
        src = src.rsplit(".", 1)[0] + "." + layout.mixtral_block
    router = f"{src}.router.gate" if family == "afmoe" else f"{src}.gate"  # AFMoE's router module wraps a Linear
    pieces = [Piece(f"{router}.weight", f"{dst}.router.weight")]
    pieces += _experts(f"{src}.experts", f"{dst}.experts", family, E, F, layout.fused_experts)
    if family in SELECTION_BIAS_FAMILIES:
        pieces.append(_selection_bias(src, dst, family, layout))
    if c.num_shared_experts:
        Fs = c.shared_hidden_dim or c.num_shared_experts * F
        name = "shared_expert" if family == "qwen2_moe" else "shared_experts"
        pieces += _mlp(f"{src}.{name}", f"{dst}.shared_experts", Fs, (0,))
        if c.shared_expert_gate:
            pieces.append(Piece(f"{src}.shared_expert_gate.weight", f"{dst}.shared_experts.gate_weight"))
    return pieces


# Each block's norms as (Hugging Face name, sparsemoe name), per ModelConfig.norm_placement: the attention's,
# then the MLP's. Pre-norm blocks norm the inputs, OLMo 2's the outputs, AFMoE's (sandwich) both.
_NORMS = {
    "pre": ([("input_layernorm", "attn_norm")], [("post_attention_layernorm", "ffn_norm")]),
    "post": ([("post_attention_layernorm", "attn_norm")], [("post_feedforward_layernorm", "ffn_norm")]),
    "sandwich": (
        [("input_layernorm", "attn_norm"), ("post_attention_layernorm", "attn_post_norm")],
        [("pre_mlp_layernorm", "ffn_norm"), ("post_mlp_layernorm", "ffn_post_norm")],
    ),
}


def model_pieces(mapped: MappedConfig, layout: Layout) -> list[Piece]:
    """Every piece of a sparsemoe model built from `mapped`, in state-dict order."""
    c = mapped.model_config
    p = layout.prefix
    pieces = [Piece(f"{p}embed_tokens.weight", "embed.weight")]
    for i in range(c.n_layers):
        src, dst = f"{p}layers.{i}", f"layers.{i}"
        attn_norms, mlp_norms = _NORMS[c.norm_placement]
        pieces += [Piece(f"{src}.{hf}.weight", f"{dst}.{ours}.weight") for hf, ours in attn_norms]
        pieces += _attention(f"{src}.self_attn", f"{dst}.attn", mapped)
        pieces += [Piece(f"{src}.{hf}.weight", f"{dst}.{ours}.weight") for hf, ours in mlp_norms]
        if c.is_moe_layer(i):
            pieces += _moe_block(f"{src}.mlp", f"{dst}.ffn", mapped, layout)
        else:
            pieces += _mlp(f"{src}.mlp", f"{dst}.ffn", c.dense_hidden_dim)
    pieces.append(Piece(f"{p}norm.weight", "norm.weight"))
    if not c.tie_embeddings:
        pieces.append(Piece("lm_head.weight", "lm_head.weight"))
    return pieces


def ignorable(key: str, n_layers: int, prefix: str) -> bool:
    """Checkpoint keys that carry nothing the model needs: cached RoPE tables, multi-token-prediction modules
    (DeepSeek's extra layers past n_layers, EXAONE-MoE's `mtp.`)."""
    if key.endswith("rotary_emb.inv_freq") or key.startswith("mtp."):
        return True
    head = f"{prefix}layers."
    if key.startswith(head):
        index = key[len(head) :].split(".", 1)[0]
        return index.isdigit() and int(index) >= n_layers
    return False
