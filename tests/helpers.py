"""Shared test helpers: build layers that share weights, run forward+backward, collect gradients."""

from __future__ import annotations

import dataclasses

import torch

from sparsemoe import MoE


def twin(layer: MoE, **changes) -> MoE:
    """A copy of `layer` with the same weights/buffers and some config fields changed (e.g. backend)."""
    cfg = dataclasses.replace(layer.config, **changes)
    other = MoE(cfg, dtype=layer.experts.w_in.dtype)
    other.load_state_dict(layer.state_dict())
    other.train(layer.training)
    return other


def forward_backward(layer: MoE, x: torch.Tensor, seed: int = 1):
    """Run forward and a fixed random-projection backward; return output and every gradient by name."""
    x = x.detach().clone().requires_grad_(True)
    y = layer(x)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32).to(y.dtype)
    (y * g).sum().backward()
    grads = {"x": x.grad}
    grads.update({name: p.grad for name, p in layer.named_parameters()})
    return y.detach(), grads
