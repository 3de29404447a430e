"""Routers: token-choice top-k (softmax or sigmoid), group-limited top-k, and expert-choice.

Legend: T tokens, D model width, E experts, K experts per token, C tokens per expert (expert-choice),
N assignments (token, expert) pairs: N = T*K for token-choice, E*C for expert-choice.

All router math runs in float32 whatever the activations' dtype. A router produces a `RoutingResult`:
a flat list of assignments plus the scores the balancing losses need. Capacity (dropping) is applied
afterwards, once, by `sparsemoe.dispatch.plan.build_plan`, so that every backend sees the same drops.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparsemoe.amp import autocast_dtype
from sparsemoe.config import MoEConfig
from sparsemoe.ops import small_kernels
from sparsemoe.ops.linear import linear_float32


@dataclass
class RoutingResult:
    token_ids: Tensor  # [N] long: the token of each assignment
    expert_ids: Tensor  # [N] long: the expert of each assignment
    weights: Tensor  # [N] float32: combine weight; carries the router's gradient
    probs: Tensor  # [T, E] float32: per-token scores normalised to sum 1 (balancing losses, entropy)
    logits: Tensor  # [T, E] float32: raw router logits (z-loss)
    top_k: int  # K; for token-choice, assignment n = t*K + k (token-major)
    expert_choice: bool  # True: assignments are expert-major, n = e*C + c, exactly C per expert

    @property
    def num_tokens(self) -> int:
        return self.logits.shape[0]

    @property
    def num_experts(self) -> int:
        return self.logits.shape[1]


# Router state kept in float32 whatever dtype the module is cast to (see Router._apply).
_FLOAT32_BUFFERS = ("expert_bias", "pending_load")


class Router(nn.Module):
    """Linear router D -> E (no bias), optional learned noise, and the aux-loss-free selection bias.

    Parameters: `weight` [E, D] (nn.Linear layout); `noise_weight` [E, D] for Gaussian noisy top-k.
    Buffer: `expert_bias` [E] float32, added to the scores for selection only (bias balancing); with
    bias_update="step" also `pending_load` [E] float32 (not saved): the load counted since the last update.
    """

    def __init__(self, config: MoEConfig, device=None, dtype=None) -> None:
        super().__init__()
        E, D = config.num_experts, config.dim
        self.weight = nn.Parameter(torch.empty(E, D, device=device, dtype=dtype))
        self.noise_weight: Optional[nn.Parameter] = None
        if config.noise == "gaussian":
            self.noise_weight = nn.Parameter(torch.empty(E, D, device=device, dtype=dtype))
        self.register_buffer("expert_bias", torch.zeros(E, device=device, dtype=torch.float32))
        self.register_buffer("pending_load", None, persistent=False)
        self.set_config(config)
        self.reset_parameters()

    def set_config(self, config: MoEConfig) -> None:
        """Adopt `config` (same experts and width): the step-mode load counter is made (zero, beside the
        selection bias, on its device) or dropped to match its bias_update."""
        self.config = config
        counting = config.bias_balancing and config.bias_update == "step"
        self.pending_load = torch.zeros_like(self.expert_bias, dtype=torch.float32) if counting else None

    def _apply(self, fn, recurse=True):
        """Follow `.to()`, `.cuda()`, `to_empty()`... but keep the float32 buffers float32 (and their values
        exact) when the module is cast to another dtype: in bfloat16 a bias of 1 would no longer move by
        1e-3 steps, and counts past 256 would be rounded."""
        kept = {name: self._buffers[name] for name in _FLOAT32_BUFFERS if self._buffers.get(name) is not None}
        super()._apply(fn, recurse)
        for name, old in kept.items():
            new = self._buffers[name]
            if new.dtype != torch.float32:
                self._buffers[name] = new.float() if old.is_meta else old.to(new.device)
        return self

    def reset_parameters(self) -> None:
        """Weights to N(0, router_init_std), noise weights and the selection bias to zero."""
        nn.init.normal_(self.weight, std=self.config.router_init_std)
        if self.noise_weight is not None:
            # Shazeer et al. start with zero noise weights: the noise scale is learned from softplus(0).
            nn.init.zeros_(self.noise_weight)
        with torch.no_grad():
            self.expert_bias.zero_()
            if self.pending_load is not None:
                self.pending_load.zero_()

    def logits(self, x_TD: Tensor) -> Tensor:
        """Router logits [T, E] in float32, with the training-time noise that acts on logits or input."""
        device_type = x_TD.device.type
        if autocast_dtype(device_type) is None:  # entering the context costs a decode step ~10 us
            return self._logits_fp32(x_TD)
        with torch.autocast(device_type, enabled=False):  # router math stays float32 under autocast
            return self._logits_fp32(x_TD)

    def _logits_fp32(self, x_TD: Tensor) -> Tensor:
        cfg = self.config
        if not self.training:  # no noise: at decode sizes one native call (sparsemoe.ops.linear)
            return linear_float32(x_TD, self.weight)
        x32 = x_TD.float()
        if cfg.noise == "jitter":
            x32 = x32 * torch.empty_like(x32).uniform_(1.0 - cfg.noise_eps, 1.0 + cfg.noise_eps)
        logits = x32 @ self.weight.float().t()
        if self.noise_weight is not None:
            noise_std = F.softplus(x32 @ self.noise_weight.float().t())
            logits = logits + torch.randn_like(logits) * noise_std
        return logits

    def route(self, logits_TE: Tensor, capacity: Optional[int] = None) -> RoutingResult:
        """Assign tokens to experts from float32 logits. `capacity` is C for expert-choice."""
        cfg = self.config
        if cfg.router == "expert_choice":
            return expert_choice(logits_TE, cfg, capacity or 1)
        return token_choice(logits_TE, cfg, self.training, self.expert_bias if cfg.bias_balancing else None)


# A fused top-k router kernel, registered by the Triton backend when Triton is importable:
# (fused_topk(logits, top_k, score_func, score_order, renormalize, route_scale, bias) -> (ids_TK, weights_TK),
#  available(logits) -> bool).
_fused_topk: Optional[tuple[Callable, Callable[[Tensor], bool]]] = None


def register_fused_topk(fused_topk: Callable, available: Callable[[Tensor], bool]) -> None:
    global _fused_topk
    _fused_topk = (fused_topk, available)


def _fused_topk_applies(logits_TE: Tensor, cfg: MoEConfig, training: bool, bias_E: Optional[Tensor]) -> bool:
    """The fused kernel computes plain top-k routing; it does not apply where selection is perturbed."""
    if _fused_topk is None or cfg.router != "topk" or not _fused_topk[1](logits_TE):
        return False
    if bias_E is not None and cfg.bias_on_probs:  # the kernel biases softmax logits only
        return False
    return not (training and (cfg.noise == "gumbel" or cfg.expert_dropout > 0))


def _scores(logits: Tensor, score_func: str) -> Tensor:
    return torch.softmax(logits, dim=-1) if score_func == "softmax" else torch.sigmoid(logits)


def normalised_probs(logits_TE: Tensor, score_func: str, scores_TE: Optional[Tensor] = None) -> Tensor:
    """Per-token scores over all experts that sum to 1: softmax, or sigmoid scores normalised.

    scores_TE: the softmax or sigmoid of logits_TE when the caller has it already.
    """
    if scores_TE is None:
        scores_TE = _scores(logits_TE, score_func)
    if score_func == "softmax":
        return scores_TE
    return scores_TE / scores_TE.sum(dim=-1, keepdim=True).clamp_min(1e-20)


def expert_dropout_mask(num_experts: int, top_k: int, p: float, device) -> Tensor:
    """Keep-mask [E] bool: each expert dropped with probability p, but at least top_k always kept.

    Static-shape (no data-dependent branch): the top_k experts with the highest draw are always kept.
    """
    draw = torch.rand(num_experts, device=device)
    keep = draw >= p
    always = torch.zeros_like(keep).scatter_(0, draw.topk(top_k).indices, True)
    return keep | always


def group_limit(key_TE: Tensor, num_groups: int, topk_groups: int, group_score: str) -> Tensor:
    """Mask (-inf) the experts outside each token's best `topk_groups` groups (DeepSeek-V3)."""
    T, E = key_TE.shape
    grouped = key_TE.view(T, num_groups, E // num_groups)
    if group_score == "top2_sum" and grouped.shape[-1] >= 2:
        score_TG = grouped.topk(2, dim=-1).values.sum(dim=-1)
    else:
        score_TG = grouped.max(dim=-1).values
    keep_groups = score_TG.topk(topk_groups, dim=-1).indices
    group_mask = torch.zeros_like(score_TG, dtype=torch.bool).scatter_(1, keep_groups, True)
    expert_mask = group_mask.unsqueeze(-1).expand_as(grouped).reshape(T, E)
    return key_TE.masked_fill(~expert_mask, float("-inf"))


def _native_topk(logits_TE: Tensor, cfg: MoEConfig, training: bool, bias_E: Optional[Tensor]):
    """(ids, weights, probs) of plain top-k routing from the native CPU kernel, or None where it does not
    apply (a perturbed or biased selection, other score orders, autograd, not a CPU tensor)."""
    if cfg.router != "topk" or cfg.score_order != "before_topk" or bias_E is not None:
        return None
    if training and (cfg.noise == "gumbel" or cfg.expert_dropout > 0):
        return None
    return small_kernels.topk_route(logits_TE, cfg.top_k, cfg.score_func, cfg.renormalize, cfg.route_scale)


def token_choice(logits_TE: Tensor, cfg: MoEConfig, training: bool, bias_E: Optional[Tensor]) -> RoutingResult:
    """Each token picks its K experts. Selection may use noise and bias; weights never use the bias."""
    T, E = logits_TE.shape
    K = cfg.top_k
    if _fused_topk_applies(logits_TE, cfg, training, bias_E):
        fused, _ = _fused_topk
        ids_TK, weights_TK = fused(logits_TE, K, cfg.score_func, cfg.score_order, cfg.renormalize, cfg.route_scale, bias_E)
        return _token_choice_result(logits_TE, ids_TK, weights_TK, cfg)
    native = _native_topk(logits_TE, cfg, training, bias_E)
    if native is not None:  # one native pass (inference, CPU)
        ids_TK, weights_TK, probs_TE = native
        return RoutingResult(
            token_ids=assignment_tokens(T, K, logits_TE.device), expert_ids=ids_TK.view(-1),
            weights=weights_TK.view(-1), probs=probs_TE, logits=logits_TE, top_k=K, expert_choice=False,
        )  # fmt: skip
    logits = logits_TE
    if training and cfg.expert_dropout > 0:
        keep_E = expert_dropout_mask(E, K, cfg.expert_dropout, logits.device)
        logits = logits.masked_fill(~keep_E, float("-inf"))  # routing renormalises over the kept experts

    if cfg.score_order == "after_topk":
        weight_src = logits  # weights: softmax over the K chosen logits
        key = logits
    else:
        weight_src = _scores(logits, cfg.score_func)  # weights: the chosen experts' scores
        key = weight_src
    noisy = None
    if training and cfg.noise == "gumbel":
        # Gumbel-top-k samples the selection; the weights stay those of the clean scores.
        gumbel = -torch.empty_like(logits).exponential_().log()
        noisy = logits + cfg.noise_eps * gumbel
        key = noisy if cfg.score_order == "after_topk" else _scores(noisy, cfg.score_func)
    if bias_E is not None:
        # The bias moves selection only. DeepSeek-V3 adds it to sigmoid scores; for softmax it is added
        # to the logits (a multiplicative nudge on probabilities), which stays effective when the
        # probabilities are peaked instead of oscillating, unless bias_on_probs asks for ERNIE 4.5's way.
        on_scores = cfg.score_func == "sigmoid" or cfg.bias_on_probs
        key = key + bias_E if on_scores else (noisy if noisy is not None else logits) + bias_E
    if cfg.router == "group_limited":
        key = group_limit(key, cfg.num_groups, cfg.topk_groups, cfg.group_score)

    expert_ids_TK = key.topk(K, dim=-1).indices
    chosen_TK = weight_src.gather(1, expert_ids_TK)
    if cfg.score_order == "after_topk":
        weights_TK = torch.softmax(chosen_TK, dim=-1)
    elif cfg.renormalize:
        weights_TK = chosen_TK / chosen_TK.sum(dim=-1, keepdim=True).clamp_min(1e-20)
    else:
        weights_TK = chosen_TK
    if cfg.route_scale != 1.0:
        weights_TK = weights_TK * cfg.route_scale

    scores = weight_src if cfg.score_order == "before_topk" else None  # the scores of `logits`: reused
    return _token_choice_result(logits, expert_ids_TK, weights_TK, cfg, raw_logits_TE=logits_TE, scores_TE=scores)


def assignment_tokens(T: int, K: int, device) -> Tensor:
    """[T*K] long: the token of each token-major assignment n = t*K + k, i.e. t."""
    return torch.arange(T, device=device).unsqueeze(1).expand(T, K).reshape(-1)


def _token_choice_result(
    logits_TE: Tensor,
    ids_TK: Tensor,
    weights_TK: Tensor,
    cfg: MoEConfig,
    raw_logits_TE: Optional[Tensor] = None,
    scores_TE: Optional[Tensor] = None,
) -> RoutingResult:
    """Flatten [T, K] choices token-major; probs from the (possibly expert-dropped) logits, or their scores."""
    T, K = ids_TK.shape
    return RoutingResult(
        token_ids=assignment_tokens(T, K, logits_TE.device),
        expert_ids=ids_TK.reshape(-1),
        weights=weights_TK.reshape(-1),
        probs=normalised_probs(logits_TE, cfg.score_func, scores_TE),
        logits=logits_TE if raw_logits_TE is None else raw_logits_TE,
        top_k=K,
        expert_choice=False,
    )


def expert_choice(logits_TE: Tensor, cfg: MoEConfig, capacity: int) -> RoutingResult:
    """Each expert takes its top-C tokens by score (Zhou et al. 2022).

    Not causal: whether a token is chosen depends on the other tokens in the batch, future ones
    included, so it must not be used where a decoder generates one token at a time.
    """
    T, E = logits_TE.shape
    scores_TE = _scores(logits_TE, cfg.score_func)
    values_EC, token_ids_EC = scores_TE.t().topk(capacity, dim=-1)
    weights = values_EC.reshape(-1)
    if cfg.route_scale != 1.0:
        weights = weights * cfg.route_scale
    expert_ids = torch.arange(E, device=logits_TE.device).repeat_interleave(capacity)
    return RoutingResult(
        token_ids=token_ids_EC.reshape(-1),
        expert_ids=expert_ids,
        weights=weights,
        probs=normalised_probs(logits_TE, cfg.score_func),
        logits=logits_TE,
        top_k=cfg.top_k,
        expert_choice=True,
    )
