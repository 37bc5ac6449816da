"""scatter_slice: a read of a region of a functional write is the pieces the region is made of.

The idiom families, as user code (any layout, any one sliced dim, any mix of owners and followers)::

    self.k_buf[:, pos:pos + t] = k.detach().cpu().numpy()            # owner writes the new tokens
    k_hist = torch.from_numpy(self.k_buf[:, :pos + t]).to(k.device)  # ... and reads the history back
    o.k_buf[:, self.pos:self.pos + t] = np.pad(kf, pad)              # a follower writes into its owner's buffer
    k_f = torch.from_numpy(o.k_buf[:, :end, :d])                     # ... and reads a window, sliced
    buf[:, pos] = k[:, 0]                                            # one-position write (select_scatter)
    hist = torch.from_numpy(buf[:, :p]); buf[:, p:p + t] = k         # history read before the step's write
    kv[layer][0][:, p:p + t] = k; torch.from_numpy(kv[layer, 0, :, :p + t])   # K and V of every layer in one slab
    buf[:h, p:p + t] = k_a; buf[h:, p:p + t] = k_b                   # two owners, two head slices of one buffer
    buf[:, p % W] = k[:, 0]; np.roll(buf, -(p % W + 1), axis=1)      # a ring buffer read back in logical order

Graph before (functional ATen IR, ``kvpass.ir``)::

    copy = aten.copy(aten.slice(k_buf, 1, pos, add), k)           # the value written, cast to the buffer
    slice_scatter = aten.slice_scatter(k_buf, copy, 1, pos, add)  # the buffer after the write
    slice_4 = aten.slice(slice_scatter, 1, 0, add)                # the read
    copy_ = aten.copy_(k_buf, slice_scatter)                      # epilogue: the state a later step reads

Graph after::

    slice_1 = aten.slice(k_buf, 1, 0, pos)
    cat = aten.cat([slice_1, k], 1)                               # K reaches attention through graph edges
    copy_ = aten.copy_(k_buf, slice_scatter)                      # the write is kept

The equations (``B`` the buffer before the write, ``V`` the value written, reads and writes on dim ``d``)::

    slice(slice_scatter(B, V, d, s, e), d, a, b) = slice(V, d, a - s, b - s)          if s <= a, b <= e
                                                 = slice(B, d, a, b)                  if b <= s or e <= a
                                                 = cat([B[a:s], V, B[e:b]], d)        if a <= s, e <= b
                                                 = where(s <= i < e, V[i - s], B[i]) for i in [a, b)   else
    select(slice_scatter(B, V, d, s, e), d, i)   = select(V, d, i - s) if s <= i < e, else select(B, d, i)
    slice(select_scatter(B, V, d, j), d, a, b)   = cat([B[a:j], unsqueeze(V, d), B[j+1:b]], d)  if a <= j < b
    select(select_scatter(B, V, d, j), d, i)     = V if i == j;  select(B, d, i) if i != j
    slice(cat([x0, x1, ...], d), d, a, b)        = the pieces of the xk that [a, b) covers
    copy(dst, src)                               = src      if src has dst's shape, dtype and device
                                                 = convert_element_type(src, dst.dtype)  if only the dtype differs
    read(slice_scatter(B, V, d2, s, e)) on another dim d = slice_scatter(read(B), read(V), d2', s, e)
                                                   read whole along d2' (the equations above, a = 0, b = size):
                                                   cat([read(B)[s'':s], read(V), read(B)[e:]], d2')  (same for select_scatter)
    permute(slice_scatter(B, V, d, s, e), p)     = slice_scatter(permute(B, p), permute(V, p), p.index(d), s, e)
    select(unsqueeze(x, d), d, 0)                = x
    alias(W) for a write W on dim d              = slice(W, d, 0, size of d)          (a read of the whole buffer)
    roll(select_scatter(B, V, d, j), k, d)       = select_scatter(roll(B, k, d), V, d, (j + k) mod n)   (n = size of d)
    roll(slice_scatter(B, V, d, s, e), k, d)     = slice_scatter(roll(B, k, d), V, d, r, r + e - s)
                                                   with r = (s + k) mod n, if r + e - s <= n (the region does not wrap)

Side conditions: every bound is an int or a SymInt of the graph, and each case is taken only when its
inequalities are proven for every value of the symbols (``statically_known_true``), so one graph serves every
position; steps other than 1 are not decomposed. When none of the three slice cases can be proven (a follower's
position and its owner's are two symbols, or a read that overlaps the write partially), the read is selected by
position when the graph runs (the ``where`` line, ``kvpass.rules.select_by_position``; needs ``s < e`` proven).
Any other write through a region that cannot be proven inside or outside the read is left as it is, and
``report.skips`` says so. A read the program *returns* as a view of the buffer (``from_numpy(buf[:, :p])
.unbind(0)`` returned; ``kvpass.aliasing.returned_views``) is not replaced where it is returned: the caller's
view shows every later write to the buffer, which no value computed in the graph can. Each piece that stands for
values the buffer holds is emitted as the buffer holds it: a narrow float (fp16, bf16, fp8) computed in the graph
passes through its own bits, ``view(view(V, intN), dtype)`` (``= V``; ``kvpass.rules.as_stored``), so a compiler
that keeps such values wider inside a kernel still rounds them as the write did. The scatter itself is never
removed: the
``copy_`` epilogue still writes the new state, which a later step reads.

Why it is exact: on the functional IR every value is SSA, so ``slice_scatter(B, V, ...)`` *is* the buffer after
that write and nothing else can change it (in-place edits, ``out=`` writes and views of the buffer were already
turned into further scatters by functionalization, in program order); each equation is the definition of the
op it removes. Only reads of the program's state (graph inputs with a ``copy_`` epilogue: the cache buffers) and
the reads this rule creates are rewritten, so graphs without a cache are left byte-identical.
"""

