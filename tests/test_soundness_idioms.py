"""Issue 11, "The idioms that change results today": each idiom family as a small user-written model.

Every model has ``Linear`` K/V projections and K/V caches in host numpy buffers, written the way a user would
write them (poisoned with random values at init, so a rewrite that reads a stale slot shows). Each runs a prefill
and ``DECODE`` decode steps on fresh random inputs, and must give eager's results, every step's outputs AND the
final cache contents (the cache is a result too), through:

(a) ``kvpass.compile(model, backend=kvpass.backend(inner="eager"))``;
(b) ``kvpass.compile(model)`` (Inductor; ``slow``);
(c) standalone: each Dynamo graph (captured with ``kvpass.testing.capture_graphs``, one per step) through
    ``kvpass.rewrite(copy.deepcopy(g.before), example_inputs=g.example_inputs, verify=True)``, which must not
    raise; the example inputs hold the values from before their step (after it, a dropped write re-reads what
    the real run wrote and hides). The rewritten graph is then run again on the live inputs (the real numpy
    memory, so inputs that alias still alias: items 4 and 5) against the graph rewritten with no pattern
    (``patterns=[]``: the same IR, nothing rewritten). So the module ``rewrite`` returns must itself be right on
    overlapping inputs: carry the call-time overlap guard, or leave such a graph unrewritten. (Today ``verify``
    deep-copies each input on its own, so it passes items 4 and 5; only this live run catches them.)
(d) item 12: the module ``kvpass.rewrite`` returns runs the code of its graph (``recompile()`` was called), and a
    rewrite that changed the graph reports at least one match.

The oracle is a second instance built by the same factory (same seed, same weights and poison) rather than a
``copy.deepcopy``: deepcopy turns two numpy views of one pool (items 4 and 5) into unrelated arrays, i.e. it
would remove exactly the aliasing under test. Everything is public API, so these tests run unchanged against a
new rewrite core. Items 4 and 5 may warn (``UserWarning``/``KVPassWarning``) and fall back; a warning is
accepted, never required.
"""

from __future__ import annotations

import copy
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._inductor.custom_graph_pass import CustomGraphPass

import kvpass
from kvpass.testing import capture_graphs
from kvpass.tracing import tracing_context

pytestmark = pytest.mark.filterwarnings("ignore:To copy construct from a tensor")  # torch.tensor of a traced array

HID, H, D, MAX = 8, 2, 4, 16
PREFILL, DECODE = 4, 4
TOL = dict(rtol=1e-5, atol=1e-5)


def poison(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def attend(q, k, v):
    """Plain attention of ``q [H, t, d]`` over the history ``k, v [H, s, d]``."""
    return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), -1) @ v


class IdiomModel(nn.Module):
    """Base: ``k_proj``/``v_proj`` (seeded), the cache position ``pos`` (an int on the module: unspecialized under
    ``kvpass.compile``), and host caches made by ``init_cache(rng)``. ``CACHE`` names what ``cache_state`` returns."""

    d = D
    CACHE: tuple = ("k_buf", "v_buf")

    def __init__(self, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.k_proj = nn.Linear(HID, H * self.d, bias=False)
        self.v_proj = nn.Linear(HID, H * self.d, bias=False)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(HID))
        self.pos = 0
        self.init_cache(np.random.default_rng(seed + 1))

    def init_cache(self, rng):
        self.k_buf = poison(rng, H, MAX, self.d)
        self.v_buf = poison(rng, H, MAX, self.d)

    def kv(self, x):
        t = x.shape[0]
        k = self.k_proj(x).view(t, H, self.d).transpose(0, 1)
        v = self.v_proj(x).view(t, H, self.d).transpose(0, 1)
        return k, v

    def cache_state(self) -> dict:
        out = {}
        for name in self.CACHE:
            obj = self
            for part in name.split("."):
                obj = getattr(obj, part)
            out[name] = (torch.from_numpy(obj) if isinstance(obj, np.ndarray) else obj).detach().clone()
        return out


# ---- the twelve idiom families ----------------------------------------------------------------------------


