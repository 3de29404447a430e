"""Token shards: a corpus tokenized once into flat binary files, then read window by window.

    OUT/index.json           what the folder holds (below); written last, so a folder without it is unfinished
    OUT/tokenizer/           the tokenizer the ids belong to (tokenizer.json + tokenizer_config.json; none for bytes)
    OUT/train-00000.bin ...  token ids, little-endian uint16 (vocabulary <= 65,536) or uint32, documents
    OUT/val-00000.bin ...    separated by the tokenizer's end-of-text token (bytes: simply concatenated)

A shard is a raw array (`numpy.memmap(path, dtype)` reads it); a new one starts at a document boundary once
the current one holds `shard_tokens` tokens. The index records per split the shards and their token
counts, the text bytes behind them (for bits per byte) and the document count, plus the tokenizer's spec,
vocabulary size and fingerprint.

Reading (`open_shards`): every shard's size is checked against the index (a truncated or missing shard is
refused by name), and the tokenizer against the one the caller expects. The splits are `TokenStream`s:
`read(start, count)` is a positioned read of one window, so a run's memory does not grow with the corpus,
whatever its size (page cache aside, which the kernel reclaims).

Writing (`prepare_data`) streams the corpus document by document (`iter_documents`): nothing is held
whole. It writes into a hidden folder beside OUT and renames it at the end: an interrupted or failed
preparation leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from typing import IO
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

import numpy as np

from sparsemoe.train.data import Corpus, DataError, DocumentCounts, corpus_name, is_val, iter_documents
from sparsemoe.train.tokenizer import (
    TOKENIZER_DIR, TOKENIZER_FILE, BPETokenizer, ByteTokenizer, TokenizerError, load_tokenizer, parse_spec, train_bpe,
)  # fmt: skip

FORMAT, VERSION = "sparsemoe-token-shards", 1
INDEX_FILE = "index.json"
SPLITS = ("train", "val")
Tokenizer = Union[ByteTokenizer, BPETokenizer]


def is_shard_folder(path: Optional[str]) -> bool:
    return path is not None and (Path(path) / INDEX_FILE).is_file()


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


# --- reading ---------------------------------------------------------------------------------------------
class ShardSplit:
    """One split of a shard folder as a `TokenStream`: its length, and windows read by position."""

    def __init__(self, paths: list[Path], counts: list[int], dtype: np.dtype) -> None:
        self.paths, self.dtype = paths, dtype
        self.ends = np.cumsum(counts, dtype=np.int64)  # [shards] token offset where each shard ends
        self._files: dict[int, int] = {}  # shard -> open descriptor, opened on first read

    def __len__(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def read(self, start: int, count: int) -> np.ndarray:
        """Tokens [start, start + count) of the split (across shard ends), as a new array."""
        if start < 0 or start + count > len(self):
            raise IndexError(f"tokens {start}..{start + count} are outside the split's {len(self)}")
        out, pos = [], start
        while pos < start + count:
            shard = int(np.searchsorted(self.ends, pos, side="right"))
            first = int(self.ends[shard - 1]) if shard else 0
            n = min(start + count, int(self.ends[shard])) - pos
            data = os.pread(self._fd(shard), n * self.dtype.itemsize, (pos - first) * self.dtype.itemsize)
            out.append(np.frombuffer(data, dtype=self.dtype))
            pos += n
        return np.concatenate(out) if len(out) > 1 else out[0].copy()

    def _fd(self, shard: int) -> int:
        if shard not in self._files:
            self._files[shard] = os.open(self.paths[shard], os.O_RDONLY)
        return self._files[shard]

    def close(self) -> None:
        for fd in self._files.values():
            os.close(fd)
        self._files.clear()

    def __del__(self) -> None:
        self.close()


def read_index(folder: Union[str, Path]) -> dict:
    path = Path(folder) / INDEX_FILE
    if not path.is_file():
        raise DataError(
            f"{str(folder)!r} is not a token-shard folder (no {INDEX_FILE}); make one with `sparsemoe prepare-data`"
        )
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"cannot read {str(path)!r}: {err}") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise DataError(f"{str(path)!r} is not a sparsemoe token-shard index")
    if index.get("version") != VERSION:
        raise DataError(f"{str(path)!r} has format version {index.get('version')!r}; this sparsemoe reads {VERSION}")
    return index


def shard_tokenizer(folder: Union[str, Path]) -> Tokenizer:
    """The tokenizer a shard folder's ids belong to."""
    sub = Path(folder) / TOKENIZER_DIR
    if not (sub / TOKENIZER_FILE).is_file():
        return ByteTokenizer()
    tok = load_tokenizer(str(sub))
    tok.spec = read_index(folder)["tokenizer"]["spec"]  # as it was asked for (bpe:N), not the folder it is in
    return tok


