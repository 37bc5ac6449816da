"""Helpers for tests of graph rewrites: capture what a compile sees, before and after a transform."""

from __future__ import annotations

import copy
import dataclasses
from typing import Callable

import torch
import torch.fx

__all__ = ["CapturedGraph", "capture_graphs", "RecordingBackend", "host_round_trip_nodes"]


@dataclasses.dataclass
class CapturedGraph:
    """One graph Dynamo produced: ``before`` the transform, ``after`` it, and the transform's ``report``."""

    before: torch.fx.GraphModule
    after: torch.fx.GraphModule
    report: object = None
    example_inputs: list = dataclasses.field(default_factory=list)


def capture_graphs(fn: Callable, *args, transform: Callable | None = None, **kwargs) -> tuple[object, list[CapturedGraph]]:
    """Run ``torch.compile(fn)`` once on ``args`` with a backend that records each graph before and after
    ``transform`` (default :func:`kvpass.rewrite`), then runs the transformed graph eagerly.

    Returns ``(result, graphs)``. ``transform(gm)`` may return a GraphModule or a ``(gm, report)`` pair.
    """
    if transform is None:
        from .engine import rewrite as transform
    graphs: list[CapturedGraph] = []

    def recording_backend(gm: torch.fx.GraphModule, example_inputs):
        before = copy.deepcopy(gm)
        out = transform(gm)
        after, report = out if isinstance(out, tuple) else (out, None)
        graphs.append(CapturedGraph(before, after, report, list(example_inputs)))
        return after.forward

    torch._dynamo.reset()
    result = torch.compile(fn, backend=recording_backend)(*args, **kwargs)
    return result, graphs


class RecordingBackend:
    """A torch.compile backend (or kvpass ``inner``) that keeps a copy of each graph it is handed and runs it
    eagerly: ``graphs`` is what an inner compiler would have received."""

    def __init__(self):
        self.graphs: list[torch.fx.GraphModule] = []

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        self.graphs.append(copy.deepcopy(gm))
        return gm.forward


def host_round_trip_nodes(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    """Device-to-host copies, numpy-wrapped ops and tensor rebuilds (``as_tensor``/``from_numpy``/``tensor``)."""
    from .pattern_api import is_numpy_wrapper

    return [n for n in gm.graph.nodes if is_numpy_wrapper(n) or (n.op == "call_method" and n.target in ("cpu", "numpy"))
            or (n.op == "call_function" and n.target in (torch.as_tensor, torch.from_numpy, torch.tensor))]
