"""Stacked expert weights stored quantized, in place of `sparsemoe.experts.Experts` for inference.

Legend: E experts, D model width, F expert hidden width, I in-projection rows (2F gated), O/K a weight's
output rows / input columns (see `sparsemoe.quant.schemes` for the stored layouts).

`QuantizedExperts` holds w_in [E, I, D] and w_out [E, D, F] as `QuantizedWeight`s (buffers: `data` and
`scale`), so a model's state dict carries them as `...experts.w_in.data`, `...experts.w_in.scale`, and so
on. The dispatch (`sparsemoe.dispatch.run_backend`) runs them through the native quantized decode kernel
when it applies, and otherwise through any backend on `dequantize()`: the float weights, rebuilt for the
call. The experts take no gradient (their weights are buffers); gradients still flow to the input.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from sparsemoe.experts import Experts, ExpertView, SharedExperts, in_rows, mlp
from sparsemoe.ops import cpu_kernels
from sparsemoe.quant.schemes import QuantScheme, check_stored, dequantize_weight, quantize_weight


class QuantizedWeight(nn.Module):
    """One stacked weight [E, O, K] stored quantized: buffers `data` and `scale` (layouts in schemes.py).

    `shape`, `dtype` (the dtype it computes in: the float weight's), `numel()` and `dequantize()` let code
    that reads a float weight's size and dtype read this one too.
    """

    def __init__(self, shape_EOK: tuple[int, int, int], scheme: QuantScheme, dtype: torch.dtype = torch.float32, device=None) -> None:
        super().__init__()
        self.shape = torch.Size(shape_EOK)
        self.scheme = scheme
        self.dtype = dtype
        data_shape, scale_shape, data_dtype, scale_dtype = scheme.stored(*shape_EOK)
        self.register_buffer("data", torch.zeros(data_shape, dtype=data_dtype, device=device))
        self.register_buffer("scale", torch.ones(scale_shape, dtype=scale_dtype, device=device))

    @classmethod
    def from_float(cls, w_EOK: Tensor, scheme: QuantScheme) -> "QuantizedWeight":
        out = cls(tuple(w_EOK.shape), scheme, w_EOK.dtype, w_EOK.device)
        out.data, out.scale = quantize_weight(w_EOK, scheme)
        return out

    @property
    def device(self) -> torch.device:
        return self.data.device

    def numel(self) -> int:
        return math.prod(self.shape)

    def nbytes(self) -> int:
        """Bytes stored (and read by a decode step that uses every expert)."""
        return self.data.numel() * self.data.element_size() + self.scale.numel() * self.scale.element_size()

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> Tensor:
        """The float weight [E, O, K] in `dtype` (default: the compute dtype)."""
        dtype = dtype or self.dtype
        if cpu_kernels.supports_dequantize(self.data, dtype) and not torch.compiler.is_compiling():
            return cpu_kernels.dequantize(self.data, self.scale, self.scheme.name, self.scheme.group_size, self.shape[2], dtype)
        return dequantize_weight(self.data, self.scale, self.scheme, self.shape[2], dtype)

    def dequantize_expert(self, e: int, out: Tensor) -> Tensor:
        """Expert e's float weight [O, K] written into `out` (its dtype) and returned."""
        data, scale = self.data[e : e + 1], self.scale[e : e + 1]
        if cpu_kernels.supports_dequantize(self.data, out.dtype) and out.is_contiguous():
            return cpu_kernels.dequantize(data, scale, self.scheme.name, self.scheme.group_size, self.shape[2],
                                          out.dtype, out.view(1, *out.shape))[0]  # fmt: skip
        return out.copy_(dequantize_weight(data, scale, self.scheme, self.shape[2], out.dtype)[0])

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        data, scale = state_dict.get(prefix + "data"), state_dict.get(prefix + "scale")
        if data is not None and scale is not None:
            check_stored(data, scale, self.scheme, tuple(self.shape), prefix.rstrip("."))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def _apply(self, fn, recurse=True):
        # .to(dtype) / .half() / .float() would cast the buffers; only moves between devices apply here.
        # (The integer data ignores float casts anyway; the scales must keep their stored dtype.)
        scale_dtype = self.scale.dtype
        super()._apply(fn, recurse)
        if self.scale.dtype != scale_dtype:
            self.scale = self.scale.to(scale_dtype)
        probe = fn(torch.zeros((), dtype=self.dtype))
        if probe.is_floating_point():
            self.dtype = probe.dtype  # a float cast of the model changes the compute dtype
        return self

    def extra_repr(self) -> str:
        return f"shape={tuple(self.shape)}, scheme={self.scheme.name}, group_size={self.scheme.group_size}, dtype={self.dtype}"


class QuantizedExperts(nn.Module):
    """E expert MLPs with quantized weights w_in [E, I, D] and w_out [E, D, F] (inference only)."""

    recompute_activations = False  # read by the dispatch backends; nothing is saved for a backward of weights

    def __init__(self, num_experts: int, dim: int, hidden_dim: int, activation: str, scheme: QuantScheme,
                 dtype: torch.dtype = torch.float32, dropout: float = 0.0, device=None) -> None:
        super().__init__()
        self.num_experts, self.dim, self.hidden_dim = num_experts, dim, hidden_dim
        self.activation, self.dropout, self.scheme = activation, dropout, scheme
        self.w_in = QuantizedWeight((num_experts, in_rows(hidden_dim, activation), dim), scheme, dtype, device)
        self.w_out = QuantizedWeight((num_experts, dim, hidden_dim), scheme, dtype, device)

    @classmethod
    def like(cls, experts: Experts, scheme: QuantScheme, device=None) -> "QuantizedExperts":
        """Quantized experts of `experts`' shapes and dtype holding no values yet (on `device`, default theirs)."""
        return cls(experts.num_experts, experts.dim, experts.hidden_dim, experts.activation, scheme,
                   experts.w_in.dtype, experts.dropout, experts.w_in.device if device is None else device)

    @classmethod
    def from_experts(cls, experts: Experts, scheme: QuantScheme) -> "QuantizedExperts":
        out = cls.like(experts, scheme, device="meta")  # the layout only: the quantized tensors replace it
        out.w_in = QuantizedWeight.from_float(experts.w_in, scheme)
        out.w_out = QuantizedWeight.from_float(experts.w_out, scheme)
        out.train(experts.training)
        return out

    @property
    def dtype(self) -> torch.dtype:
        return self.w_in.dtype

    def reset_parameters(self) -> None:
        raise RuntimeError("quantized experts cannot be re-initialised: quantize a freshly initialised layer instead")

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> ExpertView:
        """What a float backend reads: the weights rebuilt in `dtype` (default: the compute dtype)."""
        return ExpertView(self.w_in.dequantize(dtype), self.w_out.dequantize(dtype), self.activation, self.dropout,
                          self.training, False)

    def cast(self, dtype: torch.dtype) -> ExpertView:
        return self.dequantize(dtype)

    def expert_weights(self, dtype: torch.dtype) -> Callable[[int], tuple[Tensor, Tensor]]:
        """e -> expert e's float (w_in [I, D], w_out [D, F]) in `dtype`, dequantized into two buffers that
        every call refills: one expert's weights, in cache, where dequantizing all experts at once into
        fresh tensors touches new memory (a page fault per 4 KiB) on every forward."""
        w_in = torch.empty(self.w_in.shape[1:], dtype=dtype, device=self.w_in.device)
        w_out = torch.empty(self.w_out.shape[1:], dtype=dtype, device=self.w_out.device)
        return lambda e: (self.w_in.dequantize_expert(e, w_in), self.w_out.dequantize_expert(e, w_out))

    def expert(self, x: Tensor, e: int) -> Tensor:
        """Expert e on rows x [R, D] -> [R, D], from its dequantized weights (for the reference backend)."""
        w_in, w_out = self.expert_weights(x.dtype)(e)
        return mlp(x, w_in, w_out, self.activation, self.dropout, self.training)

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, dim={self.dim}, hidden_dim={self.hidden_dim}, "
                f"activation={self.activation}, scheme={self.scheme.name}, group_size={self.scheme.group_size}")


