"""Eager paged store ops against a plain per-token reference (issue 5, DESIGN section 5).

The sweep follows the upstream accuracy tests: batch 1, 2, 3, 8; kv_heads 1 to 8; head_dim 64, 128, 256; block
sizes 8 to 2048; contexts at block edges (511, 1023, 2047); long prefills (788, 977); padding rows; decode;
bucket-padded batches; tokens past the table width; ``-1`` holes; fp32, fp16, bf16; both cache layouts; both
addressing modes. Caches are poisoned with random values, so a slot that should not be written but is, or should
be but is not, shows as a difference from the reference (which starts from the same poisoned cache).
"""

from __future__ import annotations

import dataclasses
import random
import zlib

import pytest
import torch

import kvpass
from kvpass.errors import KVPassError
from kvpass.ops import (
    PagedStoreError, PagedStoreTypeError, PagedStoreValueError, store_paged_kv, store_paged_single,
)
from kvpass.ops.reference import reference_store

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LAYOUTS = ["HND", "NHD"]


# ----------------------------------------------------------------------------------------------------------
# Case construction
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Spec:
    """One scenario: rows' contexts and new-token counts, geometry, and table quirks."""

    ctx: list
    q: list
    heads: int
    head_dim: int
    block_size: int
    decode: bool = False
    width: int | None = None  # table width; None: exactly what the rows need
    holes: tuple = ()  # (row, logical block) entries set to -1
    extra_tokens: int = 0  # tokens after cu_q_lens[-1] that belong to no row
    cu: list | None = None  # explicit cu_q_lens (bucket padding)
    spare_blocks: int = 3


SPECS = {
    "b1_prefill_h1_d64": Spec([0], [40], 1, 64, 16),
    "b2_edges_bs512_h2_d128": Spec([511, 1023], [2, 3], 2, 128, 512),
    "b3_edge2047_bs2048_h1_d64": Spec([2047, 0, 5], [2, 1, 1], 1, 64, 2048),
    "b8_decode_h8_d128": Spec([15, 16, 0, 31, 32, 1, 47, 5], [1] * 8, 8, 128, 16, decode=True),
    "b2_long_prefill_788_977_h2_d256": Spec([0, 100], [788, 977], 2, 256, 64),
    "padding_rows_32_-1_35": Spec([32, -1, 35], [1, 1, 1], 3, 64, 16),
    "padding_rows_0_-1_5_q402": Spec([0, -1, 5], [4, 0, 2], 4, 64, 16),
    "bucket_padded_bs8": Spec([0, 2, 7, 9, -1, -1], [1, 1, 1, 1, 0, 0], 2, 64, 8,
                              cu=[0, 1, 2, 3, 4, 4, 4], extra_tokens=2),
    "decode_padding_rows": Spec([3, -1, 8, -1], [1] * 4, 5, 64, 4, decode=True),
    "past_table_width": Spec([10, 0], [30, 20], 6, 64, 16, width=2),
    "holes_in_table": Spec([5, 0], [40, 9], 7, 64, 16, holes=((0, 1), (1, 0))),
    "b8_prefill_mixed_edges_bs32": Spec([511, 1023, 2047, 0, 31, 32, -1, 7], [3, 9, 1, 33, 1, 0, 2, 17], 8, 128, 32),
}


@dataclasses.dataclass
class Case:
    key: torch.Tensor
    value: torch.Tensor
    key_cache: torch.Tensor
    value_cache: torch.Tensor
    block_table: torch.Tensor
    cu_q_lens: torch.Tensor | None
    context_kv_lens: torch.Tensor
    layout: str

    @property
    def index(self):
        return self.block_table, self.cu_q_lens, self.context_kv_lens

    def caches(self):
        """Fresh copies of the poisoned caches."""
        return self.key_cache.clone(), self.value_cache.clone()


