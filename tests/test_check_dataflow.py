"""kvpass.check by dataflow: baked K/V found through any chain of ops, tables and weights left quiet.

Each case is checked on the in-memory program and on its ``.pt2`` file (kvpass's own reader). The cases that the
op allow-lists of the first ``fidelity.py`` missed (seen failing against commit d5d0a4d): the per-head loop port
of a flat host cache, and a baked K through ``flip``, ``roll`` or a multiply by a rotary table.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.fx.experimental.proxy_tensor import make_fx

from kvpass.fidelity import CONSTANT_KV, INPUT_FREE_KV, MUTATED_CONSTANT, check, format_findings

pytestmark = [
    pytest.mark.filterwarnings("ignore:While compiling, we found certain side effects:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*numpy.*:UserWarning"),
]


def _both(ep, tmp_path):
    """Findings of the in-memory program and of its .pt2 file (they must agree)."""
    path = tmp_path / "p.pt2"
    torch.export.save(ep, path)
    mem, disk = check(ep), check(path)
    assert [(f.kind, f.target, f.shape, f.consumer, f.source) for f in mem] == \
        [(f.kind, f.target, f.shape, f.consumer, f.source) for f in disk]
    return disk


class FlatHeadCache:
    """A literal port of a flat-array host cache: one flat numpy buffer, written and read back head by head."""

    def __init__(self, max_len: int, heads: int, d: int):
        self.max_len, self.heads, self.d = max_len, heads, d
        self.k = np.zeros(max_len * heads * d, dtype=np.float32)
        self.v = np.zeros(max_len * heads * d, dtype=np.float32)
        self.pos = 0

    def update(self, k, v):
        t = k.shape[1]
        for h in range(self.heads):
            base = (h * self.max_len + self.pos) * self.d
            self.k[base: base + t * self.d] = k[h].detach().cpu().numpy().reshape(-1)
            self.v[base: base + t * self.d] = v[h].detach().cpu().numpy().reshape(-1)
        self.pos += t
        kh = np.zeros((self.heads, self.pos, self.d), dtype=np.float32)
        vh = np.zeros((self.heads, self.pos, self.d), dtype=np.float32)
        for h in range(self.heads):
            base = h * self.max_len * self.d
            kh[h] = self.k[base: base + self.pos * self.d].reshape(self.pos, self.d)
            vh[h] = self.v[base: base + self.pos * self.d].reshape(self.pos, self.d)
        return torch.from_numpy(kh), torch.from_numpy(vh)


class PerHeadDecoder(nn.Module):
    """Two attention layers, each with its own per-head flat host cache."""

    def __init__(self, heads: int):
        super().__init__()
        self.heads = heads
        self.proj = nn.ModuleList(nn.Linear(16, 3 * heads * 8, bias=False) for _ in range(2))
        self.out = nn.ModuleList(nn.Linear(heads * 8, 16, bias=False) for _ in range(2))
        self.caches = [FlatHeadCache(32, heads, 8) for _ in range(2)]

    def forward(self, x):
        t = x.shape[0]
        for proj, out, cache in zip(self.proj, self.out, self.caches):
            q, k, v = (z.view(t, self.heads, 8).transpose(0, 1) for z in proj(x).chunk(3, -1))
            kh, vh = cache.update(k, v)
            x = x + out(F.scaled_dot_product_attention(q, kh, vh).transpose(0, 1).reshape(t, -1))
        return x


@pytest.mark.parametrize("heads", [1, 2, 4])
def test_per_head_loop_port_is_reported_in_every_attention(heads, tmp_path):
    model = PerHeadDecoder(heads)
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(heads))
    ep = torch.export.export(model, (x,), strict=True)
    for c in model.caches:
        c.pos = 0
    with torch.no_grad():
        assert (ep.module()(x) - model(x)).abs().max() > 1e-2  # the export attends over the trace-time buffers
    findings = _both(ep, tmp_path)
    assert [f.kind for f in findings] == [MUTATED_CONSTANT] * 4, format_findings(findings)
    assert [f.consumer.split(" of ")[0] for f in findings] == ["key", "value", "key", "value"]
    assert all(f.shape == (32 * heads * 8,) and "kh[h] = self.k[" in f.source or "vh[h] = self.v[" in f.source
               for f in findings)
    assert all("written in place by aten.copy_.default" in f.detail for f in findings)
    assert sorted({f.consumer.split("(")[1].split(")")[0] for f in findings}) == \
        ["scaled_dot_product_attention", "scaled_dot_product_attention_1"]


class BakedThrough(nn.Module):
    """A baked K history transformed by ``how`` before it meets the computed K, next to a rotary table, a mask
    and weights that must stay quiet."""

    def __init__(self, how: str):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.how = how
        self.q = nn.Linear(16, 16, bias=False)
        self.k = nn.Linear(16, 8, bias=False)
        self.v = nn.Linear(16, 8, bias=False)
        self.hist = torch.randn(1, 1, 3, 8, generator=g)
        self.rot = torch.randn(32, 8, generator=g)  # a rotary table: quiet where it multiplies computed K
        self.mask = torch.ones(32, 32, dtype=torch.bool).tril()
        self.w = torch.randn(8, 8, generator=g) / 3

    def forward(self, x):
        t = x.shape[1]
        q = self.q(x).view(1, t, 2, 8).transpose(1, 2)
        k = (self.k(x).view(1, t, 1, 8).transpose(1, 2) @ self.w) * self.rot[3:3 + t]
        v = self.v(x).view(1, t, 1, 8).transpose(1, 2)
        h = self.hist
        if self.how == "flip":
            h = h.flip(2)
        elif self.how == "roll":
            h = torch.roll(h, 1, 2)
        elif self.how == "rotary":
            h = h * self.rot[:3]
        elif self.how == "chain":
            h = torch.roll(h.flip(-1), 1, 2) * self.rot[:3] + 0.5
        k = torch.cat([h, k], dim=2).expand(1, 2, t + 3, 8)
        v = torch.cat([torch.zeros(1, 1, 3, 8) + v.mean(), v], dim=2).expand(1, 2, t + 3, 8)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask[:t, : t + 3])


def _capture(module, x, how):
    if how == "make_fx":
        with torch.no_grad():
            return make_fx(module, tracing_mode="real", record_stack_traces=True)(x)
    return torch.export.export(module, (x,), strict=(how == "strict"))


@pytest.mark.parametrize("capture", ["make_fx", "strict", "nonstrict"])
@pytest.mark.parametrize("how", ["flip", "roll", "rotary", "chain", "plain"])
def test_baked_k_through_flip_roll_and_rotary_multiply(how, capture, tmp_path):
    x = torch.randn(1, 4, 16, generator=torch.Generator().manual_seed(5))
    captured = _capture(BakedThrough(how), x, capture)
    findings = check(captured) if capture == "make_fx" else _both(captured, tmp_path)
    assert len(findings) == 1, format_findings(findings)  # the history only: not rot, mask, w
    (f,) = findings
    assert f.kind == CONSTANT_KV and f.shape == (1, 1, 3, 8) and f.all_zeros is False
    assert f.consumer.startswith("key of ") and "scaled_dot_product" in f.consumer and " via cat (" in f.consumer
    if capture != "make_fx":
        assert f.target == "hist"


class AllBaked(nn.Module):
    """K entirely from constants (a baked K times a rotary table, no computed part); V made of zeros in-graph."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(4)
        self.q = nn.Linear(16, 16, bias=False)
        self.hist = torch.randn(1, 2, 5, 8, generator=g)
        self.rot = torch.randn(5, 8, generator=g)

    def forward(self, x):
        q = self.q(x).view(1, -1, 2, 8).transpose(1, 2)
        k = self.hist * self.rot
        v = torch.zeros(1, 2, 5, 8)
        return F.scaled_dot_product_attention(q, k, v)


