"""The engine's small API for patterns: recognising host round trips, buffer accesses and symbolic facts.

Patterns in ``kvpass.patterns`` import this module and torch, nothing else of kvpass. Everything here reads
a graph without changing it, except :func:`insert_call` / :func:`replace_uses`, which are thin, metadata-keeping
wrappers over FX's own graph editing.

Dynamo internals this relies on (pinned by ``tests/test_dynamo_contract.py`` so a PyTorch upgrade that changes
them fails loudly):

- numpy functions and operators on traced arrays are ``call_function`` nodes whose target is a
  ``numpy_operator_wrapper``/``numpy_method_wrapper``-style callable named ``wrapped_<name>`` with the original
  operator or method name in ``.op`` (``operator.setitem``, ``operator.getitem``, ``"copy"``, ``np.pad`` ...);
- a numpy host buffer reached from the model is a CPU tensor placeholder;
- ``tensor.numpy()`` is traced as ``view_as(t, t)`` and ``torch.from_numpy``/``torch.as_tensor`` as ``as_tensor``.
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any, Iterable

import torch
import torch.fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .engine import Report  # noqa: F401  (re-exported: patterns record matches on it)
from .engine import IN_PLACE_OPS, is_side_effect as is_side_effect_node

__all__ = [
    "Report", "Emit", "is_aten_graph", "meta_value", "is_numpy_wrapper", "numpy_op_name", "wrapped_numpy_name", "HOP_METHODS", "host_chain", "HostChain",
    "BufferAccess", "buffer_access", "feeds_buffer_access", "mutated_buffers", "_hop_input", "HOP_FUNCTIONS", "forward_hops", "mutates_in_place", "is_side_effect_node", "mutation_between", "known_le", "known_eq", "insert_call", "propagate_meta", "replace_uses", "is_full_slice",
]

aten = torch.ops.aten


# ---------------------------------------------------------------------------------------------- node facts


def meta_value(node: Any):
    """The traced value of a node (Dynamo ``example_value``, make_fx/export ``val``), or the constant itself."""
    if isinstance(node, torch.fx.Node):
        return node.meta.get("example_value", node.meta.get("val"))
    return node


def _numpy_wrapper_types() -> tuple:
    from torch._dynamo import utils as dynamo_utils

    return tuple(getattr(dynamo_utils, n) for n in ("numpy_to_tensor_wrapper", "numpy_method_wrapper",
                                                    "numpy_operator_wrapper") if hasattr(dynamo_utils, n))


def is_numpy_wrapper(node: torch.fx.Node) -> bool:
    """True for Dynamo's ``wrapped_*`` numpy function/method/operator nodes."""
    return node.op == "call_function" and isinstance(node.target, _numpy_wrapper_types())


def numpy_op_name(node: torch.fx.Node) -> str | None:
    """The numpy operation a wrapper node performs: ``"setitem"``, ``"getitem"``, ``"pad"``, ``"copy"`` ..."""
    if not is_numpy_wrapper(node):
        return None
    return wrapped_numpy_name(node.target)


def wrapped_numpy_name(target) -> str:
    """Name of what a Dynamo numpy wrapper calls: its function (``.f``), method (``.method``) or operator (``.op``)."""
    inner = getattr(target, "f", None) or getattr(target, "method", None) or getattr(target, "op", None)
    name = inner if isinstance(inner, str) else getattr(inner, "__name__", str(inner))
    name = name.strip("_")
    return {"traceable_np_pad": "pad"}.get(name, name)


def _device_of(node) -> torch.device | None:
    v = meta_value(node)
    return v.device if isinstance(v, torch.Tensor) else None


def _dtype_of(node) -> torch.dtype | None:
    v = meta_value(node)
    return v.dtype if isinstance(v, torch.Tensor) else None


# ---------------------------------------------------------------------------------------------- host hops

# Value-preserving methods a host hop goes through (``to`` is checked separately: it may change dtype).
HOP_METHODS = {"detach", "cpu", "cuda", "contiguous", "clone", "numpy", "copy", "view_as", "to"}
HOP_FUNCTIONS = {torch.as_tensor, torch.from_numpy, torch.tensor, torch.asarray}
HOP_NUMPY = {"copy", "ascontiguousarray", "asarray", "array", "asanyarray"}
HOP_ATEN = {aten._to_copy.default, aten.clone.default, aten.detach.default, aten.alias.default,
            aten.lift_fresh_copy.default, aten.contiguous.default}


