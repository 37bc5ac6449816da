"""store_loop: a hand-written paged-cache store loop that Dynamo unrolled becomes one ``store_paged_single`` op.

The idiom, as user code (the block ids, offsets and lengths are Python ints, e.g. a plan computed on the host,
so Dynamo unrolls the loop into one slice write per chunk, or per token)::

    for src, blk, off, n in plan:                                # per chunk (upstream's loop shape)
        k_cache[blk, :, off:off + n] = k[src:src + n].transpose(0, 1)      # HND cache
    for i, (blk, off) in enumerate(slots):                       # per token (decode)
        v_cache[blk, off].copy_(v[i])                                      # NHD cache, copy_ form

Graph before (Dynamo, the K writes of the first loop; they may interleave with another cache's writes)::

    getitem = k[slice(0, 3)];    transpose = .transpose(getitem, 0, 1)
    setitem = operator.setitem(k_cache, (3, slice(None), slice(5, 8)), transpose)
    getitem_1 = k[slice(3, 11)]; transpose_1 = .transpose(getitem_1, 0, 1)
    setitem_1 = operator.setitem(k_cache, (1, slice(None), slice(0, 8)), transpose_1)

Graph after::

    tensor = torch.tensor([[0, 3, 5, 3], [3, 1, 0, 8]], dtype=torch.int32, device=cpu)   # the chunk table
    store_paged_single = kvpass.store_paged_single.default(k, k_cache, None, None, None, tensor, layout='HND')

Recognised, in any mix: ``operator.setitem(cache_view, index, value)`` and ``cache_view.copy_(value)``, where the
destination is the cache (rank 4) reached through basic indexing (an int block, a slice or an int on the offset
axis, the head and head_dim axes whole) and ``transpose``/``permute``/``swapaxes`` views, and the value is the
states (rank 3) reached the same way (a slice or an int on the token axis, the other axes whole). The layout
follows from which cache axis the token axis lands on: ``(blocks, heads, offsets, dim)`` is HND,
``(blocks, offsets, heads, dim)`` NHD. Writes are grouped by (cache, states, layout); a group of two or more
becomes one op, placed where the group's last write was; two groups with the same chunks into two different
caches (a K/V loop, like the one above with its V writes) become one ``store_paged_kv``::

    tensor = torch.tensor([[0, 3, 5, 3], [3, 1, 0, 8], [11, 6, 0, 2]], dtype=torch.int32, device=cpu)
    store_paged_kv = kvpass.store_paged_kv.default(k, v, k_cache, v_cache, None, None, None, tensor, layout='HND')

The chunk table is built in the graph (a ``torch.tensor`` of constants), not registered as a buffer: Dynamo
graphs carry a source for every attribute and AOTAutograd rejects one without it.

Why it is exact: each write copies ``states[src:src+n]`` to slots ``(blk, off..off+n)`` of one block, which is
what ``store_paged_single`` does for the chunk row ``(src, blk, off, n)``; with no two writes of the group
touching the same slot, their order does not matter, so doing them all at the last write's position gives the
same cache as long as nothing between the first and the last write reads or writes the cache's memory or writes
the states' memory (checked through the traced values' storages, so another cache's writes may interleave).
Left unchanged, with the reason in the report: a group whose writes overlap, a cache or states touched between
the writes, states that share the cache's memory, a dtype or device change (``setitem`` and ``copy_`` cast, the
op does not), a group that stores more tokens than the states hold, a write whose result is used, and a graph
where the op is not registered (``kvpass.ops`` not imported). Not recognised as a store at all (no report): a lone
write, symbolic sizes or indices, tensor (advanced) indices, broadcasting values, a write that covers only part
of the heads or of head_dim.
"""

from __future__ import annotations

import dataclasses
import operator

import torch
import torch.fx
from torch.multiprocessing.reductions import StorageWeakRef

from kvpass.aliasing import is_side_effect as is_side_effect_node, meta_value
from kvpass.report import Report

NAME = "store_loop"

_TRANSPOSES = {"transpose", "swapaxes", "swapdims"}
_TORCH_TRANSPOSES = {torch.transpose, torch.swapaxes, torch.swapdims}
_NOOP_METHODS = {"contiguous"}


@dataclasses.dataclass
class _View:
    """A basic-indexing view of a base tensor: ``axes`` labels the view's dims by the base dim they come from;
    ``ranges[d] = (start, length)`` restricts base dim ``d``; ``dropped`` are base dims indexed by an int."""

    base: torch.fx.Node
    axes: tuple
    ranges: dict
    dropped: frozenset
    nodes: tuple  # the view nodes, outermost first


