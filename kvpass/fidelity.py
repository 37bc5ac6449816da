"""Trace-fidelity check: find K/V that a capture baked into the graph instead of computing it.

A decoder whose KV cache round-trips through host memory (``k.detach().cpu().numpy()`` into a preallocated
array, ``torch.from_numpy(buf[:, :pos])`` back) runs fine eagerly, but a tracer cannot see the host side: the
buffer it reads back is captured as a *tensor constant* holding whatever the buffer held at trace time (zeros,
or the trace-time K/V), and the K/V the graph computed is cut off. The exported decoder then attends over
stale K/V. :func:`check` finds that in a graph a user hands it:

``constant-kv``
    a tensor constant (``get_attr`` of a ``_tensor_constant*``; a lifted ``CONSTANT_TENSOR`` input of an
    ``ExportedProgram``) that flows, through view-like ops, copies, casts and scalar scaling, into an
    attention's key or value: the ``key``/``value`` argument of SDPA (ATen or ``F.scaled_dot_product_attention``),
    of any op whose schema names ``query``/``key``/``value``, or of ``flex_attention``; the right-hand side of the
    ``Q @ K^T`` matmul whose result feeds a softmax; the right-hand side of the ``P @ V`` matmul whose left side
    comes from a softmax; or a ``cat`` along a non-last dim with a computed K/V (``make_fx`` real mode, jit.trace).
``mutated-constant``
    such a constant that the graph also writes in place (``copy_``, ``index_copy_``, ``index_put_``, setitem):
    the host buffer of ``torch.export(strict=True)``. A mutated constant whose written value comes from a
    projection is reported even when no read of it reaches an attention.
``dangling-kv``
    a computed K/V whose only use is a dangling ``detach`` chain (``detach``, ``_to_copy``/``.cpu()``, ...
    with no further users) while a same-shaped constant feeds the attention instead (``make_fx`` real mode).

Constants that are not K/V stay silent: rotary tables, masks and index tensors never reach a key/value slot;
parameters and registered buffers (a ``StaticCache`` exported as buffers) are not constants; empty and scalar
constants (an empty functional history, a position counter) are skipped.

``check`` only reads graphs and imports no rewrite pattern, so ``kvpass.export`` (and anything else) can call
:func:`require_faithful` on its result.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import operator
import os
import re
from typing import Any, Iterable, Iterator

import torch
import torch.fx

from .errors import KVPassError, user_source_line

__all__ = [
    "check", "Finding", "format_findings", "require_faithful",
    "FidelityError", "CheckInputError", "ProgramLoadError",
    "CONSTANT_KV", "MUTATED_CONSTANT", "DANGLING_KV",
]

#: ``Finding.kind`` of a tensor constant that reaches an attention's key or value.
CONSTANT_KV = "constant-kv"
#: ``Finding.kind`` of such a constant that the graph also writes in place (the strict-export host buffer).
MUTATED_CONSTANT = "mutated-constant"
#: ``Finding.kind`` of a computed K/V whose only use is a dangling ``detach`` chain.
DANGLING_KV = "dangling-kv"


class CheckInputError(KVPassError, TypeError):
    """:func:`check` was given something that is neither a GraphModule, an ExportedProgram nor a path."""


class ProgramLoadError(KVPassError, OSError):
    """A ``.pt2`` path given to :func:`check` is missing or ``torch.export.load`` cannot read it.

    ``path`` is the path as given, ``reason`` a one-line cause.
    """

    def __init__(self, path: str, reason: str):
        self.path, self.reason = path, reason
        super().__init__(f"kvpass.check({path!r}): cannot read it: {reason}")


class FidelityError(KVPassError):
    """Raised by :func:`require_faithful` when a graph has K/V that do not come from the computation.

    ``findings`` holds the :class:`Finding` objects; the message is their table.
    """

    def __init__(self, findings: list["Finding"], what: str = "graph"):
        self.findings = list(findings)
        super().__init__(
            f"{what} is not faithful: {len(self.findings)} K/V value(s) do not come from the computation\n"
            + format_findings(self.findings)
        )


@dataclasses.dataclass(frozen=True)
class Finding:
    """One K/V value that does not come from the computation.

    Attributes:
        kind: ``"constant-kv"``, ``"mutated-constant"`` or ``"dangling-kv"`` (see the module docstring).
        node: name of the graph node: the constant's ``get_attr``/placeholder, or the computed K/V left dangling.
        target: the constant's name (``_tensor_constant0``, ``lifted_tensor_4``, ``_captured_1``) or, for
            ``dangling-kv``, the op that computed the K/V.
        shape: the tensor's shape.
        dtype: the tensor's dtype (``None`` when unknown).
        all_zeros: ``True``/``False`` for a constant whose values are known; ``None`` when they are not (a
            FakeTensor constant, or a ``dangling-kv`` finding, which is not a constant).
        consumer: which attention input it reaches, for example ``"key of scaled_dot_product_attention
            (scaled_dot_product_attention_1) via cat (cat_3) (+2 more: key)"``: the first one found, the ``cat``
            it went through, how many other attention inputs it also reaches.
        source: the user's source line (``file:line in fn: code``) from ``node.meta["stack_trace"]``: of the
            constant's node, or of the first node on its way to the consumer that has one; ``"<unknown>"``
            when the capture recorded none (``make_fx`` needs ``record_stack_traces=True``).
        detail: anything else worth knowing (the in-place writes, the paired constant, the path).
        fx_node: the ``torch.fx.Node`` itself (not compared, not printed).
    """

    kind: str
    node: str
    target: str
    shape: tuple
    dtype: torch.dtype | None
    all_zeros: bool | None
    consumer: str
    source: str
    detail: str = ""
    fx_node: torch.fx.Node | None = dataclasses.field(default=None, compare=False, repr=False)

    @property
    def values(self) -> str:
        """``"all zeros"``, ``"stale non-zero values"`` or ``"values unknown"``."""
        if self.kind == DANGLING_KV:
            return "computed, disconnected"
        if self.all_zeros is None:
            return "values unknown"
        return "all zeros" if self.all_zeros else "stale non-zero values"

    def __str__(self) -> str:
        dtype = str(self.dtype).replace("torch.", "") if self.dtype is not None else "?"
        head = f"{self.kind}: {self.node}"
        if self.target and self.target != self.node:
            head += f" ({self.target})"
        text = (f"{head} {list(self.shape)} {dtype}, {self.values} -> {self.consumer}\n"
                f"    at {self.source}")
        if self.detail:
            text += f"\n    {self.detail}"
        return text


# --------------------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------------------


def check(obj: Any) -> list[Finding]:
    """Find K/V values in a captured graph that do not come from the computation.

    Args:
        obj: a ``torch.fx.GraphModule`` (``make_fx``, ``torch.jit``-style tracers, ``ep.module()``, Dynamo), a
            ``torch.export.ExportedProgram``, or a path (``str``/``os.PathLike``) to a ``.pt2`` file written by
            ``torch.export.save``.

    Returns:
        The findings in graph order, ``[]`` when every attention key/value is connected to the computation.

    Raises:
        CheckInputError: ``obj`` is of another type.
        ProgramLoadError: the path is missing or is not a loadable ``.pt2``.
    """
    if isinstance(obj, (str, os.PathLike)):
        obj = _load_program(obj)
    if isinstance(obj, torch.export.ExportedProgram):
        return _Checker(obj.graph_module, _ep_constants(obj)).run()
    if isinstance(obj, torch.fx.GraphModule):
        return _Checker(obj, _gm_constants(obj)).run()
    hint = " (capture it first: make_fx, torch.export.export)" if isinstance(obj, torch.nn.Module) else ""
    raise CheckInputError(
        f"kvpass.check(obj): expected a torch.fx.GraphModule, a torch.export.ExportedProgram or a path to a "
        f".pt2 file, got {type(obj).__name__}{hint}"
    )


def require_faithful(obj: Any, what: str = "graph") -> None:
    """Run :func:`check` on ``obj`` and raise :class:`FidelityError` if it has findings (for ``kvpass.export``)."""
    findings = check(obj)
    if findings:
        raise FidelityError(findings, what)


def format_findings(findings: Iterable[Finding]) -> str:
    """A fixed-width table of ``findings``, one row each, the user's source line last."""
    findings = list(findings)
    if not findings:
        return "no findings"
    rows = [("KIND", "NODE", "SHAPE", "DTYPE", "VALUES", "CONSUMER", "SOURCE")]
    for f in findings:
        node = f.node if not f.target or f.target == f.node else f"{f.node} ({f.target})"
        dtype = str(f.dtype).replace("torch.", "") if f.dtype is not None else "?"
        rows.append((f.kind, node, str(list(f.shape)), dtype, f.values, f.consumer, f.source))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:-1], widths)) + "  " + r[-1] for r in rows]
    return "\n".join(line.rstrip() for line in lines)


