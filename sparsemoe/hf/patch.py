"""Swap a live transformers model's MoE blocks for sparsemoe `MoE` layers that share their weights.

    report = patch_hf_model(model, backend="grouped")
    print(report)              # which blocks were patched, which were not and why
    unpatch_hf_model(model)    # put the original blocks back (e.g. before save_pretrained)

No weight is copied: the sparsemoe layer's `router.weight`, `experts.w_in` and `experts.w_out` are the very
Parameter objects of the Hugging Face block (`gate.weight`, Granite's `router.weight`, AFMoE's `router.gate.weight`,
`experts.gate_up_proj` [E, 2F, D], `experts.down_proj` [E, D, F], the same layout), and the
`e_score_correction_bias` of DeepSeek-V3, GLM-4.5, dots.llm1, EXAONE-MoE, ERNIE 4.5 and MiniMax-M2 (AFMoE's
`expert_bias`) becomes the layer's `router.expert_bias` (the same storage). Shared experts stay the Hugging
Face modules, called as before (GraniteMoeShared's shared MLP sits beside the block and is left alone). So
an optimizer built before or after patching trains the same tensors.

Supported blocks (transformers 5 fused expert tensors): MixtralSparseMoeBlock, Qwen2MoeSparseMoeBlock,
Qwen3MoeSparseMoeBlock, OlmoeSparseMoeBlock, FlexOlmoSparseMoeBlock, GraniteMoeMoE, GraniteMoeSharedMoE,
DeepseekV2Moe, DeepseekV3MoE, Glm4MoeMoE, Dots1MoE, ExaoneMoeSparseMoEBlock, Ernie4_5_MoeSparseMoeBlock,
AfmoeSparseMoeBlock, MiniMaxM2SparseMoeBlock. Older transformers keep one nn.Linear per expert; those cannot
be stacked without a copy, and are reported as not patched.

Blocks it does not map (another family, a layout it does not know) are left as they are, and by default their
experts run on sparsemoe's backends anyway, through `experts_implementation="sparsemoe"`
(`sparsemoe.hf.experts_implementation`): transformers' own router and gate, our dispatch. The report lists them;
`experts_fallback=False` leaves them on transformers' implementation.

Behaviour differences, all outside inference: the patched layers add no balancing loss unless
`aux_loss_coef` is given (transformers computes its own from router logits, which patched blocks do not
record); in training, layers with a selection bias update it (aux-loss-free balancing), after each forward
or, with `bias_update="step"`, when `sparsemoe.update_expert_biases(model)` is called.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple, Optional

import torch
from torch import Tensor, nn

from sparsemoe.hf.config_map import EXPERTS_IMPLEMENTATION_HINT, FAMILIES, SELECTION_BIAS_FAMILIES, map_moe_config
from sparsemoe.hf.experts_implementation import NAME, is_decorated_experts, register_experts
from sparsemoe.hf.io import HFFormatError
from sparsemoe.layer import MoE


class _Block(NamedTuple):
    """A supported Hugging Face MoE block: its family and the attribute names of its parts."""

    family: str
    shared: Optional[str] = None  # its shared experts, if it holds them
    shared_gate: Optional[str] = None  # their sigmoid gate, if any
    router: str = "gate"  # the router module (a dotted path below the block), whose `weight` is [E, D]
    bias: str = "e_score_correction_bias"  # the selection bias's name, in families that have one


SUPPORTED_BLOCKS = {
    "MixtralSparseMoeBlock": _Block("mixtral"),
    "Qwen2MoeSparseMoeBlock": _Block("qwen2_moe", "shared_expert", "shared_expert_gate"),
    "Qwen3MoeSparseMoeBlock": _Block("qwen3_moe"),
    "OlmoeSparseMoeBlock": _Block("olmoe"),
    "FlexOlmoSparseMoeBlock": _Block("flex_olmo"),
    "GraniteMoeMoE": _Block("granitemoe", router="router"),
    "GraniteMoeSharedMoE": _Block("granitemoeshared", router="router"),
    "DeepseekV2Moe": _Block("deepseek_v2", "shared_experts"),
    "DeepseekV3MoE": _Block("deepseek_v3", "shared_experts"),
    "Glm4MoeMoE": _Block("glm4_moe", "shared_experts"),
    "Dots1MoE": _Block("dots1", "shared_experts"),
    "Ernie4_5_MoeSparseMoeBlock": _Block("ernie4_5_moe", "shared_experts"),
    "ExaoneMoeSparseMoEBlock": _Block("exaone_moe", "shared_experts"),
    "AfmoeSparseMoeBlock": _Block("afmoe", "shared_experts", router="router.gate", bias="expert_bias"),
    "MiniMaxM2SparseMoeBlock": _Block("minimax_m2"),
}


def _spec(module: nn.Module) -> _Block:
    return SUPPORTED_BLOCKS.get(type(module).__name__, _Block(""))


def _router(module: nn.Module) -> nn.Module:
    return module.get_submodule(_spec(module).router)


def _bias_owner(module: nn.Module) -> Optional[nn.Module]:
    """The module holding a block's selection bias (named `_spec(module).bias`): its router, the router's
    `moe_statics` (ERNIE 4.5, a [1, E] parameter), or the block (MiniMax-M2, AFMoE)."""
    name, router = _spec(module).bias, _router(module)
    for owner in (router, getattr(router, "moe_statics", None), module):
        if getattr(owner, name, None) is not None:
            return owner
    return None


class PatchedMoeBlock(nn.Module):
    """A sparsemoe `MoE` over a Hugging Face block's weights, plus its shared experts, unchanged.

    forward: hidden_states [B, S, D] -> [B, S, D], as the Hugging Face block it replaces.
    """

    def __init__(self, moe: MoE, shared: Optional[nn.Module], shared_gate: Optional[nn.Module], original: nn.Module):
        super().__init__()
        self.moe = moe
        self.shared = shared
        self.shared_gate = shared_gate
        # Kept outside the module tree (no duplicate parameters) so that unpatch_hf_model can restore it.
        self.__dict__["original"] = original

    def forward(self, hidden_states: Tensor) -> Tensor:
        y = self.moe(hidden_states)
        if self.shared is not None:
            shared = self.shared(hidden_states)
            if self.shared_gate is not None:
                shared = torch.sigmoid(self.shared_gate(hidden_states)) * shared
            y = y + shared
        return y


@dataclass
class PatchEntry:
    name: str  # module path in the model, e.g. "model.layers.3.mlp"
    block: str  # its class name
    patched: bool
    reason: str = ""  # why it was not patched
    experts_implementation: str = ""  # when not patched: the sparsemoe experts implementation its experts run on


@dataclass
class PatchReport:
    backend: str
    entries: list[PatchEntry] = field(default_factory=list)

    @property
    def patched(self) -> list[PatchEntry]:
        return [e for e in self.entries if e.patched]

    @property
    def skipped(self) -> list[PatchEntry]:
        return [e for e in self.entries if not e.patched]

    @property
    def experts_only(self) -> list[PatchEntry]:
        """Blocks not patched whose experts run through the sparsemoe experts implementation."""
        return [e for e in self.entries if e.experts_implementation]

    def __str__(self) -> str:
        lines = [f"patched {len(self.patched)} of {len(self.entries)} MoE blocks (backend {self.backend!r})"]
        if self.experts_only:
            lines[0] += (f"; the experts of {len(self.experts_only)} more run on sparsemoe's backends with "
                         f"experts_implementation={self.experts_only[0].experts_implementation!r}")  # fmt: skip
        for e in self.entries:
            status = "patched" if e.patched else f"not patched: {e.reason}"
            if e.experts_implementation:
                status += (f"; its experts run with experts_implementation={e.experts_implementation!r} "
                           "(transformers' router: no sparsemoe balancing loss or selection-bias update)")  # fmt: skip
            lines.append(f"  {e.name} ({e.block}): {status}")
        return "\n".join(lines)


def _looks_like_moe(module: nn.Module) -> bool:
    """A Hugging Face MoE block by its parts (a router `gate`, or Granite's `router`, and `experts`); not
    a sparsemoe layer, which has the same parts."""
    if isinstance(module, (MoE, PatchedMoeBlock)):
        return False
    return (hasattr(module, "gate") or hasattr(module, "router")) and hasattr(module, "experts")


def _why_not(module: nn.Module, moe_cfg, family: str, model_family: str) -> str:
    """Empty when `module` can be patched without copying, else the reason."""
    name = type(module).__name__
    if name not in SUPPORTED_BLOCKS:
        return f"block class {name} is not supported (supported: {', '.join(SUPPORTED_BLOCKS)})"
    if family != model_family:
        return f"{name} belongs to {family}, but the model config is {model_family}"
    experts = module.experts
    w_in, w_out = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
    if not isinstance(w_in, nn.Parameter) or not isinstance(w_out, nn.Parameter):
        return "experts are separate per-expert modules (older transformers); stacking them would copy the weights"
    E, F, D = moe_cfg.num_experts, moe_cfg.hidden_dim, moe_cfg.dim
    if tuple(w_in.shape) != (E, 2 * F, D) or tuple(w_out.shape) != (E, D, F):
        found = f"{tuple(w_in.shape)}/{tuple(w_out.shape)}"
        return f"expert tensors {found} are not [E, 2F, D]/[E, D, F] = {(E, 2 * F, D)}/{(E, D, F)}"
    gate_weight = getattr(_router(module), "weight", None)
    if not isinstance(gate_weight, nn.Parameter) or tuple(gate_weight.shape) != (E, D):
        return f"router weight is not an [E, D] = {(E, D)} parameter"
    if family in SELECTION_BIAS_FAMILIES and _bias_owner(module) is None:
        return f"block has no {_spec(module).bias}"
    return ""


def _sparsemoe_layer(module: nn.Module, moe_cfg, family: str) -> MoE:
    """A MoE whose parameters are the Hugging Face block's own Parameter objects."""
    with torch.device("meta"):
        moe = MoE(moe_cfg)  # meta: nothing allocated for the weights about to be replaced
    weight = _router(module).weight
    moe.router.weight = weight
    moe.experts.w_in = module.experts.gate_up_proj
    moe.experts.w_out = module.experts.down_proj
    if family in SELECTION_BIAS_FAMILIES:
        bias = getattr(_bias_owner(module), _spec(module).bias)  # the same tensor: no copy
        if isinstance(bias, nn.Parameter):  # ERNIE 4.5's [1, E], AFMoE's [E]: a buffer on the same storage
            bias = bias.detach().view(-1)
        moe.router.expert_bias = bias
    else:
        moe.router.expert_bias = torch.zeros(moe_cfg.num_experts, device=weight.device, dtype=torch.float32)
    moe.router.set_config(moe_cfg)  # bias_update="step": its load counter beside the bias, not on meta
    moe.aux_loss = torch.zeros((), device=weight.device)
    moe.train(module.training)
    return moe


def patch_hf_model(
    model: nn.Module, backend: str = "auto", aux_loss_coef: float = 0.0, bias_update: str = "forward",
    experts_fallback: bool = True,
) -> PatchReport:
    """Replace, in place, every supported MoE block of a transformers model by a sparsemoe layer.

    backend: sparsemoe dispatch backend for the patched layers ("auto", "grouped", "reference", ...).
    aux_loss_coef: Switch/GShard balancing loss the patched layers add in training (0 = none).
    bias_update: when a selection bias moves in training (MoEConfig.bias_update): "forward", or "step" (by
        `sparsemoe.update_expert_biases(model)` after each optimizer step; needed with gradient checkpointing).
    experts_fallback: run the experts of the blocks left unpatched through the sparsemoe experts implementation
        (with `backend`), where transformers' experts interface allows it.
    Returns a PatchReport listing every MoE-looking block, patched or not, with the reason. Raises ValueError
    for a bad argument (before anything is patched).
    """
    from sparsemoe.config import MoEConfig

    try:  # the arguments alone, so that a mistake in them is not reported as a model that does not map
        MoEConfig(dim=1, backend=backend, aux_loss_coef=aux_loss_coef, bias_update=bias_update)
    except ValueError as err:
        raise ValueError(f"patch_hf_model: {err}".replace("MoEConfig.", "")) from None
    config = getattr(model, "config", None)
    cfg = config.to_dict() if config is not None and hasattr(config, "to_dict") else {}
    cfg = cfg.get("text_config", cfg) if cfg.get("model_type") not in FAMILIES else cfg
    model_family = cfg.get("model_type")
    report = PatchReport(backend=backend)
    moe_cfg, config_error = None, ""
    if model_family in FAMILIES:
        try:
            moe_cfg = map_moe_config(
                cfg,
                backend=backend,
                aux_loss_coef=aux_loss_coef,
                bias_update=bias_update,
                seq_aux_loss_coef=0.0,
                z_loss_coef=0.0,
                num_shared_experts=0,
                shared_hidden_dim=None,
                shared_expert_gate=False,
            )
        except HFFormatError as err:
            config_error = str(err)
    else:
        config_error = f"model_type {model_family!r} is not supported (supported: {', '.join(FAMILIES)})"
        if not experts_fallback:
            config_error += f"; {EXPERTS_IMPLEMENTATION_HINT[0].lower()}{EXPERTS_IMPLEMENTATION_HINT[1:]}"

    targets = [(name, m) for name, m in model.named_modules() if _looks_like_moe(m)]
    for name, module in targets:
        block = type(module).__name__
        spec = SUPPORTED_BLOCKS.get(block)
        family = spec.family if spec else None
        reason = config_error or _why_not(module, moe_cfg, family, model_family)
        if reason:
            report.entries.append(PatchEntry(name, block, False, reason))
            continue
        moe = _sparsemoe_layer(module, moe_cfg, family)
        shared = getattr(module, spec.shared) if spec.shared else None
        gate = getattr(module, spec.shared_gate) if spec.shared_gate else None
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, PatchedMoeBlock(moe, shared, gate, module))
        report.entries.append(PatchEntry(name, block, True))
    if experts_fallback:
        _experts_fallback(model, report, backend)
    return report


