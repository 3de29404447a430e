"""FP8 block-quantised checkpoints (DeepSeek-V3, Qwen3 "-FP8" releases): read them as float weights.

Such a checkpoint stores each quantised linear weight `W` [out, in] as float8 E4M3 (`torch.float8_e4m3fn`,
safetensors "F8_E4M3") beside a companion `<W's key>_scale_inv` of shape [ceil(out/bo), ceil(in/bi)]
(float32, sometimes bfloat16), one scale per block of bo x bi weights; the block size is config.json's
`quantization_config.weight_block_size` (default [128, 128]). The real weight is

    w[i, j] = float(fp8[i, j]) * scale_inv[i // bo, j // bi]

(the name notwithstanding, the scale multiplies). Tensors that are not quantised (embeddings, norms,
routers, lm_head) are stored as ordinary floats. 3-D expert tensors ([E, out, in], fused or stacked) carry
one scale grid per expert, [E, ceil(out/bo), ceil(in/bi)].
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from sparsemoe.hf.io import CheckpointFiles, HFFormatError

FP8_DTYPE = torch.float8_e4m3fn
SCALE_SUFFIX = "_scale_inv"  # the companion of weight key K is K + SCALE_SUFFIX
SCALE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DEFAULT_BLOCK = (128, 128)
# Elements dequantised per step: bounds the float32 temporaries (two of this size) whatever the tensor's size.
_CHUNK = 1 << 22


@dataclass(frozen=True)
class FP8Blocks:
    """How a checkpoint's FP8 weights are quantised (config.json's quantization_config)."""

    block: tuple[int, int] = DEFAULT_BLOCK  # (rows, columns) of weights sharing one scale; each >= 1
    from_config: bool = True  # False: config.json has no quantization_config, the block size is the default


def check_block(block: Any, where: str = "weight_block_size") -> tuple[int, int]:
    """`block` as (bo, bi), or an HFFormatError unless it is two positive ints."""
    ok = (
        isinstance(block, (list, tuple))
        and len(block) == 2
        and all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)
    )
    if not ok:
        raise HFFormatError(f"{where} {block!r} is not a block size; expected two positive integers, e.g. [128, 128]")
    return int(block[0]), int(block[1])


def fp8_blocks_of(cfg: dict[str, Any]) -> Optional[FP8Blocks]:
    """The FP8 block quantisation a config.json declares; None without a quantization_config.

    Other schemes (gptq, awq, bitsandbytes, compressed-tensors, ...) are refused: their tensors are not
    FP8 blocks, and loading them as floats would give a model that computes something else.
    """
    qc = cfg.get("quantization_config")
    if qc is None:
        return None
    if not isinstance(qc, dict):
        raise HFFormatError(f"config.json quantization_config is {qc!r}, not an object")
    method = qc.get("quant_method")
    if method != "fp8":
        raise HFFormatError(
            f"config.json quantization_config.quant_method {method!r} is not supported; only FP8 block-quantised "
            "checkpoints (quant_method 'fp8') are read, other quantised checkpoints need their float weights"
        )
    # (scale_fmt "ue8m0" only rounds the scales to powers of two; the stored scale's dtype is checked per tensor.)
    checks = (("fmt", "e4m3"), ("activation_scheme", "dynamic"), ("expert_dtype", "fp8"))
    for key, accepted in checks:
        value = qc.get(key, accepted)
        if str(value).lower() != accepted:
            raise HFFormatError(
                f"config.json quantization_config.{key} {value!r} is not supported; accepted: {accepted!r}"
            )
    block = qc.get("weight_block_size", list(DEFAULT_BLOCK))
    return FP8Blocks(check_block(block, "config.json quantization_config.weight_block_size"))


def scale_shape(shape: Sequence[int], block: tuple[int, int]) -> tuple[int, ...]:
    """The scale grid of a weight of `shape` [..., out, in]: [..., ceil(out/bo), ceil(in/bi)]."""
    *lead, rows, cols = shape
    return (*lead, -(-rows // block[0]), -(-cols // block[1]))


def _check_scale(name: str, weight_shape: Sequence[int], shape: Sequence[int], dtype: torch.dtype,
                 block: tuple[int, int], hint: str = "") -> None:  # fmt: skip
    if dtype not in SCALE_DTYPES:
        raise HFFormatError(f"scale {name!r} is stored as {dtype}; accepted: float32, bfloat16 or float16")
    expected = scale_shape(weight_shape, block)
    if tuple(shape) != expected:
        raise HFFormatError(
            f"scale {name!r} has shape {tuple(shape)}, but a weight of shape {tuple(weight_shape)} in blocks of "
            f"{block[0]}x{block[1]} needs {expected}{hint}"
        )


def dequantize_fp8_blocks(
    w_fp8: Tensor,
    scale_inv: Tensor,
    block: Sequence[int] = DEFAULT_BLOCK,
    dtype: torch.dtype = torch.bfloat16,
    out: Optional[Tensor] = None,
) -> Tensor:
    """w[..., i, j] = float(w_fp8[..., i, j]) * scale_inv[..., i // bo, j // bi], in float32, cast once to `dtype`.

    w_fp8: [..., O, I] float8_e4m3fn. scale_inv: [..., ceil(O/bo), ceil(I/bi)], float32, bfloat16 or float16.
    block: (bo, bi). out: a tensor of w_fp8's shape to write into (its dtype is then the target), e.g. one
    expert's slice of a stacked parameter; a new tensor of `dtype` otherwise. The work goes a few rows of
    blocks at a time, so the float32 temporaries stay a few MiB whatever the tensor's size.
    """
    bo, bi = check_block(block, "block")
    if w_fp8.dtype != FP8_DTYPE or w_fp8.dim() < 2:
        shape = tuple(w_fp8.shape)
        raise HFFormatError(f"expected float8_e4m3fn weights [..., out, in], got {w_fp8.dtype} of shape {shape}")
    _check_scale("scale_inv", w_fp8.shape, scale_inv.shape, scale_inv.dtype, (bo, bi))
    if out is None:
        out = torch.empty(w_fp8.shape, dtype=dtype, device=w_fp8.device)
    elif out.shape != w_fp8.shape or not out.is_floating_point():
        raise HFFormatError(f"dequantize_fp8_blocks: out must be a float tensor of shape {tuple(w_fp8.shape)}")
    rows, cols = w_fp8.shape[-2:]
    step = max(1, _CHUNK // max(1, cols * bo)) * bo  # whole row blocks per step
    with torch.no_grad():
        for lead in itertools.product(*map(range, w_fp8.shape[:-2])):  # () once for a 2-D weight
            w, s, o = w_fp8[lead], scale_inv[lead], out[lead]
            for r0 in range(0, rows, step):
                r1 = min(rows, r0 + step)
                x = w[r0:r1].to(torch.float32)
                s_rows = s[r0 // bo : -(-r1 // bo)].to(torch.float32).repeat_interleave(bo, dim=0)[: r1 - r0]
                o[r0:r1].copy_(x.mul_(s_rows.repeat_interleave(bi, dim=1)[:, :cols]))  # the one cast
    return out


def check_fp8_weight(files: CheckpointFiles, key: str, fp8: FP8Blocks) -> str:
    """The key of FP8 weight `key`'s scale, with its presence, dtype and shape checked (headers only)."""
    name = key + SCALE_SUFFIX
    if name not in files:
        raise HFFormatError(
            f"weight {key!r} is stored as float8 (F8_E4M3) but its scale {name!r} is missing from the checkpoint "
            f"in {str(files.directory)!r}; it cannot be dequantised without it"
        )
    if fp8.from_config:
        hint = " (check config.json's quantization_config.weight_block_size)"
    else:
        hint = " (config.json has no quantization_config, so the default block size; add its weight_block_size)"
    _check_scale(name, files.shape(key), files.shape(name), files.dtype(name), fp8.block, hint)
    return name


def read_fp8_into(files: CheckpointFiles, key: str, out: Tensor, fp8: FP8Blocks) -> Tensor:
    """Read FP8 weight `key` and its scale, and write the dequantised weight into `out` (any float dtype)."""
    scale = files.get(check_fp8_weight(files, key, fp8))
    return dequantize_fp8_blocks(files.get(key), scale, fp8.block, out=out)
