"""The ``kvpass`` torch.compile backend and :func:`compile`.

``torch.compile(model, backend="kvpass")`` resolves through the ``torch_dynamo_backends`` entry point (no import
needed; see ``kvpass.registered_backend``) to :func:`kvpass_backend`: it rewrites the Dynamo graph with the pattern catalogue and hands the result to
Inductor. :func:`backend` builds a configured variant; :func:`compile` also puts in force what must hold while
Dynamo traces (a backend only runs after the trace, so it cannot do that itself).
"""

from __future__ import annotations

import functools
import warnings
from typing import Callable, Sequence

import torch
import torch.fx

from . import engine
from .errors import user_source_line
from .tracing import tracing_context

__all__ = ["backend", "kvpass_backend", "compile", "KVPassWarning", "warn_tolist_round_trips"]


class KVPassWarning(UserWarning):
    """A round trip kvpass cannot rewrite and that will cost recompiles; the message says the functional fix."""


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
    """Any ``inner`` but ``"inductor"``, which :func:`backend` wires itself (with kvpass's ATen pass inside)."""
    if callable(inner):
        return inner
    if inner == "eager":
        return lambda gm, example_inputs: gm.forward
    if isinstance(inner, str):
        from torch._dynamo.backends.registry import lookup_backend

        return lookup_backend(inner)
    raise TypeError(f"inner: expected 'inductor', 'eager', a backend name or a callable, got {type(inner).__name__}")


def backend(inner="inductor", patterns: Sequence | None = None, on_report: Callable | None = None) -> Callable:
    """A torch.compile backend that rewrites K/V round trips, then compiles with ``inner``.

    Args:
        inner: ``"inductor"`` (default), ``"eager"``, another registered backend name, or a backend callable.
        patterns: pattern names or objects to run (default: the whole catalogue, in order).
        on_report: called with each graph's :class:`kvpass.Report` after its rewrite.
    """
    engine.resolve_patterns(patterns)  # fail at construction on an unknown pattern name
    if inner == "inductor":
        from torch._inductor.compile_fx import compile_fx

        from .inductor_pass import KVPassInductorPass

        aten_pass = KVPassInductorPass(patterns, on_report)

        def compile_inner(gm, example_inputs):
            # ATen-level round trips (device hops that only appear after decomposition) inside Inductor.
            return compile_fx(gm, example_inputs, config_patches={"post_grad_custom_pre_pass": aten_pass})
    else:
        compile_inner = _inner_compiler(inner)

    def kvpass_compile(gm: torch.fx.GraphModule, example_inputs):
        warn_tolist_round_trips(gm)
        gm, report = engine.rewrite(gm, patterns=patterns)
        if on_report is not None:
            on_report(report)
        return compile_inner(gm, example_inputs)

    kvpass_compile.__name__ = "kvpass"
    return kvpass_compile


def kvpass_backend(gm: torch.fx.GraphModule, example_inputs):
    """The registered ``"kvpass"`` backend: the whole catalogue, then Inductor."""
    return backend()(gm, example_inputs)


def compile(model, **torch_compile_kwargs):
    """``torch.compile(model, backend=kvpass.backend(), **torch_compile_kwargs)``, with
    :func:`kvpass.tracing.tracing_context` entered around each call of the compiled model so that Dynamo traces
    under it: cache positions held as int attributes stay symbolic (one decode graph for every position) and
    ``np.pad`` of traced arrays is captured. The config is scoped to the call; nothing leaks."""
    torch_compile_kwargs.setdefault("backend", backend())
    compiled = torch.compile(model, **torch_compile_kwargs)

    @functools.wraps(compiled)
    def run(*args, **kwargs):
        with tracing_context():
            return compiled(*args, **kwargs)

    run._kvpass_compiled = compiled
    return run
