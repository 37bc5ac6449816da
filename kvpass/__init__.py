"""kvpass: make shared-KV-cache decoders compile-clean and export-faithful.

Public API (see README.md)::

    gm2, report = kvpass.rewrite(gm, patterns=None, example_inputs=None, verify=False)
    text = kvpass.diff(before, after)
    torch.compile(model, backend="kvpass")          # entry point, no import needed
    kvpass.compile(model, **torch_compile_kwargs)
    torch.compile(model, backend=kvpass.backend(inner="inductor", patterns=None, on_report=None))
"""

from __future__ import annotations

from importlib import metadata as _metadata

from .dynamo_backend import KVPassWarning, backend, compile, kvpass_backend
from .graph_diff import diff, graph_text
from .engine import Match, Report, Skip
from .fidelity import Finding, check
from .faithful_export import export
from .errors import KVPassError, PatternError, RewriteMismatch
from .ops import gather_paged_kv, store_paged_kv, store_paged_single

try:
    __version__ = _metadata.version("kvpass")
except _metadata.PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"


def rewrite(gm, patterns=None, example_inputs=None, verify=False):
    """Rewrite host/buffer round trips of K/V in an FX graph into functional history.

    Args:
        gm: a ``torch.fx.GraphModule`` (a Dynamo or ``symbolic_trace`` torch-level graph, or an ATen graph).
            It is rewritten in place and returned.
        patterns: pattern names (or pattern objects) to run; ``None`` runs the whole catalogue in its fixed order.
            An unknown name raises ``ValueError`` listing the valid ones.
        example_inputs: inputs for ``verify``.
        verify: run the graph before and after on ``example_inputs`` and raise :class:`RewriteMismatch` if the
            results differ.

    Returns:
        ``(gm, report)``: ``report.matches`` has one entry per rewrite (pattern name, replaced nodes, the user's
        source line); ``report.skips`` the candidates left unchanged and why.
    """
    from .engine import rewrite as _rewrite

    return _rewrite(gm, patterns=patterns, example_inputs=example_inputs, verify=verify)


__all__ = [
    "__version__", "rewrite", "diff", "graph_text", "backend", "compile", "kvpass_backend", "KVPassWarning",
    "Report", "Match", "Skip", "KVPassError", "PatternError", "RewriteMismatch",
    "store_paged_kv", "store_paged_single", "gather_paged_kv",
    "check", "Finding", "export",
]
