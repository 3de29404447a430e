"""Whole Hugging Face Mixtral MoE blocks (router included): transformers' own implementations beside
the same block patched by `sparsemoe.hf.patch_hf_model` (same weight tensors, sparsemoe's backends).

Legend: T tokens, D model width, E experts, K experts per token.
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import nn

from sparsemoe.bench.configs import BenchConfig
from sparsemoe.bench.impls import HF_IMPLEMENTATIONS
from sparsemoe.bench.measure import time_interleaved


class _Holder(nn.Module):
    """A one-block 'model' with the config `patch_hf_model` reads."""

    def __init__(self, block: nn.Module, config) -> None:
        super().__init__()
        self.block = block
        self.config = config


def _blocks(cfg: BenchConfig, dtype: torch.dtype, backend: str) -> Optional[dict[str, nn.Module]]:
    try:
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    except ImportError:
        return None
    from sparsemoe.hf.patch import patch_hf_model

    blocks: dict[str, nn.Module] = {}
    torch.manual_seed(0)
    reference = None
    for implementation in HF_IMPLEMENTATIONS:
        hf_config = MixtralConfig(
            hidden_size=cfg.dim, intermediate_size=cfg.hidden_dim, num_local_experts=cfg.num_experts,
            num_experts_per_tok=cfg.top_k, hidden_act="silu", experts_implementation=implementation,
        )  # fmt: skip
        block = MixtralSparseMoeBlock(hf_config).to(dtype)
        if reference is None:
            with torch.no_grad():  # transformers leaves initialisation to the model; N(0, 0.02) as Mixtral's
                for param in block.parameters():
                    param.normal_(0.0, 0.02)
            reference = block
        else:
            block.load_state_dict(reference.state_dict())
        blocks[f"hf {implementation}"] = block
    holder = _Holder(copy.deepcopy(reference), hf_config)
    report = patch_hf_model(holder, backend=backend)
    if not report.patched:
        raise RuntimeError(f"could not patch the Mixtral block: {report}")
    blocks[f"hf patched (sparsemoe {backend})"] = holder.block
    return blocks


def run_hf_block_bench(
    cfg: BenchConfig, tokens: tuple[int, ...], dtype: torch.dtype = torch.float32, repeats: int = 5,
    backend: str = "auto", clock: str = "wall",
) -> dict:
    """{"config", "dtype", "rows": [{"tokens", "mode", "impl", "min_ms", "median_ms"}]} or {"skipped": why}."""
    blocks = _blocks(cfg, dtype, backend)
    if blocks is None:
        return {"skipped": "transformers is not installed"}
    rows = []
    for T in tokens:
        x = torch.randn(1, T, cfg.dim, generator=torch.Generator().manual_seed(T)).to(dtype)  # [B, S, D]
        grad = torch.randn(1, T, cfg.dim, generator=torch.Generator().manual_seed(T + 1)).to(dtype)
        outputs = {name: block(x) for name, block in blocks.items()}  # the patched block must agree
        ref = outputs["hf eager"].float()
        tol = 1e-4 if dtype == torch.float32 else 5e-2
        for name, y in outputs.items():
            err = (y.float() - ref).abs().max().item() / ref.abs().max().clamp_min(1e-6).item()
            if err > tol:
                raise RuntimeError(f"{name} differs from hf eager by {err:.3g} (relative) at T={T}")

        def forward(block=None):
            with torch.no_grad():
                block(x)

        def backward(block=None):
            xg = x.detach().requires_grad_(True)
            block(xg).backward(grad)
            block.zero_grad(set_to_none=True)

        for mode, step in (("forward", forward), ("forward+backward", backward)):
            fns = {name: (lambda b=block, s=step: s(b)) for name, block in blocks.items()}
            for name, timing in time_interleaved(fns, repeats, clock=clock).items():
                rows.append({"tokens": T, "mode": mode, "impl": name, "min_ms": timing["min_ms"], "median_ms": timing["median_ms"]})
    return {"config": cfg.as_dict(), "dtype": str(dtype).removeprefix("torch."), "backend": backend, "rows": rows}


def hf_block_markdown(result: dict) -> list[str]:
    if "skipped" in result:
        return [f"Hugging Face block benchmark skipped: {result['skipped']}.", ""]
    cfg = result["config"]
    tokens = sorted({r["tokens"] for r in result["rows"]})
    impls = list(dict.fromkeys(r["impl"] for r in result["rows"]))
    lines = [
        f"### Hugging Face Mixtral block, {cfg['name']}, {result['dtype']} (router included; min ms, "
        "brackets = speed-up over hf grouped_mm)",
        "",
    ]
    for mode in ("forward", "forward+backward"):
        lines += [f"**{mode}**", "", "| implementation | " + " | ".join(f"T={t}" for t in tokens) + " |",
                  "|---|" + "---|" * len(tokens)]  # fmt: skip
        ms = {(r["impl"], r["tokens"]): r["min_ms"] for r in result["rows"] if r["mode"] == mode}
        for impl in impls:
            cells = [f"{ms[impl, t]:.3g} ({ms['hf grouped_mm', t] / ms[impl, t]:.2f}x)" for t in tokens]
            lines.append(f"| {impl} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines
