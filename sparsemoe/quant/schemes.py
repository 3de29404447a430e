"""Weight-only quantization schemes: how a stacked weight [E, O, K] is stored, and the exact way back.

Legend: E experts (or 1 for a plain matrix), O output rows, K input columns (the reduction width), G the
group size (input columns per scale), Kp = K rounded up to a multiple of G.

Both schemes are symmetric (no zero points: expert weights are centred on zero, and a zero point would cost
one more operation per weight in the kernels) and round to nearest:

    int8   per output channel: q [E, O, K] int8 in [-127, 127], scale [E, O] float32 = max|w[e, o, :]| / 127;
           w ~ q * scale[e, o]. 1 byte per weight.
    int4   group-wise: scale [E, O, Kp / G] bfloat16, chosen per group as the one of least squared error
           among max|w| / d for d in INT4_SEARCH (from 7, where no weight is clipped, to 10);
           q = clamp(round(w / scale), -8, 7), stored as u = q + 8 in [0, 15], two per byte:
           packed [E, O, Kp / 2] uint8, where each block of 32 columns [32c, 32c + 32) is 16 bytes and
           byte 16c + j holds column 32c + j in its low four bits and column 32c + 16 + j in its high four
           (so 16 consecutive low or high nibbles are 16 consecutive columns: one vector each in the kernel).
           Columns past K are zero. G is a multiple of 32. 0.5 + 2/G bytes per weight.
A weight row (or group) of zeros gets scale 1 for int8 (q all zero) and the smallest normal bfloat16 for
int4, so dequantization gives zeros back and no scale is zero.

`dequantize` is the definition: the native kernels compute exactly these products (u - 8) * scale for
int4, and sum q * x before multiplying by the channel's scale for int8 (the same value up to rounding).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from sparsemoe.ops import cpu_kernels

SCHEMES = ("int8", "int4")
DEFAULT_GROUP_SIZE = {"int8": 0, "int4": 64}  # int8 has one scale per output channel (group = all of K)
NIBBLE_BLOCK = 32  # int4 columns per packed block (16 bytes)
INT4_OFFSET = 8
# int4 scales tried per group (amax / d for each d): round to nearest on the grid of least squared error.
# d = 7 keeps every weight in range; larger d trade a clipped extreme for finer steps everywhere else.
INT4_SEARCH = (7.0, 7.25, 7.5, 7.75, 8.0, 8.5, 9.0, 9.5, 10.0)


class QuantizationError(ValueError):
    """A quantization setting or stored quantized tensor that is not valid (one clear message)."""


@dataclass(frozen=True)
class QuantScheme:
    """A scheme and its group size (0 for int8: per output channel)."""

    name: str  # "int8" or "int4"
    group_size: int = 0  # int4: input columns per scale, a positive multiple of 32; int8: 0

    def __post_init__(self) -> None:
        if self.name not in SCHEMES:
            raise QuantizationError(f"unknown quantization scheme {self.name!r}; choose one of {', '.join(SCHEMES)}")
        if self.name == "int8" and self.group_size not in (0, None):
            raise QuantizationError("int8 has one scale per output channel: no group size (leave it unset)")
        if self.name == "int4" and (
            not isinstance(self.group_size, int) or self.group_size <= 0 or self.group_size % NIBBLE_BLOCK
        ):
            raise QuantizationError(
                f"int4 group size must be a positive multiple of {NIBBLE_BLOCK} (32, 64, 128, ...), got {self.group_size!r}"
            )

    @classmethod
    def make(cls, name: str, group_size: Optional[int] = None) -> "QuantScheme":
        """The scheme `name` with `group_size`, or its default group size when None."""
        if name not in SCHEMES:
            raise QuantizationError(f"unknown quantization scheme {name!r}; choose one of {', '.join(SCHEMES)}")
        return cls(name, DEFAULT_GROUP_SIZE[name] if group_size is None else group_size)

    def padded(self, K: int) -> int:
        """Kp: the stored input width (K rounded up to a whole number of groups for int4)."""
        return cpu_kernels.padded_width(self.name, K, self.group_size)

    def stored(self, E: int, O: int, K: int) -> tuple[torch.Size, torch.Size, torch.dtype, torch.dtype]:
        """(data shape, scale shape, data dtype, scale dtype) of a weight [E, O, K] under this scheme."""
        return cpu_kernels.stored_layout(self.name, E, O, K, self.group_size)

    def as_dict(self) -> dict:
        return {"scheme": self.name, "group_size": self.group_size}


def quantize_weight(w_EOK: Tensor, scheme: QuantScheme) -> tuple[Tensor, Tensor]:
    """(data, scale) of a float weight [E, O, K] (computed in float32) under `scheme` (module docstring)."""
    if w_EOK.dim() != 3 or not w_EOK.is_floating_point():
        raise QuantizationError(f"quantize_weight expects a float weight [E, O, K], got {w_EOK.dtype} {tuple(w_EOK.shape)}")
    if not torch.isfinite(w_EOK).all():
        raise QuantizationError("the weight to quantize holds NaN or inf values")
    w = w_EOK.detach().float()
    E, O, K = w.shape
    if scheme.name == "int8":
        amax = w.abs().amax(dim=2)
        scale = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
        q = torch.round(w / scale[..., None]).clamp_(-127, 127).to(torch.int8)
        return q.contiguous(), scale.contiguous()
    G, Kp = scheme.group_size, scheme.padded(K)
    w = torch.nn.functional.pad(w, (0, Kp - K)).view(E, O, Kp // G, G)
    amax = w.abs().amax(dim=3)
    best_q, best_scale, best_err = None, None, None
    for divisor in INT4_SEARCH:  # the scale of least squared error per group, among amax / divisor
        scale = (amax / divisor).clamp_min(torch.finfo(torch.bfloat16).tiny).to(torch.bfloat16)
        q = torch.round(w / scale.float()[..., None]).clamp_(-8, 7)
        err = (q * scale.float()[..., None] - w).square_().sum(dim=3)
        if best_err is None:
            best_q, best_scale, best_err = q, scale, err
        else:
            better = err < best_err
            best_q = torch.where(better[..., None], q, best_q)
            best_scale = torch.where(better, scale, best_scale)
            best_err = torch.minimum(err, best_err)
    u = (best_q + INT4_OFFSET).to(torch.uint8).view(E, O, Kp)
    return pack_int4(u), best_scale.contiguous()


def pack_int4(u_EOK: Tensor) -> Tensor:
    """Values u [..., Kp] in [0, 15] (Kp a multiple of 32) -> packed [..., Kp / 2] uint8 (module docstring)."""
    *lead, Kp = u_EOK.shape
    blocks = u_EOK.to(torch.uint8).reshape(*lead, Kp // NIBBLE_BLOCK, 2, NIBBLE_BLOCK // 2)
    return (blocks[..., 0, :] | (blocks[..., 1, :] << 4)).reshape(*lead, Kp // 2).contiguous()


def unpack_int4(packed: Tensor) -> Tensor:
    """The inverse of `pack_int4`: packed [..., Kp / 2] uint8 -> u [..., Kp] uint8 in [0, 15]."""
    *lead, half = packed.shape
    blocks = packed.reshape(*lead, half // (NIBBLE_BLOCK // 2), 1, NIBBLE_BLOCK // 2)
    return torch.cat((blocks & 15, blocks >> 4), dim=-2).reshape(*lead, 2 * half)


def dequantize_weight(data: Tensor, scale: Tensor, scheme: QuantScheme, K: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """The float weight [E, O, K] that (data, scale) stand for, computed in float32 and cast once to `dtype`."""
    if scheme.name == "int8":
        w = data.float() * scale.float()[..., None]
    else:
        E, O, _ = data.shape
        G = scheme.group_size
        q = unpack_int4(data).float() - INT4_OFFSET  # [E, O, Kp]
        w = (q.view(E, O, -1, G) * scale.float()[..., None]).view(E, O, -1)[..., :K]
    return w.to(dtype)


def check_stored(data: Tensor, scale: Tensor, scheme: QuantScheme, shape_EOK: tuple[int, int, int], name: str) -> None:
    """One clear QuantizationError when stored (data, scale) do not fit a weight of `shape_EOK` under `scheme`."""
    data_shape, scale_shape, data_dtype, scale_dtype = scheme.stored(*shape_EOK)
    for what, tensor, shape, dtype in (("data", data, data_shape, data_dtype), ("scale", scale, scale_shape, scale_dtype)):
        if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
            raise QuantizationError(
                f"{name}: stored {what} is {tensor.dtype} {tuple(tensor.shape)}, but a {scheme.name} weight of shape "
                f"{shape_EOK} (group size {scheme.group_size}) needs {dtype} {tuple(shape)}"
            )
    if not torch.isfinite(scale.float()).all() or bool((scale.float() <= 0).any()):
        raise QuantizationError(f"{name}: stored scales must be finite and positive")
