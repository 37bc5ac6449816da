"""The ``kvpass`` torch.compile backend and :func:`compile`.

``torch.compile(model, backend="kvpass")`` resolves through the ``torch_dynamo_backends`` entry point (no import
needed; see ``kvpass.registered_backend``) to :func:`kvpass_backend`: it rewrites the Dynamo graph with the pattern catalogue and hands the result to
Inductor. :func:`backend` builds a configured variant; :func:`compile` also puts in force what must hold while
Dynamo traces (a backend only runs after the trace, so it cannot do that itself).
"""

from __future__ import annotations

import copy
import functools
import warnings
from typing import Callable, Sequence

import torch
import torch.fx

from . import engine
from .report import Report
from .errors import KVPassWarning, user_source_line
from .tracing import HostCacheShapes, tracing_context

__all__ = ["backend", "kvpass_backend", "compile", "KVPassWarning", "warn_tolist_round_trips"]



_warned: set = set()

_TENSOR_BUILDERS = {torch.tensor, torch.as_tensor, torch.asarray}


def _builder_targets():
    refs = getattr(getattr(torch, "_refs", None), "tensor", None)
    return _TENSOR_BUILDERS | ({refs} if refs is not None else set())


def _python_scalars_of_tensor(arg) -> bool:
    """A (nested) list of Python floats, or of ``.item()`` reads: what ``tensor.tolist()`` leaves behind."""
    found = False

    def walk(x):
        nonlocal found
        if isinstance(x, (list, tuple)):
            return all(walk(y) for y in x)
        if isinstance(x, float):
            found = True
            return True
        if isinstance(x, int):
            return True
        if isinstance(x, torch.fx.Node) and x.op == "call_method" and x.target == "item":
            found = True
            return True
        return False

    return isinstance(arg, (list, tuple)) and walk(arg) and found


def warn_tolist_round_trips(gm: torch.fx.GraphModule) -> list[str]:
    """Warn once per user line where a tensor was rebuilt from ``.tolist()`` values (Dynamo graph-breaks at
    ``.tolist()`` and guards on every value: a recompile per new K/V). Returns the lines warned about."""
    lines = []
    targets = _builder_targets()
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in targets and node.args and \
                _python_scalars_of_tensor(node.args[0]):
            line = user_source_line(node)
            lines.append(line)
            if line in _warned:
                continue
            _warned.add(line)
            warnings.warn(
                f"kvpass: a tensor is rebuilt from Python floats (`.tolist()` + `torch.tensor`) at {line}. "
                "Dynamo breaks the graph at `.tolist()` and guards on every value, so each new K/V recompiles "
                "(then falls back to eager). kvpass cannot rewrite values that left the graph: keep them a tensor, "
                "e.g. `k.detach().clone()` (or `.to(device)`) instead of `torch.tensor(k.tolist())`.",
                KVPassWarning, stacklevel=2)
    return lines


def _inner_compiler(inner) -> Callable:
    """The compiler a non-Inductor ``inner`` names, for the functional ATen graph."""
    from functorch.compile import make_boxed_func

    if callable(inner):
        return inner
    if inner == "eager":
        return lambda gm, example_inputs: make_boxed_func(gm.forward)
    if isinstance(inner, str):
        from torch._dynamo.backends.registry import lookup_backend

        return lookup_backend(inner)
    raise TypeError(f"inner: expected 'inductor', 'eager', a backend name or a callable, got {type(inner).__name__}")


def _inductor_patches(aten_pass, mode=None, options=None, dynamic=None) -> dict:
    """Inductor config for one compile: kvpass's post-grad pass *added* to the user's own passes (a list or a
    single pass; theirs run first, unchanged), plus what ``mode=`` / ``options=`` ask for."""
    from torch._inductor import config as inductor_config
    from torch._inductor.custom_graph_pass import get_custom_graph_passes

    patches: dict = {}
    if mode is not None and mode != "default":
        from torch._inductor import list_mode_options

        patches.update(list_mode_options(mode, dynamic))
    patches.update(options or {})
    theirs = get_custom_graph_passes(patches.get("post_grad_custom_pre_pass",
                                                 inductor_config.post_grad_custom_pre_pass))
    from .inductor_pass import KVPassInductorPass

    ours = [aten_pass] if aten_pass is not None else []
    patches["post_grad_custom_pre_pass"] = [p for p in theirs if not isinstance(p, KVPassInductorPass)] + ours
    return patches


