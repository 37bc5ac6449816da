"""The rules of :func:`kvpass.check`, one function each, over a program and its :class:`Dataflow`.

:func:`attentions` finds the attention inputs; :func:`kv_sources` (``constant-kv`` / ``mutated-constant``),
:func:`input_free_kv`, :func:`written_constants`, :func:`cat_with_computed` and :func:`dangling_kv` each return
their findings; :func:`run_rules` runs them in that order.
"""

from __future__ import annotations

import collections
import dataclasses

from ..errors import user_source_line
from .dataflow import Dataflow, _numel
from .findings import CONSTANT_KV, DANGLING_KV, INPUT_FREE_KV, MUTATED_CONSTANT, Finding
from .graph import Node, Program, Source

__all__ = ["Attention", "attentions", "kv_sources", "input_free_kv", "written_constants", "cat_with_computed",
           "dangling_kv", "run_rules"]

_MATMULS = {"bmm", "matmul", "baddbmm", "__matmul__", "einsum"}
_SOFTMAX = {"softmax", "_softmax", "_safe_softmax", "log_softmax", "_log_softmax", "exp", "special_softmax"}
_VIEWS = {
    "view", "_unsafe_view", "reshape", "view_as", "expand", "expand_as", "unsqueeze", "squeeze", "transpose", "t",
    "permute", "slice", "select", "narrow", "alias", "detach", "contiguous", "getitem", "flatten", "unflatten",
    "clone",
}
# between Q @ K^T and the softmax: scaling, masking, soft-capping, casts
_SCORE_OPS = _VIEWS | {
    "mul", "div", "true_divide", "add", "sub", "where", "masked_fill", "to", "_to_copy", "type_as", "tanh",
    "clamp", "clamp_min", "clamp_max", "amax", "maximum", "float", "__mul__", "__truediv__", "__add__",
    "__sub__", "__iadd__", "add_", "masked_fill_", "mul_", "div_",
}
# between the softmax and P @ V
_PROB_OPS = _VIEWS | {
    "to", "_to_copy", "type_as", "dropout", "native_dropout", "feature_dropout", "where", "masked_fill",
    "div", "mul", "true_divide", "float", "half", "bfloat16", "__truediv__", "__mul__", "nan_to_num",
}
_CATS = {"cat", "concat", "concatenate", "stack", "hstack", "vstack"}
_CHAIN_HEADS_SKIPPED = {"detach", "alias", "cpu", "numpy", "_assert_tensor_metadata", "lift_fresh_copy", "view_as",
                        "resolve_conj", "resolve_neg"}
_DANGLING_OPS = {"detach", "alias", "_to_copy", "to", "cpu", "clone", "contiguous", "lift_fresh_copy",
                 "_assert_tensor_metadata", "numpy", "view_as", "view", "resolve_conj", "resolve_neg"}


@dataclasses.dataclass(eq=False)
class Attention:
    """One attention input: ``role`` (``"key"``/``"value"``), the op, the value it reads, the consumer text."""

    role: str
    op: Node
    arg: Node
    text: str


def _slots(n: Node) -> dict | None:
    names = n.arg_names
    if names and {"query", "key", "value"} <= set(names):
        pass
    elif "scaled_dot_product" in n.opname or n.opname == "flex_attention":
        names = ["query", "key", "value"]
    else:
        return None
    out = {}
    for role in ("key", "value"):
        i = names.index(role)
        a = n.arg(i, role)
        if isinstance(a, Node):
            out[role] = a
    return out


def _reaches(start: Node, through: set, goal: set, forward: bool, limit: int = 24) -> bool:
    seen, frontier = {start}, [start]
    for _ in range(limit):
        nxt = []
        for n in frontier:
            nbrs = list(n.users) if forward else [a for _, _, a in n.tensor_args()]
            for m in nbrs:
                if m in seen or m.op != "call":
                    continue
                if m.opname in goal:
                    return True
                if m.opname in through:
                    seen.add(m)
                    nxt.append(m)
        if not nxt:
            return False
        frontier = nxt
    return False


def _matmul_operands(n: Node):
    if n.opname not in _MATMULS:
        return None
    args = list(n.args)
    if n.opname == "einsum":
        ops = args[1:]
        if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
            ops = list(ops[0])
        return (ops[0], ops[1]) if len(ops) == 2 else None
    if n.opname == "baddbmm":
        return (args[1], args[2]) if len(args) >= 3 else None
    if len(args) >= 2:
        return args[0], args[1]
    other = n.kwargs.get("other", n.kwargs.get("mat2"))
    return (args[0] if args else n.kwargs.get("input"), other) if other is not None else None


