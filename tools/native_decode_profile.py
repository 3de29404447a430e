"""Where one greedy decode step spends its time when its blocks run as prepared native calls.

    python tools/native_decode_profile.py [--dtype float32|bfloat16] [--quantize int8|int4] [--tokens N] [--threads T]

The mixtral-1k model of `sparsemoe bench --inference` (D=1024, 8 layers, 8 experts of 2816, top-2,
vocabulary 32000, random weights on huge pages), greedy decode of N tokens after a 16-token prompt. The
native step (`sparsemoe.model.native_decode`) makes each block two native calls, an attention half and an
MoE half, then the final norm and the LM head; this tool times each of those calls (wall clock), the check
that the prepared calls still hold (`native_decode()`), and the rest of the step (Python inside the step,
the embedding, the sampler, generate's loop), per token. Beside each kernel part: the bytes of weights it
reads per token and the rate it read them at, against the copy bandwidth measured in the same run (read +
write, STREAM's convention, as `sparsemoe bench --inference` reports it). `tools/decode_profile.py` profiles
the module path by module instead.
"""

import argparse
import copy
import time
from collections import defaultdict

import torch

from sparsemoe.bench.measure import copy_bandwidth
from sparsemoe.bench.quant import MODEL_SHAPES
from sparsemoe.model import ModelConfig, MoETransformer
from sparsemoe.model import native_decode as native_module
from sparsemoe.model import transformer as transformer_module
from sparsemoe.model.generate import stream
from sparsemoe.ops.memory import move_to_huge_pages
from sparsemoe.quant import quantize

PARTS = {  # the prepared step's calls, as NativeDecode holds them
    "attention_half": "attention halves (norm, q/k/v, attention, o, residual, norm)",
    "moe_half": "MoE halves (router, top-k, experts, residual)",
    "rms_norm": "final norm and LM head",
    "linear_many": "final norm and LM head",
}
CHECK = "the check that the prepared calls hold (native_decode())"


def _timed(seconds: dict, part: str, function):
    def run(*args):
        start = time.perf_counter()
        out = function(*args)
        seconds[part] += time.perf_counter() - start
        return out

    return run


def _weight_bytes(model: MoETransformer) -> dict[str, int]:
    """Bytes of weights each kernel part reads per token (batch 1: K distinct experts per MoE layer)."""
    size = lambda t: t.numel() * t.element_size()  # noqa: E731
    attention = moe = 0
    for block in model.layers:
        attention += sum(size(p.weight) for p in (block.attn.q_proj, block.attn.k_proj, block.attn.v_proj,
                                                  block.attn.o_proj, block.attn_norm, block.ffn_norm))  # fmt: skip
        experts, cfg = block.ffn.experts, block.ffn.config
        stored = [getattr(experts, name) for name in ("w_in", "w_out")]
        per_expert = sum(size(t) for w in stored for t in ((w.data, w.scale) if hasattr(w, "scale") else (w,)))
        moe += size(block.ffn.router.weight) + per_expert * cfg.top_k // cfg.num_experts
    head = model.embed.weight if model.lm_head is None else model.lm_head.weight
    return {PARTS["attention_half"]: attention, PARTS["moe_half"]: moe, PARTS["linear_many"]: size(model.norm.weight) + size(head)}  # fmt: skip


def profile(model: MoETransformer, tokens: int) -> tuple[dict[str, float], float, int]:
    """({part: seconds}, the steps' seconds, native steps run) over `tokens` decode steps."""
    seconds: dict[str, float] = defaultdict(float)
    runs = []
    real_init, real_check = native_module.NativeDecode.__init__, transformer_module.native_decode

    def init(self, *args):
        real_init(self, *args)
        for name, part in PARTS.items():
            setattr(self, name, _timed(seconds, part, getattr(self, name)))
        real_run = self.run
        self.run = lambda *args: runs.append(1) or real_run(*args)

    native_module.NativeDecode.__init__ = init
    transformer_module.native_decode = _timed(seconds, CHECK, real_check)
    prompt = torch.randint(0, model.config.vocab_size, (16,), generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            steps = stream(model, prompt, tokens + 1, 0.0, None, None, True, None)
            next(steps)  # the prompt's forward: not a decode step
            seconds.clear()
            start = time.perf_counter()
            for _ in steps:
                pass
            total = time.perf_counter() - start
    finally:
        native_module.NativeDecode.__init__, transformer_module.native_decode = real_init, real_check
    return dict(seconds), total, len(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16")
    parser.add_argument("--quantize", choices=("int8", "int4"), default=None, help="quantize the experts first")
    parser.add_argument("--tokens", type=int, default=32, help="decode steps timed (default 32)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = MoETransformer(ModelConfig(**MODEL_SHAPES["mixtral-1k"])).eval().to(getattr(torch, args.dtype))
    if args.quantize:
        model = quantize(copy.deepcopy(model), args.quantize)
    move_to_huge_pages(model)
    profile(model, 4)  # warm-up
    bandwidth = copy_bandwidth()
    seconds, total, native_steps = profile(model, args.tokens)
    if native_steps != args.tokens:
        raise SystemExit(f"only {native_steps} of {args.tokens} steps ran natively: nothing to profile")
    per_token = 1e3 / args.tokens
    label = f"{args.dtype}" + (f", {args.quantize} experts" if args.quantize else "")
    print(f"mixtral-1k, {label}, torch {torch.__version__}, {torch.get_num_threads()} threads, copy bandwidth "
          f"{bandwidth / 1e9:.1f} GB/s: {total * per_token:.2f} ms per decode step")  # fmt: skip
    weights = _weight_bytes(model)
    rows = sorted(seconds.items(), key=lambda kv: -kv[1])
    rows.append(("the rest (Python in the step, embedding, sampler, generate's loop)", total - sum(seconds.values())))
    for part, spent in rows:
        rate = f"  {weights[part] / 1e6:6.1f} MB at {weights[part] / spent * args.tokens / 1e9:5.1f} GB/s" if part in weights else ""
        print(f"  {part:68s} {spent * per_token:6.2f} ms {100 * spent / total:5.1f}%{rate}")


if __name__ == "__main__":
    main()