def build(spec: Spec, dtype=torch.float32, layout="HND", seed=0, device="cpu") -> Case:
    """Random states, randomly poisoned caches and a shuffled block table for ``spec``."""
    g = torch.Generator().manual_seed(seed)
    rows, bs = len(spec.ctx), spec.block_size
    need = [((max(c, 0) + n + bs - 1) // bs) if c >= 0 else 1 for c, n in zip(spec.ctx, spec.q)]
    width = spec.width or max(need)
    num_blocks = rows * width + spec.spare_blocks
    perm = torch.randperm(num_blocks, generator=g)[: rows * width].reshape(rows, width)
    table = perm.clone()
    for b in range(rows):
        table[b, need[b]:] = -1  # unused entries; a padding row keeps a real block: only ctx = -1 skips it
    for b, j in spec.holes:
        table[b, j] = -1
    if spec.cu is not None:
        cu = torch.tensor(spec.cu)
    else:
        cu = torch.zeros(rows + 1, dtype=torch.int64)
        cu[1:] = torch.tensor(spec.q).cumsum(0)
    tokens = int(cu[-1]) + spec.extra_tokens
    h, d = spec.heads, spec.head_dim
    shape = (num_blocks, h, bs, d) if layout == "HND" else (num_blocks, bs, h, d)

    def rnd(*s):
        return torch.randn(*s, generator=g).to(dtype).to(device)

    return Case(
        key=rnd(tokens, h, d), value=rnd(tokens, h, d), key_cache=rnd(*shape), value_cache=rnd(*shape),
        block_table=table.to(torch.int32).to(device),
        cu_q_lens=None if spec.decode else cu.to(torch.int32).to(device),
        context_kv_lens=torch.tensor(spec.ctx, dtype=torch.int32).to(device), layout=layout,
    )


def chunks_of(case: Case, seed=0, extras=True) -> torch.Tensor:
    """The block-table addressing of ``case`` as chunk metadata (runs within one block), shuffled, plus a
    skipped ``-1`` chunk and a zero-length chunk when ``extras``."""
    bs = case.key_cache.shape[2] if case.layout == "HND" else case.key_cache.shape[1]
    table, ctx = case.block_table.tolist(), case.context_kv_lens.tolist()
    cu = case.cu_q_lens.tolist() if case.cu_q_lens is not None else list(range(len(ctx) + 1))
    out = []
    for b, c in enumerate(ctx):
        if c < 0:
            continue
        t = cu[b]
        while t < cu[b + 1]:
            p = c + t - cu[b]
            j, off = divmod(p, bs)
            n = min(cu[b + 1] - t, bs - off)
            if j < len(table[b]) and table[b][j] >= 0:
                out.append([t, table[b][j], off, n])
            t += n
    if extras:
        out.append([0, -1, 0, 1])  # a skipped chunk (its token is also stored by another chunk: allowed)
        out.append([0, 0, 0, 0])  # zero length
    random.Random(seed).shuffle(out)
    return torch.tensor(out, dtype=torch.int32).reshape(-1, 4).to(case.key.device)


def written_slots(cache_before: torch.Tensor, cache_after: torch.Tensor, layout: str) -> int:
    """How many (block, offset) slots differ (random poison makes an accidental equality vanishingly rare)."""
    diff = (cache_before != cache_after).reshape(cache_before.shape[0], *cache_before.shape[1:3], -1).any(-1)
    return int(diff.any(1 if layout == "HND" else 2).sum())


def expected_writes(case: Case) -> int:
    """The number of tokens the semantics stores for ``case`` (counted from the metadata alone)."""
    bs = case.key_cache.shape[2] if case.layout == "HND" else case.key_cache.shape[1]
    table, ctx = case.block_table.tolist(), case.context_kv_lens.tolist()
    cu = case.cu_q_lens.tolist() if case.cu_q_lens is not None else list(range(len(ctx) + 1))
    return sum(1 for b, c in enumerate(ctx) if c >= 0 for p in range(c, c + cu[b + 1] - cu[b])
               if p // bs < len(table[b]) and table[b][p // bs] >= 0)


# ----------------------------------------------------------------------------------------------------------
# The differential sweep
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", list(SPECS))
def test_block_table_matches_per_token_reference(name, layout, dtype):
    case = build(SPECS[name], dtype, layout, seed=zlib.crc32(name.encode()))
    ref_k = reference_store(case.key, case.key_cache, *case.index, layout=layout)
    ref_v = reference_store(case.value, case.value_cache, *case.index, layout=layout)
    assert written_slots(case.key_cache, ref_k, layout) == expected_writes(case) > 0

    kc, vc = case.caches()
    out = store_paged_kv(case.key, case.value, kc, vc, *case.index, layout=layout)
    assert out[0] is kc and out[1] is vc
    assert torch.equal(kc, ref_k), "store_paged_kv: key cache differs from the per-token reference"
    assert torch.equal(vc, ref_v), "store_paged_kv: value cache differs from the per-token reference"

    single = case.key_cache.clone()
    assert store_paged_single(case.key, single, *case.index, layout=layout) is single
    assert torch.equal(single, kc), "store_paged_single differs from the K half of store_paged_kv"
    single_v = case.value_cache.clone()
    torch.ops.kvpass.store_paged_single(case.value, single_v, *case.index, layout=layout)
    assert torch.equal(single_v, vc)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", ["b1_prefill_h1_d64", "b2_long_prefill_788_977_h2_d256", "padding_rows_0_-1_5_q402",
                                  "bucket_padded_bs8", "b8_decode_h8_d128", "holes_in_table"])
def test_chunk_metadata_matches_reference_and_block_table(name, layout):
    case = build(SPECS[name], torch.float32, layout, seed=7)
    chunks = chunks_of(case, seed=3)
    ref = reference_store(case.key, case.key_cache, chunk_metadata=chunks, layout=layout)
    assert torch.equal(ref, reference_store(case.key, case.key_cache, *case.index, layout=layout))
    kc, vc = case.caches()
    store_paged_kv(case.key, case.value, kc, vc, chunk_metadata=chunks, layout=layout)
    assert torch.equal(kc, ref)
    assert torch.equal(vc, reference_store(case.value, case.value_cache, chunk_metadata=chunks, layout=layout))
    single = case.key_cache.clone()
    store_paged_single(case.key, single, chunk_metadata=chunks, layout=layout)
    assert torch.equal(single, kc)
    assert written_slots(case.key_cache, kc, layout) > 0


def test_chunks_reading_arbitrary_tokens():
    """Chunks copy any token range to any offset (not only a block-table plan), in any order; a row whose
    dst_block is -1 is skipped whatever its other columns hold."""
    g = torch.Generator().manual_seed(11)
    states = torch.randn(20, 3, 32, generator=g)
    cache = torch.randn(6, 3, 8, 32, generator=g)
    chunks = torch.tensor([[12, 4, 5, 3], [0, 1, 0, 8], [8, 1, 0, 2], [15, -1, 0, 5], [10, 5, 7, 1],
                           [-1, -1, -1, -1]], dtype=torch.int32)  # the last row is bucket padding
    out = cache.clone()
    store_paged_single(states, out, chunk_metadata=chunks)
    assert torch.equal(out, reference_store(states, cache, chunk_metadata=chunks))
    assert torch.equal(out[4, :, 5:8], states[12:15].transpose(0, 1))


def test_disjoint_views_of_one_kv_buffer():
    """K and V as two views of one (2, ...) allocation, and FlashInfer-style interleaved (NB, 2, ...) views."""
    case = build(SPECS["padding_rows_0_-1_5_q402"], torch.float32, "NHD", seed=5)
    for kv, k_view, v_view in ((torch.stack(case.caches()), lambda t: t[0], lambda t: t[1]),
                               (torch.stack(case.caches(), 1), lambda t: t[:, 0], lambda t: t[:, 1])):
        store_paged_kv(case.key, case.value, k_view(kv), v_view(kv), *case.index, layout="NHD")
        assert torch.equal(k_view(kv), reference_store(case.key, case.key_cache, *case.index, layout="NHD"))
        assert torch.equal(v_view(kv), reference_store(case.value, case.value_cache, *case.index, layout="NHD"))


def test_non_contiguous_states_and_cache():
    case = build(SPECS["b8_prefill_mixed_edges_bs32"], torch.float32, "HND", seed=2)
    key = case.key.transpose(0, 1).contiguous().transpose(0, 1)  # same values, token stride 1
    cache = case.key_cache.transpose(1, 2).contiguous().transpose(1, 2)  # HND view with NHD strides
    assert not key.is_contiguous() and not cache.is_contiguous()
    store_paged_single(key, cache, *case.index)
    assert torch.equal(cache, reference_store(case.key, case.key_cache, *case.index))


def test_empty_inputs_write_nothing():
    case = build(SPECS["padding_rows_32_-1_35"], torch.float32, "HND")
    cache = case.key_cache.clone()
    none = torch.tensor([-1, -1, -1], dtype=torch.int32)
    store_paged_single(case.key, cache, case.block_table, case.cu_q_lens, none)  # every row is padding
    store_paged_single(case.key[:0], cache, case.block_table, torch.zeros(4, dtype=torch.int32), case.context_kv_lens)
    store_paged_single(case.key, cache, chunk_metadata=torch.zeros(0, 4, dtype=torch.int32))
    assert torch.equal(cache, case.key_cache)


def test_public_names():
    assert kvpass.store_paged_kv is store_paged_kv and kvpass.store_paged_single is store_paged_single
    assert {"store_paged_kv", "store_paged_single", "gather_paged_kv"} <= set(kvpass.__all__) & set(kvpass.ops.__all__)
    for name in kvpass.ops.__all__:
        assert getattr(kvpass.ops, name).__doc__, name
    schema = str(torch.ops.kvpass.store_paged_kv.default._schema)
    assert "Tensor(a2!) key_cache, Tensor(a3!) value_cache" in schema and schema.endswith("-> ()")
    assert "Tensor(a1!) cache" in str(torch.ops.kvpass.store_paged_single.default._schema)


def slot_mapping_of(case: Case, seed=0, pad_tokens=0) -> torch.Tensor:
    """The block-table addressing of ``case`` as a vLLM slot mapping (``-1`` for skipped tokens), shortened by
    ``pad_tokens`` (those trailing tokens are then ignored by the op)."""
    bs = case.key_cache.shape[2] if case.layout == "HND" else case.key_cache.shape[1]
    table, ctx = case.block_table.tolist(), case.context_kv_lens.tolist()
    cu = case.cu_q_lens.tolist() if case.cu_q_lens is not None else list(range(len(ctx) + 1))
    slots = [-1] * case.key.shape[0]
    for b, c in enumerate(ctx):
        for t in range(cu[b], cu[b + 1]):
            p = c + t - cu[b]
            if c >= 0 and p // bs < len(table[b]) and table[b][p // bs] >= 0:
                slots[t] = table[b][p // bs] * bs + p % bs
    return torch.tensor(slots[: len(slots) - pad_tokens], dtype=torch.int64).to(case.key.device)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", ["b1_prefill_h1_d64", "padding_rows_0_-1_5_q402", "bucket_padded_bs8",
                                  "b8_decode_h8_d128", "holes_in_table", "past_table_width"])
