"""`sparsemoe profile`: where one MoE layer step spends its time, and its peak memory.

Writes profile.md, profile.json and profile.png (stage bar chart) into --out.
"""

from __future__ import annotations

import argparse
import json


from sparsemoe.commands import CommandError
from sparsemoe.commands._device import add_device_argument
from sparsemoe.commands._measure import command_line, output_dir, positive_int, setup_device, thread_count


def register(subparsers) -> argparse.ArgumentParser:
    from sparsemoe.bench.configs import BENCH_CONFIGS
    from sparsemoe.bench.suite import DTYPES

    p = subparsers.add_parser(
        "profile",
        help="break one MoE layer step into router, plan, permute, GEMMs, activation, combine and backward",
        description="Profile a forward+backward step of the MoE layer stage by stage; write markdown, JSON and a chart.",
    )
    p.add_argument("--config", choices=sorted(BENCH_CONFIGS), default="mixtral-mini", help="layer shape (default mixtral-mini)")
    p.add_argument("--tokens", type=positive_int, default=2048, help="tokens T per step (default 2048)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--backend", default="auto", help="dispatch backend (default auto)")
    p.add_argument("--recompute", action="store_true", help="recompute expert activations in backward")
    p.add_argument("--capacity-factor", type=float, default=None, help="capacity factor (default dropless)")
    p.add_argument("--steps", type=positive_int, default=3, help="profiled steps, averaged (default 3)")
    p.add_argument("--threads", type=thread_count, default=None, help="torch threads (default: torch's)")
    add_device_argument(p)
    p.add_argument("--out", default="profile-results", help="output folder (default profile-results)")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny config, T=128, 1 step")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from sparsemoe.bench.configs import BENCH_CONFIGS
    from sparsemoe.bench.plots import plot_bars
    from sparsemoe.bench.profiler import ProfileOptions, environment_for, profile_layer, profile_markdown
    from sparsemoe.bench.suite import DTYPES
    from sparsemoe.config import MoEConfig
    from sparsemoe.dispatch import backend_names
    from sparsemoe.layer import MoE

    device = setup_device(args)
    if args.backend not in backend_names():
        raise CommandError(f"--backend {args.backend!r} is not available here; accepted: {', '.join(backend_names())}")
    name, tokens, steps = ("tiny", 128, 1) if args.quick else (args.config, args.tokens, args.steps)
    bench_cfg = BENCH_CONFIGS[name]
    try:
        config = MoEConfig(
            dim=bench_cfg.dim, hidden_dim=bench_cfg.hidden_dim, num_experts=bench_cfg.num_experts,
            top_k=bench_cfg.top_k, activation=bench_cfg.activation, backend=args.backend,
            capacity_factor=args.capacity_factor, recompute_activations=args.recompute,
        )
    except ValueError as err:
        raise CommandError(str(err)) from None
    dtype = DTYPES[args.dtype]
    layer = MoE(config, device=device, dtype=dtype)
    layer.train()
    try:
        result = profile_layer(layer, tokens, dtype, ProfileOptions(steps=steps))
    except ValueError as err:  # e.g. a backend that cannot run on this device/dtype
        raise CommandError(str(err)) from None
    result.update(
        config=bench_cfg.as_dict(), tokens=tokens, dtype=args.dtype, recompute=args.recompute,
        environment=environment_for(device),
    )
    out = output_dir(args.out)
    command = command_line("profile")
    md = profile_markdown(result, command)
    (out / "profile.md").write_text(md)
    (out / "profile.json").write_text(json.dumps(dict(result, command=command), indent=1))
    written = [out / "profile.md", out / "profile.json"]
    written += plot_bars(result["stages"], f"{name} T={tokens} {args.dtype}: ms per step", "ms", out / "profile.png")
    print(md)
    print("wrote " + ", ".join(str(p) for p in written))
    return 0
