"""The end-of-run report in the run folder: loss curves, the expert-load heatmap, a markdown summary.

loss.png         training loss (per log interval) and validation loss against steps
expert_load.png  one panel per MoE layer: each expert's share of the routed tokens over training
report.md        configuration, sizes, final numbers, links to the images
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional


def read_metrics(path: Path) -> list[dict[str, Any]]:
    records = []
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display needed; files only
    import matplotlib.pyplot as plt

    return plt


def plot_losses(records: list[dict[str, Any]], path: Path, title: str = "") -> None:
    plt = _pyplot()
    train = [r for r in records if r.get("event") == "train"]
    evals = [r for r in records if r.get("event") == "eval"]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
    if evals:
        ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats per byte)")
    ax.set_title(title or "loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_expert_load(records: list[dict[str, Any]], path: Path, layer_ids: Optional[list[int]] = None) -> bool:
    """Heatmaps [experts x log steps] of token share, one per MoE layer. False when there is no MoE layer."""
    train = [r for r in records if r.get("event") == "train" and r.get("expert_load")]
    if not train:
        return False
    plt = _pyplot()
    import numpy as np

    num_layers = len(train[0]["expert_load"])
    layer_ids = layer_ids or list(range(num_layers))
    steps = [r["step"] for r in train]
    shares = [np.array([r["expert_load"][i] for r in train]).T for i in range(num_layers)]  # each [E, steps]
    num_experts = shares[0].shape[0]
    vmax = max(2.0 / num_experts, max(float(s.max()) for s in shares))  # one scale for every layer
    fig, axes = plt.subplots(num_layers, 1, figsize=(8, 1.2 + 1.3 * num_layers), squeeze=False, sharex=True)
    image = None
    for i, share in enumerate(shares):
        ax = axes[i][0]
        image = ax.imshow(
            share,
            aspect="auto",
            interpolation="nearest",
            cmap="viridis",
            vmin=0,
            vmax=vmax,
            extent=(steps[0] - 0.5, steps[-1] + 0.5, num_experts - 0.5, -0.5),
        )
        every = max(1, num_experts // 8)  # every expert up to 8, else every few
        ax.set_yticks(range(0, num_experts, every))
        ax.set_ylabel(f"layer {layer_ids[i]}\nexpert")
    axes[-1][0].set_xlabel("step")
    fig.suptitle(f"share of each MoE layer's routed tokens per expert over training (uniform = 1/{num_experts})")
    bar = fig.colorbar(image, ax=[a[0] for a in axes], fraction=0.03)
    bar.set_label("share of the layer's tokens")
    bar.ax.axhline(1 / num_experts, color="white", linewidth=1.5)  # the uniform share
    bar.ax.text(-0.2, 1 / num_experts, f"1/{num_experts}", transform=bar.ax.get_yaxis_transform(), va="center",
                ha="right", fontsize=7)  # fmt: skip
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_report(run_dir: Path, summary: dict[str, Any], layer_ids: Optional[list[int]] = None) -> Path:
    """Write loss.png, expert_load.png (MoE only) and report.md into run_dir; returns report.md."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir / "metrics.jsonl")
    title = summary.get("title", "")
    plot_losses(records, run_dir / "loss.png", title)
    has_heatmap = plot_expert_load(records, run_dir / "expert_load.png", layer_ids)
    train = [r for r in records if r.get("event") == "train"]
    evals = [r for r in records if r.get("event") == "eval"]
    lines = [f"# Training report: {title}", ""]
    lines += ["| quantity | value |", "|---|---|"]
    for key, value in summary.get("rows", {}).items():
        lines.append(f"| {key} | {value} |")
    if train:
        lines.append(f"| first logged train loss (step {train[0]['step']}) | {train[0]['loss']:.4f} |")
        lines.append(f"| last logged train loss (step {train[-1]['step']}) | {train[-1]['loss']:.4f} |")
        if "load_imbalance" in train[-1]:
            lines.append(f"| last load imbalance (max/mean expert load) | {train[-1]['load_imbalance']:.3f} |")
    if evals:
        best = min(evals, key=lambda r: r["val_loss"])
        lines.append(f"| final validation loss (step {evals[-1]['step']}) | {evals[-1]['val_loss']:.4f} |")
        lines.append(f"| final validation perplexity | {evals[-1]['val_ppl']:.3f} |")
        if "val_bpb" in evals[-1]:
            lines.append(f"| final validation bits per byte | {evals[-1]['val_bpb']:.4f} |")
        lines.append(f"| best validation loss (step {best['step']}) | {best['val_loss']:.4f} |")
    lines += ["", "![loss curves](loss.png)", ""]
    if has_heatmap:
        lines += ["![expert load over training](expert_load.png)", ""]
    if evals:
        bpb = all("val_bpb" in r for r in evals)
        lines += ["## Validation", "", "| step | loss per token | perplexity |" + (" bits per byte |" if bpb else "")]
        lines.append("|---|---|---|" + ("---|" if bpb else ""))
        lines += [
            f"| {r['step']} | {r['val_loss']:.4f} | {r['val_ppl']:.3f} |" + (f" {r['val_bpb']:.4f} |" if bpb else "")
            for r in evals
        ]
        lines.append("")
    path = run_dir / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