class WorkspaceReuse(IdiomModel):
    """1. One device workspace reused for K then V: ``ws.copy_(k)``, write ``ws`` to the host, ``ws.copy_(v)``."""

    CACHE = ("k_buf", "v_buf", "ws")

    def init_cache(self, rng):
        super().init_cache(rng)
        self.register_buffer("ws", torch.from_numpy(poison(rng, H, MAX, self.d)))

    def forward(self, x):
        k, v = self.kv(x)
        t, p = k.shape[1], self.pos
        ws = self.ws[:, :t]
        ws.copy_(k)
        self.k_buf[:, p : p + t] = ws.detach().cpu().numpy()
        ws.copy_(v)
        self.v_buf[:, p : p + t] = ws.detach().cpu().numpy()
        self.pos = p + t
        kh = torch.from_numpy(self.k_buf[:, : p + t]).to(x.device)
        vh = torch.from_numpy(self.v_buf[:, : p + t]).to(x.device)
        return attend(k, kh, vh), kh * 1.0, vh * 1.0


class EditedHostCopy(IdiomModel):
    """2. The host copy is edited before it is written, padded or concatenated."""

    CACHE = ("k_buf", "k2_buf", "v_hist")
    PAD = 2

    def init_cache(self, rng):
        self.k_buf = poison(rng, H, MAX, self.d + self.PAD)  # padded on write, sliced back on read
        self.k2_buf = poison(rng, H, MAX, self.d)
        self.v_hist = np.zeros((H, 0, self.d), dtype=np.float32)  # grown with np.concatenate

    def forward(self, x):
        k, v = self.kv(x)
        t, p = k.shape[1], self.pos
        a = k.detach().cpu().numpy().copy()
        a[:, :, 0] = -3.0
        self.k_buf[:, p : p + t] = np.pad(a, ((0, 0), (0, 0), (0, self.PAD)))
        c = k.detach().cpu().numpy().copy()
        c[:, :, 1] = 2.0
        self.k2_buf[:, p : p + t] = c
        b = v.detach().cpu().numpy().copy()
        b[:, :, 1] = b[:, :, 1] * 4.0
        self.v_hist = np.concatenate([self.v_hist, b], axis=1)
        self.pos = p + t
        kh = torch.from_numpy(self.k_buf[:, : p + t, : self.d]).to(x.device)
        k2h = torch.from_numpy(self.k2_buf[:, : p + t]).to(x.device)
        vh = torch.from_numpy(self.v_hist).to(x.device)
        return attend(k, kh, vh), kh * 1.0, k2h * 1.0, vh * 1.0


class InPlaceThroughHopViews(IdiomModel):
    """3a. In-place writes through a view of a hop's source or result, before and after the host copy is written
    into the cache: ``row = a[0]; row[:, 0] = 2.5``, ``back[1].mul_(2)``, ``v[0].mul_(-1.5)``. (On CPU
    ``.cpu().numpy()`` and ``from_numpy`` share memory with ``k``: eager's edits reach ``k`` itself, but not the
    cache, which holds a copy made at the write.)"""

    def forward(self, x):
        k, v = self.kv(x)
        t, p = k.shape[1], self.pos
        a = k.detach().cpu().numpy()
        row = a[0]
        row[:, 0] = 2.5  # before the write: reaches k (CPU) and the cache
        self.k_buf[:, p : p + t] = a
        back = torch.from_numpy(a).to(x.device)
        back[1].mul_(2.0)  # after the write, through the hop's result: k changes, the cache keeps the old row
        self.v_buf[:, p : p + t] = v.detach().cpu().numpy()
        v[0].mul_(-1.5)  # after the write, the hop's source
        self.pos = p + t
        kh = torch.from_numpy(self.k_buf[:, : p + t]).to(x.device)
        vh = torch.from_numpy(self.v_buf[:, : p + t]).to(x.device)
        return attend(k, kh, vh), k * 1.0, back * 1.0, kh * 1.0, vh * 1.0


class InPlaceAroundPadSlice(IdiomModel):
    """3b. ``F.pad(x)[..., :n]`` (a copy of ``x``) with ``x`` edited afterwards, or the result edited."""

    def forward(self, x):
        k, v = self.kv(x)
        t, p = k.shape[1], self.pos
        s = F.pad(v, (0, 3))[..., : self.d]
        v.add_(1.0)  # s keeps the old v
        u = F.pad(k, (0, 2))[..., : self.d]
        u.mul_(3.0)  # k keeps its value
        self.k_buf[:, p : p + t] = k.detach().cpu().numpy()
        self.v_buf[:, p : p + t] = s.detach().cpu().numpy()
        self.pos = p + t
        kh = torch.from_numpy(self.k_buf[:, : p + t]).to(x.device)
        vh = torch.from_numpy(self.v_buf[:, : p + t]).to(x.device)
        return attend(u, kh, vh), s * 1.0, u * 1.0, k * 1.0, v * 1.0


