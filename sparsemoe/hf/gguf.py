"""A sparsemoe model as a GGUF file that llama.cpp runs (its "llama" architecture, Mixtral's experts).

    export_gguf(model, "model.gguf", weights="bf16")      # `sparsemoe convert RUN model.gguf --to gguf`

Every model that the Mixtral export takes (`sparsemoe.hf.export.mixtral_incompatibilities`: full causal
attention with RoPE, SwiGLU experts, softmax top-k routing renormalised over the chosen experts, no shared
experts), without a sliding window, RoPE scaling or partial rotary dims, is written, tensor by tensor, with the `gguf` package that llama.cpp's own converter uses. The
names and layouts are llama.cpp's: `token_embd`, per block `attn_norm`, `attn_q/k/v/output`, `ffn_norm`,
`ffn_gate_inp` (the router [E, D]), `ffn_gate_exps`/`ffn_up_exps` [E, F, D] and `ffn_down_exps` [E, D, F]
(the two halves of our w_in [E, 2F, D], and w_out), then `output_norm` and `output`. The q and k rows of
each head are reordered from rotate-half RoPE (ours, and Hugging Face's) to the adjacent pairs llama.cpp
rotates, as llama.cpp's converter does for Llama and Mixtral checkpoints.

weights: "f32", "bf16", or "q8_0" / "q4_0": the experts in llama.cpp's 8-bit or 4-bit blocks of 32 (one
float16 scale per block), every other tensor in bfloat16, norms and the router in float32 (the split of
`sparsemoe quantize`'s int8/int4 schemes, whose experts are the quantized part).

The vocabulary is written as token names only (llama.cpp needs one): ids 0-255 are the bytes, as our
byte-level tokenizer numbers them (the space named U+2581, as llama.cpp's tokenizer writes spaces, so that
it reads a byte-level model's text prompts as exactly our bytes), the rest placeholders: a model with a
BPE vocabulary is given token ids, not text.
"""

from __future__ import annotations

from pathlib import Path
from typing import Union

import numpy as np
import torch
from torch import nn

from sparsemoe.hf.export import mixtral_incompatibilities
from sparsemoe.hf.io import HFFormatError
from sparsemoe.quant import quantization_of

WEIGHT_TYPES = ("f32", "bf16", "q8_0", "q4_0")
_BLOCK = 32  # values per block of llama.cpp's Q8_0 and Q4_0


def _gguf():
    try:
        import gguf
    except ImportError:
        raise ImportError("writing GGUF needs the gguf package: pip install 'sparsemoe[gguf]'") from None
    return gguf


def rope_pairs_adjacent(w_OD: torch.Tensor, heads: int) -> torch.Tensor:
    """q or k projection rows [heads * Hd, D] from rotate-half order (dims i and i + Hd/2 rotate together)
    to adjacent pairs (dims 2i and 2i + 1): within each head, row i goes to 2i and row i + Hd/2 to 2i + 1."""
    rows = w_OD.shape[0]
    return w_OD.reshape(heads, 2, rows // heads // 2, *w_OD.shape[1:]).transpose(1, 2).reshape(w_OD.shape)


def _check(model: nn.Module, weights: str) -> None:
    if weights not in WEIGHT_TYPES:
        raise ValueError(f"weights={weights!r}: expected one of {', '.join(WEIGHT_TYPES)}")
    if quantization_of(model) is not None:
        raise HFFormatError("the model's experts are quantized: write GGUF from the float model (q8_0 and q4_0 "
                            "quantize the experts in llama.cpp's own blocks)")  # fmt: skip
    c = model.config
    problems = mixtral_incompatibilities(model)
    # What Mixtral's config holds but this writer does not carry into llama.cpp's keys.
    if c.sliding_window is not None:
        problems.append(f"sliding_window={c.sliding_window} (not written to GGUF)")
    if c.rope_scaling is not None:
        problems.append(f"rope_scaling={c.rope_scaling} (not written to GGUF)")
    if c.rotary_dim != c.head_dim:
        problems.append(f"rotary_dim={c.rotary_dim} < head_dim={c.head_dim} (not written to GGUF)")
    if problems:
        raise HFFormatError("llama.cpp's Mixtral layout cannot express this model: " + "; ".join(problems))
    if weights.startswith("q") and (c.dim % _BLOCK or c.moe_hidden_dim % _BLOCK):
        raise ValueError(f"weights={weights}: the experts' rows (D={c.dim}, F={c.moe_hidden_dim}) must be multiples "
                         f"of {_BLOCK}, llama.cpp's block")  # fmt: skip


def _vocabulary(writer, vocab_size: int) -> None:
    gguf = _gguf()
    names, types = [], []
    for i in range(vocab_size):
        if i == 0x20:  # llama.cpp's tokenizer turns spaces into U+2581 first: the byte's token has that name
            names.append("\u2581")
            types.append(gguf.TokenType.NORMAL)
        elif i < 256:
            names.append(f"<0x{i:02X}>")
            types.append(gguf.TokenType.BYTE)
        else:
            names.append(f"<t{i}>")
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(names)
    writer.add_token_scores([0.0] * vocab_size)
    writer.add_token_types(types)
    writer.add_bos_token_id(min(1, vocab_size - 1))
    writer.add_eos_token_id(min(2, vocab_size - 1))
    writer.add_add_bos_token(False)
    writer.add_add_space_prefix(False)  # a byte-level model's text is its bytes, nothing prepended


def _array(t: torch.Tensor, kind: str, gguf):
    """(numpy data, raw GGML type or None) of one tensor stored as `kind`: f32, bf16, q8_0 or q4_0."""
    t = t.detach().to("cpu")
    if kind == "f32":
        return t.float().contiguous().numpy(), None
    if kind == "bf16":
        return t.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint16), gguf.GGMLQuantizationType.BF16
    qtype = gguf.GGMLQuantizationType.Q8_0 if kind == "q8_0" else gguf.GGMLQuantizationType.Q4_0
    return gguf.quants.quantize(t.float().contiguous().numpy(), qtype), qtype