def attentions(program: Program) -> list[Attention]:
    """Every attention key/value input: SDPA-like ops (by schema argument names or name), flex attention, and
    the two matmuls of ``softmax(Q @ K^T) @ V`` (rank 3+)."""
    out = []
    for n in program.graph.walk():
        if n.op != "call":
            continue
        slots = _slots(n)
        if slots is not None:
            out.extend(Attention(role, n, a, f"{role} of {n.opname} ({n.name})") for role, a in slots.items())
            continue
        ops = _matmul_operands(n)
        if ops is None or not all(isinstance(o, Node) for o in ops) or ops[0] is ops[1]:
            continue
        lhs, rhs = ops
        rank_ok = n.opname in ("bmm", "baddbmm") or (len(lhs.shape or ()) >= 3 and len(rhs.shape or ()) >= 3)
        if not rank_ok:
            continue
        if _reaches(n, _SCORE_OPS, _SOFTMAX, forward=True):
            out.append(Attention("key", n, rhs, f"key of attention: Q @ K^T {n.opname} ({n.name}) -> softmax"))
        elif _reaches(lhs, _PROB_OPS, _SOFTMAX, forward=False):
            out.append(Attention("value", n, rhs, f"value of attention: softmax @ V {n.opname} ({n.name})"))
    return out


# --------------------------------------------------------------------------------------------------------
# Helpers shared by the rules
# --------------------------------------------------------------------------------------------------------


def node_source(nodes) -> str:
    """The user's source line of the first node in ``nodes`` that has a stack trace."""
    for n in nodes:
        if isinstance(n, Node) and n.stack_trace:
            return user_source_line(_Traced(n.stack_trace))
    return "<unknown> (no stack trace recorded; make_fx needs record_stack_traces=True)"


class _Traced:
    def __init__(self, trace: str):
        self.meta = {"stack_trace": trace}


def _path(df: Dataflow, source: Source, goal: Node) -> list[Node]:
    """A shortest chain from ``source`` to ``goal`` along data edges, else one that also goes through memory."""
    return _search(df, source, goal, memory=False) or _search(df, source, goal, memory=True) or [source.node, goal]


def _search(df: Dataflow, source: Source, goal: Node, memory: bool) -> list[Node] | None:
    """A shortest chain of users from ``source`` to ``goal`` through values that carry it (into and out of
    higher-order-op bodies, and from an in-place write to the reads of the base it wrote)."""
    start = source.node
    aliases: dict = {}
    for m in df.program.graph.walk():
        aliases.setdefault(df.root_of(m), []).append(m)
    prev = {start: None}
    queue = collections.deque([start])
    while queue:
        n = queue.popleft()
        if n is goal:
            break
        nxt = list(n.users)
        if memory and n.writes:  # through memory: the reads of the base it wrote
            nxt.extend(aliases.get(df.root_of(n), []))
        for u in n.users:
            for g in u.subgraphs:  # into a body: the placeholder bound to this operand
                nxt.extend(ph for ph in g.inputs if df.root_of(ph) is df.root_of(n) or df.carries(ph, source))
        if n.graph is not None and any(o is n for o in n.graph.outputs):  # out of a body
            nxt.extend(p for p in _parents(df.program, n.graph))
        for u in nxt:
            if u not in prev and (u is goal or df.carries(u, source)):
                prev[u] = n
                queue.append(u)
    if goal not in prev:
        return None
    path, n = [], goal
    while n is not None:
        path.append(n)
        n = prev[n]
    return path[::-1]


def _parents(program: Program, graph) -> list[Node]:
    out = []
    for n in program.graph.walk():
        if graph in n.subgraphs:
            out.extend(u for u in n.users if u.opname == "getitem") or out.append(n)
    return out


def _reportable(src: Source) -> bool:
    n = _numel(src.shape)
    if n is not None and n <= 1:
        return False  # empty history, scalar counters, scales: never K/V
    return src.dtype is None or src.dtype.is_floating_point or src.dtype.is_complex


def _written_from_tokens(df: Dataflow, src: Source) -> bool:
    return df.extra.get(df.root_of(src.node), (False, 0))[0]