class QuantizedSharedExperts(QuantizedExperts):
    """`SharedExperts` with its weights quantized: one always-on MLP (optionally gated, gate kept float)."""

    def __init__(self, dim: int, hidden_dim: int, activation: str, scheme: QuantScheme, gated_output: bool,
                 dtype: torch.dtype = torch.float32, dropout: float = 0.0, device=None) -> None:
        super().__init__(1, dim, hidden_dim, activation, scheme, dtype, dropout, device)
        self.gate_weight = nn.Parameter(torch.zeros(1, dim, device=device, dtype=dtype)) if gated_output else None

    @classmethod
    def like(cls, shared: SharedExperts, scheme: QuantScheme, device=None) -> "QuantizedSharedExperts":
        return cls(shared.dim, shared.hidden_dim, shared.activation, scheme, shared.gate_weight is not None,
                   shared.w_in.dtype, shared.dropout, shared.w_in.device if device is None else device)

    @classmethod
    def from_experts(cls, shared: SharedExperts, scheme: QuantScheme) -> "QuantizedSharedExperts":
        out = super().from_experts(shared, scheme)
        if shared.gate_weight is not None:
            out.gate_weight = shared.gate_weight
        return out

    def forward(self, x_TD: Tensor) -> Tensor:
        y = dense_forward(x_TD, self)
        if self.gate_weight is not None:
            y = torch.sigmoid(x_TD @ self.gate_weight.t()) * y
        return y


