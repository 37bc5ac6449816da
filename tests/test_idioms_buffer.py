"""Issue 12, part B: buffer-region idioms come out clean (models in ``tests/idioms_buffer.py``).

Per idiom, one compiled run (``kvpass.compile`` with ``kvpass.backend(inner=<recording eager>)``) over a prefill
and 8 decode steps of fresh random inputs, checked four ways:

(a) every step's output, and the final cache, equal eager's (1e-5);
(b) in every graph handed to the inner compiler, an attention's K/V path holds no host op (``cpu`` transfer,
    numpy-derived op, ``as_tensor``/``from_numpy``/``tensor``) and no write into a cache buffer: the step's K/V
    reaches attention through graph edges (``idioms_buffer.kv_through_buffer``);
(c) the number of graphs Dynamo compiled: 2 (prefill, one decode graph), the ring and growing buffers their stated
    count;
(d) the report names a rewrite at each of the user's cache writes, with the user's line, and skips nothing.

Plus: no noise on models without round trips (transformers' Gemma3n and Gemma4, AltUp's minimal case).
"""

from __future__ import annotations

import warnings

import pytest
import torch

import idioms_buffer as ib
import kvpass

pytestmark = pytest.mark.filterwarnings("ignore:To copy construct from a tensor")

TOL = dict(rtol=1e-5, atol=1e-5)

#: graphs over a prefill + 8 decode steps where it is not 2, and why
GRAPHS = {
    # the read switches from buf[:, :n] to the logical-order read when the ring is full (a guard on n <= W):
    # one extra decode graph, then every position (every later wrap) reuses it
    "08a_ring_concatenate": 3,
    "08a_ring_roll": 3,
    # the prefill (capacity 4); the first growth (a guard on p + t > cap and a buffer of a new size); the
    # steps that fit in a grown buffer (size now dynamic); the second growth reuses the growth graph
    "08b_growing_buffer": 3,
}

#: the user's write lines each idiom's report must name (a substring of the source line)
WRITES = {
    "04_per_token_loop": ["self.k_buf[:, p + j] = kn[:, j]", "self.v_buf[:, p + j] = vn[:, j]"],
    "05a_slab_chained": ["self.kv[i][0][:, p : p + t] =", "self.kv[i][1][:, p : p + t] ="],
    "05b_slab_tuple": ["self.kv[i, 0, :, p : p + t] =", "self.kv[i, 1, :, p : p + t] ="],
    "06a_history_before_write": ["self.k_buf[:, p : p + t] =", "self.v_buf[:, p : p + t] ="],
    "06b_lagging_follower": ["self.k_buf[:, start : start + t] =", "self.v_buf[:, start : start + t] ="],
    "07_head_slice_owners": ["self.k_buf[lo : lo + H, p : p + t] =", "self.v_buf[lo : lo + H, p : p + t] ="],
    "08a_ring_concatenate": ["buf[:, p % W] = a[:, 0]", "buf[:, p : p + t] = a"],
    "08a_ring_roll": ["buf[:, p % W] = a[:, 0]", "buf[:, p : p + t] = a"],
    "08b_growing_buffer": ["self.k_buf[:, p : p + t] =", "self.v_buf[:, p : p + t] ="],
}


