"""host_padding: head-dim padding done on the host (``np.pad``, ``np.zeros`` + slice assign, ``np.concatenate``
with zeros) becomes ``F.pad`` (``constant_pad_nd``) on the device tensor.

The idiom, as user code (a padded follower writing a small head dim into its owner's larger buffer)::

    padded = np.pad(k.detach().cpu().numpy(), ((0, 0), (0, 0), (0, D - d)))
    # or:   padded = np.zeros((h, t, D), np.float32); padded[..., :d] = k.detach().cpu().numpy()
    # or:   padded = np.concatenate([k.detach().cpu().numpy(), np.zeros((h, t, D - d), np.float32)], -1)

Graph before (Dynamo; ``np.pad`` is made traceable by ``kvpass.tracing``)::

    detach = .detach(k); cpu = .cpu(detach); view_as = .view_as(cpu, cpu)
    pad = numpy.pad(view_as, ((0, 0), (0, 0), (0, 8)))

Graph after::

    detach = .detach(k)
    pad = F.pad(detach, [0, 8, 0, 0, 0, 0], value=0)

Why it is exact: ``np.pad`` in constant mode, a zero buffer with one slice assigned, and a concatenation with
zero blocks all produce the input surrounded by constants, in the input's dtype, which is what
``constant_pad_nd`` computes; the input is the same values (a host copy of a device tensor). Users of the padded
array keep working: Dynamo's numpy wrappers accept tensors. Not rewritten: non-constant modes or widths, a
zero buffer that is read or written again before the assignment, a dtype change, shapes that do not line up.
"""

from __future__ import annotations

import torch
import torch.fx

from kvpass.pattern_api import (
    Emit, Report, buffer_access, host_chain, is_numpy_wrapper, known_eq, meta_value, mutates_in_place,
    numpy_op_name,
)

NAME = "host_padding"


def _device_source(node):
    """The device tensor ``node`` is a host copy of (an existing detach reused), or ``node`` if it is a tensor."""
    chain = host_chain(node) if isinstance(node, torch.fx.Node) else None
    if chain is not None and chain.crosses_host:
        src = chain.source
        for user in src.users:
            if user.op == "call_method" and user.target == "detach" and user in chain.nodes:
                return user, True
        return src, False
    return (node, True) if isinstance(meta_value(node), torch.Tensor) else (None, False)


def _flat_pad(rows) -> list:
    """numpy ``[(before, after)] * ndim`` to F.pad's last-dim-first flat list."""
    return [x for row in reversed(rows) for x in row]


def _zeros_node(node) -> bool:
    return isinstance(node, torch.fx.Node) and (numpy_op_name(node) in ("zeros", "zeros_like") or
                                                node.target in (torch.zeros, torch.zeros_like))


