"""Differential fuzzing of growing and evicting host caches created by the model (``fuzz_decoders``' growing-cache
block): eager vs ``kvpass.compile`` (eager inner), fresh random inputs, graph count within ``growing_budget``."""

import warnings

import pytest
import torch
from hypothesis import given

import fuzz_decoders as fd
import kvpass

GROWING_CASES = 24


@fd.fuzz(GROWING_CASES)
@given(fd.growing_cases())
def _fuzz_growing(case):
    steps = fd.growing_steps(case)
    want = fd.run_steps(fd.GrowingModel(case), steps)
    graphs = []
    kb = kvpass.backend(inner="eager")

    def front(gm, example_inputs, **kw):
        graphs.append(gm)
        return kb(gm, example_inputs, **kw)

    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = fd.run_steps(kvpass.compile(fd.GrowingModel(case), backend=front), steps)
    for i, (g, w) in enumerate(zip(got, want)):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5, msg=lambda m: f"{case.short()}\nstep {i}: {m}")
    assert len(graphs) <= fd.growing_budget(case), f"{case.short()}: {len(graphs)} graphs"
    fd.COUNTS["growing cases"] += 1


@pytest.mark.slow
def test_generated_growing_caches_match_eager_within_budget():
    before = fd.COUNTS["growing cases"]
    _fuzz_growing()
    assert fd.COUNTS["growing cases"] - before >= round(GROWING_CASES * fd.SCALE) * 0.9