def _experts_fallback(model: nn.Module, report: PatchReport, backend: str) -> None:
    """Point the decorated experts modules still in the model at the sparsemoe experts implementation."""
    left = {name: m for name, m in model.named_modules() if is_decorated_experts(m)}
    if not left:
        return
    implementation = register_experts(NAME if backend == "auto" else f"{NAME}_{backend}", backend)
    if hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation(implementation)
    else:  # a bare module holding transformers blocks: each experts module reads its own config
        for module in left.values():
            module.config._experts_implementation = implementation
    for entry in report.entries:
        if any(name.startswith(entry.name + ".") for name in left):
            entry.experts_implementation = implementation
    covered = [e.name + "." for e in report.entries]
    for name, module in left.items():  # experts in blocks that do not look like MoE blocks
        if not name.startswith(tuple(covered)):
            reason = "not an MoE block that patch_hf_model recognises"
            report.entries.append(PatchEntry(name, type(module).__name__, False, reason, implementation))


def unpatch_hf_model(model: nn.Module) -> int:
    """Put the original Hugging Face blocks back; returns how many were restored.

    The originals hold the same Parameter objects; the selection bias (DeepSeek-V3's and the others') is
    handed back as the patched layer holds it now (it may have moved device or been updated in training).
    """
    restored = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, PatchedMoeBlock):
            original = module.original
            owner = _bias_owner(original)
            if owner is not None:
                attr = _spec(original).bias
                held = getattr(owner, attr)
                bias = module.moe.router.expert_bias.view(held.shape)
                # A parameter (ERNIE 4.5, AFMoE) is handed back as one: a module refuses a plain tensor there.
                is_param = isinstance(held, nn.Parameter)
                setattr(owner, attr, nn.Parameter(bias, requires_grad=False) if is_param else bias)
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, original)
            restored += 1
    return restored
