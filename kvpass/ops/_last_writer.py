"""``torch.ops.kvpass._last_writer_slots``: the paged store's plan on Inductor's Triton path, one generated kernel.

``_last_writer_slots(slots)`` takes each element's target slot (``slots[e] >= 0``; ``-1``: the element writes
nothing) and returns ``winner[e] = slots[e]`` where element ``e`` writes and no later element (``e' > e``) targets
the same slot, else ``-1``:

    winner[e] = slots[e]  if slots[e] >= 0 and not any(slots[e'] == slots[e] for e' > e)  else -1

The winners' slots are unique (two elements with one slot: only the later can win), so a scatter that writes
exactly the elements with ``winner >= 0`` is independent of the order of its writes, and its result is the upstream
loop's (the last writer of each slot, in element order).

Why an op of its own: written with ATen ops (``(slots[None, :] == slots[:, None]) & (e' > e)``, ``any(1)``, a
``where``), Inductor realizes the index arithmetic that ``slots`` is made of in a kernel of its own whenever it is
read more than once and is not tiny (its reuse heuristics: ``should_realize_on_reuse``), and then reads it back in
the reduction and the store: 3 kernels per call. Here ``slots`` has one reader (this op); the lowering builds the
``(T, T)`` reduction on ``slots``' loader (so the index arithmetic is recomputed inside the reduction, for ``e``
and for every ``e'``) and a pointwise epilogue that it realizes: Inductor's scheduler fuses the two into one
kernel, and the store then reads one index per element (``winner``), with no search and no arithmetic of its own.
The reduction is built without ``Reduction.create``'s split heuristic, which reads every dependency's index and
fails on the whole-buffer dependency of an inline ``ops.bucketize`` (``StarDep does not have an index``, torch
2.13); a split would cost a kernel anyway. The cost is ``T**2`` comparisons (and index arithmetic) per call,
shared by every layer that stores with the same addressing in one graph.

Registered on first use (:func:`ensure_lowering`); on Inductor's C++ backend the op runs its eager kernel (the
C++ path of the store does not use it).
"""

from __future__ import annotations

import functools

import torch

@torch.library.custom_op("kvpass::_last_writer_slots", mutates_args=())
def _last_writer_slots(slots: torch.Tensor) -> torch.Tensor:
    """Eager kernel: ``slots[e]`` where ``e`` is the last element with that slot (``slots[e] >= 0``), else ``-1``."""
    return _reference(slots)


@_last_writer_slots.register_fake
def _last_writer_slots_fake(slots):
    return torch.empty_like(slots)


def _reference(slots: torch.Tensor) -> torch.Tensor:
    """The definition, in ATen ops (eager kernel; also what the lowering computes)."""
    e = torch.arange(slots.shape[0], device=slots.device)
    later_same = (slots[None, :] == slots[:, None]) & (e[None, :] > e[:, None])
    return torch.where((slots >= 0) & ~later_same.any(1), slots, -1)


def last_writer_slots(slots: torch.Tensor) -> torch.Tensor:
    """``winner[e]``: ``slots[e]`` if element ``e`` is the last (in element order) to target that slot, else
    ``-1``; ``slots[e] < 0`` marks an element that writes nothing. See the module docstring."""
    ensure_lowering()
    return torch.ops.kvpass._last_writer_slots(slots)


@functools.cache
def ensure_lowering() -> None:
    """Register the Inductor lowering of ``kvpass::_last_writer_slots`` (once; called at trace time)."""
    _register_lowering()


def _register_lowering() -> None:
    from torch._inductor import ir
    from torch._inductor.lowering import fallback_handler, register_lowering
    from torch._inductor.virtualized import ops

    from ._masked_store import triton_backend

    op = torch.ops.kvpass._last_writer_slots.default
    fallback = fallback_handler(op, add_to_fallback_set=False)

    @register_lowering(op, type_promotion_kind=None)
    def lower(slots):
        device = slots.get_device()
        if not triton_backend(device):  # the C++ path of the store does not use this op
            return fallback(slots)
        (n,) = slots.get_size()
        dtype = slots.get_dtype()
        load = slots.make_loader()

        def overwritten(index, rindex):
            (e,), (later,) = index, rindex
            mine = load([e])
            same = ops.eq(load([later]), mine)
            after = ops.gt(ops.index_expr(later, torch.int64), ops.index_expr(e, torch.int64))
            return ops.bitwise_and(same, after)

        reduction = ir.TensorBox.create(ir.Reduction(
            device=device, dtype=torch.bool, inner_fn=overwritten, ranges=[n], reduction_ranges=[n],
            reduction_type="any", src_dtype=torch.bool, reduction_hint=ir.ReductionHint.DEFAULT))
        reduction.realize()
        lost = reduction.make_loader()

        def winner(index):
            mine = load(index)
            writes = ops.bitwise_and(ops.ge(mine, ops.constant(0, dtype)), ops.bitwise_not(lost(index)))
            return ops.where(writes, mine, ops.constant(-1, dtype))

        result = ir.Pointwise.create(device=device, dtype=dtype, inner_fn=winner, ranges=[n])
        result.realize()  # one index per element for the store; fused with the reduction as its epilogue
        return result
