"""``torch.ops.kvpass._searchsorted_inline``: ``torch.searchsorted`` of a 1-D sorted sequence that Inductor computes
inside the kernels that read it instead of in a kernel of its own.

``_searchsorted_inline(sorted_sequence, values, right)`` equals ``torch.searchsorted(sorted_sequence, values,
right=right, out_int32=values.dtype == torch.int32)`` (``sorted_sequence`` 1-D, of ``values``' dtype).

Why an op of its own: Inductor's ``aten.searchsorted`` lowering always realizes its result ("[NOTE: inductor
bucketize realize]" in ``torch/_inductor/lowering.py``: a broadcast search should not be recomputed per element),
which costs the paged store a kernel launch per call on the Triton path (the row of each token is read by both the
plan's reduction and the store, so it becomes a buffer written by a kernel before both). The lowering here is the
same ``ops.bucketize`` (Triton: ``triton_helpers.bucketize_binary_search``, a binary search over the named
sequence buffer) in a ``Pointwise`` that is not realized, so every consumer inlines the search: the plan and the
store kernels each search ``log2(len(sorted_sequence))`` steps per element they need it for, and no kernel is
spent on the search. Registered on first use (:func:`ensure_lowering`), like ``kvpass::_masked_index_put``.
"""

from __future__ import annotations

import functools

import torch

@torch.library.custom_op("kvpass::_searchsorted_inline", mutates_args=())
def _searchsorted_inline(sorted_sequence: torch.Tensor, values: torch.Tensor, right: bool) -> torch.Tensor:
    """Eager kernel: ``torch.searchsorted`` with the result in ``values``' dtype (int32 or int64)."""
    return torch.searchsorted(sorted_sequence, values, right=right, out_int32=values.dtype == torch.int32)


@_searchsorted_inline.register_fake
def _searchsorted_inline_fake(sorted_sequence, values, right):
    return torch.empty_like(values)


def searchsorted_inline(sorted_sequence: torch.Tensor, values: torch.Tensor, right: bool = False) -> torch.Tensor:
    """``torch.searchsorted(sorted_sequence, values, right=right)`` (1-D ``sorted_sequence``, result in ``values``'
    integer dtype) that Inductor recomputes in each kernel reading it (see the module docstring)."""
    ensure_lowering()
    return torch.ops.kvpass._searchsorted_inline(sorted_sequence.to(values.dtype), values, right)


@functools.cache
def ensure_lowering() -> None:
    """Register the Inductor lowering of ``kvpass::_searchsorted_inline`` (once; called at trace time)."""
    _register_lowering()


def _register_lowering() -> None:
    from torch._inductor import lowering as L
    from torch._inductor.ir import Pointwise
    from torch._inductor.virtualized import ops

    op = torch.ops.kvpass._searchsorted_inline.default

    @L.register_lowering(op, type_promotion_kind=None)
    def lower(sorted_sequence, values, right):
        if not (L.V.graph.has_feature(sorted_sequence, L.BackendFeature.BUCKETIZE)
                and L.V.graph.has_feature(values, L.BackendFeature.BUCKETIZE)):
            return L.fallback_handler(op, add_to_fallback_set=False)(sorted_sequence, values, right)
        index_dtype = values.get_dtype()
        values_loader = values.make_loader()
        sorted_sequence = L._realize_bucketize_lookup_tensor(sorted_sequence)  # a named buffer to search

        def inner_fn(idx):
            return ops.bucketize(values_loader(idx), L._boundaries_helper(sorted_sequence),
                                 L._bucketize_indices(sorted_sequence, (), index_dtype), index_dtype, right)

        # not realized: the point of this op (Inductor's own lowering realizes here)
        return Pointwise.create(device=values.get_device(), dtype=index_dtype, inner_fn=inner_fn,
                                ranges=values.get_size())