def _guard_aliased_inputs(compiled: Callable, fallback: Callable, gm: torch.fx.GraphModule, example_inputs):
    """``compiled`` unless two host-buffer inputs share memory in this call (numpy views of one pool, which
    functionalization treats as independent) and the graph may write one of them: then ``fallback`` (the graph
    as Dynamo traced it, run eagerly, with eager's aliasing), and a warning once with the user's line. Inputs
    the graph only reads (:func:`kvpass.aliasing.inputs_written`: a grown cache and a view of its recent tokens
    kept beside it) read the same values either way."""
    from .aliasing import ReadsBeforeWrites, aliased_inputs_message, external_inputs, inputs_written, overlapping_inputs

    watched = external_inputs(example_inputs)
    if len(watched) < 2:
        return compiled
    written = inputs_written(gm.graph)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    warned: list = []

    def run(*args):  # Dynamo calls a backend's result with the graph's inputs unpacked
        pairs = [(i, j) for i, j in overlapping_inputs([args[i] for i in watched])
                 if watched[i] in written or watched[j] in written]
        if pairs:
            from . import observe

            observe.count("aliased_inputs_fallback")
            if not warned:
                warned.append(True)
                i, j = (watched[k] for k in pairs[0])
                names = [placeholders[k].name if k < len(placeholders) else f"input {k}" for k in (i, j)]
                line = next((user_source_line(u) for u in placeholders[i].users), "") if i < len(placeholders) else ""
                warnings.warn(aliased_inputs_message(names[0], names[1], line), KVPassWarning, stacklevel=2)
            with ReadsBeforeWrites():  # numpy's meaning of a write from an overlapping view (a shift)
                return fallback(*args)
        return compiled(*args)

    return run


def backend(inner="inductor", patterns: Sequence | None = None, on_report: Callable | None = None) -> Callable:
    """A torch.compile backend that rewrites K/V round trips on the functional ATen graph, then compiles.

    Args:
        inner: ``"inductor"`` (default: the rewrite runs inside Inductor as a post-grad ``CustomGraphPass``,
            composed with any ``post_grad_custom_pre_pass`` already configured), ``"eager"``, another
            registered backend name, or a backend callable (these get the rewritten functional ATen graph from
            AOTAutograd, with ``keep_inference_input_mutations``).
        patterns: rule names or objects to run (default: all, in order).
        on_report: called once with each compiled graph's :class:`kvpass.Report` after its rewrite, an empty one
            when nothing matched, whatever the inner compiler (with Inductor, also when Inductor serves the graph
            from its cache and skips its passes: the report is then computed again).

    The returned backend accepts ``mode=`` and ``options=`` (what ``torch.compile`` passes to a custom backend)
    and hands them to Inductor. Calls whose host-buffer inputs overlap in memory run the traced graph eagerly
    (see :func:`kvpass.aliasing.overlapping_inputs`).
    """
    selected = engine.resolve_patterns(patterns)  # fail at construction on an unknown pattern name
    torch_level = [p for p in selected if getattr(p, "level", "aten") == "torch"]
    aten_level = [p for p in selected if getattr(p, "level", "aten") != "torch"]

    def report_to_user(report):
        if on_report is not None:
            on_report(report)

    def kvpass_compile(gm: torch.fx.GraphModule, example_inputs, mode=None, options=None, **kwargs):
        warn_tolist_round_trips(gm)
        from .aliasing import external_inputs

        # the graph as traced, for calls whose host buffers overlap (only kept where that can happen)
        traced = copy.deepcopy(gm) if len(external_inputs(example_inputs)) > 1 else gm
        pre = Report()
        for pattern in torch_level:
            engine.apply_rule(gm, pattern, pre)
        def through_aot(inner_name, gm):
            from torch._dynamo.backends.common import aot_autograd
            from functorch.compile import make_boxed_func

            compile_inner = _inner_compiler(inner_name)

            def forward_compiler(fw: torch.fx.GraphModule, fw_inputs):
                fw, report = engine.rewrite(fw, patterns=aten_level)
                report_to_user(_merged(pre, report))
                out = compile_inner(fw, fw_inputs)
                return out if getattr(out, "_boxed_call", False) else make_boxed_func(out)

            return aot_autograd(fw_compiler=forward_compiler, keep_inference_input_mutations=True)(
                gm, example_inputs)

        if inner == "inductor":
            backup = copy.deepcopy(gm) if _reads_back_positions(gm) else None
            try:
                from torch._inductor.compile_fx import compile_fx

                from .inductor_pass import KVPassInductorPass

                if aten_level:
                    reported: list = []

                    def inductor_report(r):
                        reported.append(r)
                        report_to_user(_merged(pre, r))

                    # Inductor's caches skip post-grad passes on a hit: keep the graph to report from then
                    kept = copy.deepcopy(gm) if on_report is not None else None
                    aten_pass = KVPassInductorPass(aten_level, inductor_report)
                    patches = _inductor_patches(aten_pass, mode, options, kwargs.get("dynamic"))
                    compiled = compile_fx(gm, example_inputs, config_patches=patches)
                    if kept is not None and not reported:
                        _, r = engine.rewrite(kept, patterns=aten_level)  # same rules, same graph: the cached report
                        report_to_user(_merged(pre, r))
                else:  # only torch-level rules (store_loop): nothing to add to Inductor's passes
                    report_to_user(pre)
                    compiled = compile_fx(gm, example_inputs,
                                          config_patches=_inductor_patches(None, mode, options, kwargs.get("dynamic")))
            except Exception as e:  # noqa: BLE001 - only Inductor's data-dependent guards are handled
                if backup is None or not _data_dependent(e):
                    raise
                _warn_without_inductor(backup)
                compiled = through_aot("eager", backup)
        else:
            compiled = through_aot(inner, gm)
        return _guard_aliased_inputs(compiled, traced.forward, traced, example_inputs)

    kvpass_compile.__name__ = "kvpass"
    return kvpass_compile


