"""Shared fixtures of the evaluation tests."""

import pytest


@pytest.fixture(autouse=True, scope="module")
def _one_cpu_thread(one_cpu_thread):
    yield