def test_slot_mapping_matches_reference_and_block_table(name, layout):
    """slot_mapping (issue 16): the same stores as the block table; a mapping shorter than the states ignores
    the trailing tokens; a negative slot is skipped."""
    case = build(SPECS[name], torch.float32, layout, seed=11)
    slots = slot_mapping_of(case)
    want_k = reference_store(case.key, case.key_cache, *case.index, layout=layout)
    assert torch.equal(reference_store(case.key, case.key_cache, slot_mapping=slots, layout=layout), want_k)
    kc, vc = case.caches()
    store_paged_kv(case.key, case.value, kc, vc, slot_mapping=slots, layout=layout)
    assert torch.equal(kc, want_k)
    assert torch.equal(vc, reference_store(case.value, case.value_cache, *case.index, layout=layout))
    short = slots[: max(0, slots.shape[0] - 2)]  # the last two tokens are padding of the batch
    single = case.key_cache.clone()
    store_paged_single(case.key, single, slot_mapping=short, layout=layout)
    assert torch.equal(single, reference_store(case.key, case.key_cache, slot_mapping=short, layout=layout))


@pytest.mark.parametrize("layout,dtype", [("HND", torch.float32), ("NHD", torch.float8_e4m3fn)])
def test_masked_index_put_eager_kernel_and_opcheck(layout, dtype):
    """``kvpass::_masked_index_put`` (the Triton path's masked store; its eager kernel serves fallbacks and
    make_fx): masked-in rows written, masked-out rows (in range, even a masked-in row's slot) untouched."""
    g = torch.Generator().manual_seed(4)
    cache = torch.randn(3, 2, 4, 8, generator=g).to(dtype)  # HND (3, 2, 4, 8) / NHD (3, 2 offsets, 4 heads, 8)
    blk, off = torch.tensor([2, 0, 2, 1]), torch.tensor([1, 1, 1, 0])
    mask = torch.tensor([False, True, True, False])  # token 0 targets token 2's slot but is masked out
    if layout == "HND":
        idx, values, m = [blk[:, None], torch.arange(2)[None, :], off[:, None]], torch.randn(4, 2, 8), mask[:, None]
    else:
        idx, values, m = [blk, off], torch.randn(4, 4, 8), mask
    values = values.to(dtype)
    out = cache.clone()
    torch.ops.kvpass._masked_index_put(out, idx, values, m)
    expected = cache.clone()
    for t in range(4):
        if mask[t]:
            target = expected[blk[t], :, off[t]] if layout == "HND" else expected[blk[t], off[t]]
            target.view(torch.uint8).copy_(values[t].view(torch.uint8))
    assert torch.equal(out.view(torch.uint8), expected.view(torch.uint8))
    if dtype == torch.float32:
        torch.library.opcheck(torch.ops.kvpass._masked_index_put.default, (cache.clone(), idx, values, m))


