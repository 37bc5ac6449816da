"""The small graph the check analyses, and the readers that build it from in-memory FX objects.

Both readers (this module's :func:`from_graph_module` / :func:`from_exported_program`, and
:mod:`kvpass.fidelity.archive` for ``.pt2`` files) produce the same :class:`Program`: nodes in graph order with
their op name, arguments (schema names where known), shape, dtype, stack trace and which arguments they write in
place; the program's inputs split into token inputs, parameters, buffers and constants; and the mutations the
signature records (``buffers_to_mutate``). The analysis never sees a ``torch.fx.Node`` or a tensor: it only reads
this structure, so a program read from an untrusted file goes through exactly the same rules.
"""

from __future__ import annotations

import dataclasses
import operator
import re
from typing import Any, Callable

import torch
import torch.fx

from ..opfacts import name_facts, schema_facts

__all__ = ["Node", "Graph", "Source", "Program", "from_graph_module", "from_exported_program", "op_schema"]


@dataclasses.dataclass(eq=False)
class Node:
    """One value-producing node (or a placeholder / the output) of a :class:`Graph`.

    ``args`` holds positional arguments (a :class:`Node`, a list of them, or a plain value), ``arg_names`` their
    schema names where the op has a schema, ``writes`` the positions the op mutates in place, ``view`` whether
    the result aliases argument 0, ``subgraphs`` the bodies of a higher-order op, ``fx`` the FX node it was read
    from (``None`` for a node read from a file).
    """

    name: str
    op: str  # "placeholder" | "call" | "output"
    opname: str = ""
    target: str = ""
    args: list = dataclasses.field(default_factory=list)
    kwargs: dict = dataclasses.field(default_factory=dict)
    arg_names: list | None = None
    writes: tuple = ()
    view: bool = False
    shape: tuple | None = None
    dtype: torch.dtype | None = None
    stack_trace: str | None = None
    subgraphs: list = dataclasses.field(default_factory=list)
    fx: torch.fx.Node | None = None
    users: list = dataclasses.field(default_factory=list)
    graph: "Graph | None" = None

    def __repr__(self) -> str:
        return f"Node({self.name}: {self.target or self.op})"

    def named_args(self):
        """``(position or None, schema name or None, value)`` for every argument, keyword ones last."""
        for i, a in enumerate(self.args):
            name = self.arg_names[i] if self.arg_names and i < len(self.arg_names) else None
            yield i, name, a
        for k, a in self.kwargs.items():
            pos = self.arg_names.index(k) if self.arg_names and k in self.arg_names else None
            yield pos, k, a

    def tensor_args(self):
        """``(position or None, schema name or None, node)`` for every node argument (lists flattened)."""
        for pos, name, a in self.named_args():
            for x in (a if isinstance(a, (list, tuple)) else (a,)):
                if isinstance(x, Node):
                    yield pos, name, x

    def arg(self, pos: int, name: str, default=None):
        """Argument ``pos`` (or keyword ``name``)."""
        if pos < len(self.args):
            return self.args[pos]
        return self.kwargs.get(name, default)


@dataclasses.dataclass(eq=False)
class Graph:
    """Nodes in graph order; ``inputs`` are the placeholders, ``outputs`` the returned values (``None`` for a
    non-tensor output). A higher-order op's body is a nested :class:`Graph` whose inputs bind to the op's
    tensor operands."""

    nodes: list = dataclasses.field(default_factory=list)
    inputs: list = dataclasses.field(default_factory=list)
    outputs: list = dataclasses.field(default_factory=list)

    def add(self, node: Node) -> Node:
        node.graph = self
        self.nodes.append(node)
        for _, _, a in node.tensor_args():
            a.users.append(node)
        return node

    def walk(self):
        """Every node of this graph and of the nested subgraphs (each subgraph before the op that uses it)."""
        for n in self.nodes:
            for g in n.subgraphs:
                yield from g.walk()
            yield n


