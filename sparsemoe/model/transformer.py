"""The decoder-only MoE transformer: pre-norm blocks of rotary GQA attention and MoE or dense MLPs.

x = embed(ids) * embedding_multiplier; per block x += residual_multiplier * attn(norm(x)), then the same
for the MLP (with norm_placement="post": x += residual_multiplier * norm(attn(x)), OLMo 2's order; with
"sandwich": norm(attn(norm(x)))); logits = lm_head(norm(x)) / logits_divisor (the multipliers are 1 unless a
config sets them).

Legend: B batch, S sequence positions, D model width, V vocabulary, E experts.

State-dict layout (stable; Hugging Face conversion maps onto these names):

    embed.weight                          [V, D]
    layers.{i}.attn_norm.weight           [D]         (on the attention's input, or its output with "post" norms)
    layers.{i}.attn_post_norm.weight      [D]         ("sandwich" norms only: on the attention's output)
    layers.{i}.attn.q_proj.weight         [H*Hd, D]   (+ .bias when qkv_bias)
    layers.{i}.attn.k_proj.weight         [G*Hd, D]   (+ .bias when qkv_bias)
    layers.{i}.attn.v_proj.weight         [G*Hd, D]   (+ .bias when qkv_bias)
    layers.{i}.attn.o_proj.weight         [D, H*Hd]
    layers.{i}.attn.gate_proj.weight      [H*Hd, D]   (attention_gate only)
    layers.{i}.attn.q_norm.weight         [Hd]        (qk_norm only; [H*Hd] with qk_norm_scope "full")
    layers.{i}.attn.k_norm.weight         [Hd]        (qk_norm only; [G*Hd] with qk_norm_scope "full")
    layers.{i}.ffn_norm.weight            [D]         (on the MLP's input, or its output with "post" norms)
    layers.{i}.ffn_post_norm.weight       [D]         ("sandwich" norms only: on the MLP's output)
    MoE block (sparsemoe.MoE):
    layers.{i}.ffn.router.weight          [E, D]
    layers.{i}.ffn.router.expert_bias     [E]         (buffer; bias balancing)
    layers.{i}.ffn.experts.w_in           [E, I, D]   (I = 2F for gated activations: gate rows, then up rows)
    layers.{i}.ffn.experts.w_out          [E, D, F]
    layers.{i}.ffn.shared_experts.w_in    [1, I_s, D] (shared experts only; .w_out [1, D, F_s],
                                                       .gate_weight [1, D] with shared_expert_gate)
    dense block (DenseMLP):
    layers.{i}.ffn.w_in                   [I, D]      (same gate/up row order)
    layers.{i}.ffn.w_out                  [D, F]
    norm.weight                           [D]
    lm_head.weight                        [V, D]      (absent when tie_embeddings)
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from sparsemoe.experts import SharedExperts, in_rows, mlp
from sparsemoe.layer import MoE
from sparsemoe.model.attention import Attention, KVCache, RMSNorm
from sparsemoe.model.mla import MultiHeadLatentAttention
from sparsemoe.model.native_decode import native_decode
from sparsemoe.model.rope import rope_table
from sparsemoe.model.config import ModelConfig
from sparsemoe.ops.linear import Linear, linear
from sparsemoe.quant import quantized_layout
from sparsemoe.routing import Router


class ModelOutput(NamedTuple):
    """What `MoETransformer.forward` returns.

    * `logits` [B, S, V] (or [B, 1, V] with last_only=True).
    * `loss`: the language-model cross-entropy alone (None without targets); never includes aux_loss.
    * `aux_loss`: the sum over MoE layers of `layer.aux_loss` (0-dim float32; 0 for a dense model); None
      when forward was called with `with_aux_loss=False` (generation, which never reads it, does).
      aux_loss_mode="inject": detached, for logging; its gradient already flows through the layers.
      aux_loss_mode="return": carries the graph; add it to the loss yourself.
      In both modes `loss + aux_loss` has the right gradient, which is what the trainer backpropagates.
    """

    logits: Tensor
    loss: Optional[Tensor]
    aux_loss: Optional[Tensor]


class DenseMLP(nn.Module):
    """A dense feed-forward block with the experts' weight layout, computed by `sparsemoe.experts.mlp`."""

    def __init__(self, dim: int, hidden_dim: int, activation: str, dropout: float = 0.0) -> None:
        super().__init__()
        self.activation, self.dropout = activation, dropout
        self.w_in = nn.Parameter(torch.empty(in_rows(hidden_dim, activation), dim))
        self.w_out = nn.Parameter(torch.empty(dim, hidden_dim))

    def forward(self, x: Tensor) -> Tensor:
        x_TD = x.reshape(-1, x.shape[-1])
        y_TD = mlp(x_TD, self.w_in.to(x.dtype), self.w_out.to(x.dtype), self.activation, self.dropout, self.training)
        return y_TD.view(x.shape)


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.dim, config.norm_eps)
        if config.attention == "mla":
            self.attn: nn.Module = MultiHeadLatentAttention(config, layer_id)
        else:
            self.attn = Attention(config, layer_id)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        if config.is_moe_layer(layer_id):
            self.ffn: nn.Module = MoE(config.moe_config())
        else:
            self.ffn = DenseMLP(config.dim, config.dense_hidden_dim, config.activation, config.dropout)
        self.dropout = nn.Dropout(config.dropout)
        self.residual_multiplier = config.residual_multiplier
        self.post_norm = config.norm_placement == "post"
        sandwich = config.norm_placement == "sandwich"  # norms on each branch's input and on its output
        self.attn_post_norm = RMSNorm(config.dim, config.norm_eps) if sandwich else None
        self.ffn_post_norm = RMSNorm(config.dim, config.norm_eps) if sandwich else None

    def _branch(self, y: Tensor) -> Tensor:
        """A residual branch's output as it is added: dropout, then the residual multiplier (Granite)."""
        if self.training and self.dropout.p > 0:  # a module call per branch costs a decode step ~0.2 ms
            y = self.dropout(y)
        return y if self.residual_multiplier == 1.0 else y * self.residual_multiplier

    def _mlp(self, h: Tensor) -> Tensor:
        dtype = h.dtype
        if isinstance(self.ffn, MoE):
            h = h.to(self.ffn.experts.w_in.dtype)  # under autocast the MoE layer wants its weights' dtype
        return self.ffn(h).to(dtype)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: Optional[KVCache]) -> Tensor:
        if self.post_norm:  # OLMo 2: each branch reads the residual stream; its output is normalised
            x = x + self._branch(self.attn_norm(self.attn(x, cos, sin, cache)))
            return x + self._branch(self.ffn_norm(self._mlp(x)))
        y = self.attn(self.attn_norm(x), cos, sin, cache)
        x = x + self._branch(y if self.attn_post_norm is None else self.attn_post_norm(y))
        y = self._mlp(self.ffn_norm(x))
        return x + self._branch(y if self.ffn_post_norm is None else self.ffn_post_norm(y))