def _is_source(df: Dataflow, src: Source) -> bool:
    """A constant, or a buffer the program never writes from the tokens (only from constants, or not at all)."""
    if not _reportable(src):
        return False
    return src.kind == "constant" or not _written_from_tokens(df, src)


def _writes_into(df: Dataflow, src: Source) -> list[Node]:
    return list(df.writes.get(df.root_of(src.node), []))


def _write_detail(writes: list[Node]) -> str:
    if not writes:
        return ""
    w = writes[0]
    return (f"written in place by {w.target or w.opname} ({w.name}) at {node_source([w])}"
            + (f" and {len(writes) - 1} more write(s)" if len(writes) > 1 else ""))


def _finding(df: Dataflow, src: Source, consumer: str, path: list[Node], detail: list[str], kind=None):
    writes = _writes_into(df, src)
    if writes:
        detail = detail + [_write_detail(writes)]
    return Finding(
        kind=kind or (MUTATED_CONSTANT if writes else CONSTANT_KV),
        node=src.node.name,
        target=src.name,
        shape=tuple(src.shape) if src.shape is not None else (),
        dtype=src.dtype,
        all_zeros=src.values(),
        consumer=consumer,
        source=node_source(path),
        detail="; ".join(d for d in detail if d),
        fx_node=src.node.fx,
    )


# --------------------------------------------------------------------------------------------------------
# The rules
# --------------------------------------------------------------------------------------------------------


def kv_sources(program: Program, df: Dataflow, atts: list[Attention]) -> list[Finding]:
    """``constant-kv`` / ``mutated-constant``: a constant (or a buffer never written from the tokens) whose
    elements an attention's key or value carries, through any chain of ops."""
    out = []
    for src in program.sources:
        if not _is_source(df, src):
            continue
        hits = [a for a in atts if df.carries(a.arg, src)]
        if not hits:
            continue
        first = hits[0]
        path = _path(df, src, first.arg) + [first.op]
        consumer = first.text
        cats = [n for n in path if n.opname in _CATS]
        if cats:
            consumer += f" via {cats[0].opname} ({cats[0].name})"
        others = {(h.role, h.op) for h in hits} - {(first.role, first.op)}
        detail = [src.origin]
        if others:
            roles = ", ".join(sorted({r for r, _ in others}))
            consumer += f" (+{len(others)} more: {roles})"
            detail.append(f"{len(others)} more attention input(s) ({roles})")
        if src.note:
            detail.append(src.note)
        out.append(_finding(df, src, consumer, [src.node] + path, detail))
    return out


def input_free_kv(program: Program, df: Dataflow, atts: list[Attention]) -> list[Finding]:
    """``input-free-kv``: an attention key/value that depends on no token input and carries no reported source
    (zeros made in the graph, a buffer never written): it is the same whatever the program is given."""
    out, seen = [], set()
    for a in atts:
        tok, srcs = df.value(a.arg)
        if tok or a.arg in seen:
            continue
        if any(srcs & df.bit[s] and _is_source(df, s) for s in program.sources):
            continue  # reported by kv_sources
        seen.add(a.arg)
        out.append(Finding(
            kind=INPUT_FREE_KV, node=a.arg.name, target=a.arg.target or a.arg.opname, shape=tuple(a.arg.shape or ()),
            dtype=a.arg.dtype, all_zeros=None, consumer=a.text, source=node_source([a.arg, a.op]),
            detail="depends on no token input of the program", fx_node=a.arg.fx,
        ))
    return out


def written_constants(program: Program, df: Dataflow, reported: set) -> list[Finding]:
    """``mutated-constant``: a constant that the program writes with values computed from the tokens (a host
    buffer lifted by strict export) even when no read of it reaches an attention in this graph."""
    out = []
    for src in program.sources:
        if src in reported or src.kind != "constant" or not _reportable(src) or not _written_from_tokens(df, src):
            continue
        writes = [w for w in _writes_into(df, src) if df.value(w)[0]]
        if not writes:
            continue
        out.append(_finding(df, src, "no attention read in this graph; written with a projected K/V", writes,
                            [src.origin], kind=MUTATED_CONSTANT))
    return out