class HostPadding:
    """See the module docstring."""

    name = NAME

    def apply(self, gm: torch.fx.GraphModule, report: Report) -> int:
        count = 0
        for node in list(gm.graph.nodes):
            if node.graph is None or node.op != "call_function":
                continue
            name = numpy_op_name(node)
            if name == "pad":
                count += self._np_pad(gm.graph, node, report)
            elif name == "concatenate":
                count += self._concatenate(gm.graph, node, report)
            elif _zeros_node(node) and is_numpy_wrapper(node):
                count += self._zeros_assign(gm.graph, node, report)
        return count

    def _emit(self, graph, node, src, detached, rows, value, report, replaced):
        emit = Emit(graph, node, aten_level=False)  # numpy wrappers only exist in Dynamo graphs
        if not detached:
            src = emit.detach(src)
        new = emit.pad(src, _flat_pad(rows), value)
        node.replace_all_uses_with(new)
        report.add_match(NAME, replaced, anchor=node, detail=f"pad {rows} -> constant_pad_nd")
        return 1

    def _np_pad(self, graph, node, report) -> int:
        from kvpass.tracing import _const_pad_width  # the same normalisation the traceable np.pad uses

        args = list(node.args) + [None] * (3 - len(node.args))
        arr, width, mode = args[0], args[1], args[2] or node.kwargs.get("mode", "constant")
        extra = set(node.kwargs) - {"mode", "constant_values"}
        value = node.kwargs.get("constant_values", 0)
        val = meta_value(arr)
        if mode != "constant" or extra or not isinstance(value, (int, float)) or not isinstance(val, torch.Tensor):
            report.add_skip(NAME, node, "np.pad with a non-constant mode, value or array")
            return 0
        rows = _const_pad_width(width, val.dim())
        if rows is None or any(a < 0 or b < 0 for a, b in rows):
            report.add_skip(NAME, node, "np.pad with a pad_width that is not constant")
            return 0
        src, detached = _device_source(arr)
        if src is None or meta_value(src).dtype != val.dtype:
            report.add_skip(NAME, node, "the padded array is not a same-dtype copy of a tensor")
            return 0
        return self._emit(graph, node, src, detached, rows, value, report, [node])

    def _concatenate(self, graph, node, report) -> int:
        parts = node.args[0] if node.args else None
        axis = node.args[1] if len(node.args) > 1 else node.kwargs.get("axis", 0)
        if not isinstance(parts, (list, tuple)) or not isinstance(axis, int) or set(node.kwargs) - {"axis"}:
            return 0
        data = [p for p in parts if not _zeros_node(p)]
        if len(data) != 1 or len(parts) < 2:
            return 0
        (d,) = data
        dval = meta_value(d)
        if not isinstance(dval, torch.Tensor):
            return 0
        axis %= dval.dim()
        k = parts.index(d)
        sizes = []
        for p in parts:
            pv = meta_value(p)
            if not isinstance(pv, torch.Tensor) or pv.dtype != dval.dtype or pv.dim() != dval.dim() or any(
                    not known_eq(pv.shape[i], dval.shape[i]) for i in range(dval.dim()) if i != axis):
                report.add_skip(NAME, node, "np.concatenate parts whose dtype or shape do not line up with a pad")
                return 0
            sizes.append(pv.shape[axis])
        before, after = sum(sizes[:k]), sum(sizes[k + 1:])
        if not isinstance(before, int) or not isinstance(after, int):
            return 0
        src, detached = _device_source(d)
        if src is None or meta_value(src).dtype != dval.dtype:
            return 0
        rows = [(before, after) if i == axis else (0, 0) for i in range(dval.dim())]
        return self._emit(graph, node, src, detached, rows, 0, report, [node])

    def _zeros_assign(self, graph, zeros, report) -> int:
        zval = meta_value(zeros)
        if not isinstance(zval, torch.Tensor):
            return 0
        order = {n: i for i, n in enumerate(graph.nodes)}
        users = sorted(zeros.users, key=order.__getitem__)
        if not users:
            return 0
        first = buffer_access(users[0])
        if first is None or not first.is_write or first.buffer is not zeros or len(first.dims) != 1:
            return 0
        if any(mutates_in_place(u) and u.args and u.args[0] is zeros for u in users[1:]):
            report.add_skip(NAME, users[0], "the zero buffer is written more than once")
            return 0
        (dim, (lo, hi)), = first.dims.items()
        lo = 0 if lo is None else lo
        hi = zval.shape[dim] if hi is None else hi
        vval = meta_value(first.value)
        if not all(isinstance(x, int) for x in (lo, hi, zval.shape[dim])) or not isinstance(vval, torch.Tensor) or \
                vval.dtype != zval.dtype or vval.dim() != zval.dim() or not known_eq(vval.shape[dim], hi - lo) or any(
                not known_eq(vval.shape[i], zval.shape[i]) for i in range(zval.dim()) if i != dim):
            report.add_skip(NAME, users[0], "the assigned value does not fill the zero buffer outside one range")
            return 0
        src, detached = _device_source(first.value)
        if src is None:
            return 0
        rows = [(lo, zval.shape[dim] - hi) if i == dim else (0, 0) for i in range(zval.dim())]
        setitem = users[0]
        anchor = users[1] if len(users) > 1 else setitem
        emit = Emit(graph, anchor, like=setitem, aten_level=False)
        if not detached:
            src = emit.detach(src)
        new = emit.pad(src, _flat_pad(rows), 0)
        zeros.replace_all_uses_with(new, delete_user_cb=lambda u: u is not setitem)
        graph.erase_node(setitem)  # a write into a temporary nobody else sees any more
        report.add_match(NAME, [zeros, setitem], anchor=setitem, detail=f"zeros + assign -> pad {rows}")
        return 1


PATTERN = HostPadding()
