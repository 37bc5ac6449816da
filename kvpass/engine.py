"""The pass manager: runs rewrite patterns over an FX graph in a fixed order, reports, cleans up, verifies.

The engine knows nothing of any single pattern. A pattern is an object with a ``name`` and an
``apply(gm, report) -> int`` method that rewrites ``gm.graph`` in place, records each rewrite with
:meth:`Report.add_match` (and each place it declined to rewrite, with the reason, with :meth:`Report.add_skip`),
and returns its match count. The catalogue lives in ``kvpass.patterns``.
"""

from __future__ import annotations

import copy
from typing import Protocol, Sequence

import torch
import torch.fx

from .errors import PatternError, RewriteMismatch
from .report import Match, Report, Skip

__all__ = ["Pattern", "Match", "Skip", "Report", "rewrite", "resolve_patterns", "cleanup", "catalogue_markdown"]


class Pattern(Protocol):
    """What the engine needs of a pattern (see ``kvpass.patterns``): a ``name``, ``apply(gm, report)`` returning
    its match count, and optionally ``level = "torch"`` for a rule that runs on the torch-level (Dynamo) graph
    before functionalization (default ``"aten"``: the functional ATen IR)."""

    name: str

    def apply(self, gm: torch.fx.GraphModule, report: "Report") -> int: ...


def _catalogue() -> list:
    from . import patterns  # kvpass.patterns, shipped from the top-level patterns/ directory

    return list(patterns.PATTERNS)


def resolve_patterns(patterns: Sequence | None) -> list:
    """Turn ``None`` (the whole catalogue, in its fixed order), names, or pattern objects into pattern objects."""
    catalogue = _catalogue()
    if patterns is None:
        return catalogue
    if isinstance(patterns, str):
        patterns = [patterns]
    by_name = {p.name: p for p in catalogue}
    out = []
    for p in patterns:
        if isinstance(p, str):
            if p not in by_name:
                raise PatternError(f"patterns: unknown pattern {p!r}; valid names: {', '.join(sorted(by_name)) or '(none)'}")
            out.append(by_name[p])
        elif callable(getattr(p, "apply", None)) and isinstance(getattr(p, "name", None), str):
            out.append(p)
        else:
            raise PatternError(f"patterns: {p!r} is neither a pattern name nor an object with .name and .apply(gm, report)")
    return out


def catalogue_markdown() -> str:
    """The pattern catalogue as a markdown table, from each pattern module's docstring (README.md embeds it;
    a test keeps the two in sync)."""
    import sys

    rows = ["| order | pattern | what it rewrites |", "|---:|---|---|"]
    for i, p in enumerate(_catalogue(), 1):
        doc = (sys.modules[type(p).__module__].__doc__ or "").strip().split("\n\n")[0]
        summary = " ".join(doc.split()).replace("``", "`")  # rST literals to markdown
        if summary.startswith(p.name + ":"):
            summary = summary[len(p.name) + 1:].strip()
        rows.append(f"| {i} | `{p.name}` (`patterns/{type(p).__module__.rsplit('.', 1)[-1]}.py`) | {summary} |")
    return "\n".join(rows) + "\n"


def cleanup(gm: torch.fx.GraphModule) -> None:
    """Dead-code elimination that keeps side effects (the ``copy_`` epilogues a later step reads; on a
    torch-level graph, numpy writes), lint, recompile."""
    from .aliasing import is_side_effect

    gm.graph.eliminate_dead_code(is_impure_node=is_side_effect)
    gm.graph.lint()
    gm.recompile()


