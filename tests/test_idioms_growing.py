"""Growing and evicting host caches created by the model itself (``if self.k is None: self.k = k``), then grown
by each step's tokens (``torch.cat`` / ``np.concatenate`` of the history with the new K/V) and, for a sink +
window cache, trimmed to ``sink + window`` slots once full.

Dynamo traces a value it sees for the first time with static sizes, so such a cache got a graph for its first
decode length and a recompile at the next one; :class:`kvpass.tracing.HostCacheShapes` (entered by
``kvpass.compile``) tells Dynamo the cache's token dims are dynamic before the first decode step is traced.
Per idiom: eager vs ``kvpass.compile`` over a prefill and 7 decode steps of fresh random inputs, through an eager
inner (graph count exact, no host op on an attention's K/V path) and through Inductor (results).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import idioms_buffer as ib
import kvpass

pytestmark = pytest.mark.filterwarnings("ignore:To copy construct from a tensor")

DECODE = 7
SINK, WINDOW = 2, 4


class CreatedCacheModel(nn.Module):
    """``LAYERS`` attention layers, each a submodule holding its own host cache (``None`` until the prefill)."""

    LAYERS = 2

    def __init__(self, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.blocks = nn.ModuleList(self.Block(g) for _ in range(self.LAYERS))

    def forward(self, x):
        for block in self.blocks:
            x = x + block(x)
        return x


class HostTensorBlock(nn.Module):
    """Host tensors ``[heads, T, d]``: ``self.k = k.cpu().contiguous()`` at the prefill, ``torch.cat`` after."""

    def __init__(self, g):
        super().__init__()
        self.at, self.k, self.v = ib.Attn(g), None, None

    def append(self, k, v):
        k, v = k.detach().cpu(), v.detach().cpu()
        if self.k is None:
            self.k, self.v = k.contiguous(), v.contiguous()
        else:
            self.k, self.v = torch.cat([self.k, k], 1), torch.cat([self.v, v], 1)

    def forward(self, x):
        q, k, v = self.at.qkv(x)
        self.append(k, v)
        return self.at.out(q, self.k.to(x.device), self.v.to(x.device))


class SinkWindowBlock(HostTensorBlock):
    """StreamingLLM's sink + window on host tensors: after the append, keep the first ``SINK`` and the last
    ``WINDOW`` tokens once the cache holds more."""

    def append(self, k, v):
        super().append(k, v)
        if self.k.shape[1] > SINK + WINDOW:
            self.k = torch.cat([self.k[:, :SINK], self.k[:, -WINDOW:]], 1)
            self.v = torch.cat([self.v[:, :SINK], self.v[:, -WINDOW:]], 1)


class TokensFirstNumpyBlock(HostTensorBlock):
    """numpy ``[T, heads, d]`` (tokens first, as ``k_proj(x).view(t, heads, d)`` comes out: contiguous), grown
    with ``np.concatenate(axis=0)``."""

    def forward(self, x):
        t = x.shape[0]
        q, _, _ = self.at.qkv(x)
        kn = self.at.k_proj(x).view(t, self.at.heads, self.at.d).detach().cpu().numpy()
        vn = self.at.v_proj(x).view(t, self.at.heads, self.at.d).detach().cpu().numpy()
        if self.k is None:
            self.k, self.v = kn, vn
        else:
            self.k, self.v = np.concatenate([self.k, kn], axis=0), np.concatenate([self.v, vn], axis=0)
        kh = torch.from_numpy(self.k).transpose(0, 1).to(x.device)
        vh = torch.from_numpy(self.v).transpose(0, 1).to(x.device)
        return self.at.out(q, kh, vh)


class NumpyViewFirstBlock(HostTensorBlock):
    """numpy ``[heads, T, d]``, the prefill's K stored as it comes, ``self.k = k.cpu().numpy()``: a transposed
    (non-contiguous) view; every later ``np.concatenate`` is contiguous. The layout changes once."""

    def forward(self, x):
        q, k, v = self.at.qkv(x)
        kn, vn = k.detach().cpu().numpy(), v.detach().cpu().numpy()
        if self.k is None:
            self.k, self.v = kn, vn
        else:
            self.k, self.v = np.concatenate([self.k, kn], axis=1), np.concatenate([self.v, vn], axis=1)
        return self.at.out(q, torch.from_numpy(self.k), torch.from_numpy(self.v))


class NumpyCopyFirstBlock(NumpyViewFirstBlock):
    """numpy ``[heads, T, d]``, the prefill's K stored as a copy, ``self.k = k.cpu().numpy().copy()``: numpy's
    ``copy()`` is C-contiguous, like every later ``np.concatenate`` (``torch._numpy`` kept the view's strides:
    ``tracing.traceable_ndarray_copy``)."""

    def forward(self, x):
        q, k, v = self.at.qkv(x)
        kn, vn = k.detach().cpu().numpy(), v.detach().cpu().numpy()
        if self.k is None:
            self.k, self.v = kn.copy(), vn.copy()
        else:
            self.k, self.v = np.concatenate([self.k, kn], axis=1), np.concatenate([self.v, vn], axis=1)
        return self.at.out(q, torch.from_numpy(self.k), torch.from_numpy(self.v))


class RecentViewAppearsBlock(HostTensorBlock):
    """numpy ``[heads, T, d]`` grown from an empty array, and a view of its last 2 tokens created after the
    prefill (``None`` before) and read at the next step: the view's sizes are fixed, its strides follow the
    cache's length."""

    def __init__(self, g):
        super().__init__(g)
        self.k = np.zeros((ib.H, 0, ib.D), np.float32)
        self.v = np.zeros((ib.H, 0, ib.D), np.float32)
        self.k_recent = None

    def forward(self, x):
        q, k, v = self.at.qkv(x)
        self.k = np.concatenate([self.k, k.detach().cpu().numpy()], axis=1)
        self.v = np.concatenate([self.v, v.detach().cpu().numpy()], axis=1)
        out = self.at.out(q, torch.from_numpy(self.k), torch.from_numpy(self.v))
        if self.k_recent is not None:
            out = out + torch.from_numpy(self.k_recent).mean() * 0.1
        self.k_recent = self.k[:, -2:]
        return out


