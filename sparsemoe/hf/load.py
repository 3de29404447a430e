"""Load a Hugging Face MoE checkpoint folder into sparsemoe's `MoETransformer`, one tensor at a time.

Memory: the model is built on the meta device (no random initialisation, no memory), allocated once
in the target dtype, and each checkpoint tensor is read from its file straight into its place in the
model (or through one temporary tensor when it must be cast or permuted). Peak memory is the model
plus at most the largest single tensor; the checkpoint is never held in memory beside the model.

FP8 block-quantised checkpoints (sparsemoe.hf.fp8) load the same way: each float8 weight is dequantised,
with its `_scale_inv` companion, as it is copied into place, into the model's dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from sparsemoe.hf.config_map import SAVED_KEY, MappedConfig, map_config, read_hf_config
from sparsemoe.hf.fp8 import FP8_DTYPE, FP8Blocks, check_fp8_weight, fp8_blocks_of, read_fp8_into
from sparsemoe.hf.io import CheckpointFiles, HFFormatError
from sparsemoe.hf.weights import Piece, detect_layout, ignorable, layout_name, model_pieces
from sparsemoe.model import empty_model

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# State entries that a checkpoint may leave out, with how to fill them.
_DEFAULT_ZERO = (".router.expert_bias",)


@dataclass
class LoadedModel:
    model: nn.Module  # sparsemoe.model.MoETransformer, in eval mode
    mapped: MappedConfig  # family, ModelConfig, notes
    layout: str  # the checkpoint's expert tensors: "per-expert", "fused" (transformers 5) or "stacked" (Granite)


def resolve_dtype(
    dtype: Union[str, torch.dtype, None], files: Optional[CheckpointFiles] = None, key: str = "", fp8: bool = False
) -> torch.dtype:
    """A torch dtype from a name. None: float32, or bfloat16 for an FP8 checkpoint (`fp8`); "auto": the
    checkpoint's own float dtype (that of `key`), bfloat16 for an FP8 checkpoint, float32 if unknown.

    FP8 is a storage format, not one to compute in: its weights are dequantised into bfloat16 (the dtype
    such checkpoints keep their other tensors in, half a float32 model's memory) unless asked otherwise;
    float32 keeps every dequantised product exactly.
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    if fp8 and dtype in (None, "auto"):
        return torch.bfloat16
    if dtype is None:
        return torch.float32
    if dtype == "auto":
        if files is not None and key in files and files.dtype(key).is_floating_point:
            return files.dtype(key)
        return torch.float32
    if dtype not in _DTYPES:
        raise HFFormatError(f"dtype {dtype!r} is not supported; accepted: auto, {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def _copy_piece(files: CheckpointFiles, piece: Piece, target: torch.Tensor, fp8: Optional[FP8Blocks]) -> None:
    """Copy one checkpoint tensor into its place in `target`; the single place where FP8 weights are dequantised."""
    view = target[piece.index] if piece.index else target
    shape = files.shape(piece.src)
    if shape != tuple(view.shape):
        raise HFFormatError(
            f"weight {piece.src!r} has shape {shape} but the model described by config.json "
            f"needs {tuple(view.shape)} (for {piece.dst})"
        )
    quantised = fp8 is not None and files.dtype(piece.src) == FP8_DTYPE
    if piece.transform is None:
        if quantised:
            read_fp8_into(files, piece.src, view, fp8)  # dequantised straight into place
        else:
            files.read_into(piece.src, view)  # straight into the parameter's storage when dtypes agree
        return
    if quantised:
        weight = read_fp8_into(files, piece.src, torch.empty(shape, dtype=view.dtype), fp8)
    else:
        weight = files.get(piece.src)
    with torch.no_grad():
        view.copy_(piece.transform(weight))


def _fp8_plan(
    files: CheckpointFiles, pieces: list[Piece], declared: Optional[FP8Blocks]
) -> tuple[Optional[FP8Blocks], set[str]]:
    """(the FP8 quantisation to undo, or None for a float checkpoint; the scale keys it consumes).

    A weight is FP8 when it is stored as float8 E4M3, whatever modules_to_not_convert lists. Each one's scale
    is checked (present, float, the right shape) from the headers alone, before any memory is allocated.
    """
    quantised = [p.src for p in pieces if files.dtype(p.src) == FP8_DTYPE]
    if not quantised:
        return None, set()
    fp8 = declared or FP8Blocks(from_config=False)
    return fp8, {check_fp8_weight(files, key, fp8) for key in quantised}


def load_hf(
    path: Union[str, Path],
    *,
    dtype: Union[str, torch.dtype, None] = None,
    device: Union[str, torch.device] = "cpu",
    max_seq_len: Optional[int] = None,
    backend: Optional[str] = None,
    strict: bool = True,
) -> LoadedModel:
    """Load a Hugging Face MoE model folder (any family of `sparsemoe.hf.config_map.FAMILIES`).

    dtype: "float32", "bfloat16", "float16", "auto" (the checkpoint's dtype) or None (default): float32, or
        bfloat16 for an FP8 block-quantised checkpoint (whose weights are dequantised into it; "auto" too).
    max_seq_len: cap the model's context (and its RoPE table / KV cache) below max_position_embeddings.
    backend: the MoE dispatch backend (MoEConfig.backend), e.g. "grouped"; default "auto".
    strict: refuse checkpoint tensors that the config does not account for.
    """
    directory = Path(path)
    cfg = read_hf_config(directory)
    mapped = map_config(cfg, max_seq_len)
    declared = fp8_blocks_of(cfg)  # refuses other quantisation schemes
    if backend is not None:
        try:
            mapped.model_config = replace(mapped.model_config, moe_backend=backend)
        except ValueError as err:
            raise HFFormatError(str(err)) from None
    config = mapped.model_config
    files = CheckpointFiles(directory)
    layout = detect_layout(files.keys(), mapped.family)
    pieces = model_pieces(mapped, layout)
    missing = [p.src for p in pieces if p.src not in files]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise HFFormatError(
            f"checkpoint in {str(directory)!r} lacks weight(s) {missing[:3]}{more} that its config.json "
            f"({mapped.family}) requires"
        )
    fp8, scales = _fp8_plan(files, pieces, declared)
    used = {p.src for p in pieces} | scales
    skipped = sorted(k for k in files.keys() - used if ignorable(k, config.n_layers, layout.prefix))
    if any(".layers." in k or k.startswith("layers.") for k in skipped):
        mapped.notes.append(
            f"tensors of layers beyond num_hidden_layers={config.n_layers} (DeepSeek's multi-token-prediction "
            "module) are not loaded; transformers skips them too"
        )
    if any(k.startswith("mtp.") for k in skipped):
        mapped.notes.append("the multi-token-prediction module (mtp.*) is not loaded; transformers skips it too")
    # Empty tensors carry nothing: transformers writes a zero-width shared MLP for GLM-4.5 without shared experts.
    unexpected = sorted(k for k in files.keys() - used - set(skipped) if math.prod(files.shape(k)) > 0)
    if config.tie_embeddings and "lm_head.weight" in unexpected:
        unexpected.remove("lm_head.weight")  # some tied checkpoints store the shared matrix twice
    if unexpected and strict:
        more = f" and {len(unexpected) - 3} more" if len(unexpected) > 3 else ""
        raise HFFormatError(
            f"checkpoint in {str(directory)!r} has weight(s) {unexpected[:3]}{more} that its config.json "
            f"({mapped.family}) does not account for; the config and weights do not match"
        )

    target = resolve_dtype(dtype, files, pieces[0].src, fp8=fp8 is not None)
    if fp8 is not None:
        bo, bi = fp8.block
        source = "" if fp8.from_config else ", the default: config.json has no quantization_config"
        mapped.notes.append(
            f"FP8 block-quantised checkpoint: {len(scales)} float8 weights dequantised (blocks of {bo}x{bi}"
            f"{source}) into {str(target).removeprefix('torch.')}"
        )
    model = empty_model(config, target, device)
    state = model.state_dict(keep_vars=True)
    filled = set()
    for piece in pieces:
        _copy_piece(files, piece, state[piece.dst], fp8)
        filled.add(piece.dst)
    for name in set(state) - filled:
        if not name.endswith(_DEFAULT_ZERO):
            raise HFFormatError(f"internal: no checkpoint tensor maps to model state {name!r}")
        with torch.no_grad():
            state[name].zero_()
    files.close()
    _check_selection_bias(model, directory)
    model.eval()
    return LoadedModel(model, mapped, layout_name(layout, mapped.family))


def has_selection_bias(model: nn.Module) -> bool:
    """Whether any MoE layer of `model` holds a non-zero selection bias (`router.expert_bias`)."""
    from sparsemoe.layer import moe_layers

    return any(bool(layer.router.expert_bias.ne(0).any()) for layer in moe_layers(model))


def _check_selection_bias(model: nn.Module, directory: Path) -> None:
    """A selection bias in the checkpoint that the model's settings would ignore is refused, not dropped."""
    if not model.config.bias_balancing and has_selection_bias(model):
        raise HFFormatError(
            f"checkpoint in {str(directory)!r} has a non-zero e_score_correction_bias, but the sparsemoe settings "
            f"saved in its config.json ({SAVED_KEY}) turn bias balancing off; remove that key to load the "
            "checkpoint's own routing"
        )


def load_hf_model(path: Union[str, Path], **kwargs) -> nn.Module:
    """`load_hf(...).model`: the sparsemoe MoETransformer of a Hugging Face folder (see `load_hf`)."""
    return load_hf(path, **kwargs).model