def _hop_input(node: torch.fx.Node) -> torch.fx.Node | None:
    """If ``node`` is one value-preserving step of a host round trip, the node it copies; else ``None``."""
    if node.op == "call_method" and node.target in HOP_METHODS:
        src = node.args[0] if node.args else None
        if not isinstance(src, torch.fx.Node):
            return None
        if node.target == "view_as" and (len(node.args) < 2 or node.args[1] is not src):
            return None  # view_as(x, other) reshapes; only view_as(x, x) is the .numpy() no-op
        if node.target in ("to", "numpy", "cpu", "cuda", "copy", "clone", "contiguous", "detach") and \
                _dtype_of(node) is not None and _dtype_of(src) is not None and _dtype_of(node) != _dtype_of(src):
            return None  # a dtype change is not a hop
        if node.target == "to":
            extra = [a for a in list(node.args[1:]) + list(node.kwargs.values())
                     if not isinstance(a, (torch.device, str, bool)) and a is not None]
            if extra and _dtype_of(node) is None:
                return None
        return src
    if node.op == "call_function":
        if node.target in HOP_FUNCTIONS and node.args and isinstance(node.args[0], torch.fx.Node):
            if node.kwargs.get("dtype") is not None and _dtype_of(node) != _dtype_of(node.args[0]):
                return None
            return node.args[0]
        if numpy_op_name(node) in HOP_NUMPY and node.args and isinstance(node.args[0], torch.fx.Node) \
                and len(node.args) == 1 and not node.kwargs:
            return node.args[0]
        if node.target in HOP_ATEN and node.args and isinstance(node.args[0], torch.fx.Node):
            if _dtype_of(node) is not None and _dtype_of(node) != _dtype_of(node.args[0]):
                return None
            if node.target is aten._to_copy.default and set(node.kwargs) - {"device", "dtype", "layout"}:
                return None
            return node.args[0]
    return None


def _crosses_host(node: torch.fx.Node) -> bool:
    if node.op == "call_method" and node.target in ("cpu", "numpy", "view_as"):
        return True
    if node.op == "call_function" and (node.target in HOP_FUNCTIONS or is_numpy_wrapper(node)):
        return True
    if node.target is aten._to_copy.default:
        return True
    return False


@dataclasses.dataclass
class HostChain:
    """A host round trip ending at ``end``: ``source`` is the device value it started from, ``nodes`` the hop
    steps (``end`` first), ``detached`` whether the chain detached the value."""

    source: torch.fx.Node
    end: torch.fx.Node
    nodes: list
    detached: bool

    @property
    def crosses_host(self) -> bool:
        return any(_crosses_host(n) for n in self.nodes)

    @property
    def round_trip(self) -> bool:
        """The chain leaves the tensor world (``.cpu()``, ``.numpy()``, a device ``_to_copy``) and later comes
        back as a tensor (``from_numpy``/``as_tensor``/``tensor``, ``.to``/``.cuda``, ``_to_copy``)."""
        left = False
        for n in reversed(self.nodes):  # source side first
            if not left:
                left = (n.op == "call_method" and n.target in ("cpu", "numpy", "view_as")) or \
                    n.target is aten._to_copy.default
            elif (n.op == "call_function" and n.target in HOP_FUNCTIONS) or \
                    (n.op == "call_method" and n.target in ("to", "cuda")) or n.target is aten._to_copy.default:
                return True
        return False


def host_chain(end: torch.fx.Node) -> HostChain | None:
    """Walk back from ``end`` through value-preserving hop steps to the value they copy.

    Returns ``None`` when ``end`` is not a hop step. The caller checks what it needs (device, dtype, escapes).
    """
    nodes, cur = [], end
    while True:
        src = _hop_input(cur)
        if src is None:
            break
        nodes.append(cur)
        cur = src
    if not nodes:
        return None
    detached = any((n.op == "call_method" and n.target in ("detach", "numpy", "view_as")) or
                   n.target in HOP_FUNCTIONS or is_numpy_wrapper(n) or n.target in (aten.detach.default,
                                                                                     aten.lift_fresh_copy.default)
                   for n in nodes)
    return HostChain(source=cur, end=end, nodes=nodes, detached=detached)


