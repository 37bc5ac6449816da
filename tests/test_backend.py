"""The kvpass backend on the reference model: exact against eager, no round trip left on the K/V path, one decode
graph under kvpass.compile, a report with the user's lines, the .tolist() warning, the Inductor pass's cache key."""

import warnings

import pytest
import torch
import torch._dynamo.utils

import kvpass
from kvpass.compat import SDPA_UNBATCHED_DECOMPOSED
from kvpass.examples.shared_kv_model import SharedKVConfig, reference_model
from kvpass.testing import RecordingBackend, buffer_reads, host_round_trip_nodes

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


_MATMULS = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default)


def is_proj(name):
    """The K (or V) projection: ``linear`` on a ``*name*`` weight (Dynamo), or ``mm``/``addmm`` traced from the
    user's ``self.name(...)`` line (functional ATen, where placeholders are ``argN_1``)."""
    def pred(n):
        if n.op != "call_function":
            return False
        if n.target is torch._C._nn.linear:
            return any(name in a.name for a in n.all_input_nodes if a.op == "placeholder")
        return n.target in _MATMULS[:2] and f"self.{name}(" in (n.meta.get("stack_trace") or "")
    return pred


def is_aten_sdpa(n):
    """An ATen attention op that takes ``query, key, value`` first (``aten.scaled_dot_product_attention`` or one
    of its fused kernels, ``_scaled_dot_product_flash_attention_for_cpu`` on CPU)."""
    if n.op != "call_function" or not isinstance(n.target, torch._ops.OpOverload):
        return False
    schema = n.target._schema
    return "scaled_dot_product" in schema.name and [a.name for a in schema.arguments[:3]] == ["query", "key", "value"]


def attention_kv(gm):
    """``(k, v)`` operands of every attention: ``scaled_dot_product_attention`` in a Dynamo graph; in an ATen
    graph, the fused SDPA op's key and value where the capture keeps one (``kvpass.compat.SDPA_UNBATCHED_DECOMPOSED``
    is false), else (SDPA decomposed) the ``bmm`` before each softmax (its second operand is K^T) and after it (V)."""
    sdpa = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch._C._nn.scaled_dot_product_attention]
    if sdpa:
        return [(n.args[1], n.args[2]) for n in sdpa]
    fused = [n for n in gm.graph.nodes if is_aten_sdpa(n)]
    if fused:
        return [(n.args[1], n.args[2]) for n in fused]
    out = []
    for s in gm.graph.nodes:
        if s.op == "call_function" and s.target in (torch.ops.aten._safe_softmax.default, torch.ops.aten._softmax.default):
            before = _first(s, lambda n: n.all_input_nodes)
            after = _first(s, lambda n: list(n.users))
            out.append((before.args[1], after.args[1]))
    return out


def _first(start, step):
    """The nearest bmm from ``start`` walking ``step`` (breadth first)."""
    frontier, seen = list(step(start)), set()
    while frontier:
        n = frontier.pop(0)
        if n in seen:
            continue
        seen.add(n)
        if n.op == "call_function" and n.target is torch.ops.aten.bmm.default:
            return n
        frontier.extend(step(n))
    raise AssertionError(f"no bmm next to {start}")


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
        assert kvpass.ir.is_aten_graph(gm)  # the inner compiler gets the functional ATen graph
        assert host_nodes(gm) == []


def test_attention_kv_reach_the_projections_through_graph_edges(compiled_eager_inner):
    _, _, graphs, _ = compiled_eager_inner
    for gm in graphs:
        attn = attention_kv(gm)
        assert len(attn) == 6
        # the reference model's attention is unbatched (3-D): decomposed on torch 2.13, one fused op from 2.14 on
        assert any(map(is_aten_sdpa, gm.graph.nodes)) is not SDPA_UNBATCHED_DECOMPOSED
        for i, (k, v) in enumerate(attn):
            assert reaches(k, is_proj("k_proj")), f"graph attention {i}: K is cut off from k_proj"
            assert reaches(v, is_proj("v_proj")), f"graph attention {i}: V is cut off from v_proj"


