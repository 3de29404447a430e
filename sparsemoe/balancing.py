"""Load balancing: auxiliary losses, router z-loss, aux-loss-free bias updates, and loss injection.

Legend: T tokens, E experts, K experts per token, B sequences of S tokens (T = B*S).

Every loss is computed from the router's own outputs (a `RoutingResult`), once per forward, and
returned as a value; nothing is kept in module-level state. How the losses reach the gradient:

* ``aux_loss_mode="inject"`` (default): `AddAuxiliaryLoss` attaches the weighted loss to the layer's
  output in the autograd graph. Its forward is the identity; its backward passes the output gradient
  through and gives the loss a gradient of `scale` (1 by default), exactly as if `scale * loss` had
  been added to the final training loss. The values the layer exposes are detached, so adding them to
  the loss again changes the number you log but cannot double the gradient.
* ``aux_loss_mode="return"``: nothing is injected; `layer.aux_loss` carries the graph and you add it.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def tokens_per_expert(expert_ids: Tensor, num_experts: int) -> Tensor:
    """Float32 [E] count of assignments per expert (ids >= E, i.e. dropped, are ignored)."""
    counts = torch.zeros(num_experts + 1, device=expert_ids.device, dtype=torch.float32)
    counts.scatter_add_(0, expert_ids.clamp(max=num_experts), torch.ones_like(expert_ids, dtype=torch.float32))
    return counts[:num_experts]


def switch_aux_loss(probs_TE: Tensor, counts_E: Tensor, top_k: int) -> Tensor:
    """Switch/GShard load-balancing loss  E * sum_e f_e * P_e.

    f_e: fraction of the T*K selections that went to expert e (no gradient); P_e: mean router
    probability of expert e (carries the gradient). Equals 1 when routing is perfectly uniform.
    """
    T, E = probs_TE.shape
    f_E = counts_E / max(T * top_k, 1)
    P_E = probs_TE.mean(dim=0)
    return E * (f_E * P_E).sum()


def sequence_aux_loss(probs_TE: Tensor, expert_ids_TK: Tensor, seq_len: int) -> Tensor:
    """DeepSeek-V3 sequence-wise balance loss, averaged over the B = T/S sequences.

    Per sequence: f_e = E/(K*S) * (selections of e in the sequence), P_e = mean probability of e over
    the sequence; loss = sum_e f_e P_e. Equals 1 when every sequence is routed uniformly.
    """
    T, E = probs_TE.shape
    K = expert_ids_TK.shape[1]
    B = T // seq_len
    one_hot = torch.zeros(B, seq_len * K, E, device=probs_TE.device, dtype=torch.float32)
    one_hot.scatter_(2, expert_ids_TK.reshape(B, seq_len * K, 1), 1.0)
    f_BE = one_hot.sum(dim=1) * (E / (K * seq_len))
    P_BE = probs_TE.reshape(B, seq_len, E).mean(dim=1)
    return (f_BE * P_BE).sum(dim=-1).mean()


def router_z_loss(logits_TE: Tensor) -> Tensor:
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2 (keeps logits small)."""
    return torch.logsumexp(logits_TE, dim=-1).square().mean()


def router_entropy(probs_TE: Tensor) -> Tensor:
    """Mean per-token entropy (nats) of the normalised router scores."""
    return -(probs_TE * probs_TE.clamp_min(1e-20).log()).sum(dim=-1).mean()


@torch.no_grad()
def update_expert_bias(bias_E: Tensor, counts_E: Tensor, rate: float) -> None:
    """Aux-loss-free balancing (DeepSeek-V3): b_e += rate * sign(mean load - load_e), in place.

    Overloaded experts become less likely to be selected, underloaded ones more; the bias never
    touches the combine weights and never enters autograd.
    """
    bias_E.add_(rate * torch.sign(counts_E.mean() - counts_E))


class AddAuxiliaryLoss(torch.autograd.Function):
    """Identity on `x` whose backward also gives `loss` the gradient `scale`.

    Attach a loss to an activation so that it reaches the parameters without the training loop
    adding it: `y = AddAuxiliaryLoss.apply(y, loss, scale)`.
    """

    @staticmethod
    def forward(ctx, x: Tensor, loss: Tensor, scale: float = 1.0) -> Tensor:
        ctx.scale = scale
        ctx.loss_dtype = loss.dtype
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad_x: Tensor):
        grad_loss = torch.full((), ctx.scale, dtype=ctx.loss_dtype, device=grad_x.device)
        return grad_x, grad_loss, None


def balance_losses(
    probs_TE: Tensor,
    logits_TE: Tensor,
    expert_ids: Tensor,
    counts_E: Tensor,
    top_k: int,
    seq_len: Optional[int],
    aux_coef: float,
    seq_aux_coef: float,
    z_coef: float,
) -> dict[str, Tensor]:
    """The weighted losses in force (coefficient already applied); absent ones are omitted."""
    losses: dict[str, Tensor] = {}
    if aux_coef > 0:
        losses["aux_loss"] = aux_coef * switch_aux_loss(probs_TE, counts_E, top_k)
    if seq_aux_coef > 0:
        T = probs_TE.shape[0]
        S = seq_len if seq_len and T % seq_len == 0 else T
        losses["seq_aux_loss"] = seq_aux_coef * sequence_aux_loss(probs_TE, expert_ids.view(T, top_k), S)
    if z_coef > 0:
        losses["z_loss"] = z_coef * router_z_loss(logits_TE)
    return losses
