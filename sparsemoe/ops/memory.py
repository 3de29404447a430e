"""Large CPU buffers backed by transparent huge pages, for the tensors the expert op allocates itself.

A fresh multi-megabyte tensor is first touched page by page. With 4 KiB pages that is a page fault per
4 KiB: a 64 MiB expert weight gradient (fine-grained: 64 experts of 512 x 512) costs 16,384 faults,
about 17 ms on the benchmark machine, 4 ms with 2 MiB pages (measured by filling a fresh tensor). On
Linux with transparent huge pages in `madvise` mode (the usual default) a region gets huge pages only
when asked with madvise(MADV_HUGEPAGE); PyTorch asks only when THP_MEM_ALLOC_ENABLE=1 is set before it
starts. `empty_huge` asks for the one tensor it returns, which changes nothing but its page size; on
other systems, on accelerators and for small tensors it is plain `torch.empty`.
"""

from __future__ import annotations

import ctypes
import functools
import sys
from typing import Optional

import torch
from torch import Tensor

HUGE_PAGE = 2 << 20
MIN_BYTES = 4 * HUGE_PAGE  # below this the saving is small and the tensor may share pages with others
_MADV_HUGEPAGE = 14  # <sys/mman.h> on Linux


@functools.lru_cache(maxsize=None)
def _madvise() -> Optional[ctypes._CFuncPtr]:
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


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


def empty_huge(*shape: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """torch.empty(shape), with huge pages asked for when it is large and on the CPU (see the module docstring)."""
    t = torch.empty(shape, dtype=dtype, device=device)
    advise_huge_pages(t)
    return t