def open_shards(folder: Union[str, Path], tokenizer: Optional[Tokenizer] = None) -> Corpus:
    """The shard folder's splits as a Corpus of `ShardSplit`s, its files checked against the index.

    tokenizer: the one the caller will train or evaluate with; shards made with another are refused.
    """
    folder = Path(folder)
    index = read_index(folder)
    tok = index["tokenizer"]
    if tokenizer is not None and tokenizer.fingerprint() != tok["fingerprint"]:
        raise DataError(
            f"the shards in {str(folder)!r} were made with tokenizer {tok['spec']} (fingerprint {tok['fingerprint']}, "
            f"vocabulary {index['vocab_size']:,}), not {tokenizer.describe()}; prepare the data again with this "
            "tokenizer, or train with the shards' own"
        )
    dtype = np.dtype(index["dtype"])
    splits = {}
    for name in SPLITS:
        paths, counts = [], []
        for shard in index["splits"][name]["shards"]:
            path = folder / shard["file"]
            expected = shard["tokens"] * dtype.itemsize
            size = path.stat().st_size if path.is_file() else None
            if size is None:
                raise DataError(f"token shard {str(path)!r} is missing; prepare the data again")
            if size != expected:
                raise DataError(
                    f"token shard {str(path)!r} holds {size:,} bytes, but its index says {expected:,} "
                    f"({shard['tokens']:,} {dtype.name} tokens): it is truncated or was changed; prepare the data again"
                )
            paths.append(path)
            counts.append(shard["tokens"])
        splits[name] = ShardSplit(paths, counts, dtype)
    val = index["splits"]["val"]
    text_bytes = sum(index["splits"][n]["text_bytes"] for n in SPLITS)
    return Corpus(
        splits["train"], splits["val"], f"{index['source']} (shards {folder})", index["files"], index["skipped"],
        tokens_per_byte=val["tokens"] / max(val["text_bytes"], 1), text_bytes=text_bytes, shards=str(folder),
    )  # fmt: skip


# --- writing ---------------------------------------------------------------------------------------------
@dataclass
class _SplitWriter:
    """Appends documents' ids to one split's shards; a new shard starts once one holds `shard_tokens`."""

    folder: Path
    name: str
    dtype: np.dtype
    shard_tokens: int
    shards: list[dict] = field(default_factory=list)
    text_bytes: int = 0
    documents: int = 0
    last: Optional[tuple[np.ndarray, int]] = None  # the last document's ids and text bytes
    _file: Optional[IO[bytes]] = None  # the shard being written

    def add(self, ids: np.ndarray, text_bytes: int) -> None:
        if not self.shards or self.shards[-1]["tokens"] >= self.shard_tokens:
            self.close()
            self.shards.append({"file": f"{self.name}-{len(self.shards):05d}.bin", "tokens": 0})
            self._file = open(self.folder / self.shards[-1]["file"], "ab")
        self._file.write(ids.astype(self.dtype, copy=False).tobytes())
        self.shards[-1]["tokens"] += len(ids)
        self.text_bytes += text_bytes
        self.documents += 1
        self.last = (ids, text_bytes)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def pop_last(self) -> tuple[np.ndarray, int]:
        """Take the last document back out (it sits at the end of the last shard); the split is closed."""
        self.close()
        ids, text_bytes = self.last
        shard = self.shards[-1]
        shard["tokens"] -= len(ids)
        os.truncate(self.folder / shard["file"], shard["tokens"] * self.dtype.itemsize)
        if shard["tokens"] == 0:
            (self.folder / shard["file"]).unlink()
            self.shards.pop()
        self.text_bytes -= text_bytes
        self.documents -= 1
        self.last = None
        return ids, text_bytes

    @property
    def tokens(self) -> int:
        return sum(s["tokens"] for s in self.shards)

    def summary(self) -> dict:
        return {"tokens": self.tokens, "text_bytes": self.text_bytes, "documents": self.documents, "shards": self.shards}


def _batches(docs: Iterator[tuple[str, bytes]], max_docs: int = 512, max_bytes: int = 16 * 2**20):
    """Lists of documents, up to max_docs or max_bytes of text each (tokenized together, in parallel)."""
    batch, size = [], 0
    for doc in docs:
        batch.append(doc)
        size += len(doc[1])
        if len(batch) >= max_docs or size >= max_bytes:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def build_tokenizer(
    spec: Optional[str], src: Optional[str], val_fraction: float, max_bytes: Optional[int], train_bytes: int,
    log: Callable[[str], None] = print,
) -> Tokenizer:
    """The tokenizer a spec names; for bpe:N, trained on the first `train_bytes` of the corpus's training split."""
    kind, vocab = parse_spec(spec)
    if kind != "bpe":
        return load_tokenizer(spec)
    limit = min(train_bytes, max_bytes) if max_bytes is not None else train_bytes
    texts = (
        data.decode("utf-8")
        for key, data in iter_documents(src, limit)
        if not is_val(key, val_fraction)
    )
    log(f"training a byte-level BPE of {vocab:,} tokens on up to {limit:,} bytes of {corpus_name(src)}")
    return train_bpe(texts, vocab)


