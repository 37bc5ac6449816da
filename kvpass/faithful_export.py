"""Faithful ``torch.export`` of decoders whose KV caches round-trip through host memory.

The stock front ends bake such a cache (``torch.export(strict=True)``: the numpy buffer becomes a mutated
``CONSTANT_TENSOR``; ``make_fx`` real mode: ``_tensor_constant<N>`` plus a dangling ``detach``), so the exported
decoder attends over the trace-time K/V. :func:`export` takes the other road:

1. **capture with Dynamo** (``torch.compile(fullgraph=True)`` with a capturing backend) under
   :func:`kvpass.tracing.tracing_context`, so ``np.pad`` of a traced array is captured and positions can stay
   symbolic. Dynamo lifts every host buffer the model reads (``torch.from_numpy(self.k_buf)``) as a graph *input*
   and every int it is told to keep symbolic (``positions=``) as a SymInt input. The capture runs nothing: the
   backend never executes the graph and Dynamo's side effects (``self.pos += t``) are not replayed, so the model
   and its caches are left exactly as they were;
2. **rewrite** the graph with :func:`kvpass.rewrite`: a numpy write into a host buffer becomes
   ``operator.setitem(buf, idx, k.detach())`` (an in-place write of the *input*), a read back becomes
   ``cat([buf[:, 0:pos], k], 1)``, host padding becomes ``constant_pad_nd``, a pure hop disappears; the attention's
   K/V are now graph edges from ``k_proj``/``v_proj``;
3. **export** the rewritten graph with ``torch.export.export(strict=False)`` inside a wrapper module that owns
   the model's parameters (same FQNs as ``model.state_dict()``) and the cache state, as registered mutable
   buffers (``cache="buffers"``, the default) or as inputs (``cache="inputs"``). Writes into the cache are then
   buffer (or input) mutations of the program, never constants;
4. **check**: :func:`kvpass.fidelity.require_faithful` runs on the result, so :func:`export` never returns a
   program with K/V baked in (it raises :class:`kvpass.fidelity.FidelityError` instead).

Dynamo's shape guards on the symbolic sizes and positions (for example ``pos + T <= max_len``, the cache's own
overflow check) become runtime assertions of the exported program, so it fails loudly where the traced graph
would not be valid instead of computing something else.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import itertools
import keyword
import re
from typing import Any, Sequence

import torch
import torch.fx
import torch.utils._pytree as pytree

from .errors import KVPassError

__all__ = ["export", "ExportError", "ExportInputError", "ExportCaptureError", "CACHE_MODES", "MODEL_ROOT"]

#: Accepted values of ``export(..., cache=...)``.
CACHE_MODES = ("buffers", "inputs", "outputs")
#: The name the model has in the function Dynamo captures; sources read ``L['kvpass_model'].caches[0].pos``.
MODEL_ROOT = "kvpass_model"


class ExportError(KVPassError):
    """Base class of the errors :func:`export` raises on purpose."""


class ExportInputError(ExportError, ValueError):
    """An argument of :func:`export` is not usable; the message names the argument."""


class ExportCaptureError(ExportError, RuntimeError):
    """Dynamo could not capture the model as one graph, or the captured graph cannot be exported faithfully."""


# --------------------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------------------


def export(model: torch.nn.Module, args: tuple, kwargs: dict | None = None, *, dynamic_shapes=None,
           positions: str | Sequence[str] | None = None, cache: str = "buffers",
           patterns: Sequence | None = None, position_shape: tuple = (1,)) -> torch.export.ExportedProgram:
    """Export one step of ``model`` with ``torch.export`` so that its K/V come from the computation.

    The model's *current* state is the example state: export a freshly reset model to get a prefill from an
    empty cache. Nothing in the model or its caches is changed by the export (the capture never runs the graph).

    Args:
        model: the ``torch.nn.Module`` whose ``forward`` runs one step (prefill or decode) and whose caches live
            on it (host numpy buffers, tensors, plain ints). A ``torch.compile``'d module is unwrapped.
        args: example positional arguments of ``model.forward`` (a tuple).
        kwargs: example keyword arguments of ``model.forward``.
        dynamic_shapes: dynamic dims of the *tensor arguments*, in ``torch.export`` form: a tuple/list aligned
            with ``args``, or a dict keyed by parameter name; each entry ``None`` or ``{dim: Dim(...) |
            Dim.DYNAMIC | Dim.AUTO}`` (or a per-dim list). A dynamic dim needs an example size of at least 2
            (Dynamo specializes 0 and 1) and, on torch 2.13, a ``min`` of 2: ``torch.export`` specializes a
            length that may be 1 (reshape and SDPA of transposed views guard ``size != 1``: depending on the
            example the export fails, or the program refuses one token at run time). So ``{"input_ids": {1:
            Dim("T", min=2, max=max_len - 1)}}`` gives one program for prefill and chunked prefill; export the
            one-token decode step as its own program (a ``(1, 1)`` example, no dynamic dim). With
            ``cache="outputs"`` a ``min`` of 1 works: ``{"input_ids": {1: Dim("T", min=1, max=max_len - 1)}}`` is
            one program for the prefill and every decode step.
        positions: the integer cache state to keep symbolic, making it an ``int`` input of the program (one
            program for every position). Each entry is a regex matched against the attribute path from the
            model (``"caches[0].pos"``, ``r"caches\\[\\d+\\]\\.pos"``); a bare name such as ``"pos"`` matches
            every attribute of that name (``caches[0].pos``, ``caches[3].pos`` ...). ``None`` (default): ints are
            taken from the model's current state and specialized, like Dynamo's first compile (a program for
            exactly that step, e.g. the prefill from an empty cache). Every entry must match an int the step reads.
        cache: ``"buffers"`` (default): every host buffer or unregistered tensor the step reads or writes becomes
            a registered buffer of the program, initialized from the model's current contents and mutated in
            place by the step (the state lives in ``ep.module()`` across calls; as always with torch.export,
            ``ep.module()`` shares its buffers with ``ep.state_dict``, so running it changes what
            ``torch.export.save(ep)`` writes: save first, or ``copy.deepcopy(ep)``). ``"inputs"``: the same tensors
            become inputs that the step mutates in place (the caller owns the cache state; ``ep.module()`` writes
            into the tensors passed). ``"outputs"``: the deployable form (see below): the cache state is an
            input and an output of a functional program, with one position tensor for the model. The model's own
            parameters and registered buffers stay parameters and buffers in every mode.
        patterns: rewrite patterns to run (default: the whole catalogue), as for :func:`kvpass.rewrite`.
        position_shape: with ``cache="outputs"``, the shape of the ``position`` tensor: ``(1,)`` (the default) or
            ``()`` (a 0-dim scalar). The program is exported for that shape (``ep.module()`` of a ``(1,)`` program
            refuses a 0-dim position: torch's input check raises ``IndexError``).

    Returns:
        A ``torch.export.ExportedProgram`` that :func:`kvpass.check` finds faithful. Its contract:

        - call it (``ep.module()(...)``) with the arguments of ``model.forward`` as they were given (positional
          ones positionally, keyword ones by keyword), then **keyword-only**: with ``cache="inputs"`` one tensor
          per cache buffer, named after its attribute path (``caches_0_k_buf`` for ``model.caches[0].k_buf``, a
          ``[kv_heads, max_len, head_dim]`` float tensor like the host buffer), and one ``int`` per symbolic
          position (``caches_0_pos`` for ``model.caches[0].pos``). The graph signature lists the user inputs in
          that order;
        - parameters and registered buffers of ``model`` keep their names (``ep.state_dict`` has the keys of
          ``model.state_dict()``); with ``cache="buffers"`` the cache buffers are ``kv_cache.<name>``
          (``kv_cache.caches_0_k_buf``), mutated in place (``BUFFER_MUTATION`` after ``run_decompositions()``);
        - positions are the values the caches hold *before* the step (0 for a prefill from an empty cache). The
          program writes the new K/V into the cache tensors; it does not return positions: after a step of ``T``
          tokens pass each position the model advances as ``old + T`` (for the reference model, every ``*.pos``);
        - Dynamo's shape guards become runtime checks: a call outside the traced regime (a position that would
          overflow the cache, a position the trace required to be >= 1 ...) fails with an assertion naming the
          input instead of computing something else;
        - the output has the structure of ``model.forward``'s return value.

        With ``cache="outputs"`` the program is ``(*args, position, cache) -> (result, new_position,
        new_cache)``, the form ONNX Runtime, ExecuTorch and IREE take as it is (``torch.onnx.export(ep)``):

        - ``position``: an int64 tensor of shape ``[1]`` (``[]`` with ``position_shape=()``), the value every symbolic position of the model
          holds before the step (they must be equal at export time and advance alike; the program checks both
          while exporting and raises :class:`ExportInputError`/:class:`ExportCaptureError` otherwise);
          ``new_position`` is it advanced by the step (``position + T`` for a step of ``T`` tokens);
        - ``cache``: a dict of tensors keyed by the attribute path of each cache buffer in the model
          (``"caches.0.k_buf"`` for ``model.caches[0].k_buf``); ``new_cache`` has the same keys and holds the
          state after the step. The program's flat inputs are ``*args, position, cache_caches_0_k_buf, ...``
          and its flat outputs ``result leaves, new_position, new cache in the same order``: feed the outputs
          back as the next step's inputs. Zeros and ``position = 0`` are an empty cache;
        - the program is functional core ATen (decompositions run): no in-place op, no input mutation, no
          ``sym_max``/``sym_min``;
        - with a dynamic token length of ``min=1`` (``dynamic_shapes={"input_ids": {1: Dim("T", min=1,
          max=max_len)}}``) the same program runs the prefill and every decode step;
        - the traced guards on positions (``position + T <= max_len``) become asserts of the program whose
          message names ``position`` (``ep.module()`` checks them before the step computes; runtimes without
          asserts, such as ONNX, do not);
        - no tensor of the program is as long as the position (0 for an empty cache), so ExecuTorch's
          ``to_executorch()`` can order every stride. For a ``.pte`` with ``prefill`` and ``decode`` methods, give
          each method its own ``torch.export.load`` copy of the program (``examples/deploy_executorch.py``):
          ExecuTorch 1.5.1's ``to_edge`` fails with ``PendingUnbackedSymbolNotFound`` on one in-memory program
          given twice.

        ``positions`` names the position attributes as for ``cache="inputs"`` (``positions="pos"``); left
        ``None``, it is every int attribute of the model that the step reads and advances (found by a first
        capture with ints specialized, then the model is captured again with those symbolic).

        Model state that the step *replaces* (``self.k = torch.cat(...)`` on an attribute) instead of writing in
        place is not an output: such a program computes its step right but does not carry that state to the next
        call; kvpass warns (:class:`kvpass.KVPassWarning`).

    Raises:
        ExportInputError: an argument is unusable (not a module, bad ``cache``, a ``positions`` entry that
            matches nothing, an unsupported ``dynamic_shapes`` entry ...); the message names it.
        ExportCaptureError: Dynamo cannot capture the step as one graph (a graph break), a position was
            specialized anyway, or ``torch.export`` fails on the rewritten graph.
        kvpass.fidelity.FidelityError: the exported program still has K/V that do not come from the computation.
    """
    from . import engine
    from .fidelity import require_faithful

    model = getattr(model, "_orig_mod", model)  # a torch.compile'd module: export the module itself
    if not isinstance(model, torch.nn.Module):
        raise ExportInputError(f"kvpass.export(model): expected a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(args, tuple):
        if isinstance(args, list):
            args = tuple(args)
        else:
            raise ExportInputError(f"kvpass.export(args): expected a tuple of example arguments, got "
                                   f"{type(args).__name__} (wrap a single tensor as (x,))")
    kwargs = dict(kwargs or {})
    if cache not in CACHE_MODES:
        raise ExportInputError(f"kvpass.export(cache={cache!r}): expected one of {', '.join(map(repr, CACHE_MODES))}")
    if tuple(position_shape) not in ((1,), ()) or (cache != "outputs" and tuple(position_shape) != (1,)):
        raise ExportInputError(f"kvpass.export(position_shape={position_shape!r}): expected (1,) or () with "
                               f"cache='outputs'")
    user_names, user_values = _bind(model, args, kwargs)
    dims = _normalize_dynamic_shapes(dynamic_shapes, user_names, user_values)
    position_patterns = _position_patterns(positions)
    engine.resolve_patterns(patterns)  # an unknown pattern name fails before the (slow) capture

    cap = _capture(model, user_names, user_values, dims, position_patterns)
    positions_found = cache == "outputs" and positions is None
    if positions_found:
        positions = _advanced_ints(cap)
        position_patterns = _position_patterns(positions)
        cap = _capture(model, user_names, user_values, dims, position_patterns)
    _check_positions(cap, positions, position_patterns, cache, found=positions_found)
    outputs = _output_plan(cap, model, user_names, user_values)
    gm, report = engine.rewrite(cap.gm, patterns=patterns)
    _clean_module_paths(gm)
    plan = _plan(cap, model, user_names, cache)
    positions_plan = _positions_plan(cap, plan) if cache == "outputs" else None
    if positions_plan is not None:
        positions_plan.shape = tuple(position_shape)
    step = _Step(model, gm, plan, cap, user_names, cache, outputs, positions_plan, n_positional=len(args))
    ep = _torch_export(step, plan, user_names, user_values, dims, report)
    if cache == "outputs":
        from .deploy import finish_deployable

        ep = finish_deployable(ep)
    require_faithful(ep, what="kvpass.export(model) result")
    return ep


# --------------------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------------------


def _bind(model, args, kwargs) -> tuple[list[str], list[Any]]:
    try:
        sig = inspect.signature(model.forward)
        bound = sig.bind(*args, **kwargs)
    except (TypeError, ValueError) as e:
        raise ExportInputError(f"kvpass.export(args, kwargs): they do not match "
                               f"{type(model).__name__}.forward: {e}") from None
    names, values = [], []
    for name, value in bound.arguments.items():
        kind = sig.parameters[name].kind
        if kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD,
                    inspect.Parameter.POSITIONAL_ONLY):
            raise ExportInputError(f"kvpass.export(args): {type(model).__name__}.forward's parameter {name!r} is "
                                   f"{kind.description}; kvpass.export needs named parameters")
        if name == MODEL_ROOT:
            raise ExportInputError(f"kvpass.export(args): parameter name {name!r} is reserved")
        names.append(name)
        values.append(value)
    return names, values


def _normalize_dynamic_shapes(dynamic_shapes, names, values) -> dict[str, dict[int, Any]]:
    """``{param name: {dim: Dim spec}}`` from a torch.export-style spec of the tensor arguments."""
    if dynamic_shapes is None:
        return {}
    if isinstance(dynamic_shapes, dict):
        unknown = set(dynamic_shapes) - set(names)
        if unknown:
            raise ExportInputError(f"kvpass.export(dynamic_shapes): no argument named {sorted(unknown)[0]!r}; "
                                   f"arguments: {', '.join(names)}")
        per_name = dict(dynamic_shapes)
    elif isinstance(dynamic_shapes, (tuple, list)):
        if len(dynamic_shapes) > len(names):
            raise ExportInputError(f"kvpass.export(dynamic_shapes): {len(dynamic_shapes)} entries for "
                                   f"{len(names)} arguments")
        per_name = dict(zip(names, dynamic_shapes))
    else:
        raise ExportInputError(f"kvpass.export(dynamic_shapes): expected a dict, tuple or list, got "
                               f"{type(dynamic_shapes).__name__}")
    out: dict[str, dict[int, Any]] = {}
    for name, spec in per_name.items():
        if spec is None:
            continue
        value = values[names.index(name)]
        if not isinstance(value, torch.Tensor):
            raise ExportInputError(f"kvpass.export(dynamic_shapes): {name!r} is not a tensor "
                                   f"({type(value).__name__}); only tensor dims can be dynamic here")
        if isinstance(spec, (tuple, list)):
            spec = {d: s for d, s in enumerate(spec) if s is not None}
        if not isinstance(spec, dict):
            raise ExportInputError(f"kvpass.export(dynamic_shapes[{name!r}]): expected a dict {{dim: Dim}} or a "
                                   f"per-dim list, got {type(spec).__name__}")
        dims = {}
        for d, s in spec.items():
            if s is None:
                continue
            if not isinstance(d, int) or not -value.dim() <= d < value.dim():
                raise ExportInputError(f"kvpass.export(dynamic_shapes[{name!r}]): dim {d!r} is not a dim of a "
                                       f"{value.dim()}-d tensor")
            d %= value.dim()
            if value.shape[d] < 2:
                raise ExportInputError(
                    f"kvpass.export(dynamic_shapes[{name!r}]): dim {d} is dynamic but its example size is "
                    f"{value.shape[d]}; Dynamo specializes sizes 0 and 1, give an example of size >= 2 (the "
                    f"program still accepts the Dim's min)")
            dims[d] = s
        if dims:
            out[name] = dims
    return out


def _dim_bounds(spec) -> tuple[int | None, int | None]:
    lo, hi = getattr(spec, "min", None), getattr(spec, "max", None)
    lo = lo if isinstance(lo, int) and lo > 0 else None
    hi = hi if isinstance(hi, int) and hi < (1 << 62) else None
    return lo, hi


def _position_patterns(positions) -> list[tuple[str, re.Pattern]]:
    if positions is None:
        return []
    entries = [positions] if isinstance(positions, str) else list(positions)
    out = []
    for entry in entries:
        if not isinstance(entry, str) or not entry:
            raise ExportInputError(f"kvpass.export(positions): expected attribute names or regexes, got {entry!r}")
        if "," in entry or re.search(r"\s", entry):
            raise ExportInputError(f"kvpass.export(positions): {entry!r}: one pattern per entry, without commas "
                                   f"or spaces")
        alts = [re.escape(entry)]  # the literal path, brackets and all: caches[0].pos
        if re.fullmatch(r"\w+", entry):
            alts.append(rf"(?:.*\.)?{entry}")  # a bare attribute name, anywhere under the model
        else:
            try:
                re.compile(entry)
                alts.append(entry)
            except re.error:
                pass  # not a regex: the literal path only
        compiled = re.compile(rf"L\['{MODEL_ROOT}'\]\.(?:{'|'.join(alts)})$")
        out.append((entry, compiled))
    return out


# --------------------------------------------------------------------------------------------------------
# Capture
# --------------------------------------------------------------------------------------------------------


class _Capture:
    """What the capturing backend saw: the graph, its inputs and their sources, the shape guards."""

    def __init__(self):
        self.gm: torch.fx.GraphModule | None = None
        self.example_inputs: list = []
        self.sources: list[str | None] = []
        self.source_objs: list = []  # Dynamo's Source objects of the placeholders (None where unknown)
        self.stores: dict = {}  # "L['kvpass_model'].caches[0].pos" -> new value (sympy expr or int) the step stores
        self.guards: list = []
        self.replacements: dict = {}
        self.var_to_sources: dict = {}
        self.hints: dict = {}  # sympy symbol -> the example value it had while tracing
        self.guard_sites: list = []  # (guard expr, "file:line in fn (code)" of the user line that made it, or None)
        self.symbols: dict = {}  # sympy symbol -> index of the graph input that carries it
        # position symbols the graph does not read (only guards and stores do: a cache's int counter that only
        # picks a branch): symbol -> source name; filled by _check_positions
        self.unfed: dict = {}
        self.replaced: list[str] = []  # attributes the step assigns a new tensor to (state it replaces)
        self.constants: list[str] = []  # model attributes Dynamo specialized (guarded as constants)
        self.outputs: int = 0
        self.markers: list = []
        self.result: Any = None


_capture_ids = itertools.count()


def _capture_function(names: list[str]):
    """A fresh function ``f(kvpass_model, <names>)`` calling the model by keyword (fresh code: its own Dynamo
    cache and automatic-dynamic state, so exports never see each other)."""
    params = ", ".join([MODEL_ROOT] + names)
    call = ", ".join(f"{n}={n}" for n in names)
    name = f"kvpass_export_step_{next(_capture_ids)}"
    src = f"def {name}({params}):\n    return {MODEL_ROOT}({call})\n"
    ns: dict = {}
    exec(compile(src, f"<kvpass.export {name}>", "exec"), ns)
    return ns[name]


def _capture(model, names, values, dims, position_patterns) -> _Capture:
    from .tracing import tracing_context

    cap = _Capture()

    def backend(gm: torch.fx.GraphModule, example_inputs):
        if cap.gm is not None:
            raise ExportCaptureError("kvpass.export(model): Dynamo produced more than one graph")
        cap.gm = gm
        cap.example_inputs = list(example_inputs)
        phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
        cap.source_objs = [n.meta["grapharg"].source if n.meta.get("grapharg") is not None else None for n in phs]
        cap.sources = [src.name if src is not None else None for src in cap.source_objs]
        fake_mode = torch._guards.detect_fake_mode(example_inputs)
        if fake_mode is None:
            fake_mode = next((n.meta["example_value"].fake_mode for n in phs if isinstance(
                n.meta.get("example_value"), torch._subclasses.FakeTensor)), None)
        import sympy

        for i, n in enumerate(phs):
            v = n.meta.get("example_value")
            if isinstance(v, torch.SymInt) and isinstance(v.node.expr, sympy.Symbol):
                cap.symbols[v.node.expr] = i
        shape_env = getattr(fake_mode, "shape_env", None)
        if shape_env is not None:
            cap.guards = [g.expr for g in shape_env.guards]
            cap.guard_sites = [(g.expr, _user_site(getattr(getattr(g, "sloc", None), "maybe_user_loc", None)))
                               for g in shape_env.guards]
            cap.replacements = dict(shape_env.replacements)
            cap.var_to_sources = {k: [s.name for s in v] for k, v in shape_env.var_to_sources.items()}
            cap.hints = dict(shape_env.backed_var_to_val)
        cap.replaced = _replaced_tensor_attributes()
        cap.stores = _stored_int_attributes()
        cap.constants = _specialized_model_values()
        (out,) = [n for n in gm.graph.nodes if n.op == "output"]
        outs = out.args[0]
        cap.outputs = len(outs) if isinstance(outs, (tuple, list)) else 1
        # Unique markers stand in for the graph's outputs: Dynamo's bytecode builds the model's return value
        # around them, which tells which graph output goes where. The graph itself never runs.
        cap.markers = [torch.empty(0) for _ in range(cap.outputs)]
        markers = tuple(cap.markers) if isinstance(outs, (tuple, list)) else cap.markers[0]
        return lambda *a: markers

    fn = _capture_function(names)
    call_values = []
    for name, value in zip(names, values):
        if name in dims:
            alias = value.view(value.shape)  # mark a view: the caller's tensor stays unmarked
            for d, spec in dims[name].items():
                lo, hi = _dim_bounds(spec)
                torch._dynamo.mark_dynamic(alias, d, min=lo, max=hi)
            value = alias
        call_values.append(value)

    # replay_side_effects=False: the compiled step returns without touching the model (self.pos += t is not
    # replayed); automatic_dynamic_shapes=False: only what the caller asked for is dynamic. (Parameters are
    # graph inputs: torch 2.13 always inlines nn modules, so the wrapper feeds the model's own.)
    dynamo_patch = dict(replay_side_effects=False, side_effect_replay_policy="silent",
                        automatic_dynamic_shapes=False, assume_static_by_default=True)
    sources = ",".join(p.pattern for _, p in position_patterns)
    compiled = torch.compile(fn, backend=backend, fullgraph=True)
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(tracing_context())
            stack.enter_context(torch._dynamo.config.patch(**dynamo_patch))
            stack.enter_context(torch.compiler.config.patch(dynamic_sources=sources))
            stack.enter_context(torch.no_grad())
            cap.result = compiled(model, *call_values)
    except ExportError:
        raise
    except Exception as e:  # noqa: BLE001 - Dynamo's own errors, reported as ours with its first lines
        inner = getattr(e, "inner_exception", None)
        if isinstance(inner, ExportError):
            raise inner from None
        text = "\n".join(str(e).strip().splitlines()[:12])
        if type(e).__name__ == "ConstraintViolationError" and cap.guard_sites:
            text = _explain_violated_dims(cap, names, dims) or text
        raise ExportCaptureError(f"kvpass.export(model): Dynamo failed to capture {type(model).__name__}.forward "
                                 f"as one graph ({type(e).__name__}):\n{text}") from e
    finally:
        torch._dynamo.reset_code(fn.__code__)
    if cap.gm is None:
        raise ExportCaptureError(f"kvpass.export(model): Dynamo produced no graph for {type(model).__name__}.forward "
                                 f"(nothing to export)")
    return cap


def _user_site(loc: str | None) -> str | None:
    """A shape guard's user frame as ``file:line in fn: code`` (torch writes ``code  # file:line in fn``)."""
    if not loc:
        return None
    code, sep, where = loc.rpartition("  # ")
    return f"{where.strip()}: {code.strip()}" if sep else loc.strip()


