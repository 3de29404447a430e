"""PNG plots of benchmark results (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")  # no display: write files only
    import matplotlib.pyplot as plt

    return plt


def plot_suite(result: dict, out_dir: Path) -> list[Path]:
    """One PNG per (config, dtype, routing, context): forward ms, forward+backward ms and peak memory against T."""
    plt = _pyplot()
    if plt is None:
        return []
    from sparsemoe.bench.report import CONTEXT_TITLES, _group

    paths = []
    for (config, dtype, routing, context), cases in _group(result["cases"]).items():
        cases = sorted(cases, key=lambda c: c["tokens"])
        fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
        for ax, mode in zip(axes[:2], ("forward", "backward")):
            names = dict.fromkeys(n for c in cases for n in c["timings"].get(mode, {}))
            for name in names:
                pts = [(c["tokens"], c["timings"][mode][name]["min_ms"]) for c in cases if name in c["timings"].get(mode, {})]
                style = "k--" if name == "dense ideal" else "-o"
                ax.plot(*zip(*pts), style, label=name, markersize=3)
            if mode == "forward":
                bound = [(c["tokens"], c["weight_read_ms"]) for c in cases]
                ax.plot(*zip(*bound), ":", color="gray", label="weight-read bound")
            ax.set(xscale="log", yscale="log", xlabel="tokens T", ylabel="ms", title=f"{mode if mode == 'forward' else 'forward+backward'}")
            ax.grid(True, which="both", alpha=0.3)
        ax = axes[2]
        names = dict.fromkeys(n for c in cases for n in c["memory"])
        for name in names:
            pts = [(c["tokens"], c["memory"][name]["peak_mb"]) for c in cases if name in c["memory"]]
            ax.plot(*zip(*pts), "k--" if name == "dense ideal" else "-o", label=name, markersize=3)
        ax.set(xscale="log", yscale="log", xlabel="tokens T", ylabel="MiB", title="peak memory, forward+backward")
        ax.grid(True, which="both", alpha=0.3)
        axes[0].legend(fontsize=7)
        fig.suptitle(f"{config} · {dtype} · routing {routing}{CONTEXT_TITLES[context]}")
        fig.tight_layout()
        suffix = "" if context == "interleaved" else f"_{context}"
        path = out_dir / f"bench_{config}_{dtype}_{routing}{suffix}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths


def plot_utilisation(sweep: dict, out_dir: Path) -> list[Path]:
    """One bar chart per (k, capacity factor): rows kept per expert, the capacity line, the drops."""
    plt = _pyplot()
    if plt is None:
        return []
    paths = []
    for point in sweep["points"]:
        counts = point["tokens_per_expert"]
        fig, ax = plt.subplots(figsize=(7, 3.2))
        ax.bar(range(len(counts)), counts, color="tab:blue")
        if point["capacity"] is not None:
            ax.axhline(point["capacity"], color="tab:red", linestyle="--", label=f"capacity C={point['capacity']}")
            ax.legend(fontsize=8)
        cf = "dropless" if point["capacity_factor"] is None else f"cf={point['capacity_factor']}"
        ax.set(xlabel="expert", ylabel="rows kept",
               title=f"{sweep['config']} T={sweep['tokens']} {sweep['routing']}: k={point['top_k']}, {cf}, "
                     f"dropped {100 * point['dropped_fraction']:.1f}%")
        fig.tight_layout()
        path = out_dir / f"utilisation_k{point['top_k']}_{cf.replace('=', '')}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths


def plot_bars(values: dict[str, float], title: str, xlabel: str, path: Path) -> list[Path]:
    """A horizontal bar chart (used by the profiler's stage breakdown and the router benchmark)."""
    plt = _pyplot()
    if plt is None:
        return []
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(values) + 1.2))
    names = list(values)
    ax.barh(names, [values[n] for n in names], color="tab:blue")
    ax.invert_yaxis()
    ax.set(xlabel=xlabel, title=title)
    ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return [path]
