"""The rewrite catalogue, one rewrite per file, shipped as ``kvpass.patterns``.

``PATTERNS`` is the fixed order in which the pass manager runs them.
"""

PATTERNS: list = []
