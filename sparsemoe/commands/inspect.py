"""`sparsemoe inspect`: what each expert of a trained checkpoint specialises in, as text and a PNG."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sparsemoe.commands import CommandError
from sparsemoe.commands._tokenizer import checkpoint_tokenizer
from sparsemoe.commands._device import (
    add_device_argument, add_dtype_argument, add_verify_argument, device_from_args, dtype_from_args,
)  # fmt: skip


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "inspect",
        help="show each expert's share of tokens and the bytes/words it prefers",
        description="Route validation text through a trained checkpoint and report, per MoE layer and expert, the "
        "share of tokens and the bytes and words it takes more often than the text at large (lift). Writes "
        "the text, a JSON file and a PNG next to the checkpoint's run folder (or to --out).",
    )
    p.add_argument(
        "--checkpoint", required=True, metavar="RUN", help="run folder (its latest checkpoint) or a checkpoint folder"
    )
    p.add_argument(
        "--data", default=None, metavar="PATH",
        help="text to route, or a token-shard folder (default: the run's own data, validation split)"
    )
    p.add_argument("--max-bytes", type=int, default=None, metavar="N", help="read at most N bytes of the corpus")
    p.add_argument("--windows", type=int, default=32, help="windows of text to route (default 32)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per window (default: the model's max_seq_len)")
    p.add_argument("--top", type=int, default=5, help="bytes (or subword tokens) and words listed per expert (default 5)")
    p.add_argument(
        "--tokenizer",
        default=None,
        metavar="PATH",
        help="bytes, a tokenizer.json or a folder holding one (default: RUN/tokenizer, else bytes)",
    )
    p.add_argument(
        "--out", default=None, metavar="DIR", help="folder for inspect.txt/.json/.png (default: the run folder)"
    )
    add_device_argument(p)
    add_dtype_argument(p)
    add_verify_argument(p)
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    from sparsemoe.model.specialization import expert_specialization, format_text, plot_specialization
    from sparsemoe.train import ByteTokenizer, CheckpointError
    from sparsemoe.train.checkpoint import load_model

    for name in ("windows", "top"):
        if getattr(args, name) < 1:
            raise CommandError(f"--{name} {getattr(args, name)}: expected an integer >= 1")
    device = device_from_args(args)
    try:
        model, meta = load_model(args.checkpoint, device, dtype_from_args(args, device), verify=not args.no_verify)
    except CheckpointError as err:
        raise CommandError(str(err)) from None
    if not model.config.moe_layer_ids:
        raise CommandError(f"checkpoint {args.checkpoint!r} is a dense model: it has no experts to inspect")
    if args.seq_len is not None and not 1 <= args.seq_len <= model.config.max_seq_len:
        raise CommandError(
            f"--seq-len {args.seq_len}: expected 1..{model.config.max_seq_len} (the model's max_seq_len)"
        )
    tokenizer = checkpoint_tokenizer(args.checkpoint, args.tokenizer, model, meta)
    tokens = _validation_tokens(args, meta, tokenizer)
    token_text = None if isinstance(tokenizer, ByteTokenizer) else lambda t: tokenizer.decode([t])
    seq_len = args.seq_len or model.config.max_seq_len
    spec = expert_specialization(model, tokens, seq_len, args.windows, top=args.top, token_text=token_text)
    report = format_text(spec)
    print(report)
    out = Path(args.out) if args.out else _run_folder(Path(args.checkpoint))
    out.mkdir(parents=True, exist_ok=True)
    (out / "inspect.txt").write_text(report + "\n", encoding="utf-8")
    (out / "inspect.json").write_text(json.dumps(spec.to_dict(), indent=1), encoding="utf-8")
    plot_specialization(spec, out / "inspect.png")
    print(f"\nwrote {out / 'inspect.txt'}, {out / 'inspect.json'} and {out / 'inspect.png'}")
    return 0


# Subword runs: at most this many validation tokens are read from token shards (windows are spread over them).
_MAX_TOKENS = 2**22


def _validation_tokens(args, meta: dict, tokenizer) -> "torch.Tensor":
    """[N] token ids of the text to route: --data, else the run's own validation split (its token shards
    where it trained on some, else its corpus), encoded with the checkpoint's tokenizer."""
    import torch

    from sparsemoe.train import ByteTokenizer, DataError, load_corpus
    from sparsemoe.train.shards import is_shard_folder, open_shards

    data, max_bytes = args.data, args.max_bytes
    if data is None:  # the run's own corpus, so that "validation" means what it meant in training
        shards = meta.get("shards")
        data = shards if is_shard_folder(shards) else meta.get("data_source", meta.get("data"))
        data = None if data == "python-stdlib" else data
        max_bytes = max_bytes or meta.get("max_bytes")
    try:
        if is_shard_folder(data):
            val = open_shards(data, tokenizer).val
            return torch.from_numpy(val.read(0, min(len(val), _MAX_TOKENS)).astype("int64"))
        corpus = load_corpus(data, meta.get("train_config", {}).get("val_fraction", 0.05), max_bytes)
    except DataError as err:
        raise CommandError(str(err)) from None
    text = corpus.val if corpus.val.numel() >= 2 else corpus.train
    if isinstance(tokenizer, ByteTokenizer):
        return text
    return torch.tensor(tokenizer.encode(bytes(text.tolist()).decode("utf-8", errors="replace")), dtype=torch.long)


def _run_folder(path: Path) -> Path:
    """The run folder of a checkpoint path (RUN, RUN/checkpoints, or RUN/checkpoints/step-N)."""
    if path.name.startswith("step-") and path.parent.name == "checkpoints":
        return path.parent.parent
    if path.name == "checkpoints":
        return path.parent
    return path
