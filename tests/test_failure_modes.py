"""Stock PyTorch on the reference model: the baseline kvpass improves on (DESIGN section 1).

These pin what torch 2.13 actually does with host round trips of K/V. If a PyTorch upgrade changes one of them,
the failing test says which front end changed its behaviour, so the kvpass pass or check built on it is revisited.
"""

import pytest
import torch
import torch._dynamo.utils
from torch.export.graph_signature import InputKind
from torch.fx.experimental.proxy_tensor import make_fx

from kvpass.compat import MAKE_FX_DETACH
from kvpass.examples.shared_kv_model import READONLY, SHARED, SharedKVConfig, reference_model

NO_PAD = SharedKVConfig(follower_caches=[SHARED, SHARED, READONLY])

# Stock behaviour: Dynamo's own np.pad, whatever an earlier backend="kvpass" in this process installed.
pytestmark = pytest.mark.usefixtures("stock_numpy_tracing")


class Step(torch.nn.Module):
    """One model step as a module (what a user hands to torch.export)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids):
        return self.model(ids)


def _prefill_fn(model):
    def prefill(ids):
        model.reset()
        return model(ids)

    return prefill


def test_make_fx_real_bakes_kv_as_constant_and_goes_stale(rng):
    model = reference_model(seed=4)
    ids, ids2 = (torch.randint(0, 64, (1, 8), generator=rng) for _ in range(2))
    with torch.no_grad():
        gm = make_fx(_prefill_fn(model), tracing_mode="real")(ids)
    # K/V come back as tensor constants (the trace-time buffer contents) ...
    constants = [n for n in gm.graph.nodes if n.op == "get_attr" and "_tensor_constant" in str(n.target)]
    kv_shapes = {(2, 8, 8), (2, 8, 16)}
    assert any(tuple(getattr(gm, n.target).shape) in kv_shapes for n in constants)
    # ... and the real K/V computation is cut off: its detach (an alias from torch 2.14 on) has no users.
    dangling = [n for n in gm.graph.nodes if n.target is MAKE_FX_DETACH and not n.users]
    assert len(dangling) >= 2
    # On a second, fresh random input the traced graph answers with the first input's K/V.
    with torch.no_grad():
        eager = _prefill_fn(reference_model(seed=4))(ids2)
        traced = gm(ids2)
    assert eager.abs().max() > 0.1
    assert (eager - traced).abs().max() > 1e-2


def test_strict_export_lifts_host_buffer_as_mutated_constant(rng):
    model = reference_model(NO_PAD, seed=5)
    ids = torch.randint(0, 64, (1, 8), generator=rng)
    with torch.no_grad():
        ep = torch.export.export(Step(model), (ids,), strict=True)
    consts = [s for s in ep.graph_signature.input_specs if s.kind == InputKind.CONSTANT_TENSOR]
    # one K and one V host buffer for each of the three layers that own a cache buffer (layers 0, 1, 2)
    assert len(consts) == 6
    const_inputs = {s.arg.name for s in consts}
    # the graph writes the new K/V into the constant with copy_ (a mutation of a "constant")
    mutated = set()
    for n in ep.graph.nodes:
        if n.target is torch.ops.aten.copy_.default:
            base = n.args[0]
            while base.op == "call_function" and base.target in (torch.ops.aten.slice.Tensor, torch.ops.aten.select.int):
                base = base.args[0]
            mutated.add(base.name)
    assert const_inputs & mutated
    # none of this is a buffer the program declares it mutates
    assert not ep.graph_signature.buffers_to_mutate


def test_strict_export_fails_on_np_pad(rng):
    model = reference_model(seed=5)  # default config has a padded follower
    ids = torch.randint(0, 64, (1, 8), generator=rng)
    with torch.no_grad(), pytest.raises(Exception, match="unbacked|[Dd]ata.dependent"):
        torch.export.export(Step(model), (ids,), strict=True)


def test_non_strict_export_cannot_call_numpy(rng):
    model = reference_model(NO_PAD, seed=5)
    ids = torch.randint(0, 64, (1, 8), generator=rng)
    with torch.no_grad(), pytest.raises(Exception, match="numpy|[Dd]ata.dependent|FakeTensor|Cannot"):
        torch.export.export(Step(model), (ids,), strict=False)


def _counting_compile(model):
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    return torch.compile(model, backend=counting_backend), graphs


@pytest.mark.slow
def test_compile_recompiles_every_decode_step(rng):
    model = reference_model(NO_PAD, seed=6)
    compiled, graphs = _counting_compile(model)
    with torch.no_grad():
        compiled(torch.randint(0, 64, (1, 8), generator=rng))
        assert len(graphs) == 1
        for step in range(1, 5):
            out = compiled(torch.randint(0, 64, (1, 1), generator=rng))
            assert len(graphs) == 1 + step  # the Python `pos` is specialized: a new graph per position
    # each graph reads the host buffer through Dynamo's numpy wrappers
    names = {getattr(n.target, "__name__", "") for n in graphs[-1].graph.nodes}
    assert {"wrapped___setitem__", "wrapped_getitem"} <= names
    assert out.abs().max() > 0.1


def test_compile_graph_breaks_on_np_pad(rng):
    model = reference_model(seed=6)
    compiled, graphs = _counting_compile(model)
    torch._dynamo.utils.counters.clear()
    with torch.no_grad():
        compiled(torch.randint(0, 64, (1, 8), generator=rng))
    breaks = torch._dynamo.utils.counters["graph_break"]
    assert sum(breaks.values()) >= 1
    assert len(graphs) > 1
