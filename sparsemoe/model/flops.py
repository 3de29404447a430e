"""Model FLOPs per token, the numerator of MFU (model FLOPs utilisation).

Counted from a built model (one on the meta device costs no memory), so that every architecture the
config can describe is counted from its own weights:

* matrix products: 2 FLOPs per weight a token multiplies by in the forward: every 2-D weight but the
  embedding lookup (a tied language-model head counts the embedding once, as the head), the routed
  experts' weights at K of E (only the active experts count), routers, shared experts and dense MLPs
  in full;
* attention scores and the weighted sum of values: 2 * H * (qk head width + v head width) FLOPs per key a
  query sees, at each position's causal context (on average (S + 1) / 2 keys for a sequence of S,
  at most the sliding window): the work a causal kernel does, not the full S x S square;
* training: 3 x the forward (the backward computes two products per forward product). Activation
  checkpointing recomputes a forward on top, which is not counted (model FLOPs, not hardware FLOPs).

Norms, activations, softmax, routing and the loss are left out, as in the usual MFU convention.
"""

from __future__ import annotations

from torch import nn

from sparsemoe.layer import MoE


def matmul_weights_per_token(model: nn.Module) -> int:
    """Weights one token multiplies by in a forward (see the module docstring)."""
    embed = model.embed.weight
    tied = model.lm_head is None
    total = 0
    for name, param in model.named_parameters():
        if param.dim() < 2 or (param is embed and not tied):
            continue
        total += param.numel()
    for layer in model.modules():
        if isinstance(layer, MoE):
            cfg, experts = layer.config, layer.experts
            inactive = (experts.w_in.numel() + experts.w_out.numel()) * (cfg.num_experts - cfg.top_k)
            total -= inactive // cfg.num_experts
    return total


def mean_causal_context(seq_len: int, window=None) -> float:
    """Keys a query sees on average in a causal sequence of `seq_len` positions (itself included)."""
    if window is None or window >= seq_len:
        return (seq_len + 1) / 2
    # positions 1..window see all before them, the rest exactly `window`
    return (window * (window + 1) / 2 + (seq_len - window) * window) / seq_len


def attention_flops_per_token(config, seq_len: int) -> float:
    """Forward FLOPs of q.k and p.v per token, summed over the layers."""
    if config.attention == "mla":
        qk, v = config.qk_nope_head_dim + config.head_dim, config.v_head_dim
    else:
        qk = v = config.head_dim
    return sum(
        2 * config.n_heads * (qk + v) * mean_causal_context(seq_len, config.window_of(i))
        for i in range(config.n_layers)
    )


def forward_flops_per_token(model: nn.Module, seq_len: int) -> float:
    return 2 * matmul_weights_per_token(model) + attention_flops_per_token(model.config, seq_len)


def training_flops_per_token(model: nn.Module, seq_len: int) -> float:
    """Model FLOPs of one training token (forward and backward) at sequence length `seq_len`."""
    return 3 * forward_flops_per_token(model, seq_len)
