"""Safetensors input/output that never holds a second copy of a model in memory.

Reading: `CheckpointFiles` opens a checkpoint directory (one `*.safetensors` file, several, or shards
listed by `model.safetensors.index.json`), parses only the headers, and reads a tensor's bytes with
plain file reads, straight into the destination (e.g. one expert's rows of a stacked parameter) when
the dtypes agree. It does not memory-map the files: a mapped file's pages count against the process
like a second copy of the weights once every tensor has been touched.

Writing: `write_safetensors` writes the header first (computed from shapes and dtypes) and then each
tensor's bytes in turn, so a model is saved without building a second copy of it in memory (the
stock `safetensors.torch.save_file` turns every tensor into a `bytes` object before writing).

Format (https://github.com/huggingface/safetensors): 8-byte little-endian header length N, N bytes of
JSON {name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}, then the data.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Collection, Iterable, Optional, Union

import torch
from torch import Tensor

INDEX_FILE = "model.safetensors.index.json"

# torch dtype <-> safetensors dtype names.
_DTYPE_NAMES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",  # FP8 block-quantised weights, dequantised on load (sparsemoe.hf.fp8)
}


class HFFormatError(ValueError):
    """A Hugging Face checkpoint or config that cannot be used: missing, truncated, unsupported or mismatched."""


_DTYPES = {name: dtype for dtype, name in _DTYPE_NAMES.items()}
_MAX_HEADER = 100 * 2**20  # the reference implementation's limit too: larger means a corrupt file


def _read_header(path: Path) -> tuple[int, dict[str, dict]]:
    """(offset of the data section, tensor entries) of a safetensors file, with its size checked."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 2 or n > min(_MAX_HEADER, size - 8):
            raise HFFormatError(f"safetensors file {str(path)!r} is corrupt or truncated (bad header length)")
        try:
            header = json.loads(fh.read(n))
            entries = {k: v for k, v in header.items() if k != "__metadata__"}
            end = max((int(v["data_offsets"][1]) for v in entries.values()), default=0)
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as err:
            raise HFFormatError(f"safetensors file {str(path)!r} has a corrupt header ({err})") from None
    if 8 + n + end > size:
        raise HFFormatError(
            f"safetensors file {str(path)!r} is truncated: {size} bytes, its header describes {8 + n + end}"
        )
    return 8 + n, entries


