"""sparsemoe as a transformers experts implementation: `experts_implementation="sparsemoe"`.

    import sparsemoe.hf  # registers "sparsemoe" with transformers (register_experts() does it explicitly)
    model = AutoModelForCausalLM.from_pretrained(path, experts_implementation="sparsemoe")
    model.set_experts_implementation("sparsemoe")  # or switch a loaded model

Legend: T tokens, K experts per token, D model width, F expert hidden width, I in-projection rows
(2F gated, F otherwise), E experts.

transformers 5 decorates each family's experts class with `use_experts_implementation(...)`, whose flags
declare how the class stores its MLP, and dispatches the class's forward(hidden_states [T, D],
top_k_index [T, K], top_k_weights [T, K]) through `ALL_EXPERTS_FUNCTIONS`. Ours keeps transformers'
routing as it is, builds our dispatch plan from it once, and reads the module's own tensors (no copy):

| what the class declares                                    | what runs                                     |
|------------------------------------------------------------|-----------------------------------------------|
| gate/up concatenated [gate; up], transposed or not, no bias,| our backends (`auto`: the native CPU decode   |
| SiLU or tanh-GELU gate with transformers' default gate;    | kernel and fused grouped op on the CPU,       |
| or no gate with ReLU or tanh-GELU                          | Triton on CUDA), their own exact backward     |
| anything else: the class's own `_apply_gate` (clamped or   | the general path (`sparsemoe.dispatch.general`)|
| interleaved SwiGLU, ...), another `act_fn` (exact GELU,    | grouped GEMMs with the module's own functions |
| ReLU², ...), biases, a norm after each expert               | between them, autograd for the backward       |

An activation is recognised by what it computes (its output on a probe equal, bit for bit, to ours),
not by its class name. What cannot be computed (a flag this module does not know set to a non-default
value, a declared tensor or norm that the module lacks) raises `UnsupportedExperts` naming the class and
the flag. Expert ids outside [0, E) (transformers' expert-parallel placeholders) contribute nothing.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import Tensor, nn

from sparsemoe.amp import autocast_dtype
from sparsemoe.config import ACTIVATIONS, GATED_ACTIVATIONS
from sparsemoe.dispatch import backend_names, run_backend
from sparsemoe.dispatch.general import GeneralExperts, general_forward
from sparsemoe.dispatch.plan import plan_from_topk
from sparsemoe.experts import ExpertView, activate
from sparsemoe.quant import QuantizationError, QuantizedExperts, QuantizedWeight, QuantScheme, register_quantizer

NAME = "sparsemoe"
# The decorator's layout flags this module reads (transformers' `use_experts_implementation` keywords).
KNOWN_FLAGS = ("is_concatenated", "is_transposed", "has_bias", "has_gate", "has_post_expert_norm")
_NOT_FLAGS = ("experts_class", "experts_interface")

_CACHE_ATTR = "_sparsemoe_layout"
QUANTIZED_ATTR = "sparsemoe_quantized"  # the submodule holding a quantized module's expert weights
_REGISTERED: set[str] = set()  # the experts_implementation names that run `experts_forward`


class UnsupportedExperts(NotImplementedError):
    """An experts module whose declared layout this implementation cannot compute (names class and flag)."""


@dataclass(frozen=True)
class ExpertsLayout:
    """How one decorated experts module stores its MLP, read from its flags, tensors and functions."""

    flags: tuple  # the flag values it was read from (a change of flags reads the layout again)
    in_proj: str  # "gate_up_proj" (gated) or "up_proj"
    transposed: bool  # weights stored [E, in, out] instead of nn.Linear's [E, out, in]
    bias: bool
    post_norm: bool
    activation: Optional[str]  # our native activation's name, or None: the general path


def _flag_values(module: nn.Module) -> tuple:
    return tuple(getattr(module, name, None) for name in KNOWN_FLAGS)


def _unknown_flags(module: nn.Module) -> list[str]:
    """Flags of transformers' decorator that this module does not know, set away from their default."""
    try:
        from transformers.integrations.moe import use_experts_implementation
    except ImportError:
        return []
    unknown = []
    for name, param in inspect.signature(use_experts_implementation).parameters.items():
        if name in KNOWN_FLAGS or name in _NOT_FLAGS or param.kind != param.KEYWORD_ONLY:
            continue
        value = getattr(module, name, param.default)
        if value != param.default:
            unknown.append(f"{name}={value!r}")
    return unknown


