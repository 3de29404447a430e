"""Dispatch backends, picked in one place.

Each backend is a function `(x_TD, plan, experts) -> y_TD` (float32) that consumes a `DispatchPlan`
built once from the routing. `register_backend` adds one (Triton kernels register themselves when
Triton is importable); `resolve_backend` turns "auto" into a concrete name for the input at hand.

| name      | what it does                                                          | when auto picks it |
|-----------|-----------------------------------------------------------------------|--------------------|
| reference | per-token Python loop, the test oracle                                | never              |
| grouped   | sort by expert, fused expert MLP op (grouped GEMMs, custom backward)  | CPU, T*K > 4E      |
| decode    | loop over the experts hit, weight-stationary GEMMs (no-grad path)     | CPU, T*K <= 4E     |
| capacity  | padded [E, C, D] batches and bmm, static shapes (GShard/Switch)       | never (ask for it) |
| triton    | Triton kernels (sparsemoe.dispatch.triton_backend), CUDA only         | CUDA with Triton   |
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from sparsemoe.amp import autocast_dtype
from sparsemoe.config import BACKEND_NAMES
from sparsemoe.dispatch.capacity import capacity_forward
from sparsemoe.dispatch.decode import (
    KERNEL_MAX_ROWS_PER_EXPERT,
    decode_forward,
    decode_from_choices,
    decode_from_choices_applies,
)
from sparsemoe.dispatch.fused import forward_by_expert
from sparsemoe.dispatch.grouped import grouped_forward
from sparsemoe.dispatch.plan import DispatchPlan, build_plan
from sparsemoe.dispatch.reference import reference_forward
from sparsemoe.ops import cpu_kernels
from sparsemoe.quant.experts import QuantizedExperts, is_inference, kernel_applies, kernel_forward, kernel_forward_choices
from sparsemoe.routing import RoutingResult

BackendFn = Callable[[Tensor, DispatchPlan, "object"], Tensor]


@dataclass(frozen=True)
class Backend:
    name: str
    forward: BackendFn
    available: Callable[[Tensor], bool] = lambda x: True  # can it run on this input's device/dtype?


_REGISTRY: dict[str, Backend] = {}


def register_backend(name: str, forward: BackendFn, available: Optional[Callable[[Tensor], bool]] = None) -> None:
    _REGISTRY[name] = Backend(name, forward, available or (lambda x: True))


register_backend("reference", reference_forward)
register_backend("grouped", grouped_forward)
register_backend("capacity", capacity_forward)
register_backend("decode", decode_forward)


def _register_optional_backends() -> None:
    """Backends with optional dependencies register themselves on import, when the dependency exists."""
    for module, dependency in (("sparsemoe.dispatch.triton_backend", "triton"),):
        if importlib.util.find_spec(dependency) is not None and importlib.util.find_spec(module) is not None:
            importlib.import_module(module)


_register_optional_backends()



def backend_names() -> tuple[str, ...]:
    return tuple(dict.fromkeys(("auto", *_REGISTRY)))


def resolve_backend(name: str, x_TD: Tensor, plan: DispatchPlan) -> Backend:
    """The concrete backend for `name` ("auto" or a registered name) on this input."""
    if name == "auto":
        return _REGISTRY[_auto_name(x_TD, plan)]
    backend = _REGISTRY.get(name)
    if backend is None:
        raise ValueError(f"dispatch backend {name!r} is not available here; available: {sorted(_REGISTRY)}")
    if not backend.available(x_TD):
        raise ValueError(f"dispatch backend {name!r} cannot run on {x_TD.device.type}/{x_TD.dtype} input")
    return backend


# Decode when there are at most this many rows per expert on average: up to 4 the expert GEMMs are
# weight-read bound and the decode path's weight-stationary BLAS GEMMs win; with the native CPU kernel, up
# to decode.KERNEL_MAX_ROWS_PER_EXPERT (see there).
_DECODE_MAX_ROWS_PER_EXPERT = 4


def run_backend(name: str, x_TD: Tensor, plan: DispatchPlan, experts) -> Tensor:
    """Run the backend `name` ("auto" or registered) on x_TD [T, D] -> float32 [T, D].

    Under torch.autocast the expert GEMMs run in the autocast dtype: the input and the expert weights
    are cast to it (differentiably) and the backend runs with autocast off, so that its own kernels and
    custom ops see consistent dtypes.
    """
    device_type = x_TD.device.type
    dtype = autocast_dtype(device_type)
    quantized = isinstance(experts, QuantizedExperts)
    if dtype is not None:
        with torch.autocast(device_type, enabled=False):  # quantized experts are read in x's dtype
            return run_backend(name, x_TD.to(dtype), plan, experts if quantized else experts.cast(dtype))
    if quantized:
        return _run_quantized(name, x_TD, plan, experts)
    return resolve_backend(name, x_TD, plan).forward(x_TD, plan, experts)


def _run_quantized(name: str, x_TD: Tensor, plan: DispatchPlan, experts: QuantizedExperts) -> Tensor:
    """Quantized experts: "auto" and "decode" read them as stored with the native kernel when it applies (a
    few rows per expert, inference). Past that, "auto" on the CPU runs the fused op's loop with each
    expert's weights dequantized into one reused buffer as its turn comes (inference); otherwise (gradients to the input, another backend
    asked for, GPUs for now) the backend runs on all the weights dequantized for this call, in x's dtype."""
    if name in ("auto", "decode") and kernel_applies(x_TD, experts, plan.num_rows):
        return kernel_forward(x_TD, plan.token_ids, plan.weights, plan.offsets, experts)
    if name == "auto" and is_inference(x_TD, experts) and x_TD.device.type == "cpu" and not torch.compiler.is_compiling():
        weights_of = experts.expert_weights(x_TD.dtype)
        return forward_by_expert(x_TD, plan.token_ids, plan.weights, plan.offsets, weights_of, experts.activation)
    return run_backend(name, x_TD, plan, experts.dequantize(x_TD.dtype))