@dataclasses.dataclass(eq=False)
class Source:
    """A program input whose values come from the file or the capture, not from the token inputs.

    ``kind`` is ``"constant"`` (a captured or lifted tensor constant) or ``"buffer"`` (a registered buffer);
    ``values`` returns ``True``/``False`` for all-zero values, ``None`` when they are unknown, and is only called
    for a source that is reported (a reader of a file then reads that one payload).
    """

    node: Node
    name: str
    kind: str
    origin: str
    shape: tuple | None
    dtype: torch.dtype | None
    values: Callable[[], "bool | None"] = lambda: None
    note: str = ""


@dataclasses.dataclass(eq=False)
class Program:
    """What the analysis reads: the graph, its token inputs, its sources, its recorded mutations.

    ``mutations`` are ``(written value, input placeholder)`` pairs from the signature; ``not_inspected`` lists the
    parts of a file that were never loaded (pickled members, AOTInductor libraries).
    """

    graph: Graph
    tokens: list
    sources: list
    params: list = dataclasses.field(default_factory=list)
    mutations: list = dataclasses.field(default_factory=list)
    not_inspected: list = dataclasses.field(default_factory=list)
    order: Any = None


# --------------------------------------------------------------------------------------------------------
# Op schemas (torch's own registry: a lookup by name, nothing from a file runs)
# --------------------------------------------------------------------------------------------------------

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_SCHEMAS: dict = {}


def op_schema(namespace: str, op: str, overload: str):
    """The registered ``torch._C.FunctionSchema`` of ``namespace::op.overload``, or ``None``.

    Only a lookup in torch's operator registry (``_jit_get_schemas_for_operator``): no module is imported and no
    library is loaded, so a name read from an untrusted file is safe to pass.
    """
    key = (namespace, op, overload)
    if key not in _SCHEMAS:
        found = None
        if all(_NAME.match(p or "_") for p in key):
            try:
                for s in torch._C._jit_get_schemas_for_operator(f"{namespace}::{op}"):
                    if (s.overload_name or "default") == (overload or "default"):
                        found = s
                        break
            except Exception:  # noqa: BLE001 - an odd name: no schema
                found = None
        _SCHEMAS[key] = found
    return _SCHEMAS[key]


# --------------------------------------------------------------------------------------------------------
# FX reader
# --------------------------------------------------------------------------------------------------------

# make_fx/jit names its captured tensors _tensor_constant<N>; export lifts them as lifted_tensor_<N> or
# _captured_<N> (strict, numpy buffers). A GraphModule registers every tensor it copies as a buffer, so a
# name is the only way to tell a captured constant from model state there.
CONST_NAME = re.compile(r"^(_tensor_constant|_lifted_tensor_constant|lifted_tensor_|_captured_)\d+(_\d+)?$")


def basename(target: str) -> str:
    """The last dotted component of ``target``."""
    return str(target).rsplit(".", 1)[-1]


def fx_opname(node: torch.fx.Node) -> str:
    """A short op name: ``copy_``, ``scaled_dot_product_attention``, ``getitem``, ``__mul__``, ..."""
    if node.op == "call_method":
        return str(node.target)
    if node.op != "call_function":
        return ""
    t = node.target
    if isinstance(t, torch._ops.OpOverload):
        return t._opname
    if isinstance(t, torch._ops.OpOverloadPacket):
        return t.__name__
    special = {operator.getitem: "getitem", operator.setitem: "setitem", operator.matmul: "__matmul__",
               operator.mul: "__mul__", operator.imul: "__mul__", operator.truediv: "__truediv__",
               operator.itruediv: "__truediv__", operator.add: "__add__", operator.iadd: "__add__",
               operator.sub: "__sub__", operator.isub: "__sub__", operator.neg: "neg"}
    try:
        if t in special:
            return special[t]
    except TypeError:
        pass
    return getattr(t, "__name__", "") or ""


def fx_pretty_target(node: torch.fx.Node) -> str:
    """``aten.copy_.default``, ``.view`` (a method), or the function's name."""
    t = node.target
    if isinstance(t, torch._ops.OpOverload):
        return f"{t.namespace}.{t._opname}.{t._overloadname}"
    if node.op == "call_method":
        return f".{t}"
    return getattr(t, "__name__", None) or str(t)


