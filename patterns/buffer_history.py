"""buffer_history: a read-after-write through a KV buffer becomes ``cat([history, k_new], seq)``.

The idiom, as user code (a cache port writing into a preallocated host buffer and reading the history back)::

    self.k_buf[:, pos:pos + t] = k.detach().cpu().numpy()          # write the new tokens
    k_hist = torch.from_numpy(self.k_buf[:, :pos + t]).to(k.device)  # read [0, pos + t)

Graph before (Dynamo)::

    detach = .detach(k); cpu = .cpu(detach); view_as = .view_as(cpu, cpu)
    setitem = numpy.setitem(k_buf, (:, pos:add), view_as)
    getitem = numpy.getitem(k_buf, (:, :add)); as_tensor = torch.as_tensor(getitem); to = .to(as_tensor, device)

Graph after::

    detach = .detach(k)
    setitem = operator.setitem(k_buf, (:, pos:add), detach)        # the write stays: a later step reads it
    getitem = operator.getitem(k_buf, (:, 0:pos)); to = .to(getitem, device)
    cat = torch.cat([to, detach], 1)                               # K reaches attention through graph edges

Also matched: writes and reads through an integer-indexed view (``row = buf[0]; row[:, pos:pos + t] = ...``, a
per-layer or per-batch slab of a bigger buffer: resolved to ``buf[0, :, pos:pos + t]``),
``buffer[...] = k`` on a tensor buffer (``operator.setitem``/``getitem``), ``buffer[...].copy_(k)``,
and ATen ``aten.copy_(aten.slice(buffer, ...), k)`` / ``aten.slice(buffer, ...)`` (exported graphs); any one
sliced dim (the sequence), any layout; reads that also slice other dims (a padded follower's ``[..., :d]``) get
those slices on every piece.

Why it is exact: the write is kept, in place and in order, so the buffer holds what eager holds. A read of
``[a, b)`` after the last write ``[s, e)`` of the same buffer equals ``buffer[a:s] ++ v ++ buffer[e:b]`` when
``a <= s`` and ``e <= b``, because the pieces outside ``[s, e)`` are read from the same buffer at the same point
of the program, and inside it the buffer holds exactly ``v`` (same dtype; numpy would otherwise cast). Bounds
are compared symbolically (``statically_known_true``), so one graph serves every position. Skipped, with the
reason in the report: a bound that cannot be proven, a dtype change through the buffer, a value that cannot be
traced back to a device tensor, an unrecognised in-place use of the buffer (or of a view of it) between write
and read, a read whose result is mutated in place (it aliases the buffer in eager), and a read that is not
copied (``from_numpy``, ``as_tensor``) whose result is still used after a later write into the buffer (eager
would see that write through the alias). A read that does not overlap the write is left as it is.
"""

from __future__ import annotations

import bisect
import dataclasses
import operator

import torch
import torch.fx

from kvpass.pattern_api import (
    Emit, Report, buffer_access, feeds_buffer_access, forward_hops, host_chain, insert_call, is_side_effect_node,
    known_eq, known_le, meta_value, mutated_buffers, mutates_in_place, numpy_op_name,
)

NAME = "buffer_history"


def _existing_detach(node):
    """A ``node.detach()`` already in the graph (the round trip's own first step), to reuse."""
    for user in node.users:
        if user.op == "call_method" and user.target == "detach" and len(user.args) == 1:
            return user
    return None


def _device_value(value) -> torch.fx.Node | None:
    """The device tensor a written value is a host copy of (or the value itself when it is a device tensor)."""
    if not isinstance(value, torch.fx.Node):
        return None
    chain = host_chain(value)
    node = chain.source if chain is not None and chain.crosses_host else value
    return node if isinstance(meta_value(node), torch.Tensor) else None


def _shape(node, d):
    v = meta_value(node)
    return v.shape[d] if isinstance(v, torch.Tensor) and d < v.dim() else None


