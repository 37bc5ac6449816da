"""Random paged-store batches of a few fixed shapes ("buckets"), for compiled-vs-eager checks of the store.

The shapes of a bucket are fixed (so one compiled graph serves every batch drawn from it, without recompiles); the
data is random (all four addressing modes): contexts (``-1`` padding rows, block edges), new-token counts (zero-length rows, tokens after
``cu_q_lens[-1]`` that belong to no row), block tables with ``-1`` entries, narrower than the rows need, and with
blocks shared between rows (two tokens may target one slot: the last one wins), chunk metadata with skipped
(``dst_block = -1``) and overlapping chunks, states and poisoned caches from ``randn`` (never zeros).

Used by ``tests/test_store_compile_fuzz.py`` (hypothesis, in process) and ``tests/store_isa_child.py`` (the same
buckets under each ``ATEN_CPU_CAPABILITY``).
"""

from __future__ import annotations

import dataclasses
import random

import torch


@dataclasses.dataclass(frozen=True)
class Bucket:
    """Fixed shapes, layout, dtype and op of one compiled graph."""

    name: str
    mode: str  # "prefill" (cu_q_lens), "decode" (cu_q_lens=None), "chunks" or "slots" (slot_mapping)
    tokens: int
    rows: int  # rows; chunks in "chunks" mode; slot_mapping entries in "slots" mode
    heads: int
    head_dim: int
    block_size: int
    num_blocks: int
    width: int  # block table width (unused in "chunks" mode)
    layout: str
    dtype: torch.dtype
    op: str  # "kv" (store_paged_kv) or "single" (store_paged_single)
    cache_dtype: torch.dtype | None = None  # a quantized cache (int8/fp8) written through random scales
    per_head: bool = False  # scales of shape [kv_heads] rather than [1]


BUCKETS = [
    Bucket("prefill-HND-f32-kv", "prefill", 24, 4, 2, 16, 4, 16, 5, "HND", torch.float32, "kv"),
    Bucket("decode-NHD-bf16-single", "decode", 6, 6, 3, 8, 8, 4, 3, "NHD", torch.bfloat16, "single"),
    Bucket("chunks-NHD-f16-kv", "chunks", 20, 6, 2, 8, 4, 8, 0, "NHD", torch.float16, "kv"),
    # slot_mapping shorter than the states (padded batch), negative and repeated slots
    Bucket("slots-HND-f32-kv", "slots", 16, 12, 2, 8, 4, 6, 0, "HND", torch.float32, "kv"),
    # quantized caches (issue 16)
    Bucket("prefill-NHD-bf16-int8-perhead-kv", "prefill", 24, 4, 3, 16, 4, 16, 5, "NHD", torch.bfloat16, "kv",
           torch.int8, True),
    Bucket("slots-HND-f16-fp8e4m3-single", "slots", 16, 14, 2, 8, 4, 6, 0, "HND", torch.float16, "single",
           torch.float8_e4m3fn, False),
    # more tokens than cache slots (24 < 40): the lowering's whole-cache path
    Bucket("prefill-small-cache-HND-f32-single", "prefill", 40, 3, 2, 8, 8, 3, 4, "HND", torch.float32, "single"),
]
BY_NAME = {b.name: b for b in BUCKETS}


@dataclasses.dataclass
class Batch:
    """One random batch of a bucket: the op's arguments (caches are the poisoned originals; clone them)."""

    bucket: Bucket
    key: torch.Tensor
    value: torch.Tensor
    key_cache: torch.Tensor
    value_cache: torch.Tensor
    block_table: torch.Tensor | None
    cu_q_lens: torch.Tensor | None
    context_kv_lens: torch.Tensor | None
    chunk_metadata: torch.Tensor | None
    slot_mapping: torch.Tensor | None = None
    k_scale: torch.Tensor | None = None
    v_scale: torch.Tensor | None = None

    @property
    def index(self):
        return self.block_table, self.cu_q_lens, self.context_kv_lens, self.chunk_metadata, self.slot_mapping


