"""What a run trains on: its corpus and tokenizer, from text in memory, token shards, or text tokenized into
RUN/data for it; and how a checkpoint records and finds its tokenizer again."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

from sparsemoe.train.data import Corpus, DataError, corpus_name, load_corpus
from sparsemoe.train.shards import is_shard_folder, open_shards, prepare_data, read_index, shard_tokenizer
from sparsemoe.train.tokenizer import TOKENIZER_DIR, TokenizerError, load_tokenizer, parse_spec

DATA_DIR = "data"  # RUN/data: the token shards a run prepared from text for a tokenizer other than bytes


def training_corpus(
    data: Optional[str],
    tokenizer: Optional[str],
    val_fraction: float,
    max_bytes: Optional[int],
    run_dir: Path,
    log: Callable[[str], None] = print,
) -> tuple[Corpus, Any]:
    """(the corpus, its tokenizer) that a run trains on.

    - `data` a token-shard folder (sparsemoe prepare-data): streamed from it, with its own tokenizer (a
      `tokenizer` given must be the same one);
    - text (a file, folder, JSONL, builtin:NAME or None) with the byte tokenizer (the default): read into
      memory, as the demo does;
    - text with another tokenizer (bpe:N, a tokenizer.json or folder): tokenized once into RUN/data and
      streamed from there; a later call with the same source, tokenizer and split reuses it (so a resumed
      run does not tokenize again).
    """
    try:
        if is_shard_folder(data):
            if max_bytes is not None:
                raise DataError(
                    f"--max-bytes applies to text; the token shards in {data!r} are used whole (`sparsemoe "
                    "prepare-data --max-bytes` makes smaller ones)"
                )
            made_with = read_index(data)["tokenizer"]["spec"]
            if tokenizer is not None and parse_spec(tokenizer)[0] == "bpe" and tokenizer != made_with:
                raise DataError(
                    f"--tokenizer {tokenizer}: the shards in {data!r} were made with {made_with}; leave "
                    "--tokenizer out to train with the shards' own"
                )
            # A tokenizer to load (bytes, a file) is checked against the shards' fingerprint by open_shards.
            use_own = tokenizer is None or parse_spec(tokenizer)[0] == "bpe"
            tok = shard_tokenizer(data) if use_own else load_tokenizer(tokenizer)
            return open_shards(data, tok), tok
        if parse_spec(tokenizer)[0] == "bytes":
            return load_corpus(data, val_fraction, max_bytes), load_tokenizer("bytes")
        folder = tokenized_once(run_dir / DATA_DIR, data, tokenizer, val_fraction, max_bytes, log)
        own = shard_tokenizer(folder)
        return open_shards(folder, own), own
    except TokenizerError as err:
        raise DataError(str(err)) from None


def tokenized_once(
    folder: Path, data: Optional[str], tokenizer: str, val_fraction: float, max_bytes: Optional[int],
    log: Callable[[str], None],
) -> Path:  # fmt: skip
    """`folder`, holding `data` tokenized into shards: prepared now unless it already holds exactly that."""
    if not prepared_for(folder, data, tokenizer, val_fraction, max_bytes):
        prepare_data(data, folder, tokenizer, val_fraction=val_fraction, max_bytes=max_bytes, overwrite=True, log=log)
    return folder


def prepared_for(folder: Path, data: Optional[str], tokenizer: str, val_fraction: float, max_bytes) -> bool:
    """Whether RUN/data holds this source tokenized with this tokenizer and split."""
    if not is_shard_folder(str(folder)):
        return False
    index = read_index(folder)
    same = (index["source"], index["val_fraction"], index["max_bytes"]) == (corpus_name(data), val_fraction, max_bytes)
    if parse_spec(tokenizer)[0] == "bpe":
        return same and index["tokenizer"]["spec"] == tokenizer
    return same and index["tokenizer"]["fingerprint"] == load_tokenizer(tokenizer).fingerprint()


def tokenizer_meta(tokenizer: Any) -> dict[str, Any]:
    return {"spec": tokenizer.spec, "fingerprint": tokenizer.fingerprint(), "vocab_size": tokenizer.vocab_size}


def saved_tokenizer_spec(meta: dict[str, Any], run_dir: Path) -> Optional[str]:
    """On resume without --tokenizer: the run's own (RUN/tokenizer), or bytes for a run that has none."""
    spec = meta.get("tokenizer", {}).get("spec")
    if spec is None or parse_spec(spec)[0] == "bytes":
        return None
    return str(run_dir / TOKENIZER_DIR) if parse_spec(spec)[0] == "bpe" else spec