class FollowerViewOfOwner(IdiomModel):
    """4. A follower keeps a numpy view of its owner's buffer (``k_fol = k_own[:, :, :DF]``) and writes the same
    slot the owner just wrote; the owner's read sees the follower's write (last writer wins)."""

    CACHE = ("k_own", "v_own")
    DF = 2

    def init_cache(self, rng):
        self.k_own = poison(rng, H, MAX, self.d)
        self.v_own = poison(rng, H, MAX, self.d)
        self.k_fol = self.k_own[:, :, : self.DF]
        self.v_fol = self.v_own[:, :, : self.DF]

    def forward(self, x):
        k, v = self.kv(x)
        t, p = k.shape[1], self.pos
        self.k_own[:, p : p + t] = k.detach().cpu().numpy()
        self.v_own[:, p : p + t] = v.detach().cpu().numpy()
        kf, vf = k[..., : self.DF] * 0.5 + 1.0, v[..., : self.DF] - 1.0
        self.k_fol[:, p : p + t] = kf.detach().cpu().numpy()
        self.v_fol[:, p : p + t] = vf.detach().cpu().numpy()
        self.pos = p + t
        kh = torch.from_numpy(self.k_own[:, : p + t]).to(x.device)
        vh = torch.from_numpy(self.v_own[:, : p + t]).to(x.device)
        kfh = torch.from_numpy(self.k_fol[:, : p + t]).to(x.device)
        vfh = torch.from_numpy(self.v_fol[:, : p + t]).to(x.device)
        return attend(k, kh, vh), attend(kf, kfh, vfh), kh * 1.0, vh * 1.0


class PoolCache:
    """A user's cache object holding numpy buffers."""

    def __init__(self, k, v):
        self.k, self.v = k, v


class TwoCachesOnOnePool(IdiomModel):
    """5. Two caches hold views of one numpy pool (``a.k = pool[:]; b.k = pool[:]``), both write, one reads."""

    CACHE = ("pool_k", "pool_v")

    def init_cache(self, rng):
        self.pool_k = poison(rng, H, MAX, self.d)
        self.pool_v = poison(rng, H, MAX, self.d)
        self.a = PoolCache(self.pool_k[:], self.pool_v[:])
        self.b = PoolCache(self.pool_k[:], self.pool_v[:])

    def forward(self, x):
        k, v = self.kv(x)
        t, p = k.shape[1], self.pos
        self.a.k[:, p : p + t] = k.detach().cpu().numpy()
        self.a.v[:, p : p + t] = v.detach().cpu().numpy()
        self.b.k[:, p : p + t] = (k * 0.5 + 1.0).detach().cpu().numpy()
        self.b.v[:, p : p + t] = (v - 1.0).detach().cpu().numpy()
        self.pos = p + t
        kh = torch.from_numpy(self.a.k[:, : p + t]).to(x.device)
        vh = torch.from_numpy(self.a.v[:, : p + t]).to(x.device)
        return attend(k, kh, vh), kh * 1.0, vh * 1.0


class WriteThroughSliceView(IdiomModel):
    """6. A write through a slice view after a write of the same slots: ``buf[:, p:p+t][...] = x`` and
    ``w = buf[:, p:p+t]; w[:, :, :2] = y``."""

    def forward(self, x):
        k, v = self.kv(x)
        t, p = k.shape[1], self.pos
        self.k_buf[:, p : p + t] = k.detach().cpu().numpy()
        self.k_buf[:, p : p + t][...] = (k * 2.0 + 1.0).detach().cpu().numpy()
        self.v_buf[:, p : p + t] = v.detach().cpu().numpy()
        w = self.v_buf[:, p : p + t]
        w[:, :, :2] = (v[..., :2] - 3.0).detach().cpu().numpy()
        self.pos = p + t
        kh = torch.from_numpy(self.k_buf[:, : p + t]).to(x.device)
        vh = torch.from_numpy(self.v_buf[:, : p + t]).to(x.device)
        return attend(k, kh, vh), kh * 1.0, vh * 1.0


