"""host_concat: history grown on the host with ``np.concatenate`` becomes ``torch.cat`` on the device.

The idiom, as user code (a cache that keeps its history as a numpy array and appends each step)::

    self.k = np.concatenate([self.k, k.detach().cpu().numpy()], axis=1)
    k_hist = torch.from_numpy(self.k).to(k.device)

Graph before (Dynamo; the old array is an input, the new one is stored back by Dynamo after the graph)::

    detach = .detach(k); cpu = .cpu(detach); view_as = .view_as(cpu, cpu)
    concatenate = numpy.concatenate([L_self_k, view_as], axis=1)
    as_tensor = torch.as_tensor(concatenate); to = .to(as_tensor, device)

Graph after::

    concatenate = numpy.concatenate([L_self_k, view_as], axis=1)   # kept only for the array stored back
    cat = torch.cat([L_self_k, detach], 1)                         # the tensor attention reads
    ... uses of `to` now use `cat`

Also matched: a rebuild of a basic-indexed view of the result (``torch.from_numpy(hist[:, :end, :d])``, through
``np.ascontiguousarray`` and friends): the same indexing is applied to the device ``cat``.

Why it is exact: concatenation of the same values in the same order along the same axis, in one dtype (parts
of another dtype would be promoted by numpy: left alone). Parts that are host copies of device tensors are
replaced by those tensors; other parts (the previous history, an input array) are moved to the device. The
``cat`` is placed right after the ``np.concatenate``, so it reads the parts where numpy read them. Only the
tensor rebuilt from the result is rewired; any other use of the host array (Dynamo storing it back into the
cache object) keeps the original. Skipped: the concatenated array (or a view of it) mutated in place, or the
rebuilt tensor mutated in place (in eager they alias each other; a device ``cat`` would not).
"""

from __future__ import annotations

import operator

import torch
import torch.fx

from kvpass.pattern_api import (
    Emit, Report, _hop_input, forward_hops, host_chain, is_numpy_wrapper, meta_value, mutates_in_place,
    numpy_op_name, HOP_FUNCTIONS, HOP_NUMPY,
)

NAME = "host_concat"


class HostConcat:
    """See the module docstring."""

    name = NAME

    def apply(self, gm: torch.fx.GraphModule, report: Report) -> int:
        count = 0
        for node in list(gm.graph.nodes):
            if numpy_op_name(node) not in ("concatenate", "hstack", "vstack") or node.graph is None:
                continue
            count += self._rewrite(gm.graph, node, report)
        return count

    def _rewrite(self, graph, node, report) -> int:
        name = numpy_op_name(node)
        parts = node.args[0] if node.args else None
        axis = {"hstack": 1, "vstack": 0}.get(name, node.args[1] if len(node.args) > 1 else node.kwargs.get("axis", 0))
        out = meta_value(node)
        if not isinstance(parts, (list, tuple)) or not isinstance(axis, int) or not isinstance(out, torch.Tensor) or \
                set(node.kwargs) - {"axis"}:
            return 0
        if name == "hstack" and out.dim() == 1:
            axis = 0
        # tensor rebuilds of the concatenated host array, directly or of a basic-indexed view of it
        # (``torch.from_numpy(hist[:, :end])``): the uses that want a device tensor
        ends, views = [], [node]  # ends: (last hop node, [numpy getitem nodes from node to the rebuild])
        frontier = [(node, [])]
        while frontier:
            cur, path = frontier.pop()
            for u in cur.users:
                if u.op == "call_function" and u.target in HOP_FUNCTIONS:
                    ends.append((forward_hops(u), path))
                elif numpy_op_name(u) in HOP_NUMPY and _hop_input(u) is cur:  # np.ascontiguousarray(hist) ...
                    views.append(u)
                    frontier.append((u, path))
                elif numpy_op_name(u) == "getitem" and u.args[0] is cur and _basic_index(u.args[1]):
                    views.append(u)
                    frontier.append((u, path + [u]))
        if not ends:
            return 0
        dtypes = {meta_value(p).dtype for p in parts if isinstance(meta_value(p), torch.Tensor)}
        if len(dtypes) != 1 or any(not isinstance(meta_value(p), torch.Tensor) for p in parts):
            report.add_skip(NAME, node, "np.concatenate of mixed dtypes or non-array parts (numpy would promote)")
            return 0
        # in eager the rebuilt tensors alias the new host array (from_numpy/as_tensor): a write into either
        # shows in the other, which a device cat would not reproduce
        for v in views:
            writer = next((u for u in v.users if mutates_in_place(u) and u.args and u.args[0] is v), None)
            if writer is not None:
                report.add_skip(NAME, node, f"the concatenated host array is mutated in place by {writer.name}")
                return 0
        for end, _ in ends:
            chain = host_chain(end)
            hops = [end] + (chain.nodes if chain is not None else [])
            if any(mutates_in_place(u) and u.args and u.args[0] is h for h in hops for u in h.users):
                report.add_skip(NAME, node, "the tensor rebuilt from the concatenated host array is mutated in place")
                return 0
        rewired = 0
        for end, path in ends:
            device = meta_value(end).device
            if meta_value(end).dtype != out.dtype:
                continue
            # right after the concatenate: the parts are read where numpy read them
            emit = Emit(graph, node.next, like=node, aten_level=False)
            pieces = []
            for p in parts:
                chain = host_chain(p)
                src = chain.source if chain is not None and chain.crosses_host and not is_numpy_wrapper(
                    chain.source) else p
                if src is not p:
                    src = next((n for n in chain.nodes if n.op == "call_method" and n.target == "detach"
                                and n.args[0] is src), None) or emit.detach(src)
                if meta_value(src).device != device:
                    src = emit.to_device(src, device)
                pieces.append(src)
            new = emit.cat(pieces, axis % out.dim())
            for view in path:  # the same basic indexing, on the device tensor, where numpy indexed
                new = Emit(graph, view, like=view, aten_level=False).call(operator.getitem, new, view.args[1])
            end.replace_all_uses_with(new)
            rewired += 1
        if rewired:
            report.add_match(NAME, [node] + [e for e, _ in ends], anchor=node,
                             detail=f"{len(parts)} parts along axis {axis}")
        return rewired


def _basic_index(index) -> bool:
    """Basic indexing (ints, slices, ``...``, ``None``): the same view in numpy and torch."""
    items = index if isinstance(index, tuple) else (index,)
    for i in items:
        if isinstance(i, slice):
            if any(b is not None and not isinstance(b, (int, torch.fx.Node)) for b in (i.start, i.stop, i.step)):
                return False
        elif isinstance(i, torch.fx.Node):
            if not isinstance(meta_value(i), (int, torch.SymInt)):
                return False  # a tensor index is advanced indexing
        elif not (i is None or i is Ellipsis or isinstance(i, int)):
            return False
    return True


PATTERN = HostConcat()
