"""The rewrite catalogue, one rewrite per file, shipped as ``kvpass.patterns``.

Each module documents the idiom it matches (as user code), the graph before and after, and why the rewrite
preserves semantics. ``PATTERNS`` is the fixed order in which the pass manager runs them: host padding moves to
the device first so that the buffer rewrites see device values; reads that repeat an earlier read of the same
buffer are merged before reads become history; padding that meets its own slice collapses; pure host hops go
last (what is left of a round trip after the buffer rewrites); a hand-written paged store loop becomes one
store op (independent of the others, after them).
"""

from . import buffer_history, host_concat, host_hop, host_padding, pad_slice, shared_read, store_loop

PATTERNS: list = [
    host_padding.PATTERN,
    host_concat.PATTERN,
    shared_read.PATTERN,
    buffer_history.PATTERN,
    pad_slice.PATTERN,
    host_hop.PATTERN,
    store_loop.PATTERN,
]
