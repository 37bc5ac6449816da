"""Issue 12, part B: buffer-region idioms, written as a user porting a cache would write them.

Each model has its own ``q/k/v`` projections and keeps K/V in host numpy buffers (poisoned with random values at
init, never zeros, so a rewrite that reads a slot nobody wrote shows), and attends with
``F.scaled_dot_product_attention`` over the history it read back. ``forward(x [t, HID])`` runs one step (a
prefill of several tokens, then one-token decode steps) and returns the attention output. Eager is the oracle.

The idioms (issue 12's numbering):

4. :class:`PerTokenLoop`: the new tokens written one at a time in a Python loop, ``buf[:, p + j] = kn[:, j]``;
   :class:`PerTokenHostTensor`: the same loop into host *tensors* (item 11's cache), ``buf[:, p + j] = k[:, j].cpu()``.
5. :class:`SlabChained` / :class:`SlabTuple`: K and V of every layer in one slab, ``kv[layer][0][:, p:p+t]`` or
   ``kv[layer, 1, :, p:p+t]``.
6. :class:`HistoryBeforeWrite`: the old history read *before* the step's write, concatenated with the new K on
   the device; :class:`LaggingFollower`: a read-only follower attending over a window that ends before its
   owner's position (the history before this step, plus its own new token).
7. :class:`HeadSliceOwners`: two owners writing different head slices of one buffer (a write spanning two dims),
   a follower reading all heads.
8. :class:`RingConcatenate` / :class:`RingRoll`: a ring buffer of ``W`` slots written at ``pos % W``, read back in
   logical order with two slices + ``np.concatenate`` or with ``np.roll``; :class:`GrowingBuffer`: a buffer grown by
   capacity doubling (``np.concatenate`` with zeros when full).

And the no-noise case: :func:`altup_minimal` (AltUp's ``corrected[1:] += first`` read back as ``[0]``).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

HID, H, D, MAX = 16, 2, 4, 24
PREFILL, DECODE = 4, 8


def poison(rng, *shape):
    """Random, not zeros: a slot nobody wrote holds a value no K has."""
    return rng.standard_normal(shape).astype(np.float32)


def proj(g, n_in, n_out):
    layer = nn.Linear(n_in, n_out, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=g) / math.sqrt(n_in))
    return layer


class Attn(nn.Module):
    """One attention layer's projections (``heads`` query and K/V heads of ``d`` features)."""

    def __init__(self, g, heads=H, d=D):
        super().__init__()
        self.heads, self.d = heads, d
        self.q_proj, self.k_proj, self.v_proj = (proj(g, HID, heads * d) for _ in range(3))
        self.o_proj = proj(g, heads * d, HID)

    def qkv(self, x):
        t = x.shape[0]
        split = lambda y: y.view(t, self.heads, self.d).transpose(0, 1)  # noqa: E731
        return split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))

    def out(self, q, kh, vh):
        a = F.scaled_dot_product_attention(q, kh, vh)
        return self.o_proj(a.transpose(0, 1).reshape(q.shape[1], self.heads * self.d))


