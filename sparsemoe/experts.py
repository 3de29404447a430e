"""Expert weights stored stacked, and the expert MLP's activations.

Legend: E experts, D model width, F expert hidden width, I in-projection rows (2F gated, F otherwise).

Layout (nn.Linear's [out, in] per expert, the same as Hugging Face's Mixtral experts):
    w_in  [E, I, D]   gated activations: rows [0, F) are the gate, rows [F, 2F) the up projection
    w_out [E, D, F]
Initialisation: nn.Linear's default per expert, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = D for
w_in and F for w_out, so each expert starts like an ordinary feed-forward block.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparsemoe.config import GATED_ACTIVATIONS


def activate(h: Tensor, activation: str) -> Tensor:
    """Apply the expert activation to in-projection outputs h [..., I] -> [..., F]."""
    if activation in GATED_ACTIVATIONS:
        gate, up = h.chunk(2, dim=-1)
        act = F.silu(gate) if activation == "swiglu" else F.gelu(gate, approximate="tanh")
        return act * up
    if activation == "relu":
        return F.relu(h)
    return F.gelu(h, approximate="tanh")


def in_rows(hidden_dim: int, activation: str) -> int:
    return 2 * hidden_dim if activation in GATED_ACTIVATIONS else hidden_dim


def mlp(x: Tensor, w_in: Tensor, w_out: Tensor, activation: str, dropout: float = 0.0, training: bool = False) -> Tensor:
    """One expert-shaped MLP on rows x [R, D]: w_in [I, D], w_out [D, F] -> [R, D]."""
    h = activate(x @ w_in.t(), activation)
    if dropout > 0 and training:
        h = F.dropout(h, dropout, training=True)
    return h @ w_out.t()


class Experts(nn.Module):
    """E expert MLPs as two stacked parameters (never a ModuleList on the fast path)."""

    def __init__(
        self,
        num_experts: int,
        dim: int,
        hidden_dim: int,
        activation: str,
        dropout: float = 0.0,
        recompute_activations: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self.num_experts, self.dim, self.hidden_dim = num_experts, dim, hidden_dim
        self.activation = activation
        self.dropout = dropout
        self.recompute_activations = recompute_activations  # read by the dispatch backends
        factory = {"device": device, "dtype": dtype}
        self.w_in = nn.Parameter(torch.empty(num_experts, in_rows(hidden_dim, activation), dim, **factory))
        self.w_out = nn.Parameter(torch.empty(num_experts, dim, hidden_dim, **factory))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.uniform_(self.w_in, -1 / math.sqrt(self.dim), 1 / math.sqrt(self.dim))
        nn.init.uniform_(self.w_out, -1 / math.sqrt(self.hidden_dim), 1 / math.sqrt(self.hidden_dim))

    def cast(self, dtype: torch.dtype) -> "ExpertView":
        """The experts with weights cast to `dtype` (a differentiable cast), for autocast regions."""
        return ExpertView(
            self.w_in.to(dtype), self.w_out.to(dtype), self.activation, self.dropout, self.training,
            self.recompute_activations,
        )  # fmt: skip

    def expert(self, x: Tensor, e: int) -> Tensor:
        """Expert e applied to rows x [R, D] -> [R, D] (used by the reference backend)."""
        return mlp(x, self.w_in[e], self.w_out[e], self.activation, self.dropout, self.training)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, dim={self.dim}, hidden_dim={self.hidden_dim}, activation={self.activation}"


@dataclass
class ExpertView:
    """What a dispatch backend reads from `Experts`, with the weights already in the compute dtype."""

    w_in: Tensor  # [E, I, D]
    w_out: Tensor  # [E, D, F]
    activation: str
    dropout: float
    training: bool
    recompute_activations: bool

    def expert(self, x: Tensor, e: int) -> Tensor:
        return mlp(x, self.w_in[e], self.w_out[e], self.activation, self.dropout, self.training)

    def cast(self, dtype: torch.dtype) -> "ExpertView":
        """The same view with the weights cast to `dtype` (differentiably), as `Experts.cast`."""
        return replace(self, w_in=self.w_in.to(dtype), w_out=self.w_out.to(dtype))


class SharedExperts(Experts):
    """Always-on experts (DeepSeek-MoE) fused into one MLP of width `hidden_dim`, optionally gated.

    Qwen-MoE scales the shared output by sigmoid(x . gate_weight); DeepSeek does not.
    """

    def __init__(self, dim: int, hidden_dim: int, activation: str, gated_output: bool, dropout: float = 0.0, device=None, dtype=None) -> None:
        super().__init__(1, dim, hidden_dim, activation, dropout, device=device, dtype=dtype)
        self.gate_weight = None
        if gated_output:
            self.gate_weight = nn.Parameter(torch.zeros(1, dim, device=device, dtype=dtype))

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if getattr(self, "gate_weight", None) is not None:  # unset while Experts.__init__ runs
            nn.init.zeros_(self.gate_weight)

    def forward(self, x_TD: Tensor) -> Tensor:
        y = self.expert(x_TD, 0)
        if self.gate_weight is not None:
            y = torch.sigmoid(x_TD @ self.gate_weight.t()) * y
        return y
