"""What must be in force while Dynamo traces a model with host round trips.

A backend callback runs only after Dynamo has traced, so anything that changes *how* Dynamo traces has to be
entered around the call of the compiled model (:func:`kvpass.compile` does that) or installed before the first
trace (``torch.compile(..., backend="kvpass")`` imports the backend before tracing, see ``dynamo_backend``).

- ``allow_unspec_int_on_nn_module``: a cache position stored as an int attribute reached from the module
  (``self.caches[i].pos``) is specialized by default: one graph per decode position. Unspecialized, it becomes a
  SymInt after the first change, and one decode graph serves every position.
- ``capture_dynamic_output_shape_ops``: an eviction that keeps the tokens a mask selects (H2O's
  ``past[mask].view(b, h, -1, d)`` after ``mask.scatter(-1, keep_idx, 1)``) calls ``nonzero``, whose output size
  depends on the data: by default Dynamo breaks the graph there (and, inside a loop over layers, runs the whole
  frame eagerly), every step. Captured, the size is an unbacked symbol that the following ``view`` checks at run
  time, and the cache keeps one graph per phase.
- ``np.pad`` of a traced array: Dynamo maps it to ``torch._numpy.pad``, which turns ``pad_width`` into a tensor and
  reads it back (a data-dependent graph break on every call). :func:`traceable_np_pad` keeps a constant
  ``pad_width`` in Python and lowers to ``F.pad`` (``constant_pad_nd``); anything else goes to the original.
- an integer index that is a symbolic int in a write into a tensor (``buf[:, pos] = v``, ``buf[:, p + j] =
  v[:, j]``, ``buf[:, p % W] = v``; a host or device tensor cache, and every numpy write: ``torch._numpy``'s
  ``ndarray.__setitem__`` hands it to ``Tensor.__setitem__``): ``Tensor.__setitem__`` reads it as a Python int
  (``__index__``): a guard ``pos == 4`` and one graph per decode position. :func:`traceable_tensor_setitem` writes
  the same elements through ``slice(i, i + 1)`` instead (guarded ``0 <= i < size``, where the two agree), so the
  position stays symbolic.
- ``ndarray.dtype`` of a traced numpy array (``a.astype(buf.dtype)``, ``np.zeros(shape, a.dtype)``, ``if a.dtype !=
  buf.dtype``): stock Dynamo breaks the graph there (the cache's write and read then run outside any graph).
  :func:`traceable_ndarray_getattr` answers with the numpy dtype of the traced tensor, a constant: a tensor's dtype
  is fixed while a graph runs (Dynamo guards on every input's dtype and the rest follow from them).
  ``a.astype(dtype, copy=False)`` (``torch._numpy`` raises ``NotImplementedError``, a graph break) goes through
  :func:`traceable_astype`: ``a`` itself where the dtype is already ``dtype`` (numpy's meaning), else a copy;
  and ``a.astype(a.dtype)`` a copy (stock ``torch._numpy`` returns ``a`` itself: an edit of the copy reached ``a``).
- a position read back from a tensor (``int(pos_t.item())``, ``input_pos[0].item()`` + ``narrow``,
  ``input_pos.tolist()``): stock Dynamo breaks the graph at ``.item()`` and specializes the Python int it gets
  back (a graph per position until automatic dynamic shapes catch up, the cache split over several graphs).
  ``capture_scalar_outputs`` (in :data:`DYNAMO_CONFIG`) makes it an unbacked SymInt instead, one graph for
  every position; :func:`integer_item_only` keeps the stock graph break for ``.item()`` of floating-point and
  boolean tensors (a loss, a flag: not positions), so the switch reaches integer positions only. Writes at such
  a position go through :func:`traceable_tensor_setitem` (an index tensor where the range is not known).
- K/V kept as ``bytes`` (``a.tobytes()``, rebuilt with ``np.frombuffer``): stock Dynamo graph-breaks at
  ``tobytes`` and guards on the bytes' value (a recompile every step), and crashes (``AssertionError: Expected
  np.nditer base``) where it wraps an array over bytes. :func:`untraceable_ndarray_call` and
  :func:`untraceable_ndarray` warn once, in one line naming the user's line and the idiom, and have Dynamo run
  that function eagerly.
- ``ndarray.copy()`` of a traced array: numpy's default ``order="C"`` gives a C-contiguous copy, while
  ``torch._numpy`` clones with the source's strides (a transposed K stays transposed): a cache first stored as
  ``k.cpu().numpy().copy()`` then has another layout than every later concatenation, and Dynamo recompiles for
  the strides. :func:`traceable_ndarray_copy` copies C-contiguous, as numpy does.
- a host cache created by a call (``if self.k is None: self.k = k_np``, then ``np.concatenate`` / ``torch.cat``
  with each step's tokens): Dynamo traces a value it sees for the first time with static sizes, so the first
  decode step gets a graph for that one length and the next step recompiles with the length symbolic.
  :class:`HostCacheShapes` remembers, between calls of :func:`kvpass.compile`'s model, which host arrays of the
  model appeared in the last call and tells Dynamo's automatic-dynamic state (what it learns from a recompile)
  that their token dims are dynamic, so the first decode graph already has the length symbolic.
"""