class CheckpointFiles:
    """Lazy view of the tensors in a directory of safetensors files.

    Nothing is read at construction but the files' headers; `get(key)` reads one tensor and
    `read_into(key, out)` reads it into an existing tensor.
    """

    def __init__(self, directory: Union[str, Path]) -> None:
        self.directory = Path(directory)
        self.weight_map: dict[str, Path] = {}
        self._headers: dict[Path, tuple[int, dict[str, dict]]] = {}
        self.bytes_read = 0  # data bytes read so far (every tensor once = the checkpoint's data size)
        index = self.directory / INDEX_FILE
        if index.is_file():
            self._read_index(index)
        else:
            files = sorted(self.directory.glob("*.safetensors"))
            if not files:
                raise HFFormatError(
                    f"no *.safetensors file in {str(self.directory)!r}; only safetensors checkpoints are read "
                    "(re-save a PyTorch .bin checkpoint with transformers' save_pretrained first)"
                )
            for path in files:
                for key in self._header(path)[1]:
                    self.weight_map[key] = path

    def _read_index(self, index: Path) -> None:
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
            raise HFFormatError(f"shard index {str(index)!r} is corrupt or truncated ({err})") from None
        for key, name in weight_map.items():
            path = self.directory / name
            if not path.is_file():
                raise HFFormatError(f"shard {name!r} listed in {INDEX_FILE} (for {key!r}) is missing")
            self.weight_map[key] = path

    def _header(self, path: Path) -> tuple[int, dict[str, dict]]:
        if path not in self._headers:
            self._headers[path] = _read_header(path)
        return self._headers[path]

    def _entry(self, key: str) -> tuple[Path, int, dict]:
        path = self.weight_map.get(key)
        if path is None:
            raise HFFormatError(f"weight {key!r} is missing from the checkpoint in {str(self.directory)!r}")
        start, entries = self._header(path)
        if key not in entries:
            raise HFFormatError(f"weight {key!r} is listed in {INDEX_FILE} but missing from {path.name!r}")
        return path, start, entries[key]

    def keys(self) -> set[str]:
        return set(self.weight_map)

    def __contains__(self, key: str) -> bool:
        return key in self.weight_map

    def shape(self, key: str) -> tuple[int, ...]:
        """The stored shape of `key`, from the header only."""
        return tuple(self._entry(key)[2]["shape"])

    def dtype(self, key: str) -> torch.dtype:
        """The stored dtype of `key`, from the header only."""
        name = self._entry(key)[2]["dtype"]
        if name not in _DTYPES:
            raise HFFormatError(
                f"weight {key!r} is stored as {name}, which is not supported "
                f"(supported: {', '.join(_DTYPES)})"
            )
        return _DTYPES[name]

    def get(self, key: str) -> Tensor:
        """Read one tensor."""
        out = torch.empty(self.shape(key), dtype=self.dtype(key))
        self._read(key, out)
        return out

    def read_into(self, key: str, out: Tensor) -> None:
        """Read `key` into `out` (same shape), directly when `out` is a contiguous CPU tensor of its dtype."""
        if tuple(out.shape) != self.shape(key):
            raise HFFormatError(f"weight {key!r} has shape {self.shape(key)}, expected {tuple(out.shape)}")
        if out.dtype == self.dtype(key) and out.is_contiguous() and out.device.type == "cpu":
            self._read(key, out)
        else:
            with torch.no_grad():
                out.copy_(self.get(key))

    def _read(self, key: str, out: Tensor) -> None:
        path, start, entry = self._entry(key)
        begin, end = (int(v) for v in entry["data_offsets"])
        if end - begin != out.numel() * out.element_size():
            raise HFFormatError(f"weight {key!r} in {path.name!r}: its byte range does not match its shape and dtype")
        if begin == end:
            return
        view = memoryview(out.detach().reshape(-1).view(torch.uint8).numpy())
        done = 0
        with open(path, "rb", buffering=0) as fh:
            fh.seek(start + begin)
            while done < len(view):  # a single read returns at most ~2 GiB on Linux
                got = fh.readinto(view[done:])
                if not got:
                    raise HFFormatError(f"safetensors file {str(path)!r} ended while reading {key!r} (truncated)")
                done += got
        self.bytes_read += done

    def close(self) -> None:
        self._headers.clear()


def _tensor_bytes(t: Tensor):
    """The raw little-endian bytes of a tensor as a numpy uint8 array (one temporary copy of this tensor only)."""
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy()


def write_safetensors(
    path: Union[str, Path],
    tensors: Iterable[tuple[str, Tensor]],
    metadata: Optional[dict[str, str]] = None,
    dtype: Optional[torch.dtype] = None,
    keep_dtype: Collection[str] = (),
) -> int:
    """Write named tensors to a safetensors file, one tensor at a time. Returns the file size in bytes.

    `tensors` may hold views (e.g. one expert's slice of a stacked parameter); each is made contiguous,
    and cast to `dtype` if given (floating tensors not named in `keep_dtype`), only while it is written.
    The file is written under a temporary name and renamed when complete, so an interrupted write never
    leaves a valid-looking partial file.
    """
    items = list(tensors)
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    keep = set(keep_dtype)
    cast = [dtype is not None and t.is_floating_point() and name not in keep for name, t in items]
    offset = 0
    for (name, t), cast_it in zip(items, cast):
        out_dtype = dtype if cast_it else t.dtype
        if out_dtype not in _DTYPE_NAMES:
            raise HFFormatError(f"cannot save {name!r}: dtype {out_dtype} has no safetensors equivalent")
        size = t.numel() * torch.empty((), dtype=out_dtype).element_size()
        header[name] = {
            "dtype": _DTYPE_NAMES[out_dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)  # the format aligns the data section to 8 bytes
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(len(blob).to_bytes(8, "little"))
        fh.write(blob)
        for (_, t), cast_it in zip(items, cast):
            if t.numel():
                fh.write(_tensor_bytes(t.to(dtype) if cast_it else t).data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path.stat().st_size
