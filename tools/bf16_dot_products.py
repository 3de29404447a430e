"""How fast bfloat16 weights stream through the native kernels, with and without the CPU's bfloat16 dot
products.

    python tools/bf16_dot_products.py [--threads 2] [--rounds 6]

The library as built for this CPU against the same sources built with `-mno-avx512bf16` (the weights
widened to float32 in registers), interleaved round by round: (1) one [90112, 1024] bfloat16 weight (184
MB, on huge pages) against one bfloat16 row through `cpu_kernels.linear_many`, GB/s of weight read per
call, beside `torch.sum` over the same weight as a read yardstick; (2) greedy decode of the mixtral-1k
model of `sparsemoe bench --inference` in bfloat16 (random weights on huge pages, 24 tokens after a
16-token prompt), ms per token. Exits with a message where the CPU has no AVX512-BF16 (both builds are
then the same).
"""

import argparse
import tempfile
import time
from pathlib import Path

import torch

from sparsemoe.bench.quant import MODEL_SHAPES
from sparsemoe.model import ModelConfig, MoETransformer
from sparsemoe.model.generate import stream
from sparsemoe.ops import cpu_kernels, small_kernels
from sparsemoe.ops.memory import empty_huge, move_to_huge_pages


def _decode_ms(model: MoETransformer, prompt: torch.Tensor, tokens: int) -> float:
    with torch.no_grad():
        steps = stream(model, prompt, tokens + 1, 0.0, None, None, True, None)
        next(steps)  # the prompt's forward
        start = time.perf_counter()
        for _ in steps:
            pass
    return (time.perf_counter() - start) / tokens * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not cpu_kernels.bfloat16_dot_products():
        raise SystemExit("this CPU (or compiler) has no AVX512-BF16: the kernels widen bfloat16 weights either way")
    compiler = cpu_kernels.find_compiler()
    flags = ("-O3", "-march=native", "-mno-avx512bf16", "-fopenmp")
    libraries = {
        "bfloat16 dot products": cpu_kernels.load(),
        "widened to float32": cpu_kernels._bind(cpu_kernels.build(compiler, Path(tempfile.mkdtemp()), flags)),
    }
    weight = empty_huge(90112, 1024, dtype=torch.bfloat16, device=torch.device("cpu"))
    weight.copy_(torch.randn(90112, 1024))
    x = torch.randn(1, 1024).bfloat16()
    gigabytes = weight.numel() * weight.element_size() / 1e9
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, weight {gigabytes * 1e3:.0f} MB")
    torch.manual_seed(0)
    model = MoETransformer(ModelConfig(**MODEL_SHAPES["mixtral-1k"])).eval().to(torch.bfloat16)
    move_to_huge_pages(model)
    prompt = torch.randint(0, model.config.vocab_size, (16,))
    loaders = cpu_kernels.load, small_kernels.load
    rates: dict[str, float] = {}
    decode: dict[str, list[float]] = {name: [] for name in libraries}
    try:
        for _ in range(args.rounds):
            for name, library in libraries.items():
                cpu_kernels.load = small_kernels.load = lambda library=library: library
                start = time.perf_counter()
                cpu_kernels.linear_many(x, (weight,))
                rates[name] = max(rates.get(name, 0.0), gigabytes / (time.perf_counter() - start))
                decode[name].append(_decode_ms(model, prompt, 24))
            start = time.perf_counter()
            weight.sum()
            read = gigabytes / (time.perf_counter() - start)
            rates["read (torch.sum)"] = max(rates.get("read (torch.sum)", 0.0), read)
    finally:
        cpu_kernels.load, small_kernels.load = loaders
    print(f"one row against the weight, GB/s (best of {args.rounds}):")
    for name, rate in rates.items():
        print(f"  {name:22s} {rate:5.1f}")
    print(f"mixtral-1k bfloat16 greedy decode, ms per token (best, median of {args.rounds}):")
    for name, times in decode.items():
        print(f"  {name:22s} {min(times):6.2f} {sorted(times)[len(times) // 2]:6.2f}")

if __name__ == "__main__":
    main()