def _concrete(x):
    """A backend's example inputs hold SymInts for the ints Dynamo made dynamic: run with their hints."""
    if isinstance(x, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        hint = x.node.hint
        if hint is None:
            raise ValueError(f"example_inputs: symbolic value {x} has no hint to run the graph with")
        return hint
    return x


def _run(fn, inputs):
    """The outputs of ``fn`` on a private copy of ``inputs`` and, after the run, that copy's tensors (a cache
    buffer written in place is a result too: the next step reads it). All inputs are copied together, so
    inputs that share memory still share it (:func:`kvpass.aliasing.copy_together`)."""
    from .aliasing import copy_together

    inputs = copy_together([_concrete(x) for x in inputs])
    with torch.no_grad():
        out = fn(*inputs)
    return {"output": out, "input": [x if isinstance(x, torch.Tensor) else None for x in inputs]}


def _compare(before, after, where="output") -> str | None:
    if isinstance(before, torch.Tensor):
        if not isinstance(after, torch.Tensor) or before.shape != after.shape or before.dtype != after.dtype:
            return f"{where}: {type(before).__name__}{tuple(getattr(before, 'shape', ()))} vs {type(after).__name__}{tuple(getattr(after, 'shape', ()))}"
        if not torch.allclose(before, after, rtol=1e-5, atol=1e-6, equal_nan=True):
            return f"{where}: max abs difference {(before - after).abs().max().item():.3g}"
        return None
    if isinstance(before, (list, tuple)):
        if not isinstance(after, (list, tuple)) or len(before) != len(after):
            return f"{where}: structure differs"
        for i, (x, y) in enumerate(zip(before, after)):
            msg = _compare(x, y, f"{where}[{i}]")
            if msg:
                return msg
        return None
    return None if before == after else f"{where}: {before!r} vs {after!r}"


def guard_aliased_inputs(gm: torch.fx.GraphModule, traced: torch.fx.GraphModule) -> None:
    """Make calls of the functional ``gm`` whose inputs overlap in memory (numpy views of one pool, which
    functionalization treats as independent) run ``traced``, the torch-level graph, with eager's aliasing; warn
    once. ``gm`` stays a GraphModule: its own class wraps the generated ``forward`` (also after a ``recompile()``),
    so ``gm(...)`` and ``gm.forward(...)`` are both guarded."""
    import warnings

    from .aliasing import aliased_inputs_message, overlapping_inputs
    from .errors import KVPassWarning

    def wrap(cls):
        generated = cls.__dict__["forward"]

        def forward(self, *args, **kwargs):
            pairs = overlapping_inputs(args, external_only=False)
            if not pairs:
                return generated(self, *args, **kwargs)
            if not getattr(self, "_kvpass_warned", False):
                self._kvpass_warned = True
                names = [n.name for n in self.graph.nodes if n.op == "placeholder"]
                i, j = pairs[0]
                warnings.warn(aliased_inputs_message(names[i] if i < len(names) else f"input {i}",
                                                     names[j] if j < len(names) else f"input {j}"),
                              KVPassWarning, stacklevel=2)
            return traced(*args, **kwargs)

        cls.forward = forward

    cls = type(gm)  # FX gives every GraphModule instance a class of its own: changing it touches only gm

    def recompile(self):
        out = torch.fx.GraphModule.recompile(self)  # sets a new generated forward on this class
        wrap(type(self))
        return out

    cls.recompile = recompile
    wrap(cls)


def _snapshot(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy of ``gm``'s graph (node metadata shared, not copied) over the same attributes."""
    graph = torch.fx.Graph()
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    return torch.fx.GraphModule(gm, graph)


def _level(pattern) -> str:
    return getattr(pattern, "level", "aten")


#: At most this many rounds of the ATen rules (each round runs them all, in order; the next round runs only when
#: the last one rewrote something, e.g. ``scatter_slice`` leaving a reshape of a reshape for ``view_fold``).
_ROUNDS = 4


def apply_rule(gm, pattern, report) -> None:
    """Run one rule on ``gm``, count its matches in ``report``, clean up after a rewrite."""
    n = int(pattern.apply(gm, report) or 0)
    report.counts[pattern.name] = report.counts.get(pattern.name, 0) + n
    if n:
        cleanup(gm)  # the next rule sees no dead remnants


def rewrite(gm: torch.fx.GraphModule, patterns: Sequence | None = None, example_inputs: Sequence | None = None,
            verify: bool = False):
    """Rewrite host/buffer round trips of K/V in ``gm`` into functional history; see ``kvpass.rewrite``.

    An ATen graph is rewritten in place and returned; a torch-level graph gets the torch-level rules in place,
    is then functionalized (:func:`kvpass.ir.functionalize`) and the rewritten ATen graph is returned (when only
    torch-level rules are selected, e.g. ``patterns=["store_loop"]``, the torch-level graph itself).
    ``report.before`` is the graph the ATen rules started from (for like-for-like golden diffs).
    """
    from .ir import functionalize, is_aten_graph
    from . import observe

    if not isinstance(gm, torch.fx.GraphModule):
        raise TypeError(f"gm: expected a torch.fx.GraphModule, got {type(gm).__name__}")
    selected = resolve_patterns(patterns)
    if verify and example_inputs is None:
        raise ValueError("example_inputs: verify=True needs example inputs to run the graph before and after")
    reference = _run(copy.deepcopy(gm), example_inputs) if verify else None
    report = Report()
    aten_rules = [p for p in selected if _level(p) == "aten"]
    functional = is_aten_graph(gm)
    if not functional:
        report.before = _snapshot(gm)
        for pattern in (p for p in selected if _level(p) == "torch"):
            apply_rule(gm, pattern, report)
        if aten_rules or not selected:  # only torch-level rules selected (store_loop): the torch-level graph
            traced = gm
            gm = functionalize(gm, example_inputs)
            functional = True
            guard_aliased_inputs(gm, traced)
            report.before = _snapshot(gm)
    else:
        report.before = _snapshot(gm)
    if functional:
        for _ in range(_ROUNDS):  # to a fixed point: one rule's rewrite may expose a case of an earlier rule
            matched = len(report.matches)
            for pattern in aten_rules:
                apply_rule(gm, pattern, report)
            if len(report.matches) == matched:
                break
        report.skips = list({(s.pattern, s.node, s.reason): s for s in report.skips}.values())  # once per round
    gm.recompile()
    observe.emit(report, report.before, gm)
    if verify:
        after = _run(gm, example_inputs)
        msg = _compare(reference["output"], after["output"]) or _compare(
            reference["input"], after["input"], "input (after the run)")
        if msg:
            names = ", ".join(sorted({m.pattern for m in report.matches})) or "(none)"
            raise RewriteMismatch(f"rewrite changed the graph's result ({msg}); patterns that matched: {names}")
    return gm, report