def gguf_tensors(model: nn.Module, weights: str) -> list[tuple[str, torch.Tensor, str]]:
    """(llama.cpp name, tensor in llama.cpp's layout, storage kind) for every tensor of the file."""
    c = model.config
    rest = "f32" if weights == "f32" else "bf16"
    experts = weights if weights.startswith("q") else rest
    F = c.moe_hidden_dim
    out = [("token_embd.weight", model.embed.weight, rest)]
    for i, block in enumerate(model.layers):
        attn, moe = block.attn, block.ffn
        w_in = moe.experts.w_in
        out += [
            (f"blk.{i}.attn_norm.weight", block.attn_norm.weight, "f32"),
            (f"blk.{i}.attn_q.weight", rope_pairs_adjacent(attn.q_proj.weight, c.n_heads), rest),
            (f"blk.{i}.attn_k.weight", rope_pairs_adjacent(attn.k_proj.weight, c.n_kv_heads), rest),
            (f"blk.{i}.attn_v.weight", attn.v_proj.weight, rest),
            (f"blk.{i}.attn_output.weight", attn.o_proj.weight, rest),
            (f"blk.{i}.ffn_norm.weight", block.ffn_norm.weight, "f32"),
            (f"blk.{i}.ffn_gate_inp.weight", moe.router.weight, "f32"),
            (f"blk.{i}.ffn_gate_exps.weight", w_in[:, :F], experts),
            (f"blk.{i}.ffn_up_exps.weight", w_in[:, F:], experts),
            (f"blk.{i}.ffn_down_exps.weight", moe.experts.w_out, experts),
        ]
    out.append(("output_norm.weight", model.norm.weight, "f32"))
    out.append(("output.weight", model.embed.weight if model.lm_head is None else model.lm_head.weight, rest))
    return out


def export_gguf(model: nn.Module, path: Union[str, Path], weights: str = "bf16") -> Path:
    """Write `model` (a float sparsemoe MoETransformer) to the GGUF file `path` (see the module docstring);
    returns the path. The file is written next to `path` and renamed into place once complete."""
    _check(model, weights)
    gguf = _gguf()
    c = model.config
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    writer = gguf.GGUFWriter(str(partial), "llama")
    try:
        writer.add_name("sparsemoe")
        writer.add_context_length(c.max_seq_len)
        writer.add_embedding_length(c.dim)
        writer.add_block_count(c.n_layers)
        writer.add_feed_forward_length(c.moe_hidden_dim)
        writer.add_head_count(c.n_heads)
        writer.add_head_count_kv(c.n_kv_heads)
        writer.add_key_length(c.head_dim)
        writer.add_value_length(c.head_dim)
        writer.add_rope_dimension_count(c.head_dim)
        writer.add_rope_freq_base(float(c.rope_theta))
        writer.add_layer_norm_rms_eps(float(c.norm_eps))
        writer.add_expert_count(c.num_experts)
        writer.add_expert_used_count(c.top_k)
        writer.add_vocab_size(c.vocab_size)
        writer.add_file_type(_FILE_TYPES[weights])
        _vocabulary(writer, c.vocab_size)
        with torch.no_grad():
            for name, tensor, kind in gguf_tensors(model, weights):
                data, raw = _array(tensor, kind, gguf)
                writer.add_tensor(name, data, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    partial.replace(path)
    return path


# llama.cpp's general.file_type codes (LLAMA_FTYPE_*): the type of most of the file's weights.
_FILE_TYPES = {"f32": 0, "bf16": 32, "q8_0": 7, "q4_0": 2}


def decode_bytes_of_gguf(path: Union[str, Path], top_k: int, num_experts: int) -> int:
    """Bytes of the file's tensors one decode token reads: the embedding table's one row (when an output
    matrix of its own follows), top_k / num_experts of each expert tensor, every other tensor whole."""
    reader = _gguf().GGUFReader(str(path))
    names = {t.name for t in reader.tensors}
    total = 0
    for t in reader.tensors:
        nbytes = int(t.n_bytes)
        if t.name == "token_embd.weight" and "output.weight" in names:
            nbytes //= int(t.shape[-1])  # ggml's shape is [D, V]: one of V rows
        elif "_exps." in t.name:
            nbytes = nbytes * top_k // num_experts
        total += nbytes
    return total
