"""Paged KV store ops (``torch.ops.kvpass.store_paged_kv`` / ``store_paged_single``).

Stands alone: imports neither the patterns nor the backend.
"""
