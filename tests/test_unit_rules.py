"""The unit layer: each rule alone on small functional ATen graphs (``make_fx``), milliseconds per case.

Each case is user code a rule must handle or must leave alone, and is checked against eager on fresh random
inputs by :func:`rule_harness.run_rule` (outputs and the cache afterwards, bit for bit). The integration tests
(Dynamo, AOTAutograd, Inductor, export, runtimes) live in the other files; run this layer with ``pytest -m unit``.
"""

import operator

import pytest
import torch
import torch.nn.functional as F

from rule_harness import run_rule

pytestmark = pytest.mark.unit
aten = torch.ops.aten
MODES = ["real", "symbolic"]


def rand(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype)


# ---- scatter_slice: reads of a functional write are the pieces the region is made of -----------------------

@pytest.mark.parametrize("mode", MODES)
def test_scatter_slice_read_covers_write_is_cat(mode):
    def f(buf, k):
        buf[:, 4:6] = k
        return buf[:, :6] * 2

    r = run_rule(f, [rand(2, 8, 3), rand(2, 2, 3)], "scatter_slice", mode=mode)
    assert r.matches >= 1 and r.buffer_reads() == 0  # symbolic sizes: setitem's own read of the region too
    assert aten.cat.default in r.targets()


def test_scatter_slice_read_inside_write_is_value():
    def f(buf, k):
        buf[:, 2:6] = k
        return buf[:, 3:5] + 1

    r = run_rule(f, [rand(2, 8, 3), rand(2, 4, 3)], "scatter_slice")
    assert r.matches == 1 and r.buffer_reads() == 0
    assert aten.cat.default not in r.targets()


def test_scatter_slice_read_disjoint_is_old_buffer():
    def f(buf, k):
        buf[:, 4:6] = k
        return buf[:, :3] + 1

    r = run_rule(f, [rand(2, 8, 3), rand(2, 2, 3)], "scatter_slice")
    assert r.matches == 1 and r.buffer_reads() == 0


def test_scatter_slice_one_position_write():
    def f(buf, k):
        buf[:, 5] = k
        return buf[:, 5] * 1, buf[:, :6].sum(1)

    r = run_rule(f, [rand(2, 8, 3), rand(2, 3)], "scatter_slice")
    assert r.matches == 2 and r.buffer_reads() == 0


def test_scatter_slice_symbolic_positions_select_by_position():
    """The write's start is a symbol the read's bounds cannot be compared with: select by position at run time."""
    def f(buf, k, past):
        p = past.shape[0]
        buf[:, p:p + 2] = k
        return buf[:, 1:5] * 1

    r = run_rule(f, [rand(2, 8, 3), rand(2, 2, 3), rand(3)], "scatter_slice", mode="symbolic")
    assert r.buffer_reads() == 0


def test_scatter_slice_later_write_seen_through_view():
    """``h`` is a view of the buffer; a later write through the buffer must show in it (functionalization
    regenerates the view after the write): the rewritten read must be the value after both writes."""
    def f(buf, k, x):
        buf[:, 4:6] = k
        h = buf[:, :6]
        buf[:, 5] = x
        return h * 1

    r = run_rule(f, [rand(2, 8, 3), rand(2, 2, 3), rand(2, 3)], "scatter_slice")
    assert r.buffer_reads() == 0


def test_scatter_slice_written_value_edited_in_place_after():
    """The buffer holds ``k`` as it was at the write; a later ``k.mul_`` must not reach the read."""
    def f(buf, k):
        buf[:, 4:6] = k
        k.mul_(3)
        return buf[:, :6] + 0, k + 0

    r = run_rule(f, [rand(2, 8, 3), rand(2, 2, 3)], "scatter_slice")
    assert r.matches >= 1 and r.buffer_reads() == 0


def test_scatter_slice_write_through_view_of_buffer():
    def f(buf, k):
        v = buf.view(2, 4, 2, 3)
        v[:, 2] = k
        return buf[:, :6] * 1

    r = run_rule(f, [rand(2, 8, 3), rand(2, 2, 3)], "scatter_slice")
    torch.testing.assert_close(r.matches >= 0, True)  # exactness is what run_rule checked


def test_scatter_slice_out_argument_write():
    def f(buf, k):
        torch.add(k, 1, out=buf[:, 4:6])
        return buf[:, :6] * 1

    r = run_rule(f, [rand(2, 8, 3), rand(2, 2, 3)], "scatter_slice")
    assert r.buffer_reads() == 0


def test_scatter_slice_narrow_buffer_keeps_rounding():
    """float16 buffer, float32 values: the history is what the buffer holds, bit for bit."""
    def f(buf, k):
        buf[:, 4:6] = k
        return buf[:, :6].float()

    r = run_rule(f, [rand(2, 8, 3, dtype=torch.float16), rand(2, 2, 3)], "scatter_slice")
    assert r.buffer_reads() == 0
    assert aten.view.dtype in r.targets()  # the bit-cast pair that keeps the rounding through any compiler