@pytest.mark.parametrize("op", ["kv", "single_chunks", "single_slots", "kv_int8", "single_fp8"])
def test_opcheck(op):
    """torch.library.opcheck: the schema's mutates_args are exact, the fake kernel and the functionalized
    (decomposed) path agree with eager."""
    case = build(SPECS["padding_rows_0_-1_5_q402"], torch.float32, "HND", seed=4)
    kc, vc = case.caches()
    if op == "kv":
        torch.library.opcheck(torch.ops.kvpass.store_paged_kv.default, (case.key, case.value, kc, vc, *case.index))
    elif op == "single_chunks":
        torch.library.opcheck(torch.ops.kvpass.store_paged_single.default,
                              (case.key, kc, None, None, None, chunks_of(case)), {"layout": "HND"})
    elif op == "single_slots":
        torch.library.opcheck(torch.ops.kvpass.store_paged_single.default,
                              (case.key, kc, None, None, None, None, slot_mapping_of(case, pad_tokens=1)),
                              {"layout": "HND"})
    elif op == "kv_int8":
        scales = torch.full((case.key.shape[1],), 0.02), torch.tensor([0.05])
        torch.library.opcheck(torch.ops.kvpass.store_paged_kv.default,
                              (case.key, case.value, kc.to(torch.int8), vc.to(torch.int8), *case.index, None, None,
                               *scales))
    else:
        torch.library.opcheck(torch.ops.kvpass.store_paged_single.default,
                              (case.key, kc.to(torch.float8_e5m2), None, None, None, None,
                               slot_mapping_of(case), torch.tensor([0.01])), {"layout": "HND"},
                              # SchemaCheckMode compares tensors with a mul that has no fp8 CPU kernel
                              test_utils=("test_faketensor", "test_aot_dispatch_dynamic"))


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2], ids=["e4m3fn", "e5m2"])
def test_traced_fp8_store_runs_on_aten_kernels(dtype):
    """The traced (decomposed) store of a scaled fp8 cache, run by ATen's own kernels (``aot_eager``): bit-equal
    to eager. ATen has no CPU ``scatter`` for fp8, so every op of the traced path must avoid one."""
    case = build(SPECS["padding_rows_0_-1_5_q402"], torch.float32, "HND", seed=5)
    kc, _ = case.caches()
    kc = (kc * 3).to(dtype)  # random codes, not zeros: the slot the traced path snapshots keeps its own
    slots, scale = slot_mapping_of(case, pad_tokens=1), torch.tensor([0.01])
    want = kc.clone()
    store_paged_single(case.key, want, slot_mapping=slots, scale=scale, layout="HND")

    def step(states, cache, slot_mapping, s):
        store_paged_single(states, cache, slot_mapping=slot_mapping, scale=s, layout="HND")

    torch._dynamo.reset()
    got = kc.clone()
    torch.compile(step, backend="aot_eager", fullgraph=True)(case.key, got, slots, scale)
    torch._dynamo.reset()
    assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))
    assert not torch.equal(got.view(torch.uint8), kc.view(torch.uint8))


# ----------------------------------------------------------------------------------------------------------
# Validation: every rejected call names the argument and writes nothing
# ----------------------------------------------------------------------------------------------------------


def _kw(case, **over):
    kw = dict(key=case.key, value=case.value, block_table=case.block_table, cu_q_lens=case.cu_q_lens,
              context_kv_lens=case.context_kv_lens, chunk_metadata=None, slot_mapping=None, layout=case.layout)
    kw.update(over)
    return kw


SAME_AS_KEY_CACHE = object()


