"""Where one greedy decode step of a whole model spends its time, by part of the model.

    python tools/decode_profile.py [--dtype float32|bfloat16] [--quantize int8|int4] [--tokens N] [--small-pages]

The mixtral-1k model of `sparsemoe bench --quant` (D=1024, 8 layers, vocabulary 32000, random weights).
Forward hooks on every module time it (wall clock); each module's own time is its time minus its
children's, summed per part over N decode steps after a 16-token prompt, and printed per token beside the
whole step. The MoE layer's time is split into its expert stage (`MoE._dispatch`: the experts and the
weighted combine) and the rest (router logits, top-k, the plan, the finiteness checks); "between modules"
is the step's time outside every module's forward (generate's loop, the sampler). The hooks themselves add a few microseconds per
module call, so the parts add up to a little more than an unhooked step. Hooks also make the model run its
blocks as modules (a decode step without hooks runs them as prepared native calls,
`sparsemoe.model.native_decode`): this profiles the module path, the same kernels with their Python around
them.
"""

import argparse
import copy
import time
from collections import defaultdict

import torch
from torch import nn

from sparsemoe.bench.quant import MODEL_SHAPES
from sparsemoe.layer import MoE
from sparsemoe.model import ModelConfig, MoETransformer
from sparsemoe.model.attention import Attention, RMSNorm
from sparsemoe.model.generate import stream
from sparsemoe.ops.memory import move_to_huge_pages
from sparsemoe.quant import quantize


def part_of(name: str, module: nn.Module) -> str:
    if isinstance(module, MoE):
        return "MoE: routing (router, top-k, plan, checks)"
    if name.endswith("shared_experts"):
        return "MoE: shared experts"
    if isinstance(module, Attention):
        return "attention (q, k, v projections in one call, RoPE, KV cache, softmax)"
    if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj")):
        return "attention projections called as modules (o)"
    if isinstance(module, RMSNorm):
        return "norms"
    if name == "lm_head":
        return "LM head"
    if name == "embed":
        return "embedding"
    return f"rest of {type(module).__name__}"


def profile(model: MoETransformer, tokens: int) -> tuple[dict[str, float], float]:
    """({part: seconds}, whole steps' seconds) over `tokens` decode steps."""
    own: dict[str, float] = defaultdict(float)
    stack: list[list[float]] = []  # [start, children's time] per module being run
    parts = {module: part_of(name, module) for name, module in model.named_modules()}

    def before(module, args):
        stack.append([time.perf_counter(), 0.0])

    def after(module, args, output):
        start, children = stack.pop()
        spent = time.perf_counter() - start
        own[parts[module]] += spent - children
        if stack:
            stack[-1][1] += spent

    handles = [m.register_forward_pre_hook(before) for m in parts] + [m.register_forward_hook(after) for m in parts]
    stages = {name: getattr(MoE, name) for name in ("_dispatch", "_decode_from_choices")}

    def timed(stage):  # the expert stage (from a plan, or from the router's choices), a child of its MoE layer
        def run(self, *args):
            start = time.perf_counter()
            y = stage(self, *args)
            spent = time.perf_counter() - start
            own["MoE: expert stage (the experts and the combine)"] += spent
            stack[-1][1] += spent
            return y

        return run

    for name, stage in stages.items():
        setattr(MoE, name, timed(stage))
    prompt = torch.randint(0, model.config.vocab_size, (16,), generator=torch.Generator().manual_seed(0))
    stamps: list[float] = []
    try:
        with torch.no_grad():
            steps = stream(model, prompt, tokens + 1, 0.0, None, None, True, None)
            next(steps)  # the prompt's forward: not a decode step
            own.clear()
            stamps.append(time.perf_counter())
            for _ in steps:
                stamps.append(time.perf_counter())
    finally:
        for name, stage in stages.items():
            setattr(MoE, name, stage)
        for handle in handles:
            handle.remove()
    return dict(own), stamps[-1] - stamps[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16")
    parser.add_argument("--quantize", choices=("int8", "int4"), default=None, help="quantize the experts first")
    parser.add_argument("--tokens", type=int, default=32, help="decode steps timed (default 32)")
    parser.add_argument("--small-pages", action="store_true",
                        help="leave the weights where PyTorch put them (default: moved to huge pages, as "
                        "`sparsemoe generate` does)")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = MoETransformer(ModelConfig(**MODEL_SHAPES["mixtral-1k"])).eval().to(getattr(torch, args.dtype))
    if args.quantize:
        model = quantize(copy.deepcopy(model), args.quantize)
    if not args.small_pages:
        move_to_huge_pages(model)
    profile(model, 4)  # warm-up
    own, total = profile(model, args.tokens)
    per_token = 1e3 / args.tokens
    label = f"{args.dtype}" + (f", {args.quantize} experts" if args.quantize else "")
    print(f"mixtral-1k, {label}, torch {torch.__version__}, {torch.get_num_threads()} threads: "
          f"{total * per_token:.2f} ms per decode step")  # fmt: skip
    rows = sorted(own.items(), key=lambda kv: -kv[1])
    rows.append(("between modules", total - sum(own.values())))
    for part, seconds in rows:
        print(f"  {part:45s} {seconds * per_token:7.2f} ms  {100 * seconds / total:5.1f}%")


if __name__ == "__main__":
    main()
