"""The kvpass backend on the reference model: exact against eager, no round trip left on the K/V path, one decode
graph under kvpass.compile, a report with the user's lines, the .tolist() warning, the Inductor pass's cache key."""

import warnings

import pytest
import torch
import torch._dynamo.utils

import kvpass
from kvpass.examples.shared_kv_model import SharedKVConfig, reference_model
from kvpass.testing import RecordingBackend, host_round_trip_nodes

STEPS = 16


def tokens(n, seed):
    return torch.randint(0, 64, (1, n), generator=torch.Generator().manual_seed(seed))


def run(step, prompt, decode):
    """Prefill then teacher-forced decode steps (same tokens for every runner: no argmax ties to worry about)."""
    with torch.no_grad():
        out = [step(prompt)]
        for t in decode:
            out.append(step(t.reshape(1, 1)))
    return out


def assert_matches_eager(got, want):
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert w.abs().max() > 0.1, "degenerate reference output"
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5, msg=lambda m: f"step {i}: {m}")


Recorder = RecordingBackend  # an inner backend that keeps the graphs kvpass hands to it


def reaches(node, pred, seen=None):
    """Does ``node`` depend, through graph edges, on a node satisfying ``pred``?"""
    seen = set() if seen is None else seen
    stack = [node]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if pred(n):
            return True
        stack.extend(n.all_input_nodes)
    return False


def is_proj(name):
    def pred(n):
        return n.op == "call_function" and n.target is torch._C._nn.linear and any(
            name in a.name for a in n.all_input_nodes if a.op == "placeholder")
    return pred


def sdpa_nodes(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch._C._nn.scaled_dot_product_attention]


host_nodes = host_round_trip_nodes


@pytest.fixture(scope="module")
def compiled_eager_inner():
    """kvpass.compile with a recording inner backend over a prefill and 16 decode steps, and the eager oracle."""
    torch._dynamo.reset()
    prompt, decode = tokens(8, 1), tokens(STEPS, 2)[0]
    model = reference_model(seed=11)
    recorder, reports = Recorder(), []
    compiled = kvpass.compile(model, backend=kvpass.backend(inner=recorder, on_report=reports.append))
    got = run(compiled, prompt, decode)
    want = run(reference_model(seed=11), prompt, decode)
    torch._dynamo.reset()
    return got, want, recorder.graphs, reports


def test_reference_model_has_every_cache_variant():
    names = {type(c).__name__ for c in reference_model().caches}
    assert names == {"PositionalKVCache", "SharedPositionalKVCache", "PaddedSharedPositionalKVCache",
                     "OwnerReadOnlyKVCache"}
    cfg = SharedKVConfig()
    assert cfg.sandwich_norms and cfg.kv_shared_layers > 0 and cfg.global_head_dim != cfg.head_dim


def test_kvpass_compile_matches_eager(compiled_eager_inner):
    got, want, _, _ = compiled_eager_inner
    assert_matches_eager(got, want)


def test_kvpass_compile_gives_one_decode_graph_for_all_positions(compiled_eager_inner):
    _, _, graphs, _ = compiled_eager_inner
    assert len(graphs) == 2  # prefill, and one decode graph for all 16 positions


def test_no_host_round_trip_reaches_the_inner_compiler(compiled_eager_inner):
    _, _, graphs, _ = compiled_eager_inner
    for gm in graphs:
        assert host_nodes(gm) == []


def test_attention_kv_reach_the_projections_through_graph_edges(compiled_eager_inner):
    _, _, graphs, _ = compiled_eager_inner
    for gm in graphs:
        attn = sdpa_nodes(gm)
        assert len(attn) == 6
        for i, node in enumerate(attn):
            q, k, v = node.args[:3]
            assert reaches(k, is_proj("k_proj")), f"graph attention {i}: K is cut off from k_proj"
            assert reaches(v, is_proj("v_proj")), f"graph attention {i}: V is cut off from v_proj"


def test_structural_check_fails_without_the_rewrite():
    """The structural assertion above can fail: on the graph Dynamo captured, K does not reach k_proj."""
    torch._dynamo.reset()
    recorder = Recorder()
    with kvpass.tracing.tracing_context(), torch.no_grad():
        torch.compile(reference_model(seed=3), backend=recorder)(tokens(4, 3))
    (gm,) = recorder.graphs
    assert host_nodes(gm)
    assert not all(reaches(n.args[1], is_proj("k_proj")) for n in sdpa_nodes(gm))