def _auto_name(x_TD: Tensor, plan: DispatchPlan) -> str:
    """The fastest backend for this input. Decided from shapes only: no device sync, compile-friendly."""
    return _auto_name_of(x_TD, plan.num_rows, plan.num_experts)


def _auto_name_of(x_TD: Tensor, num_rows: int, num_experts: int) -> str:
    """The backend `auto` runs for input rows like x_TD with `num_rows` plan rows over `num_experts` experts."""
    triton = _REGISTRY.get("triton")
    if triton is not None and triton.available(x_TD):
        return "triton"
    if x_TD.device.type != "cpu":
        return "grouped"
    rows_per_expert = _DECODE_MAX_ROWS_PER_EXPERT
    if cpu_kernels.available():
        rows_per_expert = KERNEL_MAX_ROWS_PER_EXPERT.get(x_TD.dtype, rows_per_expert)
    return "decode" if num_rows <= rows_per_expert * num_experts else "grouped"


def from_choices_applies(name: str, x_TD: Tensor, num_rows: int, num_experts: int, weights: Optional[Tensor],
                         experts) -> bool:
    """Whether `run_from_choices` runs the experts (a token-choice router's `num_rows` choices of x_TD's rows
    over `num_experts` experts, weights: the choices' combine weights, or None when they carry no gradient)
    with backend `name`: "auto" or "decode", and the native kernel applies (float experts: the decode kernel,
    where "auto" picks `decode`; quantized experts: their kernel, as `_run_quantized` decides)."""
    if name not in ("auto", "decode"):
        return False
    if isinstance(experts, QuantizedExperts):
        return (cpu_kernels.plain_eager(x_TD) and autocast_dtype(x_TD.device.type) is None
                and kernel_applies(x_TD, experts, num_rows))  # fmt: skip
    if name == "auto" and _auto_name_of(x_TD, num_rows, num_experts) != "decode":
        return False
    return decode_from_choices_applies(x_TD, weights, experts)


def run_from_choices(name: str, x_TD: Tensor, routing: RoutingResult, experts) -> Optional[Tensor]:
    """The routed experts' combined output [T, D] float32 straight from a token-choice router's top-k choices,
    without a plan, where `from_choices_applies` (a decode step); None otherwise: then build the plan and
    `run_backend`."""
    ids, weights = routing.expert_ids, routing.weights
    if routing.expert_choice or not from_choices_applies(name, x_TD, ids.shape[0], routing.num_experts, weights, experts):
        return None
    if isinstance(experts, QuantizedExperts):
        return kernel_forward_choices(x_TD, ids, weights, routing.top_k, experts)
    return decode_from_choices(x_TD, ids, weights, routing.top_k, experts)


__all__ = [
    "BACKEND_NAMES",
    "Backend",
    "from_choices_applies",
    "DispatchPlan",
    "backend_names",
    "build_plan",
    "register_backend",
    "resolve_backend",
    "run_backend",
    "run_from_choices",
]
