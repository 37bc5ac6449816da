"""Issue 12, part A: every host-cache idiom of ``tests/idioms_host.py`` (numpy layout ops, tensor rebuilds, a
follower's padding into its owner's buffer, host int8 quantization, bf16 through float32, hops that end on the
host, a flat 1-D cache) compiles to one clean decode graph.

Per idiom, over a prefill and 8 decode steps on fresh random inputs, through
``kvpass.compile(model, backend=kvpass.backend(inner=RecordingBackend()))``:

(a) compiled equals eager (1e-5; bit for bit for the int8 quantization, whose rounding must not move);
(b) in every graph handed to the inner compiler, no attention's K/V path holds a host round-trip op (a copy to
    another device, a numpy-wrapped op, ``as_tensor``/``from_numpy``/``tensor``) or a read of a cache buffer's
    state after this step's write (on this CPU machine ``.cpu()`` is a no-op: such a read is what a host round
    trip leaves; ``idioms_host.kv_path_problems``);
(c) 2 compiled graphs: the prefill and one decode graph for every position;
(d) the report names each rewrite with the user's line (a line of ``tests/idioms_host.py``), and has no skip.

``python tests/idioms_host.py`` prints the same figures as a table.
"""

import functools
import warnings

import pytest
import torch

import idioms_host as ih

pytestmark = pytest.mark.filterwarnings("ignore:To copy construct from a tensor")

BIT_EXACT = {"09_host_int8_quant"}


@functools.lru_cache(maxsize=None)
def measured(name):
    """``idioms_host.measure`` once per idiom (it resets Dynamo itself)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ih.measure(name, decode=8)


@pytest.mark.parametrize("name", sorted(ih.IDIOMS))
def test_idiom_compiles_to_one_clean_decode_graph(name):
    m = measured(name)
    # (a) compiled equals eager, every step, every output
    assert len(m["got"]) == len(m["want"]) == 9
    assert max(float(b.abs().max()) for w in m["want"] for b in w) > 0.1, "degenerate reference output"
    for i, (g, w) in enumerate(zip(m["got"], m["want"])):
        for j, (a, b) in enumerate(zip(g, w)):
            if name in BIT_EXACT:
                assert torch.equal(a, b), f"{name} step {i}, output {j}: not bit-identical ({(a - b).abs().max()})"
            else:
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda s: f"{name} step {i}, output {j}: {s}")
    reports = "\n---\n".join(r.format() for r in m["reports"])
    # (b) nothing of the host round trip on any attention's K/V path
    assert not any(m["left"]), f"{name}: left on K/V paths: {m['left']}\n{reports}"
    # (c) the prefill and one decode graph
    assert m["graphs"] == 2, f"{name}: {m['graphs']} graphs compiled for a prefill and 8 decode steps"
    # (d) each rewrite named with the user's line; nothing skipped
    assert m["reports"] and all(r.matches for r in m["reports"]), f"{name}: a graph without rewrites\n{reports}"
    for r in m["reports"]:
        assert not r.skips, f"{name}: skipped\n{reports}"
        for match in r.matches:
            assert "idioms_host.py:" in match.source, f"{name}: {match.pattern} not named with the user's line: {match}"


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(ih.IDIOMS))
def test_idiom_through_inductor_matches_eager(name):
    """``kvpass.compile(model)`` with its defaults (the rewrite inside Inductor): eager's values over a prefill and
    6 decode steps (1e-4: Inductor fuses the attention; the int8 histories of item 9 bit for bit, since the
    quantization's division, rounding and cast are correctly rounded in any order Inductor may emit them)."""
    import kvpass

    cls = ih.IDIOMS[name]
    xs = ih.inputs(name, 6, cls.dtype)
    want = ih.run(cls(), xs)
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = ih.run(kvpass.compile(cls()), xs)
    tol = dict(rtol=2e-2, atol=2e-2) if cls.dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-4)
    for i, (g, w) in enumerate(zip(got, want)):
        for j, (a, b) in enumerate(zip(g, w)):
            if name in BIT_EXACT and j > 0:  # the dequantized histories
                assert torch.equal(a, b), f"{name} step {i}, output {j}: not bit-identical"
            else:
                torch.testing.assert_close(a, b, **tol, msg=lambda s: f"{name} step {i}, output {j}: {s}")