def measured(name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ib.measure(name)


@pytest.mark.parametrize("name", sorted(ib.IDIOMS))
def test_buffer_idiom_compiles_clean(name):
    m = measured(name)
    # (a) compiled equals eager, every step and the final cache
    assert len(m.got) == 1 + ib.DECODE
    for i, (g, w) in enumerate(zip(m.got, m.want)):
        torch.testing.assert_close(g, w, **TOL, msg=lambda s: f"{name} step {i}: {s}")
    assert max(float(w.abs().max()) for w in m.want) > 0.1, "degenerate reference output"
    oracle = ib.IDIOMS[name]()
    ib.run_steps(oracle, ib.inputs(name))
    for key, want in oracle.cache_state().items():
        torch.testing.assert_close(m.model.cache_state()[key], want, **TOL, msg=lambda s: f"{name} cache {key}: {s}")
    # (b) the step's K/V reaches attention through graph edges, no host op on the way
    assert m.inner, f"{name}: no graph reached the inner compiler"
    for g in m.inner:
        host, through = ib.kv_host_ops(g), ib.kv_through_buffer(g)
        assert not host and not through, (
            f"{name}: on an attention's K/V path: host ops {[n.name for n in host]}, cache-buffer writes "
            f"{[n.name for n in through]}\n" + "\n".join(r.format() for r in m.reports))
    # (c) one decode graph for every position (the ring and growing buffers: their stated count)
    assert len(m.dynamo) == GRAPHS.get(name, 2), f"{name}: {len(m.dynamo)} graphs"
    # (d) each rewrite named with the user's line; nothing skipped
    sources = [mt.source for r in m.reports for mt in r.matches]
    assert all("idioms_buffer.py" in s for s in sources), sources
    for line in WRITES[name]:
        assert any(line in s for s in sources), f"{name}: no rewrite reported at {line!r}:\n{sources}"
    skips = [s for r in m.reports for s in r.skips]
    assert not skips, f"{name}: skipped: {skips}"


# ---- no noise on models without round trips ------------------------------------------------------------------


def test_altup_minimal_case_reports_nothing():
    """``buf = x * 2; buf[1:] += y; return buf[0] + 1``: a write into an intermediate (no cache), read where it
    did not write: the rewrite leaves it alone and says nothing."""
    reports = []
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(4, 3, generator=g), torch.randn(3, 3, generator=g)
    got = torch.compile(ib.altup_minimal, backend=kvpass.backend(inner="eager", on_report=reports.append))(x, y)
    torch.testing.assert_close(got, ib.altup_minimal(x, y), rtol=0, atol=0)
    assert reports and all(not r.matches and not r.skips for r in reports), [r.format() for r in reports]


def tiny_gemma3n(seed=12):
    """transformers' Gemma3n, tiny random config: shared KV layers (2 of 4), AltUp (4 inputs), LAuReL, per-layer
    inputs; every parameter redrawn so no norm is an identity."""
    import transformers

    config = transformers.Gemma3nTextConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, sliding_window=8, num_kv_shared_layers=2,
        layer_types=["sliding_attention", "full_attention"] * 2, vocab_size_per_layer_input=128,
        hidden_size_per_layer_input=8, laurel_rank=4, max_position_embeddings=64, use_cache=True)
    torch.manual_seed(seed)
    model = transformers.Gemma3nForCausalLM(config).eval()
    for p in model.parameters():
        p.data.normal_(0.0, 0.3)
    return model


@pytest.mark.parametrize("which", ["gemma3n", "gemma4"])
def test_hf_shared_kv_models_report_nothing(which, request):
    """Gemma3n (shared KV, AltUp) and Gemma4 (shared KV, k_eq_v): no host round trip, so kvpass reports nothing
    (no match, no skip) and the greedy tokens are eager's."""
    pytest.importorskip("transformers")
    from kvpass.examples.hf_gemma4 import greedy

    model = tiny_gemma3n() if which == "gemma3n" else request.getfixturevalue("gemma4")
    prompt = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(7))
    want = greedy(model, model.forward, prompt, 6)
    assert len(set(want)) > 1, "degenerate generation"
    reports = []
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = greedy(model, torch.compile(model.forward, backend=kvpass.backend(inner="eager", on_report=reports.append)),
                     prompt, 6)
    assert got == want
    assert reports and all(not r.matches and not r.skips for r in reports), "\n".join(r.format() for r in reports)


# ---- 13: tensor parallel, two processes -----------------------------------------------------------------------


@pytest.mark.slow
def test_tensor_parallel_shared_kv_decoder_two_processes(tmp_path):
    """Heads split across 2 gloo ranks on CPU, an all-reduce after each output projection, each rank its own host
    cache: ``kvpass.compile`` on each rank gives one decode graph, equals the single-process eager model, rewrites
    every cache read, and hands the inner compiler the collectives untouched (one all-reduce per layer)."""
    import torch.multiprocessing as mp

    import tp_decoder as tp

    mp.spawn(tp.worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    want = tp.run_steps(tp.TPDecoder(), tp.token_inputs())
    for rank in range(2):
        r = torch.load(tmp_path / f"rank{rank}.pt")
        for i, (got, eager, w) in enumerate(zip(r["compiled"], r["eager"], want)):
            torch.testing.assert_close(eager, w, **TOL, msg=lambda s: f"rank {rank} eager step {i}: {s}")
            torch.testing.assert_close(got, w, **TOL, msg=lambda s: f"rank {rank} compiled step {i}: {s}")
        assert len(r["compiled"]) == 1 + tp.DECODE
        assert r["graphs"] == 2, f"rank {rank}: {r['graphs']} graphs"
        assert r["collectives"] and all(c == 3 for c in r["collectives"]), r["collectives"]
        assert not any(r["host"]) and not any(r["through"]), (r["host"], r["through"])
        assert r["matches"] and not r["skips"], (r["matches"], r["skips"])