def test_kv_independent_of_the_tokens(tmp_path):
    x = torch.randn(1, 4, 16, generator=torch.Generator().manual_seed(6))
    findings = _both(torch.export.export(AllBaked(), (x,), strict=False), tmp_path)
    assert [(f.kind, f.target) for f in findings] == [(CONSTANT_KV, "hist"), (INPUT_FREE_KV, "aten.zeros.default")]
    assert findings[1].consumer.startswith("value of scaled_dot_product_attention")
    assert findings[1].values == "same for every input"


class BufferHistory(nn.Module):
    """A K history registered as a buffer: baked when the program never writes it from the tokens."""

    def __init__(self, written: str):
        super().__init__()
        self.k = nn.Linear(16, 8, bias=False)
        self.register_buffer("k_hist", torch.randn(1, 1, 3, 8, generator=torch.Generator().manual_seed(7)))
        self.register_buffer("seed", torch.randn(1, 1, 3, 8, generator=torch.Generator().manual_seed(8)))
        self.written = written

    def forward(self, x):
        k = self.k(x).view(1, -1, 1, 8).transpose(1, 2)
        if self.written == "tokens":
            self.k_hist.copy_(k[:, :, :3])
        elif self.written == "constants":
            self.k_hist.copy_(self.seed.flip(2))
        kk = torch.cat([self.k_hist, k], 2)
        return F.scaled_dot_product_attention(k, kk, kk)


@pytest.mark.parametrize("written", ["never", "constants", "tokens"])
def test_buffer_is_a_source_unless_written_from_the_tokens(written, tmp_path):
    x = torch.randn(1, 4, 16, generator=torch.Generator().manual_seed(9))
    findings = _both(torch.export.export(BufferHistory(written), (x,), strict=False), tmp_path)
    if written == "tokens":
        assert findings == []
    else:
        assert {f.target for f in findings} == ({"k_hist"} if written == "never" else {"k_hist", "seed"})