from __future__ import annotations

import contextlib
import functools
import types
import weakref

import numpy as np
import torch
import torch.nn.functional as F

from .compat import NDARRAY_GETATTR, refresh_variable_builder_dispatch, set_tensor_method

__all__ = ["traceable_np_pad", "traceable_tensor_setitem", "traceable_ndarray_getattr", "traceable_astype",
           "untraceable_ndarray", "untraceable_ndarray_call", "integer_item_only", "traceable_ndarray_copy",
           "install_traceable", "uninstall_traceable", "traceable_installed", "tracing_context", "stock_tracing",
           "install_process_wide", "DYNAMO_CONFIG", "HostCacheShapes"]

# Dynamo config kvpass.compile puts in force while tracing.
DYNAMO_CONFIG = {"allow_unspec_int_on_nn_module": True, "capture_scalar_outputs": True,
                 "capture_dynamic_output_shape_ops": True}


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
    if not any(isinstance(i, torch.SymInt) for i in key):
        return None
    full = _full_key(key, len(shape))
    if full is None:
        return None
    ndim = len(shape)
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


def _full_key(key: tuple, ndim: int) -> list | None:
    """``key`` (ints, SymInts, slices, at most one ``Ellipsis``) with the ``Ellipsis`` and the missing trailing
    dims spelled out as ``slice(None)``, one entry per dim; ``None`` for any other key or one with too many."""
    if not all(_int_index(i) or isinstance(i, slice) or i is Ellipsis for i in key) or \
            sum(i is Ellipsis for i in key) > 1:
        return None
    consumed = sum(i is not Ellipsis for i in key)
    if consumed > ndim:
        return None
    full = []
    for i in key:
        full += [slice(None)] * (ndim - consumed) if i is Ellipsis else [i]
    return full + [slice(None)] * (ndim - len(full))


def _size_one_dims(value, afters):
    """``value`` with a size-1 dim where each converted index removed one (where ``value`` reaches that dim)."""
    for after in afters:
        if isinstance(value, torch.Tensor) and value.ndim > after:
            value = value.unsqueeze(value.ndim - after)
    return value


def _unbacked_index_as_tensor(shape, index, device):
    """``(key, afters)`` such that ``tensor[key] = _size_one_dims(value, afters)`` writes the elements
    ``tensor[index] = value`` writes, for an index whose one integer is an unbacked SymInt ``u`` (a position read
    back with ``.item()`` / ``.tolist()``) among slices: ``u`` becomes the index tensor ``[u]`` (one advanced index
    keeps its dim in place, with size 1; negative counts from the end and out of range raises, as for ``u``).
    Stock indexing calls ``__index__`` on ``u``: a data-dependent error. ``None`` for any other index."""
    from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

    key = index if isinstance(index, tuple) else (index,)
    ints = [i for i in key if _int_index(i)]
    if len(ints) != 1 or not isinstance(ints[0], torch.SymInt) or not free_unbacked_symbols(ints[0]):
        return None
    full = _full_key(key, len(shape))
    if full is None:
        return None
    d = next(d for d, i in enumerate(full) if _int_index(i))
    full[d] = torch.full((1,), full[d], dtype=torch.long, device=device)
    return tuple(full), [len(shape) - d - 1]


def traceable_tensor_setitem(self, index, value):
    """``torch.Tensor.__setitem__`` that keeps a symbolic integer index symbolic: ``buf[:, pos] = v`` into a
    tensor (a host tensor cache, or any cache tensor) reads ``pos`` as a Python int in stock torch (``__index__``
    in the C++ indexing: a guard ``pos == 4`` and one graph per decode position). Written through
    ``slice(i, i + 1)`` instead where :func:`_symint_index_as_slices` proves they write the same elements, and an
    unbacked position whose range is not known (``.item()``) through an index tensor
    (:func:`_unbacked_index_as_tensor`); every other write (all eager ones: no SymInt outside tracing) goes to the original unchanged."""
    converted = _symint_index_as_slices(self.shape, index) if isinstance(index, (tuple, torch.SymInt)) else None
    if converted is None and isinstance(index, (tuple, torch.SymInt)):
        converted = _unbacked_index_as_tensor(self.shape, index, self.device)
    if converted is None:
        return _TENSOR_SETITEM(self, index, value)
    key, afters = converted
    return _TENSOR_SETITEM(self, key, _size_one_dims(value, afters))


_TENSOR_SETITEM = torch._C.TensorBase.__setitem__


def integer_item_only(self, tx, *args, **kwargs):
    """Dynamo's ``TensorVariable.method_item`` with ``capture_scalar_outputs`` in force for integer tensors only:
    ``.item()`` of a floating-point, complex or boolean tensor gets the stock behaviour without the switch (a graph
    break), whatever the switch says."""
    dtype = getattr(self, "dtype", None)
    if dtype is not None and (dtype.is_floating_point or dtype.is_complex or dtype is torch.bool):
        with torch._dynamo.config.patch(capture_scalar_outputs=False):
            return _ORIGINAL["item"](self, tx, *args, **kwargs)
    return _ORIGINAL["item"](self, tx, *args, **kwargs)


