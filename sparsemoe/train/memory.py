"""How much memory a training run needs, estimated before anything is allocated.

The model is built on the meta device (shapes, no memory) and one training forward of a micro-batch
runs there, with a saved-tensor hook that records what autograd keeps for the backward: the
activations of exactly this model, batch and sequence length, counted by storage (a tensor saved twice,
or a view of another, counts once) and leaving out the parameters themselves. On top of them:

* parameters, gradients and AdamW's two moments: 4 + 4 + 8 bytes per parameter (float32 master weights);
* under bfloat16 autocast, the bfloat16 copy of every matrix that autocast makes and keeps for the
  backward (2 bytes per weight), and activations at the width autocast gives them (the meta model
  runs in bfloat16, norms and the router in float32 as on the device);
* with activation checkpointing, each block keeps only its input, and one block's activations live
  again while it is recomputed;
* the transient peak of the backward's start: the float32 logits and their gradient.

Two stand-ins make the meta run keep what a real device keeps: attention saves what a fused kernel
(flash or memory-efficient, as on CUDA and the CPU) saves, q, k, v, the output and the log-sum-exp
(meta has only the math path, which would keep the S x S weights); and the expert stage runs the
`grouped` backend (`reference` and `decode` cannot run on meta; Triton's saved tensors are within a few
per cent of grouped's). This is an estimate: the caching allocator's rounding, kernel workspaces and
fragmentation come on top, and the GPU checks print it beside the measured peak.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from sparsemoe.device import DeviceError, describe_device, free_memory
from sparsemoe.model import ModelConfig, MoETransformer
from sparsemoe.train.config import TrainConfig

GiB = 2**30
_META_BACKENDS = ("grouped", "capacity")  # dispatch backends that run on the meta device


@dataclass
class MemoryEstimate:
    parameters: int  # bytes: float32 weights
    gradients: int  # bytes: float32 gradients of the trainable weights
    optimizer: int  # bytes: AdamW's exp_avg and exp_avg_sq, float32
    activations: int  # bytes kept for the backward of one micro-batch (autocast weight copies included)
    transient: int  # bytes of the backward's first moments: the float32 logits' gradient and softmax

    @property
    def states(self) -> int:
        return self.parameters + self.gradients + self.optimizer

    @property
    def total(self) -> int:
        return self.states + self.activations + self.transient

    def describe(self) -> str:
        return (
            f"about {format_bytes(self.total)} (weights, gradients and AdamW {format_bytes(self.states)}, "
            f"activations {format_bytes(self.activations + self.transient)})"
        )


def format_bytes(n: float) -> str:
    return f"{n / GiB:.1f} GiB" if n >= GiB else f"{n / 2**20:.0f} MiB"


def estimate_training_memory(model_config: ModelConfig, train_config: TrainConfig, precision: str) -> MemoryEstimate:
    """The memory one training step of this model, micro-batch and resolved precision ("fp32"/"bf16") needs."""
    backend = model_config.moe_backend if model_config.moe_backend in _META_BACKENDS else "grouped"
    with torch.device("meta"):
        model = MoETransformer(replace(model_config, moe_backend=backend))
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    copies = 0
    if precision == "bf16":
        copies = 2 * sum(p.numel() for p in _autocast_weights(model))
        model.to(torch.bfloat16)
    per_block, outside = _saved_bytes(model, train_config.batch_size, train_config.seq_len)
    B, S, D, V = train_config.batch_size, train_config.seq_len, model_config.dim, model_config.vocab_size
    if train_config.activation_checkpointing:
        block_inputs = len(per_block) * B * S * D * 4  # the float32 residual stream at each block's input
        activations = outside + block_inputs + max(per_block, default=0)
    else:
        activations = outside + sum(per_block)
    return MemoryEstimate(
        parameters=4 * params,
        gradients=4 * trainable,
        optimizer=8 * trainable,
        activations=activations + copies,
        transient=2 * B * S * V * 4,
    )


def _autocast_weights(model: nn.Module) -> list[nn.Parameter]:
    """The matrices autocast casts for its products: every 2-D weight but an untied embedding (a lookup)."""
    embed = model.embed.weight if model.lm_head is not None else None
    return [p for p in model.parameters() if p.dim() >= 2 and p is not embed]


def _saved_bytes(model: MoETransformer, batch_size: int, seq_len: int) -> tuple[list[int], int]:
    """(bytes saved for the backward inside each block, bytes saved outside the blocks) of one training
    forward on the meta device; each storage counted once, parameters left out."""
    own = {p.untyped_storage()._cdata for p in model.parameters()}
    seen: set[int] = set()
    alive = []  # the saved tensors, so that no storage address is reused (and counted as seen) meanwhile
    per_block = [0] * len(model.layers)
    outside = [0]
    current: list = [None]

    def pack(t: torch.Tensor) -> torch.Tensor:
        alive.append(t)
        storage = t.untyped_storage()
        key = storage._cdata
        if key not in own and key not in seen:
            seen.add(key)
            if current[0] is None:
                outside[0] += storage.nbytes()
            else:
                per_block[current[0]] += storage.nbytes()
        return t

    def enter(i):
        return lambda module, args: current.__setitem__(0, i)

    handles = []
    for i, block in enumerate(model.layers):
        handles.append(block.register_forward_pre_hook(enter(i)))
        handles.append(block.register_forward_hook(lambda module, args, out: current.__setitem__(0, None)))
    model.train()
    ids = torch.zeros(batch_size, seq_len, dtype=torch.long, device=model.embed.weight.device)
    try:
        stand_in = _FusedAttention() if ids.is_meta else nullcontext()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), stand_in:
            model(ids, ids)
    finally:
        for handle in handles:
            handle.remove()
    return per_block, outside[0]


class _FusedAttentionSaves(torch.autograd.Function):
    """Attention's output with what a fused kernel keeps for its backward: q, k, v, out and the
    float32 log-sum-exp per query [B, H, S]. The output is laid out [B, S, H, d] as theirs is, so that
    the heads' merge before o_proj is a view of it, not a copy."""

    @staticmethod
    def forward(ctx, q, k, v):
        B, H, S, _ = q.shape
        out = q.new_empty(B, S, H, v.shape[-1]).transpose(1, 2)  # the fused kernels' [B, S, H, d] layout
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):  # never run: the estimate builds the graph only
        raise NotImplementedError


class _FusedAttention(TorchFunctionMode):
    """Route scaled_dot_product_attention to `_FusedAttentionSaves` (the meta run of the estimate)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention:
            return _FusedAttentionSaves.apply(*args[:3])
        return func(*args, **(kwargs or {}))


def check_fits(estimate: MemoryEstimate, device: torch.device, what: str) -> None:
    """Raise DeviceError when `estimate` is more than the memory free on `device` (nothing allocated yet)."""
    free = free_memory(device)
    if free is None or estimate.total <= free:
        return
    if estimate.states > free:
        advice = (
            "its weights, gradients and AdamW alone do not fit: shrink the model (--set dim=... --set n_layers=... "
            "--set num_experts=...), or shard its experts over several devices (sparsemoe train-parallel)"
        )
    else:
        advice = (
            "lower --batch-size or --seq-len (raise --accum-steps to keep the tokens per step), or add "
            "--activation-checkpointing"
        )
    raise DeviceError(
        f"{what} needs {estimate.describe()} to train, more than the {format_bytes(free)} free on "
        f"{describe_device(device)}; {advice}"
    )
