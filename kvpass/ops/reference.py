"""Plain-Python references of the paged store, for tests and benchmarks (slow on purpose; never used by the ops).

* :func:`reference_store` writes one token at a time, straight from the semantics in DESIGN section 5: the oracle
  of the differential tests.
* :func:`token_loop_store_paged_kv` is the same per-token loop, in place on K and V (DESIGN's "per-token Python
  loop" measurement).
* :func:`loop_store_paged_kv` is the upstream torch reference's algorithm (``MojoStorePagedKVCache.forward``):
  per sequence, per block chunk, with ``.item()`` and slice assignments. The benchmark's baseline. It differs from
  the semantics only on tables with a ``-1`` hole before a valid block (it stops at the hole) and on ``ctx = -1``
  rows (Python's negative indexing would address the last table entry; here such rows are skipped).
"""

from __future__ import annotations

import torch

__all__ = ["reference_store", "reference_quantize", "loop_store_paged_kv", "token_loop_store_paged_kv"]


def reference_store(states, cache, block_table=None, cu_q_lens=None, context_kv_lens=None, *,
                    chunk_metadata=None, slot_mapping=None, scale=None, layout="HND"):
    """Return a copy of ``cache`` with ``states`` written token by token (the semantics, in plain Python).

    Token ``t`` of row ``b`` goes to position ``p = ctx[b] + t``, block ``block_table[b, p // bs]``, offset
    ``p % bs``; padding rows (``ctx < 0``), ``-1`` blocks and positions past the table are skipped; decode
    (``cu_q_lens=None``) means token ``b`` is row ``b``'s only token. With ``chunk_metadata`` rows
    ``(src, dst_block, dst_offset, length)``, chunks with ``dst_block < 0`` are skipped. With ``slot_mapping``,
    token ``t`` goes to slot ``slot_mapping[t]`` (block ``slot // bs``, offset ``slot % bs``) unless negative.
    With ``scale`` (``[1]`` or ``[kv_heads]``), each token is quantized on its own to the cache's dtype:
    :func:`reference_quantize`.
    """
    out = cache.clone()
    bs = cache.shape[2] if layout == "HND" else cache.shape[1]

    def put(blk, off, x):
        if scale is not None:
            x = reference_quantize(x, scale, cache.dtype)
        if layout == "HND":
            out[blk, :, off, :] = x
        else:
            out[blk, off, :, :] = x

    if slot_mapping is not None:
        for t, slot in enumerate(slot_mapping.cpu().tolist()):
            if slot >= 0:
                put(slot // bs, slot % bs, states[t])
        return out
    if chunk_metadata is not None:
        for src, blk, off, n in chunk_metadata.cpu().tolist():
            if blk < 0:
                continue
            for i in range(n):
                put(blk, off + i, states[src + i])
        return out
    table = block_table.cpu().tolist()
    ctx = context_kv_lens.cpu().tolist()
    cu = None if cu_q_lens is None else cu_q_lens.cpu().tolist()
    for b, c in enumerate(ctx):
        start, end = (b, b + 1) if cu is None else (cu[b], cu[b + 1])
        if c < 0:
            continue
        for t in range(start, end):
            p = c + t - start
            j = p // bs
            if j >= len(table[b]) or table[b][j] < 0:
                continue
            put(table[b][j], p % bs, states[t])
    return out


def reference_quantize(token, scale, dtype):
    """One token ``(kv_heads, head_dim)`` quantized per head, written from the definition: each head's
    values divided by its scale (``scale[0]`` for all heads if ``scale`` has one entry) in float32; int8: round
    half to even and saturate to [-128, 127]; fp8: saturate to the largest finite value, then round to nearest."""
    heads = token.shape[0]
    rows = []
    for h in range(heads):
        s = scale[h if scale.numel() == heads else 0].item()
        y = token[h].to(torch.float32) / torch.tensor(s, dtype=torch.float32)
        if dtype == torch.int8:
            y = torch.minimum(torch.maximum(y.round(), torch.tensor(-128.0)), torch.tensor(127.0))
        else:
            big = torch.finfo(dtype).max
            y = torch.minimum(torch.maximum(y, torch.tensor(-big)), torch.tensor(big))
        rows.append(y.to(dtype))
    return torch.stack(rows)


def loop_store_paged_kv(key, value, key_cache, value_cache, block_table, cu_q_lens, context_kv_lens):
    """Upstream's per-chunk loop (HND caches), in place; returns ``(key_cache, value_cache)``."""
    block_size = key_cache.shape[2]
    decode = cu_q_lens is None
    for b in range(len(context_kv_lens)):
        if not decode:
            k_start = cu_q_lens[b].item()
            k_end = cu_q_lens[b + 1].item()
        else:
            k_start, k_end = b, b + 1
        n = k_end - k_start
        if n <= 0:
            continue
        start = context_kv_lens[b].item()
        if start < 0:
            continue
        now_key = key[k_start:k_end].permute(1, 0, 2)
        now_value = value[k_start:k_end].permute(1, 0, 2)
        row = block_table[b]
        j, off, src, remain = start // block_size, start % block_size, 0, n
        while remain > 0:
            if j >= len(row):
                break
            blk = row[j].item()
            if blk < 0:
                break
            m = min(remain, block_size - off)
            key_cache[blk, :, off:off + m, :] = now_key[:, src:src + m, :]
            value_cache[blk, :, off:off + m, :] = now_value[:, src:src + m, :]
            src += m
            remain -= m
            j += 1
            off = 0
    return key_cache, value_cache


def token_loop_store_paged_kv(key, value, key_cache, value_cache, block_table, cu_q_lens, context_kv_lens):
    """A per-token Python loop (HND caches), in place; returns ``(key_cache, value_cache)``."""
    block_size = key_cache.shape[2]
    width = block_table.shape[1]
    for b in range(len(context_kv_lens)):
        start, end = (b, b + 1) if cu_q_lens is None else (cu_q_lens[b].item(), cu_q_lens[b + 1].item())
        c = context_kv_lens[b].item()
        if c < 0:
            continue
        for t in range(start, end):
            p = c + t - start
            j = p // block_size
            if j >= width:
                continue
            blk = block_table[b, j].item()
            if blk < 0:
                continue
            key_cache[blk, :, p % block_size, :] = key[t]
            value_cache[blk, :, p % block_size, :] = value[t]
    return key_cache, value_cache