def _ndarray_variable():
    from torch._dynamo.variables.tensor import NumpyNdarrayVariable

    return NumpyNdarrayVariable


def _numpy_dtype(dtype: torch.dtype):
    """The numpy dtype ``tensor.numpy()`` would have, or ``None`` where numpy has none (bfloat16, ...)."""
    try:
        return torch.empty((), dtype=dtype).numpy().dtype
    except (TypeError, RuntimeError):
        return None


def traceable_astype(self, dtype, order="K", casting="unsafe", subok=True, copy=True):
    """``torch._numpy.ndarray.astype`` with numpy's meaning: ``copy=False`` is the array itself where it already has
    ``dtype`` (``torch._numpy`` raises ``NotImplementedError``), else a converted copy; ``copy=True`` (the default)
    at the array's own dtype is a copy (``torch._numpy`` returns ``tensor.to(dtype)``, the array itself: a write
    into the "copy" reached the original, unlike numpy). Other calls go to the original unchanged."""
    original = _ORIGINAL["astype"]
    if order == "K" and casting == "unsafe" and subok:
        from torch._numpy import _dtypes

        same = _dtypes.dtype(dtype).torch_dtype == self.tensor.dtype
        if copy is False:
            if same:
                return self
            copy = True
        elif same:  # torch._numpy's astype returns ``tensor.to(dtype)``: the array itself, not numpy's copy
            return type(self)(self.tensor.clone())
    return original(self, dtype, order, casting, subok, copy)


_warned_lines: set = set()


def _cannot_be_made_writeable(value) -> bool:
    """A read-only numpy array whose memory belongs to an immutable object (``np.frombuffer(b)`` of ``bytes``):
    Dynamo's ``wrap_numpy_ndarray`` asserts on these (it only expects ``np.nditer`` bases). Probed on a view, so
    ``value``'s own flags are left as they are."""
    if not isinstance(value, np.ndarray) or value.flags.writeable:
        return False
    try:
        value.view().flags.writeable = True
    except ValueError:
        return not isinstance(value.base, np.nditer)
    return False


def _skip_root_frame(error):
    """``error`` (Dynamo's ``Unsupported`` with ``skip_frame``) made to skip the frame Dynamo was asked to compile
    even when raised in a function it inlines (Dynamo resets ``skip_frame`` at each inlined call: a graph break
    at the call, then the callee as a frame of its own, a graph before and after it)."""
    from torch._dynamo.exc import Unsupported

    class SkipRootFrame(type(error) if isinstance(error, Unsupported) else Unsupported):
        skip_frame = property(lambda self: True, lambda self, value: None)

    error.__class__ = SkipRootFrame
    return error


def _run_eagerly(tx, idiom: str, why: str, root: bool = False):
    """Warn once per user line (``kvpass.KVPassWarning``, one line: the user's line and the idiom) and have Dynamo
    run the function being traced eagerly (``skip_frame``: it has not run yet, and Dynamo does not trace it again;
    the functions it calls are traced on their own)."""
    import linecache
    import warnings

    from torch._dynamo.exc import unimplemented

    from .errors import KVPassWarning

    code, lineno = tx.f_code, getattr(tx, "lineno", None)
    where = f"{code.co_filename}:{lineno}"
    text = linecache.getline(code.co_filename, lineno).strip() if lineno else ""
    if where not in _warned_lines:
        _warned_lines.add(where)
        warnings.warn(f"kvpass: {idiom} at {where}: {text}: {why}; this function runs eagerly (keep K/V as an "
                      "array or a tensor to compile it).", KVPassWarning, stacklevel=2)
    try:
        unimplemented(gb_type=f"kvpass: {idiom}", context=where, explanation=why, hints=[], skip_frame=True)
    except Exception as e:
        raise (_skip_root_frame(e) if root else e) from None


def untraceable_ndarray(self, value):
    """Dynamo's ``VariableBuilder.wrap_numpy_ndarray``, except for an array over a ``bytes`` object (stock Dynamo:
    ``AssertionError: Expected np.nditer base``): :func:`_run_eagerly`. Every other array goes to the original."""
    if _cannot_be_made_writeable(value):
        _run_eagerly(self.tx, "K/V rebuilt from bytes (np.frombuffer of a bytes object)",
                     "Dynamo cannot trace an array over bytes")
    return _ORIGINAL["wrap_numpy_ndarray"](self, value)


def untraceable_ndarray_call(self, tx, name, args, kwargs):
    """Dynamo's ``NumpyNdarrayVariable.call_method``, except ``a.tobytes()`` / ``a.tostring()`` of a traced array
    (stock: a graph break, then a guard on the bytes' value in the function that resumes: a recompile every
    step): :func:`_run_eagerly`. Every other method goes to the original."""
    if name in ("tobytes", "tostring"):
        _run_eagerly(tx, f"K/V kept as bytes (ndarray.{name}())",
                     "Dynamo guards on the value of bytes (a recompile for every new K/V)")
    return _ORIGINAL["ndarray_call"](self, tx, name, args, kwargs)