def _in_user_terms(cap: _Capture, expr) -> str:
    """``expr`` with each symbol written as the source it stands for (``input_ids.shape[1]``, ``pos``)."""
    text = str(expr)
    for sym in sorted(getattr(expr, "free_symbols", ()), key=lambda x: -len(str(x))):
        sources = cap.var_to_sources.get(sym)
        if sources:
            name = re.sub(r"^L\['(\w+)'\]\.size\(\)\[(\d+)\]$", r"\1.shape[\2]", sources[0])
            text = re.sub(rf"\b{re.escape(str(sym))}\b", _rel(name), text)
    return text


def _guard_site(cap: _Capture, symbol) -> str | None:
    """The user line of the traced guard that pinned ``symbol`` to a value (an ``Eq`` guard: ``if pos == 0``),
    else of the first guard on it (``cache_utils.py:570 in update: elif ...``); None where there is none."""
    import sympy

    on_symbol = [(expr, site) for expr, site in cap.guard_sites
                 if site and symbol in getattr(expr, "free_symbols", ())]
    pinned = [site for expr, site in on_symbol if isinstance(expr, sympy.Eq)]
    return (pinned or [site for _, site in on_symbol] or [None])[0]


def _explain_violated_dims(cap: _Capture, names, dims) -> str | None:
    """For a ``ConstraintViolationError``: the traced guards that refuse a bound of a dynamic dim, each with the
    user line that made it (the model's code branches on that size), or None where none is found."""
    from torch.utils._sympy.interp import sympy_interp
    from torch.utils._sympy.reference import PythonReferenceAnalysis

    lines = []
    for name, per_dim in dims.items():
        for d, spec in per_dim.items():
            source = f"L['{name}'].size()[{d}]"
            sym = next((k for k, v in cap.var_to_sources.items() if source in v), None)
            if sym is None:
                continue
            lo, hi = _dim_bounds(spec)
            for expr, site in cap.guard_sites:
                if sym not in getattr(expr, "free_symbols", ()):
                    continue
                for bound in (lo if lo is not None else 0, hi):
                    if bound is None:
                        continue
                    env = {k: v for k, v in cap.hints.items() if k in expr.free_symbols}
                    env[sym] = bound
                    try:
                        ok = sympy_interp(PythonReferenceAnalysis, env, expr)
                    except Exception:  # noqa: BLE001 - a guard we cannot evaluate is not the one we look for
                        continue
                    if ok is False:
                        lines.append(f"the step requires {_in_user_terms(cap, expr)} (false for {name}.shape[{d}] = "
                                     f"{bound}): the model's code branches on that size at {site or '<unknown>'}")
                        break
    if not lines:
        return None
    lines = list(dict.fromkeys(lines))
    hint = "\nnarrow the Dim's range to the branch the example takes, or export one program per branch"
    if any("transformers/cache_utils.py" in line for line in lines):
        hint += ("; for transformers' sliding-window cache layers, kvpass.hf.export_step exports one program for "
                 "every position")
    return "the dynamic dims do not hold over their whole range:\n  " + "\n  ".join(lines[:4]) + hint


