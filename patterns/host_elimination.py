"""host_elimination: what is computed from host copies of device tensors is computed on the device instead, and
the copy back to the device collapses.

The idiom families, as user code (on a GPU; on a CPU-only machine these hops are no-ops and the functional IR
has nothing to eliminate)::

    back = torch.from_numpy(k.detach().cpu().numpy()).to(k.device)              # a pure host hop
    padded = np.pad(k.detach().cpu().numpy(), pad); back = torch.as_tensor(padded, device=dev)
    q = np.clip(np.round(k.cpu().numpy() / s), -128, 127).astype(np.int8)       # host-side quantization
    s = np.abs(a).max(axis=-1, keepdims=True) / 127.0                            # ... with an absmax scale
    hist = torch.from_numpy(np.concatenate([old, k.cpu().numpy()], 1)).to(dev)   # history grown on the host

Graph before (functional ATen IR)::

    _to_copy = aten._to_copy(k, device=cpu)
    constant_pad_nd = aten.constant_pad_nd(_to_copy, [0, 8], 0.0)
    _to_copy_1 = aten._to_copy(constant_pad_nd, device=cuda:0)

Graph after::

    constant_pad_nd_1 = aten.constant_pad_nd(k, [0, 8], 0.0)        # uses of _to_copy_1 use this

The equation, for a transfer ``to(y, D)`` to device ``D`` of a host value ``y``::

    to(to(x, cpu), D)        = x                        if x is on D (a dtype change stays: to(x, dtype))
    to(f(y1, ..., yn), D)    = f(to(y1, D), ..., to(yn, D))   for f in the exact ops below
    to(factory(device=cpu), D) = factory(device=D)

applied recursively; what is left of the recursion is a transfer of a value that only lives on the host (a
host buffer's history: the state the program reads), which stays. The rewrite is made only when at least one
device-to-host-to-device round trip disappears.

Side conditions: ``f`` is pure (no mutation, not random) and *exact on every device*: views and layout ops,
``cat``, ``constant_pad_nd``, functional scatters, casts, and elementwise arithmetic that IEEE 754 rounds
correctly everywhere (``+ - * /``, ``round``, ``clamp``, comparisons, ``where``, ``abs``, ``neg``). Reductions
and transcendental functions (their rounding depends on the device's kernels) stop the move, as do
device-dependent ops and anything impure; transfers that also change layout or memory format are left alone.
One reduction is exact: ``amax``/``amin`` of an ``abs`` (a per-token absmax scale, host int8 quantization)
selects one of its inputs, none of them ``-0.0``, and propagates NaN on every device; of any other input the
sign of a zero it returns may depend on the device's reduction order, so it stops the move.

Why it is exact: each op computes the same values from the same inputs on any device (the listed ops are
correctly rounded or pure data movement), and ``to(to(x, cpu), D)`` holds ``x``'s values on ``x``'s device.
"""

from __future__ import annotations

import torch
import torch.fx

from kvpass.aliasing import is_pure, meta_value
from kvpass.report import Report
from kvpass.rules import Emitter

NAME = "host_elimination"
aten = torch.ops.aten

_EXACT = {
    # views and layout
    "view", "_unsafe_view", "reshape", "permute", "transpose", "t", "unsqueeze", "squeeze", "expand", "slice",
    "select", "alias", "clone", "contiguous", "flip", "roll", "unbind", "split", "split_with_sizes", "narrow",
    "cat", "stack", "constant_pad_nd", "slice_scatter", "select_scatter", "copy", "lift_fresh_copy",
    "_to_copy", "index_select", "index",
    # correctly rounded elementwise arithmetic, comparisons, selection
    "add", "sub", "mul", "div", "neg", "abs", "round", "clamp", "clamp_min", "clamp_max", "minimum", "maximum",
    "where", "eq", "ne", "lt", "le", "gt", "ge", "floor", "ceil", "trunc", "sign", "bitwise_and",
    "bitwise_or", "bitwise_not", "logical_and", "logical_or", "logical_not", "reciprocal",
    # factories
    "zeros", "ones", "full", "scalar_tensor", "arange", "iota", "zeros_like", "ones_like", "full_like", "empty",
}
# selecting reductions, exact on every device only over values that hold no -0.0 (an abs): see the docstring
_EXACT_OF_ABS = {"amax", "amin"}