def test_scatter_slice_returned_views_are_left():
    """Views of a read returned to the caller (``unbind``) are regenerated from the buffer after the call and show
    every later write to it: left reads of the buffer, and reported. Other uses of the read are rewritten."""
    def f(buf, k):
        buf[:, 4:6] = k
        h = buf[:, :6]
        return h.unbind(0), h * 2

    r = run_rule(f, [rand(2, 8, 3), rand(2, 2, 3)], "scatter_slice")
    assert any("returned as a view" in s.reason for s in r.report.skips), r.report.format()
    out = next(n for n in r.after.graph.nodes if n.op == "output").args[0]
    for item in out[0]:  # getitem(unbind(slice(write))), or select(slice(write)) as torch 2.15 regenerates it
        chain = [item]
        while chain[-1].target != aten.slice_scatter.default:
            assert chain[-1].target in (operator.getitem, aten.unbind.int, aten.select.int, aten.slice.Tensor), chain
            chain.append(chain[-1].args[0])
    assert out[1].args[0].target == aten.cat.default


def test_scatter_slice_returned_read_itself_is_replaced():
    """A read returned as it is: in the functional graph it is a fresh value (the write is a ``slice_scatter``
    into a new tensor), and AOTAutograd regenerates an output that aliases an input from the input after the
    call, so the value the graph returns is free to be the history."""
    def f(buf, k):
        buf[:, 4:6] = k
        return buf[:, :6]

    r = run_rule(f, [rand(2, 8, 3), rand(2, 2, 3)], "scatter_slice")
    assert r.buffer_reads() == 0 and not r.report.skips


def test_scatter_slice_index_copy_write_is_left():
    """A write at tensor indices (positions unknown to the graph's shapes) is not decomposed."""
    def f(buf, k, idx):
        buf.index_copy_(1, idx, k)
        return buf[:, :6] * 1

    r = run_rule(f, [rand(2, 8, 3), rand(2, 2, 3), torch.tensor([4, 5])], "scatter_slice", seeds=())
    assert r.matches == 0


def test_scatter_slice_no_cache_graph_unchanged():
    def f(x, k):
        y = x.clone()
        y[:, 4:6] = k
        return y[:, :6] * 1

    r = run_rule(f, [rand(2, 8, 3), rand(2, 2, 3)], "scatter_slice")
    assert r.matches == 0
    assert r.before.code == r.after.code


# ---- pad_slice: a slice that removes exactly the padding is the unpadded tensor --------------------------------

@pytest.mark.parametrize("mode", MODES)
def test_pad_slice_cancels(mode):
    def f(k):
        return F.pad(k, (0, 5))[..., :k.shape[-1]] * 1

    r = run_rule(f, [rand(2, 4, 3)], "pad_slice", mode=mode)
    assert r.matches == 1 and aten.constant_pad_nd.default not in r.targets()


def test_pad_slice_before_padding_cancels():
    def f(k):
        return F.pad(k, (2, 1))[..., 2:5] * 1

    r = run_rule(f, [rand(2, 4, 3)], "pad_slice")
    assert r.matches == 1


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("pad, keep", [((0, 5), 4),          # the slice keeps a padded element
                                       ((0, -1), 2)])        # a negative pad crops
def test_pad_slice_left_alone(pad, keep, mode):
    def f(k):
        return F.pad(k, pad)[..., :keep] * 1

    r = run_rule(f, [rand(2, 4, 3)], "pad_slice", mode=mode)
    assert r.matches == 0


def test_pad_slice_other_dim_padded_left_alone():
    def f(k):
        return F.pad(k, (0, 5, 0, 1))[..., :3] * 1

    r = run_rule(f, [rand(2, 4, 3)], "pad_slice")
    assert r.matches == 0


def test_pad_slice_reflect_left_alone():
    def f(k):
        return F.pad(k, (0, 2), mode="reflect")[..., :3] * 1

    r = run_rule(f, [rand(2, 4, 3)], "pad_slice")
    assert r.matches == 0


# ---- view_fold: a reshape of a reshape of a cache buffer back to a shape it had is that value -------------------

def test_view_fold_flat_buffer():
    def f(flat, k):
        flat.view(2, 8, 3)[:, 4:6] = k
        return flat.view(2, 8, 3)[:, :6] * 1

    r = run_rule(f, [rand(48), rand(2, 2, 3)], "view_fold")
    assert r.matches >= 1


def test_view_fold_dtype_view_left_alone():
    """``view(dtype)`` reinterprets bytes: not a reshape, never folded."""
    def f(flat, k):
        flat.view(torch.int32).view(2, 8, 3)[:, 4:6] = k
        return flat.view(torch.int32).view(torch.float32).view(2, 8, 3)[:, :6] * 1

    r = run_rule(f, [rand(48), torch.randint(0, 9, (2, 2, 3), dtype=torch.int32)], "view_fold")
    assert r.matches == 0


