"""What differs between the supported torch lines (2.13, 2.14, 2.15), in one place.

Every version switch of kvpass and of its tests lives here, next to the private torch API it is about, with
what each line does. A new torch line is supported by reading this module first: each name says what to check.

- :data:`TORCH_LINE`: the installed torch as ``(major, minor)``.
- :data:`MAKE_FX_DETACH`: the op ``make_fx`` records for ``Tensor.detach()`` (``aten.detach`` on 2.13,
  ``aten.alias`` from 2.14 on; ``torch.export`` of such a graph keeps an unused ``alias`` chain, where 2.13's
  export drops the unused ``detach`` chain).
- :data:`SDPA_UNBATCHED_DECOMPOSED`: whether ``make_fx`` / AOTAutograd / ``torch.export`` decompose
  ``scaled_dot_product_attention`` on 3-D (unbatched) inputs into ``bmm`` + ``_safe_softmax`` + ``bmm`` (2.13)
  or keep one fused op on the inputs unsqueezed to 4-D (2.14 on: ``_scaled_dot_product_flash_attention_for_cpu``
  on CPU).
- :data:`NDARRAY_GETATTR`: the method of Dynamo's ``NumpyNdarrayVariable`` that answers an attribute read of a
  traced numpy array (``var_getattr`` on 2.13, ``tp_getattro_impl`` from 2.14 on; same ``(self, tx, name)``).
- :func:`set_tensor_method`: replace the handler Dynamo's ``TensorVariable`` runs for ``tensor.NAME(...)``
  (the ``method_NAME`` attribute on 2.13; from 2.14 on Dynamo dispatches through a ``tp_methods`` table of
  ``Method`` entries built when the class is defined, so the attribute alone changes nothing).
- :func:`refresh_variable_builder_dispatch`: Dynamo's ``VariableBuilder`` caches its type-to-``wrap_*`` table
  (``functools.cache``); a replaced ``wrap_*`` method is called only once the cache is cleared.
- :func:`dynamo_attribute_writes`: the attribute assignments Dynamo recorded as side effects of the frame it is
  tracing (``torch._dynamo`` internals), without the closure cells a traced generator expression or lambda
  creates (recorded as ``cell_contents`` writes from 2.14 on; they are locals of the step, not model state).
"""

from __future__ import annotations

from typing import Any, Iterator

import torch

__all__ = ["TORCH_LINE", "MAKE_FX_DETACH", "SDPA_UNBATCHED_DECOMPOSED", "NDARRAY_GETATTR", "set_tensor_method",
           "refresh_variable_builder_dispatch", "dynamo_attribute_writes"]


def _line(version: str) -> tuple[int, int]:
    major, minor = version.split("+")[0].split(".")[:2]
    return int(major), int(minor)


#: The installed torch's ``(major, minor)``, e.g. ``(2, 15)`` for ``2.15.0+cpu``.
TORCH_LINE: tuple[int, int] = _line(str(torch.__version__))

#: The op that ``make_fx`` (real, fake or symbolic mode) records for ``Tensor.detach()`` of a tensor that does not
#: require grad: ``aten.detach.default`` on torch 2.13, ``aten.alias.default`` from 2.14 on.
MAKE_FX_DETACH = torch.ops.aten.detach.default if TORCH_LINE < (2, 14) else torch.ops.aten.alias.default

#: ``True`` where ``make_fx``, AOTAutograd and ``torch.export``'s decompositions turn
#: ``F.scaled_dot_product_attention`` on 3-D (unbatched) inputs into ``bmm`` + ``_safe_softmax`` + ``bmm``
#: (torch 2.13); from 2.14 on it stays one fused ATen op whose query/key/value are the inputs ``unsqueeze``d to 4-D.
SDPA_UNBATCHED_DECOMPOSED: bool = TORCH_LINE < (2, 14)

#: The name of the ``torch._dynamo.variables.tensor.NumpyNdarrayVariable`` method, ``(self, tx, name)``, that
#: Dynamo calls for ``array.name`` on a traced numpy array: ``var_getattr`` on torch 2.13; from 2.14 on Dynamo
#: models CPython's ``tp_getattro`` and the method is ``tp_getattro_impl`` (``var_getattr`` is gone).
NDARRAY_GETATTR: str = "var_getattr" if TORCH_LINE < (2, 14) else "tp_getattro_impl"


def set_tensor_method(name: str, handler: Any) -> Any:
    """Make Dynamo run ``handler(self, tx, *args, **kwargs)`` for ``tensor.name(...)`` on a traced tensor
    (``TensorVariable`` and its subclasses that share the entry); returns the handler it replaced. Setting the
    returned handler back undoes it."""
    from torch._dynamo.variables.tensor import TensorVariable

    attr = f"method_{name}"
    old = TensorVariable.__dict__[attr]
    setattr(TensorVariable, attr, handler)
    if TORCH_LINE >= (2, 14):  # the tp_methods table holds the function itself
        pending, seen = [TensorVariable], set()
        while pending:
            cls = pending.pop()
            pending.extend(cls.__subclasses__())
            entry = cls.__dict__.get("tp_methods", {}).get(name)
            if entry is not None and id(entry) not in seen and entry.handler is old:
                seen.add(id(entry))
                entry.handler = handler
    return old


def refresh_variable_builder_dispatch() -> None:
    """Clear ``VariableBuilder``'s cached type dispatch table so a replaced ``wrap_*`` method is the one called
    (the table holds the functions themselves: torch 2.13-2.15 cache it with ``functools.cache``)."""
    from torch._dynamo.variables.builder import VariableBuilder

    impl = VariableBuilder.__dict__.get("_type_dispatch_impl")
    cache_clear = getattr(getattr(impl, "__func__", impl), "cache_clear", None)
    if cache_clear is not None:
        cache_clear()


def _is_trace_local_cell(item: Any) -> bool:
    """A closure cell created inside the traced frame (a generator expression's or a lambda's free variable):
    Dynamo 2.14+ records writes to it (``cell_contents``) with the other side effects; it has no source, since
    nothing outside the step can reach it."""
    try:
        from torch._dynamo.variables.misc import CellVariable
    except ImportError:  # pragma: no cover - a Dynamo that moved it also moved the record
        return False
    return isinstance(item, CellVariable) and getattr(item, "source", None) is None


def dynamo_attribute_writes() -> Iterator[tuple[Any, str, Any]]:
    """``(object variable, attribute name, value variable)`` for every attribute the frame Dynamo is tracing now
    assigns (``self.k = torch.cat(...)``, ``self.pos += t``), from Dynamo's side-effect record; call it from a
    backend. Closure cells created inside the step are left out (see the module docstring). Raises whatever
    Dynamo raises where the record is not where torch 2.13-2.15 keep it: callers catch and degrade."""
    from torch._dynamo.symbolic_convert import InstructionTranslator

    tx = InstructionTranslator.current_tx()
    for item, attrs in tx.output.side_effects.store_attr_mutations.items():
        if _is_trace_local_cell(item):
            continue
        for name, value in attrs.items():
            yield item, name, value
