"""Text data: the corpora (a file, a folder, JSONL, or a built-in corpus), read as documents; batches.

The default corpus is the Python standard library's own .py sources, which every Python installation
ships: real text, no download. A second built-in corpus, `builtin:python-docs`, is English prose from the
same installation: the docstrings of the standard library's modules (one document per module) and the
help topics of `pydoc_data`. Files are read in sorted relative-path order (deterministic on a given
Python version), test folders and site-packages are skipped.

Documents: a file of a folder, a line of a JSONL file (its "text" field), a module's docstrings. The
train/validation split is by document: a document goes to validation when a hash of its name falls in the
validation share, so the split does not move when other documents are added. In memory (`load_corpus`)
a single text file is split at its last `val_fraction`; streamed (`iter_documents`, for token shards) it
is read in pieces that end at a line break, each piece a document.

Text means UTF-8: a file given on its own that is binary (a NUL byte) or not valid UTF-8 is refused with
the position of the first bad byte; inside a folder such files are skipped and counted (`Corpus.skipped`).
`max_bytes` is exact: the corpus holds at most that many bytes (the last file read is cut, at a
character boundary).
"""

from __future__ import annotations

import ast
import json
import os
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Protocol, Union

import numpy as np
import torch
from torch import Tensor

BUILTIN = "builtin:"  # --data builtin:NAME names a corpus built from what Python ships (BUILTIN_CORPORA)
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


class DataError(ValueError):
    """A data path that cannot be used (missing, empty, unreadable)."""


@dataclass
class Corpus:
    train: "Tokens"  # [N] uint8 bytes in memory, or a TokenStream of token shards
    val: "Tokens"  # [M] likewise
    source: str  # where it came from, for reports
    num_files: int
    skipped: int = 0  # files of a folder left out: binary or not UTF-8
    tokens_per_byte: float = 1.0  # validation tokens per byte of its text: bits per byte = loss * this / ln 2
    text_bytes: Optional[int] = None  # bytes of text behind the tokens (None: the tokens are the bytes)
    shards: Optional[str] = None  # the token-shard folder it streams from (None: in memory)

    @property
    def num_tokens(self) -> int:
        return num_tokens(self.train) + num_tokens(self.val)

    @property
    def num_bytes(self) -> int:
        return self.num_tokens if self.text_bytes is None else self.text_bytes


def stdlib_files() -> list[tuple[str, Path]]:
    """(relative path, path) of the standard library's .py files, sorted, tests and site-packages skipped."""
    root = Path(sysconfig.get_paths()["stdlib"])
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        for name in filenames:
            if name.endswith(".py"):
                path = Path(dirpath) / name
                found.append((path.relative_to(root).as_posix(), path))
    return sorted(found)


def _not_text(data: bytes) -> Optional[str]:
    """Why `data` is not UTF-8 text (a NUL byte: images, archives, compiled files; or invalid UTF-8), else None."""
    nul = data.find(b"\0")
    if nul >= 0:
        return f"it is binary (a NUL byte at offset {nul})"
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as err:
        return f"it is not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start})"
    return None


def _files_under(folder: Path) -> list[tuple[str, Path]]:
    """Every non-hidden file below `folder`, sorted by relative path."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__pycache__")
        for name in filenames:
            path = Path(dirpath) / name
            if not name.startswith(".") and path.is_file():
                found.append((path.relative_to(folder).as_posix(), path))
    return sorted(found)


@dataclass
class DocumentCounts:
    """What `iter_documents` read: files (or built-in modules) used, files skipped as binary or not UTF-8."""

    files: int = 0
    skipped: int = 0
    bytes: int = 0


def is_jsonl(path: Path) -> bool:
    return path.suffix == ".jsonl"


def corpus_name(path: Optional[str]) -> str:
    return "python-stdlib" if path is None or path == BUILTIN + "python-stdlib" else str(path)


def _stdlib_documents() -> Iterator[tuple[str, bytes]]:
    for rel, path in stdlib_files():
        yield rel, _read(path)


def _docstrings(source: bytes) -> str:
    """The docstrings of a module's source (module, classes, functions), in order, blank-line separated."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):  # a file for another Python version
        return ""
    nodes = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    docs = (ast.get_docstring(node) for node in ast.walk(tree) if isinstance(node, nodes))
    return "\n\n".join(d for d in docs if d)


def _python_docs_documents() -> Iterator[tuple[str, bytes]]:
    for rel, path in stdlib_files():
        text = _docstrings(_read(path))
        if text:
            yield rel, text.encode("utf-8")
    try:
        from pydoc_data.topics import topics
    except ImportError:  # pragma: no cover - a Python built without its help topics
        return
    for name in sorted(topics):
        yield f"pydoc_data/{name}", topics[name].encode("utf-8")


BUILTIN_CORPORA = {
    "python-stdlib": _stdlib_documents,  # Python source (the default)
    "python-docs": _python_docs_documents,  # English prose: docstrings and help topics (about 2.3 MB)
}


