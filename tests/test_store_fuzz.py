"""Store ops on large random valid batches against the per-token reference (``kvpass.ops.reference``).

Random rows (contexts from padding ``-1`` to past block edges, zero-length rows, decode or prefill), block sizes,
tables narrower than the rows need and ``-1`` holes, both layouts, three dtypes; caches poisoned with random
values, so any slot written that should not be (or missed) shows. Both addressing modes (block table, and the same
stores as chunk metadata) and ``store_paged_single`` are checked. Fixed seed; ``KVPASS_FUZZ_SCALE`` and
``KVPASS_FUZZ_SEED`` as for tests/test_fuzz_rewrite.py."""

import torch
from hypothesis import given
from hypothesis import strategies as st

import fuzz_decoders as fd
from kvpass.ops import store_paged_kv, store_paged_single
from kvpass.ops.reference import reference_store
from test_store_ops import Spec, build, chunks_of, expected_writes, written_slots


@st.composite
def specs(draw):
    rows = draw(st.integers(1, 8))
    bs = draw(st.sampled_from([1, 2, 4, 8, 16, 32, 64]))
    decode = draw(st.booleans())
    ctx_values = st.one_of(st.just(-1), st.just(0), st.integers(0, 700),
                           st.sampled_from([bs - 1, bs, bs + 1, 2 * bs - 1, 511, 512]))
    ctx = draw(st.lists(ctx_values, min_size=rows, max_size=rows))
    q = [1] * rows if decode else draw(st.lists(st.integers(0, 1000), min_size=rows, max_size=rows))
    need = max(((max(c, 0) + n + bs - 1) // bs) if c >= 0 else 1 for c, n in zip(ctx, q))
    width = draw(st.one_of(st.none(), st.integers(1, max(1, need))))  # narrower: tokens past the table skipped
    w = width or need
    holes = tuple(draw(st.sets(st.tuples(st.integers(0, rows - 1), st.integers(0, w - 1)), max_size=4)))
    return Spec(ctx, q, heads=draw(st.integers(1, 4)), head_dim=draw(st.sampled_from([1, 3, 8, 64])), block_size=bs,
                decode=decode, width=width, holes=holes, spare_blocks=draw(st.integers(0, 4)))


@fd.fuzz(200)
@given(spec=specs(), dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
       layout=st.sampled_from(["HND", "NHD"]), seed=st.integers(0, 2**16))
def test_random_batches_match_the_per_token_reference(spec, dtype, layout, seed):
    case = build(spec, dtype, layout, seed=seed)
    kc, vc = case.caches()
    store_paged_kv(case.key, case.value, kc, vc, *case.index, layout=layout)
    want_k = reference_store(case.key, case.key_cache, *case.index, layout=layout)
    want_v = reference_store(case.value, case.value_cache, *case.index, layout=layout)
    assert torch.equal(kc, want_k) and torch.equal(vc, want_v)
    if dtype == torch.float32 and spec.heads * spec.head_dim >= 3:  # else a poison value may equal a written one
        assert written_slots(case.key_cache, kc, layout) == expected_writes(case)
    single = case.key_cache.clone()
    store_paged_single(case.key, single, *case.index, layout=layout)
    assert torch.equal(single, kc)
    chunks = chunks_of(case, seed=seed)
    ck, cv = case.caches()
    store_paged_kv(case.key, case.value, ck, cv, chunk_metadata=chunks, layout=layout)
    assert torch.equal(ck, kc) and torch.equal(cv, vc)
    fd.COUNTS["store batches"] += 1
    fd.COUNTS["store tokens"] += case.key.shape[0]