def test_view_fold_no_cache_unchanged():
    def f(x):
        return x.view(6, 8).view(48).view(2, 8, 3) * 1

    r = run_rule(f, [rand(2, 8, 3)], "view_fold")
    assert r.matches == 0


# ---- scatter_slice, adversarial: writes that overlap, other dims, permutes, rolls, growth, reorders -------------

@pytest.mark.parametrize("mode", MODES)
def test_scatter_slice_two_overlapping_writes_last_wins(mode):
    def f(buf, a, b):
        buf[:, 2:6] = a
        buf[:, 4:7] = b
        return buf[:, :8] * 1, buf[:, 3:5] * 1

    r = run_rule(f, [rand(2, 8, 3), rand(2, 4, 3), rand(2, 3, 3)], "scatter_slice", mode=mode)
    assert r.buffer_reads() == 0


def test_scatter_slice_read_on_other_dim():
    """Write positions 4:6 of dim 1, read heads 0:1 of dim 0: the read goes through the write."""
    def f(buf, k):
        buf[:, 4:6] = k
        return buf[:1] * 1, buf[1, 5] * 1

    r = run_rule(f, [rand(2, 8, 3), rand(2, 2, 3)], "scatter_slice")
    assert r.buffer_reads() == 0


def test_scatter_slice_transposed_read():
    def f(buf, k):
        buf[:, 4:6] = k
        return buf.transpose(0, 1)[:6] * 1, buf.permute(2, 1, 0)[:, :6] * 1

    run_rule(f, [rand(2, 8, 3), rand(2, 2, 3)], "scatter_slice")


def test_scatter_slice_ring_buffer_roll():
    def f(buf, k):
        buf[:, 5] = k
        return torch.roll(buf, -6, 1) * 1, torch.roll(buf, 3, 1)[:, :4] * 1

    run_rule(f, [rand(2, 8, 3), rand(2, 3)], "scatter_slice")


def test_scatter_slice_write_read_write_read():
    """A read between two writes sees the first only; the read after both sees both."""
    def f(buf, a, b):
        buf[:, 0:2] = a
        h1 = buf[:, :4] * 1
        buf[:, 1:3] = b
        h2 = buf[:, :4] * 1
        return h1, h2

    r = run_rule(f, [rand(2, 8, 3), rand(2, 2, 3), rand(2, 2, 3)], "scatter_slice")
    assert r.buffer_reads() == 0


def test_scatter_slice_in_place_edit_of_buffer_region():
    """``buf[:, 4:6] += k`` reads the old region and writes: the history holds the sum."""
    def f(buf, k):
        buf[:, 4:6] += k
        buf[:, :2].mul_(2)
        return buf[:, :6] * 1

    run_rule(f, [rand(2, 8, 3), rand(2, 2, 3)], "scatter_slice")


def test_scatter_slice_written_value_is_view_of_buffer():
    """The value written is itself read from the buffer (a shift): the read must see the shifted old values.
    (Without the ``clone`` torch's eager ``copy_`` of overlapping memory propagates element by element, which
    numpy and the functional graph do not: no reference to check against.)"""
    def f(buf):
        buf[:, 1:5] = buf[:, 0:4].clone()
        return buf[:, :6] * 1

    run_rule(f, [rand(2, 8, 3)], "scatter_slice")


def test_scatter_slice_two_buffers_one_value():
    def f(kb, vb, k):
        kb[:, 4:6] = k
        vb[:, 4:6] = k * 2
        k.add_(1)
        return kb[:, :6] * 1, vb[:, 3:6] * 1

    run_rule(f, [rand(2, 8, 3), rand(2, 8, 3), rand(2, 2, 3)], "scatter_slice")


def test_scatter_slice_bf16_and_int8_buffers():
    def f(bb, ib, k):
        bb[:, 4:6] = k
        ib[:, 4:6] = (k * 10).round().clamp(-128, 127).to(torch.int8)
        return bb[:, :6].float(), ib[:, :6].float() / 10

    run_rule(f, [rand(2, 8, 3, dtype=torch.bfloat16), torch.randint(-9, 9, (2, 8, 3), dtype=torch.int8),
                 rand(2, 2, 3)], "scatter_slice")


@pytest.mark.parametrize("mode", MODES)
def test_scatter_slice_growing_cat_history(mode):
    """A cache grown with ``cat`` and returned as the new state: reads of it are the pieces."""
    def f(buf, k):
        new = torch.cat([buf, k], 1)
        return new, new[:, -3:] * 1

    run_rule(f, [rand(2, 5, 3), rand(2, 2, 3)], "scatter_slice", mode=mode)


def test_scatter_slice_reorder_then_write():
    def f(buf, idx, k):
        buf.copy_(buf.index_select(0, idx))
        buf[:, 4:6] = k
        return buf[:, :6] * 1

    run_rule(f, [rand(3, 8, 2), torch.tensor([2, 0, 1]), rand(3, 2, 2)], "scatter_slice")
