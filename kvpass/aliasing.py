"""Aliasing and mutation facts: the one place kvpass decides what writes what and what shares memory.

On the functional ATen IR (``kvpass.ir``) most of this is structure: values are SSA, a write is a
``*_scatter`` that returns a new value, and the only mutations left are the ``copy_`` epilogues into graph
inputs (:func:`state_inputs`). Two facts are not in the graph and live here too:

- **memory shared by graph inputs that torch cannot see**: two numpy views of one pool (``a.k = pool[:]``,
  ``b.k = pool[:]``, or a follower holding ``owner.k[:, :, :d]``) reach the graph as two tensors with unrelated
  storages, so functionalization treats them as independent. :func:`overlapping_inputs` finds them at call
  time; the backend then runs the graph the way eager does (``kvpass.dynamo_backend``);
- **side effects in torch-level graphs** (Dynamo's numpy ``__setitem__`` wrappers, in-place methods,
  augmented assignment), for the one rule that still runs before functionalization (``store_loop``) and for
  dead-code elimination there: :func:`is_side_effect`.
"""

from __future__ import annotations

import copy
from typing import Any, Sequence

import torch
import torch.fx

from .opfacts import in_place_name, is_view_op

__all__ = ["meta_value", "is_pure", "writes_an_argument", "is_view", "returned_views", "state_inputs", "grown_buffers",
           "reordered_buffers", "scatter_base", "overlapping_inputs", "external_inputs",
           "copy_together", "aliased_inputs_message", "inputs_written", "is_side_effect", "SCATTER_OPS",
           "ReadsBeforeWrites"]

aten = torch.ops.aten

#: Functional writes: ``op(base, value, ...)`` returns ``base`` with a region replaced by ``value``.
SCATTER_OPS = frozenset({aten.slice_scatter.default, aten.select_scatter.default, aten.index_put.default,
                         aten.index_copy.default, aten.diagonal_scatter.default, aten.as_strided_scatter.default,
                         aten.copy.default})


def meta_value(node: Any):
    """The traced value of a node (``val`` in ATen graphs, Dynamo's ``example_value``), or a constant itself."""
    if isinstance(node, torch.fx.Node):
        return node.meta.get("val", node.meta.get("example_value"))
    return node


def is_pure(node: torch.fx.Node) -> bool:
    """An ATen node that only computes its outputs from its inputs: no mutation, no randomness, no effect.
    Views count as pure here: on the functional IR nothing writes through them."""
    if node.op != "call_function":
        return False
    target = node.target
    if not isinstance(target, torch._ops.OpOverload):
        return not node.is_impure()  # SymInt arithmetic
    if writes_an_argument(node) or torch.Tag.nondeterministic_seeded in target.tags:
        return False
    return not node.is_impure()


def writes_an_argument(node: torch.fx.Node) -> bool:
    """An ATen node whose schema marks one of its arguments as written (``copy_``, ``index_put_``, ``out=``)."""
    return node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload) and \
        node.target._schema.is_mutable


def _returned(graph: torch.fx.Graph) -> list:
    """The nodes the graph returns (its output node's inputs)."""
    output = next((n for n in reversed(graph.nodes) if n.op == "output"), None)
    return output.all_input_nodes if output is not None else []


def _kept_roots(graph: torch.fx.Graph) -> list:
    """What each returned value started from: the base of its chain of functional writes, or itself."""
    return [scatter_base(value) or value for value in _returned(graph)]


def is_view(node: Any) -> bool:
    """A node whose output may share memory with an input: a view op (:func:`kvpass.opfacts.is_view_op`, by
    schema), or an item of such an op's list result."""
    import operator

    if not isinstance(node, torch.fx.Node) or node.op != "call_function":
        return False
    if node.target is operator.getitem:
        return is_view(node.args[0])
    return is_view_op(node.target)