def _shape(node):
    v = meta_value(node)
    if not isinstance(v, torch.Tensor) or not all(isinstance(s, int) for s in v.shape):
        return None
    return tuple(v.shape)


def _parse_view(node, rank: int):
    """Interpret ``node`` as a view of a rank-``rank`` base; the deepest interpretable base wins."""
    inner = None
    if isinstance(node, torch.fx.Node):
        src = _view_source(node)
        if src is not None:
            inner = _parse_view(src, rank)
            if inner is not None:
                out = _apply_view(node, inner)
                if out is not None:
                    return out
    shape = _shape(node)
    if shape is None or len(shape) != rank:
        return None
    return _View(node, tuple(range(rank)), {}, frozenset(), ())


def _view_source(node: torch.fx.Node):
    if node.op == "call_function" and node.target is operator.getitem and node.args:
        return node.args[0] if isinstance(node.args[0], torch.fx.Node) else None
    if node.op == "call_function" and node.target in _TORCH_TRANSPOSES | {torch.permute}:
        return node.args[0] if isinstance(node.args[0], torch.fx.Node) else None
    if node.op == "call_method" and node.target in _TRANSPOSES | _NOOP_METHODS | {"permute"}:
        return node.args[0] if isinstance(node.args[0], torch.fx.Node) else None
    return None


def _apply_view(node: torch.fx.Node, v: _View):
    """``v`` after the view op ``node`` (its first argument is ``v``), or ``None`` if not a basic view."""
    if node.op == "call_function" and node.target is operator.getitem:
        out = _index(v, node.args[1])
    else:
        name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
        out = _reorder(v, name, node.args[1:] + tuple(node.kwargs.values()))
    return None if out is None else dataclasses.replace(out, nodes=(node,) + v.nodes)


def _index(v: _View, index):
    """``v[index]`` for a constant basic index (ints, slices with int bounds, one Ellipsis)."""
    base_shape = _shape(v.base)
    axes, ranges, dropped = list(v.axes), dict(v.ranges), set(v.dropped)
    index = index if isinstance(index, tuple) else (index,)
    if sum(i is Ellipsis for i in index) > 1:
        return None
    if Ellipsis in index:
        k = index.index(Ellipsis)
        index = index[:k] + (slice(None),) * (len(axes) - len(index) + 1) + index[k + 1:]
    if len(index) > len(axes):
        return None
    kept = []
    for d, item in zip(axes, index):
        start, length = ranges.get(d, (0, base_shape[d]))
        if isinstance(item, bool) or not isinstance(item, (int, slice)):
            return None  # tensors, None (new axis), nodes (symbolic bounds): not a constant basic index
        if isinstance(item, int):
            if not -length <= item < length:
                return None
            ranges[d] = (start + item % length, 1)
            dropped.add(d)
            continue
        if not all(x is None or (isinstance(x, int) and not isinstance(x, bool))
                   for x in (item.start, item.stop, item.step)):
            return None
        a, b, step = item.indices(length)
        if step != 1 or b <= a:
            return None
        ranges[d] = (start + a, b - a)
        kept.append(d)
    return _View(v.base, tuple(kept + axes[len(index):]), ranges, frozenset(dropped), v.nodes)


def _reorder(v: _View, name: str, args: tuple):
    """``v`` after a ``transpose``/``swapaxes``/``permute`` (or a value-preserving ``contiguous``)."""
    axes = list(v.axes)
    if name in _NOOP_METHODS:
        return None if args else v
    if not all(isinstance(a, int) and not isinstance(a, bool) for a in
               (args[0] if name == "permute" and len(args) == 1 and isinstance(args[0], (tuple, list)) else args)):
        return None
    if name in _TRANSPOSES or name == "transpose":
        if len(args) != 2:
            return None
        i, j = (a % len(axes) for a in args)
        axes[i], axes[j] = axes[j], axes[i]
    elif name == "permute":
        dims = args[0] if len(args) == 1 and isinstance(args[0], (tuple, list)) else args
        if sorted(d % len(axes) for d in dims) != list(range(len(axes))):
            return None
        axes = [axes[d % len(axes)] for d in dims]
    else:
        return None
    return dataclasses.replace(v, axes=tuple(axes))


@dataclasses.dataclass
class _Write:
    node: torch.fx.Node
    cache: torch.fx.Node
    states: torch.fx.Node
    layout: str
    chunk: tuple  # (src, block, offset, length)
    nodes: tuple  # the write and the view nodes only it uses