def _i32(values):
    return torch.tensor(values, dtype=torch.int32)


def _slots(values):
    return torch.tensor(values, dtype=torch.int64)


NO_TABLE = dict(block_table=None, cu_q_lens=None, context_kv_lens=None)


# Each entry: (id, builder(case) -> kwargs overrides, error class, argument named in the message).
# The base case is padding_rows_0_-1_5_q402 in HND: 3 rows, ctx [0, -1, 5], q [4, 0, 2], 6 tokens.
INVALID = [
    ("states_rank", lambda c: dict(key=c.key[0]), PagedStoreValueError, "key"),
    ("cache_rank", lambda c: dict(key_cache=c.key_cache[0]), PagedStoreValueError, "key_cache"),
    ("value_cache_rank", lambda c: dict(value_cache=c.value_cache.flatten(0, 1)), PagedStoreValueError, "value_cache"),
    ("head_dim_mismatch", lambda c: dict(key=c.key[..., :-1]), PagedStoreValueError, "key"),
    ("kv_heads_mismatch", lambda c: dict(value=c.value[:, :-1]), PagedStoreValueError, "value"),
    ("token_count_mismatch", lambda c: dict(value=c.value[:-1]), PagedStoreValueError, "value"),
    ("cache_geometry_mismatch", lambda c: dict(value_cache=c.value_cache[:-1]), PagedStoreValueError, "value_cache"),
    ("dtype_mismatch", lambda c: dict(key_cache=c.key_cache.to(torch.bfloat16)), PagedStoreTypeError, "key_cache"),
    ("value_dtype_mismatch", lambda c: dict(value=c.value.half()), PagedStoreTypeError, "value_cache"),
    ("device_mismatch", lambda c: dict(value_cache=torch.empty(c.value_cache.shape, device="meta")),
     PagedStoreValueError, "value_cache"),
    ("index_device_mismatch", lambda c: dict(block_table=c.block_table.to("meta")), PagedStoreValueError,
     "block_table"),
    ("block_table_int64", lambda c: dict(block_table=c.block_table.long()), PagedStoreTypeError, "block_table"),
    ("cu_q_lens_int64", lambda c: dict(cu_q_lens=c.cu_q_lens.long()), PagedStoreTypeError, "cu_q_lens"),
    ("context_kv_lens_float", lambda c: dict(context_kv_lens=c.context_kv_lens.float()), PagedStoreTypeError,
     "context_kv_lens"),
    ("chunk_metadata_int64", lambda c: dict(block_table=None, cu_q_lens=None, context_kv_lens=None,
                                            chunk_metadata=chunks_of(c).long()), PagedStoreTypeError, "chunk_metadata"),
    ("block_table_as_list", lambda c: dict(block_table=c.block_table.tolist()), PagedStoreTypeError, "block_table"),
    ("chunks_mixed_with_block_table", lambda c: dict(chunk_metadata=chunks_of(c)), PagedStoreValueError,
     "chunk_metadata"),
    ("chunks_mixed_with_context", lambda c: dict(block_table=None, cu_q_lens=None, chunk_metadata=chunks_of(c)),
     PagedStoreValueError, "chunk_metadata"),
    ("missing_block_table", lambda c: dict(block_table=None), PagedStoreValueError, "block_table"),
    ("missing_context_kv_lens", lambda c: dict(context_kv_lens=None), PagedStoreValueError, "context_kv_lens"),
    ("block_id_too_large", lambda c: dict(block_table=torch.where(c.block_table == c.block_table.max(),
                                                                  c.key_cache.shape[0], c.block_table).int()),
     PagedStoreValueError, "block_table"),
    ("block_id_below_minus_one", lambda c: dict(block_table=c.block_table.index_fill(1, torch.tensor([0]), -2)),
     PagedStoreValueError, "block_table"),
    ("cu_q_lens_length", lambda c: dict(cu_q_lens=c.cu_q_lens[:-1]), PagedStoreValueError, "cu_q_lens"),
    ("cu_q_lens_decreasing", lambda c: dict(cu_q_lens=_i32([0, 4, 3, 6])), PagedStoreValueError, "cu_q_lens"),
    ("cu_q_lens_past_tokens", lambda c: dict(cu_q_lens=_i32([0, 4, 4, 7])), PagedStoreValueError, "cu_q_lens"),
    ("cu_q_lens_negative_start", lambda c: dict(cu_q_lens=_i32([-1, 4, 4, 6])), PagedStoreValueError, "cu_q_lens"),
    ("block_table_rows", lambda c: dict(block_table=c.block_table[:2]), PagedStoreValueError, "block_table"),
    ("block_table_rank", lambda c: dict(block_table=c.block_table.flatten()), PagedStoreValueError, "block_table"),
    ("context_below_minus_one", lambda c: dict(context_kv_lens=_i32([0, -2, 5])), PagedStoreValueError,
     "context_kv_lens"),
    ("decode_token_count", lambda c: dict(cu_q_lens=None), PagedStoreValueError, "context_kv_lens"),
    ("layout_unknown", lambda c: dict(layout="BHSD"), PagedStoreValueError, "layout"),
    ("layout_wrong_case", lambda c: dict(layout="nhd"), PagedStoreValueError, "layout"),
    ("chunk_columns", lambda c: dict(block_table=None, cu_q_lens=None, context_kv_lens=None,
                                     chunk_metadata=_i32([[0, 1, 0]])), PagedStoreValueError, "chunk_metadata"),
    ("chunk_crosses_block", lambda c: dict(block_table=None, cu_q_lens=None, context_kv_lens=None,
                                           chunk_metadata=_i32([[0, 1, 0, 2], [2, 2, 15, 2]])),
     PagedStoreValueError, "chunk_metadata"),
    ("chunk_source_past_tokens", lambda c: dict(block_table=None, cu_q_lens=None, context_kv_lens=None,
                                                chunk_metadata=_i32([[0, 1, 0, 2], [5, 2, 0, 2]])),
     PagedStoreValueError, "chunk_metadata"),
    ("chunk_block_too_large", lambda c: dict(block_table=None, cu_q_lens=None, context_kv_lens=None,
                                             chunk_metadata=_i32([[0, 1, 0, 2], [2, 99, 0, 2]])),
     PagedStoreValueError, "chunk_metadata"),
    ("chunk_negative_length", lambda c: dict(block_table=None, cu_q_lens=None, context_kv_lens=None,
                                             chunk_metadata=_i32([[0, 1, 0, 2], [2, 2, 0, -1]])),
     PagedStoreValueError, "chunk_metadata"),
    ("chunks_longer_than_tokens", lambda c: dict(block_table=None, cu_q_lens=None, context_kv_lens=None,
                                                 chunk_metadata=_i32([[0, 1, 0, 4], [0, 2, 0, 4]])),
     PagedStoreValueError, "chunk_metadata"),
    ("value_cache_is_key_cache", lambda c: dict(value_cache=SAME_AS_KEY_CACHE), PagedStoreValueError, "value_cache"),
    ("slot_mapping_int32", lambda c: dict(**NO_TABLE, slot_mapping=_i32([0, 1])), PagedStoreTypeError, "slot_mapping"),
    ("slot_mapping_rank", lambda c: dict(**NO_TABLE, slot_mapping=_slots([[0, 1]])), PagedStoreValueError,
     "slot_mapping"),
    ("slot_mapping_longer_than_tokens", lambda c: dict(**NO_TABLE, slot_mapping=_slots(list(range(7)))),
     PagedStoreValueError, "slot_mapping"),
    ("slot_mapping_mixed_with_block_table", lambda c: dict(slot_mapping=_slots([0])), PagedStoreValueError,
     "slot_mapping"),
    ("slot_mapping_mixed_with_chunks", lambda c: dict(**NO_TABLE, chunk_metadata=chunks_of(c),
                                                      slot_mapping=_slots([0])), PagedStoreValueError, "slot_mapping"),
    ("slot_past_cache", lambda c: dict(**NO_TABLE, slot_mapping=_slots([0, -1, c.key_cache.shape[0] * 16])),
     PagedStoreValueError, "slot_mapping"),
    ("slot_mapping_device", lambda c: dict(**NO_TABLE, slot_mapping=_slots([0]).to("meta")), PagedStoreValueError,
     "slot_mapping"),
]


