"""`sparsemoe generate`: continue a prompt with a trained checkpoint, streaming the text as it comes."""

from __future__ import annotations

import argparse
import codecs
import sys
import time

from sparsemoe.commands import CommandError
from sparsemoe.commands._tokenizer import checkpoint_tokenizer
from sparsemoe.commands._device import (
    add_device_argument, add_dtype_argument, add_verify_argument, device_from_args, dtype_from_args,
)  # fmt: skip


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "generate",
        help="continue a prompt with a trained checkpoint",
        description="Sample a continuation of --prompt from a checkpoint written by `sparsemoe train`, "
        "printing bytes as they are generated; the time to the first token and per token after it go to stderr.",
    )
    p.add_argument(
        "--checkpoint", required=True, metavar="RUN", help="run folder (its latest checkpoint) or a checkpoint folder"
    )
    p.add_argument("--prompt", default="", help="text to continue (default: a newline)")
    p.add_argument(
        "--max-new-tokens", type=int, default=200, metavar="N", help="tokens (bytes) to generate (default 200)"
    )
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature; 0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=0, help="sample only from the k likeliest tokens; 0 = off (default 0)")
    p.add_argument(
        "--top-p",
        type=float,
        default=0.95,
        help="nucleus sampling: the smallest set holding this probability mass; 1 = off (default 0.95)",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed of the sampler (default 0)")
    p.add_argument(
        "--no-cache", action="store_true", help="recompute the whole context each step instead of using the KV cache"
    )
    add_device_argument(p)
    add_dtype_argument(p)
    add_verify_argument(p)
    p.add_argument(
        "--tokenizer",
        metavar="PATH",
        help="bytes, a tokenizer.json, or a folder holding one (a Hugging Face tokenizer folder; one with only "
        "slow-tokenizer files needs transformers); default: RUN/tokenizer (written by `sparsemoe train` for a BPE "
        "run, or by `sparsemoe convert`), else UTF-8 bytes",
    )
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    import torch

    from sparsemoe.device import describe_device
    from sparsemoe.model import generate
    from sparsemoe.ops.memory import move_to_huge_pages
    from sparsemoe.train import CheckpointError
    from sparsemoe.train.checkpoint import load_model

    if args.max_new_tokens < 0:
        raise CommandError(f"--max-new-tokens {args.max_new_tokens}: expected an integer >= 0")
    if not 0 <= args.temperature < float("inf"):  # NaN fails too
        raise CommandError(f"--temperature {args.temperature}: expected a finite number >= 0 (0 = greedy)")
    from sparsemoe.train.config import MAX_SEED

    if not 0 <= args.seed <= MAX_SEED:
        raise CommandError(f"--seed {args.seed}: expected an integer from 0 to {MAX_SEED}")
    if args.top_k < 0:
        raise CommandError(f"--top-k {args.top_k}: expected an integer >= 0 (0 = off)")
    if not 0 < args.top_p <= 1:
        raise CommandError(f"--top-p {args.top_p}: expected a number in (0, 1]")
    device = device_from_args(args)
    try:
        model, meta = load_model(args.checkpoint, device, dtype_from_args(args, device), verify=not args.no_verify)
    except CheckpointError as err:
        raise CommandError(str(err)) from None
    move_to_huge_pages(model)  # each step reads every weight it uses: huge pages read faster (ops.memory)
    tokenizer = checkpoint_tokenizer(args.checkpoint, args.tokenizer, model, meta)
    prompt = args.prompt or "\n"
    ids = torch.tensor(tokenizer.encode(prompt), dtype=torch.long)
    if ids.numel() == 0:
        raise CommandError("the prompt encodes to no tokens; give a longer --prompt")
    generator = torch.Generator().manual_seed(args.seed)  # on the host: a seed samples alike on every device
    out = sys.stdout
    out.write(prompt)
    emit, finish = _streamer(tokenizer, out)
    token_times: list[float] = []

    def on_token(token) -> None:
        token_times.append(time.perf_counter())
        emit(token)

    start = time.perf_counter()
    generate(
        model,
        ids,
        args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k or None,
        top_p=args.top_p,
        use_cache=not args.no_cache,
        generator=generator,
        on_token=on_token,
    )
    finish()
    print(_speed_line(start, token_times, ids.numel(), describe_device(device)), file=sys.stderr)
    return 0


def _speed_line(start: float, token_times: list[float], prompt_tokens: int, where: str) -> str:
    """How long the first token took (the prompt's forward) and each token after it, for stderr."""
    if not token_times:
        return "no tokens generated"
    first_ms = 1e3 * (token_times[0] - start)
    line = f"{len(token_times)} tokens: the first after {first_ms:.1f} ms (prompt of {prompt_tokens} tokens)"
    if len(token_times) > 1:
        per_token = (token_times[-1] - token_times[0]) / (len(token_times) - 1)
        line += f", then {1e3 * per_token:.2f} ms per token ({1 / per_token:.0f} tokens/s)"
    return f"{line}; {where}"


def _streamer(tokenizer, out):
    """(emit(token), finish()) printing text as tokens arrive, never splitting a character."""
    from sparsemoe.train import ByteTokenizer

    if isinstance(tokenizer, ByteTokenizer):
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

        def emit(token) -> None:
            out.write(decoder.decode(bytes([int(token[0])])))
            out.flush()

        def finish() -> None:
            out.write(decoder.decode(b"", final=True) + "\n")
            out.flush()

        return emit, finish

    generated: list[int] = []
    printed = [0]

    def emit(token) -> None:
        # Subword tokenizers decode context-dependently: decode everything, print what is new.
        generated.append(int(token[0]))
        text = tokenizer.decode(generated)
        if not text.endswith("\ufffd"):  # an incomplete multi-byte character waits for its next token
            out.write(text[printed[0] :])
            printed[0] = len(text)
            out.flush()

    def finish() -> None:
        out.write(tokenizer.decode(generated)[printed[0] :] + "\n")
        out.flush()

    return emit, finish
