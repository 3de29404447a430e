"""Greedy decode with a step's blocks as prepared native calls (sparsemoe.model.native_decode) and as modules.

    python tools/native_decode_gain.py [--threads 2] [--rounds 4] [--tokens 24]

For mixtral-1k (the model of `sparsemoe bench --inference`, random weights on huge pages) in bfloat16 and
float32, and the demo preset in float32: ms per token of greedy decode after a 16-token prompt, with the
native decode step and with it switched off, interleaved round by round (best of the rounds), and whether
both produced the same tokens.
"""

import argparse
import time

import torch

from sparsemoe.bench.quant import MODEL_SHAPES
from sparsemoe.model import ModelConfig, MoETransformer, native_decode, preset
from sparsemoe.model.generate import stream
from sparsemoe.ops.memory import move_to_huge_pages


def _decode(model: MoETransformer, prompt: torch.Tensor, tokens: int, native: bool) -> tuple[float, list]:
    prepare = native_decode._prepare
    if not native:
        native_decode._prepare = lambda *args: None
    try:
        with torch.no_grad():
            steps = stream(model, prompt, tokens + 1, 0.0, None, None, True, None)
            next(steps)  # the prompt's forward
            start = time.perf_counter()
            out = list(steps)
        return (time.perf_counter() - start) / tokens * 1e3, out
    finally:
        native_decode._prepare = prepare


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=24)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; ms per token, best of {args.rounds} rounds")
    mixtral_1k = ModelConfig(**MODEL_SHAPES["mixtral-1k"])
    cases = [("mixtral-1k", mixtral_1k, dtype) for dtype in (torch.bfloat16, torch.float32)]
    cases.append(("demo", preset("demo", vocab_size=256), torch.float32))
    for name, config, dtype in cases:
        torch.manual_seed(0)
        model = MoETransformer(config).eval().to(dtype)
        move_to_huge_pages(model)
        prompt = torch.randint(0, config.vocab_size, (16,))
        best = {True: float("inf"), False: float("inf")}
        outputs = {}
        for _ in range(args.rounds):
            for native in (True, False):
                ms, outputs[native] = _decode(model, prompt, args.tokens, native)
                best[native] = min(best[native], ms)
        same = "same tokens" if outputs[True] == outputs[False] else "DIFFERENT tokens"
        print(f"  {name} {str(dtype).replace('torch.', ''):9s} native decode step {best[True]:6.2f}, "
              f"modules {best[False]:6.2f} ({best[False] / best[True]:.2f}x), {same}")
        del model


if __name__ == "__main__":
    main()
