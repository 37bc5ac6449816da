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
from kvpass.report import Match, Report
from kvpass.errors import source_line_of_trace
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


def _cancel(node: torch.fx.Node):
    """The value ``node`` (a ``slice`` of a ``constant_pad_nd``) equals, or ``None`` when a side condition fails."""
    pad = node.args[0]
    x = pad.args[0]
    xv, pv = meta_value(x), meta_value(pad)
    if not isinstance(xv, torch.Tensor) or not isinstance(pv, torch.Tensor):
        return None
    d, a, b, step = norm_slice(node, pv.shape)
    if a is None or step != 1:
        return None
    rows = _pads(pad, pv.dim())
    if any(isinstance(v, int) and v < 0 for row in rows for v in row):
        return None  # a negative pad crops
    if any(row != (0, 0) for i, row in enumerate(rows) if i != d):
        return None
    before = rows[d][0]
    em = Emitter(node.graph, node)
    end = em.add(before, xv.shape[d])
    if not (known_le(before, a) and known_le(b, end)):
        em.discard()
        return None
    if known_eq(a, before) and known_eq(b, end):
        em.discard()
        return x
    return em.call(aten.slice.Tensor, x, d, em.sub(a, before), em.sub(b, before))


def _patterns():
    """``slice(constant_pad_nd(x, pad[, value]), dim[, start[, end[, step]]])`` in every arity ATen graphs use."""
    from torch._inductor.pattern_matcher import MULTIPLE, CallFunction, KeywordArg

    for pad_args in (2, 3):
        pad = CallFunction(aten.constant_pad_nd.default, KeywordArg("x"), KeywordArg("pad"),
                           *([KeywordArg("value")] if pad_args == 3 else []), _users=MULTIPLE)
        for n in range(1, 5):
            yield CallFunction(aten.slice.Tensor, pad, *[KeywordArg(f"s{i}") for i in range(n)])


class PadSlice:
    """See the module docstring. A fixed shape: matched with ``torch._inductor.pattern_matcher``."""

    name = NAME

    def __init__(self):
        self._pass = None
        self._found: list = []

    def _matcher(self):
        if self._pass is None:
            from torch._inductor.pattern_matcher import PatternMatcherPass, register_graph_pattern

            self._pass = PatternMatcherPass(pass_name="kvpass_pad_slice")

            def handler(match, **_kwargs):
                node = match.output_node()
                value = _cancel(node)
                if value is None:
                    return
                self._found.append((node.name, node.args[0].name, node.meta.get("stack_trace")))
                node.replace_all_uses_with(value)
                node.graph.erase_node(node)

            for pattern in _patterns():
                register_graph_pattern(pattern, pass_dict=self._pass)(handler)
        return self._pass

    def apply(self, gm: torch.fx.GraphModule, report: Report) -> int:
        self._found = []
        self._matcher().apply(gm)
        for read, pad, trace in self._found:
            report.matches.append(Match(NAME, [read, pad], source_line_of_trace(trace)))
        return len(self._found)


PATTERN = PadSlice()
