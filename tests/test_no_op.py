"""No false rewrites: on graphs with no host round trip the rules leave the functional graph identical
(``report.before`` vs the result) and the report empty (no match, no skip). Random small models (``fuzz_decoders`` with device caches), Hugging Face Gemma4 (shared KV,
no round trip), and a model from transformers with no KV cache at all (BERT, tiny random config)."""

import pytest
import torch
from hypothesis import given

import fuzz_decoders as fd
import kvpass
from kvpass.tracing import tracing_context


def unchanged_backend(texts):
    """A backend that rewrites each graph and records its text before and after, and the report."""
    def backend(gm, example_inputs):
        gm, report = kvpass.rewrite(gm)
        texts.append((kvpass.graph_text(report.before), kvpass.graph_text(gm), report))
        return gm.forward
    return backend


def assert_no_op(texts):
    assert texts, "nothing was compiled"
    for before, after, report in texts:
        assert after == before
        assert not report.matches and not report.skips, report.format()


@pytest.mark.slow
@fd.fuzz(8)
@given(fd.cases(max_layers=4, max_decode=2, round_trips=False))
def test_random_models_without_round_trips_are_left_identical(case):
    steps = fd.token_steps(case)
    want = fd.run_steps(fd.build(case), steps)
    texts = []
    torch._dynamo.reset()
    with tracing_context():
        got = fd.run_steps(torch.compile(fd.build(case), backend=unchanged_backend(texts)), steps)
    for g, w in zip(got, want):  # the functional graph decomposes attention: its own rounding
        torch.testing.assert_close(g, w, **fd_tolerance(case))
    assert_no_op(texts)
    fd.COUNTS["no-op cases"] += 1


def fd_tolerance(case):
    return dict(rtol=1e-3, atol=1e-3) if case.dtype == torch.float16 else dict(rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_hf_gemma4_is_left_identical(gemma4):
    from kvpass.examples.hf_gemma4 import greedy

    prompt = torch.randint(0, 128, (1, 5), generator=torch.Generator().manual_seed(3))
    want = greedy(gemma4, gemma4.forward, prompt, 3)
    texts = []
    torch._dynamo.reset()
    got = greedy(gemma4, torch.compile(gemma4.forward, backend=unchanged_backend(texts)), prompt, 3)
    assert got == want
    assert_no_op(texts)


def test_transformers_model_without_kv_cache_is_left_identical():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=48, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval()
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = model(input_ids=ids).last_hidden_state
        texts = []
        torch._dynamo.reset()
        got = torch.compile(model, backend=unchanged_backend(texts))(input_ids=ids).last_hidden_state
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert want.abs().max() > 0.1
    assert_no_op(texts)
