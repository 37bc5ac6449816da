"""The store_loop pattern: unrolled paged-cache store loops become one store op (patterns/store_loop.py)."""

from __future__ import annotations

import operator

import pytest
import torch
from expecttest import TestCase

import kvpass
from kvpass.testing import capture_graphs

PLAN = [(0, 3, 5, 3), (3, 1, 0, 8), (11, 6, 0, 2)]  # (src, block, offset, length): 13 tokens, block size 8


def kv_loop(k, v, k_cache, v_cache):
    """Per chunk, K by setitem and V by copy_, interleaved (HND caches)."""
    for src, blk, off, n in PLAN:
        k_cache[blk, :, off:off + n] = k[src:src + n].transpose(0, 1)
        v_cache[blk, :, off:off + n].copy_(v[src:src + n].transpose(0, 1))
    return k_cache.sum() + v_cache.sum()


SLOTS = [(5, 7), (2, 0), (2, 1), (7, 3)]  # (block, offset) of decode tokens 0..3


def per_token_nhd_loop(k, k_cache):
    """Per token (decode), an NHD cache, int indices on both sides."""
    for i, (blk, off) in enumerate(SLOTS):
        k_cache[blk, off] = k[i]
    return k_cache


def upstream_shaped_loop(k, k_cache):
    """The upstream reference's loop body with Python ints: permute once, slice per block chunk."""
    rows = [(0, 6, 3), (6, 7, 0)]  # (token start, token end, context length); block size 8, table below
    table = [[4, 0], [2, 5]]
    for b, (start, end, ctx) in enumerate(rows):
        now = k[start:end].permute(1, 0, 2)
        j, off, src, remain = ctx // 8, ctx % 8, 0, end - start
        while remain > 0:
            m = min(remain, 8 - off)
            k_cache[table[b][j], :, off:off + m, :] = now[:, src:src + m, :]
            src, remain, j, off = src + m, remain - m, j + 1, 0
    return k_cache


def _inputs(gen, tokens=13, heads=2, dim=4, blocks=8, block_size=8, nhd=False, dtype=torch.float32):
    k = torch.randn(tokens, heads, dim, generator=gen)
    v = torch.randn(tokens, heads, dim, generator=gen)
    shape = (blocks, block_size, heads, dim) if nhd else (blocks, heads, block_size, dim)
    return k, v, torch.randn(shape, generator=gen).to(dtype), torch.randn(shape, generator=gen).to(dtype)


def _rewrite_and_run(fn, *args, patterns=("store_loop",)):
    """Eager result on copies vs the captured, rewritten graph's result on other copies."""
    eager_args = [a.clone() for a in args]
    expected = fn(*eager_args)
    run_args = [a.clone() for a in args]
    chosen = None if patterns is None else list(patterns)
    result, graphs = capture_graphs(fn, *run_args, transform=lambda gm: kvpass.rewrite(gm, patterns=chosen))
    assert len(graphs) == 1
    return expected, eager_args, result, run_args, graphs[0]


def _calls(gm, target):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is target]


def test_kv_loop_becomes_one_store_paged_kv(rng):
    inputs = _inputs(rng)
    expected, eager_args, result, run_args, g = _rewrite_and_run(kv_loop, *inputs)
    assert g.report.counts["store_loop"] == 1
    assert [m.pattern for m in g.report.matches] == ["store_loop"] and "6 slice writes" in g.report.matches[0].detail
    assert "kv_loop" in g.report.matches[0].source
    assert len(_calls(g.after, torch.ops.kvpass.store_paged_kv.default)) == 1
    assert not _calls(g.after, operator.setitem) and not [n for n in g.after.graph.nodes if n.target == "copy_"]
    assert torch.equal(run_args[2], eager_args[2]) and torch.equal(run_args[3], eager_args[3])
    torch.testing.assert_close(result, expected)
    assert not torch.equal(eager_args[2], inputs[2]) and not torch.equal(eager_args[3], inputs[3])