class BufferHistory:
    """See the module docstring."""

    name = NAME

    def apply(self, gm: torch.fx.GraphModule, report: Report) -> int:
        graph = gm.graph
        last_write: dict = {}  # buffer node -> (BufferAccess, device value node) | str (why unusable)
        writes = _WritePositions(graph)  # of the graph as it is now: later writes are still these nodes
        count = 0
        for node in list(graph.nodes):
            acc = buffer_access(node)
            if acc is None:
                self._note_other_mutation(node, last_write)
                continue
            if acc.is_write:
                last_write[acc.buffer] = self._canonical_write(graph, acc)
                continue
            if feeds_buffer_access(node):
                continue  # a view (``buf[0]``) that the accesses below index into; they are rewritten instead
            count += self._rewrite_read(graph, acc, last_write.get(acc.buffer), report, writes)
        return count

    # -- writes ------------------------------------------------------------------------------------------

    def _canonical_write(self, graph, acc):
        """Record a write; a numpy write of a host copy becomes a tensor ``setitem`` of the device value."""
        dev = _device_value(acc.value)
        if dev is None:
            return "the written value is not traceable to a device tensor"
        if len(acc.dims) > 1 or not (acc.dims or acc.select):
            return "the write is not a range along exactly one dim"
        if acc.kind == "numpy":
            detached = dev if dev is acc.value else _existing_detach(dev) or insert_call(
                graph, acc.node, "detach", (dev,), op="call_method", like=acc.node)
            # the node's own target and index (a view of acc.buffer when the write goes through one)
            new = insert_call(graph, acc.node, operator.setitem, (acc.node.args[0], acc.node.args[1], detached),
                              like=acc.node)
            new.meta.update({k: v for k, v in acc.node.meta.items() if k != "example_value"})
            acc.node.replace_all_uses_with(new)
            graph.erase_node(acc.node)
            acc = dataclasses.replace(acc, node=new, kind="tensor", value=detached)
            dev = detached
        return acc, dev

    @staticmethod
    def _note_other_mutation(node, last_write):
        """An in-place use of a buffer we do not understand (directly or through a view of it) makes its contents
        unknown from here on."""
        if not is_side_effect_node(node):
            return
        for buf in mutated_buffers(node, last_write):
            last_write[buf] = f"{node.name} mutates the buffer in a way kvpass does not model"

    # -- reads -------------------------------------------------------------------------------------------

    def _rewrite_read(self, graph, read, write, report, writes) -> int:
        if write is None:
            return 0  # no write of this buffer earlier in the graph: not a read-after-write
        end = forward_hops(read.node)
        if isinstance(write, str):
            report.add_skip(NAME, read.node, write)
            return 0
        w, value = write
        buf_val, end_val, v_val = meta_value(read.buffer), meta_value(end), meta_value(value)
        if not all(isinstance(x, torch.Tensor) for x in (buf_val, end_val, v_val)):
            report.add_skip(NAME, read.node, "no traced shapes to prove the rewrite with")
            return 0
        shape = _Selected(read, w)
        if shape.why:
            report.add_skip(NAME, read.node, shape.why)
            return 0
        dim, (s, e) = shape.dim, shape.write_range
        kept = shape.kept  # buffer dim -> dim of the read result / the written value
        a, b = read.dims.get(dim, (None, None))
        a = 0 if a is None else a
        b = buf_val.shape[dim] if b is None else b
        s = 0 if s is None else s
        e = buf_val.shape[dim] if e is None else e
        why = None
        v_shape = list(v_val.shape)
        if shape.unsqueeze:
            v_shape.insert(kept[dim], 1)
        e_val = e.value if isinstance(e, _PlusOne) else e
        if known_le(b, s) or known_le(e_val, a):
            return 0  # the read does not overlap the write: it reads none of the written value (as our pieces)
        if v_val.dtype != buf_val.dtype or end_val.dtype != buf_val.dtype:
            why = f"dtype changes through the buffer ({v_val.dtype} written, {buf_val.dtype} stored)"
        elif len(v_shape) != buf_val.dim() - len(shape.select) or any(
                not known_eq(v_shape[kept[d]], buf_val.shape[d])
                for d in range(buf_val.dim()) if d != dim and d not in shape.select):
            why = "the written value does not fill the buffer's other dims (broadcast or partial write)"
        elif not known_eq(v_shape[kept[dim]], _sub(e_val, s)):
            why = "the written value's length differs from the written range"
        elif not (known_le(0, a) and known_le(0, s)):
            why = "cannot prove the slice bounds are non-negative (negative bounds wrap around)"
        elif not known_le(e_val, buf_val.shape[dim]):
            why = "cannot prove the write lies inside the buffer"
        elif any(mutates_in_place(u) for n in _chain(read.node, end) for u in n.users):
            why = "the read's result is mutated in place (it aliases the buffer in eager)"
        elif writes.alias_used_after_next_write(read, end):
            why = "the read's result aliases the buffer and is used after a later write to it"
        if why:
            report.add_skip(NAME, read.node, why)
            return 0

        other = {d: r for d, r in read.dims.items() if d != dim}
        device = end_val.device
        anchor = read.node
        emit = Emit(graph, anchor)
        sym = _SymOps(emit)
        if shape.unsqueeze:  # a one-position write `buf[:, pos] = v`: v gains the sequence dim
            value = emit.unsqueeze(value, kept[dim])
        if isinstance(e, _PlusOne):
            e = e.emit(emit)
        # read [a, b) = buffer[a : min(s, b)] ++ v[clamp(a - s) : clamp(b - s)] ++ buffer[max(e, a) : b],
        # clamp(x) = max(0, min(x, len(v))); with a <= s and e <= b (proved) this is buffer[a:s] ++ v ++ buffer[e:b].
        pieces = []
        hi1 = sym.min(s, b)
        if not known_le(hi1, a):
            pieces.append(_piece(emit, read.buffer, {**other, dim: (a, hi1)}, device, shape.select))
        lo_v = 0 if known_le(a, s) else sym.max(0, sym.min(sym.sub(a, s), emit.size(value, kept[dim])))
        hi_v = None if known_le(e, b) else sym.max(0, sym.min(sym.sub(b, s), emit.size(value, kept[dim])))
        seq = {} if isinstance(lo_v, int) and lo_v == 0 and hi_v is None else {kept[dim]: (lo_v, hi_v)}
        pieces.append(_piece(emit, value, {**{kept[d]: r for d, r in other.items()}, **seq}, device))
        lo3 = sym.max(e, a)
        if not known_le(b, lo3):
            pieces.append(_piece(emit, read.buffer, {**other, dim: (lo3, b)}, device, shape.select))
        new = emit.cat(pieces, kept[dim])
        new.meta["example_value"] = end_val
        end.replace_all_uses_with(new)
        report.add_match(NAME, [read.node, end], anchor=read.node,
                         detail=f"cat along dim {kept[dim]} with the value written by {w.node.name}")
        return 1