class SlidingWindowShift(IdiomModel):
    """7. A sliding window that shifts right in place (``buf[:, t:] = buf[:, :W - t].copy()``), newest first."""

    W = 6
    CACHE = ("k_win", "v_win")

    def init_cache(self, rng):
        self.k_win = poison(rng, H, self.W, self.d)
        self.v_win = poison(rng, H, self.W, self.d)

    def forward(self, x):
        k, v = self.kv(x)
        t = k.shape[1]
        self.k_win[:, t:] = self.k_win[:, : self.W - t].copy()
        self.k_win[:, :t] = k.detach().cpu().numpy()
        self.v_win[:, t:] = self.v_win[:, : self.W - t].copy()
        self.v_win[:, :t] = v.detach().cpu().numpy()
        self.pos = self.pos + t
        kh = torch.from_numpy(self.k_win).to(x.device)
        vh = torch.from_numpy(self.v_win).to(x.device)
        return attend(k, kh, vh), kh * 1.0, vh * 1.0


class OutArgumentWrite(IdiomModel):
    """8. A cache write through ``out=``: ``np.multiply(a, 0.5, out=buf[:, p:p+t])``."""

    def forward(self, x):
        k, v = self.kv(x)
        t, p = k.shape[1], self.pos
        np.multiply(k.detach().cpu().numpy(), 0.5, out=self.k_buf[:, p : p + t])
        np.add(v.detach().cpu().numpy(), 1.0, out=self.v_buf[:, p : p + t])
        self.pos = p + t
        kh = torch.from_numpy(self.k_buf[:, : p + t]).to(x.device)
        vh = torch.from_numpy(self.v_buf[:, : p + t]).to(x.device)
        return attend(k, kh, vh), kh * 1.0, vh * 1.0


class HistoryUsedAfterLaterWrite(IdiomModel):
    """9. History read, converted or split (``.float()`` of float32, ``swapdims``, ``unbind``, ``split``), then used
    after a later write into the same positions (on CPU all alias the buffer: eager sees the later write)."""

    def forward(self, x):
        k, v = self.kv(x)
        t, p = k.shape[1], self.pos
        self.k_buf[:, p : p + t] = k.detach().cpu().numpy()
        self.v_buf[:, p : p + t] = v.detach().cpu().numpy()
        h = torch.from_numpy(self.k_buf[:, : p + t]).to(x.device)
        hf = h.float()
        hs = h.swapdims(0, 1)
        hu = h.unbind(0)
        hp = h.split(1, dim=0)
        self.k_buf[:, p : p + t] = (k * -2.0 + 0.5).detach().cpu().numpy()  # the last writer
        self.pos = p + t
        vh = torch.from_numpy(self.v_buf[:, : p + t]).to(x.device)
        return attend(k, hf, vh), hf * 1.0, hs * 1.0, hu[0] * 1.0, hu[1] * 1.0, hp[1] * 1.0


class CloneThenEdit(IdiomModel):
    """10. ``h = from_numpy(buf[:, :e]).clone(); h[..., :2].copy_(h[..., :2] * 10)``, then a second read of the
    same region (it must not see the first read's edits)."""

    def forward(self, x):
        k, v = self.kv(x)
        t, p = k.shape[1], self.pos
        self.k_buf[:, p : p + t] = k.detach().cpu().numpy()
        self.v_buf[:, p : p + t] = v.detach().cpu().numpy()
        self.pos = p + t
        h = torch.from_numpy(self.k_buf[:, : p + t]).clone()
        h[..., :2].copy_(h[..., :2] * 10)
        h2 = torch.from_numpy(self.k_buf[:, : p + t]).to(x.device)
        vh = torch.from_numpy(self.v_buf[:, : p + t]).to(x.device)
        return attend(k, h2, vh), h * 1.0, h2 * 1.0


