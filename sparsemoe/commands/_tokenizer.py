"""The tokenizer of a checkpoint, for the commands that read text with it (generate, inspect)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from sparsemoe.commands import CommandError


def load_any_tokenizer(spec: str) -> Any:
    """bytes, a tokenizer.json, a folder holding one (read with `tokenizers`), or a Hugging Face folder with
    only slow-tokenizer files (read with transformers)."""
    from sparsemoe.train.tokenizer import TOKENIZER_FILE, TokenizerError, load_tokenizer

    path = Path(spec)
    try:
        if spec == "bytes" or not path.is_dir() or (path / TOKENIZER_FILE).is_file():
            return load_tokenizer(spec)
        from sparsemoe.hf.tokenizer import HFTokenizer

        return HFTokenizer(path)
    except (TokenizerError, ValueError) as err:
        raise CommandError(str(err)) from None


def checkpoint_tokenizer(checkpoint: str, given: Optional[str], model: Any, meta: dict[str, Any]) -> Any:
    """The tokenizer to read and write a checkpoint's text with: `given` (a --tokenizer value), else the
    checkpoint's own (RUN/tokenizer), else bytes; refused when it cannot fit the model's vocabulary."""
    from sparsemoe.hf.tokenizer import find_tokenizer_dir

    if given is None:
        folder = find_tokenizer_dir(checkpoint)
        given = str(folder) if folder is not None else "bytes"
    tokenizer = load_any_tokenizer(given)
    V = model.config.vocab_size
    trained_with = meta.get("tokenizer")  # runs trained by sparsemoe record theirs; converted checkpoints do not
    if trained_with and tokenizer.vocab_size != V:
        raise CommandError(
            f"the tokenizer {given} has {tokenizer.vocab_size:,} tokens, but the checkpoint was trained with "
            f"{trained_with['spec']} ({V:,} tokens); give the tokenizer it was trained with, or leave --tokenizer "
            "out to use RUN/tokenizer"
        )
    if tokenizer.vocab_size == 256 and V != 256 and given == "bytes":
        raise CommandError(
            f"checkpoint has vocab_size={V}, not a byte-level model (vocab_size=256); give its tokenizer (a "
            "tokenizer.json or a Hugging Face tokenizer folder) with --tokenizer"
        )
    if V < tokenizer.vocab_size:
        raise CommandError(
            f"checkpoint has vocab_size={V} but the tokenizer has {tokenizer.vocab_size} tokens; give the tokenizer "
            "the model was trained with (--tokenizer)"
        )
    return tokenizer