def _computed_activation(fn, gated: bool) -> Optional[str]:
    """The name of our activation whose elementwise function `fn` computes, bit for bit on a wide probe
    (gated: ours applied to [probe; ones], whose up half of ones leaves act(gate) exact), else None."""
    if fn is None:
        return None
    probe = torch.linspace(-30.0, 30.0, 2401)
    try:
        with torch.no_grad():
            out = fn(probe)
    except Exception:  # not an elementwise function of one tensor: the general path calls it as it is
        return None
    if not isinstance(out, Tensor) or out.shape != probe.shape:
        return None
    h = torch.cat([probe, torch.ones_like(probe)]) if gated else probe
    names = [name for name in ACTIVATIONS if (name in GATED_ACTIVATIONS) == gated]
    return next((name for name in names if torch.equal(out, activate(h, name))), None)


def _uses_default_gate(module: nn.Module) -> bool:
    try:
        from transformers.integrations.moe import _default_apply_gate
    except ImportError:  # a transformers without it: treat every gate as the class's own
        return False
    return getattr(type(module), "_apply_gate", None) is _default_apply_gate


def _native_activation(module: nn.Module, gated: bool, concatenated: bool) -> Optional[str]:
    # transformers' default gate is act(first half) * second half: our layout, when concatenated.
    if gated and not (concatenated and _uses_default_gate(module)):
        return None
    return _computed_activation(getattr(module, "act_fn", None), gated)


def _missing(module: nn.Module, flag: str, what: str) -> UnsupportedExperts:
    return UnsupportedExperts(
        f"{type(module).__name__} declares {flag} but has no {what}: the sparsemoe experts implementation "
        f"cannot compute it (use experts_implementation='eager' for this model)"
    )


def read_layout(module: nn.Module) -> ExpertsLayout:
    """The layout of a decorated experts module (cached on it); raises UnsupportedExperts."""
    flags = _flag_values(module)
    cached = module.__dict__.get(_CACHE_ATTR)
    if cached is not None and cached.flags == flags:
        return cached
    unknown = _unknown_flags(module)
    if unknown:
        raise UnsupportedExperts(
            f"{type(module).__name__}: {', '.join(unknown)} is not supported by the sparsemoe experts "
            f"implementation (it reads {', '.join(KNOWN_FLAGS)}); use experts_implementation='eager'"
        )
    concatenated, transposed, bias, gated, post_norm = (
        bool(getattr(module, name, default))
        for name, default in zip(KNOWN_FLAGS, (True, False, False, True, False))
    )
    in_proj = "gate_up_proj" if gated else "up_proj"
    flag = f"has_gate={gated}"
    for name in (in_proj, "down_proj"):
        if not isinstance(getattr(module, name, None), Tensor):
            raise _missing(module, flag, f"{name} tensor")
    if bias:
        for name in (in_proj + "_bias", "down_proj_bias"):
            if not isinstance(getattr(module, name, None), Tensor):
                raise _missing(module, "has_bias=True", f"{name} tensor")
    if post_norm and not callable(getattr(module, "post_expert_norm", None)):
        raise _missing(module, "has_post_expert_norm=True", "post_expert_norm module")
    if gated and not callable(getattr(module, "_apply_gate", None)):
        raise _missing(module, "has_gate=True", "_apply_gate method")
    if not gated and not callable(getattr(module, "act_fn", None)):
        raise _missing(module, "has_gate=False", "act_fn")
    activation = None if bias or post_norm else _native_activation(module, gated, concatenated)
    layout = ExpertsLayout(flags, in_proj, transposed, bias, post_norm, activation)
    module.__dict__[_CACHE_ATTR] = layout  # a plain attribute: not a parameter, buffer or submodule
    return layout