class _Selected:
    """Reconcile the integer indices of a write and a later read of the same buffer.

    Both must select the same rows (``buf[0, :, ...]`` and ``buf[0, :, ...]``); a write that selects one
    position where the read takes a range (``buf[:, pos] = v`` then ``buf[:, :pos + 1]``) is a one-long range
    with ``v`` unsqueezed. Afterwards the write has exactly one range dim, ``dim``.
    """

    def __init__(self, read, w):
        self.why, self.unsqueeze = None, False
        self.select = {}
        for d in set(w.select) | set(read.select):
            if d in w.select and d in read.select:
                if not known_eq(w.select[d], read.select[d]):
                    self.why = "the read selects another index than the write"
                    return
                self.select[d] = read.select[d]
            elif d in read.select:
                self.why = "the read selects one index of a range the write spans"
                return
        ranges = dict(w.dims)
        converted = [d for d in w.select if d not in read.select]
        for d in converted:
            i = w.select[d]
            ranges[d] = (i, i + 1 if isinstance(i, int) else _PlusOne(i))
        if len(ranges) != 1:
            self.why = "the write is not a range along exactly one dim"
            return
        ((self.dim, self.write_range),) = ranges.items()
        self.unsqueeze = bool(converted)
        self.kept = {d: d - sum(1 for x in self.select if x < d) for d in range(read.ndim or 0)}


class _PlusOne:
    """``node + 1`` for a one-position write at ``node``: its traced value for proofs; a node once emitted."""

    def __init__(self, node):
        self.node, self.value = node, meta_value(node) + 1

    def emit(self, emit: Emit):
        return emit.call(operator.add, self.node, 1)


def _piece(emit: Emit, node, dims: dict, device, select=None):
    """``node`` sliced on ``dims`` (and indexed on ``select``), moved to ``device`` if it lives elsewhere (a host
    buffer on a GPU model)."""
    node = emit.slice(node, dims, select)
    return node if meta_value(node).device == device else emit.to_device(node, device)