def model(block):
    return type(f"{block.__name__}Model", (CreatedCacheModel,), {"Block": block})


#: idiom -> (model, graphs over prefill + 7 decode steps, why more than 2)
IDIOMS = {
    "created_host_tensor": (model(HostTensorBlock), 2, "prefill, one decode graph"),
    "created_tokens_first_numpy": (model(TokensFirstNumpyBlock), 2, "prefill, one decode graph"),
    # growing phase (cache shorter than SINK + WINDOW + 1 after the append) and steady phase (trimmed)
    "created_sink_window": (model(SinkWindowBlock), 3, "prefill, growing phase, steady phase"),
    "created_numpy_copy_first": (model(NumpyCopyFirstBlock), 2, "prefill, one decode graph"),
    "created_recent_view": (model(RecentViewAppearsBlock), 2, "prefill, one decode graph"),
    # the first decode step sees the prefill's transposed view, every later one a contiguous array: Dynamo
    # recompiles once for the strides ("stride mismatch" in the recompile log); it keeps strides symbolic only
    # for tensors whose sizes are all static
    "created_numpy_view_first": (model(NumpyViewFirstBlock), 3, "prefill, first decode (view), decode"),
}

#: Graph counts on the code before HostCacheShapes (each idiom recompiled at its second decode length):
#: created_host_tensor 3, created_tokens_first_numpy 3, created_sink_window 4, created_numpy_view_first 3,
#: created_numpy_copy_first 3, created_recent_view 3.


def measure(name, inner="recording"):
    cls = IDIOMS[name][0]
    xs = ib.inputs(name, DECODE)
    want = ib.run_steps(cls(), xs)
    from kvpass.testing import RecordingBackend

    rec = RecordingBackend()
    graphs, reports = [], []
    kb = kvpass.backend(inner=rec if inner == "recording" else inner, on_report=reports.append)

    def front(gm, example_inputs, **kw):
        graphs.append(gm)
        return kb(gm, example_inputs, **kw)

    torch._dynamo.reset()
    torch._dynamo.utils.guard_failures.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = ib.run_steps(kvpass.compile(cls(), backend=front), xs)
    failures = [str(r) for reasons in torch._dynamo.utils.guard_failures.values() for r in reasons]
    return got, want, graphs, rec.graphs, failures


@pytest.mark.parametrize("name", sorted(IDIOMS))
def test_created_cache_compiles_to_its_graph_budget(name):
    got, want, graphs, inner, failures = measure(name)
    for i, (g, w) in enumerate(zip(got, want)):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5, msg=lambda s: f"{name} step {i}: {s}")
    assert max(float(w.abs().max()) for w in want) > 0.1
    for g in inner:
        assert not ib.kv_host_ops(g), f"{name}: host ops on the K/V path: {ib.kv_host_ops(g)}"
    assert len(graphs) == IDIOMS[name][1], f"{name}: {len(graphs)} graphs; recompiles: {failures}"
    if name == "created_numpy_view_first":
        assert any("stride mismatch" in f for f in failures), failures


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(IDIOMS))
def test_created_cache_through_inductor_matches_eager(name):
    got, want, graphs, _, _ = measure(name, inner="inductor")
    for i, (g, w) in enumerate(zip(got, want)):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4, msg=lambda s: f"{name} step {i}: {s}")
    assert len(graphs) <= IDIOMS[name][1] + 1  # Inductor may lay out the prefill's copy differently (strides)


