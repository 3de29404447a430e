"""The MoE layer: router -> plan -> dispatch backend -> combine (+ shared experts) + balancing losses.

A drop-in replacement for a transformer's feed-forward block: `MoE(cfg)(x)` maps [..., D] -> [..., D].
Legend: T tokens (all leading dimensions flattened), D model width, E experts, K experts per token.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Optional, Union

import torch
from torch import Tensor, nn

from sparsemoe.amp import autocast_dtype
from sparsemoe.balancing import (
    AddAuxiliaryLoss,
    balance_losses,
    router_entropy,
    router_z_loss,
    tokens_per_expert,
    update_expert_bias,
)
from sparsemoe.config import MoEConfig
from sparsemoe.dispatch import DispatchPlan, build_plan, run_backend, run_from_choices
from sparsemoe.experts import Experts, SharedExperts
from sparsemoe.ops import small_kernels
from sparsemoe.routing import Router, RoutingResult

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


@dataclass
class MoEStats:
    """Per-forward statistics: detached tensors, no device-to-host sync (call `.item()` to log)."""

    tokens_per_expert: Tensor  # [E] float32: kept assignments per expert
    dropped_fraction: Tensor  # 0-dim: share of assignments dropped by capacity
    router_entropy: Tensor  # 0-dim: mean entropy (nats) of the normalised router scores
    load_imbalance: Tensor  # 0-dim: max / mean of tokens_per_expert (1 = perfectly balanced)
    losses: dict[str, Tensor] = field(default_factory=dict)  # weighted losses: aux_loss, seq_aux_loss, z_loss

    def as_floats(self) -> dict[str, float]:
        """Scalars for logging (this syncs)."""
        out = {
            "dropped_fraction": self.dropped_fraction.item(),
            "router_entropy": self.router_entropy.item(),
            "load_imbalance": self.load_imbalance.item(),
        }
        out.update({k: v.item() for k, v in self.losses.items()})
        return out


class MoE(nn.Module):
    """Sparse Mixture-of-Experts feed-forward layer.

    After each forward:
      * `aux_loss`: the sum of the weighted balancing losses (0-dim float32). With
        aux_loss_mode="inject" it is detached (its gradient was already injected); with "return" it
        carries the graph and must be added to the training loss.
      * `stats`: a `MoEStats`.
    After a forward without gradients (inference) both are computed when first read, so a decode step
    that never reads them does not pay for them (unless a training-mode bias update needs the load now);
    with gradients, and under torch.compile, they are computed in the forward.
    `aux_loss_scale` multiplies the injected gradient (set it to 1/n under n-step gradient accumulation).
    """

    def __init__(self, config: Optional[MoEConfig] = None, *, device=None, dtype=None, **fields) -> None:
        super().__init__()
        if config is None:
            config = MoEConfig(**fields)
        elif fields:
            raise TypeError("MoE takes a MoEConfig or keyword fields, not both")
        self.config = config
        self.router = Router(config, device=device, dtype=dtype)
        self.experts = Experts(
            config.num_experts,
            config.dim,
            config.hidden_dim,
            config.activation,
            config.dropout,
            config.recompute_activations,
            device=device,
            dtype=dtype,
        )
        self.shared_experts: Optional[SharedExperts] = None
        if config.num_shared_experts > 0:
            self.shared_experts = SharedExperts(
                config.dim, config.shared_dim, config.activation, config.shared_expert_gate, config.dropout, device=device, dtype=dtype
            )
        self.aux_loss_scale = 1.0
        self.aux_loss: Tensor = torch.zeros(())
        # The last forward's MoEStats, or what they are computed from until first read (see `stats`).
        # (The plan is None where a decode step ran from the router's choices: built when the stats are read.)
        self._stats_state: Union[MoEStats, tuple[RoutingResult, Optional[DispatchPlan], Union[dict[str, Tensor], int]], None] = None
        # Hook for expert parallelism: reduces per-expert counts across ranks before the bias update.
        self.reduce_counts = None

    def reset_parameters(self) -> None:
        """Router, experts and shared experts to their initial values (and the selection bias to zero).

        With `to_empty()`, this initialises a layer built on the meta device: build without memory, allocate
        on the target device, then initialise there.
        """
        self.router.reset_parameters()
        self.experts.reset_parameters()
        if self.shared_experts is not None:
            self.shared_experts.reset_parameters()

    # --- forward ---------------------------------------------------------------------------------------
    # Subclasses (e.g. the expert-parallel layer) override the hooks `_route`, `_dispatch`, `_balance`.
    _runs_empty_batches = False  # True: an empty input still runs every step (collectives must match)

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        cfg = self.config
        lead_shape = x.shape[:-1]
        x_TD = x.reshape(-1, cfg.dim)
        T = x_TD.shape[0]
        if T == 0 and not self._runs_empty_batches:
            self.aux_loss = x.new_zeros((), dtype=torch.float32)
            self._stats_state = None
            return x * 0  # empty: costs nothing, and stays in the graph of an input that requires grad
        seq_len = x.shape[-2] if x.dim() >= 3 and x.shape[-2] > 0 else max(T, 1)

        self._check_not_recomputing()
        logits_TE = self.router.logits(x_TD)
        self._check_finite(logits_TE, "router logits are", lambda: "check the input and the router weights")
        capacity = cfg.capacity(T, self.training) if T else None
        routing = self._route(logits_TE, capacity)
        plan: Optional[DispatchPlan] = None
        y_TD = self._decode_from_choices(x_TD, routing) if capacity is None else None
        if y_TD is None:
            plan = build_plan(routing, capacity, cfg.capacity_priority)
            y_TD = self._dispatch(x_TD, plan)
        if self.shared_experts is not None:
            y_TD = y_TD + self.shared_experts(x_TD).float()
        y = y_TD.to(x.dtype).reshape(*lead_shape, cfg.dim)
        self._check_finite(
            y.reshape(T, cfg.dim), "output is",
            lambda: f"the router logits were finite, so the experts overflowed {y.dtype} (input magnitude up to "
            f"{x_TD.detach().abs().max().item():.3g}); check the input's scale and the expert weights",
        )  # fmt: skip

        # Without gradients the balancing losses and the statistics are computed when first read (a decode
        # step reads neither), unless the bias update needs the load now; with gradients now, so that the
        # layer never holds on to the autograd graph; under the compiler now.
        lazy = not (routing.probs.requires_grad or torch.compiler.is_compiling())
        if lazy and self._lazy_balance and not (self.training and cfg.bias_balancing):
            self._aux_loss, self._stats_state = None, (routing, plan, seq_len)
            return y
        losses, load_E = self._balance(routing, seq_len)
        total = self._total(losses, logits_TE)
        if cfg.aux_loss_mode == "inject" and total.requires_grad:
            y = AddAuxiliaryLoss.apply(y, total, self.aux_loss_scale)
            total = total.detach()
            losses = {k: v.detach() for k, v in losses.items()}
        self.aux_loss = total
        self._stats_state = (routing, plan, losses) if lazy else self._compute_stats(routing, plan, losses)
        if load_E is not None:
            self._record_load(load_E)
        return y

    _lazy_balance = True  # False where computing the losses takes part in collectives (expert parallelism)

    @staticmethod
    def _total(losses: dict[str, Tensor], like: Tensor) -> Tensor:
        terms = list(losses.values())
        return sum(terms[1:], terms[0]) if terms else like.new_zeros((), dtype=torch.float32)

    @property
    def aux_loss(self) -> Tensor:
        """The last forward's weighted balancing losses summed (see the class docstring)."""
        if self.__dict__.get("_aux_loss") is None and isinstance(self._stats_state, tuple):
            self._settle_balance()
        return self._aux_loss

    @aux_loss.setter
    def aux_loss(self, value: Tensor) -> None:
        self.__dict__["_aux_loss"] = value

    def _settle_balance(self) -> None:
        """The losses of a forward that deferred them (inference), from its routing."""
        routing, plan, seq_len = self._stats_state
        losses, _ = self._balance(routing, seq_len)
        self.__dict__["_aux_loss"] = self._total(losses, routing.logits)
        self._stats_state = (routing, plan, losses)

    def _record_load(self, load_E: Tensor) -> None:
        """Bias balancing after a training forward: move the bias now, or count the load for `update_bias`."""
        if self.config.bias_update == "forward":
            update_expert_bias(self.router.expert_bias, load_E, self.config.bias_update_rate)
        elif not _in_backward():  # a recomputed forward's tokens were counted by the first one
            self.router.pending_load.add_(load_E)

    def _check_not_recomputing(self) -> None:
        """Refuse a recomputed forward (activation checkpointing) after a forward that moved the bias.

        Checked before routing: the recomputation may stop as soon as it has what the backward needs.
        """
        cfg = self.config
        if cfg.bias_balancing and cfg.bias_update == "forward" and self.training and _in_backward():
            raise RuntimeError(
                "MoE bias balancing with bias_update='forward' runs under activation checkpointing: the "
                "first forward moved the selection bias, so the recomputed forward would route tokens to "
                "other experts than the gradient belongs to. Use bias_update='step' and call "
                "sparsemoe.update_expert_biases(model) after each optimizer step."
            )

    def set_bias_update(self, mode: str) -> None:
        """Switch when the selection bias moves, "forward" or "step" (MoEConfig.bias_update), e.g. on a loaded
        model before activation checkpointing. Load counted in step mode is applied first, not lost."""
        config = replace(self.config, bias_update=mode)  # validates
        self.update_bias()
        self.config = config
        self.router.set_config(config)

    def update_bias(self) -> bool:
        """bias_update="step": move the selection bias once by the load counted since the last call (the sum
        over every training forward since, micro-batches together), then reset the count. False (nothing
        done) for a layer in another mode.
        """
        pending = self.router.pending_load
        if pending is None:
            return False
        update_expert_bias(self.router.expert_bias, pending, self.config.bias_update_rate)
        pending.zero_()
        return True

    # --- hooks -------------------------------------------------------------------------------------------
    def _route(self, logits_TE: Tensor, capacity: Optional[int]) -> RoutingResult:
        return self.router.route(logits_TE, capacity)

    def _dispatch(self, x_TD: Tensor, plan: DispatchPlan) -> Tensor:
        """Routed experts' combined output, float32 [T, D]."""
        return run_backend(self.config.backend, x_TD, plan, self.experts)

    def _decode_from_choices(self, x_TD: Tensor, routing: RoutingResult) -> Optional[Tensor]:
        """A decode step's expert stage straight from the router's choices (one native call, no plan; the plan
        is built if the statistics are read), or None: then the plan and `_dispatch`. Not where a subclass
        dispatches its own way (expert parallelism)."""
        if type(self)._dispatch is not MoE._dispatch:
            return None
        return run_from_choices(self.config.backend, x_TD, routing, self.experts)

    def _balance(self, routing: RoutingResult, seq_len: int) -> tuple[dict[str, Tensor], Optional[Tensor]]:
        """(weighted losses by name, per-expert load for the bias update or None when no update is due)."""
        cfg = self.config
        if routing.expert_choice:  # balanced by construction: only the z-loss applies
            return ({"z_loss": cfg.z_loss_coef * router_z_loss(routing.logits)} if cfg.z_loss_coef > 0 else {}), None
        counts = tokens_per_expert(routing.expert_ids, routing.num_experts)
        losses = balance_losses(
            routing.probs,
            routing.logits,
            routing.expert_ids,
            counts,
            routing.top_k,
            seq_len,
            cfg.aux_loss_coef,
            cfg.seq_aux_loss_coef,
            cfg.z_loss_coef,
        )
        load_E = None
        if self.training and cfg.bias_balancing:
            load_E = counts.detach() if self.reduce_counts is None else self.reduce_counts(counts.detach())
        return losses, load_E

    @property
    def stats(self) -> Optional[MoEStats]:
        """Statistics of the last forward (None before the first); detached, no device sync."""
        if isinstance(self._stats_state, tuple):
            if self.__dict__.get("_aux_loss") is None:  # the losses were deferred too
                self._settle_balance()
            self._stats_state = self._compute_stats(*self._stats_state)
        return self._stats_state

    def _compute_stats(self, routing: RoutingResult, plan: Optional[DispatchPlan], losses: dict[str, Tensor]) -> MoEStats:
        with torch.no_grad():
            if plan is None:  # a decode step ran from the router's choices
                plan = build_plan(routing, None)
            counts = plan.counts.float()
            return MoEStats(
                tokens_per_expert=counts,
                dropped_fraction=plan.num_dropped.float() / max(plan.num_rows, 1),
                router_entropy=router_entropy(routing.probs.detach()) if plan.num_tokens else counts.new_zeros(()),
                load_imbalance=counts.max() / counts.mean().clamp_min(1e-20),
                losses=losses,
            )

    def _check_input(self, x: Tensor) -> None:
        D = self.config.dim
        if not isinstance(x, Tensor):
            raise TypeError(f"MoE expects a torch.Tensor of shape [..., {D}], got {type(x).__name__}")
        if x.dim() == 0 or x.shape[-1] != D:
            raise ValueError(f"MoE expects input of shape [..., {D}] (last dim = config.dim), got {tuple(x.shape)}")
        if x.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"MoE expects a floating input (float32, bfloat16, float16), got {x.dtype}")
        w_dtype = self.experts.w_in.dtype
        if x.dtype == w_dtype:
            return
        if x.dtype == autocast_dtype(x.device.type):
            return  # an autocast region's activations: the experts run in that dtype anyway
        raise TypeError(
            f"MoE input dtype {x.dtype} differs from the layer's weights ({w_dtype}); cast one with .to() "
            "or run under torch.autocast"
        )

    def _check_finite(self, values_TX: Tensor, what: str, hint: Callable[[], str]) -> None:
        """With config.check_finite: a ValueError (CPU) or a device assert (no host sync) for NaN/inf values
        [T, X] (the router logits, then the layer's output); `hint()` ends the CPU message, built on failure."""
        if not self.config.check_finite or torch.compiler.is_compiling():
            return
        values_TX = values_TX.detach()  # isfinite runs abs(), which would keep its input for a backward
        if values_TX.device.type == "cpu":
            finite = small_kernels.all_finite(values_TX)  # one native pass; None where it does not apply
            if finite is None:
                finite = torch.isfinite(values_TX).all().item()  # host tensor: no device sync
            if not finite:
                bad = (~torch.isfinite(values_TX).all(dim=-1)).sum().item()
                raise ValueError(
                    f"MoE {what} not finite (NaN or inf) for {bad} of {values_TX.shape[0]} tokens; {hint()}"
                )
        else:
            torch._assert_async(torch.isfinite(values_TX).all(), f"MoE {what} not finite (NaN or inf)")

    def extra_repr(self) -> str:
        c = self.config
        return f"dim={c.dim}, num_experts={c.num_experts}, top_k={c.top_k}, router={c.router}, backend={c.backend}"


def set_aux_loss_scale(model: nn.Module, scale: float) -> None:
    """Set the injected-gradient scale of every MoE layer in `model` (e.g. 1/n for n accumulation steps)."""
    for module in model.modules():
        if isinstance(module, MoE):
            module.aux_loss_scale = scale


def moe_layers(model: nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


def update_expert_biases(model: nn.Module) -> int:
    """Apply the counted load of every MoE layer of `model` with bias_update="step" (call it after each
    optimizer step; `sparsemoe train` does). Returns how many layers have bias_update="step"."""
    return sum(layer.update_bias() for layer in moe_layers(model))


def _in_backward() -> bool:
    """Whether autograd is running a backward pass now: a forward then is activation checkpointing's
    recomputation. (Under the compiler, recomputation is the compiler's and never reruns this code.)"""
    if torch.compiler.is_compiling():
        return False
    return torch._C._current_graph_task_id() != -1