def _replaced_tensor_attributes() -> list[str]:
    """Attributes the traced step assigns a tensor to (``self.k = torch.cat(...)``), from Dynamo's side-effect
    record (closure cells the step creates are not state: :func:`kvpass.compat.dynamo_attribute_writes`); best
    effort (``[]`` if this Dynamo keeps it elsewhere)."""
    try:
        from torch._dynamo.variables import TensorVariable

        from .compat import dynamo_attribute_writes

        out = []
        for item, name, value in dynamo_attribute_writes():
            if isinstance(value, TensorVariable):
                source = getattr(item, "source", None)
                base = _rel(source.name) if source is not None else ""
                out.append(f"{base}.{name}" if base else name)
        return out
    except Exception:  # noqa: BLE001 - a Dynamo internal moved: skip the warning, not the export
        return []


def _stored_int_attributes() -> dict:
    """``{source name: new value}`` of the int attributes the traced step assigns (``self.pos += t``), from
    Dynamo's side-effect record: a sympy expression over the graph's symbols, or an int. Best effort (``{}`` if
    this Dynamo keeps it elsewhere; ``cache="outputs"`` then refuses to guess how positions advance)."""
    try:
        from torch._dynamo.variables import ConstantVariable, SymNodeVariable

        from .compat import dynamo_attribute_writes

        out = {}
        for item, name, value in dynamo_attribute_writes():
            source = getattr(item, "source", None)
            if source is None:
                continue
            if isinstance(value, SymNodeVariable) and isinstance(value.sym_num, torch.SymInt):
                out[f"{source.name}.{name}"] = value.sym_num.node.expr
            elif isinstance(value, ConstantVariable) and type(value.value) is int:
                out[f"{source.name}.{name}"] = value.value
        return out
    except Exception:  # noqa: BLE001 - a Dynamo internal moved
        return {}


