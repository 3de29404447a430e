"""Markdown and JSON reports of a benchmark run.

Tables put implementations in rows and token counts in columns. Besides milliseconds they give the
ratios the project's targets are stated in: speed relative to the dense ideal (dense time / time, so
1.0 = as fast as a dense MLP with the same FLOPs) and, for small batches, the fraction of the
weight-read bound reached (bound time / time, 1.0 = reading the active weights once at copy speed).
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

MODE_TITLES = {"forward": "forward", "backward": "forward+backward"}
SMALL_BATCH_MAX_TOKENS = 128  # the weight-read bound is shown for T up to this


def header(result: dict, command: str) -> list[str]:
    env = result["environment"]
    lines = [
        f"Command: `{command}`",
        "",
        f"torch {env['torch']}, transformers {env.get('transformers') or 'not installed'}, python {env['python']}; "
        f"device {env['device']} ({env['device_name']}), {env['threads']} threads, {env['cpu_count']} logical CPUs, "
        f"native CPU kernels {env.get('cpu_kernels', 'off')}; "
        f"load average at start {_load(env)}; copy bandwidth {result['copy_bandwidth_gbs']:.1f} GB/s "
        "(read + write, STREAM convention).",
        "",
        f"Times ({env.get('clock', 'wall')} clock) are the minimum over repeats (median in the JSON), interleaved "
        "round by round unless a section says otherwise (each alone: one implementation at a time; mixed process: "
        "the attention half of a training step runs before every call). "
        "The expert stage is timed from the "
        "routing (expert ids and weights) to the combined output; `dense ideal` is one expert-shaped MLP over "
        "T*K rows (same FLOPs, no routing). Every output is checked against the reference loop's (or the "
        "grouped backend's) before timing: the largest relative error is in the JSON, and a note flags any above "
        "the tolerance of the dtype.",
        "",
    ]
    return lines


def _load(env: dict) -> str:
    load = env.get("load_average")
    return "n/a" if not load else f"{load[0]:.2f}"


CONTEXT_TITLES = {"interleaved": "", "alone": " · each alone", "mixed": " · mixed process"}


def _group(cases: list[dict]) -> dict:
    groups = defaultdict(list)
    for case in cases:
        groups[(case["config"], case["dtype"], case["routing"], case.get("context", "interleaved"))].append(case)
    return groups


def _impl_order(cases: list[dict], mode: str) -> list[str]:
    names: dict[str, None] = {}
    for case in cases:
        for name in case["timings"].get(mode, {}):
            names[name] = None
    return list(names)


def format_ms(ms: float) -> str:
    """A time in ms for the whole-model tables: three significant digits, one decimal from 10 ms."""
    return f"{ms:.1f}" if ms >= 10 else f"{ms:.2f}" if ms >= 1 else f"{ms:.3g}"


def _fmt_ms(ms: float) -> str:
    return f"{ms:.3f}" if ms < 1 else f"{ms:.2f}" if ms < 100 else f"{ms:.0f}"


def markdown(result: dict, command: str) -> str:
    lines = ["# sparsemoe bench", ""] + header(result, command)
    for (config, dtype, routing, context), cases in _group(result["cases"]).items():
        cases = sorted(cases, key=lambda c: c["tokens"])
        tokens = [c["tokens"] for c in cases]
        lines += [f"## {config} · {dtype} · routing {routing}{CONTEXT_TITLES[context]}", ""]
        modes = [m for m in ("forward", "backward") if any(m in c["timings"] for c in cases)]
        for mode in modes:
            lines += _time_table(cases, tokens, mode)
        if "backward" in modes and context != "interleaved":
            lines += _kernel_table(cases, tokens)
        if any(c["memory"] for c in cases):
            lines += _memory_table(cases, tokens)
        notes = _notes(cases)
        if notes:
            lines += notes + [""]
    return "\n".join(lines) + "\n"


def _time_table(cases: list[dict], tokens: list[int], mode: str) -> list[str]:
    title = MODE_TITLES[mode]
    lines = [
        f"**{title}**: ms, and in brackets speed relative to the dense ideal (dense ms / ms)",
        "",
        "| implementation | " + " | ".join(f"T={t}" for t in tokens) + " |",
        "|---" * (len(tokens) + 1) + "|",
    ]
    for name in _impl_order(cases, mode):
        cells = []
        for case in cases:
            timing = case["timings"].get(mode, {}).get(name)
            dense = case["timings"].get(mode, {}).get("dense ideal")
            if timing is None:
                cells.append("–")
            elif dense is None or name == "dense ideal":
                cells.append(_fmt_ms(timing["min_ms"]))
            else:
                cells.append(f"{_fmt_ms(timing['min_ms'])} ({dense['min_ms'] / timing['min_ms']:.2f})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if mode == "forward":
        cells = []
        for case in cases:
            if case["tokens"] > SMALL_BATCH_MAX_TOKENS:
                cells.append("")
                continue
            auto = case["timings"]["forward"].get("sparsemoe auto")
            frac = f" (auto reaches {case['weight_read_ms'] / auto['min_ms']:.2f})" if auto else ""
            cells.append(f"{_fmt_ms(case['weight_read_ms'])}{frac}")
        lines.append("| weight-read bound | " + " | ".join(cells) + " |")
    return lines + [""]


def _kernel_table(cases: list[dict], tokens: list[int]) -> list[str]:
    """Page faults and system CPU time per forward+backward call (medians): the kernel's share of a call,
    mostly first touches of freshly allocated memory."""
    lines = [
        "**forward+backward, the kernel's share**: page faults / system CPU ms per call (medians)",
        "",
        "| implementation | " + " | ".join(f"T={t}" for t in tokens) + " |",
        "|---" * (len(tokens) + 1) + "|",
    ]
    for name in _impl_order(cases, "backward"):
        cells = []
        for case in cases:
            timing = case["timings"].get("backward", {}).get(name)
            known = timing is not None and "page_faults" in timing
            cells.append(f"{timing['page_faults']:.0f} / {timing['sys_ms']:.1f}" if known else "–")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines + [""]


def _memory_table(cases: list[dict], tokens: list[int]) -> list[str]:
    lines = [
        "**peak memory of forward+backward**: MiB allocated above the inputs and weights, and in brackets the "
        "ratio to the dense ideal; the second number excludes the gradients returned (weights, input, routing weights)",
        "",
        "| implementation | " + " | ".join(f"T={t}" for t in tokens) + " |",
        "|---" * (len(tokens) + 1) + "|",
    ]
    names: dict[str, None] = {}
    for case in cases:
        names.update(dict.fromkeys(case["memory"]))
    for name in names:
        cells = []
        for case in cases:
            mem, dense = case["memory"].get(name), case["memory"].get("dense ideal")
            if mem is None:
                cells.append("–")
                continue
            act = mem["peak_mb"] - mem["grads_mb"]
            cell = f"{mem['peak_mb']:.1f} / {act:.1f}"
            if dense and name != "dense ideal":
                dense_act = dense["peak_mb"] - dense["grads_mb"]
                ratio = act / dense_act if dense_act > 0 else float("nan")
                cell += f" ({mem['peak_mb'] / dense['peak_mb']:.2f} / {ratio:.2f})"
            cells.append(cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines + [""]


def _notes(cases: list[dict]) -> list[str]:
    notes: dict[str, None] = {}
    for case in cases:
        for name, chosen in case["notes"].items():
            notes[f"T={case['tokens']}: `{name}` chose `{chosen}`"] = None
        for name, why in case["skipped"].items():
            notes[f"`{name}` not run: {why}"] = None
        for name, err in case["errors"].items():
            notes[f"T={case['tokens']}: `{name}` failed: {err}"] = None
        agreement = case.get("agreement") or {}
        for name, err in agreement.get("max_rel_error", {}).items():
            if not err <= agreement["tolerance"]:  # NaN too
                notes[
                    f"T={case['tokens']}: **`{name}`'s output differs from `{agreement['oracle']}`'s** by {err:.2e} "
                    f"of its largest value (tolerance {agreement['tolerance']:.0e})"
                ] = None
    return [f"- {n}" for n in notes]


def write_reports(result: dict, out_dir: Path, command: str, stem: str = "bench") -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    json_path.write_text(json.dumps(dict(result, command=command), indent=1, default=str))
    md_path.write_text(markdown(result, command))
    return [json_path, md_path]
