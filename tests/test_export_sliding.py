"""kvpass.export of caches shaped like transformers' sliding-window layer: an int counter that only picks a branch
(the graph never reads it), a mask size written with ``max``, a branch on the token count. Small synthetic models
(fast); transformers' own models are in tests/test_hf_export.py."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from torch.export import Dim

import kvpass
from kvpass.deploy import sym_minmax_nodes
from kvpass.faithful_export import ExportCaptureError

pytestmark = [
    pytest.mark.filterwarnings("ignore:While compiling, we found certain side effects:UserWarning"),
    pytest.mark.filterwarnings("ignore:No complete tensor found in the group:UserWarning"),
]

MAX_LEN, WINDOW, DIM = 24, 12, 8


class WindowedCache(torch.nn.Module):
    """Writes K at a tensor counter (``index_copy_``, as transformers' static layers do), keeps an int ``length``
    read only by the window branch, and masks keys before ``max(pos - WINDOW + 1, 0)`` (a ``sym_max``)."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(DIM, DIM)
        self.keys = torch.zeros(MAX_LEN, DIM)
        self.count = torch.zeros((), dtype=torch.long)
        self.length = 0
        self.pos = 0

    def forward(self, x):  # x: [T, DIM]
        t = x.shape[0]
        k = self.proj(x)
        self.keys.index_copy_(0, torch.arange(t) + self.count, k)
        self.count.add_(t)
        if self.length >= WINDOW:  # the window is full: (not traced by the examples here)
            raise RuntimeError("full")
        if self.length + t > WINDOW:  # becoming full
            raise RuntimeError("becoming full")
        self.length += t
        offset = max(self.pos - WINDOW + 1, 0)
        visible = (torch.arange(MAX_LEN) >= offset) & (torch.arange(MAX_LEN) < self.pos + t)
        scores = (k @ self.keys.T).masked_fill(~visible, float("-inf"))
        self.pos += t
        return scores.softmax(-1) @ self.keys


def _fresh(seed=0):
    torch.manual_seed(seed)
    return WindowedCache().eval()


def test_a_counter_read_only_by_a_branch_is_a_position_and_its_guard_an_assert(rng):
    """``length`` is found as a position though no graph input carries it (before: "matches no integer the step
    reads" for a name kvpass itself proposed); the guard on it (``length + T <= WINDOW``) is checked on the one
    position; the ``max`` of the mask offset is proven 0 there and leaves no ``sym_max``; values equal eager."""
    model = _fresh()
    eager = copy.deepcopy(model)
    ep = kvpass.export(model, (torch.randn(3, DIM, generator=rng),), cache="outputs",
                       dynamic_shapes={"x": {0: Dim("T", min=1, max=WINDOW)}})
    assert sym_minmax_nodes(ep.graph_module) == []
    run = ep.module()
    cache = {k: torch.zeros_like(v) for k, v in ep.example_inputs[0][2].items()}
    position = torch.zeros(1, dtype=torch.long)
    with torch.no_grad():
        for t in (3, 1, 1, 4, 1, 2):  # a prefill, then steps up to the window (3 + 1 + 1 + 4 + 1 + 2 = WINDOW)
            x = torch.randn(t, DIM, generator=rng)
            got, position, cache = run(x, position, cache)
            torch.testing.assert_close(got, eager(x), rtol=0, atol=0)
        assert int(position) == WINDOW
        with pytest.raises(RuntimeError, match=r"position out of range"):  # eager takes another branch here
            run(torch.randn(1, DIM, generator=rng), position, cache)


def test_a_guard_on_a_branch_only_counter_is_refused_where_no_input_can_carry_it(rng):
    """With one int input per position (cache='inputs'), ``length`` would have no input and its guard would go
    unchecked: the export is refused, naming the guard and the user's line."""
    with pytest.raises(ExportCaptureError, match=r"length is read only by a branch .*test_export_sliding\.py:\d+ in "
                                                 r"forward: if self\.length"):
        kvpass.export(_fresh(), (torch.randn(3, DIM, generator=rng),), cache="inputs", positions=["pos", "length"],
                      dynamic_shapes={"x": {0: Dim("T", min=2, max=WINDOW)}})


class BranchOnTokens(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.keys = torch.zeros(MAX_LEN, DIM)
        self.pos = 0

    def forward(self, x):
        t = x.shape[0]
        self.keys[self.pos:self.pos + t] = x
        if t > 4:  # the prefill path
            out = x * 2
        else:
            out = x
        self.pos += t
        return out + self.keys[:self.pos].sum(0)


def test_a_dim_range_the_code_branches_on_names_the_line(rng):
    """A dynamic dim whose range covers two branches of the model's code: the error says which guard fails at
    which bound and names the line that branches (before: Dynamo's ConstraintViolationError, no line)."""
    with pytest.raises(ExportCaptureError) as info:
        kvpass.export(BranchOnTokens(), (torch.randn(6, DIM, generator=rng),), cache="outputs",
                      dynamic_shapes={"x": {0: Dim("T", min=1, max=16)}})
    text = str(info.value)
    assert re.search(r"requires x\.shape\[0\] > 4 \(false for x\.shape\[0\] = 1\)", text), text
    assert re.search(r"test_export_sliding\.py:\d+ in forward: if t > 4:", text), text


class PrefillOnly(BranchOnTokens):
    def forward(self, x):
        t = x.shape[0]
        self.keys[self.pos:self.pos + t] = x
        scale = 2.0 if self.pos == 0 else 1.0
        self.pos += t
        return self.keys[:self.pos].sum(0) * scale


def test_a_position_the_code_compares_with_a_constant_names_the_line(rng):
    with pytest.raises(ExportCaptureError, match=r"pos \(kvpass found it as a position .*\) was specialized to 0 "
                                                 r".*test_export_sliding\.py:\d+ in forward: scale = 2\.0 if self\.pos"):
        kvpass.export(PrefillOnly(), (torch.randn(3, DIM, generator=rng),), cache="outputs",
                      dynamic_shapes={"x": {0: Dim("T", min=1, max=16)}})


def test_sym_max_and_sym_min_of_proven_order_become_the_operand(rng):
    """``sym_max(a, b)`` is ``b`` where ``a <= b`` is proven (``sym_min`` is ``a``), the same int; where neither
    order is proven the call stays (and finish_deployable refuses the program)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from kvpass.deploy import DeployInterpreter, _ordered_min_max

    assert _ordered_min_max(torch.sym_max, 3, 5) == 5 and _ordered_min_max(torch.sym_min, 3, 5) == 3
    assert _ordered_min_max(torch.sym_max, 5, 3) == 5 and _ordered_min_max(torch.sym_min, 5, 3) == 3

    def unordered(x, y):  # two free sizes: neither order is proven, the sym_max stays
        out = _ordered_min_max(torch.sym_max, x.shape[0], y.shape[0])
        assert out is None
        return x.new_zeros(torch.sym_max(x.shape[0], y.shape[0]))

    make_fx(unordered, tracing_mode="symbolic")(torch.randn(3), torch.randn(4))

    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    n = graph.call_function(torch.ops.aten.sym_size.int, (x, 0))
    lo = graph.call_function(torch.sym_max, (graph.call_function(lambda a: a - 9, (n,)), 0))
    hi = graph.call_function(torch.sym_min, (n, 0))
    graph.output((graph.call_function(torch.ops.aten.new_zeros.default, (x, [lo])),
                  graph.call_function(torch.ops.aten.new_zeros.default, (x, [hi]))))
    gm = torch.fx.GraphModule({}, graph)

    def run(x):
        torch._check(x.shape[0] <= 9)
        return DeployInterpreter(gm).run(x)

    traced = make_fx(run, tracing_mode="symbolic")(torch.randn(5))
    assert sym_minmax_nodes(traced) == []
    for size in (2, 5, 9):
        a, b = traced(torch.randn(size))
        assert a.shape == (0,) and b.shape == (0,)