def _specialized_model_values() -> list[str]:
    """Model attributes the trace read as constants (Dynamo's ``CONSTANT_MATCH``/``EQUALS_MATCH`` guards), for
    error messages; best effort."""
    try:
        ctx = torch._guards.TracingContext.get()
        root = f"L['{MODEL_ROOT}']."
        names = []
        for guard in ctx.guards_context.dynamo_guards:
            name = guard.originating_source.name
            if guard.create_fn_name() in ("CONSTANT_MATCH", "EQUALS_MATCH") and name.startswith(root) and \
                    "._modules" not in name and "hooks" not in name and _rel(name) not in names:
                names.append(_rel(name))
        return names
    except Exception:  # noqa: BLE001
        return []


def _advanced_ints(cap: _Capture) -> list[str]:
    """The model's positions, found in a capture that specialized every int: the int attributes the step reads
    (Dynamo guarded their values) and assigns anew (``self.pos += t``). An attribute the step assigns before
    reading it (``self.step_start = self.pos``) is per-step scratch, not state: it is not guarded."""
    found = [_rel(name) for name, value in cap.stores.items()
             if name.startswith(f"L['{MODEL_ROOT}'].") and _rel(name) in cap.constants]
    if not found:
        raise ExportInputError(
            "kvpass.export(positions): cache='outputs' needs the model's positions as symbolic ints and found no "
            "int attribute that the step reads and advances; pass positions=... naming them (positions='pos')")
    return found