def _write(node: torch.fx.Node):
    """A write of a states slice into one block of a paged cache, or ``None``."""
    if node.op == "call_function" and node.target is operator.setitem and len(node.args) == 3:
        dst, value = _parse_view(node.args[0], 4), node.args[2]
        if dst is not None:
            dst = _index(dst, node.args[1])
    elif node.op == "call_method" and node.target == "copy_" and len(node.args) == 2 and not node.kwargs:
        dst, value = _parse_view(node.args[0], 4), node.args[1]
    else:
        return None
    if dst is None or not isinstance(value, torch.fx.Node):
        return None
    src = _parse_view(value, 3)
    if src is None or src.base is dst.base:
        return None
    cache_shape, states_shape = _shape(dst.base), _shape(src.base)
    # the block axis must be indexed by an int; the token axis (states dim 0) lands on cache dim 1 or 2
    if 0 not in dst.dropped or 0 in dst.axes:
        return None
    # align the remaining axes positionally: states dims (token, head, dim) -> cache dims
    if len(dst.axes) != len(src.axes):
        return None
    mapping = dict(zip(src.axes, dst.axes))
    if 0 in src.dropped:  # a single token: its cache axis is the one the destination indexed by an int
        lost = sorted(dst.dropped - {0})
        if len(lost) != 1:
            return None
        mapping[0] = lost[0]
    elif len(dst.dropped) != 1:
        return None
    if sorted(mapping) != [0, 1, 2] or mapping[2] != 3 or {mapping[0], mapping[1]} != {1, 2}:
        return None
    layout = "HND" if mapping[1] == 1 else "NHD"
    heads, block_size = (cache_shape[1], cache_shape[2]) if layout == "HND" else (cache_shape[2], cache_shape[1])
    if states_shape[1] != heads or states_shape[2] != cache_shape[3]:
        return None
    for d, size in ((1, states_shape[1]), (2, states_shape[2])):  # heads and head_dim whole on the states side
        if src.ranges.get(d, (0, size)) != (0, size):
            return None
    head_axis = mapping[1]
    whole_dim = (0, cache_shape[3])
    if dst.ranges.get(head_axis, (0, heads)) != (0, heads) or dst.ranges.get(3, whole_dim) != whole_dim:
        return None
    s, n = src.ranges.get(0, (0, states_shape[0]))
    off, m = dst.ranges.get(mapping[0], (0, block_size))
    block, _ = dst.ranges[0]
    if n != m or off + n > block_size:
        return None
    nodes = (node,) + tuple(x for x in dst.nodes + src.nodes if len(x.users) <= 1)
    return _Write(node, dst.base, src.base, layout, (s, block, off, n), nodes)


def _storage(node):
    v = meta_value(node)
    if isinstance(v, torch.Tensor):
        try:
            return StorageWeakRef(v.untyped_storage()).cdata
        except Exception:
            return "unknown"
    if isinstance(node, torch.fx.Node) and v is None and node.op != "get_attr":
        return "unknown"
    return None


class StoreLoop:
    """See the module docstring."""

    name = NAME
    level = "torch"  # runs on the Dynamo graph, before functionalization (see the module docstring)

    def apply(self, gm: torch.fx.GraphModule, report: Report) -> int:
        graph = gm.graph
        writes = [w for w in map(_write, graph.nodes) if w is not None]
        groups: dict[tuple, list] = {}
        for w in writes:
            groups.setdefault((w.cache, w.states, w.layout), []).append(w)
        safe = []
        for group in groups.values():
            if len(group) < 2:
                continue  # a single slice write is not a loop
            why = _group_problem(group) or _region_problem(graph, [group])
            if why:
                report.add_skip(NAME, group[0].node, why)
            else:
                safe.append(group)
        if not safe:
            return 0
        ops = getattr(torch.ops, "kvpass", None)
        single, pair = getattr(ops, "store_paged_single", None), getattr(ops, "store_paged_kv", None)
        if single is None or pair is None:
            for group in safe:
                report.add_skip(NAME, group[0].node, "torch.ops.kvpass store ops are not registered (import kvpass)")
            return 0
        count = 0
        while safe:
            group = safe.pop(0)
            partner = next((g for g in safe if _pairs_with(group, g) and not _region_problem(graph, [group, g])),
                           None)
            if partner is not None:  # a K/V loop: one store_paged_kv for both caches
                safe.remove(partner)
                _replace(gm, [group, partner], pair.default)
                nodes = [w.node for w in group + partner]
                detail = f"{len(nodes)} slice writes -> store_paged_kv(layout={group[0].layout!r})"
            else:
                _replace(gm, [group], single.default)
                nodes = [w.node for w in group]
                detail = f"{len(nodes)} slice writes -> store_paged_single(layout={group[0].layout!r})"
            report.add_match(NAME, nodes, anchor=group[0].node, detail=detail)
            count += 1
        return count


