"""view_fold: a reshape of a reshape of a cache buffer that gives back a shape it had is that value itself.

The idiom families, as user code (a cache kept as one flat host array, a fresh view of it at every access: a
literal port of a framework whose cache is a flat float array)::

    kb = self.k_flat.reshape(H, M, D); kb[:, p:p + t] = k.detach().cpu().numpy()       # written through a view
    kh = torch.from_numpy(self.k_flat.reshape(H, M, D)[:, :p + t]).to(dev)             # read through another

Graph before (functional ATen IR: the write through the view updates the flat buffer, the next access views
the updated flat buffer afresh)::

    view = aten.view(k_flat, [H, M, D])
    slice_scatter = aten.slice_scatter(view, copy, 1, p, p + t)
    view_1 = aten.view(slice_scatter, [H * M * D])        # the flat buffer after the write (its copy_ epilogue)
    view_2 = aten.view(view_1, [H, M, D])                 # the next access's fresh view
    slice_2 = aten.slice(view_2, 1, 0, p + t)             # the read

Graph after (``scatter_slice`` then decomposes the read of the write: K reaches attention through graph edges)::

    slice_2 = aten.slice(slice_scatter, 1, 0, p + t)

The equation, for a chain of reshapes ``x -> v_1 -> ... -> v_n`` (``aten.view``, ``aten._unsafe_view``,
``aten.reshape``)::

    v_n = v_k        if shape(v_n) == shape(v_k), for any k < n (and v_0 = x)

Side conditions: every link is a reshape of values (not ``view(dtype)``, which reinterprets bytes); the shapes
are equal dim by dim for every value of the symbols (``known_eq``); the chain starts at the program's state (a
cache buffer: a graph input with a ``copy_`` epilogue, or a functional write into one), so graphs without a cache
are left as they are. The deepest such ``v_k`` is taken (the one closest to the write). A chain from a write
that never comes back to a shape it had, and is read, is left as it is and reported as a skip.

Why it is exact: on the functional IR a reshape is a relabelling of indices that keeps the elements in row-major
order, so every value of the chain holds the same sequence of elements; two of them with the same shape are
then the same tensor value, element for element (dtype and device never change along the chain).
"""

from __future__ import annotations

import torch
import torch.fx

from kvpass.aliasing import SCATTER_OPS, meta_value, scatter_base, state_inputs
from kvpass.report import Report
from kvpass.rules import known_eq

NAME = "view_fold"
aten = torch.ops.aten

_RESHAPES = (aten.view.default, aten._unsafe_view.default, aten.reshape.default)
_READS = (aten.slice.Tensor, aten.select.int)


def _same_shape(a, b) -> bool:
    va, vb = meta_value(a), meta_value(b)
    if not (isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor)):
        return False
    if va.dim() != vb.dim():
        return False
    return all(known_eq(x, y) for x, y in zip(va.shape, vb.shape))


def _is_reshape(node) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target in _RESHAPES


class ViewFold:
    """See the module docstring."""

    name = NAME

    def apply(self, gm: torch.fx.GraphModule, report: Report) -> int:
        graph = gm.graph
        states = state_inputs(graph)
        if not states:
            return 0
        count = 0
        for node in list(graph.nodes):
            if getattr(node, "_erased", False) or not _is_reshape(node) or not node.users:
                continue
            if not _is_reshape(node.args[0]):
                continue  # one reshape alone: nothing to fold
            if scatter_base(node.args[0]) not in states:
                continue  # not the program's state (a cache buffer): not ours to touch
            found = None
            x = node.args[0]
            while _is_reshape(x):
                x = x.args[0]
                if _same_shape(x, node):
                    found = x  # keep going: the deepest one is closest to the write
            if found is None:
                if x.target in SCATTER_OPS and any(u.target in _READS for u in node.users):
                    report.add_skip(NAME, node, "the cache buffer is read through a reshape to a shape it was not "
                                    "written in (e.g. written as [H, M, D], read as [M, H, D]): the read stays a "
                                    "read of the buffer")
                continue
            node.replace_all_uses_with(found)
            graph.erase_node(node)
            report.add_match(NAME, [node], anchor=node, detail=f"reshape back to {found.name}")
            count += 1
        return count


PATTERN = ViewFold()