def test_report_lists_every_round_trip_with_pattern_and_source_line(compiled_eager_inner):
    _, _, _, reports = compiled_eager_inner
    prefill = reports[0]
    assert not prefill.skips
    assert prefill.counts["buffer_history"] == 12  # K and V of six layers (the read-only layer has no write)
    assert prefill.counts["host_padding"] == 2 and prefill.counts["pad_slice"] == 2
    for m in prefill.matches:
        assert m.source.startswith("examples/shared_kv_model.py:"), m
    sources = " ".join(m.source for m in prefill.matches)
    assert "k_hist = torch.from_numpy(self.k_buf[:, : self.pos]).to(k.device)" in sources
    assert "np.pad(k.detach().cpu().numpy(), pad)" in sources
    assert "in read:" in sources  # the owner-read-only follower
    text = prefill.format()
    assert "buffer_history" in text and "shared_kv_model.py" in text


def test_report_of_a_functional_model_is_empty():
    torch._dynamo.reset()
    reports = []
    with torch.no_grad():
        compiled = kvpass.compile(reference_model(functional=True, seed=4),
                                  backend=kvpass.backend(inner="eager", on_report=reports.append))
        compiled(tokens(5, 4))
        compiled(tokens(1, 5))
    assert reports and all(not r.matches and not r.skips for r in reports)


@pytest.mark.slow
def test_torch_compile_backend_kvpass_matches_eager():
    """The entry-point form with Inductor, prefill + 16 decode steps: exact, and one decode graph (naming the
    backend loaded kvpass.registered_backend before the trace, which made positions symbolic)."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    prompt, decode = tokens(8, 6), tokens(STEPS, 7)[0]
    got = run(torch.compile(reference_model(seed=12), backend="kvpass"), prompt, decode)
    want = run(reference_model(seed=12), prompt, decode)
    assert_matches_eager(got, want)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2
    assert sum(torch._dynamo.utils.counters["graph_break"].values()) == 0


@pytest.mark.slow
def test_kvpass_compile_inductor_matches_eager():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    prompt, decode = tokens(8, 8), tokens(STEPS, 9)[0]
    got = run(kvpass.compile(reference_model(seed=13)), prompt, decode)
    want = run(reference_model(seed=13), prompt, decode)
    assert_matches_eager(got, want)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2


def test_tolist_round_trip_warns_once_with_source_line():
    import kvpass.dynamo_backend as db

    def f(x, w):
        k = x @ w
        back = torch.tensor(k.tolist())  # the float .tolist() round trip
        return back * 2

    torch._dynamo.reset()
    db._warned.clear()
    compiled = torch.compile(f, backend=kvpass.backend(inner="eager"))
    g = torch.Generator().manual_seed(3)
    with pytest.warns(kvpass.KVPassWarning, match=r"test_backend.py:\d+ in f: back = torch.tensor\(k.tolist\(\)\)"
                      r".*k.detach\(\).clone\(\)"):
        y = compiled(torch.randn(2, 3, generator=g), torch.randn(3, 2, generator=g))
    with warnings.catch_warnings():
        warnings.simplefilter("error", kvpass.KVPassWarning)  # once per line: the recompiles stay quiet
        for _ in range(2):
            x, w = torch.randn(2, 3, generator=g), torch.randn(3, 2, generator=g)
            torch.testing.assert_close(compiled(x, w), f(x, w))
    assert y.shape == (2, 2)


def test_inductor_pass_uuid_is_stable_and_tracks_pattern_sources(tmp_path, monkeypatch):
    from kvpass.inductor_pass import KVPassInductorPass

    a, b = KVPassInductorPass(), KVPassInductorPass()
    assert a.uuid() == b.uuid() and len(a.uuid()) == 64
    assert KVPassInductorPass(patterns=["host_hop"]).uuid() != a.uuid()
    # a pattern whose source file changes gets a new key
    src = tmp_path / "my_pattern.py"
    src.write_text("class P:\n    name = 'mine'\n    def apply(self, gm, report):\n        return 0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    mod = importlib.import_module("my_pattern")
    p = KVPassInductorPass(patterns=[mod.P()])
    before = p.uuid()
    src.write_text(src.read_text() + "# changed\n")
    assert p.uuid() != before


def test_second_identical_compile_hits_the_fx_graph_cache():
    def f(x):
        return torch.from_numpy(x.detach().cpu().numpy()).to(x.device).sin() * 2

    x = torch.randn(8, generator=torch.Generator().manual_seed(4))
    for attempt in range(2):
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        with torch._inductor.config.patch(fx_graph_cache=True, fx_graph_remote_cache=False):
            torch.testing.assert_close(torch.compile(f, backend=kvpass.backend())(x), f(x))
        c = torch._dynamo.utils.counters["inductor"]
        assert c["fxgraph_cache_bypass"] == 0
    assert c["fxgraph_cache_hit"] == 1
