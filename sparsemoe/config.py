"""Configuration of the MoE layer: one flat dataclass, validated on construction.

Every field carries a comment with its meaning and valid range; the configuration table of docs/layer.md is
written from these comments. Defaults are the Mixtral setting: 8 experts, top-2, SwiGLU, softmax over
all experts then top-k with the two weights renormalised, dropless.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Optional

ACTIVATIONS = ("swiglu", "geglu", "relu", "gelu")
GATED_ACTIVATIONS = ("swiglu", "geglu")
# The dispatch backends MoEConfig.backend accepts (sparsemoe.dispatch registers their implementations; "auto"
# picks one per input). Here, below dispatch, so that the config never imports the layer that reads it.
BACKEND_NAMES = ("auto", "reference", "grouped", "capacity", "decode", "triton")
ROUTERS = ("topk", "group_limited", "expert_choice")
SCORE_FUNCS = ("softmax", "sigmoid")
SCORE_ORDERS = ("before_topk", "after_topk")
NOISES = ("none", "jitter", "gaussian", "gumbel")
GROUP_SCORES = ("top2_sum", "max")
AUX_LOSS_MODES = ("inject", "return")
BIAS_UPDATES = ("forward", "step")
CAPACITY_PRIORITIES = ("position", "weight")


def _default_hidden_dim(dim: int) -> int:
    """Mixtral's ratio (14336 / 4096 = 3.5), rounded up to a multiple of 16."""
    return int(math.ceil(3.5 * dim / 16) * 16)


