"""Whole-model greedy decode with the model's projections on the native kernel, and on BLAS, side by side.

    python tools/native_linear_decode.py

The mixtral-1k model of `sparsemoe bench --quant` (D=1024, 8 layers, vocabulary 32000) in float32,
bfloat16, and with int4 experts and the rest in bfloat16; for each, ms per token after the first (best of
three interleaved rounds of 24 tokens) with `sparsemoe.ops.linear` taking its native path where it applies,
and with every projection forced onto F.linear (BLAS).
"""

import copy

import torch

import sparsemoe.ops.linear as native_linear
from sparsemoe.bench.quant import MODEL_SHAPES, decode_ms_per_token
from sparsemoe.model import ModelConfig, MoETransformer
from sparsemoe.quant import quantize


def main() -> None:
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    model = MoETransformer(ModelConfig(**MODEL_SHAPES["mixtral-1k"])).eval()
    models = {"float32": model, "bfloat16": copy.deepcopy(model).to(torch.bfloat16)}
    models["int4 + bfloat16"] = quantize(copy.deepcopy(models["bfloat16"]), "int4")
    prompt = torch.randint(0, model.config.vocab_size, (16,), generator=torch.Generator().manual_seed(0))
    native = native_linear.native_applies
    paths = {"native": native, "BLAS": lambda *args: False}
    best: dict[tuple[str, str], float] = {}
    for m in models.values():
        decode_ms_per_token(m, prompt, 4)  # warm-up
    try:
        for _ in range(3):
            for name, m in models.items():
                for path, applies in paths.items():
                    native_linear.native_applies = applies
                    ms = decode_ms_per_token(m, prompt, 24)
                    best[name, path] = min(best.get((name, path), float("inf")), ms)
    finally:
        native_linear.native_applies = native
    for name in models:
        blas, ours = best[name, "BLAS"], best[name, "native"]
        print(f"{name}: {ours:.2f} ms/token with native projections, {blas:.2f} with BLAS ({blas / ours:.2f}x)")


if __name__ == "__main__":
    main()
