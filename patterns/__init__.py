"""The rewrite rules, one per file, shipped as ``kvpass.patterns``.

Each module's docstring states its equation, its side conditions and the idiom families (as user code) it
covers. ``PATTERNS`` is the fixed order the pass manager runs them in:

1. ``store_loop`` runs on the torch-level (Dynamo) graph, before functionalization: it turns an unrolled
   paged-store loop into one store op, which needs the loop's writes as written;
2. on the functional ATen IR (``kvpass.ir``): ``view_fold`` folds a reshape of a reshape of a cache buffer
   back to the buffer (a flat host array viewed afresh at every access), ``scatter_slice`` decomposes reads of
   the cache buffers' writes into the values written (K/V become graph edges), ``pad_slice`` cancels padding
   the reads slice off, and ``host_elimination`` moves what is left of host round trips to the device, where
   the copies collapse.
"""

from . import host_elimination, pad_slice, scatter_slice, store_loop, view_fold

PATTERNS: list = [
    store_loop.PATTERN,
    view_fold.PATTERN,
    scatter_slice.PATTERN,
    pad_slice.PATTERN,
    host_elimination.PATTERN,
]
