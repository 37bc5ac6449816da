"""kvpass: make shared-KV-cache decoders compile-clean and export-faithful.

Public API (see README.md)::

    gm2, report = kvpass.rewrite(gm, patterns=None, example_inputs=None, verify=False)
    text = kvpass.diff(before, after)
    torch.compile(model, backend="kvpass")          # entry point, no import needed
    kvpass.compile(model, **torch_compile_kwargs)
    torch.compile(model, backend=kvpass.backend(inner="inductor", patterns=None, on_report=None))
    ep = kvpass.export(model, args, cache="outputs")      # a deployable program of one step
    ep = kvpass.hf.export_step(hf_model, max_cache_len=N)  # the same for a transformers causal LM, as it is
"""

from __future__ import annotations

from importlib import metadata as _metadata

from .dynamo_backend import backend, compile, kvpass_backend
from .graph_diff import diff, graph_text
from .report import Match, Report, Skip
from .fidelity import Finding, check
from .faithful_export import export
from .errors import KVPassError, KVPassWarning, PatternError, RewriteMismatch
from .ops import gather_paged_kv, store_paged_kv, store_paged_single
from .ir import functionalize
from . import hf, ir

try:
    __version__ = _metadata.version("kvpass")
except _metadata.PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"


def rewrite(gm, patterns=None, example_inputs=None, verify=False):
    """Rewrite host/buffer round trips of K/V in an FX graph into functional history, on the functional ATen IR.

    Args:
        gm: a ``torch.fx.GraphModule``. An ATen graph (exported, AOTAutograd or Inductor post-grad) is rewritten
            in place and returned. A torch-level graph (Dynamo, ``symbolic_trace``) is first functionalized
            (:func:`kvpass.functionalize`: AOTAutograd, mutations as ``*_scatter`` + a ``copy_`` epilogue into
            the mutated inputs) and the rewritten ATen ``GraphModule`` is returned; it takes the same inputs and
            returns the same outputs as ``gm``.
        patterns: rule names (or rule objects) to run; ``None`` runs them all in their fixed order.
            An unknown name raises ``ValueError`` listing the valid ones.
        example_inputs: one value per placeholder, for ``verify``, and to functionalize a torch-level graph
            whose placeholders carry no traced value in ``node.meta`` (Dynamo graphs carry them).
        verify: run the graph before and after on copies of ``example_inputs`` (copied together, so inputs
            that share memory still do) and raise :class:`RewriteMismatch` if outputs or inputs differ.

    Returns:
        ``(gm, report)``: ``report.matches`` has one entry per rewrite (rule name, replaced nodes, the user's
        source line); ``report.skips`` the candidates left unchanged and why; ``report.before`` the functional
        graph the rules started from (like-for-like golden diffs: ``kvpass.diff(report.before, gm)``).
    """
    from .engine import rewrite as _rewrite

    return _rewrite(gm, patterns=patterns, example_inputs=example_inputs, verify=verify)


__all__ = [
    "__version__", "rewrite", "functionalize", "diff", "graph_text", "backend", "compile", "kvpass_backend", "KVPassWarning",
    "Report", "Match", "Skip", "KVPassError", "PatternError", "RewriteMismatch",
    "store_paged_kv", "store_paged_single", "gather_paged_kv",
    "check", "Finding", "export", "hf",
]
