"""Helpers for tests of graph rewrites: capture what a compile sees, before and after a transform."""

from __future__ import annotations

import copy
import dataclasses
from typing import Callable

import torch
import torch.fx

__all__ = ["CapturedGraph", "capture_graphs", "RecordingBackend", "host_round_trip_nodes", "is_numpy_wrapper",
           "buffer_reads"]


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
        from torch._subclasses.fake_tensor import unset_fake_temporarily

        with unset_fake_temporarily():  # as an inner compiler it runs under AOTAutograd's fake mode
            self.graphs.append(copy.deepcopy(gm))
        return gm.forward


def is_numpy_wrapper(node: torch.fx.Node) -> bool:
    """True for Dynamo's ``wrapped_*`` numpy function/method/operator nodes (torch-level graphs)."""
    from torch._dynamo import utils as dynamo_utils

    types = tuple(getattr(dynamo_utils, n) for n in ("numpy_to_tensor_wrapper", "numpy_method_wrapper",
                                                     "numpy_operator_wrapper") if hasattr(dynamo_utils, n))
    return node.op == "call_function" and isinstance(node.target, types)


def _device_change(node: torch.fx.Node) -> bool:
    from .aliasing import meta_value

    if node.op != "call_function" or node.target not in (torch.ops.aten._to_copy.default, torch.ops.aten.copy.default):
        return False
    src = node.args[1] if node.target is torch.ops.aten.copy.default else node.args[0]
    a, b = meta_value(src), meta_value(node)
    return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.device != b.device


def host_round_trip_nodes(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    """The host round-trip ops of a graph. Torch-level (Dynamo) graphs: device-to-host copies (``.cpu()``,
    ``.numpy()``), numpy-wrapped ops and tensor rebuilds (``as_tensor``/``from_numpy``/``tensor``). ATen graphs:
    copies between devices (``_to_copy``/``copy`` whose result is on another device than their input); on a
    CPU-only machine the host hops of user code are no-ops there, so none is left."""
    return [n for n in gm.graph.nodes if is_numpy_wrapper(n) or (n.op == "call_method" and n.target in ("cpu", "numpy"))
            or (n.op == "call_function" and n.target in (torch.as_tensor, torch.from_numpy, torch.tensor))
            or _device_change(n)]


def buffer_reads(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    """Reads (``slice``/``select``) of a functional write into a cache buffer (a graph input with a ``copy_``
    epilogue): the read-after-write through a buffer that ``scatter_slice`` turns into the values written."""
    from .aliasing import scatter_base, state_inputs

    states = state_inputs(gm.graph)
    reads = (torch.ops.aten.slice.Tensor, torch.ops.aten.select.int)
    writes = (torch.ops.aten.slice_scatter.default, torch.ops.aten.select_scatter.default,
              torch.ops.aten.index_put.default)
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in reads
            and isinstance(n.args[0], torch.fx.Node) and n.args[0].target in writes
            and scatter_base(n.args[0]) in states]
