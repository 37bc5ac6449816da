"""The small API rules in ``kvpass.patterns`` build on: symbolic facts about sizes and positions, and an
emitter that adds ATen nodes with their traced values and the user's source line.

Facts are *proofs*: :func:`known_le` and friends answer True only when the relation holds for every value of
the graph's symbols (``statically_known_true``); False means "not proven", never "proven false". Nothing here
adds a guard to the graph's ShapeEnv.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx
from torch._subclasses.fake_tensor import FakeTensor
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .aliasing import meta_value

__all__ = ["known_le", "known_lt", "known_eq", "known_ne", "sym_value", "norm_dim", "norm_index", "norm_slice",
           "Emitter", "select_by_position", "as_stored"]

aten = torch.ops.aten
_INT_MAX = 2 ** 62


def sym_value(x: Any):
    """An int or SymInt for a bound given as an int, a SymInt or a graph node producing one."""
    v = meta_value(x) if isinstance(x, torch.fx.Node) else x
    return v


def _known(pred) -> bool:
    if isinstance(pred, bool):
        return pred
    try:
        return bool(statically_known_true(pred)) or _known_without_mod(pred)
    except Exception:  # noqa: BLE001 - an expression sympy cannot decide is not proven
        return False


def _known_without_mod(pred) -> bool:
    """``pred`` with every ``Mod(a, m)`` whose ``0 <= a < m`` is proven replaced by ``a`` (the same value there),
    then proven: a ring position ``pos % W`` read before the ring is full (the graph's guards bound ``pos``)."""
    import sympy
    from torch.utils._sympy.functions import Mod, PythonMod

    expr, env = pred.node.expr, pred.node.shape_env
    mods = list(expr.atoms(Mod, PythonMod, sympy.Mod))
    if not mods:
        return False
    def proven(e):
        out = env._maybe_evaluate_static(e)
        return out is not None and bool(out)

    subst = {m: m.args[0] for m in mods if proven(m.args[0] >= 0) and proven(m.args[0] < m.args[1])}
    if not subst:
        return False
    return proven(expr.xreplace(subst))


def known_le(a, b) -> bool:
    """``a <= b`` for every value of the symbols."""
    va, vb = sym_value(a), sym_value(b)
    if va is None or vb is None:
        return False
    return _known(va <= vb)


def known_lt(a, b) -> bool:
    """``a < b`` for every value of the symbols."""
    va, vb = sym_value(a), sym_value(b)
    if va is None or vb is None:
        return False
    return _known(va < vb)


def known_eq(a, b) -> bool:
    """``a == b`` for every value of the symbols."""
    if a is b:
        return True
    va, vb = sym_value(a), sym_value(b)
    if va is None or vb is None:
        return False
    return _known(va == vb)


def known_ne(a, b) -> bool:
    """``a != b`` for every value of the symbols."""
    return known_lt(a, b) or known_lt(b, a)


def norm_dim(d: int, rank: int) -> int:
    """A dim in ``[0, rank)``."""
    return d + rank if d < 0 else d


def norm_index(i, size):
    """An index in ``[0, size)`` (negative ints count from the end); ``None`` if that cannot be proven."""
    if isinstance(i, int) and i < 0:
        if isinstance(size, int):
            i += size
        else:
            return None
    if known_le(0, i) and known_lt(i, size):
        return i
    return None


def norm_slice(node: torch.fx.Node, shape, first: int = 1):
    """``(dim, start, end, step)`` of a ``slice``/``slice_scatter`` node, with ``0 <= start <= end <= size``
    proven (start and end ``None`` when not: the op would clamp them at run time)."""
    args = list(node.args) + [None] * 6
    names = ("dim", "start", "end", "step")
    vals = [node.kwargs.get(n, args[first + k]) for k, n in enumerate(names)]
    d, a, b, step = vals
    d = norm_dim(0 if d is None else d, len(shape))
    step = 1 if step is None else step
    size = shape[d]
    a = 0 if a is None else a
    if b is None or (isinstance(b, int) and b >= _INT_MAX):
        b = size
    if isinstance(a, int) and a < 0:
        a = a + size if isinstance(size, int) else None
    if isinstance(b, int) and b < 0:
        b = b + size if isinstance(size, int) else None
    if a is None or b is None:
        return d, None, None, step
    if isinstance(b, int) and isinstance(size, int) and b > size:
        b = size
    if not (known_le(0, a) and known_le(a, b) and known_le(b, size)):
        return d, None, None, step
    return d, a, b, step


class Emitter:
    """Adds nodes before ``anchor``, each with its traced value (computed on the graph's fake values) and the
    anchor's ``stack_trace``; :meth:`discard` removes what it added (a rule that gave up)."""

    def __init__(self, graph: torch.fx.Graph, anchor: torch.fx.Node, created: set | None = None):
        self.graph, self.anchor = graph, anchor
        self.added: list[torch.fx.Node] = []
        self._sym_nodes = None
        self.created = created if created is not None else set()

    def _arg(self, a):
        """A graph argument for ``a``: a SymInt from a traced value becomes the node that computes it."""
        if isinstance(a, (list, tuple)):
            return type(a)(self._arg(x) for x in a)
        if not isinstance(a, torch.SymInt):
            return a
        as_int = a.node.maybe_as_int()
        if as_int is not None:
            return as_int
        expr = a.node.expr
        if self._sym_nodes is None:
            self._sym_nodes = {}
            for n in self.graph.nodes:
                v = n.meta.get("val")
                if isinstance(v, torch.SymInt):
                    self._sym_nodes.setdefault(v.node.expr, n)
                elif isinstance(v, torch.Tensor) and n.op == "placeholder":
                    for d, size in enumerate(v.shape):
                        if isinstance(size, torch.SymInt):
                            self._sym_nodes.setdefault(size.node.expr, (n, d))
        found = self._sym_nodes.get(expr)
        if found is None:
            raise LookupError(f"no value in the graph computes the size {a}")
        if isinstance(found, tuple):
            found = self._node(aten.sym_size.int, found, a, at_start=True)
            self._sym_nodes[expr] = found
        return found

    def _node(self, target, args, val, at_start=False) -> torch.fx.Node:
        args = self._arg(tuple(args))
        where = self.graph.inserting_before(self.anchor)
        if at_start:  # a size of an input: right after the placeholders, so every later node may use it
            first = next(n for n in self.graph.nodes if n.op != "placeholder")
            where = self.graph.inserting_before(first)
        with where:
            node = self.graph.call_function(target, tuple(args))
        node.meta["val"] = val
        for key in ("stack_trace", "nn_module_stack", "source_fn_stack", "original_aten", "from_node"):
            if key in self.anchor.meta:
                node.meta[key] = self.anchor.meta[key]
        self.added.append(node)
        self.created.add(node)
        return node

    def _fake_mode(self, used):
        """The fake mode of the graph's values and of ``used``, the nodes a new op reads; ``None`` where they
        have none in common: a ``make_fx(tracing_mode="real")`` capture gives every value a mode of its own
        (static shapes), and the values this emitter made have the emitter's."""
        from torch._guards import detect_fake_mode

        vals = [n.meta.get("val") for n in self.graph.nodes if n.op == "placeholder"]
        vals += [meta_value(n) for n in used]
        try:
            return detect_fake_mode([v for v in vals if isinstance(v, torch.Tensor)])
        except AssertionError:  # "fake mode ... doesn't match mode ...": one mode per value
            return None

    def _fresh_mode(self):
        from torch._subclasses.fake_tensor import FakeTensorMode

        if getattr(self, "_own_mode", None) is None:
            self._own_mode = FakeTensorMode(allow_non_fake_inputs=True)
        return self._own_mode

    def call(self, target, *args, **kwargs) -> torch.fx.Node:
        """``target(*args, **kwargs)`` as a new node; args are nodes, ints, SymInt nodes or lists of them. Its
        traced value is computed on the graph's fake values, adding no guard to their ShapeEnv."""
        import contextlib

        used = []
        torch.fx.node.map_arg(args, used.append)
        mode = self._fake_mode(used)
        # Values of modes of their own (static shapes only) are remade in one mode: same size, strides and dtype.
        remake = mode is None and any(isinstance(meta_value(n), FakeTensor) for n in used)
        if remake:
            mode = self._fresh_mode()

        def val(a):
            if isinstance(a, torch.fx.Node):
                v = meta_value(a)
                if remake and isinstance(v, FakeTensor):
                    with mode:
                        return torch.empty_strided(v.size(), v.stride(), dtype=v.dtype, device=v.device)
                return v
            if isinstance(a, (list, tuple)):
                return type(a)(val(x) for x in a)
            return a
        shape_env = getattr(mode, "shape_env", None)
        guards = shape_env.suppress_guards() if shape_env is not None else contextlib.nullcontext()
        with (mode if mode is not None else contextlib.nullcontext()), guards:
            v = target(*[val(a) for a in args], **kwargs)
        node = self._node(target, args, v)
        if kwargs:
            node.kwargs = kwargs
        return node

    def cat(self, pieces: list, d: int):
        """``cat(pieces, d)``, or the one piece."""
        return pieces[0] if len(pieces) == 1 else self.call(aten.cat.default, list(pieces), d)

    def _sym(self, op, a, b):
        va, vb = sym_value(a), sym_value(b)
        v = op(va, vb)
        if isinstance(v, int) and not isinstance(v, bool):
            return v
        return self._node(op, (a, b), v)

    def add(self, a, b):
        """``a + b`` as an int or a SymInt node."""
        if known_eq(b, 0):
            return a
        if known_eq(a, 0):
            return b
        return self._sym(operator.add, a, b)

    def sub(self, a, b):
        """``a - b`` as an int or a SymInt node."""
        if known_eq(b, 0):
            return a
        if known_eq(a, b):
            return 0
        return self._sym(operator.sub, a, b)

    def mod(self, a, b):
        """``a % b`` (Python's: the sign of ``b``) as an int or a SymInt node."""
        return self._sym(operator.mod, a, b)

    def drop_after(self, mark: int) -> None:
        """Remove the nodes added since ``len(self.added) == mark`` that nothing uses (a branch given up)."""
        for node in reversed(self.added[mark:]):
            if not node.users:
                self.graph.erase_node(node)
                self.created.discard(node)
        self.added = self.added[:mark] + [n for n in self.added[mark:] if not getattr(n, "_erased", False)]

    def discard(self) -> None:
        for node in reversed(self.added):
            if not node.users:
                self.graph.erase_node(node)
                self.created.discard(node)
        self.added = []



def select_by_position(em: Emitter, base_read, value, d: int, a, b, s, e, size):
    """The value of ``slice(slice_scatter(B, V, d, s, e), d, a, b)`` when the order of ``[a, b)`` and ``[s, e)``
    is not known when the graph is traced (two positions that are two symbols): for each index ``i`` in
    ``[a, b)``, ``V[i - s]`` where ``s <= i < e``, else ``B[i]``, chosen element by element when the graph runs.
    ``base_read`` is the value of ``B[a:b]``, ``size`` is ``B.size(d)``. ``None`` when ``V`` cannot be proven
    non-empty along ``d`` (``s < e``).

    Emitted::

        i = slice(iota(size), 0, a, b)
        inside = (i >= s) & (i < e)
        where(inside (unsqueezed to dim d), V[..., (i - s) * inside (at dim d), ...], B[a:b])

    Exact: ``where`` and the gather (``aten.index``) only move values; outside the write the index is 0, a valid index of
    ``V`` (non-empty), whose value ``where`` does not select."""
    vv = meta_value(value)
    if not isinstance(vv, torch.Tensor) or not known_lt(s, e):
        return None
    dev = vv.device
    # prims.iota, not aten.arange: a post-grad graph has no decomposition left to run, and Inductor lowers iota
    iota = em.call(torch.ops.prims.iota.default, size, start=0, step=1, dtype=torch.int64, device=dev,
                   requires_grad=False)
    pos = em.call(aten.slice.Tensor, iota, 0, a, b)
    inside = em.call(aten.logical_and.default, em.call(aten.ge.Scalar, pos, s), em.call(aten.lt.Scalar, pos, e))
    index = em.call(aten.mul.Tensor, em.call(aten.sub.Scalar, pos, s), inside)
    picked = em.call(aten.index.Tensor, value, [None] * d + [index])  # index_select: a decomposition Inductor ran
    mask = inside
    for _ in range(d):
        mask = em.call(aten.unsqueeze.default, mask, 0)
    for _ in range(vv.dim() - d - 1):
        mask = em.call(aten.unsqueeze.default, mask, -1)
    return em.call(aten.where.self, mask, picked, base_read)


#: The float dtypes a compiler may keep at a higher precision between a cast and its use (Inductor computes
#: fp16/bf16 in float32 and drops a float32 -> fp16 -> float32 pair inside a kernel unless
#: ``emulate_precision_casts``), each with the integer dtype of its width for a bit-cast.
_NARROW_FLOATS = {torch.float16: torch.int16, torch.bfloat16: torch.int16}
for _name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz"):
    if hasattr(torch, _name):
        _NARROW_FLOATS[getattr(torch, _name)] = torch.uint8

#: Ops whose output holds exactly the elements of their first input (no rounding of their own).
_MOVES = (aten.slice.Tensor, aten.select.int, aten.permute.default, aten.transpose.int, aten.view.default,
          aten._unsafe_view.default, aten.reshape.default, aten.unsqueeze.default, aten.squeeze.dim,
          aten.squeeze.default, aten.squeeze.dims, aten.expand.default, aten.alias.default, aten.clone.default)


def _rounded_already(node, structure=()) -> bool:
    """Whether ``node``'s elements come from memory or a bit-cast (not from arithmetic a compiler may keep wider:
    a cast, a ``copy`` into another dtype), or from one of the ``structure`` ops (values a rule decomposes
    further, into pieces it rounds itself)."""
    while isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target in _MOVES:
        node = node.args[0]
    if not isinstance(node, torch.fx.Node) or node.op != "call_function":
        return True  # a graph input or a constant: loaded from memory
    return node.target is aten.view.dtype or node.target in structure


def as_stored(em: Emitter, node, structure=()):
    """``node`` as a buffer of its dtype holds it, for a rule that replaces a read of that buffer with ``node``.

    A read of memory sees values rounded to the buffer's dtype; a graph edge may not: Inductor computes fp16 and
    bf16 values in float32 and, inside one kernel, drops a float32 -> fp16 -> float32 pair (its default
    ``emulate_precision_casts=False``), so a K written as ``k.to(float16)`` and read back as ``.float()`` would
    reach attention unrounded. For a narrow float ``node`` computed by arithmetic or a cast, the value is made to
    pass through its own bits::

        view(view(node, intN), dtype)     # == node, element for element (two bit-casts of one width)

    which every backend must compute in ``dtype`` (a bit-cast needs the bits), so the rounding survives any
    fusion. ``constant_pad_nd(x)`` is rounded as ``constant_pad_nd(as_stored(x))`` (the pad only adds constants,
    and ``pad_slice`` still sees the pad). Values loaded from memory, views of the ``structure`` ops (what the
    caller decomposes further: a functional write, a ``cat``), and dtypes no compiler widens are returned as
    they are."""
    v = meta_value(node)
    if not isinstance(v, torch.Tensor) or v.dtype not in _NARROW_FLOATS or _rounded_already(node, structure):
        return node
    if node.target is aten.constant_pad_nd.default:
        inner = as_stored(em, node.args[0], structure)
        return node if inner is node.args[0] else em.call(aten.constant_pad_nd.default, inner, *node.args[1:])
    return em.call(aten.view.dtype, em.call(aten.view.dtype, node, _NARROW_FLOATS[v.dtype]), v.dtype)