@pytest.mark.parametrize("name,make,error,argument", INVALID, ids=[x[0] for x in INVALID])
def test_invalid_arguments_raise_and_write_nothing(name, make, error, argument):
    case = build(SPECS["padding_rows_0_-1_5_q402"], torch.float32, "HND", seed=9)
    kc, vc = case.caches()
    over = make(case)
    kw = _kw(case)
    kw.update(key_cache=kc, value_cache=vc)
    kw.update(over)
    if kw["value_cache"] is SAME_AS_KEY_CACHE:
        kw["value_cache"] = kc
    caches_before = [t.clone() for t in (kc, vc)]
    with pytest.raises(error) as info:
        store_paged_kv(kw.pop("key"), kw.pop("value"), kw.pop("key_cache"), kw.pop("value_cache"),
                       kw.pop("block_table"), kw.pop("cu_q_lens"), kw.pop("context_kv_lens"), **kw)
    err = info.value
    assert isinstance(err, (KVPassError, PagedStoreError))
    assert isinstance(err, ValueError if error is PagedStoreValueError else TypeError)
    assert err.argument == argument and f": {argument}: " in str(err), str(err)
    assert str(err).startswith("store_paged_kv: ")
    for before, after in zip(caches_before, (kc, vc)):
        assert torch.equal(before, after), "a rejected call wrote into a cache"


def test_invalid_single_names_its_arguments():
    case = build(SPECS["padding_rows_32_-1_35"], torch.float32, "HND")
    cache = case.key_cache.clone()
    with pytest.raises(PagedStoreTypeError, match=r"^store_paged_single: cache: dtype"):
        store_paged_single(case.key.half(), cache, *case.index)
    with pytest.raises(PagedStoreValueError, match=r"^store_paged_single: states: expected rank 3"):
        store_paged_single(case.key[None], cache, *case.index)
    with pytest.raises(PagedStoreValueError, match=r"store_paged_single: block_table: block ids must lie in \[-1, "):
        store_paged_single(case.key, cache, case.block_table + 100, case.cu_q_lens, case.context_kv_lens)
    assert torch.equal(cache, case.key_cache)


# ----------------------------------------------------------------------------------------------------------
# Quantized store (issue 16): int8 / fp8 caches through a per-tensor or per-kv-head scale
# ----------------------------------------------------------------------------------------------------------

QDTYPES = [torch.int8, torch.float8_e4m3fn, torch.float8_e5m2]


