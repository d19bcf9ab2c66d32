"""Shared pytest configuration.

Process-level tests are marked `slow`; they stay in the suite (CI runs everything), the mark only
lets a developer run `pytest -m "not slow"` for a quick loop.
"""

import pytest
import torch


@pytest.fixture
def one_torch_thread():
    """Compute the test's reference outputs on one torch thread, as the workers under test do.

    Bit-identity holds per kernel configuration: a CPU matmul split over two threads may sum in
    another order. Restores the thread count after the test, so no test depends on another's.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
