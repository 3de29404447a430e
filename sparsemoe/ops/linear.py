"""`linear(x, weight, bias)`: F.linear, with a few rows on the CPU streamed through the native kernel.

A decode step multiplies one row (per sequence) by every projection of the model: attention's, the LM
head's [vocabulary x D]. BLAS runs such products below the speed at which the weight can be read
(measured on 2 threads, torch 2.13: the 32000 x 1024 LM head at one row, bfloat16, 3.2 ms against 1.7 ms
for the native kernel; 1024 x 1024 in float32, 0.074 ms against 0.036 ms). The native grouped linear
kernel (`cpu_kernels.grouped_linear`, one group) streams each weight row once, widening bfloat16 weights
in registers and summing in float32; its result is rounded once to x's dtype.

Taken for inference only (no autograd graph to build), up to `MAX_ROWS` rows, weights of at least
`MIN_WEIGHTS` elements (below that the call's fixed cost outweighs the gain), float32 or bfloat16 CPU
tensors of one dtype, a contiguous weight, the native kernels built, and outside torch.compile (which
traces F.linear); everything else is F.linear.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparsemoe.ops import cpu_kernels

# Up to this many rows the native kernel beats BLAS on projections of 1024 x 1024 to 32000 x 1024 (measured
# as above at 1, 4, 16 and 17 rows; in bfloat16 BLAS's GEMMs are faster from about 16 rows, the CPU
# having bfloat16 dot products that the kernel, summing in float32, does not use).
MAX_ROWS = {torch.float32: 16, torch.bfloat16: 4}
MIN_WEIGHTS = 1 << 19
_ONE_GROUP: dict[int, Tensor] = {}  # offsets of a single group of n rows, by n


def _native_applies(x: Tensor, weight: Tensor) -> bool:
    return (
        x.device.type == "cpu"
        and x.dtype == weight.dtype
        and x.numel() <= MAX_ROWS.get(x.dtype, 0) * x.shape[-1]
        and weight.numel() >= MIN_WEIGHTS
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        and weight.is_contiguous()
        and weight.device.type == "cpu"
        and not torch.compiler.is_compiling()
        and cpu_kernels.available()
    )


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """x [..., K] @ weight [O, K]^T (+ bias [O]) -> [..., O] in x's dtype, as F.linear computes it."""
    if not _native_applies(x, weight):
        return F.linear(x, weight, bias)
    rows = x.reshape(-1, x.shape[-1])
    n = rows.shape[0]
    offsets = _ONE_GROUP.get(n)
    if offsets is None:
        offsets = _ONE_GROUP.setdefault(n, torch.tensor([n], dtype=torch.int64))
    y = cpu_kernels.grouped_linear(rows, offsets, weight.unsqueeze(0))
    if bias is not None:
        y += bias
    return y.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])


class Linear(nn.Linear):
    """nn.Linear whose forward is `linear`: the same parameters and state dict, faster at decode sizes."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)
