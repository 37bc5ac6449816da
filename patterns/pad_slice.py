"""pad_slice: padding followed by the slice that removes it collapses to the unpadded tensor.

The idiom, as user code (a padded follower that pads its K up to the owner's head dim and slices the view back;
after ``host_padding`` and ``buffer_history`` its own K meets its own slice)::

    k_padded = F.pad(k, (0, D - d))
    k_back = k_padded[..., :d]

Graph before::

    pad = F.pad(k, [0, 8, 0, 0, 0, 0], value=0)
    getitem = operator.getitem(pad, (:, 0:s, :8))

Graph after::

    getitem = operator.getitem(k, (:, 0:s, :))       # or k itself when nothing else is sliced

Also ATen ``aten.slice(aten.constant_pad_nd(x, pad), dim, lo, lo + n)``.

Why it is exact: on every padded dim the slice keeps exactly the positions ``[before, before + n)`` that hold
``x`` (``n`` the size of ``x`` there, proved symbolically), so the padding constants are never read; slices on
other dims apply to ``x`` unchanged.
"""

from __future__ import annotations

import operator

import torch
import torch.fx
import torch.nn.functional as F

from kvpass.pattern_api import Emit, Report, known_eq, meta_value

NAME = "pad_slice"
aten = torch.ops.aten


def _pads(node):
    """``(x, {dim: (before, after)})`` for an F.pad / constant_pad_nd node, else ``(None, None)``."""
    if node.op != "call_function" or node.target not in (F.pad, torch._C._nn.pad, aten.constant_pad_nd.default):
        return None, None
    x = node.args[0]
    flat = node.args[1] if len(node.args) > 1 else node.kwargs.get("pad")
    mode = node.kwargs.get("mode", node.args[2] if len(node.args) > 2 and node.target is not aten.constant_pad_nd.default else "constant")
    xv = meta_value(x)
    if mode != "constant" or not isinstance(xv, torch.Tensor) or not isinstance(flat, (list, tuple)) or \
            len(flat) % 2 or not all(isinstance(p, int) and p >= 0 for p in flat):
        return None, None
    pads = {}
    for i in range(len(flat) // 2):
        if flat[2 * i] or flat[2 * i + 1]:
            pads[xv.dim() - 1 - i] = (flat[2 * i], flat[2 * i + 1])
    return x, pads


def _normalize_index(index, ndim):
    if not isinstance(index, tuple):
        index = (index,)
    if sum(i is Ellipsis for i in index) > 1:
        return None
    if Ellipsis in index:
        k = index.index(Ellipsis)
        index = index[:k] + (slice(None),) * (ndim - len(index) + 1) + index[k + 1:]
    if len(index) > ndim or not all(isinstance(s, slice) and s.step in (None, 1) for s in index):
        return None
    return index + (slice(None),) * (ndim - len(index))


class PadSlice:
    """See the module docstring."""

    name = NAME

    def apply(self, gm: torch.fx.GraphModule, report: Report) -> int:
        count = 0
        for node in list(gm.graph.nodes):
            if node.op != "call_function":
                continue
            if node.target is operator.getitem and isinstance(node.args[0], torch.fx.Node):
                count += self._getitem(gm.graph, node, report)
            elif node.target is aten.slice.Tensor and isinstance(node.args[0], torch.fx.Node):
                count += self._aten_slice(gm.graph, node, report)
        return count

    def _getitem(self, graph, node, report) -> int:
        x, pads = _pads(node.args[0])
        if x is None or not pads:
            return 0
        xv = meta_value(x)
        index = _normalize_index(node.args[1], xv.dim())
        if index is None:
            return 0
        new_index = list(index)
        for d, (before, _after) in pads.items():
            s = index[d]
            start = 0 if s.start is None else s.start
            if not (known_eq(start, before) and s.stop is not None and known_eq(_minus(s.stop, before), xv.shape[d])):
                return 0
            new_index[d] = slice(None)
        if all(s == slice(None) for s in new_index):
            new = x
        else:
            new = Emit(graph, node, aten_level=False).call(operator.getitem, x, tuple(new_index))
        node.replace_all_uses_with(new)
        report.add_match(NAME, [node.args[0], node], anchor=node, detail="slice removes exactly the padding")
        return 1

    def _aten_slice(self, graph, node, report) -> int:
        x, pads = _pads(node.args[0])
        if x is None or len(pads) != 1:
            return 0
        args = list(node.args) + [0, None, None][len(node.args) - 1:]
        _, dim, start, stop = args[:4]
        xv = meta_value(x)
        dim %= xv.dim()
        if dim not in pads or (len(node.args) > 4 and node.args[4] != 1):
            return 0
        before = pads[dim][0]
        if known_eq(start or 0, before) and stop is not None and known_eq(_minus(stop, before), xv.shape[dim]):
            node.replace_all_uses_with(x)
            report.add_match(NAME, [node.args[0], node], anchor=node, detail="slice removes exactly the padding")
            return 1
        return 0


def _minus(stop, before):
    v = meta_value(stop)
    return v - before if isinstance(v, (int, torch.SymInt)) else None


PATTERN = PadSlice()
