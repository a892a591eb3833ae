"""Shared fixtures of the evaluation tests."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_cpu_thread():
    # Tiny tensors: intra-op threads only add synchronisation, which is very costly on a
    # shared, busy machine. Restored afterwards for the rest of the session.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
