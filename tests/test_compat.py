"""kvpass.compat: each fact it states about the installed torch line, checked on that torch."""

import torch
import torch.nn.functional as F
from torch.fx.experimental.proxy_tensor import make_fx

from kvpass import compat


def _ops(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def test_torch_line_is_the_installed_release():
    assert str(torch.__version__).startswith("%d.%d." % compat.TORCH_LINE)
    assert compat.TORCH_LINE >= (2, 13)


def test_make_fx_records_detach_as_stated():
    def fn(x):
        y = x * 2
        y.detach()  # unused: what make_fx records for it dangles
        return y + 1

    with torch.no_grad():
        ops = _ops(make_fx(fn, tracing_mode="real")(torch.randn(3)))
    assert compat.MAKE_FX_DETACH in ops
    assert {torch.ops.aten.detach.default, torch.ops.aten.alias.default} & set(ops) == {compat.MAKE_FX_DETACH}


def test_unbatched_sdpa_is_decomposed_as_stated():
    q = torch.randn(2, 4, 8, generator=torch.Generator().manual_seed(0))
    mask = torch.ones(4, 4, dtype=torch.bool).tril()
    with torch.no_grad():
        ops = _ops(make_fx(lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m))(q, q, q, mask))
    decomposed = torch.ops.aten.bmm.default in ops
    fused = any("scaled_dot_product" in str(op) for op in ops)
    assert (decomposed, fused) == (compat.SDPA_UNBATCHED_DECOMPOSED, not compat.SDPA_UNBATCHED_DECOMPOSED)


def test_attribute_writes_leave_out_the_cells_a_step_creates():
    """A generator expression's closure cell is a local of the step (Dynamo 2.14+ records its write); the
    model's own attribute write is reported."""

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.hist = torch.zeros(1, 4)

        def forward(self, x):
            s = x * 2
            self.hist = torch.cat([self.hist, s])
            return sum(s + i for i in range(3))

    seen = []

    def backend(gm, example_inputs):
        seen.extend((name, type(value).__name__) for _, name, value in compat.dynamo_attribute_writes())
        return gm

    torch._dynamo.reset()
    torch.compile(M(), backend=backend, fullgraph=True)(torch.randn(1, 4))
    torch._dynamo.reset()
    assert seen == [("hist", "TensorVariable")]


def test_ndarray_getattr_is_the_method_dynamo_calls_for_an_array_attribute():
    """kvpass.tracing answers ``array.dtype`` by replacing this method: Dynamo must call it for ``array.shape``."""
    from unittest import mock

    from torch._dynamo.variables.tensor import NumpyNdarrayVariable

    original = NumpyNdarrayVariable.__dict__[compat.NDARRAY_GETATTR]
    seen = []

    def spy(self, tx, name):
        seen.append(name)
        return original(self, tx, name)

    def fn(x):
        return x + x.numpy().shape[0]

    x = torch.randn(3, generator=torch.Generator().manual_seed(2))
    torch._dynamo.reset()
    with mock.patch.object(NumpyNdarrayVariable, compat.NDARRAY_GETATTR, spy):
        y = torch.compile(fn, backend="eager", fullgraph=True)(x)
    torch._dynamo.reset()
    torch.testing.assert_close(y, fn(x))
    assert "shape" in seen


def test_set_tensor_method_changes_what_dynamo_runs_for_item():
    """kvpass.tracing keeps float ``.item()`` a graph break by replacing the ``item`` handler this way."""
    from torch._dynamo.utils import counters

    calls = []

    def spy(self, tx, *args, **kwargs):
        calls.append(self)
        return previous(self, tx, *args, **kwargs)

    previous = compat.set_tensor_method("item", spy)
    try:
        torch._dynamo.reset()
        counters.clear()
        s = torch.tensor(0.5)
        assert torch.compile(lambda s: s * 2 + s.item(), backend="eager")(s).item() == 1.5
    finally:
        assert compat.set_tensor_method("item", previous) is spy
        torch._dynamo.reset()
    assert calls


def test_refreshed_variable_builder_dispatch_calls_a_replaced_wrap_method():
    """kvpass.tracing replaces ``VariableBuilder.wrap_numpy_ndarray``; Dynamo must call the replacement."""
    import numpy as np
    from unittest import mock

    from torch._dynamo.variables.builder import VariableBuilder

    original, seen = VariableBuilder.__dict__["wrap_numpy_ndarray"], []

    def spy(self, value):
        seen.append(value.shape)
        return original(self, value)

    a = np.arange(6, dtype=np.float32)
    torch._dynamo.reset()
    with mock.patch.object(VariableBuilder, "wrap_numpy_ndarray", spy):
        compat.refresh_variable_builder_dispatch()
        torch.compile(lambda a: torch.from_numpy(a) * 2, backend="eager")(a)
    compat.refresh_variable_builder_dispatch()
    torch._dynamo.reset()
    assert seen == [(6,)]