def untraceable_float_tolist(self, tx, *args, **kwargs):
    """Dynamo's ``TensorVariable.method_tolist``, except ``.tolist()`` of a floating-point (or complex) tensor of at
    least one dim: K/V kept as Python lists of floats (llama2.c pure-Python ports: ``key_cache[l][pos] =
    k.tolist()``, then ``torch.tensor(key_cache[l][:pos + 1])``). Stock Dynamo breaks the graph there, then traces
    every float as a graph input and guards on the lists' lengths (a graph per step, 38 for 8 steps): instead
    :func:`_run_eagerly`. Integer tensors (positions) and 0-d tensors (a loss, a flag) go to the original."""
    dtype = getattr(self, "dtype", None)
    ndim = getattr(self, "ndim", None)
    if dtype is not None and (dtype.is_floating_point or dtype.is_complex) and ndim != 0:
        _run_eagerly(tx, "K/V kept as Python lists of floats (tensor.tolist())",
                     "Dynamo cannot trace float values that leave the tensor (a graph per step)", root=True)
    return _ORIGINAL["tolist"](self, tx, *args, **kwargs)


#: ``root object -> {list source: [(trace, what it saw)]}``: the lengths at which each trace found a Python list the
#: model holds and the places it wrote into it, per object the list is reached from (a module, a cache: weakly
#: held, so a cache a user drops is not kept alive); :data:`_ROW_LISTS_FLAGGED`: ``id(list) -> (weakref to its
#: root, source)`` of lists found growing, valid while the root lives (in any frame that reaches the list)
_ROW_LISTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_ROW_LISTS_FLAGGED: dict = {}


def _python_type(vt):
    """The Python type of a value, or of the value a Dynamo variable stands for (without realizing a lazy one);
    ``None`` where Dynamo cannot say."""
    from torch._dynamo.variables.base import VariableTracker
    from torch._dynamo.variables.lazy import LazyVariableTracker

    if not isinstance(vt, VariableTracker):
        return type(vt)
    try:
        if isinstance(vt, LazyVariableTracker):
            return vt.unwrap().python_type() if vt.is_realized() else vt.peek_type()
        return vt.python_type()
    except (NotImplementedError, AssertionError):
        return None


def _holds_rows(items) -> bool:
    """A list (its Dynamo variables, or the real items) whose first item is a row of values: a tensor, a numpy
    array, or a list (of floats)."""
    kind = _python_type(items[0]) if items else None
    return kind is not None and issubclass(kind, (torch.Tensor, np.ndarray, list))


def _float_rows(items) -> bool:
    """A list (variables or real items) whose first item is a list of Python floats (``k.tolist()`` rows): Dynamo
    guards on every value."""
    from torch._dynamo.variables.lazy import LazyVariableTracker
    from torch._dynamo.variables.lists import ListVariable

    if not items:
        return False
    first = items[0]
    if isinstance(first, LazyVariableTracker):
        if not first.is_realized():
            first = first.peek_value()
        else:
            first = first.unwrap()
    if isinstance(first, list):
        return bool(first) and isinstance(first[0], float)
    return isinstance(first, ListVariable) and bool(first.items) and _python_type(first.items[0]) is float


def _list_written_at(items, name, args):
    """The index a write into a Python list writes (``append`` / ``extend`` / ``insert`` write at the end), a
    slice's bounds, ``"symbolic"`` for a position Dynamo would specialize, ``None`` for no write."""
    if name in ("append", "extend", "insert"):
        return len(items)
    if name == "__setitem__" and args:
        if not args[0].is_python_constant():
            return "symbolic"
        key = args[0].as_python_constant()
        return (key.start, key.stop) if isinstance(key, slice) else key
    return None


def _held_list(tx, source):
    """``(list, root)``: the real Python list ``source`` names in the frame being traced (``None`` if it cannot be
    evaluated here) and the object it is reached from (``self``; ``None`` where it cannot be weakly held: the list
    is then not remembered between traces)."""
    root_tx = tx.output.root_tx
    scope = ({"G": root_tx.f_globals, **root_tx.f_globals}, {"L": root_tx.f_locals})
    try:
        value = source.get_value(*scope, {})
    except Exception:  # noqa: BLE001 - a source that cannot be evaluated here: not tracked
        return None, None
    try:
        root = source.get_base().get_value(*scope, {})
        weakref.ref(root)
        hash(root)
    except Exception:  # noqa: BLE001 - a list, a dict, an unhashable object: not weakly held
        root = None
    return (value if isinstance(value, list) else None), root


def _flagged(held: list) -> bool:
    entry = _ROW_LISTS_FLAGGED.get(id(held))
    return entry is not None and entry[0]() is not None


