"""What must be in force while Dynamo traces a model with host round trips.

A backend callback runs only after Dynamo has traced, so anything that changes *how* Dynamo traces has to be
entered around the call of the compiled model (:func:`kvpass.compile` does that) or installed before the first
trace (``torch.compile(..., backend="kvpass")`` imports the backend before tracing, see ``dynamo_backend``).

- ``allow_unspec_int_on_nn_module``: a cache position stored as an int attribute reached from the module
  (``self.caches[i].pos``) is specialized by default: one graph per decode position. Unspecialized, it becomes a
  SymInt after the first change, and one decode graph serves every position.
- ``np.pad`` of a traced array: Dynamo maps it to ``torch._numpy.pad``, which turns ``pad_width`` into a tensor and
  reads it back (a data-dependent graph break on every call). :func:`traceable_np_pad` keeps a constant
  ``pad_width`` in Python and lowers to ``F.pad`` (``constant_pad_nd``); anything else goes to the original.
- an integer index that is a symbolic int in a write into a tensor (``buf[:, pos] = v``, ``buf[:, p + j] =
  v[:, j]``, ``buf[:, p % W] = v``; a host or device tensor cache, and every numpy write: ``torch._numpy``'s
  ``ndarray.__setitem__`` hands it to ``Tensor.__setitem__``): ``Tensor.__setitem__`` reads it as a Python int
  (``__index__``): a guard ``pos == 4`` and one graph per decode position. :func:`traceable_tensor_setitem` writes
  the same elements through ``slice(i, i + 1)`` instead (guarded ``0 <= i < size``, where the two agree), so the
  position stays symbolic.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["traceable_np_pad", "traceable_tensor_setitem", "install_traceable", "uninstall_traceable", "traceable_installed",
           "tracing_context", "stock_tracing", "install_process_wide", "DYNAMO_CONFIG"]

# Dynamo config kvpass.compile puts in force while tracing.
DYNAMO_CONFIG = {"allow_unspec_int_on_nn_module": True}


def _tnp_map() -> dict:
    from torch._dynamo.variables.misc import get_np_to_tnp_map

    return get_np_to_tnp_map()


def _const_pad_width(pad_width, ndim):
    """Normalize a constant numpy ``pad_width`` to ``[(before, after)] * ndim``; ``None`` if not constant ints."""
    def as_int(x):
        return x if isinstance(x, int) and not isinstance(x, bool) else None

    if as_int(pad_width) is not None:
        return [(pad_width, pad_width)] * ndim
    if not isinstance(pad_width, (tuple, list)):
        return None
    if len(pad_width) == 2 and all(as_int(x) is not None for x in pad_width):
        return [tuple(pad_width)] * ndim
    rows = []
    for row in pad_width:
        if as_int(row) is not None:
            rows.append((row, row))
        elif isinstance(row, (tuple, list)) and len(row) == 2 and all(as_int(x) is not None for x in row):
            rows.append(tuple(row))
        elif isinstance(row, (tuple, list)) and len(row) == 1 and as_int(row[0]) is not None:
            rows.append((row[0], row[0]))
        else:
            return None
    if len(rows) == 1:
        rows = rows * ndim
    return rows if len(rows) == ndim else None


def traceable_np_pad(array, pad_width, mode="constant", **kwargs):
    """``np.pad`` for Dynamo-traced arrays: constant mode with constant ``pad_width`` becomes ``F.pad``.

    Same values as ``np.pad``; other modes or a non-constant ``pad_width`` use ``torch._numpy.pad``.
    """
    import torch._numpy as tnp

    original = _ORIGINAL.get("pad") or tnp.pad
    # Dynamo hands over the traced array as a (fake) tensor; eager callers may pass a torch._numpy ndarray.
    tensor = array.tensor if isinstance(array, tnp.ndarray) else array if isinstance(array, torch.Tensor) else None
    extra = set(kwargs) - {"constant_values"}
    value = kwargs.get("constant_values", 0)
    rows = _const_pad_width(pad_width, tensor.ndim) if tensor is not None else None
    if mode != "constant" or extra or rows is None or not isinstance(value, (int, float)) or any(
            b < 0 or a < 0 for b, a in rows):
        return original(array, pad_width, mode, **kwargs)
    flat = [x for row in reversed(rows) for x in row]
    return tnp.ndarray(F.pad(tensor, flat, value=value))


# Dynamo only accepts torch._numpy functions in its numpy map (it asserts on the module name); this function is a
# drop-in for torch._numpy.pad, so it says so.
traceable_np_pad.__module__ = "torch._numpy._funcs"

_ORIGINAL: dict = {}


def _int_index(i) -> bool:
    return isinstance(i, (int, torch.SymInt)) and not isinstance(i, bool)


def _symint_index_as_slices(shape, index):
    """``(key, afters)`` such that ``tensor[key] = _size_one_dims(value, afters)`` writes the elements
    ``tensor[index] = value`` writes, with every SymInt of ``index`` turned into ``slice(i, i + 1)``; ``None``
    where that is not proven (then the caller uses the original write).

    ``a[..., i, ...] = v`` with ``i`` a SymInt and ``0 <= i < a.shape[dim]`` writes the same elements as
    ``a[..., i:i + 1, ...] = v'``, where ``v'`` is ``v`` with a size-1 dim where ``i`` removed one (when ``v``
    reaches that dim; broadcasting is otherwise unchanged). The bounds are checked with Python ``bool``s of
    SymInts, which Dynamo turns into guards (ranges, not values): a call outside them recompiles and gets the
    original. Indexes with anything but ints, SymInts, slices and one ``...`` (tensors, arrays, ``None``,
    booleans) get ``None``.
    """
    key = index if isinstance(index, tuple) else (index,)
    if not any(isinstance(i, torch.SymInt) for i in key) or not all(
            _int_index(i) or isinstance(i, slice) or i is Ellipsis for i in key) or \
            sum(i is Ellipsis for i in key) > 1:
        return None
    ndim, consumed = len(shape), sum(i is not Ellipsis for i in key)
    if consumed > ndim:
        return None
    full = []
    for i in key:
        full += [slice(None)] * (ndim - consumed) if i is Ellipsis else [i]
    full += [slice(None)] * (ndim - len(full))
    from torch.fx.experimental.symbolic_shapes import guard_or_false

    for d, i in enumerate(full):  # guards on ranges: where slice(i, i + 1) and the index i select the same
        # (guard_or_false: an unbacked index whose range is not known keeps the original write, no error)
        if isinstance(i, torch.SymInt) and not (guard_or_false(0 <= i) and guard_or_false(i < shape[d])):
            return None
    kept = [not (isinstance(i, int) and not isinstance(i, torch.SymInt)) for i in full]  # dims of the target
    afters = []  # per converted index, right to left: the target dims to its right (converted ones included)
    for d in reversed(range(ndim)):
        if isinstance(full[d], torch.SymInt):
            afters.append(sum(kept[d + 1 :]))
            full[d] = slice(full[d], full[d] + 1)
    return tuple(full), afters


def _size_one_dims(value, afters):
    """``value`` with a size-1 dim where each converted index removed one (where ``value`` reaches that dim)."""
    for after in afters:
        if isinstance(value, torch.Tensor) and value.ndim > after:
            value = value.unsqueeze(value.ndim - after)
    return value


def traceable_tensor_setitem(self, index, value):
    """``torch.Tensor.__setitem__`` that keeps a symbolic integer index symbolic: ``buf[:, pos] = v`` into a
    tensor (a host tensor cache, or any cache tensor) reads ``pos`` as a Python int in stock torch (``__index__``
    in the C++ indexing: a guard ``pos == 4`` and one graph per decode position). Written through
    ``slice(i, i + 1)`` instead where :func:`_symint_index_as_slices` proves they write the same elements; every
    other write (all eager ones: no SymInt outside tracing) goes to the original unchanged."""
    converted = _symint_index_as_slices(self.shape, index) if isinstance(index, (tuple, torch.SymInt)) else None
    if converted is None:
        return _TENSOR_SETITEM(self, index, value)
    key, afters = converted
    return _TENSOR_SETITEM(self, key, _size_one_dims(value, afters))


_TENSOR_SETITEM = torch._C.TensorBase.__setitem__


def install_traceable() -> None:
    """Make Dynamo trace ``np.pad`` through :func:`traceable_np_pad` and tensor writes (numpy writes among them)
    through :func:`traceable_tensor_setitem` (idempotent, process-wide).

    Safe to leave installed: each computes what the original computes and defers to it otherwise.
    """
    m = _tnp_map()
    if m.get(np.pad) is not traceable_np_pad:
        _ORIGINAL.setdefault("pad", m.get(np.pad))
        m[np.pad] = traceable_np_pad
    if torch.Tensor.__dict__.get("__setitem__") is not traceable_tensor_setitem:
        _ORIGINAL.setdefault("tensor_setitem", torch.Tensor.__dict__.get("__setitem__"))
        torch.Tensor.__setitem__ = traceable_tensor_setitem


def traceable_installed() -> bool:
    """Whether the traceable substitutes of :func:`install_traceable` are in force."""
    return _tnp_map().get(np.pad) is traceable_np_pad


def uninstall_traceable() -> None:
    """Undo :func:`install_traceable`."""
    if "pad" in _ORIGINAL:
        _tnp_map()[np.pad] = _ORIGINAL["pad"]
    if torch.Tensor.__dict__.get("__setitem__") is traceable_tensor_setitem:
        if _ORIGINAL.get("tensor_setitem") is None:  # torch.Tensor inherits TensorBase's
            del torch.Tensor.__setitem__
        else:
            torch.Tensor.__setitem__ = _ORIGINAL["tensor_setitem"]


def install_process_wide() -> None:
    """Put :data:`DYNAMO_CONFIG` and the traceable substitutes in force for the whole process (what naming
    ``backend="kvpass"`` does; see ``kvpass.registered_backend``)."""
    for key, value in DYNAMO_CONFIG.items():
        setattr(torch._dynamo.config, key, value)
    install_traceable()


@contextlib.contextmanager
def tracing_context(dynamo_config: dict | None = None):
    """Scoped: :data:`DYNAMO_CONFIG` (or ``dynamo_config``) and the traceable substitutes (:func:`install_traceable`)."""
    installed_before = traceable_installed()
    install_traceable()
    try:
        with torch._dynamo.config.patch(dynamo_config if dynamo_config is not None else DYNAMO_CONFIG):
            yield
    finally:
        if not installed_before:
            uninstall_traceable()


@contextlib.contextmanager
def stock_tracing():
    """Scoped: stock Dynamo (its own ``np.pad`` handling, the default of each :data:`DYNAMO_CONFIG` key), whatever
    naming ``backend="kvpass"`` put in force process-wide before; restored after. For baselines."""
    installed_before = traceable_installed()
    uninstall_traceable()
    defaults = {key: torch._dynamo.config._config[key].default for key in DYNAMO_CONFIG}
    try:
        with torch._dynamo.config.patch(defaults):
            yield
    finally:
        if installed_before:
            install_traceable()
