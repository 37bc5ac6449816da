"""One golden graph diff per rule, like for like: ``kvpass.diff(report.before, after)`` compares the functional
ATen graph before and after the rules (expecttest; regenerate with EXPECTTEST_ACCEPT=1 and read the diff first).
Each case is also checked numerically against eager on fresh random inputs, cache contents included."""

import expecttest
import numpy as np
import torch

import idioms
import kvpass
from kvpass.testing import buffer_reads, capture_graphs
from kvpass.tracing import tracing_context


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


class TestRuleGoldens(expecttest.TestCase):
    def capture(self, fn, *args, patterns=None):
        def transform(gm):
            return kvpass.rewrite(gm, patterns=patterns)

        with tracing_context():
            result, graphs = capture_graphs(fn, *args, transform=transform)
        self.assertEqual(len(graphs), 1)
        return result, graphs[0]

    def check_cache(self, fn, make_cache, *args, patterns=None):
        """Run ``fn`` eagerly and through the rewrite on equal caches: same result, same cache afterwards."""
        eager_cache, cache = make_cache(), make_cache()
        result, g = self.capture(fn, cache, *args, patterns=patterns)
        torch.testing.assert_close(result, fn(eager_cache, *args), rtol=0, atol=0)
        np.testing.assert_array_equal(cache.k, eager_cache.k)  # the write still happened
        self.assertEqual(buffer_reads(g.after), [])
        return g

    def test_scatter_slice_owner_write_then_read(self):
        g = self.check_cache(idioms.write_then_read, lambda: idioms.HostCache(seed=5), rand(2, 3, 4, seed=1))
        self.assertEqual(g.report.counts["scatter_slice"], 2)  # hist and hist.transpose: two reads
        self.assertIn("cache.k[:, cache.pos : cache.pos + t] = k.detach().cpu().numpy()", g.report.matches[0].source)
        self.assertExpectedInline(kvpass.diff(g.report.before, g.after), """\
--- before
+++ after
@@
 copy = aten.copy.default(slice, view)
 slice_scatter = aten.slice_scatter.default(arg1_1, copy, 1, 0, 3)
-slice_1 = aten.slice.Tensor(slice_scatter, 1, 0, 3)
-expand = aten.expand.default(slice_1, [2, 3, 4])
+expand = aten.expand.default(view, [2, 3, 4])
 view_1 = aten.view.default(expand, [2, 3, 4])
-slice_2 = aten.slice.Tensor(slice_scatter, 1, 0, 3)
-transpose = aten.transpose.int(slice_2, -1, -2)
+transpose = aten.transpose.int(view, -1, -2)
 expand_1 = aten.expand.default(transpose, [2, 4, 3])
 view_2 = aten.view.default(expand_1, [2, 4, 3])
""")

    def test_scatter_slice_shared_follower_last_writer_wins(self):
        k, kf = rand(2, 3, 4, seed=2), rand(2, 3, 4, seed=3)
        g = self.check_cache(idioms.shared_write_read, lambda: idioms.HostCache(seed=6), k, kf)
        self.assertExpectedInline(kvpass.diff(g.report.before, g.after), """\
--- before
+++ after
@@
 detach_1 = aten.detach.default(arg2_1)
 view_1 = aten.view.default(detach_1, [2, 3, 4])
-slice_1 = aten.slice.Tensor(slice_scatter, 1, 0, 3)
-copy_1 = aten.copy.default(slice_1, view_1)
+copy_1 = aten.copy.default(view, view_1)
 slice_scatter_1 = aten.slice_scatter.default(slice_scatter, copy_1, 1, 0, 3)
-slice_2 = aten.slice.Tensor(slice_scatter_1, 1, 0, 3)
-mul = aten.mul.Tensor(slice_2, 1.0)
+mul = aten.mul.Tensor(view_1, 1.0)
 copy_2 = aten.copy_.default(arg1_1, slice_scatter_1)
 return (mul,)
""")

    def test_scatter_slice_batched_integer_index(self):
        g = self.check_cache(idioms.batched_write_read, lambda: idioms.BatchedHostCache(seed=7), rand(2, 3, 4, seed=4))
        self.assertExpectedInline(kvpass.diff(g.report.before, g.after), """\
--- before
+++ after
@@
 slice_scatter = aten.slice_scatter.default(select_1, copy, 1, 0, 3)
 select_scatter = aten.select_scatter.default(arg1_1, slice_scatter, 0, 0)
-select_2 = aten.select.int(select_scatter, 0, 0)
-slice_1 = aten.slice.Tensor(select_2, 1, 0, 3)
-sum = aten.sum.dim_IntList(slice_1, [-1])
+sum = aten.sum.dim_IntList(view, [-1])
 copy_1 = aten.copy_.default(arg1_1, select_scatter)
 return (sum,)
""")

    def test_scatter_slice_one_position_write(self):
        g = self.check_cache(idioms.one_token_write_read, lambda: idioms.HostCache(seed=8), rand(2, 1, 4, seed=5))
        self.assertExpectedInline(kvpass.diff(g.report.before, g.after), """\
--- before
+++ after
@@
 copy = aten.copy.default(select_1, view)
 select_scatter = aten.select_scatter.default(arg1_1, copy, 1, 0)
-slice = aten.slice.Tensor(select_scatter, 1, 0, 1)
-mul = aten.mul.Tensor(slice, 2.0)
+unsqueeze = aten.unsqueeze.default(view, 1)
+mul = aten.mul.Tensor(unsqueeze, 2.0)
 copy_1 = aten.copy_.default(arg1_1, select_scatter)
 return (mul,)
""")

    def test_scatter_slice_history_read_before_the_write(self):
        def cache():
            c = idioms.HostCache(seed=9)
            c.pos = 5
            return c

        g = self.check_cache(idioms.history_before_write, cache, rand(2, 3, 4, seed=6))
        self.assertExpectedInline(kvpass.diff(g.report.before, g.after), """""")

    def test_pad_slice_padded_follower_np_pad(self):
        g = self.check_cache(idioms.padded_write_read, lambda: idioms.HostCache(d=8, seed=10), rand(2, 3, 4, seed=7))
        self.assertEqual(g.report.counts["pad_slice"], 1)
        self.assertExpectedInline(kvpass.diff(g.report.before, g.after), """\
--- before
+++ after
@@
 copy = aten.copy.default(slice, constant_pad_nd)
 slice_scatter = aten.slice_scatter.default(arg1_1, copy, 1, 0, 3)
-slice_1 = aten.slice.Tensor(slice_scatter, 1, 0, 3)
-slice_2 = aten.slice.Tensor(slice_1, 2, 0, 4)
-mul = aten.mul.Tensor(slice_2, 1.5)
+mul = aten.mul.Tensor(view, 1.5)
 copy_1 = aten.copy_.default(arg1_1, slice_scatter)
 return (mul,)
""")

    def test_pad_slice_on_device(self):
        k = rand(2, 3, 4, seed=8)
        result, g = self.capture(idioms.pad_then_slice, k)
        torch.testing.assert_close(result, idioms.pad_then_slice(k), rtol=0, atol=0)
        self.assertEqual(g.report.counts["pad_slice"], 1)
        self.assertExpectedInline(kvpass.diff(g.report.before, g.after), """\
--- before
+++ after
@@
 input arg0_1
-constant_pad_nd = aten.constant_pad_nd.default(arg0_1, [0, 4], 0.0)
-slice = aten.slice.Tensor(constant_pad_nd, 2, 0, 4)
-mul = aten.mul.Tensor(slice, 3.0)
+mul = aten.mul.Tensor(arg0_1, 3.0)
 return (mul,)
""")

    def test_zeros_assign_and_concatenate_padding_are_already_functional(self):
        """No cache: the padding is a functional ``slice_scatter`` into zeros (or a ``cat``), nothing to do."""
        for fn in (idioms.zeros_assign_pad, idioms.concatenate_pad):
            k = rand(2, 3, 4, seed=9)
            result, g = self.capture(fn, k)
            torch.testing.assert_close(result, fn(k), rtol=0, atol=0)
            self.assertFalse(g.report.matches or g.report.skips)


if __name__ == "__main__":
    from torch.testing._internal.common_utils import run_tests

    run_tests()