class MoETransformer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.lm_head = None if config.tie_embeddings else Linear(config.dim, config.vocab_size, bias=False)
        # Not persistent: derived from the config, so they stay out of checkpoints.
        cos, sin = self._rope_tables()
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self._init_projections()  # norms, routers and gates were initialised by their modules
        self.activation_checkpointing = False  # see set_activation_checkpointing

    def set_activation_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each block's activations in the backward instead of keeping them (training only).

        Saves the activations of every block but the one being differentiated, for about one more forward
        of compute (torch.utils.checkpoint, non-reentrant; dropout and router noise are replayed exactly).
        Selection-bias balancing must then count per step (`bias_update="step"`): a bias moved by the first
        forward would send the recomputed forward's tokens to other experts.
        """
        conflict = self.config.checkpointing_conflict()
        if enabled and conflict:
            raise ValueError(conflict)
        self.activation_checkpointing = bool(enabled)

    def set_bias_update(self, mode: str) -> None:
        """Switch every MoE layer's bias_update ("forward" or "step", see MoEConfig) and the model config's."""
        config = replace(self.config, bias_update=mode)  # validates
        conflict = config.checkpointing_conflict()
        if self.activation_checkpointing and conflict:
            raise ValueError(f"{conflict}; turn activation checkpointing off first")
        self.config = config
        for layer in self.moe_layers:
            layer.set_bias_update(mode)

    def _rope_tables(self) -> tuple[Tensor, Tensor]:
        c = self.config
        return rope_table(c.rotary_dim, c.max_seq_len, c.rope_theta, c.rope_scaling)  # float32

    def reset_buffers(self) -> None:
        """Reset the state that is neither a parameter nor saved: the RoPE tables (float32), recomputed, and
        the routers' step-mode load counts since the last bias update (`bias_update="step"`), zeroed."""
        device = self.embed.weight.device
        cos, sin = self._rope_tables()
        self.rope_cos, self.rope_sin = cos.to(device), sin.to(device)
        for layer in self.moe_layers:
            if layer.router.pending_load is not None:
                layer.router.pending_load.zero_()

    def reset_parameters(self) -> None:
        """Every parameter and buffer to its initial value (see `_init_projections` for the scheme).

        Norm weights to ones, routers their own init (`Router.reset_parameters`: selection bias zero), a
        shared expert's output gate zero, the RoPE tables recomputed. After `to_empty()` this initialises a
        model built on the meta device:

            with torch.device("meta"):
                model = MoETransformer(config)
            model.to_empty(device="cuda")
            model.reset_parameters()
        """
        for module in self.modules():
            if isinstance(module, (RMSNorm, Router, SharedExperts)):
                module.reset_parameters()  # a shared expert's weights are drawn again below
        self.reset_buffers()
        self._init_projections()

    def _init_projections(self) -> None:
        """GPT-2 style: N(0, init_std), residual output projections scaled by 1/sqrt(2*n_layers).

        Dense MLPs and experts get the same scheme, so the dense baseline starts like the MoE model.
        """
        std = self.config.init_std
        out_std = std / math.sqrt(2 * self.config.n_layers)
        nn.init.normal_(self.embed.weight, std=std)
        if self.lm_head is not None:
            nn.init.normal_(self.lm_head.weight, std=std)
        for block in self.layers:
            if not isinstance(block.attn, Attention):  # MLA: the same scheme over its own projections
                block.attn.reset_parameters(std, out_std)
            else:
                gate = [block.attn.gate_proj] if block.attn.gate_proj is not None else []
                for proj in (block.attn.q_proj, block.attn.k_proj, block.attn.v_proj, *gate):
                    nn.init.normal_(proj.weight, std=std)
                    if proj.bias is not None:
                        nn.init.zeros_(proj.bias)
                nn.init.normal_(block.attn.o_proj.weight, std=out_std)
            for mlp_module in self._mlps(block.ffn):
                nn.init.normal_(mlp_module.w_in, std=std)
                nn.init.normal_(mlp_module.w_out, std=out_std)

    @staticmethod
    def _mlps(ffn: nn.Module) -> list[nn.Module]:
        if isinstance(ffn, MoE):
            return [m for m in (ffn.experts, ffn.shared_experts) if m is not None]
        return [ffn]

    @property
    def moe_layers(self) -> list[MoE]:
        """The blocks' MoE layers, in order (read from the blocks: cheaper than walking every module)."""
        return [block.ffn for block in self.layers if isinstance(block.ffn, MoE)]

    def forward(
        self,
        input_ids: Tensor,
        targets: Optional[Tensor] = None,
        *,
        cache: Optional[KVCache] = None,
        last_only: bool = False,
        with_aux_loss: bool = True,
    ) -> ModelOutput:
        """input_ids [B, S] long -> ModelOutput. With `cache`, the S tokens follow the cached positions.

        targets [B, S] long: next-token ids; -100 marks positions left out of the loss.
        last_only: compute logits for the last position only (generation).
        with_aux_loss: False leaves aux_loss None; without gradients the MoE layers then skip computing their
        balancing losses (they compute them when `layer.aux_loss` or `layer.stats` is read).
        """
        if input_ids.dim() != 2 or input_ids.dtype != torch.long:
            raise ValueError(
                f"input_ids must be a [batch, seq] long tensor, got {tuple(input_ids.shape)} {input_ids.dtype}"
            )
        S = input_ids.shape[1]
        start = cache.length if cache is not None else 0
        if start + S > self.config.max_seq_len:
            raise ValueError(
                f"sequence of {start + S} positions is longer than the model's max_seq_len={self.config.max_seq_len}"
            )
        # float32 once here rather than in every layer's RoPE (which computes in float32 from these values)
        cos, sin = self.rope_cos[start : start + S].float(), self.rope_sin[start : start + S].float()
        x = self.embed(input_ids)
        if self.config.embedding_multiplier != 1.0:
            x = x * self.config.embedding_multiplier
        recompute = self.activation_checkpointing and self.training and cache is None and torch.is_grad_enabled()
        native = native_decode(self, cache, x) if cache is not None and S == 1 and not self.training else None
        if native is not None:  # a CPU decode step: the blocks as prepared native calls (same results)
            x = native.run(x, start, cos, sin)
        else:
            for block in self.layers:
                if recompute:
                    x = checkpoint(block, x, cos, sin, None, use_reentrant=False)
                else:
                    x = block(x, cos, sin, cache)
        if cache is not None:
            cache.length += S
        if last_only:
            x = x[:, -1:]
        logits = native.head(x) if native is not None else None  # the final norm and LM head, where it takes them
        if logits is None:
            x = self.norm(x)
            logits = linear(x, self.embed.weight) if self.lm_head is None else self.lm_head(x)
        if self.config.logits_divisor != 1.0:
            logits = logits / self.config.logits_divisor

        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)
        return ModelOutput(logits=logits, loss=loss, aux_loss=self._aux_loss(x) if with_aux_loss else None)

    def _aux_loss(self, x: Tensor) -> Tensor:
        losses = [layer.aux_loss.to(x.device) for layer in self.moe_layers]
        if not losses:
            return x.new_zeros((), dtype=torch.float32)
        total = losses[0]
        for loss in losses[1:]:
            total = total + loss
        return total

    # --- sizes -------------------------------------------------------------------------------------
    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def num_active_params(self) -> int:
        """Parameters one token uses: all but the experts it is not routed to (K of E are active)."""
        total = self.num_params()
        for layer in self.moe_layers:
            per_expert = (layer.experts.w_in.numel() + layer.experts.w_out.numel()) // layer.config.num_experts
            total -= per_expert * (layer.config.num_experts - layer.config.top_k)
        return total

    def new_cache(self, batch_size: int) -> KVCache:
        p = self.embed.weight
        return KVCache(self.config, batch_size, device=p.device, dtype=p.dtype)


def empty_model(
    config: ModelConfig, dtype: torch.dtype = torch.float32, device="cpu", quantization: Optional[dict] = None
) -> MoETransformer:
    """The model with uninitialised weights on `device`, for loading a checkpoint into: built on the meta
    device, so random initialisation (minutes on a large model) and a host copy are skipped. The state
    no checkpoint holds is reset (`reset_buffers`); every weight must then be loaded. `quantization`
    ({"scheme", "group_size", "shared"}, as a quantized checkpoint records it): the experts are laid out
    quantized (`sparsemoe.quant.quantized_layout`), so the float expert weights are never allocated."""
    with torch.device("meta"):
        model = MoETransformer(config).to(dtype)  # the routers' selection biases stay float32
        if quantization is not None:
            quantized_layout(model, quantization["scheme"], quantization.get("group_size") or None,
                             shared=quantization.get("shared", True))
    model.to_empty(device=device)
    model.reset_buffers()
    return model