def draw(bucket: Bucket, seed: int) -> Batch:
    """A random batch of ``bucket`` (deterministic in ``seed``); every index is in range (eager accepts it)."""
    r = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    b, T, bs, nb = bucket, bucket.tokens, bucket.block_size, bucket.num_blocks
    table = cu = ctx = chunks = slots = None
    if b.mode == "slots":
        slots = torch.tensor([r.choice([-1, -7, r.randrange(nb * bs), r.randrange(nb * bs), r.randrange(4)])
                              for _ in range(b.rows)], dtype=torch.int64)
    elif b.mode == "chunks":
        rows, total = [], 0
        for _ in range(b.rows):
            blk = r.choice([-1, r.randrange(nb), r.randrange(nb)])
            off = r.randrange(bs)
            n = r.randint(0, bs - off)
            if blk >= 0 and total + n > T:
                n = T - total
            src = r.randint(0, T - n)
            total += n if blk >= 0 else 0
            rows.append([src, blk, off, n])
        chunks = torch.tensor(rows, dtype=torch.int32)
    else:
        rows = b.rows
        if b.mode == "decode":
            q = [1] * rows
        else:
            cuts = sorted(r.randint(0, T) for _ in range(rows))  # cu_q_lens[-1] <= T: trailing tokens of no row
            q = [cuts[0]] + [cuts[i] - cuts[i - 1] for i in range(1, rows)]
        cap = b.width * bs
        ctx = [r.choice([-1, 0, r.randint(0, cap), bs - 1, bs, r.randint(0, cap)]) for _ in range(rows)]
        # random block ids: rows may share blocks (colliding targets), -1 entries are holes
        table = torch.tensor([[r.choice([-1] + [r.randrange(nb)] * 4) for _ in range(b.width)] for _ in range(rows)],
                             dtype=torch.int32)
        ctx = torch.tensor(ctx, dtype=torch.int32)
        if b.mode == "prefill":
            cu = torch.tensor([0] + list(torch.tensor(q).cumsum(0).tolist()), dtype=torch.int32)
    h, d = b.heads, b.head_dim
    shape = (nb, h, bs, d) if b.layout == "HND" else (nb, bs, h, d)

    def rnd(*s):
        return torch.randn(*s, generator=g).to(b.dtype)

    def cache():
        if b.cache_dtype is None:
            return rnd(*shape)
        return torch.randint(-100, 100, shape, generator=g).to(b.cache_dtype)

    def scale():  # some values saturate, most do not
        top = 127.0 if b.cache_dtype == torch.int8 else torch.finfo(b.cache_dtype).max
        return torch.rand(h if b.per_head else 1, generator=g) * 3 / top + 0.5 / top

    scales = (scale(), scale()) if b.cache_dtype is not None else (None, None)
    return Batch(b, rnd(T, h, d), rnd(T, h, d), cache(), cache(), table, cu, ctx, chunks, slots, *scales)


def store_fn(bucket: Bucket):
    """A fresh function (its own code object, so each bucket gets its own compiled graph) applying the op."""
    import kvpass

    if bucket.op == "kv":
        def store(key, value, key_cache, value_cache, block_table, cu_q_lens, context_kv_lens, chunk_metadata,
                  slot_mapping, k_scale=None, v_scale=None):
            kvpass.store_paged_kv(key, value, key_cache, value_cache, block_table, cu_q_lens, context_kv_lens,
                                  chunk_metadata=chunk_metadata, slot_mapping=slot_mapping, k_scale=k_scale,
                                  v_scale=v_scale, layout=bucket.layout)
    else:
        def store(key, value, key_cache, value_cache, block_table, cu_q_lens, context_kv_lens, chunk_metadata,
                  slot_mapping, k_scale=None, v_scale=None):
            kvpass.store_paged_single(key, key_cache, block_table, cu_q_lens, context_kv_lens,
                                      chunk_metadata=chunk_metadata, slot_mapping=slot_mapping, scale=k_scale,
                                      layout=bucket.layout)
    return store


def check(batch: Batch, compiled) -> str | None:
    """Run eager, compiled and the per-token reference on ``batch``; ``None`` if all equal, else a message."""
    from kvpass.ops.reference import reference_store

    b = batch.bucket
    fn = store_fn(b)
    scales = (batch.k_scale, batch.v_scale)
    ek, ev = batch.key_cache.clone(), batch.value_cache.clone()
    fn(batch.key, batch.value, ek, ev, *batch.index, *scales)
    ck, cv = batch.key_cache.clone(), batch.value_cache.clone()
    compiled(batch.key, batch.value, ck, cv, *batch.index, *scales)
    if b.cache_dtype is not None and b.cache_dtype != torch.int8:  # compare fp8 bits (NaN-free, exact)
        ek, ev, ck, cv = (t.view(torch.uint8) for t in (ek, ev, ck, cv))
    bt, cu, ctx, chunks, slots = batch.index
    ref_k = reference_store(batch.key, batch.key_cache, bt, cu, ctx, chunk_metadata=chunks, slot_mapping=slots,
                            scale=batch.k_scale, layout=b.layout)
    if ref_k.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        ref_k = ref_k.view(torch.uint8)
    problems = []
    if not torch.equal(ek, ref_k):
        problems.append("eager K differs from the reference")
    if not torch.equal(ck, ref_k):
        bad = (ck != ref_k).reshape(ck.shape[0], ck.shape[1], ck.shape[2], -1).any(-1).nonzero().tolist()
        problems.append(f"compiled K differs from the reference at {bad[:6]}")
    if b.op == "kv":
        ref_v = reference_store(batch.value, batch.value_cache, bt, cu, ctx, chunk_metadata=chunks,
                                slot_mapping=slots, scale=batch.v_scale, layout=b.layout)
        if ref_v.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            ref_v = ref_v.view(torch.uint8)
        if not (torch.equal(ev, ref_v) and torch.equal(cv, ref_v)):
            problems.append("V differs from the reference")
    elif not (torch.equal(cv, ev) and torch.equal(ev.view(torch.uint8), batch.value_cache.view(torch.uint8))):
        problems.append("store_paged_single touched the V cache")
    return "; ".join(problems) or None