def _check_positions(cap: _Capture, positions, patterns, cache: str, found: bool = False) -> None:
    """Every ``positions`` entry names an int the step reads, kept symbolic. Fills ``cap.unfed``: the positions
    the graph itself does not read (a counter that only picks a branch, ``if self.length >= window``): with
    ``cache="outputs"`` they hold the one position's value, so the guards on them stay checked; with one int input
    per position (``"buffers"``/``"inputs"``) such a guard could not be checked, and the export is refused.
    ``found``: the entries were found by kvpass (``positions=None``), not given by the caller."""
    if not patterns:
        return
    import sympy

    syms = [s for s, v in zip(cap.sources, cap.example_inputs) if isinstance(v, (int, torch.SymInt))
            and not isinstance(v, bool) and s is not None]
    for sym, sources in cap.var_to_sources.items():
        if sym in cap.symbols or isinstance(cap.replacements.get(sym), sympy.Integer):
            continue
        match = [src for src in sources if any(p.match(src) for _, p in patterns)]
        if match:
            cap.unfed[sym] = match[0]
    syms += list(cap.unfed.values())
    for entry, pattern in patterns:
        if not any(pattern.match(s) for s in syms):
            raise ExportInputError(
                f"kvpass.export(positions): {entry!r} matches no integer the step reads from the model "
                f"(symbolic: {', '.join(_rel(s) for s in syms) or 'none'}; read as constants: "
                f"{', '.join(cap.constants[:12]) or 'none'}); positions are attribute paths from the model such "
                f"as 'caches[0].pos', or a bare attribute name such as 'pos'")
    import sympy

    for sym, value in cap.replacements.items():
        if isinstance(value, sympy.Integer):
            srcs = [s for s in cap.var_to_sources.get(sym, []) if any(p.match(s) for _, p in patterns)]
            if srcs:
                how = "kvpass found it as a position (an int the step reads and advances)" if found else \
                    "named by positions="
                raise ExportCaptureError(
                    f"kvpass.export(positions): {_rel(srcs[0])} ({how}) was specialized to {int(value)} while "
                    f"tracing: the model's code compares it with a constant at "
                    f"{_guard_site(cap, sym) or '<unknown>'}; a program for every position cannot take that branch")
    if cache != "outputs":
        for expr, site in cap.guard_sites:
            unfed = set(getattr(expr, "free_symbols", ())) & set(cap.unfed)
            if unfed:
                raise ExportCaptureError(
                    f"kvpass.export(positions): {_rel(cap.unfed[next(iter(unfed))])} is read only by a branch "
                    f"(the step requires {_in_user_terms(cap, expr)} at {site or '<unknown>'}) and never by the "
                    f"graph, so cache={cache!r} has no input to check it on; use cache='outputs' (one position for "
                    f"the model)")