@dataclass
class MoEConfig:
    # --- shape -------------------------------------------------------------------------------------
    dim: int  # D: model width, the size of the last input dimension; >= 1
    hidden_dim: Optional[int] = None  # F: expert hidden width; >= 1; None -> 3.5*D rounded up to 16
    num_experts: int = 8  # E: routed experts; >= 1
    top_k: int = 2  # K: experts per token (token-choice) or the capacity multiplier (expert-choice); 1..E
    activation: str = "swiglu"  # expert MLP: swiglu | geglu (gated, 2F in-projection) | relu | gelu

    # --- routing ------------------------------------------------------------------------------------
    router: str = "topk"  # topk | group_limited (DeepSeek-V3) | expert_choice (Zhou et al. 2022; not causal)
    score_func: str = "softmax"  # softmax | sigmoid: how logits become scores (router math is float32)
    score_order: str = "before_topk"  # softmax only: before_topk (softmax over all E, then pick k)
    #                                   | after_topk (pick k logits, softmax over those k)
    renormalize: bool = True  # make the k combine weights sum to 1 (Mixtral: True; Shazeer 2017: False)
    route_scale: float = 1.0  # multiplies the combine weights (DeepSeek's routed_scaling_factor); > 0
    num_groups: int = 1  # group_limited: experts split into this many equal groups; divides E
    topk_groups: int = 1  # group_limited: groups kept per token; 1..num_groups, with enough experts for K
    group_score: str = "top2_sum"  # group_limited: rank groups by top2_sum (V3) or max (V2) of scores
    noise: str = "none"  # training only: none | jitter (Switch, input x U[1-eps,1+eps])
    #                      | gaussian (Shazeer's learned noisy top-k) | gumbel (selection only)
    noise_eps: float = 1e-2  # jitter half-width (0 < eps < 1) or Gumbel noise scale (> 0)
    router_init_std: float = 0.02  # router weights ~ N(0, std); >= 0

    # --- load balancing -------------------------------------------------------------------------------
    aux_loss_coef: float = 0.01  # Switch/GShard auxiliary loss E*sum(f_e*P_e); >= 0 (0 = off)
    seq_aux_loss_coef: float = 0.0  # DeepSeek-V3 sequence-wise auxiliary loss; >= 0
    z_loss_coef: float = 0.0  # ST-MoE router z-loss mean(logsumexp(logits)^2); >= 0 (ST-MoE: 1e-3)
    aux_loss_mode: str = "inject"  # inject: losses reach the gradient by themselves, values are detached
    #                                | return: layer.aux_loss carries the graph; you add it to your loss
    bias_balancing: bool = False  # DeepSeek-V3 aux-loss-free balancing: a per-expert bias on selection
    #                               scores (sigmoid) or logits (softmax); never on the combine weights
    bias_update_rate: float = 1e-3  # bias step per update: b_e += rate*sign(mean_load-load_e); > 0
    bias_update: str = "forward"  # when the bias moves: forward (at the end of every training forward, from
    #                               its load) | step (when update_expert_biases(model) is called, e.g. after
    #                               each optimizer step, from the load counted since; safe with activation
    #                               checkpointing, whose recomputed forward must route as the first did)
    bias_on_probs: bool = False  # softmax bias balancing: add the bias to the probabilities (ERNIE 4.5), not
    #                              the logits; needs score_order='before_topk'

    # --- capacity -------------------------------------------------------------------------------------
    capacity_factor: Optional[float] = None  # None or inf = dropless; else C = ceil(cf*T*K/E); > 0
    eval_capacity_factor: Optional[float] = None  # in eval mode; None = same as capacity_factor; inf = dropless
    capacity_priority: str = "position"  # who keeps a full expert's slots: position (k-th choices after
    #                                      all (k-1)-th, then token order) | weight (highest router weight)

    # --- experts ----------------------------------------------------------------------------------------
    num_shared_experts: int = 0  # always-on experts (DeepSeek-MoE), fused into one MLP; >= 0
    shared_hidden_dim: Optional[int] = None  # hidden width of the shared MLP; None -> num_shared_experts*F
    shared_expert_gate: bool = False  # scale the shared output by sigmoid(x . w) (Qwen-MoE)
    expert_dropout: float = 0.0  # training: drop whole experts with this probability; 0 <= p < 1
    dropout: float = 0.0  # training: dropout on the experts' hidden activations; 0 <= p < 1
    recompute_activations: bool = False  # recompute expert hidden activations in backward instead of
    #                                      storing them: less memory for one more GEMM

    # --- execution -------------------------------------------------------------------------------------
    backend: str = "auto"  # dispatch backend: auto | reference | grouped | capacity (see sparsemoe.dispatch)
    check_finite: bool = True  # NaN/inf router logits or layer output raise a ValueError (eager CPU) or a
    #                            device assert (CUDA, no host sync); skipped inside torch.compile

    def __post_init__(self) -> None:
        _int_at_least(self, "dim", 1)
        if self.hidden_dim is None:
            self.hidden_dim = _default_hidden_dim(self.dim)
        _int_at_least(self, "hidden_dim", 1)
        _int_at_least(self, "num_experts", 1)
        _int_at_least(self, "top_k", 1)
        if self.top_k > self.num_experts:
            _fail("top_k", self.top_k, f"an integer from 1 to num_experts={self.num_experts}")
        _choice(self, "activation", ACTIVATIONS)
        _choice(self, "router", ROUTERS)
        _choice(self, "score_func", SCORE_FUNCS)
        _choice(self, "score_order", SCORE_ORDERS)
        if self.score_order == "after_topk" and self.score_func != "softmax":
            _fail("score_order", self.score_order, "'before_topk' when score_func='sigmoid'")
        _bool(self, "renormalize")
        _positive(self, "route_scale")
        _int_at_least(self, "num_groups", 1)
        _int_at_least(self, "topk_groups", 1)
        _choice(self, "group_score", GROUP_SCORES)
        if self.router == "group_limited":
            self._check_groups()
        _choice(self, "noise", NOISES)
        _positive(self, "noise_eps")
        if self.noise == "jitter" and self.noise_eps >= 1:
            _fail("noise_eps", self.noise_eps, "a value in (0, 1) for jitter noise")
        _non_negative(self, "router_init_std")
        for name in ("aux_loss_coef", "seq_aux_loss_coef", "z_loss_coef"):
            _non_negative(self, name)
        _choice(self, "aux_loss_mode", AUX_LOSS_MODES)
        _bool(self, "bias_balancing")
        _positive(self, "bias_update_rate")
        _choice(self, "bias_update", BIAS_UPDATES)
        _bool(self, "bias_on_probs")
        if self.bias_on_probs and not (self.bias_balancing and self.score_func == "softmax"):
            _fail("bias_on_probs", True, "False unless bias_balancing=True with score_func='softmax'")
        if self.bias_on_probs and self.score_order != "before_topk":
            _fail("bias_on_probs", True, "False with score_order='after_topk' (the selection reads logits)")
        if self.bias_balancing and self.router == "expert_choice":
            _fail("bias_balancing", True, "False with router='expert_choice' (it is balanced by construction)")
        _capacity(self, "capacity_factor")
        _capacity(self, "eval_capacity_factor")
        _choice(self, "capacity_priority", CAPACITY_PRIORITIES)
        _int_at_least(self, "num_shared_experts", 0)
        if self.shared_hidden_dim is not None:
            _int_at_least(self, "shared_hidden_dim", 1)
        _bool(self, "shared_expert_gate")
        if self.shared_expert_gate and self.num_shared_experts == 0:
            _fail("shared_expert_gate", True, "False when num_shared_experts=0")
        _probability(self, "expert_dropout")
        _probability(self, "dropout")
        _bool(self, "recompute_activations")
        if self.expert_dropout > 0 and self.router == "expert_choice":
            _fail("expert_dropout", self.expert_dropout, "0 with router='expert_choice'")
        _choice(self, "backend", BACKEND_NAMES)
        _bool(self, "check_finite")

    def _check_groups(self) -> None:
        if self.num_experts % self.num_groups:
            _fail("num_groups", self.num_groups, f"a divisor of num_experts={self.num_experts}")
        if self.topk_groups > self.num_groups:
            _fail("topk_groups", self.topk_groups, f"an integer from 1 to num_groups={self.num_groups}")
        per_group = self.num_experts // self.num_groups
        if self.topk_groups * per_group < self.top_k:
            _fail(
                "topk_groups",
                self.topk_groups,
                f"enough groups to hold top_k={self.top_k} experts ({per_group} experts per group)",
            )

    # --- derived values -------------------------------------------------------------------------------
    @property
    def gated(self) -> bool:
        """SwiGLU/GEGLU experts have a fused [gate; up] in-projection of 2F rows."""
        return self.activation in GATED_ACTIVATIONS

    @property
    def shared_dim(self) -> int:
        """Hidden width of the fused shared-expert MLP (0 when there are no shared experts)."""
        if self.num_shared_experts == 0:
            return 0
        return self.shared_hidden_dim or self.num_shared_experts * self.hidden_dim

    def capacity_factor_for(self, training: bool) -> Optional[float]:
        """The capacity factor in force (None = dropless) in training or evaluation mode."""
        cf = self.capacity_factor if training or self.eval_capacity_factor is None else self.eval_capacity_factor
        return None if cf is None or math.isinf(cf) else cf

    def capacity(self, num_tokens: int, training: bool) -> Optional[int]:
        """Slots per expert, C = ceil(cf * T * K / E) clipped to [1, T]; None when dropless.

        Expert-choice always has a capacity (cf = 1.0 when the config is dropless).
        """
        cf = self.capacity_factor_for(training)
        if cf is None and self.router == "expert_choice":
            cf = 1.0
        if cf is None:
            return None
        slots = math.ceil(round(cf * num_tokens * self.top_k / self.num_experts, 6))  # round: no 2.0000001 -> 3
        return max(1, min(num_tokens, slots))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MoEConfig":
        return config_from_dict(cls, data)