def test_an_array_not_created_by_the_previous_call_is_left_to_dynamo():
    """A preallocated buffer (there from the start) is never told dynamic: its size stays static, as Dynamo
    traces it (the rewrite's bounds proofs rely on it)."""
    from kvpass.tracing import HostCacheShapes

    class Pre(ib.BufferModel):
        pass

    m, watch = Pre(), HostCacheShapes()
    assert watch.observe(m, (torch.randn(4, ib.HID),)) == []  # the prefill
    m.k_new = np.zeros((ib.H, 4, ib.D), np.float32)  # appeared, 4 = the previous call's token count
    m.k_odd = np.zeros((ib.H, 7, 3), np.float32)  # appeared, no dim of a token count
    assert watch.observe(m, (torch.randn(1, ib.HID),)) == [("___from_numpy(L['self'].k_new)", {1, 2})]
    assert watch.observe(m, (torch.randn(1, ib.HID),)) == []  # told once; k_buf, v_buf never


class RecentViewBeside(ib.BufferModel):
    """A growing numpy cache and a view of its last ``W`` tokens kept beside it for a local-attention layer
    (``self.k_recent = self.k[:, -W:]``): two graph inputs over the same host memory at every step, both only
    read (the step makes new arrays)."""

    LAYERS, W = 2, 3

    def init_cache(self, rng):
        self.k, self.v = ib.poison(rng, ib.H, self.W, ib.D), ib.poison(rng, ib.H, self.W, ib.D)
        self.k_recent, self.v_recent = self.k[:, -self.W:], self.v[:, -self.W:]

    def forward(self, x):
        glob, loc = self.layers
        q, k, v = glob.qkv(x)
        self.k = np.concatenate([self.k, k.detach().cpu().numpy()], axis=1)
        self.v = np.concatenate([self.v, v.detach().cpu().numpy()], axis=1)
        x = x + glob.out(q, torch.from_numpy(self.k), torch.from_numpy(self.v))
        q2, _, _ = loc.qkv(x)
        x = x + loc.out(q2, torch.from_numpy(self.k_recent), torch.from_numpy(self.v_recent))
        self.k_recent, self.v_recent = self.k[:, -self.W:], self.v[:, -self.W:]
        return x


def test_read_only_inputs_over_one_cache_run_compiled():
    """Overlapping host inputs that the graph only reads do not need eager's aliasing: no fallback (before: every
    step ran the traced graph eagerly, ``aliased_inputs_fallback`` 7 of 7, with a warning), results eager's, one
    decode graph. (Overlapping inputs the graph writes still fall back:
    ``tests/test_guards.py::test_two_caches_on_one_numpy_pool_run_as_eager``.)"""
    from torch._dynamo.utils import counters

    xs = ib.inputs("recent view", DECODE)
    want = ib.run_steps(RecentViewBeside(), xs)
    graphs = []
    kb = kvpass.backend(inner="eager")

    def front(gm, example_inputs, **kw):
        graphs.append(gm)
        return kb(gm, example_inputs, **kw)

    torch._dynamo.reset()
    counters["kvpass"].clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error", kvpass.KVPassWarning)
        got = ib.run_steps(kvpass.compile(RecentViewBeside(), backend=front), xs)
    for i, (g, w) in enumerate(zip(got, want)):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5, msg=lambda s: f"step {i}: {s}")
    assert counters["kvpass"]["aliased_inputs_fallback"] == 0
    assert len(graphs) == 2


def test_inputs_written_follows_values_computed_from_an_input():
    """``inputs_written``: an input is written when a value computed from it reaches a side effect."""
    from kvpass.aliasing import inputs_written

    def f(a, b, c):
        v = a[:, :2]
        v.add_(1)  # writes a through a view
        return b * 2 + c

    assert inputs_written(torch.fx.symbolic_trace(f).graph) == {0}


def test_a_view_of_a_created_cache_kept_for_the_next_step_takes_no_extra_graph():
    """The fuzzer's growing-cache family at one fixed draw: a numpy cache created at the prefill (a C-contiguous
    copy), grown with ``np.concatenate``, and a view of its last 2 tokens created after the prefill and read at the
    next step. The view's strides follow the cache's length; Dynamo would recompile once for them (3 graphs);
    told ahead, it keeps 2."""
    import fuzz_decoders as fd

    case = fd.GrowingCase(storage="numpy", layout="hsd", start="none", contiguous_first=True, sink=0, window=0,
                          evict_by="slices", recent_view=True, prompt_len=3, decode_steps=6, layers=2, seed=632)
    steps = fd.growing_steps(case)
    want = fd.run_steps(fd.GrowingModel(case), steps)
    graphs = []
    kb = kvpass.backend(inner="eager")

    def front(gm, example_inputs, **kw):
        graphs.append(gm)
        return kb(gm, example_inputs, **kw)

    torch._dynamo.reset()
    torch._dynamo.utils.guard_failures.clear()
    got = fd.run_steps(kvpass.compile(fd.GrowingModel(case), backend=front), steps)
    for i, (g, w) in enumerate(zip(got, want)):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5, msg=lambda s: f"step {i}: {s}")
    failures = [str(r) for reasons in torch._dynamo.utils.guard_failures.values() for r in reasons]
    assert len(graphs) == 2, failures