def returned_views(graph: torch.fx.Graph) -> set:
    """The nodes whose value the program returns as a view: a graph output reached through views only, and
    every node on such a chain. Where such a value views a graph input, the caller gets a view of that input
    (AOTAutograd regenerates it from the input after the call), which shows every later write to the input:
    its value is not the value the node had in the graph, so no rule may substitute for it."""
    out, todo = set(), [n for n in _returned(graph) if is_view(n)]
    while todo:
        node = todo.pop()
        if node not in out:
            out.add(node)
            if is_view(node.args[0]):  # a view aliases its first argument (``self``; the list, for an item)
                todo.append(node.args[0])
    return out


def state_inputs(graph: torch.fx.Graph) -> dict[torch.fx.Node, torch.fx.Node]:
    """The graph inputs the program mutates (cache buffers), each with the value its ``copy_`` epilogue writes:
    ``{placeholder: new_value}``. On the functional IR these are the program's state."""
    out = {}
    for node in graph.nodes:
        if node.op == "call_function" and node.target is aten.copy_.default and \
                isinstance(node.args[0], torch.fx.Node) and node.args[0].op == "placeholder":
            out[node.args[0]] = node.args[1]
    return out


def grown_buffers(graph: torch.fx.Graph) -> set:
    """Buffers grown from a graph input in this step and kept: ``cat([buf, fresh], d)`` (``buf`` a graph input)
    whose value, or a chain of functional writes into it, is a graph output (the program stores it in place of
    ``buf``: a cache grown by capacity doubling, ``buf = np.concatenate([buf, np.zeros_like(buf)], 1)``). Like
    :func:`state_inputs`, the program's state after the step."""
    def grown(node) -> bool:  # a concatenation with a graph input among its pieces (or grown twice)
        return isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target is aten.cat.default \
            and any(isinstance(p, torch.fx.Node) and (p.op == "placeholder" or grown(p)) for p in node.args[0])

    roots = _kept_roots(graph)
    return {root for root in roots if grown(root)}


#: Gathers along one dim: a beam reorder, ``np.take(buf, beam_idx, axis=0)``, ``buf[beam_idx]``,
#: ``buf.index_select(0, beam_idx)``.
_GATHERS = (aten.index.Tensor, aten.index_select.default)


def reordered_buffers(graph: torch.fx.Graph) -> set:
    """Buffers reordered from a graph input in this step and kept: a gather of a graph input's rows
    (``index_select`` / ``index`` with index tensors, a beam reorder ``buf = np.take(buf, beam_idx, axis=0)``) whose
    value, or a chain of functional writes into it, is a graph output (the program stores it in place of ``buf``).
    Like :func:`state_inputs` and :func:`grown_buffers`, the program's state after the step."""
    roots = _kept_roots(graph)
    return {root for root in roots if isinstance(root, torch.fx.Node) and root.op == "call_function"
            and root.target in _GATHERS and isinstance(root.args[0], torch.fx.Node)
            and root.args[0].op == "placeholder"}


#: Views a chain of writes may go through and still be the same buffer's state (a reshape of a flat buffer).
_STATE_VIEWS = (aten.slice.Tensor, aten.select.int, aten.view.default, aten._unsafe_view.default,
                aten.reshape.default)


def scatter_base(node: Any) -> torch.fx.Node | None:
    """Follow ``node`` down its chain of functional writes (``slice_scatter(base, ...)`` etc.) and views of
    them (slices, selects, reshapes) to the value it started from; ``None`` if ``node`` is not such a chain."""
    seen = 0
    while isinstance(node, torch.fx.Node) and node.op == "call_function" and seen < 10_000:
        if node.target in SCATTER_OPS or node.target in _STATE_VIEWS:
            node = node.args[0]
            seen += 1
            continue
        break
    return node if seen and isinstance(node, torch.fx.Node) else None


def _memory_range(t: torch.Tensor) -> tuple[int, int] | None:
    if t.numel() == 0:
        return None
    start = t.data_ptr()
    extent = sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride())) + 1
    low = start - sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()) if stride < 0) \
        * t.element_size()
    return low, low + extent * t.element_size()