class TensorCopyThenEdit(IdiomModel):
    """11. ``kc = torch.tensor(k.detach().cpu().numpy()); kc[..., :2].mul_(10)``: the edit must not reach ``k``."""

    def forward(self, x):
        k, v = self.kv(x)
        t, p = k.shape[1], self.pos
        kc = torch.tensor(k.detach().cpu().numpy())
        kc[..., :2].mul_(10)
        self.k_buf[:, p : p + t] = k.detach().cpu().numpy()
        self.v_buf[:, p : p + t] = v.detach().cpu().numpy()
        self.pos = p + t
        kh = torch.from_numpy(self.k_buf[:, : p + t]).to(x.device)
        vh = torch.from_numpy(self.v_buf[:, : p + t]).to(x.device)
        return attend(kc, kh, vh), kc * 1.0, k * 1.0, kh * 1.0


class WriteOnlyStore(IdiomModel):
    """12. Numpy writes with no read after them in the step (the next step reads): a rewrite that changes these
    writes must report it and ``recompile()``."""

    def forward(self, x):
        k, v = self.kv(x)
        t, p = k.shape[1], self.pos
        self.k_buf[:, p : p + t] = k.detach().cpu().numpy()
        self.v_buf[:, p : p + t] = (v * 2.0).detach().cpu().numpy()
        self.pos = p + t
        return attend(k, k, v), k * 1.0


IDIOMS = {
    "01_workspace_reuse": WorkspaceReuse,
    "02_edited_host_copy": EditedHostCopy,
    "03a_inplace_through_hop_views": InPlaceThroughHopViews,
    "03b_inplace_around_pad_slice": InPlaceAroundPadSlice,
    "04_follower_view_of_owner": FollowerViewOfOwner,
    "05_two_caches_one_pool": TwoCachesOnOnePool,
    "06_write_through_slice_view": WriteThroughSliceView,
    "07_sliding_window_shift": SlidingWindowShift,
    "08_out_argument_write": OutArgumentWrite,
    "09_history_used_after_later_write": HistoryUsedAfterLaterWrite,
    "10_clone_then_edit": CloneThenEdit,
    "11_tensor_copy_then_edit": TensorCopyThenEdit,
    "12_write_only_store": WriteOnlyStore,
}


# ---- runners ------------------------------------------------------------------------------------------------


def inputs(name):
    """A prefill of ``PREFILL`` tokens, then ``DECODE`` one-token steps: fresh random hidden states, never zeros."""
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    return [torch.randn(PREFILL, HID, generator=g)] + [torch.randn(1, HID, generator=g) for _ in range(DECODE)]


def as_list(out):
    return list(out) if isinstance(out, (list, tuple)) else [out]


def run(step, xs):
    with torch.no_grad():
        return [[o.detach().clone() for o in as_list(step(x))] for x in xs]


def assert_same(name, got, want, got_cache, want_cache):
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert len(g) == len(w), f"{name} step {i}: {len(g)} outputs vs {len(w)}"
        for j, (a, b) in enumerate(zip(g, w)):
            torch.testing.assert_close(a, b, **TOL, msg=lambda m: f"{name} step {i}, output {j}: {m}")
    assert max(b.abs().max() for w in want for b in w) > 0.1, "degenerate reference output"
    for key in want_cache:
        torch.testing.assert_close(got_cache[key], want_cache[key], **TOL,
                                   msg=lambda m: f"{name} final cache {key!r}: {m}")


def eager_reference(name):
    model = IDIOMS[name]()
    out = run(model, inputs(name))
    return out, model.cache_state()


def check_compiled(name, **compile_kwargs):
    want, want_cache = eager_reference(name)
    model = IDIOMS[name]()
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # items 4 and 5 may warn and fall back: accepted, not required
        got = run(kvpass.compile(model, **compile_kwargs), inputs(name))
    assert_same(name, got, want, model.cache_state(), want_cache)


@pytest.mark.parametrize("name", sorted(IDIOMS))
def test_idiom_compiled_eager_backend_matches_eager(name):
    """(a) kvpass's rewrite, then the graph run as is."""
    check_compiled(name, backend=kvpass.backend(inner="eager"))


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(IDIOMS))
def test_idiom_compiled_inductor_matches_eager(name):
    """(b) kvpass.compile with its defaults: the rewrite, then Inductor."""
    check_compiled(name)


# ---- standalone rewrite on each captured graph -------------------------------------------------------------


def concrete(x):
    if isinstance(x, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return x.node.hint
    return x


def flat_tensors(out):
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in flat_tensors(o)]
    return []