def _linear_layout(weight: Tensor, transposed: bool) -> Tensor:
    """nn.Linear's [E, out, in] view of a stacked weight (a transposed view when stored [E, in, out])."""
    return weight.transpose(1, 2) if transposed else weight


_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _check_inputs(module: nn.Module, layout: ExpertsLayout, x_TD: Tensor, w_in: Tensor, w_out: Tensor,
                  ids_TK: Tensor, weights_TK: Tensor) -> None:  # fmt: skip
    name = type(module).__name__
    if w_in.dtype not in _FLOAT_DTYPES or w_out.dtype not in _FLOAT_DTYPES:
        raise UnsupportedExperts(
            f"{name}: expert weights of dtype {w_in.dtype}/{w_out.dtype} are not supported by the "
            "sparsemoe experts implementation; it reads float32, bfloat16, float16 or float64 weights (quantize with "
            "sparsemoe.quant.quantize instead)"
        )
    E, I, D = w_in.shape
    gated = layout.in_proj == "gate_up_proj"
    if w_out.shape[0] != E or w_out.shape[1] != D or D != x_TD.shape[1] or I != (2 if gated else 1) * w_out.shape[2]:
        raise ValueError(
            f"{name}: hidden states [T, {x_TD.shape[1]}] do not fit the experts' weights: in-projection "
            f"{tuple(w_in.shape)} / out-projection {tuple(w_out.shape)} (as [E, out, in]; "
            f"{'[E, 2F, D] / [E, D, F] with a gate' if gated else '[E, F, D] / [E, D, F] without a gate'})"
        )
    if ids_TK.shape != weights_TK.shape or ids_TK.dim() != 2 or ids_TK.shape[0] != x_TD.shape[0]:
        raise ValueError(
            f"{type(module).__name__}: top_k_index {tuple(ids_TK.shape)} and top_k_weights "
            f"{tuple(weights_TK.shape)} must both be [T, K] with T = {x_TD.shape[0]}"
        )


def experts_forward(
    module: nn.Module, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor, backend: str = "auto"
) -> Tensor:
    """A decorated experts module's forward on our backends -> [T, D] in hidden_states' dtype.

    hidden_states [T, D] (or [..., D]), top_k_index [T, K] (ids >= E are placeholders that count for
    nothing), top_k_weights [T, K]: transformers' own routing, used as it is.
    """
    layout = read_layout(module)
    shape = hidden_states.shape
    x_TD = hidden_states.reshape(-1, shape[-1])
    quantized = module._modules.get(QUANTIZED_ATTR)
    if quantized is not None:  # `sparsemoe.quant.quantize` stored the weights quantized (see quantize_experts)
        w_in, w_out = quantized.w_in, quantized.w_out
    else:
        w_in = _linear_layout(getattr(module, layout.in_proj), layout.transposed)
        w_out = _linear_layout(module.down_proj, layout.transposed)
    T, K = x_TD.shape[0], top_k_index.shape[-1]
    ids_TK, weights_TK = top_k_index.reshape(T, K), top_k_weights.reshape(T, top_k_weights.shape[-1])
    _check_inputs(module, layout, x_TD, w_in, w_out, ids_TK, weights_TK)
    plan = plan_from_topk(ids_TK, weights_TK, w_in.shape[0])
    # The GEMMs run in autocast's dtype, else in the weights' (as transformers' grouped_mm).
    dtype = autocast_dtype(x_TD.device.type) or w_in.dtype
    x_TD = x_TD.to(dtype)
    if isinstance(quantized, QuantizedExperts):
        y_TD = run_backend(backend, x_TD, plan, quantized)  # the quantized decode kernel, or dequantized weights
    elif quantized is not None:  # the general path's layouts: their weights dequantized for the call
        y_TD = general_forward(x_TD, plan, _general_experts(module, layout, w_in.dequantize(dtype), w_out.dequantize(dtype)))
    elif layout.activation is not None:
        view = ExpertView(w_in, w_out, layout.activation, 0.0, module.training, False)
        y_TD = run_backend(backend, x_TD, plan, view)  # casts the weights under autocast itself
    else:
        y_TD = general_forward(x_TD, plan, _general_experts(module, layout, w_in.to(dtype), w_out.to(dtype)))
    return y_TD.to(hidden_states.dtype).reshape(shape)


