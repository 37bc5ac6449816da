"""A toy continuous-batching step with a paged KV cache and :func:`kvpass.store_paged_kv`.

Run it::

    python examples/paged_store_batching.py

What it does, printing each step:

1. a tiny block allocator (a free list of physical blocks) hands out blocks of ``block_size`` slots to
   sequences as they grow; ``block_table`` (int32, ``-1`` for unused entries) maps each row's logical blocks
   to physical ones, as in vLLM;
2. a first step prefills two sequences (``B`` and ``C``) so that they already have history in the cache;
3. the batched step mixes a fresh prefill (``A``, several new tokens), a decode (``B``, one token), a chunked
   prefill crossing a block boundary (``C``) and a padding row (context ``-1``, whose token must not be
   written); it stores the new K/V with ``kvpass.store_paged_kv`` eagerly and with the same step under
   ``torch.compile``, and checks that both give the same caches and that no slot outside the sequences' own
   positions changed;
4. attention for every real row reads its K/V back from the paged cache (a gather through ``block_table``) and
   is compared with attention over a plain contiguous per-sequence history (``torch.testing.assert_close``).

Everything is fp32 on CPU with random inputs from a seeded generator. Importing this file has no side
effects; :func:`main` does the work and returns 0 when every check passes.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

import kvpass

__all__ = ["BlockAllocator", "main"]

HEADS, HEAD_DIM, BLOCK_SIZE, NUM_BLOCKS, MAX_BLOCKS = 2, 16, 4, 12, 4


class BlockAllocator:
    """A free list of physical block ids; each sequence owns a list of blocks covering its tokens."""

    def __init__(self, num_blocks: int, block_size: int):
        self.block_size = block_size
        self.free = list(range(num_blocks))[::-1]  # pop() hands out 0, 1, 2, ...
        self.owned: dict[str, list[int]] = {}

    def reserve(self, seq: str, total_tokens: int) -> list[int]:
        """Make sure ``seq`` owns enough blocks for ``total_tokens`` tokens; return its block list."""
        blocks = self.owned.setdefault(seq, [])
        need = -(-total_tokens // self.block_size)
        while len(blocks) < need:
            if not self.free:
                raise RuntimeError("out of KV blocks")
            blocks.append(self.free.pop())
        return blocks

    def release(self, seq: str) -> None:
        self.free.extend(reversed(self.owned.pop(seq, [])))

    def block_table(self, rows: list[str | None], width: int) -> torch.Tensor:
        """``(len(rows), width)`` int32, ``-1`` for unused entries and for padding rows (``None``)."""
        table = torch.full((len(rows), width), -1, dtype=torch.int32)
        for i, seq in enumerate(rows):
            if seq is not None:
                blocks = self.owned[seq]
                table[i, :len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
        return table


def store_step(key, value, key_cache, value_cache, block_table, cu_q_lens, context_kv_lens):
    """The step under test: one call stores every row's new tokens."""
    kvpass.store_paged_kv(key, value, key_cache, value_cache, block_table, cu_q_lens, context_kv_lens)
    return key_cache, value_cache


