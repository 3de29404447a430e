import os

import pytest
import torch

# Deterministic, quiet tests: a fixed small thread count keeps timings comparable on 2-core CI machines.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
