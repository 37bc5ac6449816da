"""kvpass.export(..., cache="outputs"): one functional program for prefill and decode that other runtimes take
as it is (issue 15, "deployable export").

The program is ``(input_ids, position, cache) -> (logits, new_position, new_cache)``. Every chained run here
starts from an empty cache (zeros, position 0), prefills a fresh random prompt and decodes at least 6 steps,
carrying the state *only* through the program's own outputs, and compares each step with the eager reference
model (the oracle). ONNX Runtime runs on every CI run (the ``test`` extra installs it); ExecuTorch and IREE run
where their packages are importable (see README "Deploy").
"""

from __future__ import annotations

import io
import operator

import numpy as np
import pytest
import torch
from torch.export import Dim
from torch.export.graph_signature import InputKind, OutputKind

import kvpass
from kvpass.deploy import mutating_nodes, sym_minmax_nodes
from kvpass.examples.shared_kv_model import SharedKVConfig, reference_model
from kvpass.faithful_export import ExportCaptureError, ExportInputError

pytestmark = [
    pytest.mark.filterwarnings("ignore:While compiling, we found certain side effects:UserWarning"),
    pytest.mark.filterwarnings("ignore:No complete tensor found in the group:UserWarning"),
    pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated:FutureWarning"),
    pytest.mark.filterwarnings("error::kvpass.KVPassWarning"),
]

CONFIG = SharedKVConfig()  # followers: padded, shared, read-only; sandwich norms
TOL = 1e-5
CACHE_KEYS = [f"caches.{i}.{kv}_buf" for i in range(3) for kv in ("k", "v")]  # the three owners' buffers
DECODE_STEPS = 6


def _ids(gen, n):
    return torch.randint(0, CONFIG.vocab_size, (1, n), generator=gen)


def export_deployable(model, prompt_len=8):
    """The call a user makes: one program for every step length 1..max_len."""
    ids = _ids(torch.Generator().manual_seed(150), prompt_len)
    model.reset()
    return kvpass.export(model, (ids,), cache="outputs", positions="pos",
                         dynamic_shapes={"input_ids": {1: Dim("T", min=1, max=CONFIG.max_len - 1)}})


@pytest.fixture(scope="module")
def deploy():
    model = reference_model(CONFIG, seed=151)
    return model, export_deployable(model)


def empty_cache(ep):
    """Zeros shaped like the program's cache inputs: an empty cache (what a runtime user allocates)."""
    (args, _) = ep.example_inputs  # (input_ids, position, cache)
    return {k: torch.zeros_like(v) for k, v in args[2].items()}


def chained_steps(gen, steps=DECODE_STEPS, prompt_len=None):
    """Fresh random prompt, then decode tokens: alternately the eager argmax and a fresh random token."""
    prompt = _ids(gen, prompt_len or int(torch.randint(3, 10, (), generator=gen)))
    return prompt, [_ids(gen, 1) for _ in range(steps)]


def run_chain(step, model, prompt, tokens, position, cache, to_torch=lambda x: x):
    """Run ``step(ids, position, cache) -> (logits, position, cache)`` from the given state over the prompt and
    ``tokens`` next to the eager model (from an empty cache); per-step max abs errors and the last state."""
    model.reset()
    errors = []
    with torch.no_grad():
        for t, ids in enumerate([prompt] + tokens):
            want = model(ids)
            logits, position, cache = step(ids, position, cache)
            logits = to_torch(logits)
            assert want.abs().max() > 0.5  # real logits, not zeros
            errors.append((logits - want).abs().max().item())
    return errors, position, cache


