"""Triton kernels for the GPU (and the Triton interpreter on the CPU, for tests): `@triton.jit` kernels
and their host launchers only. The autograd wrappers and custom ops that make them a dispatch backend
live in `sparsemoe.dispatch.triton_backend`; `aot` compiles them for a GPU target without a GPU. The GPU
benchmark is `sparsemoe bench --gpu`.

Importing this package imports Triton; import it only where Triton is installed.
"""

from sparsemoe.kernels._common import ACT_CODES, INTERPRET
from sparsemoe.kernels.expert_mm import down_backward, scatter_projection, up_projection, weight_gradient
from sparsemoe.kernels.router import router_topk

__all__ = [
    "ACT_CODES",
    "INTERPRET",
    "down_backward",
    "router_topk",
    "scatter_projection",
    "up_projection",
    "weight_gradient",
]