def mutation_between(chain: HostChain) -> torch.fx.Node | None:
    """A node that mutates an intermediate of ``chain`` in place before its end (then the hop is not a copy)."""
    order = {n: i for i, n in enumerate(chain.end.graph.nodes)}
    end_pos = order[chain.end]
    inner = set(chain.nodes[1:]) | {chain.source}
    for node in inner:
        for user in node.users:
            if user in chain.nodes or order[user] > end_pos:
                continue
            if _mutates_first_arg(user) and user.args and user.args[0] is node:
                return user
    return None


def forward_hops(node: torch.fx.Node) -> torch.fx.Node:
    """Follow ``node``'s single-user chain of hop steps (``as_tensor``, ``.to(device)`` ...) to its last node."""
    cur = node
    while len(cur.users) == 1:
        (user,) = cur.users
        if _hop_input(user) is not cur:
            break
        cur = user
    return cur


def mutates_in_place(node: torch.fx.Node) -> bool:
    """True when ``node`` writes into its first argument (in-place method, setitem, mutable ATen op)."""
    return _mutates_first_arg(node)


def _mutates_first_arg(node: torch.fx.Node) -> bool:
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.startswith("__")
    if node.op == "call_function":
        if numpy_op_name(node) == "setitem" or numpy_op_name(node) in IN_PLACE_OPS:
            return True
        if node.target is operator.setitem or getattr(node.target, "__name__", None) in IN_PLACE_OPS and \
                getattr(node.target, "__module__", None) in ("_operator", "operator"):
            return True
        if isinstance(node.target, torch._ops.OpOverload) and node.target._schema.is_mutable:
            return True
    return False


# ---------------------------------------------------------------------------------------------- symbolic facts


def _as_int(x):
    """An int, a SymInt, or None for a slice bound / size given as a constant or a node."""
    if x is None or isinstance(x, (int, torch.SymInt)):
        return x
    v = meta_value(x)
    return v if isinstance(v, (int, torch.SymInt)) else None


_MAX = {"sym_max", "max"}
_MIN = {"sym_min", "min"}


def _minmax_args(node, names):
    if isinstance(node, torch.fx.Node) and node.op == "call_function" and \
            getattr(node.target, "__name__", "") in names and len(node.args) == 2 and not node.kwargs:
        return node.args
    return None


def known_le(a, b) -> bool:
    """True only if ``a <= b`` is provable (ints, SymInts or nodes carrying them); ``False`` when unknown.

    Besides the shape environment's own reasoning, knows ``x <= max(x', y)`` when ``x <= x'`` (and the ``min``
    dual): sympy leaves ``Max`` comparisons of independent symbols undecided.
    """
    if a is b:
        return True
    mx = _minmax_args(b, _MAX)
    if mx is not None and (known_le(a, mx[0]) or known_le(a, mx[1])):
        return True
    mn = _minmax_args(a, _MIN)
    if mn is not None and (known_le(mn[0], b) or known_le(mn[1], b)):
        return True
    x, y = _as_int(a), _as_int(b)
    if x is None or y is None:
        return False
    try:
        return bool(statically_known_true(x <= y))
    except Exception:  # a comparison that needs a guard is unknown here
        return False


def known_eq(a, b) -> bool:
    """True only if ``a == b`` is provable."""
    return a is b or (known_le(a, b) and known_le(b, a))


# ---------------------------------------------------------------------------------------------- buffer accesses


def is_full_slice(s) -> bool:
    return isinstance(s, slice) and s.start in (None, 0) and s.stop is None and s.step in (None, 1)