# --------------------------------------------------------------------------------------------------------
# The program
# --------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_program_contract_functional_named_one_position(deploy):
    model, ep = deploy
    users = [s.arg.name for s in ep.graph_signature.input_specs if s.kind == InputKind.USER_INPUT]
    assert users == ["input_ids", "position"] + ["cache_" + k.replace(".", "_") for k in CACHE_KEYS]
    (args, kwargs) = ep.example_inputs
    assert kwargs == {} and list(args[2]) == CACHE_KEYS  # attribute paths of the model, not Dynamo's sources
    assert args[1].dtype == torch.int64 and args[1].shape == (1,)
    outs = ep.graph_signature.output_specs
    assert [s.kind for s in outs] == [OutputKind.USER_OUTPUT] * (2 + len(CACHE_KEYS))  # no mutation outputs
    assert mutating_nodes(ep.graph_module) == [] and sym_minmax_nodes(ep.graph_module) == []
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert not any("scaled_dot_product" in t or t.endswith("_.default") for t in targets), targets
    assert kvpass.check(ep) == []
    assert ep.state_dict.keys() == dict(model.named_parameters()).keys()  # no hidden cache state


@pytest.mark.slow
def test_chained_prefill_and_decode_in_one_program_match_eager(deploy):
    model, ep = deploy
    run = ep.module()
    gen = torch.Generator().manual_seed(152)
    for _ in range(2):  # two fresh sequences through the same program
        prompt, tokens = chained_steps(gen)
        cache = empty_cache(ep)
        errors, position, cache = run_chain(run, model, prompt, tokens, torch.zeros(1, dtype=torch.int64), cache)
        assert max(errors) < TOL, errors
        assert position.tolist() == [prompt.shape[1] + len(tokens)]
        for i in range(3):  # the program's state is the eager host buffers
            for kv in ("k", "v"):
                torch.testing.assert_close(cache[f"caches.{i}.{kv}_buf"],
                                           torch.from_numpy(getattr(model.caches[i], f"{kv}_buf")),
                                           rtol=TOL, atol=TOL)


@pytest.mark.slow
def test_chunked_prefill_then_decode(deploy):
    model, ep = deploy
    run = ep.module()
    gen = torch.Generator().manual_seed(153)
    chunks = [_ids(gen, 5), _ids(gen, 1), _ids(gen, 3), _ids(gen, 1)]
    model.reset()
    cache, position = empty_cache(ep), torch.tensor([0])
    with torch.no_grad():
        for ids in chunks:
            logits, position, cache = run(ids, position, cache)
            torch.testing.assert_close(logits, model(ids), rtol=TOL, atol=TOL)
    assert int(position) == 10


@pytest.mark.slow
def test_out_of_range_position_fails_with_a_message_naming_position(deploy):
    _, ep = deploy
    run = ep.module()
    cache = empty_cache(ep)
    ids = _ids(torch.Generator().manual_seed(154), 4)
    with pytest.raises(RuntimeError, match=r"kvpass: position out of range: the step requires "
                                           r"(input_ids\.shape\[1\] \+ position|position \+ input_ids\.shape\[1\]) <= 64"):
        run(ids, torch.tensor([CONFIG.max_len - 2]), cache)
    with pytest.raises(RuntimeError, match=r"kvpass: position out of range: the step requires position >= 0"):
        run(ids, torch.tensor([-1]), cache)
    run(ids, torch.tensor([CONFIG.max_len - 4]), cache)  # the last step that fits


@pytest.mark.slow
def test_positions_found_by_default_and_unequal_positions_refused():
    """Without positions=, the int attributes the step reads and advances are the positions; one tensor carries
    them, so they must be equal when exporting."""
    tiny = reference_model(SharedKVConfig(num_layers=2, kv_shared_layers=0), seed=155)
    gen = torch.Generator().manual_seed(155)
    tiny.reset()
    ep = kvpass.export(tiny, (_ids(gen, 3),), cache="outputs")  # positions: caches[0].pos, caches[1].pos
    run = ep.module()
    cache, position = empty_cache(ep), torch.tensor([0])
    assert list(cache) == [f"caches.{i}.{kv}_buf" for i in range(2) for kv in ("k", "v")]
    tiny.reset()
    with torch.no_grad():
        for n in (3, 3):  # the program was exported for 3 tokens: a static length
            ids = _ids(gen, n)
            logits, position, cache = run(ids, position, cache)
            torch.testing.assert_close(logits, tiny(ids), rtol=TOL, atol=TOL)
    assert position.tolist() == [6]
    tiny.reset()
    tiny.caches[1].pos = 2
    with pytest.raises(ExportInputError, match=r"positions differ \(caches.0.pos=0, caches.1.pos=2\)"):
        kvpass.export(tiny, (_ids(gen, 3),), cache="outputs")