from __future__ import annotations


import torch
import torch.fx

from kvpass.aliasing import grown_buffers, meta_value, reordered_buffers, returned_views, scatter_base, state_inputs
from kvpass.report import Report
from kvpass.errors import user_source_line
from kvpass.rules import (Emitter, as_stored, known_le, known_lt, known_eq, known_ne, norm_dim, norm_index,
                          norm_slice, select_by_position)

NAME = "scatter_slice"
aten = torch.ops.aten

_READS = (aten.slice.Tensor, aten.select.int)
_VIEWS = (aten.permute.default, aten.transpose.int)
_DECOMPOSABLE = (aten.slice_scatter.default, aten.select_scatter.default, aten.cat.default, aten.copy.default)
_STRUCTURE = _DECOMPOSABLE[:3]  # what a read decomposes further (its pieces are rounded, not the whole)


class _Undecided(Exception):
    """The bounds cannot be proven one way or the other: keep a plain read."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _shape(x):
    v = meta_value(x)
    return v.shape if isinstance(v, torch.Tensor) else None


def _stored(em, node):
    """The value a read of the buffer written with ``node`` sees: its plain copy source, as the buffer holds it
    (rounded to the buffer's dtype whatever the compiler does with casts: :func:`kvpass.rules.as_stored`)."""
    src = _plain_copy_source(node)
    return as_stored(em, _cast_of_copy(em, src), structure=_STRUCTURE)


def _cast_of_copy(em, node):
    """``copy(dst, src)`` that changes only the dtype is ``src`` converted (the same conversion ``copy_`` does):
    the value no longer depends on the buffer region it was written over. ``prims.convert_element_type``, not
    ``aten._to_copy``: an Inductor post-grad graph has no decomposition left to run (as for ``prims.iota``)."""
    if getattr(node, "target", None) is not aten.copy.default:
        return node
    dst, src = meta_value(node.args[0]), meta_value(node.args[1])
    if not (isinstance(dst, torch.Tensor) and isinstance(src, torch.Tensor)) or dst.device != src.device or \
            len(dst.shape) != len(src.shape) or not all(known_eq(x, y) for x, y in zip(dst.shape, src.shape)):
        return node
    return em.call(torch.ops.prims.convert_element_type.default, node.args[1], dst.dtype)


def _plain_copy_source(node):
    """``copy(dst, src)`` is ``src`` when ``src`` already has ``dst``'s shape, dtype and device."""
    while isinstance(node, torch.fx.Node) and node.target is aten.copy.default:
        dst, src = meta_value(node.args[0]), meta_value(node.args[1])
        if not (isinstance(dst, torch.Tensor) and isinstance(src, torch.Tensor)) or dst.dtype != src.dtype \
                or dst.device != src.device or len(dst.shape) != len(src.shape) or \
                not all(known_eq(x, y) for x, y in zip(dst.shape, src.shape)):
            break
        node = node.args[1]
    return node


class ScatterSlice:
    """See the module docstring."""

    name = NAME

    def apply(self, gm: torch.fx.GraphModule, report: Report) -> int:
        graph = gm.graph
        states = set(state_inputs(graph)) | grown_buffers(graph)  # the buffers the program keeps: its caches
        states |= reordered_buffers(graph)  # ... and a beam reorder of one (``np.take(buf, beam_idx, axis=0)``)
        if not states:
            return 0
        count = 0
        created: set = set()
        returned = returned_views(graph)
        for node in list(graph.nodes):
            if getattr(node, "_erased", False) or node.op != "call_function" or not node.users:
                continue
            is_read = node.target in _READS
            is_view = node.target in _VIEWS and all(u.target in _READS + _VIEWS for u in node.users)
            is_roll = node.target in (aten.roll.default, aten.alias.default)
            if not (is_read or is_view or is_roll):
                continue
            src = node.args[0]
            if is_read and _at_read_back_position(src) and scatter_base(src) in states:  # not decomposed
                report.add_skip(NAME, node, "a read of a write through an index tensor (at a position read back from "
                                "a tensor with .item() / .tolist(), whose range is not known: "
                                f"{user_source_line(src)}) is not decomposed; left as it is")
                continue
            if not (isinstance(src, torch.fx.Node) and src.target in _DECOMPOSABLE):
                continue
            if src not in created and scatter_base(src) not in states:
                continue  # not the program's state (a cache buffer): not ours to touch
            em = Emitter(graph, node, created)
            try:
                value = self._read(em, node) if is_read else self._view(em, node) if is_view else self._roll(em, node)
            except (_Undecided, LookupError) as why:
                em.discard()
                if src not in created:
                    report.add_skip(NAME, _write_of(src), getattr(why, "reason", str(why)))
                continue
            if value is None or value is node:
                em.discard()
                continue
            value = self._whole(em, value)
            if any(u in returned for u in node.users):  # the caller gets a view of the buffer: it shows later writes
                kept = [u.name for u in node.users if u in returned]
                replaced = node.replace_all_uses_with(value, delete_user_cb=lambda user: user not in returned)
                em.discard()  # what no replaced use needs
                if src not in created:
                    report.add_skip(NAME, _write_of(src), "the read is returned as a view of the buffer, which "
                                    "shows every later write to it: left a read for " + ", ".join(kept))
                    if replaced:
                        count += 1
                        report.add_match(NAME, [node, src], anchor=_write_of(src),
                                         detail=f"read: {_describe(value)} (not where it is returned)")
                continue
            node.replace_all_uses_with(value)
            graph.erase_node(node)
            if src not in created:
                count += 1
                report.add_match(NAME, [node, src], anchor=_write_of(src), detail=f"read: {_describe(value)}")
        return count

    # -- reads ---------------------------------------------------------------------------------------------

    def _read(self, em: Emitter, node):
        src = node.args[0]
        shape = _shape(src)
        if node.target is aten.select.int:
            d = norm_dim(node.args[1], len(shape))
            i = norm_index(node.args[2], shape[d])
            if i is None:
                raise _Undecided("the read's index cannot be proven inside the buffer")
            return self.select_of(em, src, d, i, top=True)
        d, a, b, step = norm_slice(node, shape)
        if step != 1:
            raise _Undecided("a strided read (step != 1) is not decomposed")
        if a is None:
            if _unbacked(node.args[2:4]):
                raise _Undecided("the read's end cannot be proven within the buffer's size when the graph is "
                                 "traced: the position was read back from a tensor (.item() / .tolist()) and nothing "
                                 "bounds it; torch._check(0 <= pos) and torch._check(pos + t <= buf.shape[d]) "
                                 "where it is read back would")
            raise _Undecided("the read's end cannot be proven within the buffer's size when the graph is traced "
                             "(the size and the positions are separate symbols, e.g. a capacity kept in its own "
                             "int: compare the positions with buf.shape instead)")
        return self.slice_of(em, src, d, a, b, top=True)

    def slice_of(self, em: Emitter, src, d, a, b, top=False):
        """The value of ``src[d][a:b]`` (bounds already normalized), decomposed where provable."""
        if not top:
            src = _stored(em, src)
            if known_eq(a, 0) and known_eq(b, _shape(src)[d]):
                return self._whole(em, src)
        t = getattr(src, "target", None)
        try:
            if t is aten.slice_scatter.default:
                return self._slice_of_slice_scatter(em, src, d, a, b)
            if t is aten.select_scatter.default:
                return self._slice_of_select_scatter(em, src, d, a, b)
            if t is aten.cat.default:
                return self._slice_of_cat(em, src, d, a, b)
        except _Undecided:
            value = self._by_position(em, src, d, a, b) if t is aten.slice_scatter.default else None
            if value is not None:
                return value
            if top:
                raise
        if top:
            return None
        return em.call(aten.slice.Tensor, src, d, a, b)

    def select_of(self, em: Emitter, src, d, i, top=False):
        """The value of ``src.select(d, i)``, decomposed where provable."""
        if not top:
            src = _stored(em, src)
        t = getattr(src, "target", None)
        if t is aten.unsqueeze.default and norm_dim(src.args[1], len(_shape(src))) == d and known_eq(i, 0):
            return self._whole(em, _stored(em, src.args[0]))  # select(unsqueeze(x, d), d, 0) = x
        try:
            if t is aten.slice_scatter.default:
                base, value, d2, s, e = self._slice_scatter_args(src)
                if d2 == d:
                    if known_le(s, i) and known_lt(i, e):
                        return self.select_of(em, value, d, em.sub(i, s))
                    if known_lt(i, s) or known_le(e, i):
                        return self.select_of(em, base, d, i)
                    raise _Undecided("the read's index cannot be proven inside or outside the write")
                base, value, d2 = self.select_of(em, base, d, i), self.select_of(em, value, d, i), d2 - (d < d2)
                return self._around(em, base, value, d2, s, e, 0, _shape(base)[d2])
            if t is aten.select_scatter.default:
                base, value, d2, j = self._select_scatter_args(src)
                if d2 == d:
                    if known_eq(i, j):
                        return _stored(em, value)
                    if known_ne(i, j):
                        return self.select_of(em, base, d, i)
                    raise _Undecided("the read's index cannot be proven equal or unequal to the written one")
                base, value = self.select_of(em, base, d, i), self.select_of(em, value, d - (d > d2), i)
                d2 = d2 - (d < d2)
                return self._around_one(em, base, value, d2, j, 0, _shape(base)[d2])
            if t is aten.cat.default:
                pieces, dc = src.args[0], norm_dim(src.args[1] if len(src.args) > 1 else 0, len(_shape(src)))
                if dc != d:
                    return em.cat([self.select_of(em, p, d, i) for p in pieces], dc - (d < dc))
                lo = 0
                for p in pieces:
                    hi = em.add(lo, _shape(p)[d])
                    if known_le(lo, i) and known_lt(i, hi):
                        return self.select_of(em, p, d, em.sub(i, lo))
                    if not (known_le(hi, i) or known_lt(i, lo)):
                        raise _Undecided("the read's index cannot be placed in one piece of the concatenation")
                    lo = hi
        except _Undecided:
            if top:
                raise
        if top:
            return None
        return em.call(aten.select.int, src, d, i)

    def _whole(self, em: Emitter, value):
        """What a read came to, when that is itself a write read whole (a read of exactly the region one write
        updated, e.g. ``buf[h:2h]`` after ``buf[h:2h, p:p+t] = k``): its pieces along its own dim, where provable
        (else the write as it is, which is exact)."""
        if not (isinstance(value, torch.fx.Node) and value.target in (aten.slice_scatter.default,
                                                                      aten.select_scatter.default)):
            return value
        mark = len(em.added)
        try:
            out = self._read_whole(em, value)
        except (_Undecided, LookupError):
            out = None
        if out is None:
            em.drop_after(mark)
            return value
        return out

    def _read_whole(self, em: Emitter, write):
        """``slice(write, d, 0, size)`` decomposed, ``d`` the dim a ``slice_scatter``/``select_scatter`` writes on;
        raises :class:`_Undecided` where no equation applies."""
        d = norm_dim(write.args[2] if len(write.args) > 2 else write.kwargs.get("dim", 0), len(_shape(write)))
        return self.slice_of(em, write, d, 0, _shape(write)[d], top=True)

    # -- the cases ------------------------------------------------------------------------------------------

    @staticmethod
    def _slice_scatter_args(node):
        shape = _shape(node)
        d, s, e, step = norm_slice(node, shape, first=2)
        if step != 1 or s is None:
            raise _Undecided("the write's bounds cannot be proven inside the buffer (or it is strided)")
        return node.args[0], node.args[1], d, s, e

    @staticmethod
    def _select_scatter_args(node):
        shape = _shape(node)
        d = norm_dim(node.args[2], len(shape))
        j = norm_index(node.args[3], shape[d])
        if j is None:
            raise _Undecided("the written index cannot be proven inside the buffer")
        return node.args[0], node.args[1], d, j

    def _slice_of_slice_scatter(self, em, src, d, a, b):
        base, value, d2, s, e = self._slice_scatter_args(src)
        if d2 != d:  # the read's region of the write, read whole along the written dim (so it decomposes too)
            base, value = self.slice_of(em, base, d, a, b), self.slice_of(em, value, d, a, b)
            return self._around(em, base, value, d2, s, e, 0, _shape(base)[d2])  # read whole along d2
        return self._around(em, base, value, d, s, e, a, b)

    def _around(self, em, base, value, d, s, e, a, b):
        """``slice(slice_scatter(base, value, d, s, e), d, a, b)``: the first three equations."""
        if known_le(b, s) or known_le(e, a):
            return self.slice_of(em, base, d, a, b)
        if known_le(s, a) and known_le(b, e):
            return self.slice_of(em, value, d, em.sub(a, s), em.sub(b, s))
        if known_le(a, s) and known_le(e, b):
            pieces = [] if known_eq(a, s) else [self.slice_of(em, base, d, a, s)]
            pieces.append(self.slice_of(em, value, d, 0, _shape(value)[d]))
            if not known_eq(e, b):
                pieces.append(self.slice_of(em, base, d, e, b))
            return em.cat(pieces, d)
        raise _Undecided("the read's bounds cannot be proven inside, outside or around the write "
                         "(positions whose order is not known when the graph is traced)")

    def _by_position(self, em, src, d, a, b):
        """A read of a write whose order against the read is not known when traced: selected by position when
        the graph runs (:func:`kvpass.rules.select_by_position`); ``None`` when that does not apply either."""
        mark = len(em.added)
        try:
            base, value, d2, s, e = self._slice_scatter_args(src)
            if d2 == d:
                out = select_by_position(em, self.slice_of(em, base, d, a, b), _stored(em, value), d, a, b,
                                         s, e, _shape(src)[d])
                if out is not None:
                    return out
        except (_Undecided, LookupError):
            pass
        em.drop_after(mark)
        return None

    def _slice_of_select_scatter(self, em, src, d, a, b):
        base, value, d2, j = self._select_scatter_args(src)
        if d2 != d:  # read whole along the written dim, as above
            base, value = self.slice_of(em, base, d, a, b), self.slice_of(em, value, d - (d > d2), a, b)
            return self._around_one(em, base, value, d2, j, 0, _shape(base)[d2])
        return self._around_one(em, base, value, d, j, a, b)

    def _around_one(self, em, base, value, d, j, a, b):
        """``slice(select_scatter(base, value, d, j), d, a, b)``."""
        if known_le(b, j) or known_lt(j, a):
            return self.slice_of(em, base, d, a, b)
        if known_le(a, j) and known_lt(j, b):
            pieces = [] if known_eq(a, j) else [self.slice_of(em, base, d, a, j)]
            pieces.append(em.call(aten.unsqueeze.default, _stored(em, value), d))
            j1 = em.add(j, 1)
            if not known_eq(j1, b):
                pieces.append(self.slice_of(em, base, d, j1, b))
            return em.cat(pieces, d)
        raise _Undecided("the written position cannot be proven inside or outside the read")

    def _slice_of_cat(self, em, src, d, a, b):
        pieces, dc = src.args[0], norm_dim(src.args[1] if len(src.args) > 1 else 0, len(_shape(src)))
        if dc != d:
            return em.cat([self.slice_of(em, p, d, a, b) for p in pieces], dc)
        out, lo = [], 0
        for p in pieces:
            hi = em.add(lo, _shape(p)[d])
            if known_le(hi, a) or known_le(b, lo):
                lo = hi
                continue
            start = 0 if known_le(a, lo) else em.sub(a, lo) if known_le(lo, a) else None
            end = _shape(p)[d] if known_le(hi, b) else em.sub(b, lo) if known_le(b, hi) else None
            if start is None or end is None:
                raise _Undecided("the read's bounds cannot be placed against the pieces of the concatenation")
            out.append(self.slice_of(em, p, d, start, end))
            lo = hi
        if not out:
            raise _Undecided("an empty read of a concatenation")
        return em.cat(out, d)

    def _view(self, em: Emitter, node):
        """permute/transpose of a write: the write of the permuted pieces (so the reads after it decompose)."""
        src = node.args[0]
        rank = len(_shape(src))
        if node.target is aten.transpose.int:
            x, y = norm_dim(node.args[1], rank), norm_dim(node.args[2], rank)
            perm = list(range(rank))
            perm[x], perm[y] = perm[y], perm[x]
        else:
            perm = [norm_dim(p, rank) for p in node.args[1]]
        t = src.target
        if t is aten.slice_scatter.default:
            base, value, d, s, e = self._slice_scatter_args(src)
            return em.call(aten.slice_scatter.default, em.call(aten.permute.default, base, perm),
                           em.call(aten.permute.default, _stored(em, value), perm), perm.index(d), s, e)
        return None


    def _roll(self, em: Emitter, node):
        """``roll`` of a write along the rolled dim (a ring buffer read back in logical order): the write of ``V``
        into the rolled old buffer, where the roll moves it, read whole (so it decomposes). ``alias`` of a write
        (a read of the whole buffer): the write read whole along its dim."""
        src = node.args[0]
        if node.target is aten.alias.default:
            if src.target is aten.copy.default:  # the whole buffer written, then read
                value = _plain_copy_source(src)
                return as_stored(em, value, structure=_STRUCTURE) if value is not src else None
            if src.target not in (aten.select_scatter.default, aten.slice_scatter.default):
                return None
            return self._read_whole(em, src)
        shifts = node.args[1] if len(node.args) > 1 else node.kwargs.get("shifts", ())
        dims = node.args[2] if len(node.args) > 2 else node.kwargs.get("dims", ())
        if src.target not in (aten.select_scatter.default, aten.slice_scatter.default) or len(shifts) != 1 \
                or len(dims) != 1:
            return None
        shape = _shape(src)
        d = norm_dim(dims[0], len(shape))
        n, k = shape[d], shifts[0]
        if src.target is aten.select_scatter.default:
            base, value, d2, j = self._select_scatter_args(src)
            if d2 != d:
                return None
            to = em.mod(em.add(j, k), n)
            if norm_index(to, n) is None:
                raise _Undecided("the ring position after the roll cannot be proven inside the buffer")
            return self._around_one(em, em.call(aten.roll.default, base, [k], [d]), value, d, to, 0, n)
        base, value, d2, s, e = self._slice_scatter_args(src)
        if d2 != d:
            return None
        to = em.mod(em.add(s, k), n)
        end = em.add(to, em.sub(e, s))
        if not (known_le(0, to) and known_le(end, n)):  # the written region must not wrap around the end
            raise _Undecided("the written region may wrap around the end of the ring after the roll")
        return self._around(em, em.call(aten.roll.default, base, [k], [d]), value, d, to, end, 0, n)


def _unbacked(bounds) -> bool:
    """Whether a slice bound is an unbacked SymInt (a value read back from a tensor while tracing)."""
    from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

    values = [meta_value(b) if isinstance(b, torch.fx.Node) else b for b in bounds]
    return any(isinstance(v, torch.SymInt) and free_unbacked_symbols(v) for v in values)


def _at_read_back_position(write) -> bool:
    """A write ``index_put(buf, [..., full([1], u), ...], v)``: ``buf[:, u] = v`` at a position ``u`` read back from
    a tensor (unbacked) whose range is not known, as ``kvpass.tracing`` writes it (an index tensor)."""
    return isinstance(write, torch.fx.Node) and write.target is aten.index_put.default and any(
        isinstance(i, torch.fx.Node) and i.target is aten.full.default and _unbacked(i.args[1:2])
        for i in write.args[1])


def _write_of(node):
    """The user's write a read decomposes (the scatter that carries a source line), for the report."""
    first = node
    while isinstance(node, torch.fx.Node) and node.target in _DECOMPOSABLE and node.target is not aten.cat.default \
            and "stack_trace" not in node.meta:
        node = node.args[0]
    return node if isinstance(node, torch.fx.Node) else first


def _describe(value) -> str:
    if isinstance(value, torch.fx.Node):
        name = getattr(value.target, "__name__", str(value.target))
        return name.split(".")[0]
    return type(value).__name__


PATTERN = ScatterSlice()
