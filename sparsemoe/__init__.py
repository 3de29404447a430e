"""sparsemoe: sparse Mixture-of-Experts layers, models and tools for PyTorch.

The public names below are imported on first use (PEP 562), so that `import sparsemoe.cli` stays light:
the `sparsemoe` command starts its heavy imports (torch) inside its own error handling, where Ctrl-C
during start-up is one line, not a traceback from an import.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Public name -> the module that defines it.
_EXPORTS = {
    "MoEConfig": "sparsemoe.config",
    "DispatchPlan": "sparsemoe.dispatch",
    "build_plan": "sparsemoe.dispatch",
    "register_backend": "sparsemoe.dispatch",
    "MoE": "sparsemoe.layer",
    "MoEStats": "sparsemoe.layer",
    "moe_layers": "sparsemoe.layer",
    "set_aux_loss_scale": "sparsemoe.layer",
    "update_expert_biases": "sparsemoe.layer",
    "ModelConfig": "sparsemoe.model",
    "MoETransformer": "sparsemoe.model",
    "Router": "sparsemoe.routing",
    "RoutingResult": "sparsemoe.routing",
    "quantize": "sparsemoe.quant",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'sparsemoe' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