def _check_row_list(tx, var, name, args):
    """:func:`untraceable_row_list`'s rule for one list variable ``var`` (the list a method is called on, or the
    list an item access returned)."""
    from torch._dynamo.variables.lists import ListVariable
    from torch._dynamo.variables.tensor import NumpyNdarrayVariable, TensorVariable

    from torch._dynamo.variables.lazy import LazyVariableTracker

    source = getattr(var, "source", None)
    if isinstance(var, LazyVariableTracker) and var.is_realized():
        var = var.unwrap()
    lazy = isinstance(var, LazyVariableTracker) and var.peek_type() is list  # not traced yet: the real list is it
    if not (isinstance(var, ListVariable) or lazy) or source is None:
        return
    written = name in ("append", "extend", "insert", "__setitem__") and bool(args) and isinstance(
        args[-1], (TensorVariable, NumpyNdarrayVariable))
    held, root = _held_list(tx, source)
    if held is None:
        return
    items = held if lazy else var.items
    if not (_holds_rows(items) or written):
        return
    at = _list_written_at(items, name, args)
    seen = {("len", len(items))} | ({("at", at)} if at is not None else set())
    if name in ("append", "extend", "insert"):  # the length it leaves: what the next trace finds (layers at prefill)
        seen.add(("len", len(items) + 1))
    earlier: set = set()
    if root is not None:
        traces = _ROW_LISTS.setdefault(root, {}).setdefault(source.name, [])
        if not traces or traces[-1][0] != id(tx.output):
            traces.append((id(tx.output), set()))
        earlier = set().union(*(seen for _trace, seen in traces[:-1]))
        traces[-1][1].update(seen)
    symbolic = at == "symbolic" or name == "__getitem__" and bool(args) and not args[0].is_python_constant()
    floats = _float_rows(items)
    if _flagged(held) or symbolic or floats or (earlier and not seen <= earlier):
        if root is not None:
            _ROW_LISTS_FLAGGED[id(held)] = (weakref.ref(root), source.name)
        why = "rows of Python floats: it guards on every value" if floats else \
            "indexed at a symbolic position" if symbolic else "a new length every step"
        _run_eagerly(tx, "K/V kept as a Python list of rows that grows with the position",
                     f"Dynamo specializes {source.name} ({why}: a graph per step)", root=True)


def untraceable_row_list(self, tx, name, args, kwargs):
    """Dynamo's ``ListVariable.call_method``, except on a Python list of K/V rows the model holds (a list reached
    from the frame's inputs whose items are tensors, arrays or lists of floats) that grows with the position:
    ``keys[l].append(k_row)``, ``key_cache[l][pos] = k_row`` or ``k.tolist()``, ``torch.stack(key_cache[l][:pos +
    1])``. Dynamo guards on a list's length and on every index it is given, so each step is a new graph until the
    recompile limit; instead :func:`_run_eagerly`, when the list is

    - indexed or sliced at a symbolic position (``key_cache[l][:end]``, ``key_cache[l][pos] = row``),
    - written at an index no earlier trace wrote it at (``append`` at a new length), or found at a length no
      earlier trace found it at (a reader of a list others grow), or
    - a list found growing before (in any frame: the functions that read or fill it run eagerly too); an item
      access that returns such a list counts (``torch.stack(self.keys[layer])``).

    A list written and found at the same places by every trace (one cache per layer, replaced each step; layers
    appended once at the prefill) goes to the original, as does every list the frame created itself."""
    _check_row_list(tx, self, name, args)
    out = _ORIGINAL["list_call"](self, tx, name, args, kwargs)
    if name == "__getitem__":
        _check_row_list(tx, out, "", [])
    return out


def untraceable_row_list_item(self, tx, arg):
    """Dynamo's ``ListVariable.getitem_const`` (``lst[i]``, ``lst[a:b]``) under :func:`untraceable_row_list`'s rule,
    for the list read and for a list the read returns (``self.keys[layer]``)."""
    _check_row_list(tx, self, "__getitem__", [arg])
    out = _ORIGINAL["list_item"](self, tx, arg)
    _check_row_list(tx, out, "", [])
    return out


def traceable_ndarray_getattr(self, tx, name):
    """Dynamo's ``NumpyNdarrayVariable`` attribute read (:data:`kvpass.compat.NDARRAY_GETATTR`) with ``dtype`` answered: the numpy dtype of the traced tensor
    behind the array, as the constant numpy dtype Dynamo already traces (``np.dtype(...)`` objects: comparisons,
    ``.itemsize``, ``.name``, passing it to ``astype`` / ``np.zeros``). Every other attribute, and a dtype numpy
    has no name for, goes to the original (a graph break for ``dtype``, as in stock torch)."""
    if name == "dtype":
        value = self.as_proxy().node.meta.get("example_value")
        np_dtype = _numpy_dtype(value.dtype) if isinstance(value, torch.Tensor) else None
        if np_dtype is not None:
            from torch._dynamo.variables.misc import NumpyDTypeVariable

            return NumpyDTypeVariable(np_dtype)
    return _ORIGINAL["ndarray_getattr"](self, tx, name)


