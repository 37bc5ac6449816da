"""Paged KV store ops: ``torch.ops.kvpass.store_paged_kv`` and ``torch.ops.kvpass.store_paged_single``.

Semantics (DESIGN section 5; upstream ``MojoStorePagedKVCache`` / ``MojoStorePagedSingleCache``)
-----------------------------------------------------------------------------------------------
New states are ``(tokens, kv_heads, head_dim)``. A cache is ``(num_blocks, kv_heads, block_size, head_dim)``
(``layout="HND"``, the default) or ``(num_blocks, block_size, kv_heads, head_dim)`` (``layout="NHD"``, the
vLLM/FlashInfer layout, selected explicitly). Three addressing modes, exactly one per call:

* ``block_table (B, W)`` + ``cu_q_lens (B+1,)`` (``None``: decode, token ``i`` is row ``i``'s only token) +
  ``context_kv_lens (B,)``: token ``t`` of row ``b`` goes to position ``p = ctx[b] + t``, physical block
  ``block_table[b, p // block_size]``, offset ``p % block_size``. Padding rows (``ctx = -1``), zero-length
  rows, ``-1`` blocks and tokens whose logical block is past the table width ``W`` are skipped. Tokens outside
  ``[cu_q_lens[0], cu_q_lens[B])`` belong to no row and are not written.
* ``chunk_metadata (C, 4)`` rows ``(src_token_start, dst_block, dst_offset, length)``: tokens
  ``[src, src+length)`` go to block ``dst_block`` at offsets ``[dst_offset, dst_offset+length)`` (a chunk never
  crosses a block); a chunk whose ``dst_block`` is ``-1`` is skipped. Chunks may come in any order; the stored
  chunks (``dst_block >= 0``) may not add up to more than ``tokens`` elements (so a source token can be stored
  twice only by giving up another one: the compiled path sizes its work by ``tokens``).
* ``slot_mapping (n,)`` int64 (vLLM's ``reshape_and_cache`` addressing): token ``t < n`` goes to block
  ``slot // block_size``, offset ``slot % block_size``; negative slots are skipped; tokens ``>= n`` (the padded
  tail of a batch: the states may be longer than the mapping) are ignored.

Every other slot of the cache is left exactly as it was. When two valid tokens target the same slot, the last one
(in token order; with ``chunk_metadata``, in the order of the chunks) wins, in eager and compiled alike, as in the
upstream loop (vLLM's ``reshape_and_cache`` leaves it unspecified).

Implementation
--------------
Every mode reduces to one *plan*: for each element ``e`` (a token; for ``chunk_metadata`` a ``(chunk, offset in its
block)`` pair), ``src[e]`` (the token to read), ``blk[e]``/``off[e]`` (the slot to write) and ``valid[e]``: pure
index arithmetic on the small int32 tensors (``searchsorted`` of the token index into ``cu_q_lens``, a gather from
``block_table``), with no Python loop over tokens, chunks or rows and no ``.tolist()``.

* **Eager** (the registered kernel): validates everything, including the data-dependent facts (block ids in
  ``[-1, num_blocks)``, monotone ``cu_q_lens``, chunk bounds), with one host sync, *before* writing; then builds
  the plan, keeps one writer per slot (the last token, as under compile), compacts the writers (``nonzero``: free
  on CPU, a second sync on GPU) and writes them with one ``index_copy_``/``index_put_`` per cache (unique
  indices, so the result does not depend on how ATen parallelizes the copy).
* **Compile** (``torch.compile``, ``torch.export``, ``make_fx``): the op has a Python
  ``CompositeImplicitAutograd`` kernel, so functionalization (``FunctionalTensorMode``) decomposes it instead of
  wrapping it in ``auto_functionalized``: the graph Inductor sees is the plan's index arithmetic plus one
  ``index_put`` per cache (re-inplaced by Inductor into the cache), which Inductor turns into a generated
  scatter kernel and fuses with the producers of the states (RMSNorm, RoPE). Only metadata (ranks, dtypes,
  devices, shapes) is validated at trace time; the data-dependent checks cannot run without a host sync. The
  plan depends on the addressing only: the stores of one trace that use the same addressing tensors, unchanged,
  share it (``kvpass/ops/_plan_sharing.py``), so a decode step of L layers computes it once.

Where Inductor generates Triton (GPUs; CPU with ``cpu_backend = "triton"``): a plan and a masked store
-------------------------------------------------------------------------------------------------------
:func:`_traced_store_masked`: two generated kernels per call, for every addressing mode. Each element's target
slot (``-1`` where it writes nothing) goes to ``kvpass::_last_writer_slots`` (``kvpass/ops/_last_writer.py``),
whose lowering is one reduction kernel: each element keeps its slot if no later element targets it, else ``-1``
(a ``(T, T)`` comparison reduced by ``any``, the index arithmetic recomputed inline for both sides, with the row
search ``kvpass::_searchsorted_inline`` (``kvpass/ops/_inline_search.py``): Inductor's own ``searchsorted``
realizes its result in a kernel of its own). It depends on the addressing only, so layers that store with the
same addressing in one graph share it. The store is ``kvpass::_masked_index_put`` (``kvpass/ops/_masked_store.py``),
lowered by kvpass into Inductor's own scatter with its store under ``ops.masked``: Triton emits
``tl.store(ptr, value, winner >= 0 & xmask)``, so skipped and overwritten tokens write (and load) nothing, the
masked-in targets are unique, and the producers of the states (RMSNorm, RoPE, quantization) stay in that kernel,
K and V together; it reads one index per element (the plan's output). ``chunk_metadata`` is planned per
``(chunk, offset in its block)`` element (see :func:`_plan`), so no scan of the chunk lengths is needed; the
price is ``num_chunks * block_size`` elements instead of ``tokens`` (more when chunks are short, e.g. one token
per chunk in large blocks), and the plan's comparisons grow with its square. The
sort-and-free-slot lowering below took 9 to 11 kernels; the same plan written in ATen ops 3 (``cu_q_lens``) and
4 (``chunk_metadata``). The cost of the plan grows as ``T**2`` comparisons (no sort, no free slot, no snapshot);
exports (``torch.compiler.is_exporting()``) keep the lowering below, which uses ATen ops only.

Masking under Inductor's C++ backend (the choice, and why)
----------------------------------------------------------
An ``index_put`` has no per-element mask, and Inductor's C++ backend cannot emit a masked store (its
``_unsafe_masked_index_put_accumulate`` lowering says so; ``ops.masked`` forbids stores there). The lowering
therefore relies on nothing Inductor does not promise: no order of duplicate writes, no vectorized
``argmin``/``argmax``, no reduction over a narrow dtype, no read of a cache slot that the same kernel writes with
another value.

1. **One writer per slot.** The element targets are sorted (stably; skipped elements get keys past every slot);
   of the valid elements that target one slot only the last in element order writes it (the per-token reference
   and the upstream loop keep the last one; eager applies the same rule, so the two agree even then).
2. **A free slot, by arithmetic.** Along the sorted keys, a written slot ``s`` has ``s - (D - 1)`` free slots
   below it (``D``: distinct written slots so far, a ``cumsum``), so the lowest free slot is found with one
   ``searchsorted``. It exists whenever the cache has more slots than ``tokens`` (decided at trace time).
3. **A snapshot, then one scatter.** The free slot's ``(1, kv_heads, head_dim)`` contents are copied into a
   buffer of their own; every element that writes nothing targets the free slot with that snapshot as its value.
   All writes to the free slot are bit-identical copies of what it already holds, every other slot has at most
   one writer, so the result is the same in any order and on any number of threads. The states flow straight
   into the one scatter (fused with RMSNorm/RoPE producers); the index work is a few tiny kernels plus a sort
   and two cumsums of ``tokens`` int64s.

Every index is range-checked or clamped before it addresses memory, and out-of-range targets are masked like
padding, so the compiled op matches eager exactly, including on inputs eager would reject (block ids
``>= num_blocks`` or ``< -1``, chunks past the block or the token range, non-monotone ``cu_q_lens``). When the
cache has no more slots than ``tokens`` there may be no free slot; then the new contents of every slot are
gathered (``owner[slot]``: its writer, or none) and written with a pointwise ``copy_``, as cheap as the scatter
since the cache is the smaller side.

Why not ``argmin``: an earlier version took the free slot as ``argmin`` of an int8 mark vector. Inductor's CPU
vectorized ``argmin``/``argmax`` (``cpp_prefix.h``, torch 2.13) is wrong for dtypes narrower than its tiling
(int8/uint8): lanes past the tiling factor are reduced too, holding whatever the partial load left there (AVX2's
``loadu(ptr, count)`` fills them with 1; AVX-512's 16-element fast path ``loadu_one_fourth`` leaves the upper
384 bits undefined, in practice 0) paired with index lanes ``argmin_vec_reduce_all`` never stored (stack
garbage). On AVX-512 a 0 lane ties with the first free slot and a garbage index wins, so a slot that a valid
token writes was taken as "free" and got its old contents back (one slot wrong: exactly the 512 = 4 heads x 128
elements reported). Upstream: pytorch/pytorch#191499. ``tests/test_store_isa.py`` keeps a standalone
reproduction and runs the compiled store under every vector ISA the CPU offers.

Compile caches
--------------
AOTAutograd's on-disk cache keys a compiled graph on the Dynamo graph, which names
``kvpass.store_paged_kv.default`` but not the Python decomposition above: after an upgrade of kvpass that changes
the lowering, a warm cache can serve code compiled from the old one (measured on torch 2.13). Clear the caches
(``torch._inductor.utils.clear_inductor_caches()`` and the cache directory) after upgrading, or compile with
``torch._functorch.config.enable_autograd_cache=False``; a kvpass Inductor pass whose ``uuid()`` hashes this file
also keys the cache on it.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..errors import KVPassError
from . import _inline_search, _last_writer, _masked_store, _plan_sharing

__all__ = [
    "store_paged_kv", "store_paged_single", "gather_paged_kv", "quantize", "LAYOUTS", "QUANT_DTYPES",
    "PagedStoreError", "PagedStoreValueError", "PagedStoreTypeError",
]

LAYOUTS = ("HND", "NHD")
"""Cache layouts: ``"HND"`` is ``(num_blocks, kv_heads, block_size, head_dim)``, ``"NHD"`` is
``(num_blocks, block_size, kv_heads, head_dim)``."""


QUANT_DTYPES = (torch.int8, torch.float8_e4m3fn, torch.float8_e5m2)
"""Cache dtypes a store writes through a scale (``k_scale``/``v_scale``/``scale``)."""

_FLOAT_STATES = (torch.float32, torch.float16, torch.bfloat16)


def quantize(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` ``(n, kv_heads, head_dim)`` quantized to ``dtype`` with a float32 ``scale`` of shape ``[1]`` or
    ``[kv_heads]``: ``x / scale`` in float32, then for int8 ``torch.round`` (half to even) and a clamp to
    ``[-128, 127]``, for fp8 a clamp to ``±finfo(dtype).max`` (saturating, as vLLM's ``__NV_SATFINITE``) and
    ``.to(dtype)`` (round to nearest even).

    kvpass divides by the scale, as vLLM's ``reshape_and_cache`` does; SGLang multiplies by a precomputed
    reciprocal, which can differ by one ulp of ``x / scale`` before rounding and so, rarely, by one quantization
    step after it.
    """
    y = x.float() / scale.view(1, -1, 1)
    if dtype == torch.int8:
        return torch.round(y).clamp(-128, 127).to(dtype)
    m = torch.finfo(dtype).max
    return y.clamp(-m, m).to(dtype)


