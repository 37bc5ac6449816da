"""A rewritten read must see what the buffer holds: the buffer's rounding, and later writes where the caller
keeps a view of the buffer.

* **Narrow buffers.** A float32 model whose host buffer is float16 (or a bfloat16 host tensor) rounds K/V on the
  write and converts back on the read. ``scatter_slice`` replaces the read with ``cat([buf[:, :p], k.to(f16)])``;
  Inductor computes fp16 in float32 and drops a float32 -> fp16 -> float32 pair inside a kernel, so without
  :func:`kvpass.rules.as_stored` attention sees the unrounded K (2.3e-4 off on the prefill of ``Model`` below).
  The history must be bit-identical to eager's, through Inductor as through an eager inner.
* **Returned views.** A cache that returns its history as views of the buffer (``from_numpy(buf[:, :p]).unbind(0)``)
  gives the caller memory that a later write (a follower's, in the same step) changes; the rule leaves such a read
  a read of the buffer (``kvpass.aliasing.returned_views``).
* **Lists in the check.** ``kvpass.check`` on a ``make_fx`` capture where K is a ``torch.cat([...])`` (a partial
  RoPE) before the host round trip: op arguments that are lists.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

import kvpass

H, D, MAX = 2, 16, 32


def _seeded(seed, *shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


class _Cache:
    """A preallocated host buffer of ``store`` dtype (numpy, or a CPU tensor for bfloat16, which numpy lacks),
    written at ``pos`` and read back converted to ``read``."""

    def __init__(self, store, read):
        self.tensor = store in (torch.bfloat16,)
        self.k = torch.zeros(H, MAX, D, dtype=store) if self.tensor else \
            np.zeros((H, MAX, D), dtype=torch.empty(0, dtype=store).numpy().dtype)
        self.read, self.pos = read, 0

    def update(self, k):
        t = k.shape[1]
        if self.tensor:
            self.k[:, self.pos:self.pos + t] = k.detach().cpu()
            hist = self.k[:, :self.pos + t]
        else:
            self.k[:, self.pos:self.pos + t] = k.detach().cpu().numpy()
            hist = torch.from_numpy(self.k[:, :self.pos + t])
        self.pos += t
        return hist.to(self.read)


class Model(torch.nn.Module):
    """One attention over the cache's history; returns the output and the history (both compared)."""

    def __init__(self, store, read, seed=0):
        super().__init__()
        self.proj = torch.nn.Linear(D, H * D)
        with torch.no_grad():
            self.proj.weight.copy_(_seeded(seed, H * D, D))
            self.proj.bias.copy_(_seeded(seed + 1, H * D))
        self.cache = _Cache(store, read)

    def forward(self, x):
        k = self.proj(x).view(x.shape[0], H, D).transpose(0, 1)  # [H, t, D] float32
        hist = self.cache.update(k)
        q = k[:, -1:].to(hist.dtype)
        return (q @ hist.transpose(1, 2)).softmax(-1) @ hist, hist


def _run(model, xs, fn):
    with torch.no_grad():
        return [fn(x) for x in xs]


def _steps(seed):
    return [_seeded(seed, 5, D)] + [_seeded(seed + 10 + i, 1, D) for i in range(6)]


CASES = [(torch.float16, torch.float32), (torch.bfloat16, torch.float32), (torch.float16, torch.float64),
         (torch.float64, torch.float32), (torch.float32, torch.float16)]


@pytest.mark.parametrize("inner", ["eager", pytest.param("inductor", marks=pytest.mark.slow)])
@pytest.mark.parametrize("store,read", CASES, ids=lambda d: str(d).replace("torch.", ""))
def test_narrow_buffer_keeps_its_rounding(store, read, inner):
    """The history a rewritten read gives is the buffer's bits, converted as the user converts them, at every
    step (bit for bit). The attention output is then compared as any compiled output is: Inductor computes fp16
    attention in float32 and orders reductions its own way (stock ``torch.compile`` differs from eager as much)."""
    eager, compiled = Model(store, read), Model(store, read)
    compiled.load_state_dict(eager.state_dict())
    reports = []
    fn = kvpass.compile(compiled, backend=kvpass.backend(inner=inner, on_report=reports.append))
    xs = _steps(seed=7)
    want, got = _run(eager, xs, eager), _run(compiled, xs, fn)
    assert any(m.pattern == "scatter_slice" for r in reports for m in r.matches), "the read was not rewritten"
    tol = 1e-2 if read == torch.float16 else 1e-5
    for step, ((out_e, hist_e), (out_c, hist_c)) in enumerate(zip(want, got)):
        assert torch.equal(hist_c, hist_e), f"step {step}: history differs by {(hist_c - hist_e).abs().max()}"
        assert torch.allclose(out_c, out_e, rtol=tol, atol=tol), \
            f"step {step}: output differs by {(out_c - out_e).abs().max()}"


