"""Configuration of the MoE language model: one flat dataclass, validated on construction, and presets.

The MoE fields have the same names and meanings as in `sparsemoe.MoEConfig` (see sparsemoe/config.py),
except `moe_hidden_dim` (MoEConfig.hidden_dim) and `moe_backend` (MoEConfig.backend). `moe_config()`
builds the layer config; its validation errors are reported under the ModelConfig field name.

Which feed-forward blocks are MoE (Qwen-MoE / DeepSeek conventions, so checkpoints map directly):
layer i (0-based) is MoE when `not dense`, `i >= first_dense_layers` and `(i + 1) % moe_every == 0`;
every other layer has a dense SwiGLU/GELU MLP of width `dense_hidden_dim`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any, Optional

from sparsemoe.config import ACTIVATIONS, MoEConfig, config_from_dict

# ModelConfig field -> MoEConfig field, for the fields whose names differ.
_MOE_RENAMED = {"moe_hidden_dim": "hidden_dim", "moe_backend": "backend"}
# MoEConfig fields that ModelConfig carries under the same name.
_MOE_SHARED = (
    "num_experts",
    "top_k",
    "activation",
    "router",
    "score_func",
    "score_order",
    "renormalize",
    "route_scale",
    "num_groups",
    "topk_groups",
    "group_score",
    "noise",
    "noise_eps",
    "router_init_std",
    "aux_loss_coef",
    "seq_aux_loss_coef",
    "z_loss_coef",
    "aux_loss_mode",
    "bias_balancing",
    "bias_update_rate",
    "bias_update",
    "bias_on_probs",
    "capacity_factor",
    "eval_capacity_factor",
    "capacity_priority",
    "num_shared_experts",
    "shared_hidden_dim",
    "shared_expert_gate",
    "expert_dropout",
)


# The scalar multipliers that default to 1 (attention_multiplier defaults to None: 1/sqrt(head_dim)).
SCALAR_MULTIPLIERS = ("embedding_multiplier", "residual_multiplier", "logits_divisor")


@dataclass
class ModelConfig:
    # --- shape ---------------------------------------------------------------------------------------
    vocab_size: int = 256  # tokens; 256 = bytes (the default tokenizer); >= 1
    dim: int = 128  # D: model width; >= 1, a multiple of n_heads unless head_dim is set
    n_layers: int = 4  # transformer blocks; >= 1
    n_heads: int = 4  # query heads; >= 1
    n_kv_heads: Optional[int] = None  # key/value heads (grouped-query attention); divides n_heads; None = n_heads
    head_dim: Optional[int] = None  # per-head width; None = dim // n_heads (Qwen3 sets it explicitly)
    rotary_dim: Optional[int] = None  # RoPE rotates each head's first rotary_dim dims; even; None = head_dim
    max_seq_len: int = 256  # longest sequence the model takes (RoPE table, KV cache); >= 1
    sliding_window: Optional[int] = None  # position i attends to keys i-window+1..i; None = all before it; >= 1
    sliding_layers: Optional[list] = None  # layers (0-based) that use sliding_window; None = every layer
    nope_layers: Optional[list] = None  # layers (0-based) whose attention has no RoPE (NoPE); None = none; gqa only
    dropout: float = 0.0  # dropout on attention weights and residual branches (training only); [0, 1)
    rope_theta: float = 10000.0  # RoPE base; > 0 (Mixtral 1e6)
    rope_scaling: Optional[dict] = None  # None (plain RoPE) or YaRN: {"type": "yarn", "factor": > 0,
    #   "original_max_position_embeddings": >= 1, optional beta_fast, beta_slow, mscale, mscale_all_dim}
    norm_eps: float = 1e-5  # RMSNorm epsilon; > 0
    norm_placement: str = "pre"  # pre: RMSNorm on each branch's input (Llama) | post: on each branch's output,
    #                              before it joins the residual stream (OLMo 2, FlexOlmo) | sandwich: on both
    #                              (Gemma 2, AFMoE; two more norms per block)
    qkv_bias: bool = False  # biases on q/k/v projections (Qwen2)
    qk_norm: bool = False  # RMSNorm on q and k before RoPE (Qwen3, OLMoE)
    qk_norm_scope: str = "head"  # head: per head, over Hd (Qwen3) | full: over all of q and all of k (OLMoE)
    attention_gate: bool = False  # the attention output times sigmoid(gate_proj(x)) per channel, before o_proj
    #                               (gated attention: AFMoE, Qwen3-Next); gqa only
    tie_embeddings: bool = False  # lm_head shares the embedding matrix
    init_std: float = 0.02  # std of the normal init of embeddings and projections; > 0
    attention: str = "gqa"  # gqa | mla (DeepSeek Multi-head Latent Attention; head_dim is then the RoPE width)
    q_lora_rank: Optional[int] = None  # mla: query compression rank; >= 1; None = a full-rank q_proj
    kv_lora_rank: int = 64  # mla: width of the key/value latent the KV cache stores; >= 1
    qk_nope_head_dim: int = 32  # mla: per-head query/key width without RoPE; >= 1
    v_head_dim: int = 32  # mla: per-head value width; >= 1

    # --- scalar multipliers (IBM Granite's; the defaults leave the model unscaled) -------------------
    embedding_multiplier: float = 1.0  # token embeddings are multiplied by this; > 0
    attention_multiplier: Optional[float] = None  # softmax scale of q.k; None = 1/sqrt(head_dim); > 0; gqa only
    residual_multiplier: float = 1.0  # each block's attention and MLP outputs are multiplied by this; > 0
    logits_divisor: float = 1.0  # logits = lm_head(x) / logits_divisor (Granite's logits_scaling); > 0

    # --- which blocks are MoE ------------------------------------------------------------------------
    dense: bool = False  # True: every block is dense (the dense baseline); no MoE layer at all
    first_dense_layers: int = 0  # the first n blocks are dense (DeepSeek first_k_dense_replace); >= 0
    moe_every: int = 1  # block i is MoE when (i+1) % moe_every == 0 (Qwen decoder_sparse_step); >= 1
    dense_hidden_dim: Optional[int] = None  # hidden width of dense MLPs; None = top_k*moe_hidden_dim + shared

    # --- the MoE blocks (MoEConfig fields) ----------------------------------------------------------
    num_experts: int = 8  # E: routed experts; >= 1
    top_k: int = 2  # K: experts per token; 1..num_experts
    moe_hidden_dim: Optional[int] = None  # F: expert hidden width; None = 3.5*dim rounded up to 16
    activation: str = "swiglu"  # MLP activation (experts and dense blocks): swiglu | geglu | relu | gelu
    router: str = "topk"  # topk | group_limited (expert_choice is not causal and is refused here)
    score_func: str = "softmax"  # softmax | sigmoid
    score_order: str = "before_topk"  # softmax over all experts then top-k, or after_topk
    renormalize: bool = True  # the k combine weights sum to 1
    route_scale: float = 1.0  # multiplies the combine weights; > 0
    num_groups: int = 1  # group_limited: expert groups; divides num_experts
    topk_groups: int = 1  # group_limited: groups kept per token
    group_score: str = "top2_sum"  # group_limited: top2_sum | max
    noise: str = "none"  # router noise in training: none | jitter | gaussian | gumbel
    noise_eps: float = 1e-2  # jitter half-width or Gumbel scale
    router_init_std: float = 0.02  # router weights ~ N(0, std)
    aux_loss_coef: float = 0.01  # Switch/GShard load-balancing loss weight; >= 0
    seq_aux_loss_coef: float = 0.0  # DeepSeek-V3 sequence-wise balance loss weight; >= 0
    z_loss_coef: float = 0.0  # router z-loss weight; >= 0
    aux_loss_mode: str = "inject"  # inject (layers add the gradient themselves) | return (caller adds aux_loss)
    bias_balancing: bool = False  # DeepSeek-V3 aux-loss-free balancing
    bias_update_rate: float = 1e-3  # bias step per update; > 0
    bias_update: str = "forward"  # forward (after each training forward) | step (update_expert_biases(model))
    bias_on_probs: bool = False  # softmax bias balancing: the bias shifts probabilities (ERNIE 4.5), not logits
    capacity_factor: Optional[float] = None  # None = dropless; else C = ceil(cf*T*K/E)
    eval_capacity_factor: Optional[float] = None  # capacity in eval/generation; None = capacity_factor
    capacity_priority: str = "position"  # position | weight
    num_shared_experts: int = 0  # always-on shared experts; >= 0
    shared_hidden_dim: Optional[int] = None  # shared MLP width; None = num_shared_experts*moe_hidden_dim
    shared_expert_gate: bool = False  # sigmoid gate on the shared output (Qwen-MoE)
    expert_dropout: float = 0.0  # drop whole experts in training with this probability; [0, 1)
    moe_backend: str = "auto"  # dispatch backend of the MoE layers (sparsemoe.dispatch)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "max_seq_len", "moe_every"):
            _int_at_least(name, getattr(self, name), 1)
        _int_at_least("first_dense_layers", self.first_dense_layers, 0)
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        _int_at_least("n_kv_heads", self.n_kv_heads, 1)
        if self.n_heads % self.n_kv_heads:
            _fail("n_kv_heads", self.n_kv_heads, f"a divisor of n_heads={self.n_heads}")
        if self.head_dim is None:
            if self.dim % self.n_heads:
                _fail("n_heads", self.n_heads, f"a divisor of dim={self.dim} (or set head_dim)")
            self.head_dim = self.dim // self.n_heads
        _int_at_least("head_dim", self.head_dim, 2)
        if self.head_dim % 2:
            _fail("head_dim", self.head_dim, "an even integer (RoPE rotates pairs)")
        if self.rotary_dim is None:
            self.rotary_dim = self.head_dim
        _int_at_least("rotary_dim", self.rotary_dim, 2)
        if self.rotary_dim % 2 or self.rotary_dim > self.head_dim:
            _fail("rotary_dim", self.rotary_dim, f"an even integer <= head_dim={self.head_dim}")
        if not (_number(self.dropout) and 0 <= self.dropout < 1):
            _fail("dropout", self.dropout, "a probability in [0, 1)")
        for name in ("rope_theta", "norm_eps", "init_std") + SCALAR_MULTIPLIERS:
            value = getattr(self, name)
            if not _number(value) or value <= 0 or math.isinf(value):
                _fail(name, value, "a finite number > 0")
        for name in ("qkv_bias", "qk_norm", "tie_embeddings", "dense", "attention_gate"):
            if not isinstance(getattr(self, name), bool):
                _fail(name, getattr(self, name), "True or False")
        scaling = self.rope_scaling
        if scaling is not None and not (
            isinstance(scaling, dict)
            and scaling.get("type") == "yarn"
            and _number(scaling.get("factor"))
            and scaling["factor"] > 0
            and _number(scaling.get("original_max_position_embeddings"))
            and scaling["original_max_position_embeddings"] >= 1
        ):
            accepted = "None or {'type': 'yarn', 'factor': > 0, 'original_max_position_embeddings': >= 1}"
            _fail("rope_scaling", scaling, accepted)
        if self.attention not in ("gqa", "mla"):
            _fail("attention", self.attention, "'gqa' or 'mla'")
        self._check_sliding_window()
        if self.nope_layers is not None:
            self.nope_layers = _layer_list(self, "nope_layers") or None  # [] = every layer has RoPE = None
            if self.attention == "mla" and self.nope_layers:
                _fail("nope_layers", self.nope_layers, "None with mla (latent attention's keys carry RoPE)")
        scale = self.attention_multiplier
        if scale is not None and (not _number(scale) or scale <= 0 or math.isinf(scale)):
            _fail("attention_multiplier", scale, "None (1/sqrt(head_dim)) or a finite number > 0")
        if self.norm_placement not in ("pre", "post", "sandwich"):
            _fail("norm_placement", self.norm_placement, "'pre', 'post' or 'sandwich'")
        if self.qk_norm_scope not in ("head", "full"):
            _fail("qk_norm_scope", self.qk_norm_scope, "'head' or 'full'")
        if self.attention == "mla":
            for name in ("kv_lora_rank", "qk_nope_head_dim", "v_head_dim"):
                _int_at_least(name, getattr(self, name), 1)
            if self.rotary_dim != self.head_dim:
                _fail("rotary_dim", self.rotary_dim, f"head_dim={self.head_dim} (with mla head_dim is the RoPE width)")
            if self.q_lora_rank is not None:
                _int_at_least("q_lora_rank", self.q_lora_rank, 1)
            if self.attention_multiplier is not None:
                _fail("attention_multiplier", scale, "None with mla (latent attention sets its own softmax scale)")
            if self.attention_gate:
                _fail("attention_gate", True, "False with mla")
        if self.router == "expert_choice":
            _fail("router", self.router, "'topk' or 'group_limited' (expert_choice is not causal)")
        if self.activation not in ACTIVATIONS:
            _fail("activation", self.activation, "one of " + ", ".join(map(repr, ACTIVATIONS)))
        moe = self.moe_config()  # validates every MoE field, even for a dense model
        self.moe_hidden_dim = moe.hidden_dim
        if self.dense_hidden_dim is None:
            self.dense_hidden_dim = self.top_k * moe.hidden_dim + moe.shared_dim
        _int_at_least("dense_hidden_dim", self.dense_hidden_dim, 1)

    def _check_sliding_window(self) -> None:
        """Validate the window; sliding_layers become a sorted list, or None when every layer slides."""
        if self.sliding_window is None:
            if self.sliding_layers is not None:
                _fail("sliding_layers", self.sliding_layers, "None when sliding_window is None")
            return
        _int_at_least("sliding_window", self.sliding_window, 1)
        if self.attention == "mla":
            _fail("sliding_window", self.sliding_window, "None with mla (latent attention attends to every position)")
        if self.sliding_layers is not None:
            layers = _layer_list(self, "sliding_layers")
            if not layers:
                _fail("sliding_layers", layers, "at least one layer (or sliding_window=None)")
            self.sliding_layers = None if len(layers) == self.n_layers else layers

    # --- derived -----------------------------------------------------------------------------------------
    def window_of(self, layer: int) -> Optional[int]:
        """The attention window of layer `layer` (0-based): sliding_window, or None for full attention."""
        if self.sliding_layers is None or layer in self.sliding_layers:
            return self.sliding_window
        return None

    def checkpointing_conflict(self) -> Optional[str]:
        """Why activation checkpointing cannot train this model as configured, or None when it can."""
        if self.moe_layer_ids and self.bias_balancing and self.bias_update != "step":
            return (
                "activation checkpointing with bias_balancing needs bias_update='step' (the selection bias must "
                f"not move between a forward and its recomputation); this model has bias_update={self.bias_update!r}"
            )
        return None

    def moe_config(self) -> MoEConfig:
        """The MoEConfig of this model's MoE blocks (ValueErrors name the ModelConfig field)."""
        kwargs = {name: getattr(self, name) for name in _MOE_SHARED}
        kwargs.update({moe_name: getattr(self, name) for name, moe_name in _MOE_RENAMED.items()})
        try:
            return MoEConfig(dim=self.dim, **kwargs)
        except ValueError as err:
            message = str(err)
            for name, moe_name in _MOE_RENAMED.items():
                message = message.replace(f"MoEConfig.{moe_name}=", f"ModelConfig.{name}=")
            raise ValueError(message.replace("MoEConfig.", "ModelConfig.")) from None

    @property
    def attention_scale(self) -> float:
        """The softmax scale of q.k in grouped-query attention: attention_multiplier, or 1/sqrt(head_dim)."""
        return self.head_dim**-0.5 if self.attention_multiplier is None else self.attention_multiplier

    def is_moe_layer(self, i: int) -> bool:
        return not self.dense and i >= self.first_dense_layers and (i + 1) % self.moe_every == 0

    @property
    def moe_layer_ids(self) -> list[int]:
        return [i for i in range(self.n_layers) if self.is_moe_layer(i)]

    def dense_baseline(self) -> "ModelConfig":
        """The same model with every block dense, at the same active feed-forward parameters per token.

        A token activates K experts of width F (plus the shared experts), so the dense MLP gets width
        K*F + shared; the router's D*E weights are the only active parameters it lacks.
        """
        moe = self.moe_config()
        return replace(self, dense=True, dense_hidden_dim=self.top_k * moe.hidden_dim + moe.shared_dim)

    def approx_num_params(self) -> int:
        """Parameter count from the config alone (without building the model), up to norms and biases."""
        D, Hd = self.dim, self.head_dim
        attn = D * Hd * (2 * self.n_heads + 2 * self.n_kv_heads + (self.n_heads if self.attention_gate else 0))
        gate = 3 if self.activation in ("swiglu", "geglu") else 2
        moe = self.moe_config()
        moe_ffn = self.num_experts * gate * D * moe.hidden_dim + self.num_experts * D + gate * D * moe.shared_dim
        dense_ffn = gate * D * self.dense_hidden_dim
        ffn = sum(moe_ffn if self.is_moe_layer(i) else dense_ffn for i in range(self.n_layers))
        embed = self.vocab_size * D * (1 if self.tie_embeddings else 2)
        return embed + self.n_layers * attn + ffn

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        return config_from_dict(cls, data)

    def diff(self, other: "ModelConfig") -> dict[str, tuple[Any, Any]]:
        """Fields whose values differ: name -> (self's value, other's value)."""
        a, b = self.to_dict(), other.to_dict()
        return {k: (a[k], b[k]) for k in a if a[k] != b[k]}


