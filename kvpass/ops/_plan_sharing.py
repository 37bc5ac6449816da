"""One plan per addressing in a traced graph: the stores of several layers that use the same addressing tensors
reuse the index work of the first (the paged store's plan depends on the addressing only).

Inductor does not merge the repeated index work of the layers by itself: AOTAutograd runs common-subexpression
elimination only when it partitions a training graph, and Inductor's own CSE works inside a kernel. Without
sharing, a compiled decode step of L layers ran the plan L times (on the CPU path a sort, a cumsum and a
searchsorted per layer, each an ATen call from the wrapper).

Rule: :func:`shared` returns the plan built by an earlier call *of the same trace* when every addressing tensor is
the same object in the same state and the geometry is equal, else it builds it.

    plan(addressing now) = plan(addressing then)   if for every addressing tensor t: t is the same object,
                                                   t._version and its functional mutation counter are unchanged,
                                                   and (tokens, blocks, block size, heads, layout, path) are equal

Side conditions, and why they hold: the plan is a pure function of the addressing values and the geometry (it
reads no cache and no state); inside one functionalized trace (AOTAutograd, ``torch.export``) an in-place write to
a tensor or to any view or base of it bumps the shared version counter and the functional mutation counter
(measured on torch 2.13, for writes through a view and through the base), so an unchanged pair means unchanged
values; the plan's tensors belong to the trace's graph, so sharing is confined to one trace (entries are keyed
weakly on the first addressing tensor, a trace's own wrapper object, and on the active proxy tracer). Outside a
functionalized trace (eager, Dynamo's fake propagation) nothing is shared.
"""

from __future__ import annotations

import weakref
from typing import Callable, Optional, Sequence

import torch
from torch.utils.weak import WeakIdKeyDictionary

_PLANS: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _state(t: torch.Tensor):
    return t._version, torch._functionalize_mutation_counter(t.elem)


def _tracer():
    from torch.fx.experimental.proxy_tensor import get_proxy_mode

    mode = get_proxy_mode()
    return None if mode is None else mode.tracer


def shared(addressing: Sequence[Optional[torch.Tensor]], geometry: tuple, build: Callable[[], object]):
    """``build()``, or the result of an earlier ``build()`` for the same addressing tensors in the same state and
    the same ``geometry`` in this trace (see the module docstring)."""
    from torch._subclasses.functional_tensor import FunctionalTensor

    present = [t for t in addressing if t is not None]
    if not present or not all(isinstance(t, FunctionalTensor) for t in present):
        return build()
    tracer = _tracer()
    states = tuple(None if t is None else _state(t) for t in addressing)
    entries = _PLANS.setdefault(present[0], [])
    for refs, old_states, old_geometry, tracer_ref, plan in entries:
        if (old_geometry == geometry and old_states == states and tracer_ref() is tracer
                and all((r is None and t is None) or (r is not None and r() is t) for r, t in zip(refs, addressing))):
            return plan
    plan = build()
    refs = tuple(None if t is None else weakref.ref(t) for t in addressing)
    entries.append((refs, states, geometry, weakref.ref(tracer) if tracer is not None else (lambda: None), plan))
    return plan