def test_per_token_nhd_loop_becomes_one_store_paged_single(rng):
    k, _, cache, _ = _inputs(rng, tokens=4, nhd=True)
    expected, eager_args, result, run_args, g = _rewrite_and_run(per_token_nhd_loop, k, cache)
    assert g.report.counts["store_loop"] == 1
    (call,) = _calls(g.after, torch.ops.kvpass.store_paged_single.default)
    assert call.kwargs == {"layout": "NHD"}
    table = call.args[5]
    assert table.target is torch.tensor and table.kwargs["dtype"] is torch.int32
    assert table.args[0] == [[i, blk, off, 1] for i, (blk, off) in enumerate(SLOTS)]
    assert torch.equal(run_args[1], eager_args[1]) and not torch.equal(run_args[1], cache)


def test_upstream_shaped_loop(rng):
    k, _, cache, _ = _inputs(rng, tokens=7)
    expected, eager_args, result, run_args, g = _rewrite_and_run(upstream_shaped_loop, k, cache)
    assert g.report.counts["store_loop"] == 1
    (call,) = _calls(g.after, torch.ops.kvpass.store_paged_single.default)
    assert call.args[5].args[0] == [[0, 4, 3, 5], [5, 0, 0, 1], [6, 2, 0, 1]]
    assert torch.equal(run_args[1], eager_args[1])


def _read_between(k, k_cache):
    k_cache[1, :, 0:2] = k[0:2].transpose(0, 1)
    seen = k_cache[1].sum()  # observes the first write only
    k_cache[2, :, 0:2] = k[2:4].transpose(0, 1)
    return seen


def _states_mutated_between(k, k_cache):
    k_cache[1, :, 0:2] = k[0:2].transpose(0, 1)
    k.mul_(2)
    k_cache[2, :, 0:2] = k[2:4].transpose(0, 1)
    return k_cache


def _overlapping(k, k_cache):
    k_cache[1, :, 0:3] = k[0:3].transpose(0, 1)
    k_cache[1, :, 2:4] = k[3:5].transpose(0, 1)  # slot (1, 2) written twice: the last write wins
    return k_cache


def _casting(k, k_cache):
    k_cache[1, :, 0:2] = k[0:2].transpose(0, 1)  # fp32 states into a bf16 cache: setitem casts
    k_cache[2, :, 0:2] = k[2:4].transpose(0, 1)
    return k_cache


def _twice(k, k_cache):
    k_cache[1, :, 0:4] = k[0:4].transpose(0, 1)
    k_cache[2, :, 0:4] = k[0:4].transpose(0, 1)  # the same 4 tokens again: 8 stored from 5 states
    return k_cache


@pytest.mark.parametrize("fn,dtype,reason", [
    (_read_between, torch.float32, "uses the cache's memory between the loop's writes"),
    (_states_mutated_between, torch.float32, "may write the states between the loop's writes"),
    (_overlapping, torch.float32, "writes overlap at block 1 offset 2"),
    (_casting, torch.bfloat16, "dtype change"),
    (_twice, torch.float32, "more tokens than the states hold"),
], ids=["read_between", "states_mutated", "overlap", "dtype_cast", "token_twice"])
def test_unsafe_loops_are_left_alone_with_a_reason(rng, fn, dtype, reason):
    k, _, cache, _ = _inputs(rng, tokens=5, dtype=dtype)
    expected, eager_args, result, run_args, g = _rewrite_and_run(fn, k, cache)
    assert g.report.counts["store_loop"] == 0 and not g.report.matches
    assert [s.pattern for s in g.report.skips] == ["store_loop"] and reason in g.report.skips[0].reason
    assert kvpass.diff(g.before, g.after) == ""
    assert torch.equal(run_args[1], eager_args[1])
    torch.testing.assert_close(result, expected)