# --------------------------------------------------------------------------------------------------------
# Loading and constant discovery
# --------------------------------------------------------------------------------------------------------


class _CollectLogs(logging.Handler):
    """Collects the one-line cause of records logged while ``torch.export.load`` runs."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.causes: list[str] = []

    def emit(self, record):
        exc = record.exc_info[1] if record.exc_info else None
        text = f"{type(exc).__name__}: {_first_line(str(exc))}" if exc is not None else record.getMessage()
        self.causes.append(_first_line(text))


def _load_program(path) -> torch.export.ExportedProgram:
    shown = os.fspath(path)
    if not os.path.exists(shown):
        raise ProgramLoadError(shown, "no such file")
    if os.path.isdir(shown):
        raise ProgramLoadError(shown, "it is a directory, not a .pt2 file")
    # torch.export.load logs a whole traceback as a warning (then tries a legacy format) before it raises:
    # keep its cause for our one-line message, and keep the traceback off the user's terminal.
    logger = logging.getLogger("torch.export")
    handler = _CollectLogs()
    saved = (logger.handlers[:], logger.propagate)
    logger.handlers[:] = [handler]
    logger.propagate = False
    try:
        ep = torch.export.load(shown)
    except Exception as e:  # noqa: BLE001 - any failure to load is the same user-facing error
        cause = next((c for c in handler.causes if c), "") or f"{type(e).__name__}: {_first_line(str(e))}"
        raise ProgramLoadError(shown, f"torch.export.load failed: {cause}") from e
    finally:
        logger.handlers[:] = saved[0]
        logger.propagate = saved[1]
    if not isinstance(ep, torch.export.ExportedProgram):  # pragma: no cover - torch contract
        raise ProgramLoadError(shown, f"it loaded as {type(ep).__name__}, not an ExportedProgram")
    return ep


def _first_line(text: str) -> str:
    """The first non-empty line of ``text``, cut after its first sentence when that is long."""
    line = next((line.strip() for line in text.splitlines() if line.strip()), "")
    if len(line) > 120 and ". " in line[20:]:
        line = line[: line.index(". ", 20) + 1]
    return line


@dataclasses.dataclass
class _Const:
    node: torch.fx.Node
    name: str
    value: torch.Tensor | None
    origin: str


# make_fx/jit names its captured tensors _tensor_constant<N>; export lifts them as lifted_tensor_<N> or
# _captured_<N> (strict, numpy buffers). A GraphModule registers every tensor it copies as a buffer, so a
# name is the only way to tell a captured constant from model state there.
_CONST_NAME = re.compile(r"^(_tensor_constant|_lifted_tensor_constant|lifted_tensor_|_captured_)\d+(_\d+)?$")


def _basename(target: str) -> str:
    return str(target).rsplit(".", 1)[-1]


def _fetch_attr(root: torch.nn.Module, target: str):
    obj = root
    for part in str(target).split("."):
        if not hasattr(obj, part):
            return None
        obj = getattr(obj, part)
    return obj


def _gm_constants(gm: torch.fx.GraphModule) -> list[_Const]:
    out = []
    for node in _all_nodes(gm):
        if node.op != "get_attr":
            continue
        owner = node.graph.owning_module or gm
        buffers = {name for name, _ in owner.named_buffers()}
        value = _fetch_attr(owner, node.target)
        if not isinstance(value, torch.Tensor) or isinstance(value, torch.nn.Parameter):
            continue
        base = _basename(node.target)
        if base.startswith("_param_constant"):
            continue
        if node.target in buffers and not _CONST_NAME.match(base):
            continue  # a registered buffer: model state, not a capture artifact
        out.append(_Const(node, str(node.target), value, "tensor constant (get_attr)"))
    return out


def _ep_constants(ep: torch.export.ExportedProgram) -> list[_Const]:
    from torch.export.graph_signature import InputKind

    by_name = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    out = []
    for spec in ep.graph_signature.input_specs:
        node = by_name.get(getattr(spec.arg, "name", None))
        if node is None or spec.target is None:
            continue
        if spec.kind == InputKind.CONSTANT_TENSOR:
            value = ep.constants.get(spec.target)
            out.append(_Const(node, spec.target, value if isinstance(value, torch.Tensor) else None,
                              "lifted CONSTANT_TENSOR"))
        elif spec.kind == InputKind.BUFFER and _CONST_NAME.match(_basename(spec.target)):
            # an export of a make_fx/jit GraphModule: its _tensor_constant<N> arrive as buffers
            value = ep.state_dict.get(spec.target, ep.constants.get(spec.target))
            out.append(_Const(node, spec.target, value if isinstance(value, torch.Tensor) else None,
                              "captured tensor constant lifted as a buffer"))
    out.extend(_gm_constants(ep.graph_module))
    return out


# --------------------------------------------------------------------------------------------------------
# Op classification
# --------------------------------------------------------------------------------------------------------

_VIEWS = {
    "view", "_unsafe_view", "reshape", "view_as", "expand", "expand_as", "unsqueeze", "squeeze", "transpose", "t",
    "permute", "slice", "select", "narrow", "alias", "detach", "as_strided", "unflatten", "flatten", "movedim",
    "moveaxis", "swapaxes", "swapdims", "split", "split_with_sizes", "chunk", "unbind", "tensor_split",
    "contiguous", "lift_fresh", "getitem", "_reshape_alias", "view_as_real", "view_as_complex", "unfold",
}
_COPIES = {
    "clone", "lift_fresh_copy", "_to_copy", "to", "type_as", "float", "half", "bfloat16", "double", "type", "cpu",
    "cuda", "repeat", "repeat_interleave", "index_select", "constant_pad_nd", "pad", "dropout", "native_dropout",
    "feature_dropout", "neg", "negative", "masked_fill", "_to_dtype", "as_tensor", "tensor",
}
_CATS = {"cat", "concat", "concatenate", "stack", "hstack", "vstack"}
_SCALES = {"mul", "div", "true_divide", "multiply", "divide", "__mul__", "__truediv__", "__rmul__"}
# functional writes: op -> positions of data arguments (the base and the written source)
_SCATTERS = {
    "copy": (1,), "index_copy": (0, 3), "index_put": (0, 2), "slice_scatter": (0, 1), "select_scatter": (0, 1),
    "index_add": (0, 3), "scatter": (0, 3), "masked_scatter": (0, 2),
}
# in-place writes: op -> position of the written source
_INPLACE_SRC = {
    "copy_": 1, "index_copy_": 3, "index_put_": 2, "index_add_": 3, "scatter_": 3, "masked_scatter_": 2,
    "setitem": 2, "__setitem__": 2, "slice_scatter_": 1, "fill_": None, "zero_": None, "masked_fill_": None,
}
_MATMULS = {"bmm", "matmul", "baddbmm", "__matmul__", "einsum"}
_SOFTMAX = {"softmax", "_softmax", "_safe_softmax", "log_softmax", "_log_softmax", "exp", "special_softmax"}
# between Q @ K^T and the softmax: scaling, masking, soft-capping, casts
_SCORE_OPS = _VIEWS | {
    "mul", "div", "true_divide", "add", "sub", "where", "masked_fill", "to", "_to_copy", "type_as", "tanh",
    "clamp", "clamp_min", "clamp_max", "amax", "maximum", "float", "__mul__", "__truediv__", "__add__",
    "__sub__", "__iadd__", "add_", "masked_fill_", "mul_", "div_", "clone",
}
# between the softmax and P @ V
_PROB_OPS = _VIEWS | {
    "to", "_to_copy", "type_as", "clone", "dropout", "native_dropout", "feature_dropout", "where", "masked_fill",
    "div", "mul", "true_divide", "float", "half", "bfloat16", "__truediv__", "__mul__", "nan_to_num",
}
_PROJECTIONS = {"linear", "mm", "addmm", "matmul", "bmm", "baddbmm", "__matmul__", "einsum", "_weight_int8pack_mm"}
_CHAIN_HEADS_SKIPPED = {"detach", "alias", "cpu", "numpy", "_assert_tensor_metadata", "lift_fresh_copy", "view_as",
                        "resolve_conj", "resolve_neg"}
_DANGLING_OPS = {"detach", "alias", "_to_copy", "to", "cpu", "clone", "contiguous", "lift_fresh_copy",
                 "_assert_tensor_metadata", "numpy", "view_as", "view", "resolve_conj", "resolve_neg"}


def _op_name(node: torch.fx.Node) -> str:
    if node.op == "call_method":
        return str(node.target)
    if node.op != "call_function":
        return ""
    t = node.target
    if isinstance(t, torch._ops.OpOverload):
        return t._opname
    if isinstance(t, torch._ops.OpOverloadPacket):
        return t.__name__
    if t is operator.getitem:
        return "getitem"
    if t is operator.setitem:
        return "setitem"
    if t is operator.matmul:
        return "__matmul__"
    if t in (operator.mul, operator.imul):
        return "__mul__"
    if t in (operator.truediv, operator.itruediv):
        return "__truediv__"
    if t in (operator.add, operator.iadd):
        return "__add__"
    if t in (operator.sub, operator.isub):
        return "__sub__"
    if t is operator.neg:
        return "neg"
    name = getattr(t, "__name__", "") or ""
    return name


def _pretty_target(node: torch.fx.Node) -> str:
    t = node.target
    if isinstance(t, torch._ops.OpOverload):
        return f"{t.namespace}.{t._opname}.{t._overloadname}"
    if node.op == "call_method":
        return f".{t}"
    return getattr(t, "__name__", None) or str(t)


def _val(node: Any):
    if isinstance(node, torch.fx.Node):
        return node.meta.get("val", node.meta.get("example_value"))
    return None


def _dim(s: Any) -> int | str:
    """A static size as an int, a symbolic one as its expression (never evaluated: no guards)."""
    if isinstance(s, int):
        return s
    if isinstance(s, torch.SymInt):
        expr = s.node.expr
        return int(expr) if getattr(expr, "is_number", False) else str(expr)
    return str(s)


def _tensor_meta(node: Any):
    v = _val(node)
    if isinstance(v, torch.Tensor):
        return tuple(_dim(s) for s in v.shape), v.dtype
    tm = node.meta.get("tensor_meta") if isinstance(node, torch.fx.Node) else None
    if tm is not None and hasattr(tm, "shape"):
        return tuple(_dim(s) for s in tm.shape), tm.dtype
    return None, None


def _ndim(node: Any) -> int | None:
    shape, _ = _tensor_meta(node)
    return None if shape is None else len(shape)


def _is_scalar_like(arg: Any) -> bool:
    if isinstance(arg, (int, float, bool)):
        return True
    if isinstance(arg, torch.fx.Node):
        shape, _ = _tensor_meta(arg)
        if shape is not None:
            return _numel(shape) == 1
        v = _val(arg)
        return isinstance(v, (int, float, torch.SymInt, torch.SymFloat))
    return False


def _writes_arg0(node: torch.fx.Node) -> bool:
    """Does ``node`` write its first argument in place?"""
    t = node.target
    if isinstance(t, torch._ops.OpOverload):
        args = t._schema.arguments
        return bool(args) and args[0].alias_info is not None and args[0].alias_info.is_write
    name = _op_name(node)
    if name in ("setitem", "__setitem__"):
        return True
    return name.endswith("_") and not name.endswith("__") and name in _INPLACE_SRC


def _schema_src_position(node: torch.fx.Node) -> int | None:
    t = node.target
    if isinstance(t, torch._ops.OpOverload):
        for i, a in enumerate(t._schema.arguments):
            if a.name in ("src", "source", "values"):
                return i
    return None


def _attention_slots(node: torch.fx.Node) -> dict[str, list[Any]] | None:
    """For an attention op: ``{"key": [arg], "value": [arg]}``; else ``None``."""
    t = node.target
    names: list[str] | None = None
    if isinstance(t, torch._ops.OpOverload):
        names = [a.name for a in t._schema.arguments]
        if not {"query", "key", "value"} <= set(names):
            return None
    else:
        name = _op_name(node)
        if "scaled_dot_product" in name or name == "flex_attention":
            names = ["query", "key", "value"]
        else:
            return None
    slots: dict[str, list[Any]] = {"key": [], "value": []}
    for role in ("key", "value"):
        i = names.index(role)
        if i < len(node.args):
            slots[role].append(node.args[i])
        if role in node.kwargs:
            slots[role].append(node.kwargs[role])
    return slots


def _matmul_operands(node: torch.fx.Node) -> tuple[Any, Any] | None:
    name = _op_name(node)
    if name not in _MATMULS:
        return None
    args = list(node.args)
    if name == "einsum":
        ops = args[1:]
        if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
            ops = list(ops[0])
        return (ops[0], ops[1]) if len(ops) == 2 else None
    if name == "baddbmm":
        return (args[1], args[2]) if len(args) >= 3 else None
    if len(args) >= 2:
        return args[0], args[1]
    if "other" in node.kwargs or "mat2" in node.kwargs:
        return (args[0] if args else node.kwargs.get("input"), node.kwargs.get("other", node.kwargs.get("mat2")))
    return None


def _tensor_args(node: torch.fx.Node) -> list[tuple[int, torch.fx.Node]]:
    out = []
    for i, a in enumerate(node.args):
        if isinstance(a, torch.fx.Node):
            out.append((i, a))
        elif isinstance(a, (list, tuple)):
            out.extend((i, x) for x in a if isinstance(x, torch.fx.Node))
    return out


# --------------------------------------------------------------------------------------------------------
# The analysis
# --------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Hit:
    role: str  # "key" | "value" | "cat"
    consumer: torch.fx.Node
    path: list[torch.fx.Node]
    text: str


class _Checker:
    def __init__(self, gm: torch.fx.GraphModule, constants: list[_Const]):
        self.gm = gm
        self.constants = constants
        self.tainted: set[torch.fx.Node] = set()
        # HOP wiring: subgraph placeholder <- parent operand; subgraph output -> parent HOP node
        self._sub_outputs: dict[torch.fx.Graph, torch.fx.Node] = {}

    # ---- graph walking across higher-order-op subgraphs ------------------------------------------------

    def _submodule(self, owner: torch.fx.Node, arg: Any) -> torch.fx.GraphModule | None:
        if isinstance(arg, torch.fx.Node) and arg.op == "get_attr":
            root = owner.graph.owning_module or self.gm
            sub = _fetch_attr(root, arg.target)
            if isinstance(sub, torch.fx.GraphModule):
                return sub
        return None

    def _successors(self, node: torch.fx.Node) -> Iterator[tuple[torch.fx.Node, bool]]:
        """``(next, direct)`` pairs: ``direct`` for an ordinary user of ``node``; ``False`` for a hop into a
        higher-order op's subgraph (its placeholder) or out of it (the ``getitem`` of the op's result)."""
        for user in list(node.users):
            if user.op == "output":
                parent = self._sub_outputs.get(node.graph)
                if parent is None:
                    continue
                outs = user.args[0]
                outs = list(outs) if isinstance(outs, (list, tuple)) else [outs]
                idx = [i for i, o in enumerate(outs) if o is node]
                for gi in parent.users:
                    if _op_name(gi) == "getitem" and gi.args[1] in idx:
                        yield gi, False
                continue
            if user.op == "call_function" and isinstance(user.target, torch._ops.HigherOrderOperator):
                subs = [(i, self._submodule(user, a)) for i, a in enumerate(user.args)]
                subs = [(i, s) for i, s in subs if s is not None]
                if len(subs) == 1 and _op_name(user) != "flex_attention":
                    i, sub = subs[0]
                    operands = list(user.args[i + 1:])
                    phs = [p for p in sub.graph.nodes if p.op == "placeholder"]
                    self._sub_outputs[sub.graph] = user
                    for pos, a in enumerate(operands):
                        if a is node and pos < len(phs):
                            yield phs[pos], False
                    continue
            yield user, True

    def _passes(self, src: torch.fx.Node, user: torch.fx.Node) -> tuple[bool, bool]:
        """(data of ``src`` flows into ``user``'s output, the output aliases ``src``)."""
        if user.op not in ("call_function", "call_method"):
            return False, False
        name = _op_name(user)
        positions = {i for i, a in _tensor_args(user) if a is src}
        if not positions:
            positions = {-1} if any(v is src for v in user.kwargs.values()) else set()
        if name.endswith("_copy") and name[:-5] in _VIEWS:
            return 0 in positions, False  # view_copy & co.: a copying view
        if _writes_arg0(user):
            if 0 in positions:
                return True, True  # in place: the result is the (partly overwritten) destination
            return _INPLACE_SRC.get(name, _schema_src_position(user)) in positions, False
        if name in _VIEWS:
            return (0 in positions) or (name == "getitem" and bool(positions)), True
        if name in _COPIES:
            return 0 in positions, False
        if name in _CATS:
            return bool(positions), False
        if name in _SCATTERS:
            return bool(positions & set(_SCATTERS[name])), False
        if name in _SCALES:
            args = list(user.args) + list(user.kwargs.values())
            others = [a for a in args if a is not src]
            return bool(positions) and all(_is_scalar_like(a) for a in others), False
        return False, False

    def _forward(self, start: torch.fx.Node) -> tuple[dict[torch.fx.Node, list[torch.fx.Node]], list, list]:
        """Nodes reached from ``start`` through pass-through ops (with the path), attention hits, writes."""
        paths = {start: [start]}
        aliased = {start: True}
        queue = collections.deque([start])
        hits: list[_Hit] = []
        writes: list[torch.fx.Node] = []
        while queue:
            n = queue.popleft()
            for user, direct in self._successors(n):
                if direct:
                    hits.extend(self._consumer_hits(n, user, paths[n]))
                    if _writes_arg0(user) and user.args and user.args[0] is n and aliased[n]:
                        writes.append(user)
                    flows, alias = self._passes(n, user)
                else:
                    flows, alias = True, True
                if flows and user not in paths:
                    paths[user] = paths[n] + [user]
                    aliased[user] = aliased[n] and alias
                    queue.append(user)
        return paths, hits, writes

    # ---- consumers -----------------------------------------------------------------------------------

    def _consumer_hits(self, n: torch.fx.Node, user: torch.fx.Node, path: list[torch.fx.Node]) -> list[_Hit]:
        hits = []
        slots = _attention_slots(user)
        if slots is not None:
            for role, args in slots.items():
                if any(a is n for a in args):
                    hits.append(_Hit(role, user, path + [user],
                                     f"{role} of {_op_name(user)} ({user.name})"))
            return hits
        ops = _matmul_operands(user)
        if ops is not None and ops[1] is n and ops[0] is not n:
            lhs = ops[0]
            rank_ok = _op_name(user) in ("bmm", "baddbmm") or (
                (_ndim(lhs) or 0) >= 3 and (_ndim(n) or 0) >= 3)
            if rank_ok and isinstance(lhs, torch.fx.Node):
                if self._reaches(user, _SCORE_OPS, _SOFTMAX, forward=True):
                    hits.append(_Hit("key", user, path + [user],
                                     f"key of attention: Q @ K^T {_op_name(user)} ({user.name}) -> softmax"))
                elif self._reaches(lhs, _PROB_OPS, _SOFTMAX, forward=False):
                    hits.append(_Hit("value", user, path + [user],
                                     f"value of attention: softmax @ V {_op_name(user)} ({user.name})"))
        return hits

    def _reaches(self, start: torch.fx.Node, through: set[str], goal: set[str], forward: bool,
                 limit: int = 24) -> bool:
        seen = {start}
        frontier = [start]
        for _ in range(limit):
            nxt = []
            for n in frontier:
                nbrs = list(n.users) if forward else [a for _, a in _tensor_args(n)]
                for m in nbrs:
                    if m in seen or m.op not in ("call_function", "call_method"):
                        continue
                    name = _op_name(m)
                    if name in goal:
                        return True
                    if name in through:
                        seen.add(m)
                        nxt.append(m)
            if not nxt:
                return False
            frontier = nxt
        return False

    def _from_projection(self, node: Any, limit: int = 16) -> bool:
        """Does ``node`` come from a projection (linear/mm/matmul) within a few ops?"""
        if not isinstance(node, torch.fx.Node):
            return False
        seen, frontier = {node}, [node]
        for _ in range(limit):
            nxt = []
            for n in frontier:
                if _op_name(n) in _PROJECTIONS:
                    return True
                for _, a in _tensor_args(n):
                    if a not in seen and a.op in ("call_function", "call_method"):
                        seen.add(a)
                        nxt.append(a)
            if not nxt:
                return False
            frontier = nxt
        return False

    # ---- the three rules -----------------------------------------------------------------------------

    def run(self) -> list[Finding]:
        per_const = []
        for c in self.constants:
            shape, dtype = self._const_meta(c)
            if shape is not None and _numel(shape) <= 1:
                continue  # empty history, scalar counters, scales: never K/V
            paths, hits, writes = self._forward(c.node)
            self.tainted.update(paths)
            per_const.append((c, shape, dtype, paths, hits, writes))

        findings: list[Finding] = []
        kv_consts: list[Finding] = []
        for c, shape, dtype, paths, hits, writes in per_const:
            hits += self._cat_hits(paths, hits)
            kv_writes = [w for w in writes if self._writes_kv(w)]
            if not hits and not kv_writes:
                continue
            if hits:
                first = hits[0]
                others = {(h.role, h.consumer) for h in hits} - {(first.role, first.consumer)}
                roles = sorted({role for role, _ in others})
                consumer = first.text
                cats = [n for n in first.path if _op_name(n) in _CATS]
                if cats and first.role != "cat":
                    consumer += f" via {_op_name(cats[0])} ({cats[0].name})"
                more = len(others)
                source_nodes = [c.node] + first.path
            else:
                consumer = "no attention read in this graph; written with a projected K/V"
                roles, more, source_nodes = [], 0, [c.node] + [kv_writes[0]]
            detail = [c.origin]
            if more > 0:
                consumer += f" (+{more} more: {', '.join(roles)})"
                detail.append(f"{more} more attention input(s) ({', '.join(roles)})")
            if writes:
                w = writes[0]
                detail.append(f"written in place by {_pretty_target(w)} ({w.name}) at {user_source_line(w)}"
                              + (f" and {len(writes) - 1} more write(s)" if len(writes) > 1 else ""))
            finding = Finding(
                kind=MUTATED_CONSTANT if writes else CONSTANT_KV,
                node=c.node.name,
                target=c.name,
                shape=tuple(shape) if shape is not None else (),
                dtype=dtype,
                all_zeros=_all_zeros(c.value),
                consumer=consumer,
                source=_source(source_nodes),
                detail="; ".join(detail),
                fx_node=c.node,
            )
            findings.append(finding)
            kv_consts.append(finding)
        findings.extend(self._dangling(kv_consts))
        order = {n: i for i, n in enumerate(_all_nodes(self.gm))}
        findings.sort(key=lambda f: order.get(f.fx_node, len(order)))
        return findings

    def _const_meta(self, c: _Const):
        if isinstance(c.value, torch.Tensor):
            return tuple(c.value.shape), c.value.dtype
        return _tensor_meta(c.node)

    def _writes_kv(self, w: torch.fx.Node) -> bool:
        name = _op_name(w)
        pos = _INPLACE_SRC.get(name, _schema_src_position(w))
        if pos is None or pos >= len(w.args):
            return False
        src = w.args[pos]
        return (_ndim(src) or 0) >= 3 and src not in self.tainted and self._from_projection(src)

    def _cat_hits(self, paths, hits) -> list[_Hit]:
        """A cat of the constant with a computed, projected K/V along a non-last dim that reaches no attention."""
        if hits:
            return []
        out = []
        for n, path in paths.items():
            if _op_name(n) not in ("cat", "concat", "concatenate") or not n.args:
                continue
            seq = n.args[0] if isinstance(n.args[0], (list, tuple)) else []
            parts = [p for p in seq if isinstance(p, torch.fx.Node)]
            dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)
            rank = _ndim(n)
            if rank is None or rank < 3 or not isinstance(dim, int) or dim % rank == rank - 1:
                continue
            computed = [p for p in parts if p not in paths and _ndim(p) == rank and self._from_projection(p)]
            if computed:
                out.append(_Hit("cat", n, path, f"cat along dim {dim} with computed K/V {computed[0].name} ({n.name})"))
        return out

    def _dangling(self, kv_consts: list[Finding]) -> list[Finding]:
        if not kv_consts:
            return []
        candidates: dict[torch.fx.Node, list[torch.fx.Node]] = {}
        for node in _all_nodes(self.gm):
            if node.op not in ("call_function", "call_method") or node in self.tainted or not node.users:
                continue
            if _op_name(node) in _CHAIN_HEADS_SKIPPED:
                continue  # the chain itself (or a host-side conversion), not the K/V
            shape, dtype = _tensor_meta(node)
            if shape is None or len(shape) < 2 or dtype is None or not dtype.is_floating_point:
                continue
            chain = _dangling_chain(node)
            if chain is not None:
                candidates[node] = chain
        out = []
        for node, chain in candidates.items():
            if node.args and node.args[0] in candidates:
                continue  # report the head of a chain once
            shape, dtype = _tensor_meta(node)
            pair = next((f for f in kv_consts if f.dtype == dtype and _same_but_one(f.shape, shape)), None)
            if pair is None:
                continue
            ops = " -> ".join(_op_name(n) for n in chain)
            out.append(Finding(
                kind=DANGLING_KV,
                node=node.name,
                target=_pretty_target(node),
                shape=tuple(shape),
                dtype=dtype,
                all_zeros=None,
                consumer=f"nothing: its only use is {ops}, with no further users",
                source=_source(chain + [node]),
                detail=f"the same-shaped constant {pair.node} ({pair.target}) feeds {pair.consumer} instead",
                fx_node=node,
            ))
        return out