@dataclasses.dataclass
class BufferAccess:
    """A read or write of a range of ``buffer`` along one dim.

    ``dims`` maps each sliced dim to ``(start, stop)`` (``None`` for an open end; bounds are ints or nodes);
    dims not listed are taken whole. ``value`` is the written value for a write. ``kind`` says which idiom:
    ``"numpy"`` (Dynamo's wrapped ``__setitem__``/``getitem``), ``"tensor"`` (``operator.setitem``/``getitem``),
    ``"copy_"`` (``buffer[...].copy_(v)``) or ``"aten"`` (``aten.copy_`` into ``aten.slice`` chains).
    """

    node: torch.fx.Node
    buffer: torch.fx.Node
    dims: dict
    is_write: bool
    kind: str
    value: Any = None
    ndim: int | None = None
    select: dict = dataclasses.field(default_factory=dict)  # dim -> integer index (int or SymInt node)


def _is_int_index(i) -> bool:
    if isinstance(i, bool):
        return False
    return isinstance(i, int) or (isinstance(i, torch.fx.Node) and isinstance(meta_value(i), (int, torch.SymInt)))


def _index_dims(index, ndim: int | None, select: dict | None = None) -> dict | None:
    """Parse a basic-indexing index into ``{dim: (start, stop)}`` (integer indices go to ``select``, when given,
    as ``{dim: index}``); ``None`` for anything else (advanced indexing, steps, ``None``/newaxis)."""
    if not isinstance(index, tuple):
        index = (index,)
    if any(i is Ellipsis for i in index):
        if ndim is None or sum(i is Ellipsis for i in index) > 1:
            return None
        k = index.index(Ellipsis)
        index = index[:k] + (slice(None),) * (ndim - len(index) + 1) + index[k + 1:]
    dims = {}
    for d, s in enumerate(index):
        if select is not None and _is_int_index(s):
            select[d] = s
            continue
        if not isinstance(s, slice) or s.step not in (None, 1):
            return None
        if is_full_slice(s):
            continue
        dims[d] = (s.start, s.stop)
    return dims


def _ndim(node) -> int | None:
    v = meta_value(node)
    return v.dim() if isinstance(v, torch.Tensor) else None


def _int_view(node) -> tuple | None:
    """``node`` as ``base[i, :, j]`` (integer indices and whole dims only, the way a cache takes one layer's or
    one batch row's slab of a bigger buffer): ``(base, {base dim: index}, [base dims left, in order])``;
    chains (``buf[layer][0]``) resolve to the outermost base. ``None`` for anything else."""
    if node.op != "call_function" or not (numpy_op_name(node) == "getitem" or node.target is operator.getitem):
        return None
    if len(node.args) < 2 or not isinstance(node.args[0], torch.fx.Node):
        return None
    base, index = node.args[0], node.args[1]
    ndim = _ndim(base)
    if ndim is None or (isinstance(index, torch.fx.Node) and not _is_int_index(index)):
        return None
    select: dict = {}
    dims = _index_dims(index, ndim, select)
    if dims is None or dims or not select:
        return None
    rest = [d for d in range(ndim) if d not in select]
    inner = _int_view(base)
    if inner is None:
        return base, select, rest
    root, outer, outer_rest = inner
    return root, {**outer, **{outer_rest[d]: i for d, i in select.items()}}, [outer_rest[d] for d in rest]


def feeds_buffer_access(node: torch.fx.Node) -> bool:
    """``node`` is a view that later accesses index into (``v = buf[0]; v[:, a:b] = x``): not a value read."""
    return any(u.args and u.args[0] is node and buffer_access(u) is not None for u in node.users)


def mutated_buffers(node: torch.fx.Node, buffers) -> set:
    """The buffers among ``buffers`` that in-place ``node`` may write into: those on its first-argument chain
    (the buffer itself, or a value computed from it such as the view ``buf[0]``; conservatively any chain)."""
    out, cur = set(), node.args[0] if node.args else None
    while isinstance(cur, torch.fx.Node):
        if cur in buffers:
            out.add(cur)
        if cur.op not in ("call_function", "call_method") or not cur.args:
            break
        cur = cur.args[0]
    return out


