"""One MoE layer of a model preset against its dense twin's MLP, forward+backward, and where the MoE layer's
time goes.

    python tools/moe_vs_dense_layer.py [--preset demo] [--precision bf16] [--threads 2] [--rounds 15]

The layer as the preset builds it (and the dense twin's MLP of the same active width: `dense_baseline()`) on
the trainer's batch, 16 x 256 tokens of random input, under bfloat16 autocast for bf16 (as `sparsemoe train
--precision bf16`), interleaved round by round: best and median ms. Then `torch.profiler` over 5 MoE calls,
the ops that take the most self time per call.
"""

import argparse
import time

import torch

from sparsemoe.dispatch import fused
from sparsemoe.model import MoETransformer, preset
from sparsemoe.ops.memory import keep_freed_memory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="bf16")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    keep_freed_memory()  # as the sparsemoe command does
    config = preset(args.preset, vocab_size=256)
    layers = {
        "MoE layer": MoETransformer(config).layers[0].ffn,
        "dense twin's MLP": MoETransformer(config.dense_baseline()).layers[0].ffn,
    }
    x, g = torch.randn(16, 256, config.dim), torch.randn(16, 256, config.dim)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16")

    def step(layer):
        x_in = x.clone().requires_grad_()
        with autocast:
            y = layer(x_in)
        (y.float() * g).sum().backward()

    times: dict[str, list[float]] = {name: [] for name in layers}
    for _ in range(3):
        for layer in layers.values():
            step(layer)
    for _ in range(args.rounds):
        for name, layer in layers.items():
            start = time.perf_counter()
            step(layer)
            times[name].append((time.perf_counter() - start) * 1e3)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, preset {args.preset}, {args.precision}, "
          f"forward+backward ms (best, median of {args.rounds}):")  # fmt: skip
    for name, ms in times.items():
        print(f"  {name:18s} {min(ms):7.2f} {sorted(ms)[len(ms) // 2]:7.2f}")
    fused.label_stages(True)
    try:
        with torch.profiler.profile() as profile:
            for _ in range(5):
                step(layers["MoE layer"])
    finally:
        fused.label_stages(False)
    print("MoE layer under torch.profiler, self time per call (ms), the 15 largest:")
    events = sorted(profile.key_averages(), key=lambda e: -e.self_cpu_time_total)[:15]
    for event in events:
        print(f"  {event.key[:60]:60s} {event.self_cpu_time_total / 5e3:7.3f}  x{event.count // 5}")


if __name__ == "__main__":
    main()
