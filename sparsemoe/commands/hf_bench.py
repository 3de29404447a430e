"""`sparsemoe hf-bench`: whole transformers MoE models with experts_implementation = eager, grouped_mm and
sparsemoe side by side (prefill and greedy decode); writes hf_bench.md and hf_bench.json."""

from __future__ import annotations

import argparse
import dataclasses
import json

from sparsemoe.commands import CommandError
from sparsemoe.commands._device import add_device_argument
from sparsemoe.commands._measure import command_line, csv_list, output_dir, positive_int, setup_device, thread_count

QUICK = dict(hidden=64, moe_hidden=32, dense_hidden=32, heads=4, kv_heads=2, head_dim=16, layers=2, vocab=256)


def register(subparsers) -> argparse.ArgumentParser:
    from sparsemoe.bench.hf_model import DEFAULT_FAMILIES, DEFAULT_SIZE, IMPLEMENTATIONS

    p = subparsers.add_parser(
        "hf-bench",
        help="time whole transformers MoE models with experts_implementation eager, grouped_mm and sparsemoe",
        description="Build a random model of each transformers MoE family at the given size and time prefill "
        "and greedy decode with each experts implementation (same weights and inputs, interleaved rounds), "
        "and the expert stage alone (the time minus the model's with no-op experts). Needs transformers.",
    )
    p.add_argument("--families", type=csv_list("families"), default=DEFAULT_FAMILIES,
                   help=f"comma-separated transformers model folders (default {','.join(DEFAULT_FAMILIES)}: "
                   "three expert layouts); any family that `tools/hf_experts_coverage.py` lists")
    p.add_argument("--dtypes", type=csv_list("dtypes", ("float32", "bfloat16")), default=("float32", "bfloat16"),
                   help="comma-separated: float32, bfloat16 (default both)")
    p.add_argument("--impls", type=csv_list("implementations"), default=IMPLEMENTATIONS,
                   help=f"experts implementations (default {','.join(IMPLEMENTATIONS)}; any registered name)")
    p.add_argument("--prefill", type=positive_int, default=2048, help="prefill tokens (default 2048)")
    p.add_argument("--decode", type=int, default=16, help="new tokens per decode run, at least 2 (default 16)")
    p.add_argument("--prompt", type=positive_int, default=8, help="prompt tokens before decoding (default 8)")
    p.add_argument("--repeats", type=positive_int, default=3, help="interleaved rounds (default 3)")
    s = DEFAULT_SIZE
    p.add_argument("--hidden", type=positive_int, default=s.hidden, help=f"model width (default {s.hidden})")
    p.add_argument("--moe-hidden", type=positive_int, default=s.moe_hidden,
                   help=f"routed expert width (default {s.moe_hidden})")
    p.add_argument("--experts", type=positive_int, default=s.experts, help=f"routed experts (default {s.experts})")
    p.add_argument("--top-k", type=positive_int, default=s.top_k, help=f"experts per token (default {s.top_k})")
    p.add_argument("--layers", type=positive_int, default=s.layers,
                   help=f"layers, at least (hybrid families keep one of each kind) (default {s.layers})")
    p.add_argument("--vocab", type=positive_int, default=s.vocab, help=f"vocabulary (default {s.vocab})")
    p.add_argument("--no-rest", action="store_true",
                   help="do not time the no-op experts run (no 'experts' columns)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: tiny models (width 64), prefill 64, decode 4, 1 round (options given on the "
                   "command line take precedence)")
    p.add_argument("--threads", type=thread_count, default=None, help="torch threads (default: torch's)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall", help="wall (default) or process CPU time")
    add_device_argument(p)
    p.add_argument("--out", default="hf-bench-results", help="output folder (default hf-bench-results)")
    p.set_defaults(func=run)
    return p


def _given(args: argparse.Namespace, name: str) -> bool:
    return f"--{name.replace('_', '-')}" in args.argv


def run(args: argparse.Namespace) -> int:
    try:
        import transformers.integrations.moe  # noqa: F401
    except ImportError:
        raise CommandError("hf-bench needs transformers >= 5 (pip install 'sparsemoe[hf]')") from None
    import sparsemoe.hf  # noqa: F401  (registers "sparsemoe")
    from sparsemoe.bench.hf_model import DEFAULT_SIZE, HFModelBenchOptions, hf_model_markdown, run_hf_model_bench
    from sparsemoe.hf.families import experts_families

    args.argv = command_line("hf-bench").split()
    if args.decode < 2:
        raise CommandError("--decode must be at least 2 (the per-token time is a difference of two runs)")
    known = experts_families()
    unknown = [f for f in args.families if f not in known]
    if unknown:
        raise CommandError(f"--families: {', '.join(unknown)} not found; the installed transformers has "
                           f"{', '.join(known)}")  # fmt: skip
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    bad = [i for i in args.impls if i != "eager" and i not in ALL_EXPERTS_FUNCTIONS]
    if bad:
        accepted = ", ".join(["eager", *ALL_EXPERTS_FUNCTIONS])
        raise CommandError(f"--impls: {', '.join(bad)} not registered; accepted: {accepted}")
    device = setup_device(args)
    size = dataclasses.replace(
        DEFAULT_SIZE, hidden=args.hidden, moe_hidden=args.moe_hidden, dense_hidden=args.moe_hidden,
        experts=args.experts, top_k=args.top_k, layers=args.layers, vocab=args.vocab,
    )  # fmt: skip
    prefill, decode, repeats = args.prefill, args.decode, args.repeats
    if args.quick:
        size = dataclasses.replace(size, **{k: v for k, v in QUICK.items() if not _given(args, k)})
        prefill = prefill if _given(args, "prefill") else 64
        decode = decode if _given(args, "decode") else 4
        repeats = repeats if _given(args, "repeats") else 1
    if size.top_k > size.experts:
        raise CommandError(f"--top-k {size.top_k} is more than --experts {size.experts}")
    opts = HFModelBenchOptions(
        families=args.families, dtypes=args.dtypes, implementations=args.impls, size=size, prefill_tokens=prefill,
        decode_tokens=decode, prompt_tokens=args.prompt, repeats=repeats, device=str(device), clock=args.clock,
        subtract_rest=not args.no_rest,
    )  # fmt: skip
    out = output_dir(args.out)
    result = run_hf_model_bench(opts)
    text = hf_model_markdown(result, " ".join(args.argv))
    (out / "hf_bench.md").write_text(text)
    (out / "hf_bench.json").write_text(json.dumps(result, indent=1))
    print(text)
    print(f"wrote {out / 'hf_bench.md'}, {out / 'hf_bench.json'}")
    return 0