def batch_metadata(rows: list[tuple[str | None, int, int]], alloc: BlockAllocator):
    """``rows`` = [(seq or None for padding, context length, new tokens)] -> block_table, cu_q_lens, context."""
    for seq, ctx, new in rows:
        if seq is not None:
            alloc.reserve(seq, ctx + new)
    table = alloc.block_table([seq for seq, _, _ in rows], MAX_BLOCKS)
    lens = torch.tensor([new for _, _, new in rows], dtype=torch.int32)
    cu = torch.zeros(len(rows) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(lens, 0)
    ctx = torch.tensor([ctx if seq is not None else -1 for seq, ctx, _ in rows], dtype=torch.int32)
    return table, cu, ctx


def gather(cache: torch.Tensor, table_row: torch.Tensor, length: int) -> torch.Tensor:
    """A row's first ``length`` tokens read back from an HND paged cache: ``(length, heads, head_dim)``."""
    pos = torch.arange(length)
    blocks = table_row.long()[pos // BLOCK_SIZE]
    return cache[blocks, :, pos % BLOCK_SIZE]  # advanced indices around a slice: (length, heads, head_dim)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: int) -> torch.Tensor:
    """Causal attention of ``q`` (new tokens at positions ``ctx..``) over ``k``/``v`` (positions ``0..``)."""
    n, total = q.shape[0], k.shape[0]
    mask = torch.arange(total)[None, :] <= (ctx + torch.arange(n))[:, None]
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask)
    return out.transpose(0, 1)


def main(seed: int = 0, verbose: bool = True) -> int:
    say = print if verbose else (lambda *a, **k: None)
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen)

    alloc = BlockAllocator(NUM_BLOCKS, BLOCK_SIZE)
    # Random (not zero) initial contents: a slot read or written by mistake cannot go unnoticed.
    key_cache = randn(NUM_BLOCKS, HEADS, BLOCK_SIZE, HEAD_DIM)
    value_cache = randn(NUM_BLOCKS, HEADS, BLOCK_SIZE, HEAD_DIM)
    history: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # the contiguous reference
    say(f"paged KV cache: {NUM_BLOCKS} blocks x {HEADS} heads x {BLOCK_SIZE} slots x {HEAD_DIM} dims (HND), "
        f"block_table width {MAX_BLOCKS}")

    # -- step 1: prefill B (6 tokens) and C (3 tokens) ----------------------------------------------------
    rows1 = [("B", 0, 6), ("C", 0, 3)]
    table, cu, ctx = batch_metadata(rows1, alloc)
    k, v = randn(int(cu[-1]), HEADS, HEAD_DIM), randn(int(cu[-1]), HEADS, HEAD_DIM)
    store_step(k, v, key_cache, value_cache, table, cu, ctx)
    for i, (seq, _, _) in enumerate(rows1):
        s, e = int(cu[i]), int(cu[i + 1])
        history[seq] = (k[s:e], v[s:e])
    say("step 1 (prefill):  " + ", ".join(f"{seq} +{n} tokens -> blocks {alloc.owned[seq]}" for seq, _, n in rows1))

    # -- step 2: the mixed batch ---------------------------------------------------------------------------
    rows = [("A", 0, 5),    # prefill: 5 new tokens, two blocks
            ("B", 6, 1),    # decode: one token at position 6
            (None, 0, 1),   # padding row: context -1, its token must not be written
            ("C", 3, 4)]    # chunked prefill: positions 3..6 cross from block 0 into block 1
    table, cu, ctx = batch_metadata(rows, alloc)
    # The padding row keeps stale entries (B's blocks, as a recycled batch slot would): only its context of -1
    # keeps its token from overwriting B's position 0.
    table[2] = table[1]
    tokens = int(cu[-1])
    k, v = randn(tokens, HEADS, HEAD_DIM), randn(tokens, HEADS, HEAD_DIM)
    q = randn(tokens, HEADS, HEAD_DIM)
    say("step 2 (mixed):")
    for i, (seq, c, n) in enumerate(rows):
        kind = "padding" if seq is None else ("decode" if n == 1 and c > 0 else "prefill")
        say(f"  row {i}: {seq or '-'}  {kind:8s} context {int(ctx[i]):2d}, {n} new token(s), "
            f"block_table {table[i].tolist()}")
    say(f"  cu_q_lens {cu.tolist()}, context_kv_lens {ctx.tolist()}, {tokens} tokens in all")

    before_k, before_v = key_cache.clone(), value_cache.clone()
    eager_k, eager_v = store_step(k, v, key_cache.clone(), value_cache.clone(), table, cu, ctx)

    torch._dynamo.reset()
    compiled = torch.compile(store_step, fullgraph=True)
    comp_k, comp_v = compiled(k, v, before_k.clone(), before_v.clone(), table, cu, ctx)
    ok_compile = torch.equal(eager_k, comp_k) and torch.equal(eager_v, comp_v)
    say(f"  store_paged_kv eager vs torch.compile (fullgraph): caches {'identical' if ok_compile else 'DIFFER'}")

    # Which slots should have changed: exactly (block_table[b, p // bs], p % bs) for the real rows' new tokens.
    expected = torch.zeros(NUM_BLOCKS, BLOCK_SIZE, dtype=torch.bool)
    for i, (seq, c, n) in enumerate(rows):
        if seq is None:
            continue
        for p in range(c, c + n):
            expected[int(table[i, p // BLOCK_SIZE]), p % BLOCK_SIZE] = True
    changed = ((eager_k != before_k) | (eager_v != before_v)).any(dim=(1, 3))  # (num_blocks, block_size)
    ok_slots = torch.equal(changed, expected)
    say(f"  slots written: {int(changed.sum())} (expected {int(expected.sum())}: the real rows' new tokens; "
        f"padding row skipped, every other slot untouched): {'ok' if ok_slots else 'MISMATCH'}")

    # -- attention reading the paged cache back vs a contiguous history -----------------------------------
    ok_attention = True
    for i, (seq, c, n) in enumerate(rows):
        if seq is None:
            continue
        s, e = int(cu[i]), int(cu[i + 1])
        old_k, old_v = history.get(seq, (k[:0], v[:0]))
        history[seq] = (torch.cat([old_k, k[s:e]]), torch.cat([old_v, v[s:e]]))
        ref = attention(q[s:e], *history[seq], c)
        for name, (kc, vc) in (("eager", (eager_k, eager_v)), ("compiled", (comp_k, comp_v))):
            got = attention(q[s:e], gather(kc, table[i], c + n), gather(vc, table[i], c + n), c)
            try:
                torch.testing.assert_close(got, ref)
            except AssertionError as err:
                ok_attention = False
                say(f"  attention {seq} ({name} cache) differs from the contiguous reference:\n{err}")
        say(f"  attention {seq}: {n} quer{'y' if n == 1 else 'ies'} over {c + n} cached tokens read through block_table "
            f"== contiguous history (eager and compiled caches)")

    for seq in list(alloc.owned):
        alloc.release(seq)
    ok_free = len(alloc.free) == NUM_BLOCKS
    say(f"released every sequence: {len(alloc.free)}/{NUM_BLOCKS} blocks free")

    ok = ok_compile and ok_slots and ok_attention and ok_free
    failed = [what for what, good in (("compiled store differs from eager", ok_compile),
                                      ("a slot outside the sequences changed", ok_slots),
                                      ("attention differs from the contiguous reference", ok_attention),
                                      ("blocks leaked", ok_free)) if not good]
    say("PASS: paged store and attention agree with the contiguous reference" if ok else f"FAIL: {'; '.join(failed)}")
    return 0 if ok else 1


def cli(argv=None) -> int:
    """Command-line entry point (``--help``, ``--seed``): exit status 0 on PASS, 1 on FAIL."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0, help="seed of the random K/V and queries (default 0)")
    args = parser.parse_args(argv)
    return main(seed=args.seed)


if __name__ == "__main__":
    sys.exit(cli())
