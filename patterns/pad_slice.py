"""pad_slice: a slice that removes exactly the padding ``constant_pad_nd`` added is the unpadded tensor.

The idiom families, as user code::

    padded = F.pad(k, (0, D - d))        # or np.pad / np.zeros + assign, written into an owner's wider buffer
    k_back = padded[..., :d]             # ... and sliced back to the follower's head dim on read

Graph before (functional ATen IR; ``scatter_slice`` leaves ``slice(constant_pad_nd(k))`` where a follower's
read of its owner's buffer meets its own padded write)::

    constant_pad_nd = aten.constant_pad_nd(k, [0, 8], 0.0)
    slice_1 = aten.slice(constant_pad_nd, -1, 0, 8)

Graph after::

    (uses of slice_1 use k)

The equation, for padding ``(before_i, after_i)`` on each dim ``i`` and a slice of dim ``d``::

    slice(constant_pad_nd(x, pad, v), d, a, b) = slice(x, d, a - before_d, b - before_d)
        if before_d <= a, b <= before_d + x.size(d), and no other dim is padded
    (and = x when the slice is all of x's extent)

Side conditions: constant pads only (``constant_pad_nd``, not reflect/replicate), non-negative pads (a negative
pad crops), bounds proven for every value of the symbols; a slice that keeps any padded element, or a pad on a
dim the slice leaves alone, is not rewritten.

Why it is exact: inside ``[before_d, before_d + x.size(d))`` the padded tensor holds ``x`` shifted by
``before_d``; the constant only fills the outside. Dtype and device are unchanged by ``constant_pad_nd``.
"""

from __future__ import annotations

import torch
import torch.fx

from kvpass.aliasing import meta_value
from kvpass.engine import Report
from kvpass.rules import Emitter, known_eq, known_le, norm_slice

NAME = "pad_slice"
aten = torch.ops.aten


def _pads(node, rank):
    """``[(before, after)]`` per dim from constant_pad_nd's last-dim-first flat list."""
    flat = list(node.args[1])
    rows = [(0, 0)] * rank
    for k in range(len(flat) // 2):
        rows[rank - 1 - k] = (flat[2 * k], flat[2 * k + 1])
    return rows


class PadSlice:
    """See the module docstring."""

    name = NAME

    def apply(self, gm: torch.fx.GraphModule, report: Report) -> int:
        count = 0
        for node in list(gm.graph.nodes):
            if getattr(node, "_erased", False) or node.op != "call_function" or node.target is not aten.slice.Tensor:
                continue
            pad = node.args[0]
            if not (isinstance(pad, torch.fx.Node) and pad.target is aten.constant_pad_nd.default):
                continue
            x = pad.args[0]
            xv, pv = meta_value(x), meta_value(pad)
            if not isinstance(xv, torch.Tensor) or not isinstance(pv, torch.Tensor):
                continue
            d, a, b, step = norm_slice(node, pv.shape)
            if a is None or step != 1:
                continue
            rows = _pads(pad, pv.dim())
            if any(isinstance(v, int) and v < 0 for row in rows for v in row):
                continue  # a negative pad crops
            if any(row != (0, 0) for i, row in enumerate(rows) if i != d):
                continue
            before = rows[d][0]
            em = Emitter(gm.graph, node)
            end = em.add(before, xv.shape[d])
            if not (known_le(before, a) and known_le(b, end)):
                em.discard()
                continue
            if known_eq(a, before) and known_eq(b, end):
                value = x
            else:
                value = em.call(aten.slice.Tensor, x, d, em.sub(a, before), em.sub(b, before))
            em.discard() if value is x else None
            node.replace_all_uses_with(value)
            gm.graph.erase_node(node)
            report.add_match(NAME, [node, pad], anchor=node)
            count += 1
        return count


PATTERN = PadSlice()