def _scales(scales, n):
    """``scales`` as a list of ``(argument_name, tensor_or_None)``, one per (states, cache) pair."""
    return list(scales) if scales is not None else [("scale", None)] * n


class PagedStoreError(KVPassError):
    """A paged store op rejected its arguments; nothing was written. ``argument`` names the offending one."""

    def __init__(self, op: str, argument: str, message: str):
        self.op = op
        self.argument = argument
        super().__init__(f"{op}: {argument}: {message}")


class PagedStoreValueError(PagedStoreError, ValueError):
    """A shape, rank, device, layout, index value or addressing-mode error (also a ``ValueError``)."""


class PagedStoreTypeError(PagedStoreError, TypeError):
    """A type error: states and cache dtypes differ, an index tensor is not int32, or an argument is not a tensor
    (also a ``TypeError``)."""


# ----------------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------------


def _cache_geometry(cache: torch.Tensor, layout: str) -> tuple[int, int, int, int]:
    """``(num_blocks, kv_heads, block_size, head_dim)`` of a cache in ``layout``."""
    if layout == "HND":
        nb, h, bs, d = cache.shape
    else:
        nb, bs, h, d = cache.shape
    return nb, h, bs, d


def _validate_static(op: str, pairs: Sequence[tuple[str, torch.Tensor, str, torch.Tensor]],
                     block_table, cu_q_lens, context_kv_lens, chunk_metadata, layout, slot_mapping=None,
                     scales=None) -> None:
    """Checks that need only metadata (ranks, dtypes, devices, shapes, argument combinations).

    Runs in eager and at trace time. ``pairs`` is ``[(states_name, states, cache_name, cache), ...]``.
    """
    def bad(arg, msg):
        raise PagedStoreValueError(op, arg, msg)

    def bad_type(arg, msg):
        raise PagedStoreTypeError(op, arg, msg)

    if not isinstance(layout, str) or layout not in LAYOUTS:
        bad("layout", f"expected one of {LAYOUTS} (HND: (num_blocks, kv_heads, block_size, head_dim); "
                      f"NHD: (num_blocks, block_size, kv_heads, head_dim)), got {layout!r}")
    shape_name = ("(num_blocks, kv_heads, block_size, head_dim)" if layout == "HND"
                  else "(num_blocks, block_size, kv_heads, head_dim)")
    for (s_name, states, c_name, cache), (q_name, scale) in zip(pairs, _scales(scales, len(pairs))):
        for name, t in ((s_name, states), (c_name, cache)):
            if not isinstance(t, torch.Tensor):
                bad_type(name, f"expected a torch.Tensor, got {type(t).__name__}")
        if states.dim() != 3:
            bad(s_name, f"expected rank 3 (tokens, kv_heads, head_dim), got shape {tuple(states.shape)}")
        if cache.dim() != 4:
            bad(c_name, f"expected rank 4 {shape_name} for layout={layout!r}, got shape {tuple(cache.shape)}")
        if scale is not None:
            _validate_scale(op, q_name, scale, s_name, states, c_name, cache, layout)
        elif cache.dtype in QUANT_DTYPES and states.dtype != cache.dtype:
            bad_type(q_name, f"required: {c_name} is a quantized {cache.dtype} cache and {s_name} is "
                             f"{states.dtype} (give a float32 scale of shape [1] or [kv_heads])")
        elif states.dtype != cache.dtype:
            bad_type(c_name, f"dtype {cache.dtype} differs from {s_name}'s dtype {states.dtype}")
        if states.device != cache.device:
            bad(c_name, f"is on {cache.device} but {s_name} is on {states.device}")
        nb, h, bs, d = _cache_geometry(cache, layout)
        if states.shape[1] != h or states.shape[2] != d:
            bad(s_name, f"shape {tuple(states.shape)} does not match {c_name} {tuple(cache.shape)} "
                        f"(layout={layout!r}: kv_heads={h}, head_dim={d})")
    first_states, first_cache = pairs[0][1], pairs[0][3]
    geometry = _cache_geometry(first_cache, layout)
    for s_name, states, c_name, cache in pairs[1:]:
        if states.shape[0] != first_states.shape[0]:
            bad(s_name, f"has {states.shape[0]} tokens but {pairs[0][0]} has {first_states.shape[0]}")
        if states.device != first_states.device:
            bad(s_name, f"is on {states.device} but {pairs[0][0]} is on {first_states.device}")
        g = _cache_geometry(cache, layout)
        if g[:3] != geometry[:3]:
            bad(c_name, f"shape {tuple(cache.shape)} does not match {pairs[0][2]} {tuple(first_cache.shape)} "
                        f"(num_blocks, kv_heads and block_size must agree)")
        if _overlaps(cache, first_cache):
            bad(c_name, f"shares memory with {pairs[0][2]}; use store_paged_single for a cache that serves as "
                        f"both K and V")
    device = first_states.device

    def index(name, t, rank, dtype=torch.int32):
        if t is None:
            return
        if not isinstance(t, torch.Tensor):
            bad_type(name, f"expected a {str(dtype)[6:]} torch.Tensor or None, got {type(t).__name__}")
        if t.dtype != dtype:
            bad_type(name, f"expected dtype {dtype}, got {t.dtype}")
        if t.dim() != rank:
            bad(name, f"expected rank {rank}, got shape {tuple(t.shape)}")
        if t.device != device:
            bad(name, f"is on {t.device} but the states are on {device}")

    if slot_mapping is not None:
        mixed = [n for n, t in (("block_table", block_table), ("cu_q_lens", cu_q_lens),
                                ("context_kv_lens", context_kv_lens), ("chunk_metadata", chunk_metadata))
                 if t is not None]
        if mixed:
            bad("slot_mapping", f"cannot be combined with {', '.join(mixed)}: give exactly one addressing mode "
                                f"(slot_mapping, chunk_metadata, or block_table + cu_q_lens + context_kv_lens)")
        index("slot_mapping", slot_mapping, 1, torch.int64)
        if slot_mapping.shape[0] > first_states.shape[0]:
            bad("slot_mapping", f"has {slot_mapping.shape[0]} entries but there are only "
                                f"{first_states.shape[0]} tokens (the states may be longer, not shorter)")
        return
    if chunk_metadata is not None:
        mixed = [n for n, t in (("block_table", block_table), ("cu_q_lens", cu_q_lens),
                                ("context_kv_lens", context_kv_lens)) if t is not None]
        if mixed:
            bad("chunk_metadata", f"cannot be combined with {', '.join(mixed)}: give either chunk_metadata or "
                                  f"block_table + cu_q_lens + context_kv_lens")
        index("chunk_metadata", chunk_metadata, 2)
        if chunk_metadata.shape[1] != 4:
            bad("chunk_metadata", f"expected shape (num_chunks, 4) with rows (src_token_start, dst_block, "
                                  f"dst_offset, length), got {tuple(chunk_metadata.shape)}")
        return
    if block_table is None:
        bad("block_table", "required unless chunk_metadata or slot_mapping is given")
    if context_kv_lens is None:
        bad("context_kv_lens", "required with block_table (tokens already cached per row, -1 for a padding row)")
    index("block_table", block_table, 2)
    index("context_kv_lens", context_kv_lens, 1)
    index("cu_q_lens", cu_q_lens, 1)
    rows = context_kv_lens.shape[0]
    if block_table.shape[0] != rows:
        bad("block_table", f"has {block_table.shape[0]} rows but context_kv_lens has {rows} entries")
    if cu_q_lens is not None:
        if cu_q_lens.shape[0] != rows + 1:
            bad("cu_q_lens", f"expected {rows + 1} entries (rows + 1), got {cu_q_lens.shape[0]}")
    elif first_states.shape[0] != rows:
        bad("context_kv_lens", f"decode mode (cu_q_lens=None) needs one token per row, but there are {rows} rows "
                               f"and {first_states.shape[0]} tokens")