class _SymOps:
    """Integer arithmetic on slice bounds: folded when provable, else ``sym_min``/``sym_max``/``sub`` nodes."""

    def __init__(self, emit: Emit):
        self.emit = emit

    def _node(self, target, *args):
        return self.emit.call(target, *args)

    def min(self, x, y):
        if known_le(x, y):
            return x
        if known_le(y, x):
            return y
        return self._node(torch.sym_min, x, y)

    def max(self, x, y):
        if known_le(x, y):
            return y
        if known_le(y, x):
            return x
        return self._node(torch.sym_max, x, y)

    def sub(self, x, y):
        if isinstance(x, int) and isinstance(y, int):
            return x - y
        if known_eq(x, y):
            return 0
        return self._node(operator.sub, x, y)


def _sub(e, s):
    ev, sv = meta_value(e), meta_value(s)
    try:
        return ev - sv
    except TypeError:
        return None


# steps that may return a view of their input (so a later write into the buffer shows through them)
_ALIAS_METHODS = {"view", "view_as", "transpose", "permute", "reshape", "expand", "expand_as", "unsqueeze", "squeeze",
                  "narrow", "select", "t", "flatten", "unflatten", "contiguous", "detach", "to", "cpu", "numpy",
                  "as_strided", "unfold", "movedim", "swapaxes", "__getitem__"}
_ALIAS_FUNCTIONS = {torch.from_numpy, torch.as_tensor, torch.asarray, operator.getitem, torch.transpose,
                    torch.permute, torch.reshape, torch.unsqueeze, torch.squeeze, torch.narrow, torch.select,
                    torch.flatten, torch.detach}
_ALIAS_NUMPY = {"asarray", "ascontiguousarray", "asanyarray", "getitem", "transpose", "reshape", "squeeze",
                "expand_dims", "swapaxes", "moveaxis"}


def _may_alias(node) -> bool:
    if node.op == "call_method":
        return node.target in _ALIAS_METHODS
    if node.op == "call_function":
        return node.target in _ALIAS_FUNCTIONS or numpy_op_name(node) in _ALIAS_NUMPY
    return False


class _WritePositions:
    """Where each buffer is written, computed once per pass: recognised writes and any other in-place use of the
    buffer or of a value computed from it (a view). Asking per read by rescanning the graph was quadratic."""

    def __init__(self, graph):
        self.order = {n: i for i, n in enumerate(graph.nodes)}
        accesses = [(n, buffer_access(n)) for n in graph.nodes]
        buffers = {a.buffer for _, a in accesses if a is not None}
        self.positions: dict = {}  # buffer -> ascending positions of the nodes that write it
        for n, a in accesses:
            written = {a.buffer} if a is not None and a.is_write else set()
            if is_side_effect_node(n):
                written |= mutated_buffers(n, buffers)
            for b in written:
                self.positions.setdefault(b, []).append(self.order[n])

    def alias_used_after_next_write(self, read, end) -> bool:
        """In eager, a read that is not copied (``from_numpy``, ``as_tensor``, ``.to`` the same device, a view of
        those) aliases the buffer: a later write into the buffer shows in it. Then the snapshot a ``cat`` takes
        differs wherever an alias of the result is used (or returned) after that write."""
        chain = _chain(read.node, end)
        if not all(_may_alias(n) for n in chain):
            return False  # a copy on the way (torch.tensor, np.array, a transfer to another device)
        if any(n.op == "call_method" and n.target == "to" and isinstance(meta_value(n), torch.Tensor)
               and isinstance(meta_value(read.node), torch.Tensor)
               and meta_value(n).device != meta_value(read.node).device for n in chain):
            return False
        positions = self.positions.get(read.buffer, [])
        i = bisect.bisect_right(positions, self.order[read.node])
        if i == len(positions):
            return False
        later = positions[i]
        aliases, stack = set(), [end]
        while stack:
            n = stack.pop()
            if n in aliases:
                continue
            aliases.add(n)
            for u in n.users:  # a node added by this pass is not in ``order``: count it as after (conservative)
                if u.op == "output" or self.order.get(u, len(self.order)) > later:
                    return True
                if _may_alias(u) and u.args and u.args[0] is n:
                    stack.append(u)
        return False


def _chain(start, end):
    out, cur = [start], start
    while cur is not end:
        (cur,) = cur.users
        out.append(cur)
    return out


PATTERN = BufferHistory()
