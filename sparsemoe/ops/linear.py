"""`linear(x, weight, bias)`: F.linear, with a few rows on the CPU streamed through the native kernel.

A decode step multiplies one row (per sequence) by every projection of the model: attention's, the LM
head's [vocabulary x D]. BLAS runs such products below the speed at which the weight can be read
(measured on 2 threads, torch 2.13: the 32000 x 1024 LM head at one row, bfloat16, 3.2 ms against 1.7 ms
for the native kernel; 1024 x 1024 in float32, 0.074 ms against 0.036 ms). The native grouped linear
kernel (`cpu_kernels.linear_many`) streams each weight row once, widening bfloat16 weights in registers
and summing in float32; its result is rounded once to x's dtype. `linears` runs several projections of
one input (q, k and v) in one call: each call has a fixed cost (Python, waking the threads) about as
large as reading a 1024 x 1024 bfloat16 weight (mixtral-1k's q, k and v at one row, cold caches, 2
threads: 120 us in one call, 254 us in three).

Taken for inference only (no autograd graph to build), up to `MAX_ROWS` rows, in float32 weights of at
least `MIN_WEIGHTS` elements (below that the call's fixed cost outweighs the gain; in bfloat16 the kernel
is faster at every size), float32 or bfloat16 CPU tensors of one dtype, a contiguous weight, the native
kernels built, and outside torch.compile (which traces F.linear); everything else is F.linear.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparsemoe.ops import cpu_kernels

# Up to this many rows the native kernel beats BLAS on projections of 1024 x 1024 to 32000 x 1024 (measured
# as above at 1, 4, 16 and 17 rows; in bfloat16 BLAS's GEMMs are faster from about 16 rows, the CPU
# having bfloat16 dot products that the kernel, summing in float32, does not use).
MAX_ROWS = {torch.float32: 16, torch.bfloat16: 4}
# Of all the weights of one call together. One row, 2 threads, torch 2.13, warm caches, F.linear against the
# kernel through `cpu_kernels.linear_many`: float32 65,536 weights 6.8 / 14.5 us, 131,072 14.8 / 14.4, 262,144
# 27.9 / 19.6; bfloat16 (where PyTorch's small GEMMs cost more) 16,384 18.5 / 9.6, 1,048,576 66.4 / 24.2.
MIN_WEIGHTS = {torch.float32: 1 << 17, torch.bfloat16: 0}


def native_applies(x: Tensor, weights: Sequence[Tensor], min_weights: Optional[int] = None) -> bool:
    """Whether `linear` / `linears` run x against these weights on the native kernel (the module docstring;
    min_weights: `MIN_WEIGHTS` of x's dtype unless given; `linear_float32` takes it from any size)."""
    if min_weights is None:
        min_weights = MIN_WEIGHTS.get(x.dtype, 0)
    return (
        cpu_kernels.plain_eager(x)
        and x.numel() <= MAX_ROWS.get(x.dtype, 0) * x.shape[-1]
        and sum(w.numel() for w in weights) >= min_weights
        and all(w.dtype == x.dtype and w.is_contiguous() and w.device.type == "cpu" for w in weights)
        and not (torch.is_grad_enabled() and (x.requires_grad or any(w.requires_grad for w in weights)))
        and cpu_kernels.available()
    )


def _native(x: Tensor, weights: Sequence[Tensor], biases: Sequence[Optional[Tensor]]) -> list[Tensor]:
    rows = x.reshape(-1, x.shape[-1])
    lead = x.shape[:-1]
    if all(b is None for b in biases):
        outs = cpu_kernels.linear_many(rows, weights)
    else:  # the bias added to the float32 sums, then one rounding, as F.linear
        outs = [(y if b is None else y + b).to(x.dtype) for y, b in zip(cpu_kernels.linear_many(rows, weights, True), biases)]
    return [y.view(*lead, w.shape[0]) for y, w in zip(outs, weights)]


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """x [..., K] @ weight [O, K]^T (+ bias [O]) -> [..., O] in x's dtype, as F.linear computes it."""
    if not native_applies(x, (weight,)):
        return F.linear(x, weight, bias)
    return _native(x, (weight,), (bias,))[0]


def linear_float32(x: Tensor, weight: Tensor) -> Tensor:
    """x [..., K] @ weight [O, K]^T in float32 from the values as they are (a router's logits): at decode
    sizes one native call where PyTorch widens x, widens the weight and multiplies, whatever the weight's
    size (a router's is small, but the native decode step, `sparsemoe.model.native_decode`, computes the
    logits with this kernel inside its own call, and the modules must compute the same values)."""
    if not native_applies(x, (weight,), min_weights=0):
        return F.linear(x.float(), weight.float())
    rows = x.reshape(-1, x.shape[-1])
    return cpu_kernels.linear_many(rows, (weight,), float_output=True)[0].view(*x.shape[:-1], weight.shape[0])


def linears(x: Tensor, layers: Sequence[nn.Module]) -> list[Tensor]:
    """[layer(x) for layer in layers]; at decode sizes, layers that are plain `nn.Linear`s (an attention
    layer's q, k and v projections) run in one call of the native kernel, one pass over the threads for
    all of them instead of one each."""
    if all(type(layer) in _PLAIN_LINEARS for layer in layers):
        weights = [layer.weight for layer in layers]
        if native_applies(x, weights):
            return _native(x, weights, [layer.bias for layer in layers])
    return [layer(x) for layer in layers]


class Linear(nn.Linear):
    """nn.Linear whose forward is `linear`: the same parameters and state dict, faster at decode sizes."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)


_PLAIN_LINEARS = (nn.Linear, Linear)  # subclasses may compute something else: they run as themselves