def _validate_scale(op, q_name, scale, s_name, states, c_name, cache, layout) -> None:
    """Metadata checks of a quantization scale (its values are checked in eager by :func:`_validate_data`)."""
    if not isinstance(scale, torch.Tensor):
        raise PagedStoreTypeError(op, q_name, f"expected a float32 torch.Tensor or None, got {type(scale).__name__}")
    if cache.dtype not in QUANT_DTYPES:
        raise PagedStoreTypeError(op, q_name, f"given, but {c_name} has dtype {cache.dtype}: a scale needs an "
                                              f"int8, float8_e4m3fn or float8_e5m2 cache")
    if states.dtype not in _FLOAT_STATES:
        raise PagedStoreTypeError(op, s_name, f"dtype {states.dtype}: a quantized store takes float32, float16 "
                                              f"or bfloat16 states")
    if scale.dtype != torch.float32:
        raise PagedStoreTypeError(op, q_name, f"expected dtype torch.float32, got {scale.dtype}")
    heads = _cache_geometry(cache, layout)[1]
    if scale.dim() != 1 or scale.shape[0] not in (1, heads):
        raise PagedStoreValueError(op, q_name, f"expected shape [1] (per tensor) or [{heads}] (per kv head), got "
                                               f"{tuple(scale.shape)}")
    if scale.device != states.device:
        raise PagedStoreValueError(op, q_name, f"is on {scale.device} but {s_name} is on {states.device} (a scale "
                                               f"on another device would need a copy and a sync per call)")