def quant_case(name, layout, states_dtype, cache_dtype, per_head, seed):
    """``build`` with the caches turned into random ``cache_dtype`` contents and scales that make some values
    saturate (|x / scale| past the dtype's range) and some land on .5 before int8 rounding."""
    case = build(SPECS[name], states_dtype, layout, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    heads = case.key.shape[1]
    n = heads if per_head else 1
    big = 127.0 if cache_dtype == torch.int8 else torch.finfo(cache_dtype).max
    k_scale = (torch.rand(n, generator=g) * 4 / big + 0.2 / big).float()  # |x| up to ~4: saturates
    v_scale = torch.full((n,), 0.5)  # exact halves appear: x = k + 0.5 steps after division
    case.value[: 4] = (torch.arange(-8, 8, dtype=torch.float32).reshape(1, 1, 16).repeat(4, heads, 4)[..., :case.value.shape[2]]
                       * 0.25).to(states_dtype) if case.value.shape[0] >= 4 else case.value[:4]
    for attr in ("key_cache", "value_cache"):
        raw = torch.randint(-100, 100, getattr(case, attr).shape, generator=g).float()
        setattr(case, attr, raw.to(cache_dtype) if cache_dtype == torch.int8 else (raw * 0.01).to(cache_dtype))
    return case, k_scale, v_scale


def bits(t):
    return t.view(torch.uint8) if t.dtype != torch.int8 else t


@pytest.mark.parametrize("per_head", [False, True], ids=["scale1", "scaleH"])
@pytest.mark.parametrize("cache_dtype", QDTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("states_dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mode", ["table", "chunks", "slots"])
def test_quantized_store_matches_per_token_reference(mode, layout, states_dtype, cache_dtype, per_head):
    """Bit-identical to the per-token reference (the same formula): every addressing mode, layout, states dtype,
    cache dtype and scale shape; padding rows and skipped tokens (padding_rows_0_-1_5_q402 has both)."""
    case, k_scale, v_scale = quant_case("padding_rows_0_-1_5_q402", layout, states_dtype, cache_dtype, per_head, 5)
    if mode == "table":
        addr = dict(block_table=case.block_table, cu_q_lens=case.cu_q_lens, context_kv_lens=case.context_kv_lens)
    elif mode == "chunks":
        addr = dict(chunk_metadata=chunks_of(case, seed=2))
    else:
        addr = dict(slot_mapping=slot_mapping_of(case, pad_tokens=1))
    want_k = reference_store(case.key, case.key_cache, **addr, scale=k_scale, layout=layout)
    want_v = reference_store(case.value, case.value_cache, **addr, scale=v_scale, layout=layout)
    assert not torch.equal(bits(want_k), bits(case.key_cache))
    kc, vc = case.caches()
    bt, cu, ctx = addr.pop("block_table", None), addr.pop("cu_q_lens", None), addr.pop("context_kv_lens", None)
    store_paged_kv(case.key, case.value, kc, vc, bt, cu, ctx, **addr, k_scale=k_scale, v_scale=v_scale, layout=layout)
    assert torch.equal(bits(kc), bits(want_k)) and torch.equal(bits(vc), bits(want_v))
    single = case.key_cache.clone()
    store_paged_single(case.key, single, bt, cu, ctx, **addr, scale=k_scale, layout=layout)
    assert torch.equal(bits(single), bits(want_k))


def test_quantize_rounding_and_saturation():
    """The formula on chosen values: int8 rounds half to even and saturates; fp8 saturates to finfo.max."""
    from kvpass.ops import quantize
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -2.5, 1000.0, -1000.0, 0.49]).reshape(1, 1, 8)
    assert quantize(x, torch.tensor([1.0]), torch.int8).flatten().tolist() == [0, 2, 2, 0, -2, 127, -128, 0]
    for dt in (torch.float8_e4m3fn, torch.float8_e5m2):
        q = quantize(x * 1e6, torch.tensor([1.0]), dt).float().flatten()
        assert q[5] == torch.finfo(dt).max and q[6] == -torch.finfo(dt).max and torch.isfinite(q).all()


QINVALID = [
    ("scale_for_float_cache", dict(k_scale=torch.tensor([1.0])), "float", PagedStoreTypeError, "k_scale"),
    ("missing_scale_for_int8_cache", dict(v_scale=torch.tensor([1.0])), "int8", PagedStoreTypeError, "k_scale"),
    ("scale_float64", dict(k_scale=torch.tensor([1.0], dtype=torch.float64), v_scale=torch.tensor([1.0])), "int8",
     PagedStoreTypeError, "k_scale"),
    ("scale_shape", dict(k_scale=torch.ones(3), v_scale=torch.tensor([1.0])), "int8", PagedStoreValueError, "k_scale"),
    ("scale_rank", dict(k_scale=torch.ones(1, 1), v_scale=torch.tensor([1.0])), "int8", PagedStoreValueError, "k_scale"),
    ("scale_device", dict(k_scale=torch.ones(1), v_scale=torch.ones(1, device="meta")), "int8", PagedStoreValueError,
     "v_scale"),
    ("scale_zero", dict(k_scale=torch.tensor([0.0]), v_scale=torch.tensor([1.0])), "fp8", PagedStoreValueError,
     "k_scale"),
    ("scale_negative_head", dict(k_scale=torch.tensor([1.0]), v_scale=torch.tensor([1.0, -1.0, 1.0, 1.0])), "int8",
     PagedStoreValueError, "v_scale"),
    ("scale_nan", dict(k_scale=torch.tensor([float("nan")]), v_scale=torch.tensor([1.0])), "int8",
     PagedStoreValueError, "k_scale"),
    ("scale_as_float", dict(k_scale=0.5, v_scale=torch.tensor([1.0])), "int8", PagedStoreTypeError, "k_scale"),
    ("integer_states", dict(key_int=True, k_scale=torch.tensor([1.0]), v_scale=torch.tensor([1.0])), "int8",
     PagedStoreTypeError, "key"),
]


