import os

import pytest
import torch

# Deterministic, quiet tests: a fixed small thread count keeps timings comparable on 2-core CI machines.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _restore_threads():
    """Commands run in-process set torch's thread count (--threads): each test leaves it as it found it."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture(params=["cpu-kernels", "pytorch"])
def native_kernels(request, monkeypatch) -> bool:
    """Run a test with the native CPU kernels, and again on the PyTorch/BLAS paths used without a compiler."""
    from sparsemoe.ops import cpu_kernels

    if request.param == "pytorch":
        monkeypatch.setattr(cpu_kernels, "available", lambda: False)
    elif not cpu_kernels.available():
        pytest.skip(
            "native CPU kernels unavailable here (no C compiler, or SPARSEMOE_CPU_KERNELS=0); the PyTorch case runs"
        )
    return request.param == "cpu-kernels"