def _overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when ``a`` and ``b`` are the same memory viewed the same way (the one aliasing a store can detect
    cheaply). Disjoint views of one buffer, such as ``kv[:, 0]`` and ``kv[:, 1]``, are fine."""
    if a is b:
        return True
    from torch._subclasses.fake_tensor import is_fake

    if is_fake(a) or is_fake(b) or a.device.type == "meta":  # no data pointer under tracing
        return False
    try:
        return (a.data_ptr() == b.data_ptr() and a.device == b.device and a.shape == b.shape
                and a.stride() == b.stride())
    except RuntimeError:  # other wrapper tensors without storage
        return False


def _validate_data(op: str, num_tokens: int, num_blocks: int, block_size: int,
                   block_table, cu_q_lens, context_kv_lens, chunk_metadata, slot_mapping=None, scales=()) -> None:
    """Data-dependent checks (eager only): evaluated on device, one host sync, messages name the argument."""
    checks: list[tuple[str, torch.Tensor, str]] = []
    for name, scale in scales or ():
        if scale is not None:
            checks.append((name, ~((scale > 0) & torch.isfinite(scale)), "entries must be finite and > 0"))
    if slot_mapping is not None:
        checks.append(("slot_mapping", slot_mapping >= num_blocks * block_size,
                       f"slots must be < num_blocks * block_size = {num_blocks * block_size} (negative: skipped)"))
    elif chunk_metadata is not None:
        src, blk, off, ln = chunk_metadata.to(torch.int64).unbind(1)
        stored = blk >= 0  # a dst_block = -1 row is padding: skipped whatever its other columns say
        checks += [
            ("chunk_metadata", (blk < -1) | (blk >= num_blocks), f"dst_block (column 1) outside [-1, {num_blocks})"),
            ("chunk_metadata", stored & (ln < 0), "negative length (column 3)"),
            ("chunk_metadata", stored & ((src < 0) | (src + ln > num_tokens)),
             f"source tokens [src_token_start, src_token_start + length) outside [0, {num_tokens})"),
            ("chunk_metadata", stored & ((off < 0) | (off + ln > block_size)),
             f"destination [dst_offset, dst_offset + length) outside the block [0, {block_size})"),
            ("chunk_metadata", torch.where(stored, ln.clamp_min(0), 0).sum() > num_tokens,
             f"total length of the stored chunks (dst_block >= 0) exceeds the {num_tokens} tokens"),
        ]
    else:
        checks += [
            ("block_table", (block_table < -1) | (block_table >= num_blocks),
             f"block ids must lie in [-1, {num_blocks}) (-1 marks an unused entry)"),
            ("context_kv_lens", context_kv_lens < -1, "entries must be >= 0, or -1 for a padding row"),
        ]
        if cu_q_lens is not None:
            checks += [
                ("cu_q_lens", cu_q_lens[:1] < 0, "cu_q_lens[0] must be >= 0"),
                ("cu_q_lens", cu_q_lens[1:] < cu_q_lens[:-1], "must be non-decreasing (cumulative token counts)"),
                ("cu_q_lens", cu_q_lens[-1:] > num_tokens, f"last entry exceeds the {num_tokens} tokens"),
            ]
    if not checks:
        return
    flags = torch.stack([c.any() for _, c, _ in checks])
    if bool(flags.any()):  # the one host sync of a valid call
        i = int(flags.to(torch.int8).argmax())
        arg, cond, msg = checks[i]
        where = cond.nonzero()
        at = f" (first at index {tuple(int(x) for x in where[0])})" if where.dim() == 2 and where.shape[1] else ""
        raise PagedStoreValueError(op, arg, msg + at)


# ----------------------------------------------------------------------------------------------------------
# The plan: per element, which token to read and which slot to write
# ----------------------------------------------------------------------------------------------------------


def _plan(num_tokens, num_blocks: int, block_size: int, device,
          block_table, cu_q_lens, context_kv_lens, chunk_metadata, slot_mapping=None, index_dtype=torch.int64,
          search=torch.searchsorted):
    """``(src, blk, off, valid, src_is_identity)`` for the store's elements, or ``None`` if nothing can be written.

    Elements are the tokens (``num_tokens`` of them) for ``slot_mapping`` and ``block_table``; for
    ``chunk_metadata`` they are ``(chunk, offset in the block)`` pairs, chunk-major (``num_chunks * block_size``):
    element ``(c, k)`` writes offset ``k`` of chunk ``c``'s block from token ``src_c + k - dst_offset_c`` if that
    lies in the chunk. Element order is the order in which the last writer of a slot is decided (tokens; chunks,
    then positions in a chunk, which never share a slot). Chunks need no scan of their lengths this way (a chunk
    never crosses a block, so every element it stores has an offset of its block).

    Pure, shape-static index arithmetic (no host sync): usable in eager and under tracing. Every index used to
    address memory here is clamped into range first, so garbage metadata cannot read out of bounds; ``valid`` is
    False for padding rows, ``-1`` blocks, tokens past the table, and any out-of-range target. ``index_dtype``
    is the dtype of the token index and of the row search; ``search`` is the row search
    (``torch.searchsorted`` or :func:`~kvpass.ops._inline_search.searchsorted_inline`).
    """
    i64 = torch.int64
    if chunk_metadata is not None:
        num_chunks = chunk_metadata.shape[0]
        if num_chunks == 0 or num_tokens == 0:
            return None
        src0, dblk, doff, ln = (x[:, None] for x in chunk_metadata.to(index_dtype).unbind(1))
        k = torch.arange(block_size, device=device, dtype=index_dtype)[None, :]
        j = k - doff  # position of offset k inside the chunk
        src = src0 + j
        valid = ((j >= 0) & (j < ln) & (src >= 0) & (src < num_tokens) & (dblk >= 0) & (dblk < num_blocks))
        blk = dblk.expand(num_chunks, block_size)
        return (src.clamp(0, num_tokens - 1).reshape(-1), blk.reshape(-1).to(i64),
                k.expand(num_chunks, block_size).reshape(-1).to(i64), valid.reshape(-1), False)
    e = torch.arange(num_tokens, device=device, dtype=index_dtype)
    if slot_mapping is not None:  # element e is token e; tokens past the mapping are ignored
        n = slot_mapping.shape[0]
        if n == 0:
            return None
        slot = slot_mapping[e.clamp(max=n - 1)]
        valid = (e < n) & (slot >= 0) & (slot < num_blocks * block_size)
        slot = slot.clamp(0, num_blocks * block_size - 1)
        blk = torch.div(slot, block_size, rounding_mode="floor")
        return e, blk, slot - blk * block_size, valid, True

    rows, width = block_table.shape
    if rows == 0 or width == 0:
        return None
    ctx = context_kv_lens.to(i64)
    if cu_q_lens is None:  # decode: element e is the single new token of row e
        b = e
        t = torch.zeros_like(e)
        in_row = torch.ones_like(e, dtype=torch.bool)
    else:
        cu = cu_q_lens.to(index_dtype)
        b = search(cu[1:], e, right=True)  # row of token e: the number of row ends <= e
        b = b.clamp(max=rows - 1)
        start = cu[b]
        t = e - start
        in_row = (t >= 0) & (e < cu[b + 1])
    ctx_b = ctx[b]
    pos = ctx_b + t
    lb = torch.div(pos, block_size, rounding_mode="floor")
    off = pos - lb * block_size
    blk = block_table[b, lb.clamp(0, width - 1)].to(i64)
    valid = in_row & (ctx_b >= 0) & (lb < width) & (blk >= 0) & (blk < num_blocks)
    return e, blk, off, valid, True


def _cache_index(layout: str, blk, off, kv_heads: int):
    """Advanced-index tuple addressing ``(element, head)`` of a cache; the value tensor is ``(n, kv_heads, D)``."""
    if layout == "HND":
        h = torch.arange(kv_heads, device=blk.device)
        return blk[:, None], h[None, :], off[:, None]
    return blk, off


# ----------------------------------------------------------------------------------------------------------
# Eager kernel and the decomposition used under tracing
# ----------------------------------------------------------------------------------------------------------


def _eager_store(op, pairs, block_table, cu_q_lens, context_kv_lens, chunk_metadata, layout, slot_mapping=None,
                 scales=None):
    scales = _scales(scales, len(pairs))
    _validate_static(op, pairs, block_table, cu_q_lens, context_kv_lens, chunk_metadata, layout, slot_mapping, scales)
    states0, cache0 = pairs[0][1], pairs[0][3]
    nb, h, bs, _ = _cache_geometry(cache0, layout)
    T = states0.shape[0]
    _validate_data(op, T, nb, bs, block_table, cu_q_lens, context_kv_lens, chunk_metadata, slot_mapping, scales)
    if T == 0 or nb == 0:
        return
    plan = _plan(T, nb, bs, states0.device, block_table, cu_q_lens, context_kv_lens, chunk_metadata, slot_mapping)
    if plan is None:
        return
    src, blk, off, valid, identity = plan
    _, order, win = _last_writer_wins(blk * bs + off, valid, nb * bs)
    valid = _unsort(order, win)  # one write per slot: the last token that targets it
    sel = valid.nonzero().squeeze(1)  # free on CPU; on GPU the second sync of the call (after validation)
    n = sel.shape[0]
    if n == 0:
        return
    dense = identity and n == T
    if not dense:
        blk, off, src = blk[sel], off[sel], src[sel]
    idx = rows = None
    with torch.no_grad():
        for (_, states, _, cache), (_, scale) in zip(pairs, scales):
            values = states if dense else states.index_select(0, src)
            if scale is not None:
                values = quantize(values, scale, cache.dtype)
            if cache.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):  # ATen's CPU scatters lack fp8: bytes
                cache, values = cache.view(torch.uint8), values.view(torch.uint8)
            if layout == "HND" and cache.is_contiguous():
                # rows of head_dim: index_copy_ on the (num_blocks*kv_heads*block_size, head_dim) view is the
                # fastest ATen scatter on CPU for this layout
                if rows is None:
                    heads = torch.arange(h, device=blk.device)
                    rows = ((blk[:, None] * h + heads) * bs + off[:, None]).reshape(-1)
                cache.view(-1, cache.shape[-1]).index_copy_(0, rows, values.reshape(-1, cache.shape[-1]))
            else:
                if idx is None:
                    idx = _cache_index(layout, blk, off, h)
                cache.index_put_(idx, values)


def _last_writer_wins(flat: torch.Tensor, valid: torch.Tensor, num_slots: int):
    """Sort the element targets; drop all but the last valid element of each target slot.

    Returns ``(keys, order, win)``: ``keys`` are the targets sorted stably (skipped elements get the distinct
    keys ``num_slots + e``, past every slot), ``order`` the sorting permutation, and ``win`` (in sorted order)
    marks the one element per distinct valid target that is written: the last in element order, as the
    upstream loop and the per-token reference keep it. No two writes of different values then target one
    slot, so no result depends on the order in which a kernel (or its threads) performs duplicate writes.
    """
    e = torch.arange(flat.shape[0], device=flat.device)
    keys, order = torch.sort(torch.where(valid, flat, num_slots + e), stable=True)
    in_cache = keys < num_slots
    last_of_group = torch.ones_like(in_cache)
    last_of_group[:-1] = keys[1:] != keys[:-1]
    return keys, order, in_cache & last_of_group


def _unsort(order: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``x`` (given in sorted order) back in element order: a scatter through a permutation (unique indices),
    which Inductor materializes as a buffer of its own, so the cache scatter loads one index per element."""
    return torch.zeros_like(x).scatter(0, order, x)


