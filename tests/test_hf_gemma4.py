"""Hugging Face Gemma4 (tiny random config, static cache): kvpass changes nothing and reports nothing."""

import pytest
import torch

import kvpass
from kvpass.examples.hf_gemma4 import greedy

STEPS = 16


def prompt(seed):
    return torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(seed))


def counting():
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    return backend, graphs


def test_config_is_the_interesting_one(gemma4):
    c = gemma4.config
    head_dims = {layer.self_attn.head_dim for layer in gemma4.model.layers}
    assert c.num_kv_shared_layers > 0 and c.attention_k_eq_v and head_dims == {8, 16}  # global_head_dim != head_dim


@pytest.mark.slow
def test_report_is_empty_and_graph_count_no_greater_than_stock(gemma4):
    p = prompt(1)
    want = greedy(gemma4, gemma4.forward, p, STEPS)
    torch._dynamo.reset()
    inner, kv_graphs = counting()
    reports = []
    got = greedy(gemma4, torch.compile(gemma4.forward, backend=kvpass.backend(inner=inner, on_report=reports.append)),
                 p, STEPS)
    torch._dynamo.reset()
    stock, stock_graphs = counting()
    greedy(gemma4, torch.compile(gemma4.forward, backend=stock), p, STEPS)
    assert got == want
    assert reports and all(not r.matches and not r.skips for r in reports)
    assert len(kv_graphs) <= len(stock_graphs)


@pytest.mark.slow
def test_greedy_tokens_identical_with_backend_kvpass(gemma4):
    """The full backend (Inductor, with kvpass's ATen pass inside): same 16 greedy tokens, empty reports."""
    p = prompt(2)
    want = greedy(gemma4, gemma4.forward, p, STEPS)
    assert len(set(want)) > 1, "degenerate generation"
    torch._dynamo.reset()
    reports, graphs, kv = [], [], kvpass.backend(on_report=lambda r: reports.append(r))

    def count_graphs(gm, example_inputs):
        graphs.append(gm)
        return kv(gm, example_inputs)

    got = greedy(gemma4, torch.compile(gemma4.forward, backend=count_graphs), p, STEPS)
    assert got == want
    # one (empty) report per compiled graph, as with an eager inner: Inductor does not swallow empty reports
    assert graphs and len(reports) == len(graphs)
    assert all(not r.matches and not r.skips for r in reports)
