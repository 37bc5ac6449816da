"""``torch.ops.kvpass._masked_index_put``: an ``index_put_`` that writes only where a mask is true, and its Inductor
lowering to one generated Triton kernel with a masked store.

``_masked_index_put(cache, indices, values, mask)`` does ``cache[indices][mask] = values[mask]``: ``indices`` are
advanced indices into the leading dims of ``cache`` (broadcast together to the index shape ``I``), ``mask`` is a
bool tensor broadcastable to ``I``, ``values`` broadcastable to ``I + cache.shape[len(indices):]``. The caller
guarantees that no two masked-in elements address the same location (the paged store's plan keeps one writer per
slot), so the result does not depend on the order of the writes. Masked-out elements may address anything in
range (their index is still range-checked by Inductor, never dereferenced for a write).

Why a custom op: ATen's ``index_put`` has no mask, and an unmasked scatter needs every element that must write
nothing to write *something* somewhere; the only exact choices are a slot that nobody writes plus its own old
contents (a free-slot search and a snapshot: extra kernels) or the winner's value (a gather of the producer at
another token, which Inductor cannot fuse through a reduction such as RMSNorm). Inductor's Triton backend stores
with a mask already (``tl.store(ptr, value, mask)``); its C++ backend cannot (``_unsafe_masked_index_put_accumulate``
in ``torch/_inductor/lowering.py`` says so, and ``Kernel.swap_buffers`` asserts that no store happens inside
``ops.masked``), so the lowering is used only where Inductor generates Triton (GPUs, or CPU with
``torch._inductor.config.cpu_backend = "triton"``) and falls back to the eager kernel elsewhere; the paged store
takes this path only there (``kvpass/ops/_store.py`` keeps its free-slot lowering for Inductor's C++ backend).

The lowering (:func:`_register_lowering`, registered on first use: importing Inductor costs seconds) is Inductor's
own ``index_put_`` lowering (``index_put_impl_``) with an ``ir.Scatter`` whose ``store_output`` wraps the store in
``ops.masked(mask, ...)``: Triton's ``masked`` emits the loads and the store of that block with the mask and-ed
into theirs, so masked-out elements load nothing and store nothing, and the producers of ``values`` (RMSNorm,
RoPE, quantization) stay in the kernel.
"""

from __future__ import annotations

import functools

import torch

@torch.library.custom_op("kvpass::_masked_index_put", mutates_args=("cache",))
def _masked_index_put(cache: torch.Tensor, indices: list[torch.Tensor], values: torch.Tensor,
                      mask: torch.Tensor) -> None:
    """Eager kernel: ``cache[indices][mask] = values[mask]`` (masked-in targets are unique)."""
    idx = torch.broadcast_tensors(*indices)
    shape = idx[0].shape
    sel = mask.expand(shape).nonzero(as_tuple=True)
    vals = values.expand(*shape, *cache.shape[len(indices):])[sel]
    target = tuple(i[sel] for i in idx)
    if cache.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):  # ATen's CPU scatters lack fp8: bytes
        cache, vals = cache.view(torch.uint8), vals.view(torch.uint8)
    with torch.no_grad():
        cache.index_put_(target, vals.to(cache.dtype))


@_masked_index_put.register_fake
def _masked_index_put_fake(cache, indices, values, mask):
    return None


def triton_backend(device: torch.device) -> bool:
    """True when Inductor generates Triton kernels for ``device`` (where the masked store lowers to one kernel)."""
    if device.type == "cpu":
        import sys

        inductor = sys.modules.get("torch._inductor.config")
        return inductor is not None and inductor.cpu_backend == "triton"
    return device.type in ("cuda", "xpu")


@functools.cache
def ensure_lowering() -> None:
    """Register the Inductor lowering of ``kvpass::_masked_index_put`` (once; called at trace time)."""
    _register_lowering()


def _register_lowering() -> None:
    from typing import Any, Callable, Optional

    from torch._inductor import config, ir
    from torch._inductor.lowering import (
        check_and_broadcast_indices, expand, fallback_handler, index_output_size_and_inner_fn, register_lowering,
        to_dtype,
    )
    from torch._inductor.utils import is_gpu
    from torch._inductor.virtualized import V, ops

    op = torch.ops.kvpass._masked_index_put.default
    fallback = fallback_handler(op, add_to_fallback_set=False)

    @ir.ir_dataclass
    class MaskedScatter(ir.Scatter):
        """A scatter whose store (and the loads of its value) run under ``mask_fn(index)``."""

        mask_fn: Optional[Callable[..., Any]] = None

        def store_output(self, output_name, indexer, vars):
            loader = self.make_loader()
            index = indexer(self.output_indexer(vars))
            mask = self.mask_fn(vars)
            name = output_name or "unnamed"

            def body():
                value = loader(vars)
                ops.store(name, index, value)
                return value

            return ops.masked(mask, body, 0)

    @register_lowering(op, type_promotion_kind=None)
    def lower(cache, indices, values, mask):
        device = cache.get_device()
        if not (is_gpu(device.type) or (device.type == "cpu" and config.cpu_backend == "triton")):
            return fallback(cache, indices, values, mask)  # Inductor's C++ has no masked store
        indices, tensor_indices = check_and_broadcast_indices(list(indices), device)
        assert tensor_indices == list(range(len(indices))), "leading advanced indices only"
        x_size = cache.get_size()
        tensor_size = list(indices[0].get_size())
        vals_size, output_indexer = index_output_size_and_inner_fn(
            x_size, indices, tensor_indices, tensor_size, [i.make_loader() for i in indices],
            [x_size[i] for i in range(len(indices))], None, check=True)
        values = expand(to_dtype(values, cache.get_dtype()), vals_size)
        mask_loader = expand(mask, tensor_size).make_loader()
        rank = len(tensor_size)
        cache.realize()
        scatter = MaskedScatter(device=device, dtype=cache.get_dtype(), inner_fn=values.make_loader(),
                                ranges=vals_size, output_indexer=output_indexer, scatter_mode=None,
                                mask_fn=lambda idx: mask_loader(idx[:rank]))
        buffer = ir.ComputedBuffer(name=None, layout=ir.MutationLayoutSHOULDREMOVE(cache), data=scatter)
        buffer.name = V.graph.register_buffer(buffer)
        V.graph.register_operation(buffer)
        return None