def _first_free_slot(keys: torch.Tensor, nslots: int) -> torch.Tensor:
    """The lowest slot that no element writes, as a ``(1,)`` int64 tensor, by arithmetic on the sorted keys.

    With ``D[i]`` the number of distinct written slots among ``keys[:i+1]``, a written slot ``keys[i]`` has
    ``keys[i] - (D[i] - 1)`` free slots below it (non-decreasing along the keys), so the lowest free slot is the
    number of written slots with no free slot below them: ``D`` at the end of the run of zeros. Exists whenever
    fewer than ``nslots`` slots are written (the caller guarantees it). No ``argmin``: Inductor's vectorized
    ``argmin`` of int8 reads lanes it never loaded (the AVX-512 miscompile; see the module docstring).
    """
    T = keys.shape[0]
    in_cache = keys < nslots
    first_of_group = in_cache.clone()
    first_of_group[1:] = in_cache[1:] & (keys[1:] != keys[:-1])
    distinct = torch.cumsum(first_of_group.to(torch.int64), 0)
    free_below = torch.where(in_cache, keys - (distinct - 1), nslots + T)
    zero = torch.zeros(1, dtype=torch.int64, device=keys.device)
    n_written_below = torch.searchsorted(free_below, zero, right=True)  # entries with no free slot below them
    free = torch.where(n_written_below > 0, distinct[(n_written_below - 1).clamp(min=0)], 0)
    return free.clamp(0, nslots - 1)


def _traced_plan(T, nb, bs, h, layout, device, masked, block_table, cu_q_lens, context_kv_lens, chunk_metadata,
                 slot_mapping):
    """The addressing-only part of the traced store (shared by the stores of one trace that use the same
    addressing, see :mod:`kvpass.ops._plan_sharing`), or ``None`` if nothing can be written.

    Triton path (``masked``): ``(src, identity, winner)``. C++ path: ``("whole cache", keys, order, win, src)`` when
    every slot may be written, else ``("free slot", src, identity, idx, write, free_blk, free_off)``."""
    # Triton path: int32 token indices (the row search then reads cu_q_lens as it is: an int64 copy of it would be
    # one more kernel), and a row search that each kernel does inline (Inductor realizes a searchsorted: a kernel)
    plan = _plan(T, nb, bs, device, block_table, cu_q_lens, context_kv_lens, chunk_metadata, slot_mapping,
                 index_dtype=torch.int32 if masked else torch.int64,
                 search=_inline_search.searchsorted_inline if masked else torch.searchsorted)
    if plan is None:
        return None
    src, blk, off, valid, identity = plan
    if masked:
        return src, identity, _last_writer.last_writer_slots(torch.where(valid, blk * bs + off, -1))
    nslots = nb * bs
    keys, order, win = _last_writer_wins(blk * bs + off, valid, nslots)
    n = src.shape[0]  # elements: tokens, or (chunk, offset) pairs
    if not identity:
        src = _unsort(torch.arange(n, device=device), src)  # materialized once (see _unsort)
    if n >= nslots:  # trace-time: every slot may be written, so there may be no free slot
        return "whole cache", keys, order, win, src
    free = _first_free_slot(keys, nslots)
    # Every element's target slot in element order (materialized: the scatter loads one index per element);
    # elements that write nothing go to the free slot, with the free slot's own contents as their value.
    slot = _unsort(order, torch.where(win, keys, free))
    write = _unsort(order, win)[:, None, None]
    sb = torch.div(slot, bs, rounding_mode="floor")
    free_blk = torch.div(free, bs, rounding_mode="floor")
    return ("free slot", src, identity, _cache_index(layout, sb, slot - sb * bs, h), write, free_blk,
            free - free_blk * bs)


