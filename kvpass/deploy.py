"""The last steps of ``kvpass.export(..., cache="outputs")``: a program other runtimes take as it is.

``torch.onnx.export``, ExecuTorch's ``to_edge`` and IREE's importer each want a *functional* ATen program over
tensors: no in-place op (IREE rejects the ``copy_`` of a non-functional program, ``torch.onnx`` drops input
mutations), no decomposable composite left (``torch.onnx`` fails on a 3-D SDPA), and no ``sym_max``/``sym_min``
(ExecuTorch's verifier and IREE's importer reject them). :func:`finish_deployable` brings the exported step there
and refuses to return a program that is not.
"""

from __future__ import annotations

import torch
import torch.fx

from .aliasing import writes_an_argument

__all__ = ["finish_deployable", "mutating_nodes", "sym_minmax_nodes", "explain_asserts", "DeployInterpreter"]

_SYM_MINMAX = (torch.sym_max, torch.sym_min)
aten = torch.ops.aten


def _known(cond) -> bool:
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    return bool(statically_known_true(cond))


class DeployInterpreter(torch.fx.Interpreter):
    """Runs kvpass's rewritten step while ``torch.export`` traces it for ``cache="outputs"``, with two
    substitutions that keep every value and avoid the layout checks the stock ops make on a strided window of a
    cache (``buf[:, pos:pos + T]``). Those checks (is the window dense?) guard on the token count ``T`` and
    would make ``torch.export`` refuse ``T = 1`` in a program that also takes a prefill. Both apply only where
    the side conditions are proven by the shape environment (``statically_known_true``, which includes the
    asserts already placed on the position); elsewhere the op runs as it is.

    - ``copy(a, b) -> contiguous(b)``: the functional ``copy`` returns ``b``'s values in ``a``'s shape and dtype.
      Side conditions: ``a`` and ``b`` have the same dtype, device and sizes (no broadcast, no cast).
    - ``slice_scatter(x, src, d, start, end) -> where(inside, index_select(src, d, rel'), x)`` (step 1), with
      ``i = arange(n)`` along ``d`` (``n = x.shape[d]``), ``rel = i - start``, ``inside = 0 <= rel < end - start``
      (broadcast along ``d``) and ``rel' = where(inside, rel, 0)``: both give ``x`` with positions
      ``[start, end)`` of dim ``d`` replaced by ``src`` (``where`` and ``index_select`` copy values, so the result
      is bit-identical). Side conditions: ``0 <= start <= end <= n`` (no clamping of the slice), ``end - start >= 1``
      (``rel' = 0`` is a valid index of ``src``), ``src`` has the window's sizes (``end - start`` along ``d``,
      ``x``'s sizes elsewhere) and ``x``'s dtype and device. Every intermediate has ``x``'s or ``src``'s sizes:
      no tensor is ``start`` or ``n - end`` long. Those lengths may be 0 (an empty cache, a full one) and, as
      sizes of a tensor, give it a contiguous stride ``Max(1, u0)`` that ExecuTorch's ``to_executorch()`` cannot
      order (``exir.tensor.dim_order_from_stride`` guards on ``8*Max(1, u0) < 8`` for the position ``u0``).
    - ``cat([x.narrow(d, 0, s), src], d) -> slice_scatter(x, src, d, s, s + T).narrow(d, 0, s + T)``
      (``T = src.shape[d]``, the ``slice_scatter`` substituted as above): the history read of an eliminated
      host round trip (``cat([buf[:, 0:pos], k], 1)``). Both are ``x``'s first ``s`` entries along ``d`` followed
      by ``src``. Side conditions: the first piece is a ``slice(x, d, 0 or None, s)`` the trace made (step 1),
      ``0 <= s``, ``s + T <= n``, ``T >= 1``, and ``src`` has ``x``'s sizes off ``d``, dtype and device. It keeps
      the ``s``-long piece (``s`` = the position, 0 for an empty cache) out of the program for the same reason;
      the unused slice is dropped as dead code.
    - ``prims.iota(n, start=s, step=k, dtype, device) -> arange(s, s + n * k, k, dtype, device)``: the same
      integers (``iota`` takes integer dtypes only, so there is no rounding). kvpass's by-position read
      (``kvpass.rules.select_by_position``) emits ``iota`` because Inductor's post-grad graph takes no ``arange``;
      ONNX and the other runtimes have no ``iota``. Side condition: an integer dtype.
    - ``op.Scalar(t, i) -> op.Tensor(t, scalar_tensor(i))`` for a symbolic int ``i`` (a position): the same
      values (a 0-dim int64 operand promotes like the int scalar); torch.onnx cannot convert a ``.Scalar``
      overload whose scalar is a symbol. Side condition: ``op`` has a ``.Tensor`` overload.
    - ``sym_max(a, b) -> b`` and ``sym_min(a, b) -> a`` where ``a <= b`` (symmetrically ``sym_max(a, b) -> a``,
      ``sym_min(a, b) -> b`` where ``b <= a``): the same integer, by the definition of max and min. A cache's mask
      size (transformers' ``max(length - window + 1, 0)``) traces as ``sym_max``, which ExecuTorch and IREE
      reject. Side condition: the order is proven by the shape environment (the program's asserts on the
      position and the traced guards included); where neither order is proven the ``sym_max`` stays and
      :func:`finish_deployable` refuses the program, naming its source line.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._prefixes: dict[int, tuple] = {}  # id(x[..., 0:end]) -> (that tensor, x, dim, end)

    def call_function(self, target, args, kwargs):
        if target is aten.copy.default and not kwargs and len(args) == 2:
            a, b = args
            if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype and \
                    a.device == b.device and a.dim() == b.dim() and \
                    all(_known(x == y) for x, y in zip(a.shape, b.shape)):
                return b.clone(memory_format=torch.contiguous_format)
        if target in _SYM_MINMAX and not kwargs and len(args) == 2:
            out = _ordered_min_max(target, *args)
            if out is not None:
                return out
        if target is torch.ops.prims.iota.default and not kwargs.get("dtype", torch.int64).is_floating_point:
            (n,) = args
            start, step = kwargs.get("start", 0), kwargs.get("step", 1)
            return torch.arange(start, start + n * step, step, dtype=kwargs.get("dtype", torch.int64),
                                device=kwargs.get("device"))
        if getattr(target, "_overloadname", None) == "Scalar" and len(args) == 2 and not kwargs and \
                isinstance(args[0], torch.Tensor) and isinstance(args[1], torch.SymInt) and \
                hasattr(target.overloadpacket, "Tensor"):
            t, i = args
            return target.overloadpacket.Tensor(t, torch.scalar_tensor(i, dtype=torch.int64, device=t.device))
        if target is aten.slice_scatter.default and not kwargs:
            out = _slice_scatter_by_select(*args)
            if out is not None:
                return out
        if target is aten.cat.default and not kwargs:
            out = self._prefix_cat(*args)
            if out is not None:
                return out
        out = super().call_function(target, args, kwargs)
        if target is aten.slice.Tensor and not kwargs and isinstance(out, torch.Tensor):
            self._remember_prefix(out, *args)
        return out

    def _remember_prefix(self, out, x, dim=0, start=None, end=None, step=1):
        """Note ``out = x[..., 0:end]`` along ``dim`` (for :meth:`_prefix_cat`); the entry keeps ``out`` alive, so
        its ``id`` is not reused."""
        if (start is None or (isinstance(start, int) and start == 0)) and step == 1 and end is not None:
            self._prefixes[id(out)] = (out, x, dim % x.dim(), end)

    def _prefix_cat(self, tensors, dim=0):
        if not isinstance(tensors, (list, tuple)) or len(tensors) != 2:
            return None
        head, src = tensors
        found = self._prefixes.get(id(head))
        if found is None or found[0] is not head or not isinstance(src, torch.Tensor) or src.dim() != head.dim():
            return None
        _, x, d, s = found
        if dim % head.dim() != d:
            return None
        t = src.shape[d]  # the side conditions (s >= 0, t >= 1, s + t <= n, sizes, dtype, device) are the callee's
        out = _slice_scatter_by_select(x, src, d, s, s + t)
        return None if out is None else out.narrow(d, 0, s + t)


def _ordered_min_max(target, a, b):
    """``sym_max(a, b)``/``sym_min(a, b)`` as the operand the shape environment proves it is, or None."""
    if _known(a <= b):
        low, high = a, b
    elif _known(b <= a):
        low, high = b, a
    else:
        return None
    return high if target is torch.sym_max else low


def _slice_scatter_by_select(x, src, dim=0, start=None, end=None, step=1):
    """``slice_scatter(x, src, dim, start, end)`` through ``where``/``index_select`` (see
    :class:`DeployInterpreter`), or None where a side condition is not proven."""
    if step != 1 or not isinstance(x, torch.Tensor) or not isinstance(src, torch.Tensor) or x.dim() != src.dim():
        return None
    if src.dtype != x.dtype or src.device != x.device:
        return None
    dim %= x.dim()
    n = x.shape[dim]
    start = 0 if start is None else start
    end = n if end is None else end
    if not (_known(start >= 0) and _known(start <= end) and _known(end <= n) and _known(end - start >= 1)):
        return None
    if not all(_known(s == (end - start if d == dim else x.shape[d])) for d, s in enumerate(src.shape)):
        return None

    def scalar(v):  # a symbolic bound as a 0-dim tensor (torch.onnx cannot convert a .Scalar op on a symbol)
        if isinstance(v, torch.SymInt) and v.node.maybe_as_int() is None:
            return torch.scalar_tensor(v, dtype=torch.int64, device=x.device)
        return int(v)

    rel = torch.arange(n, device=x.device) - scalar(start)
    inside = (rel >= 0) & (rel < scalar(end - start))
    picked = src.index_select(dim, torch.where(inside, rel, torch.zeros_like(rel)))
    return torch.where(inside.view([n if d == dim else 1 for d in range(x.dim())]), picked, x)


def sym_minmax_nodes(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    """The ``sym_max``/``sym_min`` calls of ``gm``."""
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in _SYM_MINMAX]


def mutating_nodes(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    """The nodes of ``gm`` that write into one of their arguments (an ATen op whose schema marks an argument
    as written, ``copy_``, ``index_put_`` ...)."""
    return [n for n in gm.graph.nodes if writes_an_argument(n)]


def _symbol_names(ep: torch.export.ExportedProgram) -> dict[str, str]:
    """``{"s27": "input_ids.shape[1]", "u0": "position"}``: each symbol of the program by the user input it
    comes from (a dynamic dim of an input, or the value ``.item()`` reads out of an input)."""
    import sympy

    users = {s.arg.name for s in ep.graph_signature.input_specs if s.kind.name == "USER_INPUT"}
    names: dict[str, str] = {}
    for n in ep.graph.nodes:
        val = n.meta.get("val")
        if n.op == "placeholder" and n.name in users and isinstance(val, torch.Tensor):
            for d, size in enumerate(val.shape):
                if isinstance(size, torch.SymInt) and isinstance(size.node.expr, sympy.Symbol):
                    names.setdefault(str(size.node.expr), f"{n.name}.shape[{d}]")
        elif n.target in (aten._local_scalar_dense.default, aten.item.default) and isinstance(val, torch.SymInt) and \
                isinstance(val.node.expr, sympy.Symbol):
            src = n.args[0]
            while isinstance(src, torch.fx.Node) and src.op == "call_function" and src.args:
                src = src.args[0]  # through the views (reshape, select) down to the input
            if isinstance(src, torch.fx.Node) and src.name in users:
                names.setdefault(str(val.node.expr), src.name)
    return names


def explain_asserts(ep: torch.export.ExportedProgram) -> None:
    """Rewrite the messages of the program's runtime asserts in the user's terms, in place: ``Runtime assertion
    failed for expression u0 + s27 <= 64 on node 'le_1'`` becomes ``kvpass: position out of range: the step
    requires position + input_ids.shape[1] <= 64 (le_1)``. The asserts themselves are unchanged."""
    import re

    names = _symbol_names(ep)
    if not names:
        return
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, sorted(names, key=len, reverse=True))) + r")\b")
    changed = False
    for n in ep.graph.nodes:
        if n.target is not torch.ops.aten._assert_scalar.default or len(n.args) < 2 or not isinstance(n.args[1], str):
            continue
        m = re.fullmatch(r"Runtime assertion failed for expression (.*) on node '(.*)'", n.args[1])
        if not m:
            continue
        expr = pattern.sub(lambda x: names[x.group(1)], m.group(1))
        if expr == m.group(1):
            continue
        what = [v for k, v in names.items() if re.search(rf"\b{re.escape(k)}\b", m.group(1)) and "." not in v]
        subject = f"{' and '.join(what)} out of range" if what else "input out of range"
        n.args = (n.args[0], f"kvpass: {subject}: the step requires {expr} ({m.group(2)})") + tuple(n.args[2:])
        changed = True
    if changed:
        ep.graph_module.recompile()


def finish_deployable(ep: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """Decompose ``ep`` to functional core ATen (``run_decompositions()``), word its asserts in the user's terms
    (:func:`explain_asserts`) and check the result: no op writes into an argument, no ``sym_max``/``sym_min``,
    no input is mutated. (kvpass.export feeds every position of the model the same value, so a follower's
    ``max(owner.pos, self.pos)`` is ``Max(x, x) = x`` for the shape environment and no ``sym_max`` is traced;
    one that is left compares values the program cannot order, and the export is refused.) Raises :class:`kvpass.faithful_export.ExportCaptureError` (naming the node and its source line)
    otherwise."""
    from .errors import user_source_line
    from .faithful_export import ExportCaptureError

    ep = ep.run_decompositions()
    explain_asserts(ep)
    bad = [(n, "writes into its argument") for n in mutating_nodes(ep.graph_module)]
    bad += [(n, "compares sizes the program cannot order; ExecuTorch and IREE reject sym_max/sym_min") for n in
            sym_minmax_nodes(ep.graph_module)]
    mutated = [s for s in ep.graph_signature.output_specs if s.kind.name in ("BUFFER_MUTATION", "USER_INPUT_MUTATION")]
    if bad or mutated:
        what = [f"{n.format_node()} ({why}; {user_source_line(n)})" for n, why in bad[:3]]
        what += [f"output {s.arg.name} mutates {s.target}" for s in mutated[:3]]
        raise ExportCaptureError("kvpass.export(cache='outputs'): the program is not functional: " + "; ".join(what))
    return ep