def _dim(s: Any) -> int | str:
    """A static size as an int, a symbolic one as its expression (never evaluated: no guards)."""
    if isinstance(s, int):
        return s
    if isinstance(s, torch.SymInt):
        expr = s.node.expr
        return int(expr) if getattr(expr, "is_number", False) else str(expr)
    return str(s)


def fx_tensor_meta(node: torch.fx.Node):
    """``(shape, dtype)`` from ``meta["val"]``/``example_value``/``tensor_meta``, else ``(None, None)``."""
    v = node.meta.get("val", node.meta.get("example_value"))
    if isinstance(v, torch.Tensor):
        return tuple(_dim(s) for s in v.shape), v.dtype
    tm = node.meta.get("tensor_meta")
    if tm is not None and hasattr(tm, "shape"):
        return tuple(_dim(s) for s in tm.shape), tm.dtype
    return None, None


def _fetch_attr(root: torch.nn.Module, target: str):
    obj = root
    for part in str(target).split("."):
        if not hasattr(obj, part):
            return None
        obj = getattr(obj, part)
    return obj


def tensor_all_zeros(value: Any) -> bool | None:
    """``True``/``False`` for a real tensor's values; ``None`` for a fake, meta or unreadable one."""
    if not isinstance(value, torch.Tensor):
        return None
    try:
        from torch._subclasses.fake_tensor import FakeTensor

        if isinstance(value, FakeTensor) or value.device.type == "meta":
            return None
        with torch.no_grad():
            return bool((value == 0).all())
    except Exception:  # noqa: BLE001 - a tensor subclass we cannot read
        return None


class _FxReader:
    def __init__(self, root: torch.fx.GraphModule):
        self.root = root
        self.map: dict[torch.fx.Node, Node] = {}
        self.get_attrs: list[tuple[torch.fx.Node, Node, torch.fx.GraphModule]] = []
        self.order: dict[Node, int] = {}

    def graph(self, gm: torch.fx.GraphModule) -> Graph:
        g = Graph()
        for fxn in gm.graph.nodes:
            if fxn.op == "output":
                outs = fxn.args[0]
                outs = list(outs) if isinstance(outs, (list, tuple)) else [outs]
                g.outputs = [self.map.get(o) if isinstance(o, torch.fx.Node) else None for o in outs]
                continue
            shape, dtype = fx_tensor_meta(fxn)
            node = Node(name=fxn.name, op="placeholder" if fxn.op in ("placeholder", "get_attr") else "call",
                        shape=shape, dtype=dtype, stack_trace=fxn.meta.get("stack_trace"), fx=fxn)
            if fxn.op == "get_attr":
                value = _fetch_attr(gm, fxn.target)
                if isinstance(value, torch.fx.GraphModule):
                    node.op = "subgraph"
                    node.subgraphs = [self.graph(value)]
                else:
                    self.get_attrs.append((fxn, node, gm))
                    if isinstance(value, torch.Tensor) and shape is None:
                        node.shape, node.dtype = tuple(_dim(s) for s in value.shape), value.dtype
            elif fxn.op in ("call_function", "call_method", "call_module"):
                node.opname = fx_opname(fxn)
                node.target = fx_pretty_target(fxn)
                node.args = [self._arg(a) for a in fxn.args]
                node.kwargs = {k: self._arg(a) for k, a in fxn.kwargs.items()}
                if isinstance(fxn.target, torch._ops.OpOverload):
                    node.arg_names, node.writes, node.view = schema_facts(fxn.target._schema)
                else:
                    node.writes, node.view = name_facts(node.opname)
                subs = [a for a in node.args if isinstance(a, Node) and a.op == "subgraph"]
                node.subgraphs = [s for a in subs for s in a.subgraphs]
            self.map[fxn] = node
            if node.op == "placeholder" and fxn.op == "placeholder":
                g.inputs.append(node)
            if node.op != "subgraph":
                g.add(node)
                self.order[node] = len(self.order)
        return g

    def _arg(self, a):
        if isinstance(a, torch.fx.Node):
            return self.map.get(a)
        if isinstance(a, (list, tuple)):
            return [self._arg(x) for x in a]
        return a