def _exact(node) -> bool:
    """``node`` computes the same values on every device (the module docstring's side conditions)."""
    packet = getattr(node.target, "overloadpacket", None)
    if node.op != "call_function" or packet is None or not is_pure(node):
        return False
    if packet.__name__ in _EXACT:
        return True
    src = node.args[0] if node.args else None
    of_abs = getattr(getattr(src, "target", None), "overloadpacket", None) is aten.abs
    return packet.__name__ in _EXACT_OF_ABS and of_abs


def _transfer(node) -> tuple[torch.device, torch.dtype | None] | None:
    """``(device, dtype)`` if ``node`` is ``_to_copy`` that only moves (and maybe casts) its input."""
    if not (isinstance(node, torch.fx.Node) and node.target is aten._to_copy.default):
        return None
    if set(node.kwargs) - {"device", "dtype", "layout", "pin_memory", "non_blocking"}:
        return None
    if node.kwargs.get("layout") not in (None, torch.strided):
        return None
    out = meta_value(node)
    return (out.device, node.kwargs.get("dtype")) if isinstance(out, torch.Tensor) else None


class HostElimination:
    """See the module docstring."""

    name = NAME

    def apply(self, gm: torch.fx.GraphModule, report: Report) -> int:
        count = 0
        for node in list(gm.graph.nodes):
            if getattr(node, "_erased", False) or not node.users:
                continue
            t = _transfer(node)
            src = node.args[0] if t else None
            if t is None or t[0].type == "cpu" or not isinstance(meta_value(src), torch.Tensor) or \
                    meta_value(src).device.type != "cpu":
                continue
            em = Emitter(gm.graph, node)
            self.removed = 0
            self.memo: dict = {}
            try:
                value = self._on(em, src, t[0])
            except LookupError:
                em.discard()
                continue
            if not self.removed:
                em.discard()
                continue
            if t[1] is not None and meta_value(value).dtype != t[1]:
                value = _cast(em, value, t[1])
            node.replace_all_uses_with(value)
            gm.graph.erase_node(node)
            report.add_match(NAME, [node], anchor=node, detail=f"{self.removed} round trip(s)")
            count += 1
        return count

    def _on(self, em: Emitter, node, device):
        """``node``'s value on ``device``: computed there where the ops allow it and a round trip goes away,
        else ``node`` itself transferred (a host-only value moves once, at its smallest: after its views)."""
        if not isinstance(node, torch.fx.Node):
            return node
        if node in self.memo:
            return self.memo[node][0]
        value = meta_value(node)
        if not isinstance(value, torch.Tensor) or value.device == device:
            return node
        out, trips = self._move(em, node, device)
        self.memo[node] = (out, trips)
        return out

    def _trips(self, a) -> int:
        if isinstance(a, (list, tuple)):
            return sum(self._trips(x) for x in a)
        return self.memo.get(a, (None, 0))[1] if isinstance(a, torch.fx.Node) else 0

    def _move(self, em, node, device):
        t = _transfer(node)
        if t is not None and t[0].type == "cpu":
            src = node.args[0]
            sv = meta_value(src)
            if isinstance(sv, torch.Tensor) and sv.device == device:
                self.removed += 1
                return (src if t[1] is None or t[1] == sv.dtype else _cast(em, src, t[1])), 1
        target = node.target
        if _exact(node):
            mark = len(em.added)
            args = [self._arg(em, a, device) for a in node.args]
            trips = self._trips(list(node.args))
            if trips:
                kwargs = dict(node.kwargs)
                if "device" in kwargs:
                    kwargs["device"] = device
                return em.call(target, *args, **kwargs), trips
            if not any(isinstance(a, torch.fx.Node) for a in node.all_input_nodes) and "device" in node.kwargs:
                kwargs = dict(node.kwargs, device=device)  # a factory: build it on the device
                return em.call(target, *node.args, **kwargs), 0
            em.drop_after(mark)  # nothing of a round trip below: move the result, not its inputs
            self.memo = {k: v for k, v in self.memo.items() if not getattr(v[0], "_erased", False)}
        return _to(em, node, device), 0

    def _arg(self, em, a, device):
        if isinstance(a, (list, tuple)):
            return type(a)(self._arg(em, x, device) for x in a)
        return self._on(em, a, device)


def _to(em, node, device):
    return em.call(aten._to_copy.default, node, device=device)


def _cast(em, node, dtype):
    return em.call(aten._to_copy.default, node, dtype=dtype)


PATTERN = HostElimination()