def test_the_rounding_is_a_bitcast_round_trip_of_the_written_value():
    """On the rewritten graph the fp16 piece of the history passes through its own bits (``view.dtype`` twice);
    a float32 buffer gets no such node."""
    for store, expected in ((torch.float16, 2), (torch.float32, 0)):
        reports = []
        model = Model(store, torch.float32)
        graphs = []

        def inner(gm, example_inputs):
            graphs.append(gm)
            return gm.forward

        fn = kvpass.compile(model, backend=kvpass.backend(inner=inner, on_report=reports.append))
        _run(model, _steps(seed=3)[:2], fn)
        bitcasts = [n for gm in graphs for n in gm.graph.nodes if n.target is torch.ops.aten.view.dtype]
        assert len(bitcasts) == expected * len(graphs), (store, [gm.code for gm in graphs])


# ---- returned views -------------------------------------------------------------------------------------


class _Owner:
    def __init__(self):
        self.k = np.zeros((H, MAX, D), dtype=np.float32)
        self.pos = 0

    def update(self, k):
        t = k.shape[1]
        self.k[:, self.pos:self.pos + t] = k.detach().cpu().numpy()
        self.pos += t
        return torch.from_numpy(self.k[:, :self.pos]).unbind(0)  # views of the buffer, one per head


class _Follower:
    """Writes its K over the owner's positions of this step, after the owner returned its history."""

    def __init__(self, owner):
        self.owner, self.pos = owner, 0

    def update(self, k):
        t = k.shape[1]
        if t == 1:
            self.owner.k[:, self.pos] = k[:, 0].detach().cpu().numpy()
        else:
            self.owner.k[:, self.pos:self.pos + t] = k.detach().cpu().numpy()
        self.pos += t
        return torch.from_numpy(self.owner.k[:, :self.pos])


class ViewsModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(D, H * D), torch.nn.Linear(D, H * D)
        with torch.no_grad():
            for i, p in enumerate(self.parameters()):
                p.copy_(_seeded(20 + i, *p.shape))
        self.owner = _Owner()
        self.follower = _Follower(self.owner)

    def forward(self, x):
        heads = self.owner.update(self.a(x).view(x.shape[0], H, D).transpose(0, 1))
        hist = self.follower.update(self.b(x).view(x.shape[0], H, D).transpose(0, 1))
        return heads, (hist[:, -1:] @ hist.transpose(1, 2)).softmax(-1) @ hist


@pytest.mark.parametrize("inner", ["eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_history_returned_as_views_shows_a_later_write(inner):
    """The owner's per-head views are returned: in eager they show the follower's K at this step's positions."""
    eager, compiled = ViewsModel(), ViewsModel()
    reports = []
    fn = kvpass.compile(compiled, backend=kvpass.backend(inner=inner, on_report=reports.append))
    xs = _steps(seed=11)
    for step, ((heads_e, out_e), (heads_c, out_c)) in enumerate(zip(_run(eager, xs, eager), _run(compiled, xs, fn))):
        for he, hc in zip(heads_e, heads_c):
            assert torch.equal(hc, he), f"step {step}: a returned view differs by {(hc - he).abs().max()}"
        assert torch.allclose(out_c, out_e, rtol=1e-5, atol=1e-6), f"step {step}"
    reasons = [s.reason for r in reports for s in r.skips]
    assert any("returned as a view of the buffer" in why for why in reasons), reasons


# ---- lists in the check ---------------------------------------------------------------------------------


def test_check_follows_a_cat_of_k_before_the_host_round_trip():
    """K from ``torch.cat`` (a partial RoPE's last op) goes ``.cpu().numpy()`` into a buffer; ``make_fx`` real
    mode bakes the read as a constant and leaves the cat dangling: both are reported, nothing raises."""
    buf = np.zeros((H, 16, 8), dtype=np.float32)

    def step(x, w):
        k = (x @ w).view(x.shape[0], H, 8).transpose(0, 1)
        k = torch.cat([k[..., :4] * 2, k[..., 4:]], -1)
        buf[:, :x.shape[0]] = k.detach().cpu().numpy()
        hist = torch.from_numpy(buf[:, :x.shape[0]])
        q = x.view(x.shape[0], H, 4).transpose(0, 1).repeat(1, 1, 2)
        return (q @ hist.transpose(1, 2)).softmax(-1) @ hist

    gm = make_fx(step, tracing_mode="real")(_seeded(1, 4, 8), _seeded(2, 8, 16))
    kinds = {(f.kind, f.target) for f in kvpass.check(gm)}
    assert ("dangling-kv", "aten.cat.default") in kinds, kinds
    assert any(kind == "constant-kv" for kind, _ in kinds), kinds
