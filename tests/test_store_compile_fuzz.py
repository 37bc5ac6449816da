"""Compiled-vs-eager fuzz of the paged store through Inductor (issue 13, section 1).

Hypothesis draws a bucket of ``tests/store_random.py`` (fixed shapes, so each bucket compiles once) and a seed
for its data: padding rows, zero-length rows, tokens of no row, tokens past the table, ``-1`` holes, blocks
shared between rows (colliding targets: the last token wins), chunk metadata with skipped and overlapping chunks,
slot mappings shorter than the states with negative and repeated slots, a cache smaller than the batch,
int8 and fp8 caches through per-tensor and per-head scales; HND and NHD; fp32, fp16, bf16 states;
``store_paged_kv`` and ``store_paged_single``.
Compiled, eager and the per-token reference must agree exactly. Bounded time: 7 compiles plus 60 batches
(``KVPASS_FUZZ_SCALE`` / ``KVPASS_FUZZ_SEED`` as for the other fuzz suites). The same buckets run under every
vector ISA in ``tests/test_store_isa.py``.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import fuzz_decoders as fd
from store_random import BUCKETS, check, draw, store_fn

_COMPILED: dict = {}


@pytest.fixture(autouse=True, scope="module")
def _fresh_inductor():
    with torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        yield


@pytest.mark.slow
@fd.fuzz(60)
@given(bucket=st.sampled_from([b.name for b in BUCKETS]), seed=st.integers(0, 2**31 - 1))
def test_compiled_store_matches_eager_and_reference(bucket, seed):
    b = next(x for x in BUCKETS if x.name == bucket)
    if bucket not in _COMPILED:
        _COMPILED[bucket] = torch.compile(store_fn(b), fullgraph=True, dynamic=False)
    msg = check(draw(b, seed), _COMPILED[bucket])
    assert msg is None, f"{bucket} seed {seed}: {msg}"
    fd.COUNTS["compiled store batches"] += 1
