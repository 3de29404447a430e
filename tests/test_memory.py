"""Huge-page advice for the large buffers the expert op allocates (sparsemoe/ops/memory.py)."""

from __future__ import annotations

import os
import sys

import pytest
import torch

from sparsemoe.ops import memory

THP = "/sys/kernel/mm/transparent_hugepage/enabled"


def test_empty_huge_is_an_ordinary_tensor():
    t = memory.empty_huge(3, memory.MIN_BYTES // 12, dtype=torch.float32, device=torch.device("cpu"))
    assert t.shape == (3, memory.MIN_BYTES // 12) and t.dtype == torch.float32 and t.is_contiguous()
    t.fill_(2.0)
    assert float(t.sum()) == 2.0 * t.numel()


def test_small_tensors_are_left_alone():
    assert not memory.advise_huge_pages(torch.empty(1000))
    assert not memory.advise_huge_pages(torch.empty(0))


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or not os.path.exists(THP) or "[never]" in open(THP).read(),
    reason="transparent huge pages are not available here",
)
def test_large_cpu_tensors_are_advised_on_linux():
    assert memory.advise_huge_pages(torch.empty(memory.MIN_BYTES // 4 + 12345))
    assert memory.advise_huge_pages(torch.empty(2 * memory.MIN_BYTES // 4)[1:])  # an unaligned start