def test_single_writes_and_other_graphs_are_not_touched(rng):
    def one_write(k, k_cache):
        k_cache[1, :, 0:2] = k[0:2].transpose(0, 1)
        return k_cache * 2

    k, _, cache, _ = _inputs(rng, tokens=5)
    _, _, _, _, g = _rewrite_and_run(one_write, k, cache)
    assert g.report.counts["store_loop"] == 0 and not g.report.skips


def test_whole_catalogue_leaves_store_loop_to_store_loop(rng):
    """With every pattern enabled, the store loop is still matched once and only by store_loop."""
    expected, eager_args, result, run_args, g = _rewrite_and_run(kv_loop, *_inputs(rng), patterns=None)
    assert g.report.counts["store_loop"] == 1 and sum(g.report.counts.values()) == 1
    assert torch.equal(run_args[2], eager_args[2]) and torch.equal(run_args[3], eager_args[3])


def test_rewritten_loop_compiles_to_the_store_kernel(rng):
    """Through kvpass.backend with Inductor: the op lowers to the generated scatter and matches eager."""
    reports = []
    k, v, kc, vc = _inputs(rng)
    eager = [t.clone() for t in (kc, vc)]
    kv_loop(k, v, *eager)
    compiled = torch.compile(kv_loop, backend=kvpass.backend(patterns=["store_loop"], on_report=reports.append))
    with torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        out = [t.clone() for t in (kc, vc)]
        compiled(k, v, *out)
    assert [r.counts["store_loop"] for r in reports] == [1]
    assert torch.equal(out[0], eager[0]) and torch.equal(out[1], eager[1])


class TestGoldenDiff(TestCase):
    def test_kv_loop_diff(self):
        gen = torch.Generator().manual_seed(0)
        _, graphs = capture_graphs(kv_loop, *_inputs(gen),
                                   transform=lambda gm: kvpass.rewrite(gm, patterns=["store_loop"]))
        g = graphs[0]
        self.assertExpectedInline(kvpass.diff(g.before, g.after), """\
--- before
+++ after
@@
 input L_v_cache_
 input L_v_
-getitem = operator.getitem(L_k_, 0:3)
-transpose = .transpose(getitem, 0, 1)
-setitem = operator.setitem(L_k_cache_, (3, :, 5:8), transpose)
-getitem_1 = operator.getitem(L_v_cache_, (3, :, 5:8))
-getitem_2 = operator.getitem(L_v_, 0:3)
-transpose_1 = .transpose(getitem_2, 0, 1)
-copy = .copy_(getitem_1, transpose_1)
-getitem_3 = operator.getitem(L_k_, 3:11)
-transpose_2 = .transpose(getitem_3, 0, 1)
-setitem_1 = operator.setitem(L_k_cache_, (1, :, 0:8), transpose_2)
-getitem_4 = operator.getitem(L_v_cache_, (1, :, 0:8))
-getitem_5 = operator.getitem(L_v_, 3:11)
-transpose_3 = .transpose(getitem_5, 0, 1)
-copy_1 = .copy_(getitem_4, transpose_3)
-getitem_6 = operator.getitem(L_k_, 11:13)
-transpose_4 = .transpose(getitem_6, 0, 1)
-setitem_2 = operator.setitem(L_k_cache_, (6, :, 0:2), transpose_4)
-getitem_7 = operator.getitem(L_v_cache_, (6, :, 0:2))
-getitem_8 = operator.getitem(L_v_, 11:13)
-transpose_5 = .transpose(getitem_8, 0, 1)
-copy_2 = .copy_(getitem_7, transpose_5)
+tensor = torch.tensor([[0, 3, 5, 3], [3, 1, 0, 8], [11, 6, 0, 2]], dtype=torch.int32, device=device(type='cpu'))
+store_paged_kv = kvpass.store_paged_kv.default(L_k_, L_v_, L_k_cache_, L_v_cache_, None, None, None, tensor, layout='HND')
 sum = .sum(L_k_cache_)
 sum_1 = .sum(L_v_cache_)
""")