def run_live(gm, args):
    """Run ``gm`` on the live inputs (real memory: inputs that alias still alias), return its outputs and its
    tensor inputs after the run, and put every input back as it was."""
    saved = [a.detach().clone() if isinstance(a, torch.Tensor) else None for a in args]
    try:
        with torch.no_grad():
            out = [t.detach().clone() for t in flat_tensors(gm(*args))]
        after = [a.detach().clone() if isinstance(a, torch.Tensor) else None for a in args]
    finally:
        with torch.no_grad():
            for a, s in zip(args, saved):  # a consistent snapshot: restoring in any order restores the memory
                if s is not None:
                    a.copy_(s)
    return out, after


def _state(model):
    """The model's cache objects (numpy arrays, tensor buffers) with a copy of their contents."""
    objs = []
    for name in model.CACHE:
        obj = model
        for part in name.split("."):
            obj = getattr(obj, part)
        objs.append((obj, obj.copy() if isinstance(obj, np.ndarray) else obj.detach().clone()))
    return objs


def _restore(state):
    for obj, saved in state:
        if isinstance(obj, np.ndarray):
            np.copyto(obj, saved)
        else:
            with torch.no_grad():
                obj.copy_(saved)


def for_each_graph(name, check):
    """Capture every Dynamo graph of the prefill and each decode step (one step at a time, as kvpass.compile would
    trace them) and call ``check(g)`` on each with its live example inputs holding the values they had BEFORE the
    step ran (after it, a dropped write would re-read the values the real run just wrote and hide)."""
    model = IDIOMS[name]()
    count = 0
    for x in inputs(name):
        pre = _state(model)
        with tracing_context(), torch.no_grad():
            _, graphs = capture_graphs(model, x, transform=lambda gm: gm)
        post = _state(model)
        _restore(pre)
        for g in graphs:
            check(g)
            count += 1
        _restore(post)
    assert count, f"{name}: no graph captured"


def rewrite_checked(name, g):
    """``kvpass.rewrite(verify=True)`` of a copy of ``g.before``; its result run again against the graph rewritten
    with no pattern (same IR) on the live inputs; returns ``(base, after, report)``."""
    args = [concrete(a) for a in g.example_inputs]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base, _ = kvpass.rewrite(copy.deepcopy(g.before), patterns=[])
        after, report = kvpass.rewrite(copy.deepcopy(g.before), example_inputs=g.example_inputs, verify=True)
        want_out, want_in = run_live(base, args)
        got_out, got_in = run_live(after, args)
    where = f"{name}: graph rewritten with {report.counts}\n{report.format()}"
    assert len(got_out) == len(want_out), where
    for j, (a, b) in enumerate(zip(got_out, want_out)):
        torch.testing.assert_close(a, b, **TOL, msg=lambda m: f"{where}\noutput {j}: {m}")
    for j, (a, b) in enumerate(zip(got_in, want_in)):
        if b is not None:
            torch.testing.assert_close(a, b, **TOL, msg=lambda m: f"{where}\ninput {j} after the run: {m}")
    return base, after, report


@pytest.mark.parametrize("name", sorted(IDIOMS))
def test_idiom_standalone_rewrite_verifies(name):
    """(c) ``rewrite(verify=True)`` must not raise RewriteMismatch on any captured graph, and must not change
    results when run on the real (aliasing) memory."""
    for_each_graph(name, lambda g: rewrite_checked(name, g))


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(IDIOMS))
def test_idiom_rewrite_recompiles_and_reports(name):
    """(d) item 12: the returned module runs its graph's code; a changed graph comes with a reported match."""
    def check(g):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            base, _ = kvpass.rewrite(copy.deepcopy(g.before), patterns=[])
            gm = copy.deepcopy(g.before)
            gm.code  # a graph that has run has its code generated (a lazy GraphModule generates it now)
            after, report = kvpass.rewrite(gm)
        assert after.code == after.graph.python_code("self").src, (
            f"{name}: the returned GraphModule's code is stale (no recompile() after the graph changed)\n"
            f"{kvpass.diff(base, after)}")
        if kvpass.graph_text(after) != kvpass.graph_text(base):
            assert report.matches, (f"{name}: the rewrite changed the graph but reported no match\n"
                                    f"{kvpass.diff(base, after)}")

    for_each_graph(name, check)


