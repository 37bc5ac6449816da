"""Shared fixtures. Every numerical test draws fresh random inputs; nothing compares zeros with zeros."""

import collections

import pytest
import torch


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test starts with empty Dynamo caches so compile counts are its own, and leaves Dynamo as it found it:
    naming ``backend="kvpass"`` changes Dynamo config and its numpy map process-wide (kvpass.registered_backend)."""
    from kvpass.tracing import DYNAMO_CONFIG, install_traceable, traceable_installed, uninstall_traceable

    config = {key: getattr(torch._dynamo.config, key) for key in DYNAMO_CONFIG}
    installed = traceable_installed()
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
    for key, value in config.items():
        setattr(torch._dynamo.config, key, value)
    (install_traceable if installed else uninstall_traceable)()


@pytest.fixture
def rng():
    """A seeded torch.Generator (seed from the test's name, so reruns are reproducible)."""
    import zlib
    import os

    name = os.environ.get("PYTEST_CURRENT_TEST", "kvpass")
    return torch.Generator().manual_seed(zlib.crc32(name.encode()))


@pytest.fixture
def stock_numpy_tracing():
    """Stock Dynamo for this test: its own np.pad handling and default specialization (naming
    ``backend="kvpass"`` earlier in the process changed both process-wide); restored after."""
    from kvpass.tracing import DYNAMO_CONFIG, install_traceable, traceable_installed, uninstall_traceable

    was = traceable_installed()
    uninstall_traceable()
    defaults = {key: torch._dynamo.config._config[key].default for key in DYNAMO_CONFIG}
    with torch._dynamo.config.patch(defaults):
        yield
    if was:
        install_traceable()


@pytest.fixture(scope="session")
def gemma4():
    """Hugging Face Gemma4 with a tiny random config: shared KV layers, attention_k_eq_v, global_head_dim != head_dim."""
    pytest.importorskip("transformers")
    from kvpass.examples.hf_gemma4 import tiny_gemma4

    return tiny_gemma4(seed=18)


def _fuzz_counts():
    import sys

    fuzz = sys.modules.get("fuzz_decoders")
    return dict(fuzz.COUNTS) if fuzz is not None else {}


def pytest_sessionfinish(session):
    """Under pytest-xdist each worker hands its fuzz counts to the controller (``workeroutput``)."""
    if hasattr(session.config, "workeroutput"):
        session.config.workeroutput["kvpass_fuzz"] = _fuzz_counts()


def pytest_configure(config):
    config._kvpass_fuzz = collections.Counter()


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    """Controller side of pytest-xdist: add up what each worker's fuzz tests ran."""
    node.config._kvpass_fuzz.update(getattr(node, "workeroutput", {}).get("kvpass_fuzz", {}))


def pytest_terminal_summary(terminalreporter):
    """Print how many generated cases the fuzz tests ran (tests/test_fuzz_rewrite.py), over all workers."""
    counts = collections.Counter(terminalreporter.config._kvpass_fuzz)
    counts.update(_fuzz_counts())
    if counts:
        terminalreporter.write_line("kvpass fuzz: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
