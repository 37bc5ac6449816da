"""shared_read: a follower's read of its owner's buffer in the same step reuses the owner's read.

The idiom, as user code (Gemma 4's read-only followers, or any layer that re-reads a cache another layer just
read)::

    # owner layer                                   # follower layer, later in the same step
    k_hist = torch.from_numpy(buf[:, :pos]).to(dev)  k_f = torch.from_numpy(owner.buf[:, :owner.pos]).to(dev)

Graph before::

    getitem = numpy.getitem(k_buf, (:, :add)); as_tensor = torch.as_tensor(getitem); to = .to(as_tensor, device)
    ...
    getitem_1 = numpy.getitem(k_buf, (:, :add)); as_tensor_1 = torch.as_tensor(getitem_1); to_1 = .to(as_tensor_1, device)

Graph after::

    getitem = numpy.getitem(k_buf, (:, :add)); as_tensor = torch.as_tensor(getitem); to = .to(as_tensor, device)
    ...                                             # the follower uses `to` (and buffer_history then turns
                                                    # `to` into the owner's cat([history, k_new]))

A follower that also slices another dim (a padded follower's ``[..., :d]``) gets that slice on the owner's node.

Why it is exact: no write to the buffer (and no other in-place use of it) lies between the two reads, and the
first read's result is not mutated in place, so both reads see the same bytes; ranges are proved equal
symbolically. Only host-buffer (numpy) reads are merged: slicing a device tensor twice is not a round trip. Reads separated by a write are left to ``buffer_history`` (last writer wins).
"""

from __future__ import annotations

import torch
import torch.fx

from kvpass.pattern_api import (
    Emit, Report, buffer_access, feeds_buffer_access, forward_hops, is_side_effect_node, known_eq, meta_value,
    mutated_buffers, mutates_in_place,
)

NAME = "shared_read"


def _same_range(r1, r2) -> bool:
    return r1 is not None and r2 is not None and known_eq(r1[0] or 0, r2[0] or 0) and (
        (r1[1] is None and r2[1] is None) or (r1[1] is not None and r2[1] is not None and known_eq(r1[1], r2[1])))


class SharedRead:
    """See the module docstring."""

    name = NAME

    def apply(self, gm: torch.fx.GraphModule, report: Report) -> int:
        graph = gm.graph
        open_reads: dict = {}  # buffer -> list of (BufferAccess, end) since the buffer's last write
        count = 0
        for node in list(graph.nodes):
            if node.graph is None:
                continue
            acc = buffer_access(node)
            if acc is None:
                if is_side_effect_node(node):
                    for buf in mutated_buffers(node, open_reads):
                        open_reads.pop(buf)
                continue
            if acc.is_write:
                open_reads.pop(acc.buffer, None)
                continue
            if acc.kind != "numpy" or feeds_buffer_access(node):
                continue  # only host-buffer value reads: re-slicing a device tensor is not a round trip
            end = forward_hops(node)
            earlier = open_reads.setdefault(acc.buffer, [])
            match = next((e for e in earlier if self._covers(e[0], acc) and self._same_value_kind(e[1], end)), None)
            if match is None:
                earlier.append((acc, end))
                continue
            first, first_end = match
            if any(mutates_in_place(u) for u in first_end.users) or any(mutates_in_place(u) for u in end.users):
                report.add_skip(NAME, node, "a read result is mutated in place (it aliases the buffer in eager)")
                earlier.append((acc, end))
                continue
            extra = {d: r for d, r in acc.dims.items() if d not in first.dims}
            new = Emit(graph, node).slice(first_end, extra)
            end.replace_all_uses_with(new)
            report.add_match(NAME, [node, end], anchor=node, detail=f"reuses the read at {first.node.name}")
            count += 1
        return count

    @staticmethod
    def _covers(first, second) -> bool:
        """``second`` reads the same range as ``first`` on every dim ``first`` slices (it may slice more)."""
        if first.kind != second.kind or set(first.select) != set(second.select) or any(
                not known_eq(i, second.select[d]) for d, i in first.select.items()):
            return False  # another row of the buffer (``buf[0, ...]`` vs ``buf[1, ...]``)
        for d, r in first.dims.items():
            if not _same_range(r, second.dims.get(d)):
                return False
        return True

    @staticmethod
    def _same_value_kind(a, b) -> bool:
        va, vb = meta_value(a), meta_value(b)
        return isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor) and va.dtype == vb.dtype and \
            va.device == vb.device


PATTERN = SharedRead()