@pytest.mark.slow
def test_position_shape_scalar():
    """``position_shape=()``: the program takes and returns a 0-dim position (the issue's ``[]``), chained from an
    empty cache like the ``[1]`` program (which ``ep.module()`` refuses a 0-dim position: torch's input check
    raises IndexError)."""
    tiny = reference_model(SharedKVConfig(num_layers=2, kv_shared_layers=0), seed=156)
    gen = torch.Generator().manual_seed(156)
    tiny.reset()
    ep = kvpass.export(tiny, (_ids(gen, 3),), cache="outputs", position_shape=(),
                       dynamic_shapes={"input_ids": {1: Dim("T", min=1, max=tiny.config.max_len - 1)}})
    assert ep.example_inputs[0][1].shape == ()
    run = ep.module()
    cache, position = empty_cache(ep), torch.tensor(0)
    tiny.reset()
    with torch.no_grad():
        for n in (5, 1, 1):
            ids = _ids(gen, n)
            logits, position, cache = run(ids, position, cache)
            torch.testing.assert_close(logits, tiny(ids), rtol=TOL, atol=TOL)
    assert position.shape == () and position.item() == 7


def test_position_shape_other_than_1_or_scalar_is_refused():
    model = reference_model(SharedKVConfig(num_layers=2, kv_shared_layers=0), seed=156)
    for shape, cache in (((2,), "outputs"), ((1, 1), "outputs"), ((), "buffers")):
        with pytest.raises(ExportInputError, match=r"position_shape=.*expected \(1,\) or \(\) with cache='outputs'"):
            kvpass.export(model, (_ids(torch.Generator().manual_seed(0), 3),), cache=cache, position_shape=shape)


# --------------------------------------------------------------------------------------------------------
# The substitutions DeployInterpreter makes while export traces (fast: no Dynamo)
# --------------------------------------------------------------------------------------------------------


def _graph(fn, *example):
    from torch.fx.experimental.proxy_tensor import make_fx

    return make_fx(fn)(*example)


def test_slice_scatter_and_copy_substitutions_keep_values(rng):
    from torch.fx.experimental.proxy_tensor import make_fx

    from kvpass.deploy import DeployInterpreter

    aten = torch.ops.aten

    def step(buf, k, start: int):
        window = aten.slice.Tensor(buf, 1, start, start + k.shape[1])
        return aten.slice_scatter.default(buf, aten.copy.default(window, k), 1, start, start + k.shape[1])

    buf, k = torch.randn(2, 16, 4, generator=rng), torch.randn(2, 3, 4, generator=rng).transpose(0, 1)
    k = k.transpose(0, 1)  # a non-contiguous source, like a transposed projection
    for start in (0, 5, 13):  # at the start, inside, flush with the end
        gm = make_fx(lambda b, x: step(b, x, start))(buf, k)
        want = gm(buf, k)
        got = DeployInterpreter(gm).run(buf, k)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        assert not torch.equal(got, buf)  # the window was written


