"""The ``kvpass`` torch.compile backend and :func:`compile`.

``torch.compile(model, backend="kvpass")`` resolves through the ``torch_dynamo_backends`` entry point (no import
needed) to :func:`kvpass_backend`: it rewrites the Dynamo graph with the pattern catalogue and hands the result to
Inductor. :func:`backend` builds a configured variant; :func:`compile` also puts in force what must hold while
Dynamo traces (a backend only runs after the trace, so it cannot do that itself).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Callable, Sequence

import torch
import torch.fx

from . import engine

__all__ = ["backend", "kvpass_backend", "compile", "tracing_context"]


def _inner_compiler(inner) -> Callable:
    if callable(inner):
        return inner
    if inner == "inductor":
        from torch._inductor.compile_fx import compile_fx

        return compile_fx
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
    compile_inner = _inner_compiler(inner)
    engine.resolve_patterns(patterns)  # fail at construction on an unknown pattern name

    def kvpass_compile(gm: torch.fx.GraphModule, example_inputs):
        gm, report = engine.rewrite(gm, patterns=patterns)
        if on_report is not None:
            on_report(report)
        return compile_inner(gm, example_inputs)

    kvpass_compile.__name__ = "kvpass"
    return kvpass_compile


def kvpass_backend(gm: torch.fx.GraphModule, example_inputs):
    """The registered ``"kvpass"`` backend: the whole catalogue, then Inductor."""
    return backend()(gm, example_inputs)


@contextlib.contextmanager
def tracing_context():
    """What kvpass needs in force while Dynamo traces (scoped: nothing leaks past the call)."""
    with contextlib.ExitStack() as stack:
        yield stack


def compile(model, **torch_compile_kwargs):
    """``torch.compile(model, backend=kvpass.backend(), **torch_compile_kwargs)`` with :func:`tracing_context`
    entered around each call of the compiled model, so Dynamo traces under it."""
    torch_compile_kwargs.setdefault("backend", backend())
    compiled = torch.compile(model, **torch_compile_kwargs)

    @functools.wraps(compiled)
    def run(*args, **kwargs):
        with tracing_context():
            return compiled(*args, **kwargs)

    run._kvpass_compiled = compiled
    return run