def _decode_mlp_quantized(
    x_TD: Tensor, token_ids: Tensor, weights: Tensor, offsets: Tensor, in_data: Tensor, in_scale: Tensor,
    out_data: Tensor, out_scale: Tensor, scheme: str, group_size: int, hidden_dim: int, activation: str,
) -> Tensor:
    return cpu_kernels.decode_mlp_quantized(x_TD, token_ids, weights, offsets, (in_data, in_scale),
                                            (out_data, out_scale), scheme, group_size, hidden_dim, activation)


# The same function as an opaque op for the compiler (plain eager calls skip the dispatcher's overhead).
decode_mlp_quantized = torch.library.custom_op("sparsemoe::decode_mlp_quantized", _decode_mlp_quantized, mutates_args=())


@decode_mlp_quantized.register_fake
def _decode_mlp_quantized_fake(x_TD, token_ids, weights, offsets, in_data, in_scale, out_data, out_scale, scheme,
                               group_size, hidden_dim, activation):
    return x_TD.new_empty(x_TD.shape, dtype=torch.float32)


def kernel_forward(x_TD: Tensor, token_ids: Tensor, weights: Tensor, offsets: Tensor, experts: QuantizedExperts) -> Tensor:
    """y [T, D] float32 from the native quantized decode kernel (plan rows sorted by expert, as
    `cpu_kernels.decode_mlp`). Check `kernel_applies` first."""
    op = decode_mlp_quantized if torch.compiler.is_compiling() else _decode_mlp_quantized
    # The stored tensors straight from the module dictionaries: nn.Module's attribute lookup for the eight
    # below costs 6 us, a tenth of a one-token step on the small shapes (tools/quant_call_cost.py).
    w_in, w_out = experts._modules["w_in"]._buffers, experts._modules["w_out"]._buffers
    scheme = experts.scheme
    return op(x_TD, token_ids, weights, offsets, w_in["data"], w_in["scale"], w_out["data"], w_out["scale"],
              scheme.name, scheme.group_size, experts.hidden_dim, experts.activation)


def kernel_forward_choices(x_TD: Tensor, expert_ids: Tensor, weights: Tensor, top_k: int, experts: QuantizedExperts) -> Tensor:
    """`kernel_forward` from a router's token-major top-k choices ([T*K] each), the rows grouped by expert inside
    the call (the plan's rows, in its order: the same result); eager CPU tensors only (no op for the compiler).
    Check `kernel_applies` first."""
    w_in, w_out = experts._modules["w_in"]._buffers, experts._modules["w_out"]._buffers
    scheme = experts.scheme
    return cpu_kernels.decode_mlp_quantized_choices(
        x_TD, expert_ids, weights, top_k, (w_in["data"], w_in["scale"]), (w_out["data"], w_out["scale"]), scheme.name,
        scheme.group_size, experts.hidden_dim, experts.activation,
    )  # fmt: skip


def is_inference(x_TD: Tensor, experts: QuantizedExperts) -> bool:
    """No gradient to x and no dropout: what the paths that compute without autograd need."""
    return not (torch.is_grad_enabled() and x_TD.requires_grad) and not (experts.dropout > 0 and experts.training)


def kernel_applies(x_TD: Tensor, experts: QuantizedExperts, rows: int) -> bool:
    """Whether the native quantized kernel runs `rows` plan rows of x: inference (no gradient to x, no
    dropout), few rows per expert, a CPU input in float32 or bfloat16, a compiled kernel."""
    return (
        rows <= cpu_kernels.QUANT_KERNEL_MAX_ROWS.get(x_TD.dtype, {}).get(experts.scheme.name, 0) * experts.num_experts
        and is_inference(x_TD, experts)
        and experts.activation in cpu_kernels.ACTIVATION_CODES
        and cpu_kernels.supports_quantized(x_TD, experts.w_in.data)
    )


def dense_forward(x_TD: Tensor, experts: QuantizedExperts) -> Tensor:
    """Expert 0 on every row of x [T, D] -> [T, D] in x's dtype: the native quantized kernel for a few rows
    (weights read once, in their stored bytes), else the dequantized MLP (BLAS)."""
    T = x_TD.shape[0]
    if not kernel_applies(x_TD, experts, T):
        return experts.expert(x_TD, 0)
    rows = torch.arange(T, device=x_TD.device)
    ones = torch.ones(T, dtype=torch.float32, device=x_TD.device)
    offsets = torch.full((1,), T, dtype=torch.int64, device=x_TD.device)
    return kernel_forward(x_TD, rows, ones, offsets, experts).to(x_TD.dtype)