def _traced_store(op, pairs, block_table, cu_q_lens, context_kv_lens, chunk_metadata, layout, slot_mapping=None,
                  scales=None):
    """The decomposition: functional index arithmetic + one ``index_put_`` per cache (see "Masking under
    compile" in the module docstring)."""
    scales = _scales(scales, len(pairs))
    _validate_static(op, pairs, block_table, cu_q_lens, context_kv_lens, chunk_metadata, layout, slot_mapping, scales)
    states0, cache0 = pairs[0][1], pairs[0][3]
    nb, h, bs, _ = _cache_geometry(cache0, layout)
    T = states0.shape[0]
    if T == 0 or nb == 0:
        return
    device = states0.device
    masked = _masked_store.triton_backend(device) and not torch.compiler.is_exporting()
    addressing = (block_table, cu_q_lens, context_kv_lens, chunk_metadata, slot_mapping)
    plan = _plan_sharing.shared(addressing, (T, nb, bs, h, layout, masked, str(device)),
                                lambda: _traced_plan(T, nb, bs, h, layout, device, masked, *addressing))
    if plan is None:
        return
    if masked:
        src, identity, winner = plan
        _traced_store_masked(pairs, scales, layout, src, winner, identity, h, bs)
        return
    if plan[0] == "whole cache":
        _traced_store_whole_cache(pairs, scales, layout, *plan[1:], nb * bs, nb, bs)
        return
    _, src, identity, idx, write, free_blk, free_off = plan
    for (_, states, _, cache), (_, scale) in zip(pairs, scales):
        values = states if identity else states[src]
        fill = _slot_snapshot(cache, layout, free_blk, free_off, as_float=scale is not None)
        # pointwise either way: fuses with the producers of the states
        if scale is None:
            cache.index_put_(idx, torch.where(write, values, fill))
        else:
            cache.index_put_(idx, _blend_codes(write, values, scale, fill, cache.dtype))


def _traced_store_masked(pairs, scales, layout, src, winner, identity, h, bs):
    """The lowering where Inductor generates Triton: the plan (``winner``: each element's slot if it is the last
    writer of it, else ``-1``; :mod:`kvpass.ops._last_writer`, one generated kernel) and one masked scatter per
    cache (``kvpass::_masked_index_put``), which Inductor fuses into one kernel with the producers of the states
    and, for K and V of one head_dim, with each other: two generated kernels per call. Elements that write
    nothing (skipped, out of range, or overwritten later) are masked out of the store; no free slot, snapshot or
    order of duplicate writes is involved."""
    _masked_store.ensure_lowering()
    write = winner >= 0
    slot = winner.clamp(min=0)
    blk = torch.div(slot, bs, rounding_mode="floor")
    idx = list(_cache_index(layout, blk, slot - blk * bs, h))
    mask = write[:, None] if layout == "HND" else write
    for (_, states, _, cache), (_, scale) in zip(pairs, scales):
        values = states if identity else states[src]
        if scale is not None:
            values = quantize(values, scale, cache.dtype)
        # detached: a store is not differentiable (the eager kernel writes under no_grad; the custom op has no
        # autograd formula)
        torch.ops.kvpass._masked_index_put(cache, idx, values.detach(), mask)


def _blend_codes(write, values, scale, fill, dtype, scaled=False):
    """``where(write, quantize(values), fill)`` for a quantized (int8 or fp8) cache, blended in float32 and
    converted to ``dtype`` once.

    The quantized values are computed in float32 as :func:`quantize` computes them (int8: ``round`` half to even,
    then the clamp to ``[-128, 127]``; fp8: the clamp to the finite range), and ``fill.float()`` is the exact value
    of each kept code; the one conversion then gives :func:`quantize`'s codes where ``write`` and the kept codes
    elsewhere: an int8 code is an integer of ``[-128, 127]``, exact in float32 and converted back to itself by any
    rounding mode, and an fp8 code's float32 value converts back to the same code (finite values and infinities;
    a NaN stays a NaN, possibly with another sign bit).

    Why not blend the codes: Inductor (torch 2.13, CPU) cannot type a ``where`` between fp8 tensors ("Promotion
    for Float8 Types is not supported"), and its non-vectorized C++ turns a ``view(torch.uint8)`` of fp8 into a
    numeric conversion instead of a bit cast (found by the ``default``-ISA run of tests/test_store_isa.py); an
    int8 blend is tiled at int8's width while the quantization runs in float32 (measured 7x slower than this at
    4096 tokens, see BENCHMARKS.md)."""
    s = scale if scaled else scale.view(1, -1, 1)
    y = values.float() / s
    if dtype == torch.int8:
        y = torch.round(y).clamp(-128, 127)
    else:
        m = torch.finfo(dtype).max
        y = y.clamp(-m, m)
    return torch.where(write, y, fill.float()).to(dtype)


def _slot_snapshot(cache, layout, sb, so, as_float=False):
    """The current ``(1, kv_heads, head_dim)`` contents of slot ``(sb, so)`` (1-element index tensors), copied
    into a buffer of its own (a scatter into fresh zeros, which Inductor always materializes) so that the
    values of the cache scatter read the snapshot, not the cache: Inductor would otherwise realize all the
    values into a temporary (``index_put`` whose values read the destination), losing the fusion.

    ``as_float``: the snapshot holds the float32 value of each code (exact for int8 and fp8), which is all that
    :func:`_blend_codes` reads (``fill.float()``). ATen has no CPU ``scatter`` for fp8, and this keeps the traced
    store runnable on ATen kernels (``backend="aot_eager"``, ``torch.library.opcheck``) without a
    ``view(torch.uint8)`` of fp8, which Inductor's non-vectorized C++ converts instead of bit-casting (see
    :func:`_blend_codes`)."""
    snap = cache[sb, :, so, :] if layout == "HND" else cache[sb, so, :, :]  # (1, H, D) either way
    if as_float:
        snap = snap.float()
    out = torch.zeros_like(snap)
    return out.scatter(0, torch.zeros_like(snap, dtype=torch.int64), snap)


def _traced_store_whole_cache(pairs, scales, layout, keys, order, win, src, nslots, nb, bs):
    """More tokens than cache slots (a trace-time case): compute every slot's new contents with a gather and
    write the whole cache with a pointwise ``copy_`` (as cheap as the scatter here: the cache is the smaller).

    ``owner[slot]`` is the element that writes the slot, or ``-1``; it is built by a scatter with unique indices
    (winners to their slot, everything else to a trash entry of its own)."""
    T = keys.shape[0]
    device = keys.device
    dest = torch.where(win, keys, nslots + torch.arange(T, device=device))
    owner = torch.full((nslots + T,), -1, dtype=torch.int64, device=device).scatter(0, dest, order)[:nslots]
    owner = owner.view(nb, bs)
    token = src[owner.clamp(min=0)]  # (nb, bs)
    written = owner >= 0
    for (_, states, _, cache), (_, scale) in zip(pairs, scales):
        gathered = states[token]  # (nb, bs, h, d)
        if layout == "HND":
            gathered, mask = gathered.permute(0, 2, 1, 3), written[:, None, :, None]
            head_axis_scale = None if scale is None else scale.view(1, -1, 1, 1)
        else:
            mask = written[:, :, None, None]
            head_axis_scale = None if scale is None else scale.view(1, 1, -1, 1)
        if scale is None:
            new = torch.where(mask, gathered, cache)
        else:
            new = _blend_codes(mask, gathered, head_axis_scale, cache, cache.dtype, scaled=True)
        cache.copy_(new)


