"""Normalized graph text and unified diffs for golden tests (``assertExpectedInline``).

Node names in FX graphs depend on creation order and on what else was traced, and ``gm.code`` carries
file paths from stack traces. :func:`graph_text` prints a graph one node a line with names derived only from
the graph's own structure (the target's name plus a counter, in topological order; placeholders keep their
names), so the same computation always prints the same text.
"""

from __future__ import annotations

import difflib
import re
from typing import Any

import torch
import torch.fx

__all__ = ["graph_text", "diff"]

GraphLike = Any  # GraphModule | Graph | ExportedProgram


def _as_graph(obj: GraphLike) -> torch.fx.Graph:
    if isinstance(obj, torch.fx.Graph):
        return obj
    if isinstance(obj, torch.fx.GraphModule):
        return obj.graph
    gm = getattr(obj, "graph_module", None)  # ExportedProgram
    if isinstance(gm, torch.fx.GraphModule):
        return gm.graph
    raise TypeError(f"expected a GraphModule, Graph or ExportedProgram, got {type(obj).__name__}")


def target_name(node: torch.fx.Node) -> str:
    """A short, stable, human name for what ``node`` calls (``aten.cat.default``, ``torch.cat``, ``.to``)."""
    t = node.target
    if node.op == "call_method":
        return f".{t}"
    if node.op in ("call_module", "get_attr"):
        return str(t)
    if isinstance(t, torch._ops.OpOverload):
        return f"{t.namespace}.{t._opname}.{t._overloadname}"
    if isinstance(t, torch._ops.OpOverloadPacket):
        return f"{t._qualified_op_name.replace('::', '.')}"
    if isinstance(t, torch._ops.HigherOrderOperator):
        return f"hop.{t.__name__}"
    name = getattr(t, "__name__", None) or type(t).__name__
    if name.startswith("wrapped_") and any(hasattr(t, a) for a in ("f", "method", "op")):
        # Dynamo's numpy wrappers: name what they wrap
        inner = getattr(t, "f", None) or getattr(t, "method", None) or getattr(t, "op", None)
        inner = inner if isinstance(inner, str) else getattr(inner, "__name__", str(inner))
        return f"numpy.{inner.strip('_')}"
    mod = getattr(t, "__module__", None) or ""
    if mod in ("_operator", "operator"):
        return f"operator.{name}"
    if mod.startswith("torch"):
        top = "F" if mod in ("torch.nn.functional", "torch._C._nn") else "torch"
        return f"{top}.{name}"
    return name


def _base_name(node: torch.fx.Node) -> str:
    if node.op == "placeholder":
        return str(node.target)
    if node.op == "output":
        return "output"
    if node.op == "get_attr":
        raw = str(node.target)
        # Tensor constants are numbered by creation: renumber them like any other node.
        return "_tensor_constant" if re.fullmatch(r"_?tensor_constant\d+", raw.split(".")[-1]) else raw
    name = target_name(node).split(".")
    base = name[-1] if node.op == "call_method" else (name[-2] if isinstance(node.target, torch._ops.OpOverload) else name[-1])
    return re.sub(r"\W", "_", base).strip("_") or "node"


def _stable_names(graph: torch.fx.Graph, known: dict[str, str] | None = None, counts: dict[str, int] | None = None):
    """Name nodes ``base``, ``base_1`` ... in order. Nodes whose FX name is in ``known`` keep that stable name
    (a rewritten graph keeps its unchanged nodes' names); new ones continue the counters in ``counts``."""
    names: dict[torch.fx.Node, str] = {}
    counts = dict(counts or {})
    for node in graph.nodes:
        if known is not None and node.name in known and node.op != "output":
            names[node] = known[node.name]
            continue
        base = _base_name(node)
        if node.op == "placeholder":
            names[node] = base
            continue
        n = counts.get(base, 0)
        counts[base] = n + 1
        names[node] = base if n == 0 else f"{base}_{n}"
    return names, counts


def graph_text(obj: GraphLike, _names: dict | None = None) -> str:
    """Render a graph one node per line with stable names: ``name = target(args, key=value)``."""
    graph = _as_graph(obj)
    names = _names if _names is not None else _stable_names(graph)[0]

    def fmt(a) -> str:
        if isinstance(a, torch.fx.Node):
            return names[a]
        if isinstance(a, (list, tuple)):
            inner = ", ".join(fmt(x) for x in a)
            return f"[{inner}]" if isinstance(a, list) else f"({inner}{',' if len(a) == 1 else ''})"
        if isinstance(a, dict):
            return "{" + ", ".join(f"{k!r}: {fmt(v)}" for k, v in a.items()) + "}"
        if isinstance(a, slice):
            parts = ["" if x is None else fmt(x) for x in (a.start, a.stop)]
            return ":".join(parts) + ("" if a.step is None else f":{fmt(a.step)}")
        if a is Ellipsis:
            return "..."
        if isinstance(a, float):
            return repr(round(a, 6))
        if isinstance(a, torch.dtype):
            return str(a)
        return repr(a)

    lines = []
    for node in graph.nodes:
        if node.op == "placeholder":
            lines.append(f"input {names[node]}")
        elif node.op == "output":
            lines.append(f"return {fmt(node.args[0])}")
        elif node.op == "get_attr":
            lines.append(f"{names[node]} = self.{names[node] if names[node].startswith('_tensor_constant') else node.target}")
        else:
            args = [fmt(a) for a in node.args] + [f"{k}={fmt(v)}" for k, v in node.kwargs.items()]
            lines.append(f"{names[node]} = {target_name(node)}({', '.join(args)})")
    return "\n".join(line.rstrip() for line in lines) + "\n"


def diff(before: GraphLike, after: GraphLike, context: int = 2) -> str:
    """Unified diff of :func:`graph_text` of two graphs: stable names, no paths, no line numbers.

    Returns ``""`` when the graphs print the same. Hunk headers are bare ``@@`` so that the text does not move
    when an unrelated part of the graph grows.
    """
    g_before, g_after = _as_graph(before), _as_graph(after)
    names_before, counts = _stable_names(g_before)
    # Nodes of `after` that carry a node name of `before` are the same nodes (a rewrite keeps them): same names,
    # so that only what the rewrite touched shows in the diff.
    known = {n.name: names_before[n] for n in g_before.nodes}
    names_after, _ = _stable_names(g_after, known, counts)
    a = graph_text(g_before, names_before).splitlines()
    b = graph_text(g_after, names_after).splitlines()
    out = []
    for line in difflib.unified_diff(a, b, "before", "after", n=context, lineterm=""):
        if line.startswith("@@"):
            line = "@@"
        out.append(line.rstrip())
    return "\n".join(out) + ("\n" if out else "")