def test_no_graph_reads_a_buffer_it_wrote(compiled_eager_inner):
    """In the prefill and in decode every read of a cache buffer after this step's writes became the values
    written (no ``slice(slice_scatter(...))`` left), nothing skipped: in decode, the reads of followers whose
    position is a separate symbol from their owner's (their order is not known at trace time) are selected by
    position when the graph runs (issue 12)."""
    _, _, graphs, reports = compiled_eager_inner
    prefill, decode = graphs
    assert buffer_reads(prefill) == [] and buffer_reads(decode) == []
    assert not reports[0].skips and not reports[1].skips, reports[1].format()
    assert any("where" in m.detail for m in reports[1].matches)


def test_structural_check_fails_without_the_rewrite():
    """The structural assertion above can fail: on the graph Dynamo captured, K does not reach k_proj."""
    torch._dynamo.reset()
    recorder = Recorder()
    with kvpass.tracing.tracing_context(), torch.no_grad():
        torch.compile(reference_model(seed=3), backend=recorder)(tokens(4, 3))
    (gm,) = recorder.graphs
    assert host_nodes(gm)
    assert not all(reaches(k, is_proj("k_proj")) for k, _ in attention_kv(gm))
    functional = kvpass.functionalize(gm)
    assert buffer_reads(functional)  # ... and the functional graph, before the rules, reads back its writes


def test_report_lists_every_round_trip_with_pattern_and_source_line(compiled_eager_inner):
    _, _, _, reports = compiled_eager_inner
    prefill = reports[0]
    assert not prefill.skips
    assert prefill.counts["scatter_slice"] >= 12  # at least K and V of six layers' reads
    assert prefill.counts["pad_slice"] == 2  # the padded follower's K and V
    for m in prefill.matches:
        assert m.source.startswith("examples/shared_kv_model.py:"), m
    sources = " ".join(m.source for m in prefill.matches)
    assert "self.k_buf[:, self.pos : self.pos + t] = k.detach().cpu().numpy()" in sources  # the owner's write
    assert "np.pad(k.detach().cpu().numpy(), pad)" in sources  # the padded follower's write
    text = prefill.format()
    assert "scatter_slice" in text and "shared_kv_model.py" in text


@pytest.mark.slow
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
    assert KVPassInductorPass(patterns=["pad_slice"]).uuid() != a.uuid()
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


def test_inductor_pass_uuid_covers_every_kvpass_module_the_rules_import(tmp_path, monkeypatch):
    """The key follows imports to a fixed point (function-level ones too), not a hand-kept list: a helper module
    a rule imports (here ``kvpass.errors`` and ``kvpass.compat``, which no list named) is hashed, and a user's
    rule that imports a kvpass module brings it in."""
    from kvpass.inductor_pass import KVPassInductorPass, catalogue_files
    from kvpass.engine import resolve_patterns

    names = {f.replace("\\", "/").rsplit("/", 2)[-2] + "/" + f.rsplit("/", 1)[-1] for f in catalogue_files(resolve_patterns(None))}
    assert {"kvpass/errors.py", "kvpass/compat.py", "kvpass/rules.py", "ops/_store.py",
            "patterns/scatter_slice.py"} <= names
    src = tmp_path / "my_rule.py"
    src.write_text("class P:\n    name = 'mine'\n    def apply(self, gm, report):\n"
                   "        from kvpass import graph_diff\n        return 0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    mod = importlib.import_module("my_rule")
    files = catalogue_files([mod.P()])
    assert str(src) in files and any(f.endswith("graph_diff.py") for f in files)
    assert KVPassInductorPass(patterns=[mod.P()]).uuid() != KVPassInductorPass(patterns=["pad_slice"]).uuid()
