"""Hugging Face tokenizers beside converted checkpoints, so `sparsemoe generate` can prompt real models.

`sparsemoe convert` (HF -> sparsemoe) copies the tokenizer files of the source folder into
`OUT/tokenizer/`; `sparsemoe generate` uses that folder when it exists (or `--tokenizer DIR`), and the
byte-level tokenizer otherwise. Loading is offline (`local_files_only=True`): nothing is downloaded.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional, Union

from sparsemoe.train.tokenizer import TOKENIZER_DIR

# Every file a transformers tokenizer may be saved as (fast or slow, BPE, WordPiece or SentencePiece).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
)


class TokenizerError(ValueError):
    """A tokenizer folder that cannot be used."""


def copy_tokenizer_files(src: Union[str, Path], out_dir: Union[str, Path], subfolder: str = TOKENIZER_DIR) -> Optional[Path]:
    """Copy the tokenizer files found in `src` into OUT/tokenizer (OUT itself with subfolder=""); None when
    `src` has none."""
    found = [Path(src) / name for name in TOKENIZER_FILES if (Path(src) / name).is_file()]
    if not found:
        return None
    target = Path(out_dir) / subfolder
    target.mkdir(parents=True, exist_ok=True)
    for path in found:
        shutil.copy2(path, target / path.name)
    return target


def find_tokenizer_dir(checkpoint: Union[str, Path]) -> Optional[Path]:
    """OUT/tokenizer for a run folder OUT or one of its checkpoint folders (OUT/checkpoints/step-N)."""
    path = Path(checkpoint)
    for root in (path, path.parent.parent):
        if (root / TOKENIZER_DIR).is_dir():
            return root / TOKENIZER_DIR
    return None


class HFTokenizer:
    """A transformers tokenizer behind the byte tokenizer's interface (encode/decode/vocab_size)."""

    def __init__(self, folder: Union[str, Path]) -> None:
        try:
            from transformers import AutoTokenizer
        except ImportError:  # pragma: no cover - depends on the environment
            raise TokenizerError(
                f"tokenizer folder {str(folder)!r} needs transformers: pip install 'sparsemoe[hf]'"
            ) from None
        if not Path(folder).is_dir():
            raise TokenizerError(f"tokenizer folder {str(folder)!r} does not exist")
        if not any((Path(folder) / name).is_file() for name in TOKENIZER_FILES):
            raise TokenizerError(
                f"tokenizer folder {str(folder)!r} holds no tokenizer files (one of {', '.join(TOKENIZER_FILES)})"
            )
        try:
            self._tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        except Exception as err:  # transformers raises many types, with messages of several lines
            why = " ".join(str(err).split())
            raise TokenizerError(f"cannot load a tokenizer from {str(folder)!r}: {why}") from None
        self.vocab_size = len(self._tok)

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False))

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids])