def _reads_back_positions(gm: torch.fx.GraphModule) -> bool:
    """Whether the graph reads values back from tensors (``.item()`` / ``.tolist()``: unbacked SymInts)."""
    return any(n.op == "call_method" and n.target in ("item", "tolist") or n.op == "call_function" and
               getattr(n.target, "__name__", "") in ("item", "_local_scalar_dense") for n in gm.graph.nodes)


def _data_dependent(e: BaseException) -> bool:
    """Whether ``e`` (or what caused it) is a guard on a data-dependent value (``GuardOnDataDependentSymNode``)."""
    from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, GuardOnDataDependentSymNode) or "GuardOnDataDependentSymNode" in str(e)[:2000]:
            return True
        e = e.__cause__ or e.__context__
    return False


def _warn_without_inductor(gm: torch.fx.GraphModule) -> None:
    """Warn once per user line that a graph whose sizes depend on a position read back from a tensor runs
    without Inductor (its lowering guards on that value, which has no known range)."""
    node = next((n for n in gm.graph.nodes if n.op == "call_method" and n.target in ("item", "tolist")), None)
    line = user_source_line(node) if node is not None else "?"
    if ("without inductor", line) in _warned:
        return
    _warned.add(("without inductor", line))
    warnings.warn(
        f"kvpass: sizes depend on a position read back from a tensor at {line}, whose range nothing states; "
        "Inductor cannot compile that graph, so it runs through AOTAutograd without Inductor (same results). "
        "State the range where the position is read back (torch._check(pos >= 0), torch._check(pos + t <= "
        "buf.shape[d])) to compile it.", KVPassWarning, stacklevel=2)


def _merged(pre: "Report", report: "Report") -> "Report":
    """The torch-level rules' report (store_loop) in front of the ATen rules' report for the same graph."""
    if not (pre.matches or pre.skips):
        return report
    out = Report(list(pre.matches), list(pre.skips), dict(pre.counts), before=report.before)
    out.extend(report)
    return out


def kvpass_backend(gm: torch.fx.GraphModule, example_inputs, **kwargs):
    """The registered ``"kvpass"`` backend: every rule, then Inductor (``mode=``/``options=`` are honoured)."""
    return backend()(gm, example_inputs, **kwargs)


def compile(model, **torch_compile_kwargs):
    """``torch.compile(model, backend=kvpass.backend(), **torch_compile_kwargs)``, with
    :func:`kvpass.tracing.tracing_context` entered around each call of the compiled model so that Dynamo traces
    under it: cache positions held as int attributes stay symbolic (one decode graph for every position) and
    ``np.pad`` of traced arrays is captured, and a host cache the model creates in one call (``self.k = k`` where it
    was ``None``, then grown step by step) is traced with its length symbolic from the next call on
    (:class:`kvpass.tracing.HostCacheShapes`). The config is scoped to the call; nothing leaks. Every
    ``torch.compile`` keyword passes through (``mode``, ``options``, ``dynamic``, ``fullgraph`` ...)."""
    torch_compile_kwargs.setdefault("backend", backend())
    compiled = torch.compile(model, **torch_compile_kwargs)
    host_caches = HostCacheShapes()

    @functools.wraps(compiled)
    def run(*args, **kwargs):
        host_caches.observe(model, args, kwargs)
        with tracing_context():
            return compiled(*args, **kwargs)

    run._kvpass_compiled = compiled
    return run