def buffer_access(node: torch.fx.Node) -> BufferAccess | None:
    """Recognise ``node`` as a sliced read or write of a tensor/array buffer, in any of the supported idioms."""
    if node.op == "call_function":
        np_name = numpy_op_name(node)
        if np_name in ("setitem", "getitem") or node.target in (operator.setitem, operator.getitem):
            if len(node.args) < 2 or not isinstance(node.args[0], torch.fx.Node):
                return None
            buf, index = node.args[0], node.args[1]
            if isinstance(index, torch.fx.Node) and not _is_int_index(index):
                return None
            select: dict = {}
            dims = _index_dims(index, _ndim(buf), select)
            if dims is None:
                return None
            view = _int_view(buf)
            if view is not None:  # buf = base[i] (a per-layer / per-batch row): an access of base itself
                buf, outer, rest = view
                dims = {rest[d]: r for d, r in dims.items()}
                select = {**outer, **{rest[d]: i for d, i in select.items()}}
            write = np_name == "setitem" or node.target is operator.setitem
            kind = "numpy" if np_name else "tensor"
            return BufferAccess(node, buf, dims, write, kind, node.args[2] if write else None, _ndim(buf), select)
        if node.target is aten.copy_.default:
            base, dims = _aten_slice_chain(node.args[0])
            if base is None:
                return None
            return BufferAccess(node, base, dims, True, "aten", node.args[1], _ndim(base))
        if node.target is aten.slice.Tensor:
            base, dims = _aten_slice_chain(node)
            if base is None:
                return None
            return BufferAccess(node, base, dims, False, "aten", None, _ndim(base))
    if node.op == "call_method" and node.target == "copy_" and isinstance(node.args[0], torch.fx.Node):
        view = buffer_access(node.args[0])
        if view is not None and not view.is_write and view.kind == "tensor":
            return BufferAccess(node, view.buffer, view.dims, True, "copy_", node.args[1], view.ndim, view.select)
    return None


def _aten_slice_chain(node):
    dims = {}
    cur = node
    while isinstance(cur, torch.fx.Node) and cur.target is aten.slice.Tensor:
        args = list(cur.args) + [None] * (4 - len(cur.args))
        _, dim, start, stop = args[:4]
        step = cur.args[4] if len(cur.args) > 4 else 1
        if step != 1 or dim in dims:
            return None, None
        dim = dim if dim is not None else 0
        if start in (None, 0) and (stop is None or (isinstance(stop, int) and stop >= 2 ** 62)):
            pass
        else:
            dims[dim] = (start, stop)
        cur = cur.args[0]
    if cur is node or not isinstance(cur, torch.fx.Node):
        return None, None
    nd = _ndim(cur)
    if nd is not None:
        dims = {d % nd: r for d, r in dims.items()}
    return cur, dims


# ---------------------------------------------------------------------------------------------- editing


def insert_call(graph: torch.fx.Graph, before: torch.fx.Node, target, args, kwargs=None, *, like=None,
                op: str = "call_function") -> torch.fx.Node:
    """Insert a ``call_function``/``call_method`` node before ``before``, copying ``stack_trace`` from ``like``
    so reports and later passes still point at the user's line."""
    with graph.inserting_before(before):
        new = graph.create_node(op, target, tuple(args), kwargs or {})
    src = like if like is not None else before
    if "stack_trace" in src.meta:
        new.meta["stack_trace"] = src.meta["stack_trace"]
    propagate_meta(new)
    return new


def propagate_meta(node: torch.fx.Node) -> None:
    """Give a new node the traced value later patterns read (``example_value`` or ``val``, as the graph uses),
    computed on the fake tensors of its inputs. Left absent when the inputs carry none."""
    vals = [meta_value(a) for a in node.all_input_nodes]
    if not vals or any(v is None for v in vals):
        return
    key = "val" if any("val" in a.meta and "example_value" not in a.meta for a in node.all_input_nodes) else "example_value"
    # the inputs' own fake mode (the ambient tracing context may hold another one, e.g. around a deepcopy)
    fake_mode = next((v.fake_mode for v in vals if hasattr(v, 'fake_mode')), None)
    args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), meta_value)
    try:
        import contextlib

        with fake_mode if fake_mode is not None else contextlib.nullcontext():
            if node.op == "call_method":
                out = getattr(args[0], node.target)(*args[1:], **kwargs)
            else:
                out = node.target(*args, **kwargs)
    except Exception as exc:  # a value we cannot compute is only a missing hint
        import os
        if os.environ.get('KVPASS_DEBUG'): print('propagate_meta failed', node, exc)
        return
    node.meta[key] = out


