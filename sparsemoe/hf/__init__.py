"""Hugging Face interop: run any transformers MoE model on sparsemoe's backends, and load, convert, export
and patch MoE models (Mixtral, Qwen, OLMoE, DeepSeek, GLM, ...).

Importing this package registers `experts_implementation="sparsemoe"` with transformers when transformers
is installed (`register_experts()` does it explicitly, also under other names and with a chosen backend).
Loading, converting and exporting read and write `config.json` and safetensors directly and need only
torch; the experts implementation and patching work on a live transformers model (the `hf` extra).
"""

from sparsemoe.hf.config_map import FAMILIES, MappedConfig, map_config, map_moe_config, read_hf_config
from sparsemoe.hf.experts_implementation import UnsupportedExperts, experts_forward, register_experts
from sparsemoe.hf.convert import hf_to_sparsemoe, read_sparsemoe_checkpoint, sparsemoe_to_hf
from sparsemoe.hf.export import (
    EXPORT_FAMILIES,
    export_family,
    export_hf,
    export_hf_mixtral,
    glm4_incompatibilities,
    mixtral_incompatibilities,
)
from sparsemoe.hf.io import CheckpointFiles, HFFormatError, write_safetensors
from sparsemoe.hf.load import LoadedModel, load_hf, load_hf_model
from sparsemoe.hf.patch import PatchedMoeBlock, PatchReport, patch_hf_model, unpatch_hf_model

try:
    register_experts()
except ImportError:  # transformers absent, or without the experts interface: nothing to register with
    pass

__all__ = [
    "EXPORT_FAMILIES",
    "FAMILIES",
    "CheckpointFiles",
    "HFFormatError",
    "LoadedModel",
    "MappedConfig",
    "PatchReport",
    "PatchedMoeBlock",
    "UnsupportedExperts",
    "export_family",
    "export_hf",
    "experts_forward",
    "export_hf_mixtral",
    "glm4_incompatibilities",
    "hf_to_sparsemoe",
    "load_hf",
    "load_hf_model",
    "map_config",
    "map_moe_config",
    "mixtral_incompatibilities",
    "patch_hf_model",
    "read_hf_config",
    "read_sparsemoe_checkpoint",
    "register_experts",
    "sparsemoe_to_hf",
    "unpatch_hf_model",
    "write_safetensors",
]
