"""Text data: the byte tokenizer, the corpora (a file, a folder, or the embedded default), batches.

The default corpus is the Python standard library's own .py sources, which every Python installation
ships: real text, no download. Files are read in sorted relative-path order (deterministic on a given
Python version), test folders and site-packages are skipped. The train/validation split is by file: a
file goes to validation when a hash of its relative path falls in the validation share, so the split
does not move when other files are added. A single-file corpus is split at its last `val_fraction`.

Text means UTF-8: a file given on its own that is binary (a NUL byte) or not valid UTF-8 is refused with
the position of the first bad byte; inside a folder such files are skipped and counted (`Corpus.skipped`).
`max_bytes` is exact: the corpus holds at most that many bytes (the last file read is cut, at a
character boundary).
"""

from __future__ import annotations

import os
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch
from torch import Tensor

_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


class DataError(ValueError):
    """A data path that cannot be used (missing, empty, unreadable)."""


class ByteTokenizer:
    """UTF-8 bytes as tokens: vocabulary 256, no file to download, every text encodable."""

    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


@dataclass
class Corpus:
    train: Tensor  # [N] uint8 bytes
    val: Tensor  # [M] uint8 bytes
    source: str  # where it came from, for reports
    num_files: int
    skipped: int = 0  # files of a folder left out: binary or not UTF-8

    @property
    def num_bytes(self) -> int:
        return self.train.numel() + self.val.numel()


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


def _cut(data: bytes, limit: int) -> bytes:
    """The first `limit` bytes, shortened to end at a UTF-8 character boundary."""
    if len(data) <= limit:
        return data
    end = limit
    while end > 0 and (data[end] & 0xC0) == 0x80:  # a continuation byte: the character started before
        end -= 1
    return data[:end]


def _is_val(rel_path: str, val_fraction: float) -> bool:
    return zlib.crc32(rel_path.encode()) % 10_000 < val_fraction * 10_000


def load_corpus(path: Optional[str] = None, val_fraction: float = 0.05, max_bytes: Optional[int] = None) -> Corpus:
    """Load a text file, a folder of text files, or (path None) the standard-library corpus.

    max_bytes: stop reading once this many bytes are loaded (for quick runs and tests).
    """
    if not 0 < val_fraction < 1:
        raise DataError(f"val_fraction={val_fraction} is invalid: expected a number in (0, 1)")
    if path is None:
        files, source = stdlib_files(), "python-stdlib"
    else:
        p = Path(path)
        if not p.exists():
            raise DataError(f"data path {path!r} does not exist; give a text file or a folder of text files")
        if p.is_file():
            return _single_file_corpus(p, val_fraction, max_bytes)
        files, source = _files_under(p), str(p)
        if not files:
            raise DataError(f"data folder {path!r} has no text files (hidden files are skipped)")
    train, val, total, used, skipped = [], [], 0, 0, 0
    for rel, file in files:
        data = _read(file)
        if path is not None and _not_text(data):
            skipped += 1
            continue
        if max_bytes is not None:
            data = _cut(data, max_bytes - total)
        if not data:
            continue
        (val if _is_val(rel, val_fraction) else train).append(data)
        total += len(data)
        used += 1
        if max_bytes is not None and total >= max_bytes:
            break
    if total == 0:
        if skipped:
            raise DataError(f"data folder {path!r} has no text files ({skipped} binary or non-UTF-8 files skipped)")
        raise DataError(f"data path {path or source!r} holds no text (all files are empty)")
    if not train or not val:  # too few files for a split by file: split the stream instead
        corpus = _split_bytes(b"".join(train + val), val_fraction, source, used)
    else:
        corpus = Corpus(_as_tensor(b"".join(train)), _as_tensor(b"".join(val)), source, used)
    corpus.skipped = skipped
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


def check_length(corpus: Corpus, seq_len: int) -> None:
    """Both splits must hold at least one window of seq_len + 1 bytes."""
    for name, split in (("training", corpus.train), ("validation", corpus.val)):
        if split.numel() < seq_len + 1:
            raise DataError(
                f"the {name} split of {corpus.source!r} has {split.numel()} bytes, fewer than one sequence "
                f"of seq_len+1={seq_len + 1}; use more text or a shorter --seq-len"
            )


class RandomBatches:
    """Random windows of a byte stream: (inputs, targets) [B, S] long, targets shifted by one.

    The sampler owns its torch.Generator, so its position in the stream is part of a checkpoint
    (`state_dict`) and a resumed run draws the same batches as an uninterrupted one.
    """

    def __init__(self, data: Tensor, batch_size: int, seq_len: int, seed: int = 0) -> None:
        if data.numel() < seq_len + 1:
            raise DataError(f"{data.numel()} bytes is fewer than one window of seq_len+1={seq_len + 1}")
        self.data, self.batch_size, self.seq_len = data, batch_size, seq_len
        self.generator = torch.Generator().manual_seed(seed)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        return self

    def __next__(self) -> tuple[Tensor, Tensor]:
        starts = torch.randint(0, self.data.numel() - self.seq_len, (self.batch_size,), generator=self.generator)
        return windows(self.data, starts, self.seq_len)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


def windows(data: Tensor, starts: Tensor, seq_len: int) -> tuple[Tensor, Tensor]:
    idx = starts[:, None] + torch.arange(seq_len + 1)
    chunk = data[idx].long()
    return chunk[:, :-1], chunk[:, 1:]


def eval_batches(data: Tensor, batch_size: int, seq_len: int, num_batches: int) -> list[tuple[Tensor, Tensor]]:
    """A fixed validation set: windows evenly spread over the data, the same at every evaluation."""
    count = max(1, num_batches * batch_size)
    last = data.numel() - seq_len - 1
    starts = torch.linspace(0, max(last, 0), count).long()
    return [windows(data, chunk, seq_len) for chunk in starts.split(batch_size)]
