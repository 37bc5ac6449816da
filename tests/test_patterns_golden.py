"""One golden graph diff per pattern (expecttest; regenerate with EXPECTTEST_ACCEPT=1 and read the diff first),
each also checked numerically against eager on fresh random inputs."""

import copy

import expecttest
import numpy as np
import torch

import idioms
import kvpass
from kvpass.testing import capture_graphs
from kvpass.tracing import tracing_context


def rewrite_with(patterns):
    def transform(gm):
        return kvpass.rewrite(gm, patterns=patterns)

    return transform


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


class TestPatternGoldens(expecttest.TestCase):
    def capture(self, fn, *args, patterns=None):
        with tracing_context():
            result, graphs = capture_graphs(fn, *args, transform=rewrite_with(patterns))
        self.assertEqual(len(graphs), 1)
        return result, graphs[0]

    def test_host_hop(self):
        k = rand(2, 3, 4)
        result, g = self.capture(idioms.host_hop, k, patterns=["host_hop"])
        torch.testing.assert_close(result, idioms.host_hop(k))
        self.assertEqual(g.report.counts, {"host_hop": 1})
        self.assertIn("idioms.py", g.report.matches[0].source)
        self.assertExpectedInline(kvpass.diff(g.before, g.after), """\
--- before
+++ after
@@
 input L_k_
 detach = .detach(L_k_)
-cpu = .cpu(detach)
-view_as = .view_as(cpu, cpu)
-as_tensor = torch.as_tensor(view_as)
-to = .to(as_tensor, device(type='cpu'))
-mul = operator.mul(to, 2.0)
+mul = operator.mul(detach, 2.0)
 add = operator.add(mul, 1.0)
 return (add,)
""")

    def test_buffer_history(self):
        k = rand(2, 3, 4, seed=1)
        eager_cache, cache = idioms.HostCache(seed=5), idioms.HostCache(seed=5)
        result, g = self.capture(idioms.write_then_read, cache, k, patterns=["buffer_history"])
        torch.testing.assert_close(result, idioms.write_then_read(eager_cache, k))
        np.testing.assert_array_equal(cache.k, eager_cache.k)  # the write still happened
        self.assertEqual(g.report.counts, {"buffer_history": 1})
        self.assertExpectedInline(kvpass.diff(g.before, g.after), """\
--- before
+++ after
@@
 input L_cache_k
 detach = .detach(L_k_)
-cpu = .cpu(detach)
-view_as = .view_as(cpu, cpu)
-setitem = numpy.setitem(L_cache_k, (:, 0:3), view_as)
-getitem = numpy.getitem(L_cache_k, (:, :3))
-as_tensor = torch.as_tensor(getitem)
-to = .to(as_tensor, device(type='cpu'))
-transpose = .transpose(to, -1, -2)
-matmul = operator.matmul(to, transpose)
+setitem_1 = operator.setitem(L_cache_k, (:, 0:3), detach)
+transpose = .transpose(detach, -1, -2)
+matmul = operator.matmul(detach, transpose)
 return (matmul,)
""")

    def test_shared_read(self):
        k = rand(2, 3, 4, seed=2)
        eager_cache, cache = idioms.HostCache(seed=6), idioms.HostCache(seed=6)
        result, g = self.capture(idioms.two_reads, cache, k, patterns=["shared_read", "buffer_history"])
        torch.testing.assert_close(result, idioms.two_reads(eager_cache, k))
        self.assertEqual(g.report.counts, {"shared_read": 1, "buffer_history": 1})
        self.assertExpectedInline(kvpass.diff(g.before, g.after), """\
--- before
+++ after
@@
 input L_cache_k
 detach = .detach(L_k_)
-cpu = .cpu(detach)
-view_as = .view_as(cpu, cpu)
-setitem = numpy.setitem(L_cache_k, (:, 0:3), view_as)
-getitem = numpy.getitem(L_cache_k, (:, :3))
-as_tensor = torch.as_tensor(getitem)
-to = .to(as_tensor, device(type='cpu'))
-getitem_1 = numpy.getitem(L_cache_k, (:, :3))
-as_tensor_1 = torch.as_tensor(getitem_1)
-to_1 = .to(as_tensor_1, device(type='cpu'))
-sum = .sum(to)
-mul = operator.mul(to_1, 3)
+setitem_1 = operator.setitem(L_cache_k, (:, 0:3), detach)
+sum = .sum(detach)
+mul = operator.mul(detach, 3)
 sum_1 = .sum(mul)
 add = operator.add(sum, sum_1)
""")

    def test_host_padding_np_pad_and_pad_slice(self):
        k = rand(2, 3, 4, seed=3)
        eager_cache, cache = idioms.HostCache(d=8, seed=7), idioms.HostCache(d=8, seed=7)
        result, g = self.capture(idioms.padded_write_read, cache, k,
                                 patterns=["host_padding", "buffer_history", "pad_slice"])
        torch.testing.assert_close(result, idioms.padded_write_read(eager_cache, k))
        np.testing.assert_array_equal(cache.k, eager_cache.k)
        self.assertEqual(g.report.counts, {"host_padding": 1, "buffer_history": 1, "pad_slice": 1})
        self.assertExpectedInline(kvpass.diff(g.before, g.after), """\
--- before
+++ after
@@
 input L_cache_k
 detach = .detach(L_k_)
-cpu = .cpu(detach)
-view_as = .view_as(cpu, cpu)
-traceable_np_pad = numpy.traceable_np_pad(view_as, ((0, 0), (0, 0), (0, 4)))
-setitem = numpy.setitem(L_cache_k, (:, 0:3), traceable_np_pad)
-getitem = numpy.getitem(L_cache_k, (:, :3, :4))
-as_tensor = torch.as_tensor(getitem)
-to = .to(as_tensor, device(type='cpu'))
-mul = operator.mul(to, 1.5)
+pad = F.pad(detach, [0, 4, 0, 0, 0, 0], value=0)
+setitem_1 = operator.setitem(L_cache_k, (:, 0:3), pad)
+mul = operator.mul(detach, 1.5)
 return (mul,)
""")

    def test_host_padding_zeros_assign(self):
        k = rand(2, 3, 4, seed=4)
        result, g = self.capture(idioms.zeros_assign_pad, k, patterns=["host_padding", "host_hop"])
        torch.testing.assert_close(result, idioms.zeros_assign_pad(k))
        self.assertEqual(g.report.counts, {"host_padding": 1, "host_hop": 1})
        self.assertExpectedInline(kvpass.diff(g.before, g.after), """\
--- before
+++ after
@@
 input L_k_
-zeros = numpy.zeros((2, 3, 8), dtype='float32')
 detach = .detach(L_k_)
-cpu = .cpu(detach)
-view_as = .view_as(cpu, cpu)
-setitem = numpy.setitem(zeros, (:, :, :4), view_as)
-as_tensor = torch.as_tensor(zeros)
-to = .to(as_tensor, device(type='cpu'))
-add = operator.add(to, 1.0)
+pad = F.pad(detach, [0, 4, 0, 0, 0, 0], value=0)
+detach_1 = .detach(pad)
+add = operator.add(detach_1, 1.0)
 return (add,)
""")

    def test_host_padding_concatenate(self):
        k = rand(2, 3, 4, seed=5)
        result, g = self.capture(idioms.concatenate_pad, k, patterns=["host_padding", "host_hop"])
        torch.testing.assert_close(result, idioms.concatenate_pad(k))
        self.assertEqual(g.report.counts, {"host_padding": 1, "host_hop": 1})
        self.assertExpectedInline(kvpass.diff(g.before, g.after), """\
--- before
+++ after
@@
 input L_k_
 detach = .detach(L_k_)
-cpu = .cpu(detach)
-view_as = .view_as(cpu, cpu)
-zeros = numpy.zeros((2, 3, 3), dtype='float32')
-concatenate = numpy.concatenate([view_as, zeros], axis=-1)
-as_tensor = torch.as_tensor(concatenate)
-to = .to(as_tensor, device(type='cpu'))
-mul = operator.mul(to, 2.0)
+pad = F.pad(detach, [0, 3, 0, 0, 0, 0], value=0)
+detach_1 = .detach(pad)
+mul = operator.mul(detach_1, 2.0)
 return (mul,)
""")

    def test_pad_slice(self):
        k = rand(2, 3, 4, seed=6)
        result, g = self.capture(idioms.pad_then_slice, k, patterns=["pad_slice"])
        torch.testing.assert_close(result, idioms.pad_then_slice(k))
        self.assertEqual(g.report.counts, {"pad_slice": 1})
        self.assertExpectedInline(kvpass.diff(g.before, g.after), """\
--- before
+++ after
@@
 input L_k_
-pad = F.pad(L_k_, (0, 4), 'constant', None)
-getitem = operator.getitem(pad, (..., :4))
-mul = operator.mul(getitem, 3.0)
+mul = operator.mul(L_k_, 3.0)
 return (mul,)
""")

    def test_tensor_buffer_history(self):
        k = rand(2, 3, 4, seed=7)
        buf, eager_buf = rand(2, 16, 4, seed=8), rand(2, 16, 4, seed=8)
        result, g = self.capture(idioms.tensor_buffer_write_read, buf, k, 5, patterns=["buffer_history"])
        torch.testing.assert_close(result, idioms.tensor_buffer_write_read(eager_buf, k, 5))
        torch.testing.assert_close(buf, eager_buf)
        self.assertEqual(g.report.counts, {"buffer_history": 1})
        self.assertExpectedInline(kvpass.diff(g.before, g.after), """\
--- before
+++ after
@@
 input L_buf_
 setitem = operator.setitem(L_buf_, (:, 5:8), L_k_)
-getitem = operator.getitem(L_buf_, (:, :8))
-mul = operator.mul(getitem, 1.0)
+getitem_1 = operator.getitem(L_buf_, (:, 0:5))
+cat = torch.cat([getitem_1, L_k_], 1)
+mul = operator.mul(cat, 1.0)
 return (mul,)
""")

    def test_host_concat(self):
        k = rand(2, 1, 4, seed=10)
        cache, eager_cache = idioms.HostHistory(seed=2), idioms.HostHistory(seed=2)
        result, g = self.capture(idioms.concat_history, cache, k, patterns=["host_concat"])
        torch.testing.assert_close(result, idioms.concat_history(eager_cache, k))
        np.testing.assert_array_equal(cache.k, eager_cache.k)  # the host history is still stored back
        self.assertEqual(g.report.counts, {"host_concat": 1})
        self.assertExpectedInline(kvpass.diff(g.before, g.after), """\
--- before
+++ after
@@
 view_as = .view_as(cpu, cpu)
 concatenate = numpy.concatenate([L_cache_k, view_as], axis=1)
-as_tensor = torch.as_tensor(concatenate)
-to = .to(as_tensor, device(type='cpu'))
-transpose = .transpose(to, -1, -2)
-matmul = operator.matmul(to, transpose)
+cat = torch.cat([L_cache_k, detach], 1)
+transpose = .transpose(cat, -1, -2)
+matmul = operator.matmul(cat, transpose)
 return (matmul, concatenate)
""")

    def test_buffer_history_batched_integer_index(self):
        k = rand(2, 3, 4, seed=11)
        cache, eager_cache = idioms.BatchedHostCache(seed=3), idioms.BatchedHostCache(seed=3)
        result, g = self.capture(idioms.batched_write_read, cache, k, patterns=["buffer_history"])
        torch.testing.assert_close(result, idioms.batched_write_read(eager_cache, k))
        np.testing.assert_array_equal(cache.k, eager_cache.k)
        self.assertEqual(g.report.counts, {"buffer_history": 1})
        self.assertExpectedInline(kvpass.diff(g.before, g.after), """\
--- before
+++ after
@@
 input L_cache_k
 detach = .detach(L_k_)
-cpu = .cpu(detach)
-view_as = .view_as(cpu, cpu)
-setitem = numpy.setitem(L_cache_k, (0, :, 0:3), view_as)
-getitem = numpy.getitem(L_cache_k, (0, :, :3))
-as_tensor = torch.as_tensor(getitem)
-to = .to(as_tensor, device(type='cpu'))
-sum = .sum(to, -1)
+setitem_1 = operator.setitem(L_cache_k, (0, :, 0:3), detach)
+sum = .sum(detach, -1)
 return (sum,)
""")

    def test_buffer_history_one_position_write(self):
        cache, eager_cache = idioms.HostCache(seed=4), idioms.HostCache(seed=4)
        cache.pos = eager_cache.pos = 5  # history already there: the read is cat([buffer[:, 0:5], k])
        k = rand(2, 1, 4, seed=12)
        result, g = self.capture(idioms.one_token_write_read, cache, k, patterns=["buffer_history"])
        torch.testing.assert_close(result, idioms.one_token_write_read(eager_cache, k))
        np.testing.assert_array_equal(cache.k, eager_cache.k)
        self.assertEqual(g.report.counts, {"buffer_history": 1})
        self.assertExpectedInline(kvpass.diff(g.before, g.after), """\
--- before
+++ after
@@
 getitem = operator.getitem(L_k_, (:, 0))
 detach = .detach(getitem)
-cpu = .cpu(detach)
-view_as = .view_as(cpu, cpu)
-setitem = numpy.setitem(L_cache_k, (:, 5), view_as)
-getitem_1 = numpy.getitem(L_cache_k, (:, :6))
-as_tensor = torch.as_tensor(getitem_1)
-to = .to(as_tensor, device(type='cpu'))
-mul = operator.mul(to, 2.0)
+setitem_1 = operator.setitem(L_cache_k, (:, 5), detach)
+unsqueeze = .unsqueeze(detach, 1)
+getitem_2 = operator.getitem(L_cache_k, (:, 0:5))
+cat = torch.cat([getitem_2, unsqueeze], 1)
+mul = operator.mul(cat, 2.0)
 return (mul,)
""")

    def test_aten_level_host_hop(self):
        from torch.fx.experimental.proxy_tensor import make_fx

        def hop(k):
            h = torch.ops.aten._to_copy.default(k, device=torch.device("cpu"))
            back = torch.ops.aten._to_copy.default(h, device=k.device)
            return back * 2.0

        k = rand(2, 3, seed=9)
        gm = make_fx(hop)(k)
        before = copy.deepcopy(gm)
        gm, report = kvpass.rewrite(gm, patterns=["host_hop"])
        self.assertEqual(report.counts, {"host_hop": 1})
        torch.testing.assert_close(gm(k), hop(k))
        self.assertExpectedInline(kvpass.diff(before, gm), """\
--- before
+++ after
@@
 input k_1
-to_copy = aten._to_copy.default(k_1, device=device(type='cpu'))
-to_copy_1 = aten._to_copy.default(to_copy, device=device(type='cpu'))
-mul = aten.mul.Tensor(to_copy_1, 2.0)
+mul = aten.mul.Tensor(k_1, 2.0)
 return mul
""")


if __name__ == "__main__":
    expecttest.run_tests()