# Presets. "tiny" trains in seconds (tests); "demo" is `sparsemoe train`'s default (about 3.5 minutes on
# two CPU cores); "wide" is the demo four times wider with fine-grained experts (32 of width 256, top-4), a
# CPU model where the expert GEMMs dominate a training step (`sparsemoe bench --train`); "gpu" is sized for one 80-140 GB GPU (983 M parameters, 303 M active per token; its
# dense twin, `dense_baseline()`, has the same 303 M); "mixtral" is Mixtral-8x7B's shape, for benchmarks
# and shape checks only.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(dim=32, n_layers=2, n_heads=2, max_seq_len=64, num_experts=4, top_k=2, moe_hidden_dim=32),
    "demo": dict(
        dim=128, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=256, num_experts=8, top_k=2, moe_hidden_dim=128
    ),
    "wide": dict(
        dim=512, n_layers=4, n_heads=8, n_kv_heads=4, max_seq_len=512, num_experts=32, top_k=4, moe_hidden_dim=256
    ),
    "gpu": dict(
        dim=1536,
        n_layers=12,
        n_heads=12,
        n_kv_heads=4,
        max_seq_len=2048,
        rope_theta=1e6,
        num_experts=16,
        top_k=4,
        moe_hidden_dim=1024,
    ),
    "mixtral": dict(
        vocab_size=32000,
        dim=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=8,
        max_seq_len=32768,
        rope_theta=1e6,
        num_experts=8,
        top_k=2,
        moe_hidden_dim=14336,
        aux_loss_coef=0.02,
    ),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """A preset by name, with field overrides."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; accepted: {', '.join(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})


def _layer_list(config: ModelConfig, name: str) -> list[int]:
    """The field `name`, a collection of distinct layer indices, as a sorted list (ValueError otherwise)."""
    layers = getattr(config, name)
    valid = isinstance(layers, (list, tuple)) and all(
        not isinstance(i, bool) and isinstance(i, int) and 0 <= i < config.n_layers for i in layers
    )
    if not valid or len(set(layers)) != len(layers):
        _fail(name, layers, f"None or a list of distinct layer indices in [0, {config.n_layers})")
    return sorted(layers)


def _fail(name: str, value: Any, accepted: str) -> None:
    raise ValueError(f"ModelConfig.{name}={value!r} is invalid: expected {accepted}")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


def _int_at_least(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        _fail(name, value, f"an integer >= {low}")
