"""Tokenizers of the language model: UTF-8 bytes (the default) or a byte-level BPE.

A tokenizer is named by a spec, the value of `sparsemoe train --tokenizer` / `prepare-data --tokenizer`:
- `bytes`: UTF-8 bytes, vocabulary 256, nothing to train or store (the demo's choice: no training step, every
  text encodable, and the 256-row embedding keeps the demo model small and fast);
- `bpe:N`: a byte-level BPE of N tokens trained on the corpus with Hugging Face `tokenizers` (GPT-2's
  scheme: bytes mapped to printable characters, merges learned on top, so every text stays encodable);
  one special token, `<|endoftext|>`, separates documents;
- a path: a `tokenizer.json` file, or a folder holding one (a Hugging Face tokenizer folder, or the
  `tokenizer/` folder of a run).

A trained or given BPE is saved into a run as `RUN/tokenizer/tokenizer.json` plus a `tokenizer_config.json`,
which makes the folder loadable by `transformers.AutoTokenizer` (and is what `generate`, `inspect` and the
Hugging Face exporter read). Its identity, `fingerprint()`, is a hash of its serialized form: token shards
and checkpoints record it, and a different tokenizer is refused where it would silently mis-read ids.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable, Optional, Union

import numpy as np

EOS = "<|endoftext|>"
TOKENIZER_DIR = "tokenizer"  # RUN/tokenizer/: a run's (or a converted checkpoint's) tokenizer files
TOKENIZER_FILE = "tokenizer.json"
MIN_BPE_VOCAB = 257  # the 256 byte symbols and the end-of-text token
MAX_BPE_VOCAB = 2**20


class TokenizerError(ValueError):
    """A tokenizer spec, file or folder that cannot be used."""


class ByteTokenizer:
    """UTF-8 bytes as tokens: vocabulary 256, no file to download, every text encodable."""

    vocab_size = 256
    eos_id: Optional[int] = None  # documents are simply concatenated
    spec = "bytes"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_documents(self, documents: list[bytes]) -> list[np.ndarray]:
        """UTF-8 documents as id arrays: the bytes are the ids (no Python list per byte)."""
        return [np.frombuffer(data, dtype=np.uint8) for data in documents]

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def fingerprint(self) -> str:
        return "bytes"

    def describe(self) -> str:
        return "bytes (vocabulary 256)"

    def save(self, folder: Union[str, Path]) -> None:
        """Nothing to save: bytes need no file."""


class BPETokenizer:
    """A `tokenizers.Tokenizer` (BPE or any other model a tokenizer.json holds) behind the byte tokenizer's
    interface: encode (no special tokens added), decode, vocab_size, eos_id."""

    def __init__(self, tokenizer, spec: str) -> None:
        self._tok = tokenizer
        self.spec = spec  # how it was asked for: "bpe:8192" or the path it was read from
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self.eos_id = tokenizer.token_to_id(EOS)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_documents(self, documents: list[bytes]) -> list[np.ndarray]:
        """UTF-8 documents as id arrays, encoded together (`tokenizers` spreads a batch over the cores)."""
        texts = [data.decode("utf-8") for data in documents]
        return [np.asarray(e.ids, dtype=np.int64) for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def fingerprint(self) -> str:
        return hashlib.sha256(self._tok.to_str().encode("utf-8")).hexdigest()[:16]

    def describe(self) -> str:
        return f"{self.spec} (vocabulary {self.vocab_size:,}, fingerprint {self.fingerprint()})"

    def save(self, folder: Union[str, Path]) -> Path:
        """FOLDER/tokenizer.json and a tokenizer_config.json that `transformers.AutoTokenizer` reads."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(folder / TOKENIZER_FILE))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
        if self.eos_id is not None:
            config.update(eos_token=EOS, bos_token=EOS, unk_token=EOS)
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1) + "\n", encoding="utf-8")
        return folder


def _tokenizers():
    try:
        import tokenizers
    except ImportError:  # pragma: no cover - depends on the environment
        raise TokenizerError("BPE tokenizers need Hugging Face tokenizers: pip install 'sparsemoe[train]'") from None
    return tokenizers


def parse_spec(spec: Optional[str]) -> tuple[str, Optional[int]]:
    """("bytes", None), ("bpe", N) or ("path", None) for a tokenizer spec; a bad one raises TokenizerError."""
    if spec is None or spec == "bytes":
        return "bytes", None
    if spec.startswith("bpe:"):
        size = spec[4:]
        if not size.isdigit() or not MIN_BPE_VOCAB <= int(size) <= MAX_BPE_VOCAB:
            raise TokenizerError(
                f"tokenizer {spec!r}: expected bpe:N with N a vocabulary size from {MIN_BPE_VOCAB} to {MAX_BPE_VOCAB:,} "
                "(e.g. bpe:8192)"
            )
        return "bpe", int(size)
    return "path", None


def train_bpe(texts: Iterable[str], vocab_size: int) -> BPETokenizer:
    """A byte-level BPE of `vocab_size` tokens (fewer when the text has fewer distinct merges) learned from
    `texts` (streamed: only word counts are held)."""
    tk = _tokenizers()
    tok = tk.Tokenizer(tk.models.BPE())
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return BPETokenizer(tok, f"bpe:{vocab_size}")


def load_tokenizer(spec: Optional[str]) -> Union[ByteTokenizer, BPETokenizer]:
    """The tokenizer a spec names without training: bytes, a tokenizer.json, or a folder holding one."""
    kind, _ = parse_spec(spec)
    if kind == "bytes":
        return ByteTokenizer()
    if kind == "bpe":
        raise TokenizerError(f"tokenizer {spec!r} must be trained on a corpus first (sparsemoe prepare-data or train)")
    path = Path(spec)
    if path.is_dir():
        path = path / TOKENIZER_FILE
        if not path.is_file():
            raise TokenizerError(
                f"tokenizer folder {spec!r} has no {TOKENIZER_FILE}; give a folder with a fast (tokenizer.json) "
                "tokenizer, a tokenizer.json file, bytes or bpe:N"
            )
    elif not path.is_file():
        raise TokenizerError(
            f"tokenizer {spec!r} does not exist; give bytes, bpe:N, a tokenizer.json file or a folder holding one"
        )
    tk = _tokenizers()
    try:
        tok = tk.Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises plain Exceptions with the parser's message
        raise TokenizerError(f"cannot read tokenizer {str(path)!r}: {' '.join(str(err).split())}") from None
    return BPETokenizer(tok, str(spec))