def _gm_sources(reader: _FxReader) -> tuple[list[Source], list[Node]]:
    sources, params = [], []
    for fxn, node, owner in reader.get_attrs:
        buffers = {name for name, _ in owner.named_buffers()}
        value = _fetch_attr(owner, fxn.target)
        if not isinstance(value, torch.Tensor):
            continue
        base = basename(fxn.target)
        if isinstance(value, torch.nn.Parameter) or base.startswith("_param_constant"):
            params.append(node)
            continue
        if fxn.target in buffers and not CONST_NAME.match(base):
            sources.append(Source(node, str(fxn.target), "buffer", "registered buffer (get_attr)", node.shape,
                                  node.dtype, (lambda v=value: tensor_all_zeros(v))))
            continue
        sources.append(Source(node, str(fxn.target), "constant", "tensor constant (get_attr)", node.shape,
                              node.dtype, (lambda v=value: tensor_all_zeros(v))))
    return sources, params


def from_graph_module(gm: torch.fx.GraphModule) -> Program:
    """A :class:`Program` for a GraphModule: its placeholders are the token inputs; its tensor ``get_attr``s
    are parameters, buffers (registered, not named like a capture) or constants."""
    reader = _FxReader(gm)
    graph = reader.graph(gm)
    sources, params = _gm_sources(reader)
    return Program(graph=graph, tokens=list(graph.inputs), sources=sources, params=params, order=reader.order)


def from_exported_program(ep: torch.export.ExportedProgram) -> Program:
    """A :class:`Program` for an ExportedProgram, its inputs classified by the graph signature."""
    from torch.export.graph_signature import InputKind

    reader = _FxReader(ep.graph_module)
    graph = reader.graph(ep.graph_module)
    by_name = {n.name: n for n in graph.inputs}
    tokens, params = [], []
    sources, extra_params = _gm_sources(reader)
    params.extend(extra_params)
    for spec in ep.graph_signature.input_specs:
        node = by_name.get(getattr(spec.arg, "name", None))
        if node is None:
            continue
        if spec.kind == InputKind.USER_INPUT:
            tokens.append(node)
        elif spec.kind == InputKind.PARAMETER:
            params.append(node)
        elif spec.kind == InputKind.CONSTANT_TENSOR and spec.target is not None:
            value = ep.constants.get(spec.target)
            sources.append(Source(node, spec.target, "constant", "lifted CONSTANT_TENSOR", node.shape, node.dtype,
                                  (lambda v=value: tensor_all_zeros(v))))
        elif spec.kind == InputKind.BUFFER and spec.target is not None:
            value = ep.state_dict.get(spec.target, ep.constants.get(spec.target))
            if CONST_NAME.match(basename(spec.target)):
                # an export of a make_fx/jit GraphModule: its _tensor_constant<N> arrive as buffers
                sources.append(Source(node, spec.target, "constant", "captured tensor constant lifted as a buffer",
                                      node.shape, node.dtype, (lambda v=value: tensor_all_zeros(v))))
            else:
                sources.append(Source(node, spec.target, "buffer", "registered buffer", node.shape, node.dtype,
                                      (lambda v=value: tensor_all_zeros(v))))
    mutations = []
    sig = ep.graph_signature
    outs = {}
    for i, spec in enumerate(sig.output_specs):
        if i < len(graph.outputs) and graph.outputs[i] is not None:
            outs[getattr(spec.arg, "name", None)] = graph.outputs[i]
    targets = {s.target: by_name.get(s.arg.name) for s in sig.input_specs if getattr(s.arg, "name", None)}
    for out_name, target in {**sig.buffers_to_mutate, **getattr(sig, "user_inputs_to_mutate", {})}.items():
        written, dest = outs.get(out_name), targets.get(target) or by_name.get(target)
        if written is not None and dest is not None:
            mutations.append((written, dest))
    return Program(graph=graph, tokens=tokens, sources=sources, params=params, mutations=mutations,
                   order=reader.order)
