"""Shared pytest configuration.

Process-level tests are marked `slow`; they stay in the suite (CI runs everything), the mark only
lets a developer run `pytest -m "not slow"` for a quick loop.
"""

import pytest
import torch


@pytest.fixture(scope="module")
def one_torch_thread():
    """Run a test module on one torch thread (use with `pytest.mark.usefixtures`).

    Workers under test run one thread, and bit-identity holds per kernel configuration: a CPU
    matmul split over two threads may sum in another order, so reference outputs are computed the
    same way. Tiny models gain nothing from more threads anyway. Module-scoped, so the module's own
    fixtures run on one thread too; the count is restored afterwards, so no module depends on
    another's setting.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
