"""kvpass.diff / graph_text: stable, path-free text for golden graph diffs."""

import copy

import expecttest
import torch
import torch.fx

import kvpass
from kvpass.testing import capture_graphs


def relu_to_gelu(gm: torch.fx.GraphModule):
    """A trivial rewrite for the golden test: relu -> gelu."""
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is torch.relu:
            node.target = torch.nn.functional.gelu
    gm.recompile()
    return gm


def f(x, w):
    h = torch.relu(x @ w)
    return h.sum(-1) + 1.0


class TestDiff(expecttest.TestCase):
    def test_golden_diff_of_a_trivial_rewrite(self):
        g = torch.Generator().manual_seed(0)
        x, w = torch.randn(3, 4, generator=g), torch.randn(4, 5, generator=g)
        result, graphs = capture_graphs(f, x, w, transform=relu_to_gelu)
        self.assertEqual(len(graphs), 1)
        torch.testing.assert_close(result, torch.nn.functional.gelu(x @ w).sum(-1) + 1.0)
        self.assertExpectedInline(kvpass.diff(graphs[0].before, graphs[0].after), """\
--- before
+++ after
@@
 input L_w_
 matmul = operator.matmul(L_x_, L_w_)
-relu = torch.relu(matmul)
+relu = F.gelu(matmul)
 sum = .sum(relu, -1)
 add = operator.add(sum, 1.0)
""")

    def test_identical_graphs_give_empty_diff(self):
        gm = torch.fx.symbolic_trace(f)
        self.assertEqual(kvpass.diff(gm, copy.deepcopy(gm)), "")

    def test_names_do_not_depend_on_creation_order(self):
        # Same computation, nodes created with different names: same text.
        a = torch.fx.symbolic_trace(f)
        b = copy.deepcopy(a)
        for i, node in enumerate(b.graph.nodes):
            if node.op not in ("placeholder", "output"):
                node.name = f"zz_weird_{i}"
        b.recompile()
        self.assertEqual(kvpass.graph_text(a), kvpass.graph_text(b))
        self.assertNotIn("zz_weird", kvpass.graph_text(b))

    def test_text_has_no_paths_line_numbers_or_trailing_spaces(self):
        _, graphs = capture_graphs(f, torch.randn(3, 4), torch.randn(4, 5), transform=lambda gm: gm)
        text = kvpass.graph_text(graphs[0].before)
        self.assertNotIn(".py", text)
        self.assertNotIn("File ", text)
        for line in text.splitlines():
            self.assertEqual(line, line.rstrip())

    def test_accepts_exported_program(self):
        class M(torch.nn.Module):
            def forward(self, x):
                return torch.relu(x) * 2

        ep = torch.export.export(M(), (torch.randn(2, 3),))
        text = kvpass.graph_text(ep)
        self.assertIn("aten.relu.default", text)

    def test_rejects_other_objects(self):
        with self.assertRaisesRegex(TypeError, "expected a GraphModule, Graph or ExportedProgram, got int"):
            kvpass.diff(1, 2)


if __name__ == "__main__":
    expecttest.run_tests()