def traceable_ndarray_copy(self, order="C"):
    """``torch._numpy.ndarray.copy`` with numpy's layout: ``order="C"`` (numpy's default) gives a C-contiguous
    copy (``torch._numpy`` keeps the source's strides); other orders go to the original."""
    import torch._numpy._ndarray as nd

    if order != "C":
        return _ORIGINAL["ndarray_copy"](self, order)
    return nd.ndarray(self.tensor.clone(memory_format=torch.contiguous_format))


def _ndarray_class():
    import torch._numpy._ndarray as nd

    return nd.ndarray


def install_traceable() -> None:
    """Make Dynamo trace ``np.pad`` through :func:`traceable_np_pad`, tensor writes (numpy writes among them)
    through :func:`traceable_tensor_setitem`, ``ndarray.dtype`` through :func:`traceable_ndarray_getattr`,
    ``ndarray.astype(..., copy=False)`` through :func:`traceable_astype` and ``ndarray.copy()`` through
    :func:`traceable_ndarray_copy`, ``.item()`` captured for integer tensors only (:func:`integer_item_only`);
    K/V kept as ``bytes`` is named and run eagerly (:func:`untraceable_ndarray_call`,
    :func:`untraceable_ndarray`) (idempotent, process-wide).

    Safe to leave installed: each computes what the original computes and defers to it otherwise.
    """
    m = _tnp_map()
    if m.get(np.pad) is not traceable_np_pad:
        _ORIGINAL.setdefault("pad", m.get(np.pad))
        m[np.pad] = traceable_np_pad
    if torch.Tensor.__dict__.get("__setitem__") is not traceable_tensor_setitem:
        _ORIGINAL.setdefault("tensor_setitem", torch.Tensor.__dict__.get("__setitem__"))
        torch.Tensor.__setitem__ = traceable_tensor_setitem
    from torch._dynamo.variables.tensor import TensorVariable

    if TensorVariable.__dict__.get("method_item") is not integer_item_only:
        _ORIGINAL.setdefault("item", set_tensor_method("item", integer_item_only))
    if TensorVariable.__dict__.get("method_tolist") is not untraceable_float_tolist:
        _ORIGINAL.setdefault("tolist", set_tensor_method("tolist", untraceable_float_tolist))
    from torch._dynamo.variables.lists import ListVariable

    if ListVariable.__dict__.get("call_method") is not untraceable_row_list:
        # its own on torch 2.13, inherited from VariableTracker (tp_methods dispatch) from 2.14 on
        _ORIGINAL.setdefault("list_call_own", "call_method" in ListVariable.__dict__)
        _ORIGINAL.setdefault("list_call", ListVariable.call_method)
        ListVariable.call_method = untraceable_row_list
    if ListVariable.__dict__.get("getitem_const") is not untraceable_row_list_item:
        _ORIGINAL.setdefault("list_item", ListVariable.getitem_const)  # inherited: restored by deleting ours
        ListVariable.getitem_const = untraceable_row_list_item
    nd = _ndarray_variable()
    if nd.__dict__.get(NDARRAY_GETATTR) is not traceable_ndarray_getattr:
        _ORIGINAL.setdefault("ndarray_getattr", nd.__dict__[NDARRAY_GETATTR])
        setattr(nd, NDARRAY_GETATTR, traceable_ndarray_getattr)
    if nd.__dict__.get("call_method") is not untraceable_ndarray_call:
        _ORIGINAL.setdefault("ndarray_call", nd.__dict__["call_method"])
        nd.call_method = untraceable_ndarray_call
    from torch._dynamo.variables.builder import VariableBuilder

    if VariableBuilder.__dict__.get("wrap_numpy_ndarray") is not untraceable_ndarray:
        _ORIGINAL.setdefault("wrap_numpy_ndarray", VariableBuilder.__dict__["wrap_numpy_ndarray"])
        VariableBuilder.wrap_numpy_ndarray = untraceable_ndarray
        refresh_variable_builder_dispatch()
    import torch._numpy as tnp

    if tnp.ndarray.__dict__.get("astype") is not traceable_astype:
        _ORIGINAL.setdefault("astype", tnp.ndarray.__dict__["astype"])
        tnp.ndarray.astype = traceable_astype
    nd = _ndarray_class()
    if nd.__dict__.get("copy") is not traceable_ndarray_copy:
        _ORIGINAL.setdefault("ndarray_copy", nd.__dict__.get("copy"))
        nd.copy = traceable_ndarray_copy


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
    from torch._dynamo.variables.tensor import TensorVariable

    if TensorVariable.__dict__.get("method_item") is integer_item_only:
        set_tensor_method("item", _ORIGINAL["item"])
    if TensorVariable.__dict__.get("method_tolist") is untraceable_float_tolist:
        set_tensor_method("tolist", _ORIGINAL["tolist"])
    from torch._dynamo.variables.lists import ListVariable

    if ListVariable.__dict__.get("call_method") is untraceable_row_list:
        if _ORIGINAL["list_call_own"]:
            ListVariable.call_method = _ORIGINAL["list_call"]
        else:
            del ListVariable.call_method
    if ListVariable.__dict__.get("getitem_const") is untraceable_row_list_item:
        del ListVariable.getitem_const
    nd = _ndarray_variable()
    if nd.__dict__.get(NDARRAY_GETATTR) is traceable_ndarray_getattr:
        setattr(nd, NDARRAY_GETATTR, _ORIGINAL["ndarray_getattr"])
    if nd.__dict__.get("call_method") is untraceable_ndarray_call:
        nd.call_method = _ORIGINAL["ndarray_call"]
    from torch._dynamo.variables.builder import VariableBuilder

    if VariableBuilder.__dict__.get("wrap_numpy_ndarray") is untraceable_ndarray:
        VariableBuilder.wrap_numpy_ndarray = _ORIGINAL["wrap_numpy_ndarray"]
        refresh_variable_builder_dispatch()
    import torch._numpy as tnp

    if tnp.ndarray.__dict__.get("astype") is traceable_astype:
        tnp.ndarray.astype = _ORIGINAL["astype"]
    nd = _ndarray_class()
    if nd.__dict__.get("copy") is traceable_ndarray_copy:
        nd.copy = _ORIGINAL["ndarray_copy"]


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


