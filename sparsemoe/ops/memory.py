"""Fresh large CPU buffers without a page fault per 4 KiB: huge pages, and memory that malloc keeps for reuse.

A fresh multi-megabyte tensor is first touched page by page. With 4 KiB pages that is a page fault per
4 KiB: a 64 MiB expert weight gradient (fine-grained: 64 experts of 512 x 512) costs 16,384 faults,
about 17 ms on the benchmark machine, 4 ms with 2 MiB pages (measured by filling a fresh tensor). On
Linux with transparent huge pages in `madvise` mode (the usual default) a region gets huge pages only
when asked with madvise(MADV_HUGEPAGE); PyTorch asks only when THP_MEM_ALLOC_ENABLE=1 is set before it
starts. `empty_huge` asks for the one tensor it returns, which changes nothing but its page size; on
other systems, on accelerators and for small tensors it is plain `torch.empty`.

Faults come back on every call when the memory is new each time. PyTorch's CPU allocator is glibc's
malloc, which serves a block of 32 MiB or more (and, once a process has freed such blocks, anything above
its adaptive threshold) by a fresh mmap and unmaps it on free: the next step's weight gradients, saved
activations and autograd buffers are fresh pages again. A layer timed alone often gets the same pages
back; inside a training step, with other work between, it does not (measured: 1,100 faults and up to
80 ms of system time per forward+backward of the fine-grained layer, docs/benchmarks.md).
`keep_freed_memory()` tells malloc to serve large blocks from its heap and keep freed ones for reuse,
which is what the jemalloc/tcmalloc advice for CPU training achieves; the `sparsemoe` command calls it.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import os
import sys
from typing import Optional

import torch
from torch import Tensor

HUGE_PAGE = 2 << 20
KEEP_FREED_MEMORY_ENV = "SPARSEMOE_KEEP_FREED_MEMORY"  # "0": leave malloc's defaults alone
MIN_BYTES = 4 * HUGE_PAGE  # below this the saving is small and the tensor may share pages with others
_MADV_HUGEPAGE = 14  # <sys/mman.h> on Linux


# <malloc.h> (glibc) mallopt parameters
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8


@functools.lru_cache(maxsize=None)
def _libc_function(name: str, argtypes: tuple) -> Optional[ctypes._CFuncPtr]:
    """A C library function of this process on Linux, or None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None
    fn.argtypes = list(argtypes)
    fn.restype = ctypes.c_int
    return fn


def _madvise() -> Optional[ctypes._CFuncPtr]:
    return _libc_function("madvise", (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int))


@functools.lru_cache(maxsize=None)
def keep_freed_memory() -> bool:
    """Make glibc's malloc keep large freed blocks for reuse (process-wide, from now on); True if it did.

    Blocks then come from malloc's heap (no per-block mmap) and freed memory is not handed back to the
    system, so a training or benchmark loop that frees and reallocates the same sizes every step usually
    touches fresh pages only in its first steps (not always: a thread that glibc moved to another arena
    before this call still gets large blocks by mmap); the process keeps its peak memory until it exits. A
    no-op returning False off glibc, or with SPARSEMOE_KEEP_FREED_MEMORY=0.
    """
    if os.environ.get(KEEP_FREED_MEMORY_ENV, "1") == "0":
        return False
    mallopt = _libc_function("mallopt", (ctypes.c_int, ctypes.c_int))
    if mallopt is None:
        return False
    # Each returns 1 on success; glibc falls back to mmap by itself if the heap cannot grow. One arena: a
    # thread moved to another arena (glibc does that under contention) would get heaps of at most 64 MiB,
    # and mmap, for anything larger.
    return all(mallopt(param, value) for param, value in ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1)))


def advise_huge_pages(t: Tensor) -> bool:
    """Ask the kernel to back the whole 2 MiB-aligned interior of t's memory with huge pages.

    Returns whether it was asked and accepted. Best before the memory is first written.
    """
    nbytes = t.numel() * t.element_size()
    madvise = _madvise()
    if madvise is None or t.device.type != "cpu" or nbytes < MIN_BYTES:
        return False
    start = (t.data_ptr() + HUGE_PAGE - 1) & ~(HUGE_PAGE - 1)
    end = (t.data_ptr() + nbytes) & ~(HUGE_PAGE - 1)
    return end > start and madvise(start, end - start, _MADV_HUGEPAGE) == 0


# Weights from this size get huge pages in `move_to_huge_pages`: each then takes whole 2 MiB pages (a
# 512 KiB weight 2 MiB), a few percent more memory for a model whose attention projections are this small.
WEIGHT_MIN_BYTES = 512 << 10


def move_to_huge_pages(module: torch.nn.Module) -> int:
    """Copy each CPU parameter and buffer of `module` of at least `WEIGHT_MIN_BYTES` (whole tensors) into memory
    of its own, 2 MiB-aligned and backed by huge pages where the system gives them; returns the bytes moved
    (0 where the system has no madvise).

    For inference: a decode step streams every weight it uses once, and with 4 KiB pages the reads pay a
    TLB miss every 4 KiB (costly in a virtual machine, where each miss walks two page tables). Measured on
    the 2-core benchmark machine (torch 2.13): the bfloat16 expert stage of mixtral-1k read at 26 GB/s
    from 4 KiB pages and 33-34 GB/s from huge pages (`sparsemoe bench --inference` in docs/benchmarks.md
    has the whole-model effect); its attention projections (0.5 and 2 MiB each), once left on 4 KiB pages
    as too small to hold a huge page where malloc put them, read at 0.76-0.77 of the expert stage's rate
    and at 0.85 from huge pages (`tools/native_decode_profile.py`). The values are unchanged; tensors
    that are views of others are left as they are. Not for training: the memory is the weights' own, not
    the allocator's."""
    if _madvise() is None:
        return 0
    moved = 0
    seen: set[int] = set()
    with torch.no_grad():
        for tensor in (*module.parameters(), *module.buffers()):
            nbytes = tensor.numel() * tensor.element_size()
            if id(tensor) in seen or tensor.device.type != "cpu" or nbytes < WEIGHT_MIN_BYTES:
                continue
            seen.add(id(tensor))
            whole = tensor.is_contiguous() and tensor.untyped_storage().nbytes() == nbytes and tensor.storage_offset() == 0
            if whole:
                tensor.data = _huge_copy(tensor)
                moved += nbytes
    return moved


def _huge_copy(tensor: Tensor) -> Tensor:
    """A copy of a contiguous CPU tensor in a private anonymous mapping of its own (kept alive by the tensor's
    storage), starting on a 2 MiB boundary and advised huge pages before it is first written."""
    nbytes = tensor.numel() * tensor.element_size()
    size = -(-nbytes // HUGE_PAGE) * HUGE_PAGE
    region = mmap.mmap(-1, size + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    start = ctypes.c_char.from_buffer(region)
    offset = -ctypes.addressof(start) % HUGE_PAGE
    _madvise()(ctypes.addressof(start) + offset, size, _MADV_HUGEPAGE)  # refused: 4 KiB pages, the same values
    del start  # (a view of the mapping's buffer)
    fresh = torch.frombuffer(region, dtype=tensor.dtype, count=tensor.numel(), offset=offset).view(tensor.shape)
    return fresh.copy_(tensor)


def empty_huge(*shape: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """torch.empty(shape), with huge pages asked for when it is large and on the CPU (see the module docstring)."""
    t = torch.empty(shape, dtype=dtype, device=device)
    advise_huge_pages(t)
    return t