def _dangling_chain(node: torch.fx.Node) -> list[torch.fx.Node] | None:
    """If every use of ``node`` is a detach/copy chain that ends unused, return the chain's nodes."""
    chain: list[torch.fx.Node] = []
    frontier = list(node.users)
    seen: set[torch.fx.Node] = set()
    while frontier:
        n = frontier.pop(0)
        if n in seen:
            continue
        seen.add(n)
        if n.op not in ("call_function", "call_method") or _op_name(n) not in _DANGLING_OPS:
            return None
        chain.append(n)
        frontier.extend(n.users)
    if not chain or _op_name(chain[0]) not in ("detach", "alias", "_to_copy", "to", "cpu"):
        return None
    return chain


def _same_but_one(a: tuple, b: tuple) -> bool:
    if len(a) != len(b):
        return False
    return sum(1 for x, y in zip(a, b) if x != y) <= 1


def _numel(shape) -> int:
    """Number of elements; a symbolic size counts as 2 (unknown, but not a scalar and not empty)."""
    n = 1
    for s in shape:
        n *= s if isinstance(s, int) else 2
    return n


def _all_zeros(value: torch.Tensor | None) -> bool | None:
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


def _source(nodes: list[torch.fx.Node]) -> str:
    for n in nodes:
        if isinstance(n, torch.fx.Node) and n.meta.get("stack_trace"):
            return user_source_line(n)
    return "<unknown> (no stack trace recorded; make_fx needs record_stack_traces=True)"


def _all_nodes(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    out = list(gm.graph.nodes)
    for _, mod in gm.named_modules():
        if mod is not gm and isinstance(mod, torch.fx.GraphModule):
            out.extend(mod.graph.nodes)
    return out