#: values whose attributes are not a model's state (functions, methods, classes, modules)
_NOT_STATE = (type, types.FunctionType, types.MethodType, types.BuiltinFunctionType, types.ModuleType,
              functools.partial)


def _host_array(x) -> bool:
    """A numpy array, or a real CPU tensor that is not a parameter: what a host cache holds."""
    if isinstance(x, np.ndarray):
        return x.dtype != object
    return isinstance(x, torch.Tensor) and not isinstance(x, (torch.nn.Parameter, torch._subclasses.FakeTensor)) \
        and x.device.type == "cpu" and x.layout is torch.strided


def _arg_sizes(args, kwargs) -> list:
    """The sizes of every tensor or array argument of a call, in order (one level of lists/tuples/dicts)."""
    out = []
    for a in (*args, *kwargs.values()):
        for x in (a if isinstance(a, (list, tuple)) else a.values() if isinstance(a, dict) else (a,)):
            if isinstance(x, (torch.Tensor, np.ndarray)):
                out.append(tuple(int(d) for d in x.shape))
    return out


class HostCacheShapes:
    """Which host arrays of a model :func:`kvpass.compile` should have Dynamo trace with symbolic sizes.

    Before each call whose tensor arguments differ in shape from the previous call's (the prefill, the first
    decode step; not the decode steps after it, which cost nothing), :meth:`observe` walks the model's state
    (attributes of the module and its submodules, lists, tuples, dicts with string keys, plain objects; not
    parameters or registered buffers) as Dynamo names it (``L['self']._modules['blocks']._modules['0'].k``,
    ``L['self'].cache[0][1]``; numpy arrays wrapped in ``___from_numpy(...)``; the base of a tensor view as
    ``<view>._base``, which is how Dynamo traces a view). A host array (numpy, or a CPU
    tensor) that is there now and was not at the previous such call (``None``, absent or not an array: that
    call created it), or that had an empty dim there
    (``np.zeros((heads, 0, d))``), holds that call's tokens: its dims (those that were empty, for the second
    kind) whose size is a size the previous call's tensor arguments had along a dim that changed since (the
    prompt's length, when decode follows prefill) are recorded as dynamic in Dynamo's automatic-dynamic state,
    as a recompile at the next length would record them. A non-contiguous view that appeared with no such dim
    (``self.k_recent = self.k[:, -w:]``: its sizes are fixed, its strides follow the cache's length) gets
    dynamic strides instead, and the base of a tensor view that appeared gets the dims the view cuts (the
    cache's length, which the view's last tokens are taken from). Dynamo's own rule would trace such an array
    with static sizes at its first sight and recompile at the next length. (A cache first stored as a non-contiguous view of
    the step's K, ``self.k = k.cpu().numpy()`` of a transposed K, and then as contiguous concatenations changes
    its layout after its first step: Dynamo recompiles once for the strides, which it makes symbolic only for
    tensors of static sizes.)

    Only Dynamo's choice of static or symbolic sizes (and strides) changes: guards still check every size and
    stride a graph relies on (a wrongly named dim costs at most a recompile, never a result), and nothing is
    named for arrays whose history Dynamo already has (it makes a dim symbolic once it changes).
    """

    MAX_DEPTH, MAX_VALUES = 6, 10_000

    def __init__(self):
        self._last: dict[str, tuple] | None = None  # source -> shape (None: not an array) at the previous call
        self._last_args: list | None = None
        self.dynamic: dict[str, set[int]] = {}
        self._views: set = set()
        self._bases: dict = {}

    def _walk(self, root) -> dict:
        """``{source: shape}`` of the host arrays reachable from ``root`` (``None`` where a value is ``None``)."""
        found: dict = {}
        seen: set = set()
        self._views = set()  # sources of non-contiguous views (of a cache, typically)
        self._bases = {}  # the base of a tensor view -> the view's shape

        def visit(x, name, depth, numpy_wrap=True):
            if len(found) >= self.MAX_VALUES or depth > self.MAX_DEPTH:
                return
            if _host_array(x):
                wrapped = f"___from_numpy({name})" if isinstance(x, np.ndarray) else name
                found[wrapped if numpy_wrap else name] = tuple(int(d) for d in x.shape)
                if (x.base is not None and not x.flags["C_CONTIGUOUS"]) if isinstance(x, np.ndarray) else (
                        x._base is not None and not x.is_contiguous()):
                    self._views.add(wrapped if numpy_wrap else name)
                if isinstance(x, torch.Tensor) and x._base is not None:  # Dynamo traces a view from its base
                    found[f"{name}._base"] = tuple(int(d) for d in x._base.shape)
                    self._bases[f"{name}._base"] = found[name]
                return
            if x is None or isinstance(x, (int, float, str, bool, torch.Tensor)) or id(x) in seen:
                if x is None:
                    found[f"___from_numpy({name})"] = found[name] = None
                return
            seen.add(id(x))
            if isinstance(x, torch.nn.Module):
                for key, value in vars(x).items():
                    if key == "_modules":
                        for sub, m in value.items():
                            visit(m, f"{name}._modules[{sub!r}]", depth + 1)
                    elif not key.startswith("_"):
                        visit(value, f"{name}.{key}", depth + 1)
            elif isinstance(x, (list, tuple)):
                for i, value in enumerate(x[:256]):
                    visit(value, f"{name}[{i}]", depth + 1)
            elif isinstance(x, dict):
                for key, value in list(x.items())[:256]:
                    if isinstance(key, str):
                        visit(value, f"{name}[{key!r}]", depth + 1)
            elif hasattr(x, "__dict__") and not isinstance(x, _NOT_STATE) and \
                    type(x).__module__.split(".")[0] not in ("builtins", "numpy", "torch"):
                for key, value in vars(x).items():  # a cache object (callable ones too: ``cache(past)``)
                    if not key.startswith("__"):
                        visit(value, f"{name}.{key}", depth + 1)

        visit(root, "L['self']", 0)
        return found

    def observe(self, model, args=(), kwargs=None) -> list:
        """Record this call's state (where its argument shapes changed); tell Dynamo the token dims of the arrays
        that appeared since the previous such call are dynamic. Returns the ``(source, dims)`` newly told."""
        root = getattr(model, "__self__", model)
        forward = getattr(type(root), "forward", None)
        if not isinstance(root, torch.nn.Module) or not hasattr(forward, "__code__"):
            return []
        sizes = _arg_sizes(args, kwargs or {})
        if sizes == self._last_args:  # a step like the previous one (decode after decode): nothing to learn
            return []
        now, told = self._walk(root), []
        if self._last is not None and self._last_args is not None:
            tokens = {old[d] for old, new in zip(self._last_args, sizes) if len(old) == len(new)
                      for d in range(len(old)) if old[d] != new[d]}
            for source, shape in ((k, v) for k, v in now.items() if v is not None):
                before = self._last.get(source)
                if source not in self.dynamic and (before is None or len(before) == len(shape)):
                    # appeared, or grown from an empty dim (``np.zeros((h, 0, d))`` before the prefill)
                    dims = {d for d, size in enumerate(shape) if size in tokens and size > 1 and (
                        before is None or before[d] == 0)}
                    view = self._bases.get(source)
                    if before is None and view is not None and len(view) == len(shape):
                        # the base of a view into a cache (its last tokens): the dims the view cuts
                        dims |= {d for d, size in enumerate(shape) if size != view[d] and size > 1}
                    if dims:
                        self.dynamic[source] = dims
                        _tell_dynamic(forward.__code__, source, shape, dims)
                        told.append((source, dims))
                    elif before is None and source in self._views:
                        # a view into a cache (its last tokens): its strides follow the cache's length
                        self.dynamic[source] = set()
                        _tell_dynamic(forward.__code__, source, shape, set(), strides=True)
                        told.append((source, "strides"))
        self._last, self._last_args = now, sizes
        return told


def _tell_dynamic(code, source: str, shape: tuple, dims: set, strides: bool = False) -> None:
    """What Dynamo's automatic dynamic records after a recompile that changed ``dims`` of ``source`` (or, with
    ``strides``, its strides: Dynamo makes strides dynamic only for tensors whose sizes are all static), recorded
    ahead of the recompile."""
    from torch._dynamo.pgo import CodeId, FrameStateSizeEntry, auto_dynamic, get_code_state

    size = tuple(auto_dynamic if d in dims else n for d, n in enumerate(shape))
    entry = FrameStateSizeEntry.make_tensor(size, tuple(auto_dynamic for _ in shape)) if strides else \
        FrameStateSizeEntry.make_size(size)
    get_code_state()[CodeId.make(code)].automatic_dynamic[source] |= entry