def _clean_module_paths(gm: torch.fx.GraphModule) -> None:
    """Dynamo names modules from the captured function (``L['kvpass_model'].layers.0``); export names them from
    the exported module (``layers.0``), which shares the model's children: strip the root so the exported
    program's ``nn_module_stack`` reads like one ``torch.export`` made."""
    root = f"L['{MODEL_ROOT}']"
    for node in gm.graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if not stack:
            continue
        cleaned = {}
        for key, (path, ty) in stack.items():
            path = str(path)
            if path == root:
                cleaned[key] = ("", ty)  # the model is the exported module's root
                continue
            cleaned[key] = (path[len(root) + 1:] if path.startswith(root + ".") else path, ty)
        node.meta["nn_module_stack"] = cleaned


def _rel(source: str) -> str:
    """A Dynamo source name relative to the model: ``L['kvpass_model'].caches[0].pos`` -> ``caches[0].pos``."""
    root = f"L['{MODEL_ROOT}']"
    if source == root:
        return ""
    return source[len(root) + 1:] if source.startswith(root + ".") else source


def _output_plan(cap: _Capture, model, names, values):
    """``(leaves, spec)`` of the model's return value: each leaf is ``("graph", i)`` (the graph's output ``i``),
    ``("user", name)`` (an argument returned as is) or ``("const", value)``. Warns about tensors the step
    assigns to model attributes (replaced state), which the exported program does not carry."""
    import warnings

    from .errors import KVPassWarning

    leaves, spec = pytree.tree_flatten(cap.result)
    marker_index = {id(m): i for i, m in enumerate(cap.markers)}
    plan, used = [], set()
    for leaf in leaves:
        if id(leaf) in marker_index:
            plan.append(("graph", marker_index[id(leaf)]))
            used.add(marker_index[id(leaf)])
        elif any(leaf is v for v in values):
            plan.append(("user", names[next(i for i, v in enumerate(values) if leaf is v)]))
        elif isinstance(leaf, torch.Tensor):
            raise ExportCaptureError(f"kvpass.export(model): {type(model).__name__}.forward returns a tensor that is "
                                     f"neither computed by the step nor an argument (model state?); return a "
                                     f"computed value instead")
        else:
            plan.append(("const", leaf))
    if cap.replaced:
        shown = ", ".join(cap.replaced[:4]) + (f" (+{len(cap.replaced) - 4} more)" if len(cap.replaced) > 4 else "")
        warnings.warn(
            f"kvpass.export: {type(model).__name__}.forward assigns new tensors to its state ({shown}) instead of "
            f"writing a cache in place; the exported program computes this step right but does not carry that "
            f"state to the next call. Write caches in place (buf[:, pos:pos + t] = k) to carry them.",
            KVPassWarning, stacklevel=3)
    return plan, spec


# --------------------------------------------------------------------------------------------------------
# The plan: what feeds each input of the captured graph
# --------------------------------------------------------------------------------------------------------


class _Feed:
    """One placeholder of the captured graph and what the step module feeds it.

    ``kind``: ``"param"`` (a parameter or buffer of the model, ``name`` its FQN), ``"user"`` (read from the
    arguments along ``steps``), ``"state"`` (a cache tensor the step reads or writes) or ``"position"`` (a
    symbolic int of the model). ``path`` is the attribute path from the model (``caches.0.k_buf``) for state and
    positions; ``name`` the identifier made of it (``caches_0_k_buf``).
    """

    def __init__(self, kind: str, name: str, source: str | None, example=None, steps=None, path: str = ""):
        self.kind = kind
        self.name = name
        self.source = source
        self.example = example
        self.steps = steps
        self.path = path


def _source_steps(source) -> tuple | None:
    """A Dynamo ``Source`` as a chain of accessors from a local: ``(("local", "input_ids"), ("size", 1))`` for
    ``L['input_ids'].size()[1]``; ``None`` for a source of another kind."""
    from torch._dynamo import source as S

    steps = []
    while source is not None:
        if isinstance(source, S.LocalSource):
            steps.append(("local", source.local_name))
            return tuple(reversed(steps))
        if isinstance(source, S.TensorPropertySource) and source.prop is S.TensorProperty.SIZE:
            steps.append(("size", source.idx))
        elif isinstance(source, S.NNModuleSource):
            pass  # how Dynamo tracks a module, not an accessor
        elif isinstance(source, S.NumpyTensorSource):
            steps.append(("numpy", None))
        elif isinstance(source, S.AttrSource):
            steps.append(("attr", source.member))
        elif isinstance(source, (S.GetItemSource, S.DictGetItemSource)) and \
                not getattr(source, "index_is_slice", False) and isinstance(source.index, (int, str)):
            steps.append(("item", source.index))
        else:
            return None
        source = getattr(source, "base", None)
    return None


def _resolve(value, steps):
    """Follow ``steps`` (after the root) from ``value``: the user input a graph placeholder reads."""
    for kind, key in steps:
        if kind == "attr":
            value = getattr(value, key)
        elif kind == "item":
            value = value[key]
        elif kind == "size":
            value = value.size(key)
        else:
            raise ExportCaptureError(f"kvpass.export(model): cannot feed a graph input through {kind}")
    return value


def _attribute_path(steps) -> str:
    """``caches.0.k_buf`` for the steps of ``___from_numpy(L['kvpass_model'].caches[0].k_buf)``."""
    return ".".join(str(key) for kind, key in steps[1:] if kind in ("attr", "item"))


def _identifier(path: str, taken: set[str]) -> str:
    text = re.sub(r"[^0-9A-Za-z_]+", "_", path).strip("_") or "state"
    if text[0].isdigit() or keyword.iskeyword(text):
        text = "s_" + text
    name, i = text, 1
    while name in taken:
        i += 1
        name = f"{text}_{i}"
    taken.add(name)
    return name


def _plan(cap: _Capture, model, user_names, cache) -> list[_Feed]:
    by_id = {}
    for fqn, p in itertools.chain(model.named_parameters(remove_duplicate=True),
                                  model.named_buffers(remove_duplicate=True)):
        by_id.setdefault(id(p), fqn)
    taken = set(user_names) | {"self", "position", "cache"}
    plan = []
    for i, (value, source, obj) in enumerate(zip(cap.example_inputs, cap.sources, cap.source_objs)):
        steps = _source_steps(obj)
        root = steps[0][1] if steps else None
        if isinstance(value, torch.Tensor) and id(value) in by_id:
            plan.append(_Feed("param", by_id[id(value)], source))
        elif root in user_names:
            if any(kind == "numpy" for kind, _ in steps):
                raise ExportCaptureError(f"kvpass.export(args): graph input {source} is a numpy view of an argument; "
                                         f"pass tensors")
            plan.append(_Feed("user", root, source, steps=steps))
        elif root != MODEL_ROOT:
            raise ExportCaptureError(f"kvpass.export(model): graph input {i} ({source or 'no source'}) is neither an "
                                     f"argument nor reachable from the model by attributes and indices")
        elif isinstance(value, torch.Tensor):
            path = _attribute_path(steps)
            plan.append(_Feed("state", _identifier(path, taken), source, value, steps=steps, path=path))
        elif isinstance(value, (int, torch.SymInt)) and not isinstance(value, bool):
            path = _attribute_path(steps)
            plan.append(_Feed("position", _identifier(path, taken), source, int(value), steps=steps, path=path))
        else:
            raise ExportCaptureError(f"kvpass.export(model): graph input {source or i} is a "
                                     f"{type(value).__name__}; kvpass.export handles tensors and ints")
    return plan


