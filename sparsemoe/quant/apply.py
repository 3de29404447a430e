"""`quantize(module, scheme)`: swap a model's or layer's expert weights for quantized ones, in place.

Routed experts (`sparsemoe.experts.Experts`) become `QuantizedExperts` and shared experts
`QuantizedSharedExperts`; routers, norms, attention and embeddings stay as they are. Other kinds of
expert modules (transformers' decorated experts, run by the sparsemoe experts implementation) are
handled by the quantizers registered with `register_quantizer`: `sparsemoe.hf` registers its own when
imported.
"""

from __future__ import annotations

from typing import Callable, Optional

from torch import nn

from sparsemoe.experts import Experts, SharedExperts
from sparsemoe.quant.experts import QuantizedExperts, QuantizedSharedExperts, QuantizedWeight
from sparsemoe.quant.schemes import QuantizationError, QuantScheme

# (applies to this module?, quantize it in place) pairs, tried in order for every module.
Quantizer = tuple[Callable[[nn.Module], bool], Callable[[nn.Module, QuantScheme], None]]
_QUANTIZERS: list[Quantizer] = []


def register_quantizer(applies: Callable[[nn.Module], bool], quantize_in_place: Callable[[nn.Module, QuantScheme], None]) -> None:
    """Teach `quantize` another kind of expert module (it must keep working, quantized, in place)."""
    _QUANTIZERS.append((applies, quantize_in_place))


def _replacement(module: nn.Module, scheme: QuantScheme, empty: bool) -> Optional[nn.Module]:
    for float_cls, quantized_cls in ((SharedExperts, QuantizedSharedExperts), (Experts, QuantizedExperts)):
        if isinstance(module, float_cls):
            return quantized_cls.like(module, scheme) if empty else quantized_cls.from_experts(module, scheme)
    return None


def quantized_layout(module: nn.Module, scheme: str, group_size: Optional[int] = None, *, shared: bool = True) -> nn.Module:
    """`module` with its experts swapped for quantized ones of the same shapes holding no values yet (for
    loading a quantized checkpoint into: build the float model on the meta device, call this, then
    `to_empty` and load). In place; returns it."""
    return _swap(module, QuantScheme.make(scheme, group_size), shared, empty=True)


def quantize(module: nn.Module, scheme: str = "int8", group_size: Optional[int] = None, *, shared: bool = True) -> nn.Module:
    """Store the expert weights of `module` (a model or one MoE layer) quantized, in place; returns it.

    scheme: "int8" (one scale per output channel) or "int4" (one scale per `group_size` input columns,
    default 64, a multiple of 32); see `sparsemoe.quant.schemes`. shared=False leaves shared experts float.
    Quantized experts are for inference: they hold no parameters, so an optimizer no longer sees them.
    Raises QuantizationError when nothing in `module` has expert weights to quantize, or for a bad scheme.
    """
    return _swap(module, QuantScheme.make(scheme, group_size), shared, empty=False)


def _swap(module: nn.Module, spec: QuantScheme, shared: bool, empty: bool) -> nn.Module:
    if any(isinstance(m, QuantizedWeight) for m in module.modules()):
        raise QuantizationError("the experts are quantized already (one scheme per model): quantize the float model")
    count = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, SharedExperts) and not shared:
                continue
            new = _replacement(child, spec, empty)
            if new is not None:
                setattr(parent, name, new)
                count += 1
        for applies, quantize_in_place in () if empty else _QUANTIZERS:
            if applies(parent):
                quantize_in_place(parent, spec)
                count += 1
                break
    if count == 0:
        raise QuantizationError(f"nothing to quantize: {type(module).__name__} holds no sparsemoe or transformers expert weights")
    return module


def quantization_of(module: nn.Module) -> Optional[dict]:
    """{"scheme", "group_size", "shared"} of a quantized model (as saved in its config), or None."""
    routed = [m for m in module.modules() if isinstance(m, QuantizedExperts) and not isinstance(m, QuantizedSharedExperts)]
    if not routed:
        return None
    shared_float = any(isinstance(m, SharedExperts) for m in module.modules())
    return {**routed[0].scheme.as_dict(), "shared": not shared_float}
