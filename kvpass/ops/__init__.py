"""Paged KV store ops (``torch.ops.kvpass.store_paged_kv`` / ``store_paged_single``).

Stands alone: imports neither the patterns nor the backend. Importing this package registers the two ops
(``kvpass`` imports it). Semantics, validation, the eager kernel and the compile-time lowering are described in
:mod:`kvpass.ops._store`.
"""

from ._store import (
    LAYOUTS,
    QUANT_DTYPES,
    PagedStoreError,
    PagedStoreTypeError,
    PagedStoreValueError,
    gather_paged_kv,
    quantize,
    store_paged_kv,
    store_paged_single,
)

__all__ = [
    "store_paged_kv", "store_paged_single", "gather_paged_kv", "quantize", "LAYOUTS", "QUANT_DTYPES",
    "PagedStoreError", "PagedStoreValueError", "PagedStoreTypeError",
]
