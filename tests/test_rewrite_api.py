"""kvpass.rewrite: argument errors, verify, idempotence, and the cases it must leave alone."""


import pytest
import torch
import torch.fx

import idioms
import kvpass
from kvpass.testing import capture_graphs
from kvpass.tracing import tracing_context


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def dynamo_graph(fn, *args):
    with tracing_context():
        _, graphs = capture_graphs(fn, *args, transform=lambda gm: gm)
    (g,) = graphs
    return g.before, g.example_inputs


def test_unknown_pattern_name_lists_valid_ones():
    gm = torch.fx.symbolic_trace(lambda x: x + 1)
    with pytest.raises(ValueError, match=r"unknown pattern 'nope'; valid names: host_elimination, pad_slice, scatter_slice, store_loop"):
        kvpass.rewrite(gm, patterns=["nope"])
    with pytest.raises(ValueError, match="unknown pattern"):
        kvpass.backend(patterns=["nope"])


def test_non_graph_module_is_a_type_error():
    with pytest.raises(TypeError, match=r"gm: expected a torch.fx.GraphModule, got Linear"):
        kvpass.rewrite(torch.nn.Linear(2, 2))


def test_verify_needs_inputs():
    gm = torch.fx.symbolic_trace(lambda x: x + 1)
    with pytest.raises(ValueError, match="example_inputs"):
        kvpass.rewrite(gm, verify=True)


class WrongPattern:
    """Deliberately wrong: turns every multiplication into an addition."""

    name = "wrong"

    def apply(self, gm, report):
        n = 0
        for node in gm.graph.nodes:
            if node.op == "call_function" and node.target is torch.ops.aten.mul.Tensor:
                node.target = torch.ops.aten.add.Tensor
                report.add_match(self.name, [node])
                n += 1
        return n


def test_verify_catches_a_wrong_rewrite():
    gm = torch.fx.symbolic_trace(lambda x: torch.mul(x, 3.0))
    with pytest.raises(kvpass.RewriteMismatch, match=r"max abs difference .* patterns that matched: wrong"):
        kvpass.rewrite(gm, patterns=[WrongPattern()], example_inputs=[rand(4)], verify=True)


def test_verify_passes_a_right_rewrite_and_graph_still_writes_the_cache():
    k = rand(2, 3, 4, seed=1)
    cache = idioms.HostCache(seed=2)
    gm, inputs = dynamo_graph(idioms.write_then_read, cache, k)
    gm2, report = kvpass.rewrite(gm, example_inputs=inputs, verify=True)
    assert report.counts["scatter_slice"] == 2  # hist and hist.transpose: two reads of the write
    assert report.before is not None and kvpass.ir.is_aten_graph(gm2) and kvpass.ir.is_aten_graph(report.before)


def test_rewriting_twice_changes_nothing_the_second_time():
    cache = idioms.HostCache(d=8, seed=3)
    gm, _ = dynamo_graph(idioms.padded_write_read, cache, rand(2, 3, 4, seed=4))
    gm, first = kvpass.rewrite(gm)
    once = kvpass.graph_text(gm)
    gm, second = kvpass.rewrite(gm)
    assert first.matches and not second.matches and not second.skips
    assert kvpass.graph_text(gm) == once


@pytest.mark.parametrize("fn", [idioms.mutated_between, idioms.dtype_change])
def test_unsafe_hops_stay_exact(fn):
    """A host copy edited before the rebuild, a dtype change on the host: no cache, nothing to rewrite."""
    k = rand(2, 3, 4, seed=5)
    gm, inputs = dynamo_graph(fn, k)
    gm, report = kvpass.rewrite(gm, example_inputs=inputs, verify=True)
    assert not report.matches and not report.skips
    torch.testing.assert_close(gm(*inputs)[0], fn(k), rtol=0, atol=0)


def test_rebuilt_tensor_mutated_in_place_writes_through_like_eager():
    def fn(k):
        back = torch.from_numpy(k.detach().cpu().numpy()).to(k.device)
        back.mul_(2.0)  # on a CPU every step of the hop aliases k: this doubles k
        return back + k

    k = rand(2, 3, seed=7)
    gm, inputs = dynamo_graph(fn, k.clone())
    gm, report = kvpass.rewrite(gm, example_inputs=[k.clone()], verify=True)
    assert not report.matches
    eager_k, graph_k = k.clone(), k.clone()
    want = fn(eager_k)  # on a CPU, back aliases k: mul_ doubles k itself
    torch.testing.assert_close(gm(graph_k)[0], want, rtol=0, atol=0)
    torch.testing.assert_close(graph_k, eager_k, rtol=0, atol=0)  # the graph writes k back (copy_ epilogue)


def test_non_kv_round_trip_of_a_mask_is_exact():
    scores = rand(3, 3, seed=8)
    gm, inputs = dynamo_graph(idioms.mask_round_trip, scores)
    gm, report = kvpass.rewrite(gm, example_inputs=inputs, verify=True)  # exact or unchanged, never approximate
    torch.testing.assert_close(gm(*inputs)[0], idioms.mask_round_trip(scores))


def test_read_without_prior_write_is_not_history():
    def fn(cache, k):
        hist = torch.from_numpy(cache.k[:, :4]).to(k.device)
        return hist.sum() + k.sum()

    gm, _ = dynamo_graph(fn, idioms.HostCache(seed=4), rand(2, 3, 4, seed=10))
    _, report = kvpass.rewrite(gm, patterns=["scatter_slice"])
    assert report.counts["scatter_slice"] == 0 and not report.skips


def test_torch_level_graph_is_functionalized_and_aten_graph_rewritten_in_place():
    gm = torch.fx.symbolic_trace(lambda x: x + 1)
    with pytest.raises(ValueError, match=r"example_inputs: graph input 'x' has no traced value"):
        kvpass.rewrite(gm)
    out, report = kvpass.rewrite(gm, example_inputs=[rand(3)])
    assert out is not gm and kvpass.ir.is_aten_graph(out) and report.counts and not report.matches
    torch.testing.assert_close(out(rand(3, seed=1)), rand(3, seed=1) + 1)  # same call, same structure
    again, _ = kvpass.rewrite(out)
    assert again is out