def prepare_data(
    src: Optional[str],
    out: Union[str, Path],
    tokenizer: Union[str, Tokenizer, None] = "bytes",
    *,
    val_fraction: float = 0.05,
    max_bytes: Optional[int] = None,
    shard_tokens: int = 2**26,
    tokenizer_train_bytes: int = 2**28,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
) -> Path:
    """Tokenize a corpus (see `iter_documents`: None, builtin:NAME, a file, JSONL or a folder) into token
    shards in `out`; returns `out`.

    tokenizer: a spec (bytes, bpe:N trained on the corpus's training split, a tokenizer.json or a folder
    holding one) or a tokenizer object. val_fraction: share of documents held out (by a hash of their
    names). shard_tokens: tokens per shard file, at least (a shard ends at a document boundary).
    tokenizer_train_bytes: a bpe:N tokenizer learns from at most this much text.
    """
    out = Path(out)
    if not 0 < val_fraction < 1:
        raise DataError(f"val_fraction={val_fraction} is invalid: expected a number in (0, 1)")
    if shard_tokens < 1:
        raise DataError(f"shard_tokens={shard_tokens} is invalid: expected an integer >= 1")
    if out.exists() and not (overwrite and out.is_dir()) and (out.is_file() or any(out.iterdir())):
        raise DataError(f"{str(out)!r} already exists and is not empty; remove it, choose another folder or overwrite")
    try:
        tok = tokenizer if hasattr(tokenizer, "fingerprint") else build_tokenizer(
            tokenizer, src, val_fraction, max_bytes, tokenizer_train_bytes, log
        )
    except TokenizerError as err:
        raise DataError(str(err)) from None
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        index = _write_shards(src, tmp, tok, val_fraction, max_bytes, shard_tokens)
        tok.save(tmp / TOKENIZER_DIR)
        (tmp / INDEX_FILE).write_text(json.dumps(index, indent=1) + "\n", encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    train, val = index["splits"]["train"], index["splits"]["val"]
    log(
        f"wrote {out}: {train['tokens']:,} training / {val['tokens']:,} validation tokens ({train['documents']:,} / "
        f"{val['documents']:,} documents, {index['tokens_per_byte']:.3f} tokens per byte), tokenizer {tok.describe()}"
    )
    return out


def _write_shards(
    src: Optional[str], folder: Path, tok: Tokenizer, val_fraction: float, max_bytes: Optional[int], shard_tokens: int
) -> dict:
    """Tokenize the documents into folder's shards; returns the index (not yet written)."""
    dtype = token_dtype(tok.vocab_size)
    writers = {name: _SplitWriter(folder, name, dtype, shard_tokens) for name in SPLITS}
    counts = DocumentCounts()
    for batch in _batches(iter_documents(src, max_bytes, counts)):
        for (key, data), ids in zip(batch, tok.encode_documents([data for _, data in batch])):
            if tok.eos_id is not None:
                ids = np.append(ids, tok.eos_id)
            writers["val" if is_val(key, val_fraction) else "train"].add(ids, len(data))
    train, val = writers["train"], writers["val"]
    for writer in writers.values():
        writer.close()
    if val.documents == 0:  # too few documents for the hash to pick one: hold out the last one read
        if train.documents < 2:
            raise DataError(
                f"{corpus_name(src)!r} holds one document: a validation split needs two; give more text "
                "(a single text file is split at line breaks into pieces of at least 4 KiB)"
            )
        val.add(*train.pop_last())
    if train.documents == 0:
        raise DataError(f"every document of {corpus_name(src)!r} fell into validation; lower --val-fraction")
    return {
        "format": FORMAT,
        "version": VERSION,
        "dtype": dtype.str,
        "vocab_size": tok.vocab_size,
        "eos_id": tok.eos_id,
        "tokenizer": {"spec": tok.spec, "fingerprint": tok.fingerprint()},
        "source": corpus_name(src),
        "val_fraction": val_fraction,
        "max_bytes": max_bytes,
        "files": counts.files,
        "skipped": counts.skipped,
        "tokens_per_byte": val.tokens / max(val.text_bytes, 1),
        "splits": {name: w.summary() for name, w in writers.items()},
    }


__all__ = ["ShardSplit", "is_shard_folder", "open_shards", "prepare_data", "read_index", "shard_tokenizer"]