def test_iota_becomes_arange_with_the_same_integers():
    """kvpass's by-position read emits ``prims.iota`` (Inductor's post-grad graph takes no ``arange``); runtimes
    have no ``iota``, so the deploy trace gives the same integers through ``arange``."""
    from kvpass.deploy import DeployInterpreter

    prims = torch.ops.prims
    graph = torch.fx.Graph()
    n = graph.placeholder("n")
    graph.output(graph.call_function(prims.iota.default, (n,), dict(start=3, step=2, dtype=torch.int64,
                                                                    device=torch.device("cpu"), requires_grad=False)))
    gm = torch.fx.GraphModule({}, graph)
    for length in (1, 7):
        want = prims.iota(length, start=3, step=2, dtype=torch.int64, device="cpu", requires_grad=False)
        got = torch.fx.experimental.proxy_tensor.make_fx(lambda m: DeployInterpreter(gm).run(m.shape[0]))(
            torch.empty(length))
        assert prims.iota.default not in {node.target for node in got.graph.nodes}
        torch.testing.assert_close(got(torch.empty(length)), want, rtol=0, atol=0)


def test_scalar_ops_on_a_symbolic_position_take_the_tensor_overload(rng):
    """``sub.Scalar(t, pos)`` with a symbolic ``pos`` (torch.onnx cannot convert it) becomes ``sub.Tensor`` with
    a 0-dim int64 operand: the same values and dtype, for int and float tensors."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from kvpass.deploy import DeployInterpreter

    aten = torch.ops.aten
    graph = torch.fx.Graph()
    t, p = graph.placeholder("t"), graph.placeholder("p")
    graph.output((graph.call_function(aten.sub.Scalar, (t, p)), graph.call_function(aten.ge.Scalar, (t, p))))
    gm = torch.fx.GraphModule({}, graph)
    for x in (torch.arange(10), torch.randn(10, generator=rng)):
        traced = make_fx(lambda x, s: DeployInterpreter(gm).run(x, s.shape[0]), tracing_mode="symbolic")(
            x, torch.empty(4))
        overloads = {n.target for n in traced.graph.nodes if n.op == "call_function"}
        assert aten.sub.Scalar not in overloads and aten.ge.Scalar not in overloads, overloads
        for pos in (0, 3, 7):
            got, want = traced(x, torch.empty(pos)), (aten.sub.Scalar(x, pos), aten.ge.Scalar(x, pos))
            for g, w in zip(got, want):
                assert g.dtype == w.dtype
                torch.testing.assert_close(g, w, rtol=0, atol=0)


def _position_step_graph(n=16, t=3):
    """The cache step of an eliminated host round trip on a position read out of a tensor (like kvpass.export's
    program): ``new = slice_scatter(buf, k, 1, p, p + t)`` and the history ``cat([buf[:, 0:p], k], 1)``."""
    aten = torch.ops.aten
    graph = torch.fx.Graph()
    buf, k, position = graph.placeholder("buf"), graph.placeholder("k"), graph.placeholder("position")
    p = graph.call_function(aten._local_scalar_dense.default, (position,))
    graph.call_function(aten.sym_constrain_range.default, (p,), {"min": 0, "max": n - t})  # the program's asserts
    end = graph.call_function(operator.add, (p, t))
    new = graph.call_function(aten.slice_scatter.default, (buf, k, 1, p, end))
    hist = graph.call_function(aten.cat.default, ([graph.call_function(aten.slice.Tensor, (buf, 1, 0, p)), k], 1))
    graph.output((new, hist))
    return torch.fx.GraphModule({}, graph)


def _position_long_tensors(gm):
    """Nodes of ``gm`` with a tensor dim that may be 0 (a size ``p`` or ``n - p - t``): ExecuTorch gives such a
    tensor the contiguous stride ``Max(1, p)``, which ``exir.tensor.dim_order_from_stride`` cannot order."""
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    return [n for n in gm.graph.nodes if isinstance(n.meta.get("val"), torch.Tensor) and
            not all(statically_known_true(s >= 1) for s in n.meta["val"].shape)]


def test_position_window_write_and_history_read_trace_without_position_long_tensors(rng):
    """``slice_scatter`` by ``where``/``index_select`` and ``cat([buf[:, :p], k])`` as a prefix of the written
    buffer: bit-identical values for every position (0: an empty cache; n - t: the window flush with the end), and
    no tensor of the exported step is ``p`` or ``n - p - t`` long (the history read leaves ``buf[:, :p]``, and
    splitting the ``slice_scatter`` into ``cat`` pieces leaves both: ExecuTorch's to_executorch() fails on them)."""
    from kvpass.deploy import DeployInterpreter

    gm = _position_step_graph()

    class Step(torch.nn.Module):
        def __init__(self, interpreter):
            super().__init__()
            self.interpreter = interpreter

        def forward(self, buf, k, position):
            return self.interpreter(gm).run(buf, k, position)

    buf, k = torch.randn(2, 16, 4, generator=rng), torch.randn(2, 3, 4, generator=rng)
    programs = {i: torch.export.export(Step(i), (buf, k, torch.tensor([5]))).run_decompositions()
                for i in (torch.fx.Interpreter, DeployInterpreter)}
    assert len(_position_long_tensors(programs[torch.fx.Interpreter].graph_module)) == 1  # buf[:, :p]
    traced = programs[DeployInterpreter]
    assert _position_long_tensors(traced.graph_module) == []
    targets = {n.target for n in traced.graph.nodes}
    assert torch.ops.aten.slice_scatter.default not in targets and torch.ops.aten.cat.default not in targets
    for pos in (0, 1, 5, 13):
        want = gm(buf, k, torch.tensor([pos]))
        got = traced.module()(buf, k, torch.tensor([pos]))
        assert want[1].shape == (2, pos + 3, 4)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_substitutions_apply_only_where_their_side_conditions_hold(rng):
    from kvpass.deploy import DeployInterpreter, _slice_scatter_by_select

    aten = torch.ops.aten
    buf = torch.randn(2, 16, 4, generator=rng)
    src = torch.randn(2, 3, 4, generator=rng)
    assert _slice_scatter_by_select(buf, src, 1, 5, 8) is not None
    assert _slice_scatter_by_select(buf, src, 1, 14, 17) is None  # end past the buffer: the stock op clamps
    assert _slice_scatter_by_select(buf, src[:, :2], 1, 5, 8) is None  # the source does not fill the window
    assert _slice_scatter_by_select(buf, src, 1, 5, 11, 2) is None  # a step
    # copy with broadcast or a cast is left to the stock op (and gives the stock value)
    gm = _graph(lambda a, b: aten.copy.default(a, b), buf, torch.randn(1, 16, 4, generator=rng))
    b = torch.randn(1, 16, 4, generator=rng)
    torch.testing.assert_close(DeployInterpreter(gm).run(buf, b), b.expand(2, 16, 4), rtol=0, atol=0)


def test_one_position_leaves_no_sym_max_and_asserts_name_the_inputs():
    """On a program with a position read out of a tensor: max(p + T, p + T) traces as p + T (no sym_max), and the
    program's asserts say 'position' and 'x.shape[0]' instead of u0 and s27."""
    from kvpass.deploy import explain_asserts

    class Step(torch.nn.Module):
        def forward(self, x, position):
            p = position.reshape(()).item()
            torch._check(p >= 0)
            torch._check(p + x.shape[0] <= 16)
            end = torch.sym_max(p + x.shape[0], p + x.shape[0])
            return torch.zeros(16)[p:end] + x

    ep = torch.export.export(Step(), (torch.randn(3), torch.tensor([2])),
                             dynamic_shapes={"x": {0: Dim("T", min=1, max=15)}, "position": None})
    assert sym_minmax_nodes(ep.graph_module) == []
    explain_asserts(ep)
    messages = [n.args[1] for n in ep.graph.nodes if n.target is torch.ops.aten._assert_scalar.default]
    assert any(m.startswith("kvpass: position out of range: the step requires") and "x.shape[0]" in m
               for m in messages), messages
    run = ep.module()
    torch.testing.assert_close(run(torch.ones(4), torch.tensor([12])), torch.ones(4))
    with pytest.raises(RuntimeError, match=r"kvpass: position out of range: the step requires"):
        run(torch.ones(4), torch.tensor([13]))


def test_a_program_with_sym_max_or_a_mutation_is_refused():
    from kvpass.deploy import finish_deployable

    class Max(torch.nn.Module):
        def forward(self, x, y):
            return torch.zeros(torch.sym_max(x.shape[0], y.shape[0])) + 1

    ep = torch.export.export(Max(), (torch.randn(3), torch.randn(4)),
                             dynamic_shapes={"x": {0: Dim("A", min=1, max=9)}, "y": {0: Dim("B", min=1, max=9)}})
    with pytest.raises(ExportCaptureError, match=r"not functional: .*sym_max.*ExecuTorch and IREE reject"):
        finish_deployable(ep)

    class Writes(torch.nn.Module):
        def forward(self, cache, k):
            cache[:, :2] = k
            return cache.sum()

    ep = torch.export.export(Writes(), (torch.randn(2, 8), torch.randn(2, 2)))
    with pytest.raises(ExportCaptureError, match=r"output \w+ mutates cache"):
        finish_deployable(ep)


# --------------------------------------------------------------------------------------------------------
# ONNX Runtime (the `test` extra installs it: runs on every CI run)
# --------------------------------------------------------------------------------------------------------


def onnx_session(ep, path):
    """``torch.onnx.export`` of the program as it is, loaded in ONNX Runtime (CPU)."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    torch.onnx.export(ep, f=str(path), dynamo=True, verbose=False)
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def ort_step(sess):
    """One call of the session: the program's flat inputs in order, its flat outputs back."""
    names = [i.name for i in sess.get_inputs()]

    def step(ids, position, cache):
        feeds = dict(zip(names, [ids.numpy(), np.asarray(position), *cache]))
        logits, position, *cache = sess.run(None, feeds)
        return logits, position, cache

    return step


@pytest.mark.slow
def test_onnx_runtime_runs_prefill_and_chained_decode(deploy, tmp_path):
    model, ep = deploy
    sess = onnx_session(ep, tmp_path / "decoder.onnx")
    inputs = sess.get_inputs()
    assert [i.name for i in inputs][:2] == ["input_ids", "position"] and len(inputs) == 2 + len(CACHE_KEYS)
    assert len(sess.get_outputs()) == 2 + len(CACHE_KEYS)
    gen = torch.Generator().manual_seed(156)
    for _ in range(2):
        prompt, tokens = chained_steps(gen)
        cache = [np.zeros(i.shape, np.float32) for i in inputs[2:]]  # an empty cache, from the model's metadata
        errors, position, cache = run_chain(ort_step(sess), model, prompt, tokens, np.zeros(1, np.int64), cache,
                                            to_torch=torch.from_numpy)
        assert len(errors) == 1 + DECODE_STEPS and max(errors) < TOL, errors
        assert position.tolist() == [prompt.shape[1] + len(tokens)]
        np.testing.assert_allclose(cache[0], model.caches[0].k_buf, rtol=TOL, atol=TOL)


@pytest.mark.slow
def test_stock_exports_of_the_same_model_give_no_onnx_program(tmp_path):
    """The story of the demo: the stock front ends give no deployable decoder of the same model."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from kvpass.examples.shared_kv_model import READONLY, SHARED

    ids = _ids(torch.Generator().manual_seed(157), 8)
    model = reference_model(CONFIG, seed=151)
    model.reset()
    with pytest.raises(Exception) as info:  # the host round trip: torch.export fails in every strategy
        torch.onnx.export(model, (ids,), f=str(tmp_path / "stock.onnx"), dynamo=True, verbose=False)
    assert type(info.value).__name__ == "TorchExportError", info.value
    # without the padded follower, strict torch.export captures the step with the numpy buffers as mutated
    # constants (kvpass.check's finding); torch.onnx refuses that program
    no_pad = reference_model(SharedKVConfig(follower_caches=[SHARED, READONLY, SHARED]), seed=151)
    no_pad.reset()
    ep = torch.export.export(no_pad, (ids,), strict=True)
    with pytest.raises(Exception, match=r"_captured_\d+ is mutated in the forward method"):
        torch.onnx.export(ep, f=str(tmp_path / "stock_strict.onnx"), dynamo=True, verbose=False)


# --------------------------------------------------------------------------------------------------------
# ExecuTorch and IREE: run where the packages are importable (README "Deploy" gives the install command)
# --------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_executorch_pte_with_prefill_and_decode_methods(deploy):
    """One ``.pte`` (portable kernels) whose ``prefill`` and ``decode`` methods are the same program, run from an
    empty cache over a prefill and 6 chained decode steps."""
    pytest.importorskip("executorch.exir")
    runtime = pytest.importorskip("executorch.runtime")
    from executorch.exir import to_edge

    model, ep = deploy
    # each method from its own copy of the program: to_edge's passes on the first method leave unbound unbacked
    # symbols in the program's ShapeEnv, and decomposing the same program again in it raises
    # PendingUnbackedSymbolNotFound (ExecuTorch 1.5.1, torch 2.13); torch.export.load gives a fresh ShapeEnv
    saved = io.BytesIO()
    torch.export.save(ep, saved)
    methods = {name: torch.export.load(io.BytesIO(saved.getvalue())) for name in ("prefill", "decode")}
    program = runtime.Runtime.get().load_program(to_edge(methods).to_executorch().buffer)
    prefill, decode = program.load_method("prefill"), program.load_method("decode")

    def step(ids, position, cache):
        method = prefill if ids.shape[1] > 1 else decode
        logits, position, *cache = method.execute([ids, position, *cache])
        return logits, position, cache

    gen = torch.Generator().manual_seed(158)
    for _ in range(2):  # two fresh sequences through the same methods
        prompt, tokens = chained_steps(gen)
        cache = [torch.zeros_like(t) for t in empty_cache(ep).values()]
        errors, position, _ = run_chain(step, model, prompt, tokens, torch.zeros(1, dtype=torch.int64), cache)
        print(f"ExecuTorch portable max |executorch - eager| per step = [{', '.join(f'{e:.1e}' for e in errors)}]")
        assert max(errors) < TOL, errors
        assert position.tolist() == [prompt.shape[1] + len(tokens)]


@pytest.mark.slow
def test_iree_llvm_cpu_runs_prefill_and_chained_decode(deploy):
    """IREE (llvm-cpu): the program imported as it is; its own floor is looser than fp32 rounding (fast math)."""
    ireec = pytest.importorskip("iree.compiler")
    ireert = pytest.importorskip("iree.runtime")
    from iree.compiler.extras.fx_importer import FxImporter

    model, ep = deploy
    importer = FxImporter()
    importer.import_frozen_program(ep, func_name="main")
    vmfb = ireec.compile_str(str(importer.module), target_backends=["llvm-cpu"], input_type="torch")
    config = ireert.Config("local-task")
    ctx = ireert.SystemContext(config=config)
    ctx.add_vm_module(ireert.VmModule.copy_buffer(ctx.instance, vmfb))
    main = ctx.modules.module["main"]

    def step(ids, position, cache):
        logits, position, *cache = main(ids.numpy(), np.asarray(position), *cache)
        return logits.to_host(), position.to_host(), [c.to_host() for c in cache]

    prompt, tokens = chained_steps(torch.Generator().manual_seed(159))
    cache = [np.zeros(t.shape, np.float32) for t in empty_cache(ep).values()]
    errors, _, _ = run_chain(step, model, prompt, tokens, np.zeros(1, np.int64), cache, to_torch=torch.from_numpy)
    print(f"IREE llvm-cpu max |iree - eager| per step = [{', '.join(f'{e:.1e}' for e in errors)}]")
    assert max(errors) < 1e-3, errors