def external_inputs(inputs: Sequence[Any]) -> list[int]:
    """Indices of the tensor inputs whose memory torch does not own (numpy arrays, DLPack): the only ones that
    can overlap without torch knowing. Computed once per compiled graph from its example inputs."""
    return [i for i, x in enumerate(inputs) if _host_tensor(x) and not x.untyped_storage().resizable()]


def _host_tensor(x) -> bool:
    """A real (not fake) strided CPU tensor: the inputs whose memory can be compared by address."""
    return isinstance(x, torch.Tensor) and x.device.type == "cpu" and not isinstance(
        x, torch._subclasses.FakeTensor) and x.layout is torch.strided


def copy_together(inputs: Sequence[Any]) -> list:
    """Copies of ``inputs`` that keep every memory overlap among them: tensors that torch knows alias share one
    ``deepcopy`` memo, and tensors over overlapping external memory (numpy views of one pool) are rebuilt as
    views of one copied block. What a run of a graph sees is then what it would see on the originals."""
    memo: dict = {}
    out = [copy.deepcopy(x, memo) for x in inputs]
    groups: dict[int, set[int]] = {}
    for i, j in overlapping_inputs(inputs, external_only=True):
        g = groups.get(i, {i}) | groups.get(j, {j})
        for k in g:
            groups[k] = g
    for group in {id(g): g for g in groups.values()}.values():
        members = sorted(group)
        ranges = [_memory_range(inputs[k]) for k in members]
        low, high = min(r[0] for r in ranges), max(r[1] for r in ranges)
        import ctypes

        import numpy as np

        block = torch.zeros((high - low + 15) // 16 * 16, dtype=torch.uint8)  # a whole number of any element
        block[: high - low] = torch.from_numpy(np.ctypeslib.as_array((ctypes.c_uint8 * (high - low)).from_address(low)))
        for k in members:
            t = inputs[k]
            offset = t.data_ptr() - low
            if offset % t.element_size():
                raise ValueError(f"example_inputs[{k}]: overlaps another input at a misaligned address")
            out[k] = torch.as_strided(block.view(t.dtype), t.shape, t.stride(), offset // t.element_size())
    return out


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the memory of two real strided tensors may overlap (their address ranges intersect)."""
    ra, rb = _memory_range(a), _memory_range(b)
    return ra is not None and rb is not None and ra[0] < rb[1] and rb[0] < ra[1]


def _same_view(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride() and a.dtype == b.dtype


class ReadsBeforeWrites(torch.utils._python_dispatch.TorchDispatchMode):
    """Run ops with numpy's meaning of a write whose source overlaps its destination: every value an op reads
    is read before it writes anything (``buf[:, 1:] = buf[:, :-1]``: numpy copies the source first when the two
    may share memory). Torch's ``copy_`` walks its elements in order and raises only where it *sees* the overlap
    (one storage); numpy views of one pool reach a graph as separate storages, so the traced graph run as is
    copies a right shift over itself (every slot gets the first value). Under this mode, each tensor argument of
    a writing op (schema ``is_write``) that is not written and whose memory intersects a written argument's,
    other than that very view (elementwise, safe), is replaced by a copy. Writes with no such overlap run
    unchanged, so the mode changes a result only where torch's would depend on the order it writes in."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        schema = getattr(func, "_schema", None)
        if schema is None or not schema.is_mutable:
            return func(*args, **kwargs)
        written, flat = [], []
        for i, arg in enumerate(schema.arguments):
            value = kwargs[arg.name] if arg.name in kwargs else args[i] if i < len(args) else None
            if arg.alias_info is not None and arg.alias_info.is_write and isinstance(value, torch.Tensor):
                written.append(value)

        def snapshot(x):
            if isinstance(x, (list, tuple)):
                return type(x)(snapshot(y) for y in x)
            if isinstance(x, torch.Tensor) and _host_tensor(x) and not any(x is w for w in written) and any(
                    _host_tensor(w) and _overlap(x, w) and not _same_view(x, w) for w in written):
                return x.clone()
            return x

        return func(*snapshot(list(args)), **{k: snapshot(v) for k, v in kwargs.items()})


def aliased_inputs_message(first: str, second: str, line: str = "") -> str:
    """The one warning for graph inputs over the same host memory (the call runs the graph as traced)."""
    where = f" at {line}" if line else ""
    return (f"kvpass: graph inputs {first} and {second} are views of the same host memory (e.g. two caches on one "
            f"numpy pool, or a follower holding a view of its owner's buffer){where}; torch cannot see that, so this "
            "call runs the graph as traced (eager semantics), not the compiled rewrite.")


def inputs_written(graph: torch.fx.Graph) -> set[int]:
    """Positions (among the placeholders) of the graph inputs the graph may write: those from which some value
    reaches an argument of a node with a side effect (:func:`is_side_effect`), or of a submodule call. Every value
    computed from an input counts as reaching it (an over-approximation of its views), so an input outside the
    set is only read. Two inputs over the same memory that are both only read see the same values whatever the
    compiled graph assumes about their aliasing."""
    reach: dict = {}
    written: set[int] = set()
    index = 0
    for node in graph.nodes:
        if node.op == "placeholder":
            reach[node] = {index}
            index += 1
            continue
        derived = set().union(*(reach.get(a, set()) for a in node.all_input_nodes))
        reach[node] = derived
        if node.op == "call_module" or (node.op in ("call_function", "call_method") and is_side_effect(node)):
            written |= derived
    return written


def overlapping_inputs(inputs: Sequence[Any], external_only: bool = True) -> list[tuple[int, int]]:
    """Pairs ``(i, j)`` of CPU tensor inputs whose memory overlaps.

    ``external_only`` (what the backend checks): only memory torch does not own (numpy arrays, DLPack: storages
    that are not resizable) and only across two storage objects, which is what torch cannot see; torch-owned
    aliasing is one storage, which Dynamo guards on and AOTAutograd handles. Otherwise (a standalone rewritten
    graph, which has no such wrapper) any two distinct inputs that overlap. Runs on every call, so it only sorts
    address ranges: O(n log n) in the number of candidate inputs.
    """
    ranges = []
    for i, x in enumerate(inputs):
        if _host_tensor(x):
            storage = x.untyped_storage()
            if external_only and storage.resizable():
                continue
            r = _memory_range(x)
            if r is not None:
                ranges.append((r[0], r[1], storage._cdata, i))
    if len(ranges) < 2:
        return []
    ranges.sort()
    pairs = []
    open_ranges: list[tuple[int, int, int]] = []  # (end, storage, index)
    for low, high, storage, i in ranges:
        open_ranges = [r for r in open_ranges if r[0] > low]
        # one storage object: torch knows they alias; two from_numpy views of one array are two storage objects
        # over the same bytes
        pairs += [(j, i) for _end, other, j in open_ranges
                  if (other != storage or not external_only) and inputs[j] is not inputs[i]]
        open_ranges.append((high, storage, i))
    return pairs


def is_side_effect(node: torch.fx.Node) -> bool:
    """Conservative impurity of a node of a torch-level or ATen graph (for dead-code elimination): torch's own
    notion, plus what Dynamo graphs hide from it (numpy ``__setitem__`` wrappers, ``out=`` arguments, in-place
    methods such as ``copy_``, ``operator.setitem``, augmented assignment)."""
    if node.is_impure():
        return True
    if node.kwargs.get("out") is not None:
        return True
    t = node.target
    if node.op == "call_method":
        return isinstance(t, str) and in_place_name(t)
    if node.op == "call_function":
        inner = getattr(t, "op", None) or getattr(t, "f", None) or getattr(t, "method", None) or t
        names = {getattr(inner, "__name__", "") if not isinstance(inner, str) else inner, getattr(t, "__name__", "")}
        if isinstance(t, torch._ops.OpOverload) and t._schema.is_mutable:
            return True
        return any(in_place_name(n) for n in names)
    return False