def config_from_dict(cls, data: dict[str, Any]):
    """Build the dataclass `cls` from a dict, refusing unknown keys with the list of accepted ones."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown field(s) {unknown}; accepted fields are {sorted(known)}")
    return cls(**data)


# --- validation helpers: each raises one ValueError naming field, value and what is accepted ------------


def _fail(name: str, value: Any, accepted: str) -> None:
    raise ValueError(f"MoEConfig.{name}={value!r} is invalid: expected {accepted}")


def _int_at_least(cfg: MoEConfig, name: str, low: int) -> None:
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        _fail(name, value, f"an integer >= {low}")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


def _positive(cfg: MoEConfig, name: str) -> None:
    value = getattr(cfg, name)
    if not _number(value) or value <= 0 or math.isinf(value):
        _fail(name, value, "a finite number > 0")


def _non_negative(cfg: MoEConfig, name: str) -> None:
    value = getattr(cfg, name)
    if not _number(value) or value < 0 or math.isinf(value):
        _fail(name, value, "a finite number >= 0")


def _probability(cfg: MoEConfig, name: str) -> None:
    value = getattr(cfg, name)
    if not _number(value) or not 0 <= value < 1:
        _fail(name, value, "a probability in [0, 1)")


def _capacity(cfg: MoEConfig, name: str) -> None:
    value = getattr(cfg, name)
    if value is not None and (not _number(value) or value <= 0):
        _fail(name, value, "None (dropless), a number > 0, or float('inf') (dropless)")


def _choice(cfg: MoEConfig, name: str, accepted: tuple[str, ...]) -> None:
    value = getattr(cfg, name)
    if value not in accepted:
        _fail(name, value, "one of " + ", ".join(repr(a) for a in accepted))


def _bool(cfg: MoEConfig, name: str) -> None:
    value = getattr(cfg, name)
    if not isinstance(value, bool):
        _fail(name, value, "True or False")