class _Positions:
    """How ``cache="outputs"`` carries the model's positions: one int64 tensor for every symbolic position.

    ``symbols``: the position symbols of the capture (all fed the same value); ``delta``: the advance of a step,
    a sympy expression free of them (``T``, the number of new tokens, for the reference caches); ``paths``: the
    attribute paths the tensor stands for; ``unfed``: the position symbols no graph input carries (only guards
    read them), given the position's value when the guards are checked.
    """

    def __init__(self, symbols, delta, paths, example, shape=(1,), unfed=()):
        self.symbols, self.delta, self.paths, self.example, self.shape = symbols, delta, paths, example, shape
        self.unfed = list(unfed)


def _positions_plan(cap: _Capture, plan: list[_Feed]) -> _Positions:
    """One position for the model: every symbolic position holds the same value and the step advances each by the
    same amount (``self.pos += T``), read from Dynamo's record of the step's stores."""
    import sympy

    feeds = [(i, f) for i, f in enumerate(plan) if f.kind == "position"]
    if not feeds and not cap.unfed:
        raise ExportInputError(
            "kvpass.export(positions): cache='outputs' needs the model's positions as symbolic ints: pass "
            "positions=... naming the int attributes the step advances (for example positions='pos')")
    # (symbol, path, source, example) of every position, the graph's inputs and the ones only guards read
    by_index = {i: s for s, i in cap.symbols.items()}
    every = [(by_index.get(i), f.path, f.source, f.example) for i, f in feeds]
    every += [(sym, _attribute_path_of(source), source, int(cap.hints.get(sym, -1)))
              for sym, source in cap.unfed.items()]
    values = {path: example for _, path, _, example in every}
    if len(set(values.values())) > 1:
        shown = ", ".join(f"{p}={v}" for p, v in values.items())
        raise ExportInputError(
            f"kvpass.export(positions): cache='outputs' carries one position for the model, but the model's "
            f"positions differ ({shown}); export from a state where they are equal (a freshly reset model)")
    repl = cap.replacements

    def sub(expr):
        return sympy.sympify(expr).xreplace(repl) if repl else sympy.sympify(expr)

    symbols = {sub(sym) for sym, _, _, _ in every if sym is not None}
    deltas = {}
    for sym, path, source, _ in every:
        if sym is None:
            raise ExportCaptureError(f"kvpass.export(positions): {path} was not kept symbolic while tracing")
        new = cap.stores.get(source)
        if new is None:
            raise ExportCaptureError(
                f"kvpass.export(positions): the step does not advance {path} (no store to it was traced); "
                f"cache='outputs' returns the positions advanced and needs every position to move with the step")
        delta = sympy.expand(sub(new) - sub(sym))
        if delta.free_symbols & symbols:
            raise ExportCaptureError(f"kvpass.export(positions): {path} advances by {delta}, which depends on a "
                                     f"position; cache='outputs' needs a step that advances by an amount of its own")
        deltas[path] = delta
    if len(set(deltas.values())) > 1:
        shown = ", ".join(f"{p} += {d}" for p, d in deltas.items())
        raise ExportCaptureError(f"kvpass.export(positions): the positions advance differently ({shown}); "
                                 f"cache='outputs' carries one position for the model")
    return _Positions(symbols, next(iter(deltas.values())), list(values), next(iter(values.values())),
                      unfed=list(cap.unfed))


def _attribute_path_of(source: str) -> str:
    """``cache.layers.1.cumulative_length_int`` for ``L['kvpass_model'].cache.layers[1].cumulative_length_int``."""
    return re.sub(r"\[['\"]?([^'\"\]]+)['\"]?\]", r".\1", _rel(source))


# --------------------------------------------------------------------------------------------------------
# The module torch.export traces
# --------------------------------------------------------------------------------------------------------


class _StateModule(torch.nn.Module):
    """Holds the cache buffers of a ``cache="buffers"`` export (``kv_cache.<name>``)."""


class _Step(torch.nn.Module):
    """Owns the model's parameters (same FQNs) and, with ``cache="buffers"``, the cache state; its ``forward``
    feeds the rewritten graph.

    ``forward`` is ``_step`` with a declared signature (the names ``torch.export`` gives the program's inputs):
    the model's positional arguments positionally, the rest keyword-only:

    - ``cache="buffers"``/``"inputs"``: the model's arguments, then (``"inputs"``) one tensor per cache buffer and
      one int per symbolic position, named after their attribute paths (``caches_0_k_buf``, ``caches_0_pos``);
    - ``cache="outputs"``: the model's arguments, ``position`` (int64 tensor) and ``cache`` (a dict keyed by
      attribute path, ``"caches.0.k_buf"``); it returns ``(result, new_position, new_cache)``.
    """

    def __init__(self, model, gm, plan, cap, user_names, cache, outputs, positions: _Positions | None,
                 n_positional: int):
        super().__init__()
        share_module_state(self, model)
        self.cache_mode = cache
        state_root = "kv_cache"
        while hasattr(self, state_root):
            state_root = "_" + state_root
        self.state_root = state_root
        if cache == "buffers":
            holder = _StateModule()
            for feed in plan:
                if feed.kind == "state":
                    holder.register_buffer(feed.name, feed.example.detach().clone())
            self.add_module(state_root, holder)
        object.__setattr__(self, "_kvpass_graph", gm)  # not a submodule: its constants would become buffers
        self._kvpass_plan = plan
        self._kvpass_outputs = outputs
        self._kvpass_positions = positions
        self._kvpass_unfed = list(positions.unfed) if positions is not None else []
        self._kvpass_guards, self._kvpass_symbols = _guards_for(cap, plan, self._kvpass_unfed)
        self.user_names = list(user_names)
        # The model's positional arguments stay positional; the rest is keyword-only (cache="outputs" without
        # keyword arguments: position and cache are positional too, (input_ids, position, cache)).
        extra = [f.name for f in plan if f.kind == "state"] if cache == "inputs" else []
        extra += ["position", "cache"] if cache == "outputs" else [f.name for f in plan if f.kind == "position"]
        self.positional_names = list(user_names[:n_positional])
        self.keyword_names = list(user_names[n_positional:])
        if cache == "outputs" and not self.keyword_names:
            self.positional_names += extra
        else:
            self.keyword_names += extra
        self.input_names = self.positional_names + self.keyword_names
        # An ordinary method with a declared signature: torch.export names the program's inputs after it.
        P = inspect.Parameter
        forward = functools.partial(type(self)._step, self)
        forward.__signature__ = inspect.Signature(
            [P(n, P.POSITIONAL_OR_KEYWORD) for n in self.positional_names] +
            [P(n, P.KEYWORD_ONLY) for n in self.keyword_names])
        self.forward = forward

    def _step(self, *args, **kwargs):
        inputs = dict(zip(self.positional_names, args), **kwargs)
        user = {n: inputs[n] for n in self.user_names}
        positions = self._kvpass_positions
        if positions is not None:
            position = inputs["position"]
            p = position.reshape(()).item()
            torch._check(p >= 0)
            cache = {path: t.clone() for path, t in inputs["cache"].items()}
        feeds = []
        for feed in self._kvpass_plan:
            if feed.kind == "param":
                feeds.append(self.get_parameter(feed.name) if _is_param(self, feed.name)
                             else self.get_buffer(feed.name))
            elif feed.kind == "user":
                feeds.append(_resolve(user[feed.steps[0][1]], feed.steps[1:]))
            elif feed.kind == "state":
                feeds.append(cache[feed.path] if positions is not None
                             else inputs[feed.name] if self.cache_mode == "inputs"
                             else getattr(getattr(self, self.state_root), feed.name))
            else:
                feeds.append(p if positions is not None else inputs[feed.name])
        _assert_guards(self._kvpass_guards, self._kvpass_symbols, feeds,
                       {sym: p for sym in self._kvpass_unfed} if positions is not None else None)
        outs = self._run_graph(feeds, deploy=positions is not None)
        leaves, spec = self._kvpass_outputs
        flat = [outs[ref] if kind == "graph" else user[ref] if kind == "user" else ref for kind, ref in leaves]
        result = pytree.tree_unflatten(flat, spec)
        if positions is None:
            return result
        advance = _evaluate(positions.delta, self._kvpass_symbols, feeds)
        return result, position + advance, cache

    def _run_graph(self, feeds, deploy: bool = False):
        from torch.fx import traceback as fx_traceback

        from .deploy import DeployInterpreter

        interpreter = DeployInterpreter if deploy else torch.fx.Interpreter
        with fx_traceback.preserve_node_meta():  # exported nodes keep the user's stack traces
            outs = interpreter(self._kvpass_graph).run(*feeds)
        return outs if isinstance(outs, (tuple, list)) else (outs,)


