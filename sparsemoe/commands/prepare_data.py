"""`sparsemoe prepare-data SRC OUT`: tokenize a corpus once into token shards that training streams from."""

from __future__ import annotations

import argparse

from sparsemoe.commands import CommandError
from sparsemoe.commands._measure import positive_int


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "prepare-data",
        help="tokenize a corpus into token shards that `train --data OUT` streams in constant memory",
        description="Tokenize a corpus into OUT: flat token-id files (uint16 up to a vocabulary of 65,536, else "
        "uint32), an index.json and the tokenizer. The corpus is read document by document (a file of a folder, a "
        "line of a JSONL file, a piece of a large text file), never whole, so it may be larger than memory; a "
        "document goes to validation when a hash of its name falls in --val-fraction. `sparsemoe train --data OUT` "
        "then streams windows from the shards. OUT is written under a temporary name and renamed at the end: a "
        "failed or interrupted run leaves nothing.",
    )
    p.add_argument(
        "src",
        metavar="SRC",
        help="a text file, a JSONL file ({\"text\": ...} per line), a folder of them, or builtin:python-stdlib / "
        "builtin:python-docs (corpora built from what Python ships)",
    )
    p.add_argument("out", metavar="OUT", help="the shard folder to write (must not exist, or be empty; see --overwrite)")
    p.add_argument(
        "--tokenizer",
        default="bytes",
        metavar="SPEC",
        help="bytes (default), bpe:N (a byte-level BPE of N tokens trained on the training documents), or a "
        "tokenizer.json or a folder holding one (e.g. a Hugging Face tokenizer folder)",
    )
    p.add_argument("--val-fraction", type=float, default=0.05, metavar="X",
                   help="share of documents held out for validation (default 0.05)")
    p.add_argument("--max-bytes", type=positive_int, default=None, metavar="N", help="read at most N bytes of text")
    p.add_argument("--shard-tokens", type=positive_int, default=2**26, metavar="N",
                   help="tokens per shard file, at least; a shard ends at a document boundary (default 67,108,864)")
    p.add_argument("--tokenizer-train-bytes", type=positive_int, default=2**28, metavar="N",
                   help="a bpe:N tokenizer learns from at most this many bytes of text (default 268,435,456)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists (only once the new one is done)")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    from sparsemoe.train.data import DataError
    from sparsemoe.train.shards import prepare_data

    try:
        prepare_data(
            args.src, args.out, args.tokenizer, val_fraction=args.val_fraction, max_bytes=args.max_bytes,
            shard_tokens=args.shard_tokens, tokenizer_train_bytes=args.tokenizer_train_bytes, overwrite=args.overwrite,
        )  # fmt: skip
    except DataError as err:
        raise CommandError(str(err)) from None
    print(f"train on it with: sparsemoe train --data {args.out}")
    return 0