# ----------------------------------------------------------------------------------------------------------
# Registration
# ----------------------------------------------------------------------------------------------------------
# Op schemas (custom_op rejects keyword-only Tensor arguments, so chunk_metadata is the 8th/6th positional
# argument of the op and may be passed by keyword; the Python wrappers below make it keyword-only):
#   kvpass::store_paged_kv(Tensor key, Tensor value, Tensor(a2!) key_cache, Tensor(a3!) value_cache,
#       Tensor? block_table=None, Tensor? cu_q_lens=None, Tensor? context_kv_lens=None,
#       Tensor? chunk_metadata=None, Tensor? slot_mapping=None, Tensor? k_scale=None, Tensor? v_scale=None, *,
#       str layout="HND") -> ()
#   kvpass::store_paged_single(Tensor states, Tensor(a1!) cache, Tensor? block_table=None,
#       Tensor? cu_q_lens=None, Tensor? context_kv_lens=None, Tensor? chunk_metadata=None,
#       Tensor? slot_mapping=None, Tensor? scale=None, *,
#       str layout="HND") -> ()


@torch.library.custom_op("kvpass::store_paged_kv", mutates_args=("key_cache", "value_cache"))
def _store_paged_kv_op(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: Optional[torch.Tensor] = None,
    cu_q_lens: Optional[torch.Tensor] = None,
    context_kv_lens: Optional[torch.Tensor] = None,
    chunk_metadata: Optional[torch.Tensor] = None,
    slot_mapping: Optional[torch.Tensor] = None,
    k_scale: Optional[torch.Tensor] = None,
    v_scale: Optional[torch.Tensor] = None,
    *,
    layout: str = "HND",
) -> None:
    """Eager kernel of ``kvpass::store_paged_kv`` (see :func:`store_paged_kv`)."""
    _eager_store("store_paged_kv", [("key", key, "key_cache", key_cache), ("value", value, "value_cache", value_cache)],
                 block_table, cu_q_lens, context_kv_lens, chunk_metadata, layout, slot_mapping,
                 [("k_scale", k_scale), ("v_scale", v_scale)])


@torch.library.custom_op("kvpass::store_paged_single", mutates_args=("cache",))
def _store_paged_single_op(
    states: torch.Tensor,
    cache: torch.Tensor,
    block_table: Optional[torch.Tensor] = None,
    cu_q_lens: Optional[torch.Tensor] = None,
    context_kv_lens: Optional[torch.Tensor] = None,
    chunk_metadata: Optional[torch.Tensor] = None,
    slot_mapping: Optional[torch.Tensor] = None,
    scale: Optional[torch.Tensor] = None,
    *,
    layout: str = "HND",
) -> None:
    """Eager kernel of ``kvpass::store_paged_single`` (see :func:`store_paged_single`)."""
    _eager_store("store_paged_single", [("states", states, "cache", cache)],
                 block_table, cu_q_lens, context_kv_lens, chunk_metadata, layout, slot_mapping, [("scale", scale)])


@_store_paged_kv_op.register_fake
def _store_paged_kv_fake(key, value, key_cache, value_cache, block_table=None, cu_q_lens=None,
                         context_kv_lens=None, chunk_metadata=None, slot_mapping=None, k_scale=None, v_scale=None,
                         *, layout="HND"):
    _validate_static("store_paged_kv", [("key", key, "key_cache", key_cache),
                                        ("value", value, "value_cache", value_cache)],
                     block_table, cu_q_lens, context_kv_lens, chunk_metadata, layout, slot_mapping,
                     [("k_scale", k_scale), ("v_scale", v_scale)])


@_store_paged_single_op.register_fake
def _store_paged_single_fake(states, cache, block_table=None, cu_q_lens=None, context_kv_lens=None,
                             chunk_metadata=None, slot_mapping=None, scale=None, *, layout="HND"):
    _validate_static("store_paged_single", [("states", states, "cache", cache)],
                     block_table, cu_q_lens, context_kv_lens, chunk_metadata, layout, slot_mapping,
                     [("scale", scale)])


def _store_paged_kv_decomposition(key, value, key_cache, value_cache, block_table=None, cu_q_lens=None,
                                  context_kv_lens=None, chunk_metadata=None, slot_mapping=None, k_scale=None,
                                  v_scale=None, *, layout="HND"):
    _traced_store("store_paged_kv", [("key", key, "key_cache", key_cache),
                                     ("value", value, "value_cache", value_cache)],
                  block_table, cu_q_lens, context_kv_lens, chunk_metadata, layout, slot_mapping,
                  [("k_scale", k_scale), ("v_scale", v_scale)])


def _store_paged_single_decomposition(states, cache, block_table=None, cu_q_lens=None, context_kv_lens=None,
                                      chunk_metadata=None, slot_mapping=None, scale=None, *, layout="HND"):
    _traced_store("store_paged_single", [("states", states, "cache", cache)],
                  block_table, cu_q_lens, context_kv_lens, chunk_metadata, layout, slot_mapping, [("scale", scale)])


# A Python CompositeImplicitAutograd kernel is consulted only by OpOverload.decompose(): by FunctionalTensorMode
# (AOTAutograd under torch.compile, torch.export) and FakeTensorMode. Eager calls dispatch in C++ to the
# custom_op kernels above (CompositeExplicitAutograd + Autograd registrations win over it), so eager keeps its
# validation and compiled graphs get index arithmetic + index_put instead of an opaque auto_functionalized call.
_DK = torch._C.DispatchKey.CompositeImplicitAutograd
torch.ops.kvpass.store_paged_kv.default.py_impl(_DK)(_store_paged_kv_decomposition)
torch.ops.kvpass.store_paged_single.default.py_impl(_DK)(_store_paged_single_decomposition)


# ----------------------------------------------------------------------------------------------------------
# Public wrappers
# ----------------------------------------------------------------------------------------------------------


