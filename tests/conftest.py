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


@pytest.fixture
def stock_numpy_tracing():
    """Dynamo's own np.pad handling for this test (``backend="kvpass"`` installs a traceable one process-wide)."""
    from kvpass.tracing import install_traceable_numpy, traceable_numpy_installed, uninstall_traceable_numpy

    was = traceable_numpy_installed()
    uninstall_traceable_numpy()
    yield
    if was:
        install_traceable_numpy()
