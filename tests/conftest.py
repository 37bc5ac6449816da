"""Shared fixtures. Every numerical test draws fresh random inputs; nothing compares zeros with zeros."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test starts with empty Dynamo caches so compile counts are its own."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def rng():
    """A seeded torch.Generator (seed from the test's name, so reruns are reproducible)."""
    import zlib
    import os

    name = os.environ.get("PYTEST_CURRENT_TEST", "kvpass")
    return torch.Generator().manual_seed(zlib.crc32(name.encode()))
