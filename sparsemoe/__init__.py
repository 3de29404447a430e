"""sparsemoe: sparse Mixture-of-Experts layers, models and tools for PyTorch."""

from sparsemoe.config import MoEConfig
from sparsemoe.dispatch import DispatchPlan, build_plan, register_backend
from sparsemoe.layer import MoE, MoEStats, moe_layers, set_aux_loss_scale, update_expert_biases
from sparsemoe.model import ModelConfig, MoETransformer
from sparsemoe.routing import Router, RoutingResult

__version__ = "0.1.0"

__all__ = [
    "DispatchPlan",
    "MoE",
    "MoEConfig",
    "MoEStats",
    "ModelConfig",
    "MoETransformer",
    "Router",
    "RoutingResult",
    "build_plan",
    "moe_layers",
    "register_backend",
    "set_aux_loss_scale",
    "update_expert_biases",
]