def _jsonl_documents(path: Path, key: str) -> Iterator[tuple[str, bytes]]:
    """The "text" field of each line of a JSONL file (blank lines skipped), one document per line."""
    try:
        fh = open(path, "rb")
    except OSError as err:
        raise DataError(f"cannot read data file {str(path)!r}: {err.strerror}") from None
    with fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"line {number} of {str(path)!r}"
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise DataError(f"{where} is not JSON ({err}); a JSONL corpus has one JSON object per line") from None
            text = record.get("text") if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise DataError(f'{where} has no "text" field holding a string; a JSONL corpus has {{"text": ...}} lines')
            if text:
                yield f"{key}:{number}", text.encode("utf-8")


def _file_pieces(path: Path) -> Iterator[tuple[str, bytes]]:
    """A text file read in pieces that end at a line break (about 1/128 of the file, 4 KiB to 1 MiB each),
    without reading it whole; a binary or non-UTF-8 piece raises DataError with the file offset."""
    size = path.stat().st_size
    piece_bytes = min(max(size // 128, 4096), 2**20)
    offset, number, rest = 0, 0, b""
    with open(path, "rb") as fh:
        while True:
            block = fh.read(piece_bytes)
            data = rest + block
            end = data.rfind(b"\n") + 1 if block else len(data)
            if block and end == 0:  # no line break yet: keep reading (a very long line)
                rest = data
                continue
            piece, rest = data[:end], data[end:]
            if piece:
                why = _not_text(piece)
                if why:
                    raise DataError(f"data file {str(path)!r} cannot be trained on: {why} (+{offset}); give UTF-8 text")
                yield f"piece-{number}", piece
                offset, number = offset + len(piece), number + 1
            if not block:
                return


def iter_documents(
    path: Optional[str], max_bytes: Optional[int] = None, counts: Optional[DocumentCounts] = None
) -> Iterator[tuple[str, bytes]]:
    """(name, UTF-8 text) of each document of a corpus, streamed in a fixed order; at most `max_bytes` in all
    (the last document cut at a character boundary). `counts` (if given) is filled as documents are read.

    path: None (the standard library's sources), `builtin:NAME` (BUILTIN_CORPORA), a text file, a JSONL
    file (`.jsonl`, one {"text": ...} object per line), or a folder of them (binary and non-UTF-8 files
    skipped and counted). An empty corpus, or a single file that is binary, raises DataError.
    """
    counts = counts if counts is not None else DocumentCounts()
    for key, data in _documents(path, counts):
        if max_bytes is not None:
            data = _cut(data, max_bytes - counts.bytes)
        if not data:
            continue
        counts.bytes += len(data)
        yield key, data
        if max_bytes is not None and counts.bytes >= max_bytes:
            break
    if counts.bytes == 0:
        if counts.skipped:
            raise DataError(f"data folder {path!r} has no text files ({counts.skipped} binary or non-UTF-8 files skipped)")
        raise DataError(f"data path {corpus_name(path)!r} holds no text (it is empty)")


def _documents(path: Optional[str], counts: DocumentCounts) -> Iterator[tuple[str, bytes]]:
    if path is None or path.startswith(BUILTIN):
        name = "python-stdlib" if path is None else path[len(BUILTIN) :]
        if name not in BUILTIN_CORPORA:
            raise DataError(f"--data {path!r}: no such built-in corpus; accepted: "
                            + ", ".join(BUILTIN + n for n in BUILTIN_CORPORA))
        for key, data in BUILTIN_CORPORA[name]():
            counts.files += bool(data)
            yield key, data
        return
    p = Path(path)
    if not p.exists():
        raise DataError(f"data path {path!r} does not exist; give a text file, a JSONL file or a folder of them")
    if p.is_file():
        counts.files = 1
        yield from (_jsonl_documents(p, p.name) if is_jsonl(p) else _file_pieces(p))
        return
    files = _files_under(p)
    if not files:
        raise DataError(f"data folder {path!r} has no text files (hidden files are skipped)")
    for rel, file in files:
        if is_jsonl(file):
            counts.files += 1
            yield from _jsonl_documents(file, rel)
            continue
        data = _read(file)
        if _not_text(data):
            counts.skipped += 1
            continue
        counts.files += bool(data)
        yield rel, data


def _cut(data: bytes, limit: int) -> bytes:
    """The first `limit` bytes, shortened to end at a UTF-8 character boundary."""
    if len(data) <= limit:
        return data
    end = limit
    while end > 0 and (data[end] & 0xC0) == 0x80:  # a continuation byte: the character started before
        end -= 1
    return data[:end]


def is_val(key: str, val_fraction: float) -> bool:
    """Whether the document named `key` belongs to the validation split: a hash of its name, so the split
    does not move when other documents are added."""
    return zlib.crc32(key.encode()) % 10_000 < val_fraction * 10_000


def load_corpus(path: Optional[str] = None, val_fraction: float = 0.05, max_bytes: Optional[int] = None) -> Corpus:
    """Load a text file, a folder, a JSONL file, a built-in corpus (`builtin:NAME`), or (path None) the
    standard-library corpus, split by document.

    max_bytes: stop reading once this many bytes are loaded (for quick runs and tests).
    """
    if not 0 < val_fraction < 1:
        raise DataError(f"val_fraction={val_fraction} is invalid: expected a number in (0, 1)")
    p = Path(path) if path is not None and not path.startswith(BUILTIN) else None
    if p is not None and p.is_file() and not is_jsonl(p):
        return _single_file_corpus(p, val_fraction, max_bytes)
    counts = DocumentCounts()
    train, val = [], []
    for key, data in iter_documents(path, max_bytes, counts):
        (val if is_val(key, val_fraction) else train).append(data)
    if not train or not val:  # too few documents for a split by document: split the stream instead
        corpus = _split_bytes(b"".join(train + val), val_fraction, corpus_name(path), counts.files)
    else:
        corpus = Corpus(_as_tensor(b"".join(train)), _as_tensor(b"".join(val)), corpus_name(path), counts.files)
    corpus.skipped = counts.skipped
    return corpus


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise DataError(f"cannot read data file {str(path)!r}: {err.strerror}") from None


def _single_file_corpus(path: Path, val_fraction: float, max_bytes: Optional[int]) -> Corpus:
    data = _read(path)
    why = _not_text(data)
    if why:
        raise DataError(f"data file {str(path)!r} cannot be trained on: {why}; give UTF-8 text")
    if max_bytes is not None:
        data = _cut(data, max_bytes)
    if not data:
        raise DataError(f"data file {str(path)!r} is empty")
    return _split_bytes(data, val_fraction, str(path), 1)


def _split_bytes(data: bytes, val_fraction: float, source: str, num_files: int) -> Corpus:
    cut = int(len(data) * (1 - val_fraction))
    return Corpus(_as_tensor(data[:cut]), _as_tensor(data[cut:]), source, num_files)


def _as_tensor(data: bytes) -> Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.zeros(0, dtype=torch.uint8)


class TokenStream(Protocol):
    """Tokens read by position without holding them (a split of token shards, sparsemoe.train.shards)."""

    def __len__(self) -> int: ...

    def read(self, start: int, count: int) -> np.ndarray: ...


Tokens = Union[Tensor, TokenStream]  # a split in memory ([N] uint8 bytes) or streamed from shards


def num_tokens(data: Tokens) -> int:
    return data.numel() if isinstance(data, Tensor) else len(data)


def check_length(corpus: Corpus, seq_len: int) -> None:
    """Both splits must hold at least one window of seq_len + 1 tokens."""
    for name, split in (("training", corpus.train), ("validation", corpus.val)):
        if num_tokens(split) < seq_len + 1:
            raise DataError(
                f"the {name} split of {corpus.source!r} has {num_tokens(split)} tokens, fewer than one sequence "
                f"of seq_len+1={seq_len + 1}; use more text or a shorter --seq-len"
            )


class RandomBatches:
    """Random windows of a token stream: (inputs, targets) [B, S] long, targets shifted by one.

    The sampler owns its torch.Generator, so its position in the stream is part of a checkpoint
    (`state_dict`) and a resumed run draws the same batches as an uninterrupted one. The stream is a tensor
    in memory or a `TokenStream` read window by window (memory independent of its length).
    """

    def __init__(self, data: Tokens, batch_size: int, seq_len: int, seed: int = 0) -> None:
        if num_tokens(data) < seq_len + 1:
            raise DataError(f"{num_tokens(data)} tokens is fewer than one window of seq_len+1={seq_len + 1}")
        self.data, self.batch_size, self.seq_len = data, batch_size, seq_len
        self.generator = torch.Generator().manual_seed(seed)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        return self

    def __next__(self) -> tuple[Tensor, Tensor]:
        last = num_tokens(self.data) - self.seq_len
        starts = torch.randint(0, last, (self.batch_size,), generator=self.generator)
        return windows(self.data, starts, self.seq_len)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


def windows(data: Tokens, starts: Tensor, seq_len: int) -> tuple[Tensor, Tensor]:
    """(inputs, targets) [B, S] long: the windows of seq_len + 1 tokens at `starts` [B]."""
    if isinstance(data, Tensor):
        chunk = data[starts[:, None] + torch.arange(seq_len + 1)].long()
    else:
        chunk = torch.from_numpy(np.stack([data.read(int(s), seq_len + 1) for s in starts]).astype(np.int64))
    return chunk[:, :-1], chunk[:, 1:]


def eval_batches(data: Tokens, batch_size: int, seq_len: int, num_batches: int) -> list[tuple[Tensor, Tensor]]:
    """A fixed validation set: windows evenly spread over the data, the same at every evaluation."""
    count = max(1, num_batches * batch_size)
    last = num_tokens(data) - seq_len - 1
    starts = torch.linspace(0, max(last, 0), count).long()
    return [windows(data, chunk, seq_len) for chunk in starts.split(batch_size)]