def _general_experts(module: nn.Module, layout: ExpertsLayout, w_in: Tensor, w_out: Tensor) -> GeneralExperts:
    gated = layout.in_proj == "gate_up_proj"
    return GeneralExperts(
        w_in=w_in,
        w_out=w_out,
        hidden=module._apply_gate if gated else module.act_fn,
        b_in=getattr(module, layout.in_proj + "_bias") if layout.bias else None,
        b_out=module.down_proj_bias if layout.bias else None,
        post=module.post_expert_norm if layout.post_norm else None,
    )


def register_experts(name: str = NAME, backend: str = "auto") -> str:
    """Register `experts_implementation=name` with transformers, running the dispatch backend `backend`
    ("auto" picks per input; any name of `sparsemoe.dispatch.backend_names()`). Returns the name.

    Raises ImportError without transformers (or one too old to have the experts interface) and
    ValueError for an unknown backend.
    """
    if backend not in backend_names():
        raise ValueError(f"register_experts: backend {backend!r} is not one of {', '.join(backend_names())}")
    try:
        from transformers.integrations.moe import ExpertsInterface
    except ImportError as err:
        raise ImportError(
            f"experts_implementation={name!r} needs transformers >= 5 with its experts interface ({err})"
        ) from None

    def forward(module: nn.Module, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        return experts_forward(module, hidden_states, top_k_index, top_k_weights, backend)

    forward.__name__ = forward.__qualname__ = f"sparsemoe_experts_forward_{backend}"
    ExpertsInterface.register(name, forward)
    _REGISTERED.add(name)
    return name


def quantize_experts(module: nn.Module, scheme: QuantScheme) -> None:
    """Store a decorated experts module's weights quantized, in place (`sparsemoe.quant.quantize` calls this
    for every such module): the float in- and out-projections are replaced by the submodule
    `sparsemoe_quantized` (a `QuantizedExperts` for the layouts our backends run, else the two quantized
    weights, dequantized per call for the general path). Biases and norms stay float. The model must run its
    experts through a sparsemoe experts implementation, which is what reads them."""
    implementation = getattr(getattr(module, "config", None), "_experts_implementation", None)
    if implementation not in _REGISTERED:
        raise QuantizationError(
            f"{type(module).__name__} runs experts_implementation={implementation!r}; quantized transformers experts "
            f"run through sparsemoe's: load the model with experts_implementation={NAME!r} (or call "
            f"model.set_experts_implementation({NAME!r})) first"
        )
    layout = read_layout(module)
    w_in = _linear_layout(getattr(module, layout.in_proj), layout.transposed)
    w_out = _linear_layout(module.down_proj, layout.transposed)
    E, _, D = w_in.shape
    if layout.activation is not None:
        # On the meta device: the layout only, its tensors are replaced just below.
        quantized: nn.Module = QuantizedExperts(E, D, w_out.shape[2], layout.activation, scheme, w_in.dtype, device="meta")
        quantized.train(module.training)
    else:
        quantized = nn.Module()
    quantized.w_in = QuantizedWeight.from_float(w_in, scheme)
    quantized.w_out = QuantizedWeight.from_float(w_out, scheme)
    delattr(module, layout.in_proj)
    delattr(module, "down_proj")
    module.add_module(QUANTIZED_ATTR, quantized)



def is_decorated_experts(cls: Union[type, nn.Module]) -> bool:
    """Whether a class (or module) dispatches its forward through transformers' experts interface."""
    cls = cls if isinstance(cls, type) else type(cls)
    try:
        from transformers.integrations import moe
    except ImportError:
        return False
    owner = next((klass for klass in cls.__mro__ if "forward" in klass.__dict__), None)
    code = getattr(owner.__dict__["forward"], "__code__", None) if owner is not None else None
    return code is not None and code.co_filename == moe.__file__


register_quantizer(is_decorated_experts, quantize_experts)