def cat_with_computed(program: Program, df: Dataflow, reported: set) -> list[Finding]:
    """``constant-kv``: a constant concatenated with a token-computed tensor along a non-last dim of rank 3+
    (a history next to the new K/V) that reaches no attention in this graph."""
    out = []
    for src in program.sources:
        if src in reported or not _is_source(df, src):
            continue
        for n in program.graph.walk():
            if n.opname not in ("cat", "concat", "concatenate") or not n.args or not df.carries(n, src):
                continue
            parts = [p for p in (n.args[0] if isinstance(n.args[0], (list, tuple)) else []) if isinstance(p, Node)]
            dim = n.arg(1, "dim", 0)
            rank = len(n.shape) if n.shape is not None else None
            if rank is None or rank < 3 or not isinstance(dim, int) or dim % rank == rank - 1:
                continue
            computed = [p for p in parts if not df.carries(p, src) and df.value(p)[0] and len(p.shape or ()) == rank]
            if computed:
                text = f"cat along dim {dim} with computed K/V {computed[0].name} ({n.name})"
                out.append(_finding(df, src, text, [src.node] + _path(df, src, n), [src.origin]))
                break
    return out


def dangling_kv(program: Program, df: Dataflow, const_findings: list[Finding]) -> list[Finding]:
    """``dangling-kv``: a computed K/V whose only use is a ``detach``/copy chain that ends unused, while a
    same-shaped reported constant feeds the attention instead (``make_fx`` real mode, which records ``detach`` as
    ``alias`` from torch 2.14 on: :data:`kvpass.compat.MAKE_FX_DETACH`). The finding is about the graph at hand:
    where a later capture keeps the unused chain (``torch.export`` of such a graph from torch 2.14 on) it is
    reported again; where it drops it (2.13's export leaves the computed K/V with no use at all) there is no
    finding, and the constant that feeds the attention is reported either way."""
    if not const_findings:
        return []
    bits = 0
    for s in program.sources:
        if _is_source(df, s):
            bits |= df.bit[s]
    candidates = {}
    for n in program.graph.walk():
        if n.op != "call" or not n.users or df.value(n)[1] & bits or n.opname in _CHAIN_HEADS_SKIPPED:
            continue
        if n.shape is None or len(n.shape) < 2 or n.dtype is None or not n.dtype.is_floating_point:
            continue
        chain = _dangling_chain(n)
        if chain is not None:
            candidates[n] = chain
    out = []
    for n, chain in candidates.items():
        if any(x in candidates for _, _, x in n.tensor_args()):
            continue  # report the head of a chain once (an input may be a list: cat, stack)
        pair = next((f for f in const_findings if f.dtype == n.dtype and _same_but_one(f.shape, n.shape)), None)
        if pair is None:
            continue
        ops = " -> ".join(c.opname for c in chain)
        out.append(Finding(
            kind=DANGLING_KV, node=n.name, target=n.target or n.opname, shape=tuple(n.shape), dtype=n.dtype,
            all_zeros=None, consumer=f"nothing: it is only copied out ({ops}) and the copy is never used",
            source=node_source(chain + [n]),
            detail=f"the same-shaped constant {pair.node} ({pair.target}) feeds {pair.consumer} instead",
            fx_node=n.fx,
        ))
    return out


def _dangling_chain(node: Node) -> list[Node] | None:
    chain, frontier, seen = [], list(node.users), set()
    while frontier:
        n = frontier.pop(0)
        if n in seen:
            continue
        seen.add(n)
        if n.op != "call" or n.opname not in _DANGLING_OPS:
            return None
        chain.append(n)
        frontier.extend(n.users)
    if not chain or chain[0].opname not in ("detach", "alias", "_to_copy", "to", "cpu"):
        return None
    return chain


def _same_but_one(a: tuple, b: tuple) -> bool:
    return len(a) == len(b) and sum(1 for x, y in zip(a, b) if x != y) <= 1


def run_rules(program: Program, df: Dataflow, atts: list[Attention]) -> tuple[list[Finding], int]:
    """All the rules on ``atts`` (from :func:`attentions`); the findings in graph order, and the number of
    attention ops."""
    findings = kv_sources(program, df, atts)
    reported = {s for s in program.sources if any(f.node == s.node.name for f in findings)}
    findings += written_constants(program, df, reported)
    reported |= {s for s in program.sources if any(f.node == s.node.name for f in findings)}
    findings += cat_with_computed(program, df, reported)
    consts = list(findings)
    findings += input_free_kv(program, df, atts)
    findings += dangling_kv(program, df, consts)
    order = {}
    for i, n in enumerate(program.graph.walk()):
        order.setdefault(n.name, i)
    findings.sort(key=lambda f: order.get(f.node, len(order)))
    return findings, len({id(a.op) for a in atts})