def share_module_state(target: torch.nn.Module, model: torch.nn.Module) -> None:
    """Register ``model``'s children, parameters and buffers on ``target`` under the same names (shared, not
    copied), so ``target.state_dict()`` has the keys of ``model.state_dict()``."""
    for name, child in model.named_children():
        target.add_module(name, child)
    for name, p in model._parameters.items():
        if p is not None:
            target.register_parameter(name, p)
    for name, b in model._buffers.items():
        if b is not None:
            target.register_buffer(name, b, persistent=name not in model._non_persistent_buffers_set)


def _is_param(module, fqn) -> bool:
    mod, _, name = fqn.rpartition(".")
    owner = module.get_submodule(mod) if mod else module
    return name in owner._parameters


def _guards_for(cap: _Capture, plan: list[_Feed], unfed=()):
    """Dynamo's shape guards over the symbols fed by the graph's SymInt inputs and the ``unfed`` positions (given
    the position's value by the caller); the rest cannot be checked."""
    symbols = cap.symbols
    known = set(symbols) | set(unfed)
    guards = []
    for expr in cap.guards:
        free = getattr(expr, "free_symbols", set())
        if free and free <= known:
            guards.append(expr)
    return guards, symbols


def _evaluate(expr, symbols, feeds, overrides=None):
    """``expr`` (sympy, over the capture's symbols) on the values fed to the graph: an int, a SymInt, a bool..."""
    from torch.utils._sympy.interp import sympy_interp
    from torch.utils._sympy.reference import PythonReferenceAnalysis

    env = {sym: feeds[i] for sym, i in symbols.items()}
    env.update(overrides or {})
    return sympy_interp(PythonReferenceAnalysis, env, expr)


def _assert_guards(guards, symbols, feeds, overrides=None) -> None:
    for expr in guards:
        ok = _evaluate(expr, symbols, feeds, overrides)
        if isinstance(ok, bool):
            if not ok:
                raise ExportInputError(f"kvpass.export: the example violates the traced guard {expr}")
            continue
        torch._check(ok, lambda expr=expr: f"kvpass.export: outside the traced guard {expr}")


# --------------------------------------------------------------------------------------------------------
# torch.export
# --------------------------------------------------------------------------------------------------------


def _torch_export(step: _Step, plan, user_names, user_values, dims, report) -> torch.export.ExportedProgram:
    import torch.fx.experimental._config as fx_config
    from torch.export import Dim

    example = dict(zip(user_names, user_values))
    shapes: dict[str, Any] = {n: dims.get(n) for n in user_names}
    if step.cache_mode == "inputs":
        for f in plan:
            if f.kind == "state":
                example[f.name] = f.example.detach().clone()
                shapes[f.name] = None
    if step.cache_mode == "outputs":
        example["position"] = torch.tensor(step._kvpass_positions.example, dtype=torch.int64).reshape(
            step._kvpass_positions.shape)
        shapes["position"] = None
        example["cache"] = {f.path: f.example.detach().clone() for f in plan if f.kind == "state"}
        shapes["cache"] = {f.path: None for f in plan if f.kind == "state"}
    else:
        for f in plan:
            if f.kind == "position":
                example[f.name] = f.example
                shapes[f.name] = Dim.DYNAMIC
    args = tuple(example[n] for n in step.positional_names)
    kwargs = {n: example[n] for n in step.keyword_names}
    dynamic = any(v is not None and not (isinstance(v, dict) and all(x is None for x in v.values()))
                  for v in shapes.values())
    spec = {n: shapes[n] for n in step.input_names} if dynamic else None
    # Positions start at 0 and a decode step has one token: reason about symbolic sizes size-obliviously
    # instead of specializing 0 and 1 from the example values.
    ctx = fx_config.patch(backed_size_oblivious=True) if dynamic and step.cache_mode != "outputs" \
        else contextlib.nullcontext()
    try:
        with ctx, torch.no_grad():
            ep = torch.export.export(step, args, kwargs, dynamic_shapes=spec, strict=False)
    except Exception as e:  # noqa: BLE001
        skips = "; ".join(f"{s.pattern} at {s.source}: {s.reason}" for s in report.skips)
        text = "\n".join(str(e).strip().splitlines()[:12])
        hint = ""
        if dims and re.search(r"!= 1\b|Ne\([^)]*, 1\)", text):
            hint = ("\nhint: on torch 2.13, torch.export specializes a dynamic length that may be 1 (reshape and "
                    "SDPA of transposed views guard `size != 1`): give the dynamic dim min=2 and export the "
                    "one-token decode step as its own program (an example of size 1, not dynamic)")
        raise ExportCaptureError(
            f"kvpass.export(model): torch.export failed on the rewritten graph ({type(e).__name__}):\n{text}"
            + (f"\nround trips kvpass left unchanged: {skips}" if skips else "") + hint) from e
    return ep