def store_paged_kv(key, value, key_cache, value_cache, block_table=None, cu_q_lens=None, context_kv_lens=None,
                   *, chunk_metadata=None, slot_mapping=None, k_scale=None, v_scale=None, layout="HND"):
    """Write new K and V tokens into paged caches, in place (``torch.ops.kvpass.store_paged_kv``).

    Args:
        key, value: ``(tokens, kv_heads, head_dim)`` new states (``value`` may have its own head_dim).
        key_cache, value_cache: ``(num_blocks, kv_heads, block_size, head_dim)`` (``layout="HND"``) or
            ``(num_blocks, block_size, kv_heads, head_dim)`` (``layout="NHD"``), same dtype and device as the
            states; written in place; must not share memory (use :func:`store_paged_single` for one cache).
        block_table: ``(B, max_blocks)`` int32 physical block ids, ``-1`` for unused entries.
        cu_q_lens: ``(B+1,)`` int32 cumulative new-token counts; ``None`` means decode (token ``i`` is row
            ``i``'s only new token, so ``tokens == B``).
        context_kv_lens: ``(B,)`` int32 tokens already cached per row (the write start), ``-1`` for a padding row.
        chunk_metadata: ``(num_chunks, 4)`` int32 rows ``(src_token_start, dst_block, dst_offset, length)``,
            each within one block; exclusive with ``block_table``/``cu_q_lens``/``context_kv_lens``.
        slot_mapping: ``(n,)`` int64 flat slot per token (vLLM's addressing): token ``t < n`` goes to block
            ``slot // block_size``, offset ``slot % block_size``; a negative slot is skipped, and tokens ``>= n``
            (rows of a padded batch) are ignored. Exclusive with the other addressing arguments.
        k_scale, v_scale: float32 scales of shape ``[1]`` (per tensor) or ``[kv_heads]`` on the states' device,
            required for (and only for) an int8 / float8_e4m3fn / float8_e5m2 cache: the stored value is
            :func:`quantize` ``(states, scale)`` (``x / scale``; int8: round half to even, clamp to [-128, 127];
            fp8: clamp to the dtype's finite range). Eager checks they are finite and > 0.
        layout: ``"HND"`` (default) or ``"NHD"``.

    Returns:
        ``(key_cache, value_cache)``, the same tensors, for parity with the upstream op.

    Raises:
        PagedStoreValueError / PagedStoreTypeError (``kvpass.KVPassError`` and ``ValueError``/``TypeError``),
        naming the argument, before anything is written. Under ``torch.compile`` only the metadata checks run (at
        trace time); out-of-range targets are skipped like padding (see the module docstring).
    """
    # Metadata checks before the dispatcher sees the arguments, so a wrong type gets kvpass's message too (under
    # Dynamo the op's fake/decomposition kernels run the same checks on the traced tensors).
    if not torch.compiler.is_compiling():
        _validate_static("store_paged_kv", [("key", key, "key_cache", key_cache),
                                            ("value", value, "value_cache", value_cache)],
                         block_table, cu_q_lens, context_kv_lens, chunk_metadata, layout, slot_mapping,
                         [("k_scale", k_scale), ("v_scale", v_scale)])
    torch.ops.kvpass.store_paged_kv(key, value, key_cache, value_cache, block_table, cu_q_lens, context_kv_lens,
                                    chunk_metadata, slot_mapping, k_scale, v_scale, layout=layout)
    return key_cache, value_cache


def store_paged_single(states, cache, block_table=None, cu_q_lens=None, context_kv_lens=None, *,
                       chunk_metadata=None, slot_mapping=None, scale=None, layout="HND"):
    """Write new K *or* V tokens into one paged cache, in place (``torch.ops.kvpass.store_paged_single``).

    The same addressing, layouts, validation and compile behaviour as :func:`store_paged_kv` for one
    ``(states, cache)`` pair: V-only stores, or ``attention_k_eq_v`` layers whose one cache serves as K and V.
    ``store_paged_single(k, k_cache, ...)`` writes exactly what ``store_paged_kv`` writes into ``key_cache``;
    ``scale`` plays the role of ``k_scale``.

    Returns:
        ``cache``, the same tensor.
    """
    if not torch.compiler.is_compiling():
        _validate_static("store_paged_single", [("states", states, "cache", cache)],
                         block_table, cu_q_lens, context_kv_lens, chunk_metadata, layout, slot_mapping,
                         [("scale", scale)])
    torch.ops.kvpass.store_paged_single(states, cache, block_table, cu_q_lens, context_kv_lens, chunk_metadata,
                                        slot_mapping, scale, layout=layout)
    return cache



def gather_paged_kv(cache, block_table, context_kv_lens, scale=None, *, layout="HND", dtype=None):
    """Read the cached history of every row back as one contiguous ``(tokens, kv_heads, head_dim)`` tensor.

    Row ``b`` contributes its ``context_kv_lens[b]`` positions ``0 .. ctx-1`` (block ``block_table[b, p //
    block_size]``, offset ``p % block_size``), rows in order, padding rows (``-1``) nothing; ``cu`` of the result
    is the running sum of ``max(ctx, 0)``. For attention implementations that read contiguous K/V, and for tests.

    Args:
        cache: a paged cache in ``layout`` (any dtype; int8 / float8 caches need ``scale``).
        block_table: ``(B, max_blocks)`` int32; context_kv_lens: ``(B,)`` int32, ``-1`` for a padding row.
        scale: the float32 ``[1]`` or ``[kv_heads]`` scale the cache was written with (quantized caches only):
            the result is ``cache.float() * scale`` (dequantization).
        dtype: the result's dtype (the states' dtype); default: the cache's dtype, float32 for a quantized cache.

    Raises:
        PagedStoreValueError / PagedStoreTypeError naming the argument: bad ranks, dtypes or devices, a position
        past the table width or in a ``-1`` / out-of-range block. Eager only: the result's length depends on the
        data (one host sync).
    """
    op = "gather_paged_kv"
    if not isinstance(layout, str) or layout not in LAYOUTS:
        raise PagedStoreValueError(op, "layout", f"expected one of {LAYOUTS}, got {layout!r}")
    if not isinstance(cache, torch.Tensor) or cache.dim() != 4:
        raise PagedStoreValueError(op, "cache", "expected a rank-4 paged cache tensor")
    nb, h, bs, d = _cache_geometry(cache, layout)
    for name, t, rank in (("block_table", block_table, 2), ("context_kv_lens", context_kv_lens, 1)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.int32:
            raise PagedStoreTypeError(op, name, "expected an int32 torch.Tensor")
        if t.dim() != rank or t.device != cache.device:
            raise PagedStoreValueError(op, name, f"expected rank {rank} on {cache.device}, got shape "
                                                 f"{tuple(t.shape)} on {t.device}")
    if block_table.shape[0] != context_kv_lens.shape[0]:
        raise PagedStoreValueError(op, "block_table", f"has {block_table.shape[0]} rows but context_kv_lens has "
                                                      f"{context_kv_lens.shape[0]} entries")
    quantized = cache.dtype in QUANT_DTYPES
    if scale is not None:
        if not quantized:
            raise PagedStoreTypeError(op, "scale", f"given, but the cache has dtype {cache.dtype}")
        if not isinstance(scale, torch.Tensor) or scale.dtype != torch.float32:
            raise PagedStoreTypeError(op, "scale", "expected a float32 torch.Tensor")
        if scale.dim() != 1 or scale.shape[0] not in (1, h) or scale.device != cache.device:
            raise PagedStoreValueError(op, "scale", f"expected shape [1] or [{h}] on {cache.device}, got "
                                                    f"{tuple(scale.shape)} on {scale.device}")
    elif quantized:
        raise PagedStoreTypeError(op, "scale", f"required to read a quantized {cache.dtype} cache")
    out_dtype = dtype or (torch.float32 if quantized else cache.dtype)
    lens = context_kv_lens.to(torch.int64).clamp(min=0)
    total = int(lens.sum())  # the host sync: the result's length
    row = torch.repeat_interleave(torch.arange(lens.shape[0], device=cache.device), lens, output_size=total)
    starts = torch.cumsum(lens, 0) - lens
    pos = torch.arange(total, device=cache.device) - starts[row]
    lb = torch.div(pos, bs, rounding_mode="floor")
    width = block_table.shape[1]
    blk = block_table[row, lb.clamp(max=max(width - 1, 0))].to(torch.int64) if width else lb.new_full(lb.shape, -1)
    bad = (lb >= width) | (blk < 0) | (blk >= nb)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise PagedStoreValueError(op, "block_table", f"row {int(row[i])} position {int(pos[i])} has no block "
                                                      f"(past the table width {width}, -1, or >= {nb})")
    off = pos - lb * bs
    x = cache[blk, :, off, :] if layout == "HND" else cache[blk, off, :, :]  # (tokens, kv_heads, head_dim)
    if quantized:
        x = x.float() * scale.view(1, -1, 1)
    return x.to(out_dtype)