def replace_uses(old: torch.fx.Node, new: torch.fx.Node, *, only: Iterable[torch.fx.Node] | None = None) -> None:
    """Point uses of ``old`` (or only those in ``only``) at ``new``."""
    if only is None:
        old.replace_all_uses_with(new)
    else:
        allowed = set(only)
        old.replace_all_uses_with(new, delete_user_cb=lambda user: user in allowed)


# ---------------------------------------------------------------------------------------------- level-aware emitters


def is_aten_graph(graph: torch.fx.Graph) -> bool:
    """True for ATen-level graphs (exported, make_fx, Inductor post-grad): no ``call_method`` nodes and ATen ops.
    Torch-level graphs (Dynamo, ``symbolic_trace``) get torch functions and methods from :class:`Emit`."""
    has_aten = False
    for n in graph.nodes:
        if n.op == "call_method":
            return False
        if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload):
            has_aten = True
    return has_aten


class Emit:
    """Insert nodes before ``anchor`` at the graph's own level: torch functions/methods in a Dynamo graph,
    ATen overloads in an ATen graph. Every node inherits ``like``'s stack trace and gets a traced value."""

    def __init__(self, graph: torch.fx.Graph, anchor: torch.fx.Node, like: torch.fx.Node | None = None,
                 aten_level: bool | None = None):
        self.graph, self.anchor, self.like = graph, anchor, like if like is not None else anchor
        self.aten = is_aten_graph(graph) if aten_level is None else aten_level

    def call(self, target, *args, **kwargs) -> torch.fx.Node:
        return insert_call(self.graph, self.anchor, target, args, kwargs, like=self.like)

    def method(self, name, *args) -> torch.fx.Node:
        return insert_call(self.graph, self.anchor, name, args, op="call_method", like=self.like)

    def slice(self, x, dims: dict, select: dict | None = None) -> torch.fx.Node:
        """``x`` sliced to ``[lo, hi)`` on each dim in ``dims`` (``None`` bounds are open) and indexed with an
        integer on each dim in ``select`` (dims are ``x``'s, before the integer indices drop them)."""
        select = select or {}
        if not dims and not select:
            return x
        if self.aten:
            for d, (lo, hi) in sorted(dims.items()):
                x = self.call(aten.slice.Tensor, x, d, 0 if lo is None else lo, 2 ** 63 - 1 if hi is None else hi)
            for d in sorted(select, reverse=True):  # highest first: lower dims keep their numbers
                x = self.call(aten.select.int, x, d, select[d])
            return x
        index = tuple(slice(*dims[d]) if d in dims else select[d] if d in select else slice(None)
                      for d in range(max(list(dims) + list(select)) + 1))
        return self.call(operator.getitem, x, index)

    def unsqueeze(self, x, dim: int) -> torch.fx.Node:
        return self.call(aten.unsqueeze.default, x, dim) if self.aten else self.method("unsqueeze", x, dim)

    def cat(self, pieces, dim: int) -> torch.fx.Node:
        if len(pieces) == 1:
            return pieces[0]
        return self.call(aten.cat.default, list(pieces), dim) if self.aten else self.call(torch.cat, list(pieces), dim)

    def pad(self, x, flat, value=0) -> torch.fx.Node:
        if self.aten:
            return self.call(aten.constant_pad_nd.default, x, list(flat), value)
        return self.call(torch.nn.functional.pad, x, list(flat), value=value)

    def detach(self, x) -> torch.fx.Node:
        return self.call(aten.detach.default, x) if self.aten else self.method("detach", x)

    def to_device(self, x, device) -> torch.fx.Node:
        return self.call(aten._to_copy.default, x, device=device) if self.aten else self.method("to", x, device)

    def size(self, x, dim):
        n = meta_value(x).shape[dim]
        if isinstance(n, int):
            return n
        return self.call(aten.sym_size.int, x, dim) if self.aten else self.method("size", x, dim)