def _group_problem(group) -> str | None:
    """Why one group's writes cannot become one op (value facts), or ``None``."""
    cache_val, states_val = meta_value(group[0].cache), meta_value(group[0].states)
    if cache_val.dtype != states_val.dtype:
        return f"dtype change: the writes cast {states_val.dtype} states into a {cache_val.dtype} cache"
    if cache_val.device != states_val.device:
        return f"device change: {states_val.device} states written into a {cache_val.device} cache"
    if any(len(w.node.users) for w in group):
        return "the result of a write is used"
    slots = set()
    for w in group:
        _, blk, off, n = w.chunk
        for o in range(off, off + n):
            if (blk, o) in slots:
                return f"writes overlap at block {blk} offset {o}: their order matters"
            slots.add((blk, o))
    if sum(w.chunk[3] for w in group) > states_val.shape[0]:
        return "the loop stores more tokens than the states hold (a token stored twice)"
    cache_mem, states_mem = _storage(group[0].cache), _storage(group[0].states)
    if cache_mem in (None, "unknown") or states_mem in (None, "unknown"):
        return "no traced value for the cache or the states"
    if cache_mem == states_mem:
        return "the states share memory with the cache: the writes read what earlier writes wrote"
    return None


def _region_problem(graph, groups) -> str | None:
    """Why the writes of ``groups`` cannot all move to the last one's position: a node between the first and
    the last write (other than the groups' own) that touches a cache's memory or may write a states' memory."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    nodes = [w.node for g in groups for w in g]
    first, last = min(order[n] for n in nodes), max(order[n] for n in nodes)
    own = {n for g in groups for w in g for n in w.nodes}
    caches = {_storage(g[0].cache) for g in groups}
    states = {_storage(g[0].states) for g in groups}
    for node in list(graph.nodes)[first + 1:last]:
        if node in own:
            continue
        mems = {_storage(a) for a in node.all_input_nodes}
        if mems & caches or "unknown" in mems:
            return f"{node.name} uses the cache's memory between the loop's writes"
        if mems & states and is_side_effect_node(node):
            return f"{node.name} may write the states between the loop's writes"
    return None


def _pairs_with(a, b) -> bool:
    """Two groups a ``store_paged_kv`` can do at once: the same chunks and layout into two distinct caches."""
    if [w.chunk for w in a] != [w.chunk for w in b] or a[0].layout != b[0].layout:
        return False
    ka, kb = meta_value(a[0].states), meta_value(b[0].states)
    ca, cb = meta_value(a[0].cache), meta_value(b[0].cache)
    caches = {_storage(a[0].cache), _storage(b[0].cache)}
    return (len(caches) == 2 and not caches & {_storage(a[0].states), _storage(b[0].states)}
            and ka.shape[:2] == kb.shape[:2] and ca.shape[:3] == cb.shape[:3] and ka.device == kb.device)


def _replace(gm, groups, op) -> None:
    """Insert the store op (its chunk table built in the graph from constants) at the last write of ``groups``;
    erase the writes. The table is a ``torch.tensor`` call, not a new buffer: Dynamo graphs carry a source for
    every attribute, and AOTAutograd rejects attributes without one."""
    graph = gm.graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    group = groups[0]
    device = meta_value(group[0].states).device
    rows = [list(w.chunk) for w in group]
    last = max((w.node for g in groups for w in g), key=order.__getitem__)
    states = [g[0].states for g in groups]
    caches = [g[0].cache for g in groups]
    with graph.inserting_before(last):
        table = graph.call_function(torch.tensor, (rows,), {"dtype": torch.int32, "device": device})
        call = graph.call_function(op, (*states, *caches, None, None, None, table), {"layout": group[0].layout})
    for new in (table, call):
        if "stack_trace" in group[0].node.meta:
            new.meta["stack_trace"] = group[0].node.meta["stack_trace"]
    fake_mode = getattr(meta_value(group[0].states), "fake_mode", None)
    if fake_mode is not None:
        with fake_mode:
            table.meta["example_value"] = torch.tensor(rows, dtype=torch.int32, device=device)
    for g in groups:
        for w in g:
            graph.erase_node(w.node)


PATTERN = StoreLoop()
