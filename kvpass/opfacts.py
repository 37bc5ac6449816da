"""Facts about ops, one owner: which ops return views, which write their arguments, which names are in place.

On ATen ops every fact comes from the op's schema (``alias_info``), the source torch's own functionalization
reads: a result with an alias set is a view of the argument with the same set; an argument whose alias set is
written (``Tensor(a!)``) is mutated. Torch-level graphs (Dynamo's ``call_method`` / ``call_function`` on torch
and numpy functions, a ``.pt2`` node whose schema is not loaded) have no schema; there the facts are by name
(:data:`VIEW_NAMES`, :func:`in_place_name`), conservatively.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["VIEW_NAMES", "IN_PLACE_NAMES", "schema_facts", "is_view_op", "in_place_name", "name_facts"]


def schema_facts(schema) -> tuple[list | None, tuple, bool]:
    """``(argument names, written argument positions, result is a view of argument 0)`` of a schema (``None``:
    nothing known)."""
    if schema is None:
        return None, (), False
    names = [a.name for a in schema.arguments]
    writes = tuple(i for i, a in enumerate(schema.arguments) if a.alias_info is not None and a.alias_info.is_write)
    first = schema.arguments[0].alias_info if schema.arguments else None
    view = bool(first is not None and not first.is_write and schema.returns
                and schema.returns[0].alias_info is not None)
    return names, writes, view


def is_view_op(target: Any) -> bool:
    """An ATen op whose result may share memory with an input and that writes nothing (``slice``, ``unbind``,
    ``view``, ``reshape``, ``alias``, ...; ``_unsafe_view`` too, whose schema hides it)."""
    if target is torch.ops.aten._unsafe_view.default:
        return True
    return isinstance(target, torch._ops.OpOverload) and not target._schema.is_mutable and \
        any(r.alias_info is not None for r in target._schema.returns)


#: Torch-level ops (methods and functions of torch and numpy) whose result views their first argument.
VIEW_NAMES = frozenset({
    "view", "_unsafe_view", "reshape", "view_as", "expand", "expand_as", "unsqueeze", "squeeze", "transpose", "t",
    "permute", "slice", "select", "narrow", "alias", "detach", "as_strided", "unflatten", "flatten", "movedim",
    "moveaxis", "swapaxes", "swapdims", "split", "split_with_sizes", "chunk", "unbind", "tensor_split",
    "contiguous", "lift_fresh", "getitem", "_reshape_alias", "view_as_real", "view_as_complex", "unfold",
    "diagonal", "real", "imag",
})

#: Names that write their first argument although they do not end in ``_``: augmented assignment (``a *= 2`` on
#: an array or tensor), item assignment, and numpy's in-place functions.
IN_PLACE_NAMES = frozenset({"iadd", "isub", "imul", "itruediv", "ifloordiv", "imod", "ipow", "imatmul", "iand",
                            "ior", "ixor", "ilshift", "irshift", "__iadd__", "__isub__", "__imul__",
                            "__itruediv__", "__ifloordiv__", "__imod__", "__ipow__", "__imatmul__", "__iand__",
                            "__ior__", "__ixor__", "__ilshift__", "__irshift__", "fill", "put", "copyto", "place",
                            "putmask", "setitem", "__setitem__", "wrapped___setitem__", "delitem", "__delitem__"})


def in_place_name(name: str) -> bool:
    """A torch-level op name that writes its first argument: ``copy_``, ``add_``, ``iadd``, ``setitem``,
    ``np.copyto``, ... (not a dunder such as ``__add__``, nor ``operator``'s ``and_`` / ``or_`` / ``not_``)."""
    if not name:
        return False
    if name in IN_PLACE_NAMES:
        return True
    return name.endswith("_") and not name.endswith("__") and name not in ("and_", "or_", "not_")


def name_facts(name: str) -> tuple[tuple, bool]:
    """``(written argument positions, result is a view of argument 0)`` of a torch-level op by its name."""
    if in_place_name(name):
        return (0,), False
    return (), name in VIEW_NAMES