class BufferModel(nn.Module):
    """Base: seeded layers, an int position ``pos`` on the module (unspecialized under ``kvpass.compile``), host
    buffers from :meth:`init_cache`; ``CACHE`` names the arrays :meth:`cache_state` returns."""

    CACHE: tuple = ("k_buf", "v_buf")
    LAYERS = 1

    def __init__(self, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.layers = nn.ModuleList(Attn(g) for _ in range(self.LAYERS))
        self.pos = 0
        self.init_cache(np.random.default_rng(seed + 1))

    def init_cache(self, rng):
        self.k_buf = poison(rng, H, MAX, D)
        self.v_buf = poison(rng, H, MAX, D)

    def cache_state(self) -> dict:
        return {name: torch.from_numpy(np.array(getattr(self, name))) for name in self.CACHE}


# ---- 4: per-token writes in a Python loop -------------------------------------------------------------------


class PerTokenLoop(BufferModel):
    """4. ``for j in range(t): buf[:, p + j] = kn[:, j]`` (a port of a per-token C loop)."""

    def forward(self, x):
        at = self.layers[0]
        q, k, v = at.qkv(x)
        t, p = k.shape[1], self.pos
        kn, vn = k.detach().cpu().numpy(), v.detach().cpu().numpy()
        for j in range(t):
            self.k_buf[:, p + j] = kn[:, j]
            self.v_buf[:, p + j] = vn[:, j]
        self.pos = p + t
        kh = torch.from_numpy(self.k_buf[:, : p + t]).to(x.device)
        vh = torch.from_numpy(self.v_buf[:, : p + t]).to(x.device)
        return at.out(q, kh, vh)


class PerTokenHostTensor(BufferModel):
    """4 with 11. The per-token loop into preallocated host *tensors* (no numpy): ``Tensor.__setitem__`` with a
    symbolic index is the write this time."""

    def init_cache(self, rng):
        self.k_buf = torch.from_numpy(poison(rng, H, MAX, D))
        self.v_buf = torch.from_numpy(poison(rng, H, MAX, D))

    def forward(self, x):
        at = self.layers[0]
        q, k, v = at.qkv(x)
        t, p = k.shape[1], self.pos
        for j in range(t):
            self.k_buf[:, p + j] = k[:, j].detach().cpu()
            self.v_buf[:, p + j] = v[:, j].cpu().clone()
        self.pos = p + t
        return at.out(q, self.k_buf[:, : p + t].to(x.device), self.v_buf[:, : p + t].to(x.device))


# ---- 5: K and V of every layer in one slab ------------------------------------------------------------------


class SlabChained(BufferModel):
    """5a. One slab ``kv [layers, 2, heads, max, d]``, written and read with chained indexing ``kv[i][0]``."""

    CACHE = ("kv",)
    LAYERS = 2

    def init_cache(self, rng):
        self.kv = poison(rng, self.LAYERS, 2, H, MAX, D)

    def forward(self, x):
        p = self.pos
        for i, at in enumerate(self.layers):
            q, k, v = at.qkv(x)
            t = k.shape[1]
            self.kv[i][0][:, p : p + t] = k.detach().cpu().numpy()
            self.kv[i][1][:, p : p + t] = v.detach().cpu().numpy()
            kh = torch.from_numpy(self.kv[i][0][:, : p + t]).to(x.device)
            vh = torch.from_numpy(self.kv[i][1][:, : p + t]).to(x.device)
            x = x + at.out(q, kh, vh)
        self.pos = p + x.shape[0]
        return x


class SlabTuple(SlabChained):
    """5b. The same slab indexed with one tuple ``kv[i, 0, :, p:p+t]``; V written before K is read."""

    def forward(self, x):
        p = self.pos
        for i, at in enumerate(self.layers):
            q, k, v = at.qkv(x)
            t = k.shape[1]
            self.kv[i, 1, :, p : p + t] = v.detach().cpu().numpy()
            self.kv[i, 0, :, p : p + t] = k.detach().cpu().numpy()
            kh = torch.from_numpy(self.kv[i, 0, :, : p + t]).to(x.device)
            vh = torch.from_numpy(self.kv[i, 1, :, : p + t]).to(x.device)
            x = x + at.out(q, kh, vh)
        self.pos = p + x.shape[0]
        return x


# ---- 6: history read before the step's write; a follower's window ending before the owner's position ---------


class HistoryBeforeWrite(BufferModel):
    """6a. ``hist = from_numpy(buf[:, :p])`` before ``buf[:, p:p+t] = k``, then ``cat([hist, k], 1)`` on the device."""

    def forward(self, x):
        at = self.layers[0]
        q, k, v = at.qkv(x)
        t, p = k.shape[1], self.pos
        k_old = torch.from_numpy(self.k_buf[:, :p]).to(x.device)
        v_old = torch.from_numpy(self.v_buf[:, :p]).to(x.device)
        self.k_buf[:, p : p + t] = k.detach().cpu().numpy()
        self.v_buf[:, p : p + t] = v.detach().cpu().numpy()
        self.pos = p + t
        return at.out(q, torch.cat([k_old, k], 1), torch.cat([v_old, v], 1))


class LaggingFollower(BufferModel):
    """6b. An owner writes at ``p``; a read-only follower attends over the owner's history up to ``start`` (the
    position before this step: a window that ends before the owner's position) plus its own new K/V."""

    LAYERS = 2

    def forward(self, x):
        own, fol = self.layers
        q, k, v = own.qkv(x)
        t, start = k.shape[1], self.pos
        self.k_buf[:, start : start + t] = k.detach().cpu().numpy()
        self.v_buf[:, start : start + t] = v.detach().cpu().numpy()
        self.pos = start + t
        kh = torch.from_numpy(self.k_buf[:, : self.pos]).to(x.device)
        vh = torch.from_numpy(self.v_buf[:, : self.pos]).to(x.device)
        x = x + own.out(q, kh, vh)
        q2, k2, v2 = fol.qkv(x)
        k_win = torch.from_numpy(self.k_buf[:, :start]).to(x.device)  # ends before the owner's position
        v_win = torch.from_numpy(self.v_buf[:, :start]).to(x.device)
        return x + fol.out(q2, torch.cat([k_win, k2], 1), torch.cat([v_win, v2], 1))


# ---- 7: two owners writing different head slices of one buffer ---------------------------------------------


class HeadSliceOwners(BufferModel):
    """7. One buffer ``[2 * heads, max, d]``: owner A writes heads ``[:H]``, owner B heads ``[H:]`` (each write
    spans the head dim and the position dim); each reads its own heads; a follower reads all heads (a GQA-style
    view of both owners)."""

    CACHE = ("k_buf", "v_buf")
    LAYERS = 3

    def init_cache(self, rng):
        self.k_buf = poison(rng, 2 * H, MAX, D)
        self.v_buf = poison(rng, 2 * H, MAX, D)

    def forward(self, x):
        a, b, fol = self.layers
        p = self.pos
        t = x.shape[0]
        for at, lo in ((a, 0), (b, H)):
            q, k, v = at.qkv(x)
            self.k_buf[lo : lo + H, p : p + t] = k.detach().cpu().numpy()
            self.v_buf[lo : lo + H, p : p + t] = v.detach().cpu().numpy()
            kh = torch.from_numpy(self.k_buf[lo : lo + H, : p + t]).to(x.device)
            vh = torch.from_numpy(self.v_buf[lo : lo + H, : p + t]).to(x.device)
            x = x + at.out(q, kh, vh)
        self.pos = p + t
        q, _, _ = fol.qkv(x)
        kh = torch.from_numpy(self.k_buf[:, : p + t]).to(x.device)
        vh = torch.from_numpy(self.v_buf[:, : p + t]).to(x.device)
        kh = kh.view(2, H, p + t, D).sum(0)  # both owners' heads, pairwise
        vh = vh.view(2, H, p + t, D).sum(0)
        return x + fol.out(q, kh, vh)


# ---- 8: ring buffer, growing buffer ------------------------------------------------------------------------

W = 6  # ring slots (the prefill fits; decode wraps after W - PREFILL steps)


class RingConcatenate(BufferModel):
    """8a. A ring of ``W`` slots written at ``pos % W``; read back oldest first: ``buf[:, :n]`` until it is full,
    then two slices + ``np.concatenate`` (``[slot + 1:]`` then ``[:slot + 1]``)."""

    def init_cache(self, rng):
        self.k_buf = poison(rng, H, W, D)
        self.v_buf = poison(rng, H, W, D)

    def write(self, buf, a, p, t):
        if t == 1:
            buf[:, p % W] = a[:, 0]
        else:  # the prefill fits in the ring
            buf[:, p : p + t] = a

    def read(self, buf, n, slot):
        if n <= W:
            return buf[:, :n]
        return np.concatenate([buf[:, slot + 1 :], buf[:, : slot + 1]], axis=1)

    def forward(self, x):
        at = self.layers[0]
        q, k, v = at.qkv(x)
        t, p = k.shape[1], self.pos
        self.write(self.k_buf, k.detach().cpu().numpy(), p, t)
        self.write(self.v_buf, v.detach().cpu().numpy(), p, t)
        self.pos = n = p + t
        slot = (n - 1) % W
        kh = torch.from_numpy(self.read(self.k_buf, n, slot)).to(x.device)
        vh = torch.from_numpy(self.read(self.v_buf, n, slot)).to(x.device)
        return at.out(q, kh, vh)


class RingRoll(RingConcatenate):
    """8a'. The same ring read back with ``np.roll(buf, -(slot + 1), axis=1)`` once full."""

    def read(self, buf, n, slot):
        if n <= W:
            return buf[:, :n]
        return np.roll(buf, -(slot + 1), axis=1)


class GrowingBuffer(BufferModel):
    """8b. Buffers grown by capacity doubling: ``np.concatenate`` with zeros while the new tokens do not fit in
    ``buf.shape[1]`` (each buffer checked against its own size)."""

    CAP0 = 4

    def init_cache(self, rng):
        self.k_buf = poison(rng, H, self.CAP0, D)
        self.v_buf = poison(rng, H, self.CAP0, D)

    @staticmethod
    def fit(buf, end):
        while end > buf.shape[1]:
            buf = np.concatenate([buf, np.zeros_like(buf)], axis=1)
        return buf

    def forward(self, x):
        at = self.layers[0]
        q, k, v = at.qkv(x)
        t, p = k.shape[1], self.pos
        self.k_buf, self.v_buf = self.fit(self.k_buf, p + t), self.fit(self.v_buf, p + t)
        self.k_buf[:, p : p + t] = k.detach().cpu().numpy()
        self.v_buf[:, p : p + t] = v.detach().cpu().numpy()
        self.pos = p + t
        kh = torch.from_numpy(self.k_buf[:, : p + t]).to(x.device)
        vh = torch.from_numpy(self.v_buf[:, : p + t]).to(x.device)
        return at.out(q, kh, vh)


class GrowingBufferCapacityInt(GrowingBuffer):
    """8b'. The same with the capacity kept in its own int attribute (``if p + t > self.cap``): the graph knows the
    buffer's size and ``cap`` as two symbols, so a read ``[:p + t]`` cannot be proven inside the buffer (where it is
    not, numpy would clamp it): left as it is, and the report says why."""

    def init_cache(self, rng):
        super().init_cache(rng)
        self.cap = self.CAP0

    def forward(self, x):
        at = self.layers[0]
        q, k, v = at.qkv(x)
        t, p = k.shape[1], self.pos
        if p + t > self.cap:
            self.k_buf = np.concatenate([self.k_buf, np.zeros_like(self.k_buf)], axis=1)
            self.v_buf = np.concatenate([self.v_buf, np.zeros_like(self.v_buf)], axis=1)
            self.cap = self.cap * 2
        self.k_buf[:, p : p + t] = k.detach().cpu().numpy()
        self.v_buf[:, p : p + t] = v.detach().cpu().numpy()
        self.pos = p + t
        kh = torch.from_numpy(self.k_buf[:, : p + t]).to(x.device)
        vh = torch.from_numpy(self.v_buf[:, : p + t]).to(x.device)
        return at.out(q, kh, vh)


IDIOMS = {
    "04_per_token_loop": PerTokenLoop,
    "04b_per_token_host_tensor": PerTokenHostTensor,
    "05a_slab_chained": SlabChained,
    "05b_slab_tuple": SlabTuple,
    "06a_history_before_write": HistoryBeforeWrite,
    "06b_lagging_follower": LaggingFollower,
    "07_head_slice_owners": HeadSliceOwners,
    "08a_ring_concatenate": RingConcatenate,
    "08a_ring_roll": RingRoll,
    "08b_growing_buffer": GrowingBuffer,
}

#: idioms whose rewrite cannot be proven everywhere (left as they are, reported with the reason)
LIMITS = {"08b_growing_capacity_int": GrowingBufferCapacityInt}


def inputs(name, decode=DECODE):
    """A prefill of ``PREFILL`` tokens, then ``decode`` one-token steps: fresh random hidden states."""
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    return [torch.randn(PREFILL, HID, generator=g)] + [torch.randn(1, HID, generator=g) for _ in range(decode)]


# ---- no noise -----------------------------------------------------------------------------------------------


def altup_minimal(x, y):
    """AltUp's correction, the smallest form: a write into an intermediate, read back where it did not write."""
    buf = x * 2
    buf[1:] += y
    return buf[0] + 1


# ---- measuring (used by tests/test_idioms_buffer.py; ``python tests/idioms_buffer.py`` prints the table) -------


def run_steps(step, xs):
    """``step`` on each input, without autograd; every output copied out at once."""
    with torch.no_grad():
        return [step(x).detach().clone() for x in xs]


def kv_path(gm: torch.fx.GraphModule, roots=None) -> set:
    """Every node an attention's K or V depends on: the K/V arguments of ``scaled_dot_product_attention``
    (torch-level or ATen) or, where AOTAutograd decomposed it (CPU), both operands of its batched matmuls
    (``bmm``: only attention uses them in these models); with ``roots="clones"``, every node a cloned value
    depends on (``fuzz_decoders.CacheStep`` clones each history it hands out)."""
    aten = torch.ops.aten

    def root_args(n):
        if roots == "clones":
            is_clone = n.target == "clone" if n.op == "call_method" else n.op == "call_function" and n.target in (
                torch.clone, aten.clone.default)
            return n.args[:1] if is_clone else ()
        if n.op != "call_function":
            return ()
        if n.target is torch._C._nn.scaled_dot_product_attention or (
                isinstance(n.target, torch._ops.OpOverload) and "scaled_dot_product" in n.target.name()):
            return n.args[1:3]
        return n.args[:2] if n.target in (aten.bmm.default, torch.bmm) else ()

    stack = [a for n in gm.graph.nodes for a in root_args(n)]
    assert stack or roots == "clones", "no attention found in the graph"
    seen: set = set()
    while stack:
        n = stack.pop()
        if isinstance(n, torch.fx.Node) and n not in seen:
            seen.add(n)
            stack.extend(n.all_input_nodes)
    return seen


def kv_through_buffer(gm: torch.fx.GraphModule, roots=None) -> list:
    """Writes into a buffer (a functional scatter whose chain starts at a graph input, or at a buffer grown from
    one by concatenation) that an attention's K or V depends on: the step's K/V reaching attention through a
    cache buffer instead of through graph edges (on a GPU: through host memory). Reading the old history (a
    slice of the buffer input itself) is not one, nor a write into a value computed in the step (a padding's
    ``zeros``, an in-place collective's result)."""
    from kvpass.aliasing import SCATTER_OPS, scatter_base

    def buffer(node):
        return isinstance(node, torch.fx.Node) and (node.op == "placeholder" or (
            node.target is torch.ops.aten.cat.default and any(buffer(p) for p in node.args[0])))

    path = kv_path(gm, roots)
    return [n for n in gm.graph.nodes if n in path and n.target in SCATTER_OPS and buffer(scatter_base(n))]


def kv_host_ops(gm: torch.fx.GraphModule) -> list:
    """Host round-trip ops (``cpu``, numpy ops, ``as_tensor``/``from_numpy``/``tensor``, device copies) on an
    attention's K/V path."""
    from kvpass.testing import host_round_trip_nodes

    path = kv_path(gm)
    return [n for n in host_round_trip_nodes(gm) if n in path]


class Measured:
    """What one compiled run gave: the Dynamo graphs (before kvpass), the graphs handed to the inner compiler,
    the reports, and the outputs of compiled and eager runs."""

    def __init__(self):
        self.dynamo, self.inner, self.reports = [], [], []
        self.got = self.want = None

    def max_error(self) -> float:
        return max(float((a - b).abs().max()) for a, b in zip(self.got, self.want))


def measure(name, decode=DECODE, patterns=None, inner=None) -> Measured:
    """Eager vs ``kvpass.compile(model, backend=kvpass.backend(inner=<recording eager>))`` over a prefill and
    ``decode`` steps of fresh random inputs."""
    import copy

    import kvpass
    from kvpass.testing import RecordingBackend

    m = Measured()
    xs = inputs(name, decode)
    cls = IDIOMS.get(name) or LIMITS[name]
    m.want = run_steps(cls(), xs)
    m.model = cls()
    rec = RecordingBackend()
    kv = kvpass.backend(inner=inner or rec, patterns=patterns, on_report=m.reports.append)

    def front(gm, example_inputs, **kw):
        m.dynamo.append(copy.deepcopy(gm))
        return kv(gm, example_inputs, **kw)

    torch._dynamo.reset()
    m.got = run_steps(kvpass.compile(m.model, backend=front), xs)
    m.inner = rec.graphs
    return m


def table(names=None) -> str:
    """One row per idiom: graphs, host ops on the K/V path before kvpass (Dynamo graph) and after (inner graph),
    K/V reaching attention through a buffer write, rewrites and skips, max |compiled - eager|."""
    rows = ["| idiom | graphs (prefill + 8 decode) | K/V-path host ops, Dynamo graphs | K/V-path host ops, inner graphs "
            "| K/V through a buffer write, inner graphs | rewrites | skips | max abs err |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name in names or [*IDIOMS, *LIMITS]:
        m = measure(name)
        rows.append(f"| {name} | {len(m.dynamo)} | {sum(len(kv_host_ops(g)) for g in m.dynamo)} | "
                    f"{sum(len(kv_host_ops(g)) for g in m.inner)} | {sum(len(kv_through_buffer(g)) for g in m.inner)} | "
                    f"{sum(len(r.matches) for r in m.reports)} | {sum(len(r.skips) for r in m.reports)} | "
                    f"{m.max_error():.1e} |")
    return "\n".join(rows)


if __name__ == "__main__":
    import sys
    import warnings

    warnings.simplefilter("ignore")
    print(table(sys.argv[1:] or None))