@pytest.mark.parametrize("name,kw,caches,error,argument", QINVALID, ids=[x[0] for x in QINVALID])
def test_invalid_quantized_calls_raise_and_write_nothing(name, kw, caches, error, argument):
    case = build(SPECS["padding_rows_0_-1_5_q402"], torch.float32, "HND", seed=9)  # 4 kv heads
    kc, vc = case.caches()
    if caches == "int8":
        kc, vc = kc.mul(10).to(torch.int8), vc.mul(10).to(torch.int8)
    elif caches == "fp8":
        kc, vc = kc.to(torch.float8_e4m3fn), vc.to(torch.float8_e4m3fn)
    kw = dict(kw)
    key = case.key.to(torch.int32) if kw.pop("key_int", False) else case.key
    before = [bits(t).clone() for t in (kc, vc)]
    with pytest.raises(error) as info:
        store_paged_kv(key, case.value, kc, vc, *case.index, **kw)
    assert info.value.argument == argument, str(info.value)
    assert all(torch.equal(b, bits(t)) for b, t in zip(before, (kc, vc))), "a rejected call wrote into a cache"


# ----------------------------------------------------------------------------------------------------------
# Dequantized read: gather_paged_kv (issue 16)
# ----------------------------------------------------------------------------------------------------------


def reference_gather(cache, block_table, ctx, scale, layout, dtype):
    """Per row, per position, from the definition."""
    bs = cache.shape[2] if layout == "HND" else cache.shape[1]
    out = []
    for b, c in enumerate(ctx.tolist()):
        for p in range(max(c, 0)):
            blk = int(block_table[b, p // bs])
            x = cache[blk, :, p % bs, :] if layout == "HND" else cache[blk, p % bs]
            out.append(x.float() * scale.view(-1, 1) if scale is not None else x)
    return torch.stack(out).to(dtype)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("cache_dtype,per_head", [(None, False), (torch.int8, True), (torch.float8_e5m2, False)],
                         ids=["float", "int8-scaleH", "fp8e5m2-scale1"])
def test_gather_paged_kv_reads_back_what_the_store_wrote(layout, cache_dtype, per_head):
    """Store new tokens, then read the whole history back: the new tokens come back (dequantized: within half
    a quantization step, or the saturation bound) and the old history is the cache's own contents."""
    case = build(SPECS["padding_rows_0_-1_5_q402"], torch.bfloat16, layout, seed=13)
    heads = case.key.shape[1]
    scale = None
    kc = case.key_cache.clone()
    if cache_dtype is not None:
        kc = torch.randint(-60, 60, kc.shape, generator=torch.Generator().manual_seed(1)).to(cache_dtype)
        scale = torch.full((heads if per_head else 1,), 0.05)
    store_paged_single(case.key, kc, *case.index, scale=scale, layout=layout)
    ctx_after = torch.where(case.context_kv_lens >= 0, case.context_kv_lens + (case.cu_q_lens[1:] - case.cu_q_lens[:-1]),
                            -1).int()
    got = kvpass.gather_paged_kv(kc, case.block_table, ctx_after, scale, layout=layout, dtype=torch.bfloat16)
    assert got.dtype == torch.bfloat16 and got.shape[1:] == case.key.shape[1:]
    assert torch.equal(got, reference_gather(kc, case.block_table, ctx_after, scale, layout, torch.bfloat16))
    # row 0 (ctx 0, 4 new tokens) is first in the result: its history is exactly the new tokens
    new = case.key[:4].float()
    if cache_dtype is None:
        assert torch.equal(got[:4], case.key[:4])
    else:
        err = (got[:4].float() - new).abs()
        assert (err <= 0.05 / 2 + 0.05 * 0.02 + new.abs() * 0.13).all()  # int8: half a step; fp8 e5m2: 2 mantissa bits


def test_gather_paged_kv_validation():
    case = build(SPECS["padding_rows_0_-1_5_q402"], torch.float32, "HND", seed=13)
    q = case.key_cache.to(torch.int8)
    with pytest.raises(PagedStoreTypeError, match="gather_paged_kv: scale: required"):
        kvpass.gather_paged_kv(q, case.block_table, case.context_kv_lens)
    with pytest.raises(PagedStoreTypeError, match="gather_paged_kv: scale: given"):
        kvpass.gather_paged_kv(case.key_cache, case.block_table, case.context_kv_lens, torch.ones(1))
    with pytest.raises(PagedStoreValueError, match="gather_paged_kv: block_table: row 0 position"):
        kvpass.gather_paged_kv(case.key_cache, case.block_table, _i32([1000, -1, 5]))
    with pytest.raises(PagedStoreTypeError, match="gather_paged_kv: context_kv_lens"):
        kvpass.gather_paged_kv(case.key_cache, case.block_table, case.context_kv_lens.long())