# ---- composition with the user's Inductor passes and torch.compile keywords --------------------------------


class TinyHostCache(IdiomModel):
    """The plain owner idiom (write, then read the history): what every kvpass version rewrites."""

    def forward(self, x):
        k, v = self.kv(x)
        t, p = k.shape[1], self.pos
        self.k_buf[:, p : p + t] = k.detach().cpu().numpy()
        self.v_buf[:, p : p + t] = v.detach().cpu().numpy()
        self.pos = p + t
        kh = torch.from_numpy(self.k_buf[:, : p + t]).to(x.device)
        vh = torch.from_numpy(self.v_buf[:, : p + t]).to(x.device)
        return attend(k, kh, vh)


class CountingPass(CustomGraphPass):
    """A user's own post-grad pass: counts its calls and the graphs it saw."""

    def __init__(self):
        self.calls = 0

    def __call__(self, graph: torch.fx.Graph) -> None:
        self.calls += 1

    def uuid(self):
        return "kvpass-tests-counting-pass-v1"


def _inductor_run(model, compile_fn, steps=2):
    import torch._dynamo.utils as dutils

    xs = inputs("tiny")[: 1 + steps]
    want = run(TinyHostCache(), xs)
    dutils.counters.clear()
    torch._dynamo.reset()
    got = run(compile_fn(model), xs)
    for i, (g, w) in enumerate(zip(got, want)):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4, msg=lambda m: f"step {i}: {m}")
    return dutils.counters["stats"]["unique_graphs"]


@pytest.mark.slow
def test_user_post_grad_custom_pre_pass_still_runs_under_backend_kvpass():
    """A user's ``post_grad_custom_pre_pass`` runs once per compiled graph under ``backend="kvpass"``, beside
    kvpass's own rewrite (which counts its matches in ``torch._dynamo.utils.counters["kvpass"]``)."""
    import torch._dynamo.utils as dutils
    import torch._inductor.config as icfg

    user = CountingPass()
    with icfg.patch(post_grad_custom_pre_pass=user, fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        graphs = _inductor_run(TinyHostCache(), lambda m: torch.compile(m, backend="kvpass"))
    assert graphs >= 1
    assert user.calls == graphs, f"the user's post_grad_custom_pre_pass ran {user.calls} times for {graphs} graphs"
    assert sum(dutils.counters["kvpass"].values()) > 0, "kvpass's rewrite did not run (no kvpass counters)"


@pytest.mark.slow
def test_user_post_grad_custom_pre_pass_composes_with_kvpass_backend_inductor():
    """The same with ``kvpass.backend(inner="inductor", on_report=...)``: both the user's pass and kvpass's run."""
    import torch._inductor.config as icfg

    user, reports = CountingPass(), []
    with icfg.patch(post_grad_custom_pre_pass=user, fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        graphs = _inductor_run(TinyHostCache(), lambda m: kvpass.compile(
            m, backend=kvpass.backend(inner="inductor", on_report=reports.append)))
    assert user.calls == graphs, f"the user's post_grad_custom_pre_pass ran {user.calls} times for {graphs} graphs"
    assert any(r.matches for r in reports), "kvpass's rewrite reported no match"


@pytest.mark.slow
@pytest.mark.parametrize("kwargs", [dict(mode="reduce-overhead"), dict(mode="max-autotune-no-cudagraphs"),
                                    dict(options={"epilogue_fusion": True}), dict(dynamic=True),
                                    dict(fullgraph=True, dynamic=False)],
                         ids=["mode-reduce-overhead", "mode-max-autotune-no-cg", "options", "dynamic", "fullgraph"])
def test_kvpass_compile_passes_torch_compile_keywords(kwargs):
    """``kvpass.compile(m, mode=..., options=..., dynamic=...)``: torch.compile hands mode/options to the backend
    callable as keyword arguments; none may raise, results equal eager."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # reduce-overhead on CPU: cudagraphs skipped with a warning
        _inductor_run(TinyHostCache(), lambda m: kvpass.compile(m, **kwargs))


@pytest.mark.slow
def test_backend_kvpass_string_accepts_mode():
    """``torch.compile(m, backend="kvpass", mode=...)`` too."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _inductor_run(TinyHostCache(), lambda m: torch.compile(m, backend="kvpass", mode="reduce-overhead"))
