"""Generated shared-KV decoders for the fuzz tests: the sharing scheme, the dims, the dtype and, per cache, the
host round-trip idiom are all drawn (hypothesis strategies below), so the rewrite is checked on models this
repository does not contain.

A :class:`Case` describes one model and one run (prompt length, decode steps). :func:`build` makes the model;
its eager output is the oracle. Every cache keeps K and V in numpy buffers, written and read with the idioms the
catalogue covers, alone and mixed:

* owner store: a preallocated buffer written with a slice assignment (``prealloc``), the same with a leading
  batch dim indexed by an int (``batched``), or a history grown with ``np.concatenate`` (``concat``);
* buffer layout: ``[heads, seq, d]`` or ``[seq, heads, d]``;
* device to host: ``.detach().cpu().numpy()``, ``.cpu().numpy()``, ``.detach().numpy()``;
* host to device: ``torch.from_numpy(a).to(dev)``, ``torch.as_tensor(a, device=dev)``, ``torch.tensor(a)``,
  ``torch.from_numpy(np.ascontiguousarray(a))``;
* one-token decode writes with an int index (``buf[:, pos] = k[:, 0]``);
* an extra pure host hop of K before the cache;
* followers: ``shared`` (writes its K/V into the owner's buffer at its own position, reads the owner's view),
  ``padded`` (a smaller head dim, zero-padded on write with ``np.pad``, ``np.zeros`` + assign or
  ``np.concatenate`` with zeros, sliced back on read), ``readonly`` (reads the owner's history, never writes);
* a round trip that is not K/V: the attention mask built with numpy (``np.tril``) and brought to the device.

The cache-step cases (:func:`cache_cases`) also draw the idiom families of issue 11 (the ones that changed results),
mixed with the above:

* in-place edits of the host copy before it is written (``edit_host``): of a ``.copy()`` (``copy_edit``), or of
  the array itself, which on CPU shares memory with K (``alias_edit``: the edit reaches K);
* a device workspace reused for K then V (``workspace``: ``ws.copy_(k)``, write, ``ws.copy_(v)``, write);
* cache writes through ``out=`` (``write_via="out"``: ``np.multiply(a, 0.5, out=buf[:, p:p+t])``);
* the history converted or split (``hist_op``: ``.float()``, ``swapdims``, ``unbind`` + ``stack``, ``split`` +
  ``cat``), and used after a later write into the same positions (``late_write``: last writer wins where the
  history aliases the buffer);
* edits of the history: of a ``.clone()`` followed by a second read of the same region (``clone_edit``), or
  in place through a view of the history (``view_edit``: reaches the buffer where the history aliases it);
* aliased numpy views: a ``view`` follower holds ``owner.k[..., :d]`` (two caches on one pool when ``d`` is the
  owner's head dim) and writes its own K/V through it; ``reread``: the owner's history is read again after
  every follower ran.

Families that no rewrite can remove soundly (the aliasing one, which only a call-time overlap check can see, and
``alias_edit``, whose meaning depends on ``.cpu()`` being a no-op) make :attr:`Case.structural` false: for those
only the results are checked, not that host ops left the K/V path.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import os

import numpy as np
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, Phase, seed, settings
from hypothesis import strategies as st
from torch import nn

COUNTS: collections.Counter = collections.Counter()  # what the fuzz tests ran (printed by conftest.py)

SCALE = float(os.environ.get("KVPASS_FUZZ_SCALE", "1"))  # multiplies every fuzz test's number of cases
SEED = os.environ.get("KVPASS_FUZZ_SEED")  # another draw; unset: hypothesis's fixed (derandomized) one


def fuzz(n):
    """``@given`` settings for ``n`` cases (times ``KVPASS_FUZZ_SCALE``): fixed seed unless ``KVPASS_FUZZ_SEED``."""
    s = settings(max_examples=max(1, round(n * SCALE)), deadline=None, database=None, derandomize=SEED is None,
                 suppress_health_check=list(HealthCheck), print_blob=True,
                 phases=[Phase.explicit, Phase.generate])  # no shrinking: each case costs seconds; ids are readable

    def wrap(f):
        f = s(f)
        return seed(int(SEED))(f) if SEED is not None else f
    return wrap

SLIDING, FULL = "sliding", "full"
STORES = ("prealloc", "batched", "concat")
LAYOUTS = ("hsd", "shd")
TO_HOST = ("detach_cpu_numpy", "cpu_numpy", "detach_numpy")
TO_DEVICE = ("from_numpy_to", "as_tensor", "tensor", "ascontiguous")
PADS = ("np_pad", "zeros_assign", "concat_zeros")
FOLLOWERS = ("shared", "padded", "readonly")
CACHE_FOLLOWERS = FOLLOWERS + ("view",)  # cache-step cases only: a numpy view of the owner's buffers
EDIT_HOST = ("none", "copy_edit", "alias_edit")
WRITE_VIA = ("assign", "out")
HIST_OPS = ("none", "float", "swapdims", "unbind", "split")
HIST_EDITS = ("none", "clone_edit", "view_edit")
DTYPES = (torch.float32, torch.float64, torch.float16)


# ---- host-op block: host-op idioms (tests/idioms_host.py), drawn with the families above ---------------------
# Extra ways to the host and back (``np.asarray(t)``, ``np.array(t)``; ``torch.tensor(a, device=)``,
# ``torch.asarray(a, device=)``) and numpy layout ops between the device and the buffer (``np_layout``:
# ``numpy_ops``: the transpose to a seq-major buffer done by numpy, ``.transpose(1, 0, 2)`` on write and
# ``np.swapaxes`` on read, or ``[None]`` + ``.squeeze(0)`` around a heads-major one; ``flat``: the buffer kept as a
# flat 1-D array, viewed afresh with ``.reshape(shape)`` at every access).

TO_HOST_12 = ("np_asarray", "np_array")
TO_DEVICE_12 = ("tensor_device", "asarray")
NP_LAYOUTS_12 = ("none", "numpy_ops", "flat")
TO_HOST = TO_HOST + TO_HOST_12
TO_DEVICE = TO_DEVICE + TO_DEVICE_12


def to_host_12(x: torch.Tensor, how: str) -> np.ndarray:
    """``np.asarray(t)`` / ``np.array(t)`` of the tensor on the host."""
    return np.asarray(x.detach().cpu()) if how == "np_asarray" else np.array(x.detach().cpu())


def to_device_12(a: np.ndarray, how: str, device) -> torch.Tensor:
    """``torch.tensor(a, device=)`` / ``torch.asarray(a, device=)``."""
    return torch.tensor(a, device=device) if how == "tensor_device" else torch.asarray(a, device=device)


def nd_buffer_12(cache, buf):
    """The buffer as the cache indexes it: a flat 1-D buffer viewed afresh as ``cache.shape_12``."""
    return buf.reshape(cache.shape_12) if buf.ndim == 1 else buf


def store_12(cache, view, x, start, host):
    """A slice write of ``x [heads, t, d]`` with the layout op done by numpy (``np_layout="numpy_ops"``)."""
    t = x.shape[1]
    if cache.idiom.layout == "hsd":
        view[:, start : start + t] = host(x)[None].squeeze(0)
    else:
        view[start : start + t] = host(x).transpose(1, 0, 2)


def read_12(cache, view, end, d, how, device):
    """The history read with the layout op done by numpy (``np_layout="numpy_ops"``)."""
    if cache.idiom.layout == "hsd":
        return to_device(view[None, :, :end, :d].squeeze(0), how, device)
    return to_device(np.swapaxes(view[:end, :, :d], 0, 1), how, device)

# ---- end of the host-op block --------------------------------------------------------------------------------

# ---- host-value block: host values other than a numpy array of the model's dtype (tests/idioms_host.py 9-11) --
# ``host_value``: ``int8``: K/V quantized on the host (an absmax / 127 scale per token and head, ``np.round``,
# ``np.clip``, ``.astype(np.int8)``), the scales kept in a second buffer, dequantized on the device on read
# (``q.float() * scale``); ``tensor``: the cache holds host *tensors*, no numpy (``k.detach().cpu().to("cpu")``
# or ``k.cpu().clone()`` written into a preallocated CPU tensor, ``.to(device)`` on read). ``bfloat16`` cases:
# numpy has no bfloat16, so K/V go ``.float()`` before the host and come back ``.to(torch.bfloat16)``.

HOST_VALUES_12 = ("numpy", "int8", "tensor")
DTYPES_12 = (torch.bfloat16,)


def host_np(x: torch.Tensor) -> np.ndarray:
    """``x.detach().cpu().numpy()``, through float32 for bfloat16 (which numpy lacks)."""
    return (x.float() if x.dtype == torch.bfloat16 else x).detach().cpu().numpy()


def quantize_12(a: np.ndarray):
    """int8 values and float scales (one per row of the last dim) of ``a``, on the host."""
    scale = np.maximum(np.abs(a).max(axis=-1, keepdims=True) / 127.0, 1e-4)
    return np.clip(np.round(a / scale), -128, 127).astype(np.int8), scale


def normalize_12(o):
    """Drop the combinations part C's host values do not have (an int8 or tensor cache has no ``out=`` write, no
    numpy layout op, no flat buffer; a tensor cache is preallocated and has no ndarray ``.copy()`` to edit)."""
    if o.host_value == "numpy":
        return o
    o = dataclasses.replace(o, np_layout="none", write_via="assign")
    if o.host_value == "tensor":
        o = dataclasses.replace(o, store="prealloc" if o.store == "concat" else o.store,
                                edit_host="none" if o.edit_host == "copy_edit" else o.edit_host)
    return o

# ---- end of the host-value block -----------------------------------------------------------------------------

# ---- buffer dtypes: a host buffer of another dtype than the model's --------------------------------------------
# ``buffer_dtype``: the numpy buffer (or host tensor) is float16, float32 or float64 whatever the model's dtype
# (``model``: the same), bfloat16 for host tensors (numpy has none): the write rounds or widens K/V
# (``buf[...] = k.cpu().numpy()`` casts), the read converts back to the model's dtype. Through Inductor a rewrite
# that fed attention the written value without the buffer's rounding would show here (fp16 and bf16 keep 11 and 8
# bits). A grown (``concat``) history keeps the model's dtype (``np.concatenate`` would promote it).

BUFFER_DTYPES = ("float16", "model", "bfloat16", "float64", "float32")  # narrow first: drawn most


def normalize_buffer_dtype(o):
    """bfloat16 only for host tensors; a grown history in the model's dtype."""
    if o.store in ("concat", "device") or (o.buffer_dtype == "bfloat16" and o.host_value != "tensor"):
        return dataclasses.replace(o, buffer_dtype="model")
    return o


def buffer_dtype(idiom, model_dtype: torch.dtype) -> torch.dtype:
    """The torch dtype of the cache's host buffer (numpy buffers: bfloat16 models go through float32)."""
    if idiom.buffer_dtype != "model":
        return getattr(torch, idiom.buffer_dtype)
    if model_dtype == torch.bfloat16 and idiom.host_value != "tensor":
        return torch.float32
    return model_dtype

# ---- end of buffer dtypes --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class OwnerIdiom:
    """How one owner cache stores K/V on the host."""

    store: str = "prealloc"
    layout: str = "hsd"
    to_host: str = "detach_cpu_numpy"
    to_device: str = "from_numpy_to"
    int_index_decode: bool = False  # buf[:, pos] = k[:, 0] when one token is written
    k_hop: bool = False  # K makes a pure host round trip before the cache
    # issue 11's families (cache-step cases only; the defaults are the plain idioms above)
    edit_host: str = "none"  # the host copy edited before the write: copy_edit | alias_edit
    workspace: bool = False  # one device workspace: ws.copy_(k), write, ws.copy_(v), write
    write_via: str = "assign"  # or "out": np.multiply(a, 0.5, out=buf[...])
    hist_op: str = "none"  # the history converted or split before use
    late_write: bool = False  # the same positions written again after the read (other values)
    hist_edit: str = "none"  # clone_edit | view_edit
    reread: bool = False  # the owner's history read again after the followers ran
    np_layout: str = "none"  # issue 12A: numpy layout ops between device and buffer (NP_LAYOUTS_12)
    host_value: str = "numpy"  # issue 12C: what the cache holds on the host (HOST_VALUES_12)
    buffer_dtype: str = "model"  # the host buffer's dtype (BUFFER_DTYPES)

    def extras(self) -> str:
        """The issue-11 flags that are set, for a case id."""
        out = [f"edit={self.edit_host}" if self.edit_host != "none" else "", "ws" if self.workspace else "",
               "out=" if self.write_via == "out" else "", f"hist={self.hist_op}" if self.hist_op != "none" else "",
               "late" if self.late_write else "", self.hist_edit if self.hist_edit != "none" else "",
               "reread" if self.reread else "", f"np={self.np_layout}" if self.np_layout != "none" else "",
               self.host_value if self.host_value != "numpy" else "",
               f"buf={self.buffer_dtype}" if self.buffer_dtype != "model" else ""]
        return "".join("/" + x for x in out if x)


@dataclasses.dataclass(frozen=True)
class FollowerIdiom:
    """How one shared layer uses its owner's cache."""

    kind: str = "readonly"
    pad: str = "np_pad"  # padded followers only
    head_dim: int | None = None  # padded followers: their (smaller) head dim
    to_device: str = "from_numpy_to"


@dataclasses.dataclass(frozen=True)
class Case:
    """One generated model and run."""

    layer_types: tuple
    kv_shared_layers: int
    kv_heads: int
    q_per_kv: int
    head_dims: tuple  # (sliding, full)
    owners: tuple  # OwnerIdiom per non-shared layer
    followers: tuple  # FollowerIdiom per shared layer
    numpy_mask: bool
    dtype: torch.dtype
    prompt_len: int
    decode_steps: int
    seed: int
    slack: int = 0  # buffer slots past the last one used: with 0 the last decode step reads the whole buffer

    @property
    def num_layers(self) -> int:
        return len(self.layer_types)

    @property
    def first_shared(self) -> int:
        return self.num_layers - self.kv_shared_layers

    def owner_of(self, i: int) -> int:
        """The last non-shared layer of layer ``i``'s type (Gemma 3n/4's sharing rule)."""
        return max(j for j in range(self.first_shared) if self.layer_types[j] == self.layer_types[i])

    def head_dim(self, i: int) -> int:
        if i >= self.first_shared and self.followers[i - self.first_shared].kind == "padded":
            return self.followers[i - self.first_shared].head_dim
        return self.head_dims[self.layer_types[i] == FULL]

    @property
    def structural(self) -> bool:
        """Whether every round trip on the K/V path must be gone after the rewrite (see the module docstring)."""
        return not (any(o.edit_host == "alias_edit" for o in self.owners)
                    or any(f.kind == "view" for f in self.followers))

    @property
    def max_len(self) -> int:
        return self.prompt_len + self.decode_steps + self.slack

    def short(self) -> str:
        """A compact, readable id."""
        layers = []
        for i, t in enumerate(self.layer_types):
            if i < self.first_shared:
                o = self.owners[i]
                layers.append(f"{t[0]}:{o.store}/{o.layout}/{o.to_host}/{o.to_device}"
                              + ("/int" if o.int_index_decode else "") + ("/hop" if o.k_hop else "") + o.extras())
            else:
                f = self.followers[i - self.first_shared]
                layers.append(f"{t[0]}<{self.owner_of(i)}:{f.kind}" + (f"/{f.pad}/d{f.head_dim}" if f.kind == "padded" else "")
                              + (f"/d{f.head_dim}" if f.kind == "view" else "")
                              + f"/{f.to_device}")
        return (f"kv{self.kv_heads}x{self.q_per_kv} d{self.head_dims} {str(self.dtype)[6:]} p{self.prompt_len}"
                f"+{self.decode_steps}{'+' * self.slack}{' npmask' if self.numpy_mask else ''} [" + " | ".join(layers) + "]")


# ---- strategies ---------------------------------------------------------------------------------------------

owner_idioms = st.builds(OwnerIdiom, store=st.sampled_from(STORES), layout=st.sampled_from(LAYOUTS),
                         to_host=st.sampled_from(TO_HOST), to_device=st.sampled_from(TO_DEVICE),
                         int_index_decode=st.booleans(), k_hop=st.booleans(),
                         np_layout=st.sampled_from(NP_LAYOUTS_12),
                         host_value=st.sampled_from(("numpy",) + HOST_VALUES_12),
                         buffer_dtype=st.sampled_from(BUFFER_DTYPES)).map(normalize_12).map(normalize_buffer_dtype)


@st.composite
def cases(draw, max_layers=5, max_decode=3, dtypes=DTYPES + DTYPES_12, round_trips=True):
    """A random shared-KV decoder: layer types, sharing, dims, dtype, idioms per cache, run lengths.
    ``round_trips=False``: device caches (``torch.cat``) and read-only followers only, no numpy anywhere."""
    n = draw(st.integers(2, max_layers))
    types = tuple(draw(st.lists(st.sampled_from([SLIDING, FULL]), min_size=n, max_size=n)))
    shared = draw(st.integers(0, n - 1))
    first = n - shared
    # a shared layer needs a non-shared layer of its type before it (else it has no owner)
    while shared and set(types[first:]) - set(types[:first]):
        shared -= 1
        first = n - shared
    owners = tuple(draw(owner_idioms) if round_trips else OwnerIdiom(store="device") for _ in range(first))
    sliding_dim = draw(st.sampled_from([4, 6, 8]))
    full_dim = draw(st.sampled_from([sliding_dim, 8, 12, 16]))
    head_dims = (sliding_dim, full_dim)
    followers = []
    for i in range(first, n):
        owner = max(j for j in range(first) if types[j] == types[i])
        store = owners[owner].store
        kinds = FOLLOWERS if store not in ("concat", "device") else ("readonly",)  # no slots to overwrite
        kinds = kinds if owners[owner].host_value != "tensor" else ("readonly",)  # numpy writes, no tensor
        kind = draw(st.sampled_from(kinds))
        owner_dim = head_dims[types[i] == FULL]
        dim = None
        if kind == "padded":
            dim = draw(st.sampled_from(sorted({d for d in (2, 4, 6, owner_dim - 2) if 2 <= d < owner_dim}) or [owner_dim]))
        followers.append(FollowerIdiom(kind=kind, pad=draw(st.sampled_from(PADS)), head_dim=dim,
                                       to_device=draw(st.sampled_from(TO_DEVICE))))
    return Case(layer_types=types, kv_shared_layers=shared, kv_heads=draw(st.integers(1, 3)),
                q_per_kv=draw(st.integers(1, 2)), head_dims=head_dims, owners=owners, followers=tuple(followers),
                numpy_mask=draw(st.booleans()) and round_trips, dtype=draw(st.sampled_from(dtypes)),
                prompt_len=draw(st.integers(1, 6)), decode_steps=draw(st.integers(1, max_decode)),
                seed=draw(st.integers(0, 2**16)), slack=draw(st.integers(0, 1)))


# ---- idioms -------------------------------------------------------------------------------------------------


def to_host(x: torch.Tensor, how: str) -> np.ndarray:
    if x.dtype == torch.bfloat16:  # issue 12C: numpy has no bfloat16
        x = x.float()
    if how in TO_HOST_12:
        return to_host_12(x, how)
    if how == "detach_cpu_numpy":
        return x.detach().cpu().numpy()
    if how == "cpu_numpy":
        return x.cpu().numpy()
    return x.detach().numpy()


def to_device(a: np.ndarray, how: str, device) -> torch.Tensor:
    if isinstance(a, torch.Tensor):  # issue 12C: a cache of host tensors
        return a.to(device)
    if how in TO_DEVICE_12:
        return to_device_12(a, how, device)
    if how == "from_numpy_to":
        return torch.from_numpy(a).to(device)
    if how == "as_tensor":
        return torch.as_tensor(a, device=device)
    if how == "tensor":
        return torch.tensor(a)
    return torch.from_numpy(np.ascontiguousarray(a))


def host_pad(a: np.ndarray, width: int, how: str, dtype) -> np.ndarray:
    """Zero-pad the last dim of ``a`` by ``width`` on the host (``dtype``: ``a``'s, given because Dynamo cannot
    trace ``ndarray.dtype``)."""
    if how == "np_pad":
        return np.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, width)])
    if how == "zeros_assign":
        z = np.zeros(a.shape[:-1] + (a.shape[-1] + width,), dtype=dtype)
        z[..., : a.shape[-1]] = a
        return z
    return np.concatenate([a, np.zeros(a.shape[:-1] + (width,), dtype=dtype)], axis=-1)


class OwnerCache:
    """A non-shared layer's cache: K and V on the host, stored with ``idiom``; ``update`` returns the history
    ``[heads, pos, d]`` on the device (and leaves any extra value it made, e.g. an edited clone, in ``extra``)."""

    writes = True

    def __init__(self, idiom: OwnerIdiom, kv_heads: int, max_len: int, head_dim: int, dtype: torch.dtype, seed: int):
        self.idiom, self.head_dim, self.pos, self.step_start = idiom, head_dim, 0, None
        self.dtype = dtype
        self.buffer_dtype = buffer_dtype(idiom, dtype)
        self.np_dtype = np_dtype = torch.empty(0, dtype=self.buffer_dtype if self.buffer_dtype != torch.bfloat16
                                               else torch.float32).numpy().dtype
        self.extra: list = []
        rng = np.random.default_rng(seed)
        if idiom.store == "device":  # no round trip at all: device tensors grown with torch.cat
            self.k = torch.randn(kv_heads, 0, head_dim, dtype=dtype)
            self.v = torch.randn(kv_heads, 0, head_dim, dtype=dtype)
            return
        if idiom.store == "concat":  # the history itself, grown each step
            shape = (kv_heads, 0, head_dim) if idiom.layout == "hsd" else (0, kv_heads, head_dim)
        else:  # poisoned, not zeros: a rewrite that reads a slot nobody wrote shows up
            shape = (kv_heads, max_len, head_dim) if idiom.layout == "hsd" else (max_len, kv_heads, head_dim)
            if idiom.store == "batched":
                shape = (1,) + shape
            if idiom.np_layout == "flat":  # issue 12A: a flat 1-D array, reshaped at every access
                self.shape_12, shape = shape, (math.prod(shape),)
        self.k = rng.standard_normal(shape).astype(np_dtype)
        self.v = rng.standard_normal(shape).astype(np_dtype)
        if idiom.host_value == "int8":  # issue 12C: int8 values and their scales, poisoned
            self.k, self.v = ((rng.integers(-128, 128, shape).astype(np.int8),
                               rng.standard_normal(shape[:-1] + (1,)).astype(np_dtype)) for _ in "kv")
        elif idiom.host_value == "tensor":  # issue 12C: host tensors of the model's dtype
            self.k, self.v = (torch.from_numpy(x).to(self.buffer_dtype) for x in (self.k, self.v))
        if idiom.workspace:  # a device workspace, poisoned too
            self.ws = torch.from_numpy(rng.standard_normal((kv_heads, max_len, head_dim)).astype(np_dtype))

    def begin_step(self):
        self.step_start = None
        self.extra = []

    def rotation_position(self):
        return self.pos

    def _layout(self, x):  # [heads, t, d] -> the buffer's layout
        return x if self.idiom.layout == "hsd" else x.transpose(0, 1)

    def _store(self, buf, x, start, host):
        """Write ``x [heads, t, d]`` at ``[start, start + t)`` of ``buf``, ``host(tensor)`` making the numpy
        array; return the (possibly new) buffer."""
        i, t = self.idiom, x.shape[1]
        if isinstance(buf, tuple):  # issue 12C: int8 values and scales, each written as a buffer of its own
            q, s = buf
            return (self._store(q, x, start, lambda y: quantize_12(host(y))[0]),
                    self._store(s, x, start, lambda y: quantize_12(host(y))[1]))
        if i.store == "concat":
            return np.concatenate([buf, host(self._layout(x))], axis=1 if i.layout == "hsd" else 0)
        view = nd_buffer_12(self, buf)
        view = view[0] if i.store == "batched" else view
        if i.write_via == "out":  # np.multiply(a, 0.5, out=buf[...]): the cache holds 0.5 * x
            # (always a slice: Dynamo graph-breaks on out= an int-indexed view, ``select`` of an ndarray)
            if i.layout == "hsd":
                dst, src = view[:, start : start + t], host(x)
            else:
                dst, src = view[start : start + t], host(x.transpose(0, 1))
            np.multiply(src, 0.5, out=dst)
        elif i.int_index_decode and t == 1:
            if i.layout == "hsd":
                view[:, start] = host(x[:, 0])
            else:
                view[start] = host(x[:, 0])
        elif i.np_layout == "numpy_ops":
            store_12(self, view, x, start, host)
        elif i.layout == "hsd":
            view[:, start : start + t] = host(x)
        else:
            view[start : start + t] = host(x.transpose(0, 1))
        return buf

    def read(self, buf, end, d, how, device):
        """The history ``[0, end)`` of ``buf``, first ``d`` features, as ``[heads, end, d]`` on ``device``, in the
        model's dtype (int8 dequantized, a float32 buffer of a bfloat16 model converted: issue 12C)."""
        if isinstance(buf, tuple):
            q, s = buf
            h = self._read(q, end, d, how, device).float() * self._read(s, end, 1, how, device)
            return h.to(self.dtype)
        h = self._read(buf, end, d, how, device)
        return h.to(self.dtype) if h.dtype != self.dtype else h

    def _read(self, buf, end, d, how, device):
        view = nd_buffer_12(self, buf)
        view = view[0] if self.idiom.store == "batched" else view
        if self.idiom.np_layout == "numpy_ops":
            return read_12(self, view, end, d, how, device)
        if self.idiom.layout == "hsd":
            return to_device(view[:, :end, :d], how, device)
        return to_device(view[:end, :, :d], how, device).transpose(0, 1)

    def host(self):
        """``tensor -> numpy array`` for this cache's writes, with the host copy edited first when drawn so."""
        how, edit = self.idiom.to_host, self.idiom.edit_host
        if self.idiom.host_value == "tensor":  # issue 12C: a host tensor, two spellings of the hop
            def host(x):
                a = x.detach().cpu().to("cpu") if how in ("detach_cpu_numpy", "cpu_numpy") else x.cpu().clone()
                if edit == "alias_edit":
                    a[..., :1] = a[..., :1] * -1.0
                return a
        elif edit == "copy_edit":  # a copy, edited: the cache gets the edit, K does not
            def host(x):
                a = to_host(x, how).copy()
                a[..., 0] = 0.5
                return a
        elif edit == "alias_edit":  # on CPU the array is K's memory: the edit reaches K too
            def host(x):
                a = to_host(x, how)
                a[..., :1] = a[..., :1] * -1.0
                return a
        else:
            def host(x):
                return to_host(x, how)
        return host

    def update(self, k, v):
        t = k.shape[1]
        if self.idiom.store == "device":
            self.k, self.v = torch.cat([self.k, k], 1), torch.cat([self.v, v], 1)
            self.step_start, self.pos = self.pos, self.pos + t
            return self.k, self.v
        i = self.idiom
        if i.k_hop:
            k = torch.from_numpy(host_np(k)).to(k.device, k.dtype)
        host = self.host()
        if i.workspace:  # one workspace for K then V: the K written is the workspace's value at the write
            ws = self.ws[:, :t]
            ws.copy_(k)
            self.k = self._store(self.k, ws, self.pos, host)
            ws.copy_(v)
            self.v = self._store(self.v, ws, self.pos, host)
        else:
            self.k = self._store(self.k, k, self.pos, host)
            self.v = self._store(self.v, v, self.pos, host)
        start = self.step_start = self.pos
        self.pos += t
        how = i.to_device
        if i.hist_edit == "clone_edit":  # an edited clone of the history, then a second read of the same region
            c = self.read(self.k, self.pos, self.head_dim, how, k.device).clone()
            c[..., :1].copy_(c[..., :1] * 10)
            self.extra.append(c)
        kh, vh = (self.read(self.k, self.pos, self.head_dim, how, k.device),
                  self.read(self.v, self.pos, self.head_dim, how, v.device))
        kh, vh = hist_begin(kh, i.hist_op), hist_begin(vh, i.hist_op)
        if i.late_write and i.store != "concat":  # the same positions again: the last writer wins
            plain = (lambda x: x.detach().cpu().clone()) if i.host_value == "tensor" else host_np  # noqa: E731
            self._store(self.k, k * -1.0 + 0.25, start, plain)
            self._store(self.v, v * 0.5 - 1.0, start, plain)
        kh, vh = hist_end(kh, i.hist_op, self.dtype), hist_end(vh, i.hist_op, self.dtype)
        if i.hist_edit == "view_edit":  # through a view of the history: reaches the buffer where it aliases it
            kh[0, :, :1].add_(0.5)
        return kh, vh


def hist_begin(h, op):
    """Convert or split a history (a view of the buffer where the read aliases it)."""
    if op == "float":
        return h.float()
    if op == "swapdims":
        return h.swapdims(0, 1)
    if op == "unbind":
        return h.unbind(0)
    if op == "split":
        return h.split(1, dim=0)
    return h


def hist_end(h, op, dtype):
    """Undo :func:`hist_begin` (what the history is used as, after any later write)."""
    if op == "float":
        return h.to(dtype)
    if op == "swapdims":
        return h.swapdims(0, 1)
    if op == "unbind":
        return torch.stack(h, 0)
    if op == "split":
        return torch.cat(h, 0)
    return h


class FollowerCache:
    """A shared layer's view of its owner's cache (``shared``, ``padded``, ``readonly``, or ``view``: numpy views
    ``owner.k[..., :d]`` kept by the follower, written and read through them: two graph inputs, one memory)."""

    def __init__(self, idiom: FollowerIdiom, owner: OwnerCache):
        self.idiom, self.owner, self.pos = idiom, owner, 0
        self.head_dim = idiom.head_dim or owner.head_dim
        self.writes = idiom.kind != "readonly"
        if idiom.kind == "view":
            k, v = nd_buffer_12(owner, owner.k), nd_buffer_12(owner, owner.v)  # issue 12A: a flat owner's view
            self.k, self.v = k[..., : self.head_dim], v[..., : self.head_dim]

    def begin_step(self):
        pass

    def rotation_position(self):
        return self.pos if self.writes else self.owner.step_start

    def update(self, k, v):
        o, t = self.owner, k.shape[1]
        if self.idiom.kind == "padded":
            width, pad, dtype = o.head_dim - self.head_dim, self.idiom.pad, o.np_dtype
            host = lambda x: host_pad(host_np(x), width, pad, dtype)  # noqa: E731
        else:
            host = host_np
        if self.idiom.kind == "view":  # through the follower's own views of the owner's buffers
            o._store(self.k, k, self.pos, host)
            o._store(self.v, v, self.pos, host)
            self.pos += t
            end, how = max(o.pos, self.pos), self.idiom.to_device
            return o.read(self.k, end, self.head_dim, how, k.device), o.read(self.v, end, self.head_dim, how, v.device)
        o.k = o._store(o.k, k, self.pos, host)
        o.v = o._store(o.v, v, self.pos, host)
        self.pos += t
        end = max(o.pos, self.pos)
        how = self.idiom.to_device
        return o.read(o.k, end, self.head_dim, how, k.device), o.read(o.v, end, self.head_dim, how, v.device)

    def read_only(self, device):
        if self.owner.idiom.store == "device":
            return self.owner.k, self.owner.v
        o, how = self.owner, self.idiom.to_device
        return o.read(o.k, o.pos, self.head_dim, how, device), o.read(o.v, o.pos, self.head_dim, how, device)


# ---- the decoder --------------------------------------------------------------------------------------------


def rms_norm(x, weight, eps=1e-6):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * (1.0 + weight)


def rope(x, start, theta):
    """Rotate-half RoPE in ``x``'s dtype."""
    d, t = x.shape[-1], x.shape[-2]
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float32, device=x.device) / d))
    ang = (torch.arange(t, dtype=torch.float32, device=x.device) + start)[:, None] * inv[None, :]
    cos, sin = torch.cat([ang.cos(), ang.cos()], -1).to(x.dtype), torch.cat([ang.sin(), ang.sin()], -1).to(x.dtype)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return x * cos + torch.cat([-x2, x1], -1) * sin


class Layer(nn.Module):
    def __init__(self, case: Case, i: int, hidden: int):
        super().__init__()
        self.heads, self.kv_heads, self.d = case.kv_heads * case.q_per_kv, case.kv_heads, case.head_dim(i)
        self.window = 3 if case.layer_types[i] == SLIDING else None
        self.theta = 10_000.0 if case.layer_types[i] == SLIDING else 1_000_000.0
        self.numpy_mask = case.numpy_mask
        self.q_proj = nn.Linear(hidden, self.heads * self.d, bias=False)
        self.k_proj = nn.Linear(hidden, self.kv_heads * self.d, bias=False)
        self.v_proj = nn.Linear(hidden, self.kv_heads * self.d, bias=False)
        self.o_proj = nn.Linear(self.heads * self.d, hidden, bias=False)
        self.q_norm, self.k_norm, self.norm = (nn.Parameter(torch.zeros(n)) for n in (self.d, self.d, hidden))
        self.up = nn.Linear(hidden, 2 * hidden, bias=False)
        self.down = nn.Linear(2 * hidden, hidden, bias=False)

    def mask(self, t, s, start, device):
        if self.numpy_mask:  # a host round trip that is not K/V: must stay exact
            m = np.tril(np.ones((t, s), dtype=np.bool_), k=s - t)
            return torch.from_numpy(m).to(device)
        qpos = torch.arange(t, device=device)[:, None] + start
        return torch.arange(s, device=device)[None, :] <= qpos

    def forward(self, x, cache):
        t, d = x.shape[0], self.d
        h = rms_norm(x, self.norm)
        start = cache.rotation_position()
        q = rope(rms_norm(self.q_proj(h).view(t, self.heads, d).transpose(0, 1), self.q_norm), start, self.theta)
        if cache.writes:
            k = rope(rms_norm(self.k_proj(h).view(t, self.kv_heads, d).transpose(0, 1), self.k_norm), start, self.theta)
            v = self.v_proj(h).view(t, self.kv_heads, d).transpose(0, 1)
            k_hist, v_hist = cache.update(k, v)
        else:
            k_hist, v_hist = cache.read_only(x.device)
        rep = self.heads // self.kv_heads
        k_hist, v_hist = k_hist.repeat_interleave(rep, 0), v_hist.repeat_interleave(rep, 0)
        s = k_hist.shape[1]
        mask = self.mask(t, s, start, x.device)
        if self.window is not None:
            qpos = torch.arange(t, device=x.device)[:, None] + start
            mask = mask & (torch.arange(s, device=x.device)[None, :] > qpos - self.window)
        a = F.scaled_dot_product_attention(q, k_hist, v_hist, attn_mask=mask)
        x = x + self.o_proj(a.transpose(0, 1).reshape(t, self.heads * d))
        return x + self.down(F.gelu(self.up(x)))


def build_caches(case: Case) -> list:
    """One cache per layer of ``case``: owners for the non-shared layers, followers of their owners after."""
    caches = []
    for i in range(case.num_layers):
        if i < case.first_shared:
            caches.append(OwnerCache(case.owners[i], case.kv_heads, case.max_len, case.head_dim(i), case.dtype,
                                     case.seed + i))
        else:
            caches.append(FollowerCache(case.followers[i - case.first_shared], caches[case.owner_of(i)]))
    return caches


class FuzzDecoder(nn.Module):
    """The model a :class:`Case` describes; ``forward(ids [T])`` runs one step and returns logits ``[T, vocab]``."""

    def __init__(self, case: Case, hidden: int = 16, vocab: int = 32):
        super().__init__()
        self.case = case
        self.embed = nn.Embedding(vocab, hidden)
        self.layers = nn.ModuleList(Layer(case, i, hidden) for i in range(case.num_layers))
        g = torch.Generator().manual_seed(case.seed)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.dim() == 1 else 1.0 / math.sqrt(p.shape[-1])))
        self.to(case.dtype).eval()
        self.reset()

    def reset(self):
        self.caches = build_caches(self.case)

    def forward(self, ids):
        for cache in self.caches:
            cache.begin_step()
        x = self.embed(ids)
        for layer, cache in zip(self.layers, self.caches):
            x = layer(x, cache)
        return x @ self.embed.weight.t()


def build(case: Case) -> FuzzDecoder:
    """The model of ``case``, with random weights (from ``case.seed``) and empty caches."""
    return FuzzDecoder(case)


def token_steps(case: Case, vocab: int = 32):
    """The prompt and the decode tokens (teacher forced: every runner sees the same tokens)."""
    g = torch.Generator().manual_seed(case.seed + 1)
    prompt = torch.randint(0, vocab, (case.prompt_len,), generator=g)
    return [prompt] + [torch.randint(0, vocab, (1,), generator=g) for _ in range(case.decode_steps)]


def run_steps(step, steps):
    """``step`` on each input of ``steps`` (a tuple is unpacked), without autograd. Each run gets its own copy of
    the inputs: a model may edit them in place (``alias_edit``), and every runner must see the same inputs."""
    fresh = lambda x: x.clone() if isinstance(x, torch.Tensor) else x  # noqa: E731
    with torch.no_grad():
        return [step(*map(fresh, s)) if isinstance(s, tuple) else step(fresh(s)) for s in steps]


# ---- cache steps: the same idioms without the decoder around them (cheap to trace, so many more cases) --------


@st.composite
def issue11_owner_idioms(draw):
    """An owner idiom with issue 11's families drawn on top (each family off about half the time or more)."""
    o = draw(owner_idioms)
    prealloc = o.store != "concat"
    return normalize_12(dataclasses.replace(
        o, edit_host=draw(st.sampled_from(EDIT_HOST)), workspace=draw(st.booleans()),
        write_via=draw(st.sampled_from(WRITE_VIA)) if prealloc else "assign",
        hist_op=draw(st.sampled_from(HIST_OPS)), late_write=prealloc and draw(st.booleans()),
        hist_edit=draw(st.sampled_from(HIST_EDITS)), reread=draw(st.booleans())))


@st.composite
def cache_cases(draw, max_decode=3, dtypes=DTYPES + DTYPES_12, issue11=True):
    """One owner cache and up to two followers of it, driven directly with K/V (no projections, no attention).
    ``issue11``: also draw issue 11's idiom families (module docstring), mixed with the others, in about three
    cases of four (the fourth keeps the plain idioms alone)."""
    issue11 = issue11 and draw(st.integers(0, 3)) > 0
    owner = draw(issue11_owner_idioms() if issue11 else owner_idioms)
    dim = draw(st.sampled_from([4, 6, 8, 16]))
    kinds = {"numpy": CACHE_FOLLOWERS if issue11 else FOLLOWERS, "int8": FOLLOWERS,  # issue 12C: what the
             "tensor": ("readonly",)}[owner.host_value]  # host holds limits the followers that write into it
    kinds = kinds if owner.store != "concat" else ("readonly",)  # no slots to overwrite
    followers = []
    for _ in range(draw(st.integers(0, 2))):
        kind = draw(st.sampled_from(kinds))
        head_dim = None
        if kind == "padded":
            head_dim = draw(st.integers(1, dim - 1))
        elif kind == "view":  # the owner's whole head dim (two caches on one pool) or a prefix of it
            head_dim = draw(st.sampled_from([dim, dim, max(1, dim // 2)]))
        followers.append(FollowerIdiom(kind=kind, pad=draw(st.sampled_from(PADS)), head_dim=head_dim,
                                       to_device=draw(st.sampled_from(TO_DEVICE))))
    layer_types = (FULL,) * (1 + len(followers))
    return Case(layer_types=layer_types, kv_shared_layers=len(followers), kv_heads=draw(st.integers(1, 3)),
                q_per_kv=1, head_dims=(dim, dim), owners=(owner,), followers=tuple(followers), numpy_mask=False,
                dtype=draw(st.sampled_from(dtypes)), prompt_len=draw(st.integers(1, 6)),
                decode_steps=draw(st.integers(1, max_decode)), seed=draw(st.integers(0, 2**16)),
                slack=draw(st.integers(0, 1)))


class CacheStep(nn.Module):
    """Runs the caches of a :func:`cache_cases` case on given K/V and returns every history they hand back.
    (A module, so that cache positions are unspecialized ints as in a model: one graph for all decode steps.)"""

    def __init__(self, case: Case):
        super().__init__()
        self.case = case
        self.caches = build_caches(case)

    def forward(self, k, v):
        for cache in self.caches:
            cache.begin_step()
        # each history is used (cloned) at once, as attention would: a history that aliases the host buffer and
        # is returned as is would show the followers' later writes in eager (tests/test_guards.py pins that case)
        owner = self.caches[0]
        out = [h.clone() for h in owner.update(k, v)]
        out += [h.clone() for h in owner.extra]  # e.g. an edited clone of the history
        for i, cache in enumerate(self.caches[1:], 1):
            if cache.writes:  # a follower's own K/V: other values than the owner's (last writer wins)
                d = cache.head_dim
                out += [h.clone() for h in cache.update(k[..., :d] * 0.5 + i, v[..., :d] - i)]
            else:
                out += [h.clone() for h in cache.read_only(k.device)]
        if owner.idiom.reread and owner.idiom.store != "device":  # after every follower's write
            how = owner.idiom.to_device
            out += [owner.read(b, owner.pos, owner.head_dim, how, k.device).clone() for b in (owner.k, owner.v)]
        return out


def kv_steps(case: Case):
    """Fresh random K/V ``[kv_heads, t, d]`` for the prefill and each decode step."""
    g = torch.Generator().manual_seed(case.seed + 2)
    shape = lambda t: (case.kv_heads, t, case.head_dims[1])  # noqa: E731
    return [(torch.randn(shape(t), generator=g).to(case.dtype), torch.randn(shape(t), generator=g).to(case.dtype))
            for t in [case.prompt_len] + [1] * case.decode_steps]


# ---- graph checks -------------------------------------------------------------------------------------------


def kv_path_host_nodes(gm: torch.fx.GraphModule, roots=None) -> list:
    """Host round-trip nodes (``.cpu()``, ``.numpy()``, numpy ops, tensor rebuilds) that an attention's K or V
    (or, with ``roots="clones"``, each history :class:`CacheStep` hands out) depends on, back to the K/V projections: what the
    rewrite must have removed. (Ancestry, not only paths from the projections: a host array that K reaches
    through a ``setitem`` and attention reads back counts too.)"""
    from kvpass.testing import host_round_trip_nodes

    host = set(host_round_trip_nodes(gm))
    if roots == "clones":  # CacheStep clones each history it hands out (graph outputs also hold cache state)
        stack = [n.args[0] for n in gm.graph.nodes if _is_clone(n)]
    else:
        stack = [a for n in gm.graph.nodes if _is_sdpa(n) for a in n.args[1:3]]
    seen = set()
    while stack:
        n = stack.pop()
        if isinstance(n, torch.fx.Node) and n not in seen:
            seen.add(n)
            if not _is_kv_projection(n):  # what the projection's input depends on is not K/V's path
                stack.extend(n.all_input_nodes)
    return [n for n in gm.graph.nodes if n in seen and n in host]


def _is_clone(node) -> bool:
    """``x.clone()`` in a Dynamo graph, ``aten.clone`` in an ATen one."""
    if node.op == "call_method":
        return node.target == "clone"
    return node.op == "call_function" and (node.target is torch.clone or node.target is torch.ops.aten.clone.default)


def _is_sdpa(node) -> bool:
    """Attention, torch-level or any ATen scaled-dot-product overload."""
    if node.op != "call_function":
        return False
    return node.target is torch._C._nn.scaled_dot_product_attention or (
        isinstance(node.target, torch._ops.OpOverload) and "scaled_dot_product" in node.target.name())


def _is_kv_projection(node) -> bool:
    return node.op == "call_function" and node.target is torch._C._nn.linear and any(
        p in a.name for a in node.all_input_nodes if a.op == "placeholder" for p in ("k_proj", "v_proj"))


# ==== issue 12, part B: buffer-region idioms (tests/idioms_buffer.py has them as user models) =================
#
# An owner whose buffer is addressed by region, drawn on top of the plain owner idioms (layout, ways to the host
# and back, int-index decode writes, extra hops, the workspace, dtypes) and read-only followers:
#
# * ``loop``: the new tokens written one at a time, ``for j in range(t): buf[:, p + j] = a[:, j]``;
# * ``slab_chained`` / ``slab_tuple``: K and V of two layers in one slab ``[2, 2, ...]``, this cache at
#   ``slab[1][0]`` / ``slab[1, 1]``, the other layer's region written too (with other values);
# * ``heads``: the buffer holds twice the heads; another owner writes the first half, this one the second;
# * ``ring`` / ``ring_roll``: ``W = prompt + 1`` slots written at ``pos % W``, read oldest first with two slices +
#   ``np.concatenate`` (or ``np.roll``) once full;
# * ``grow``: capacity doubling with ``np.concatenate`` and zeros when the new tokens do not fit;
# * ``before``: the old history read before the step's write, ``cat([old, k], 1)`` on the device.

REGIONS = ("loop", "slab_chained", "slab_tuple", "heads", "ring", "ring_roll", "grow", "before")
_SLAB = ("K", "V")  # what OwnerCache.k / .v hold for a slab owner: which half of its region


class RegionOwnerCache(OwnerCache):
    """An :class:`OwnerCache` whose buffer is addressed by region (``region``, see the block comment)."""

    def __init__(self, region: str, idiom: OwnerIdiom, kv_heads, max_len, head_dim, dtype, seed):
        super().__init__(idiom, kv_heads, max_len, head_dim, dtype, seed)
        self.region, self.kv_heads = region, kv_heads
        rng = np.random.default_rng(seed + 7)
        shape = self.k.shape
        if region.startswith("slab"):
            self.slab = rng.standard_normal((2, 2) + shape).astype(self.np_dtype)
            self.k, self.v = _SLAB
        elif region == "heads":
            self.k, self.v = (rng.standard_normal((2 * kv_heads,) + shape[1:]).astype(self.np_dtype) for _ in "kv")
        elif region.startswith("ring"):
            self.window = max_len  # RegionStep sets it (and cuts the buffers) to prompt + 1
        elif region == "grow":
            self.k, self.v = self.k[:, :1].copy(), self.v[:, :1].copy()  # capacity 1: the prefill grows it

    def _slab_store(self, which, a, start, t):
        j = _SLAB.index(which)
        other = a * 0.5 + 1.0  # the other layer's region: other values, never read here
        if self.region == "slab_chained":
            self.slab[0][j][:, start : start + t] = other
            self.slab[1][j][:, start : start + t] = a
        else:
            self.slab[0, j, :, start : start + t] = other
            self.slab[1, j, :, start : start + t] = a

    def _store(self, buf, x, start, host):
        r, t = self.region, x.shape[1]
        if r in ("before",) or self.idiom.layout != "hsd" and r != "loop":
            return super()._store(buf, x, start, host)
        a = host(x if self.idiom.layout == "hsd" else x.transpose(0, 1))
        if r == "loop":
            for j in range(t):
                if self.idiom.layout == "hsd":
                    buf[:, start + j] = a[:, j]
                else:
                    buf[start + j] = a[j]
        elif r.startswith("slab"):
            self._slab_store(buf, a, start, t)
        elif r == "heads":
            h = self.kv_heads
            buf[:h, start : start + t] = a * -1.0 + 0.5  # the other owner: other values, other heads
            buf[h:, start : start + t] = a
        elif r.startswith("ring"):
            if t == 1:
                buf[:, start % self.window] = a[:, 0]
            else:  # the prefill fits in the ring
                buf[:, start : start + t] = a
        elif r == "grow":
            while start + t > buf.shape[1]:
                buf = np.concatenate([buf, np.zeros_like(buf)], axis=1)
            buf[:, start : start + t] = a
        return buf

    def _read(self, buf, end, d, how, device):
        r = self.region
        if r in ("before", "loop", "grow") or self.idiom.layout != "hsd":
            return super()._read(buf, end, d, how, device)
        if r.startswith("slab"):
            j = _SLAB.index(buf)
            view = self.slab[1][j] if r == "slab_chained" else self.slab[1, j]
            return to_device(view[:, :end, :d], how, device)
        if r == "heads":
            return to_device(buf[self.kv_heads :, :end, :d], how, device)
        if end <= self.window:
            return to_device(buf[:, :end, :d], how, device)
        slot = (end - 1) % self.window
        if r == "ring_roll":
            return to_device(np.roll(buf, -(slot + 1), axis=1)[:, :, :d], how, device)
        return to_device(np.concatenate([buf[:, slot + 1 :, :d], buf[:, : slot + 1, :d]], axis=1), how, device)

    def update(self, k, v):
        if self.region != "before" or self.idiom.layout != "hsd":
            return super().update(k, v)
        t, p, how = k.shape[1], self.pos, self.idiom.to_device
        k_old = self.read(self.k, p, self.head_dim, how, k.device)
        v_old = self.read(self.v, p, self.head_dim, how, v.device)
        host = self.host()
        self.k = self._store(self.k, k, p, host)
        self.v = self._store(self.v, v, p, host)
        self.step_start, self.pos = p, p + t
        return torch.cat([k_old, k], 1), torch.cat([v_old, v], 1)


@dataclasses.dataclass(frozen=True)
class RegionCase:
    """A :class:`Case` (one owner, read-only followers) and the region idiom of its owner."""

    case: Case
    region: str

    @property
    def dtype(self):
        return self.case.dtype

    @property
    def decode_steps(self):
        return self.case.decode_steps

    structural = True

    def short(self) -> str:
        return f"{self.region} {self.case.short()}"


@st.composite
def region_cases(draw, max_decode=3, dtypes=DTYPES):
    """One region owner (plain owner idioms drawn on top, no issue-11 edits) and up to two read-only followers."""
    region = draw(st.sampled_from(REGIONS))
    o = draw(owner_idioms)
    # regions are written and read as [heads, seq, d] numpy arrays: no flat buffer or numpy layout op (part A's
    # np_layout), and the seq-major layout only for the per-token loop
    o = dataclasses.replace(o, store="prealloc", workspace=draw(st.booleans()), np_layout="none", host_value="numpy",
                            layout=o.layout if region == "loop" else "hsd")
    dim = draw(st.sampled_from([4, 6, 8]))
    followers = tuple(FollowerIdiom(kind="readonly", to_device=draw(st.sampled_from(TO_DEVICE)))
                      for _ in range(draw(st.integers(0, 2))))
    case = Case(layer_types=(FULL,) * (1 + len(followers)), kv_shared_layers=len(followers),
                kv_heads=draw(st.integers(1, 3)), q_per_kv=1, head_dims=(dim, dim), owners=(o,), followers=followers,
                numpy_mask=False, dtype=draw(st.sampled_from(dtypes)), prompt_len=draw(st.integers(1, 5)),
                decode_steps=draw(st.integers(1, max_decode)), seed=draw(st.integers(0, 2**16)))
    return RegionCase(case, region)


class RegionStep(CacheStep):
    """:class:`CacheStep` over a :class:`RegionCase`: the owner is a :class:`RegionOwnerCache`."""

    def __init__(self, rc: RegionCase):
        nn.Module.__init__(self)
        case = self.case = rc.case
        owner = RegionOwnerCache(rc.region, case.owners[0], case.kv_heads, case.max_len, case.head_dims[1],
                                 case.dtype, case.seed)
        if rc.region.startswith("ring"):  # W = prompt + 1 slots: the second decode step wraps
            owner.window = case.prompt_len + 1
            owner.k, owner.v = owner.k[:, : owner.window].copy(), owner.v[:, : owner.window].copy()
        self.caches = [owner] + [FollowerCache(f, owner) for f in case.followers]


def region_kv_steps(rc: RegionCase):
    return kv_steps(rc.case)

# ==== end of issue 12, part B ====================================================================================


# ==== issue 23 (items 2, 3, 5): numpy asked about itself, positions read back from tensors, beam reorders =========
#
# One cache of ``beams`` rows ``[beams, heads, M, d]`` (numpy, poisoned), driven with K/V directly (as CacheStep):
#
# * ``query``: how the step asks numpy about itself: ``none``; ``astype`` (``a.astype(buf.dtype)`` after an ``if
#   a.dtype != buf.dtype`` check); ``zeros_pad`` (``np.zeros(..., dtype=a.dtype)`` concatenated on the head dim
#   into a buffer one wider, sliced off on read; ``assert a.shape == ...``); ``itemsize`` (``buf.dtype.itemsize``
#   accounting and ``astype(buf.dtype, copy=False)``);
# * ``position``: where the write position comes from: ``attr`` (an int on the module), ``item``
#   (``int(pos_t.item())``, nothing bounds it), ``item_checked`` (the same with ``torch._check`` bounds),
#   ``tolist`` (per-token writes at ``input_pos.tolist()``, an index tensor passed in);
# * ``reorder``: ``none``, ``np_take`` (``buf = np.take(buf, beam_idx.numpy(), axis=0)``), ``index_select``
#   (``torch.from_numpy(buf).index_select(0, beam_idx).numpy()``), before the write.

HD_QUERIES = ("none", "astype", "zeros_pad", "itemsize")
HD_POSITIONS = ("attr", "item", "item_checked", "tolist")
HD_REORDERS = ("none", "np_take", "index_select")


@dataclasses.dataclass(frozen=True)
class HostDrivenCase:
    """One :class:`HostDrivenStep` and its run."""

    query: str
    position: str
    reorder: str
    beams: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype
    prompt_len: int
    decode_steps: int
    seed: int
    slack: int = 1
    structural = True

    @property
    def max_len(self):
        return self.prompt_len + self.decode_steps + self.slack

    def short(self) -> str:
        return (f"hostdriven query={self.query} position={self.position} reorder={self.reorder} beams={self.beams} "
                f"heads={self.kv_heads} d={self.head_dim} {self.dtype} prompt={self.prompt_len} "
                f"decode={self.decode_steps} seed={self.seed}")


@st.composite
def hostdriven_cases(draw, max_decode=6, dtypes=(torch.float32, torch.float64)):
    """A :class:`HostDrivenCase`: every axis drawn independently (prompt of 2 or more tokens: prefill and decode
    steps then differ in shape, so the prefill's graph and one decode graph are the budget)."""
    return HostDrivenCase(
        query=draw(st.sampled_from(HD_QUERIES)), position=draw(st.sampled_from(HD_POSITIONS)),
        reorder=draw(st.sampled_from(HD_REORDERS)), beams=draw(st.integers(1, 3)), kv_heads=draw(st.integers(1, 3)),
        head_dim=draw(st.sampled_from([2, 4, 6])), dtype=draw(st.sampled_from(dtypes)),
        prompt_len=draw(st.integers(2, 5)), decode_steps=draw(st.integers(6, max_decode)),
        seed=draw(st.integers(0, 2**16)))


class HostDrivenStep(nn.Module):
    """The cache of a :class:`HostDrivenCase`; ``forward(k, v, beam_idx, input_pos)`` returns (clones of) the
    histories it read back."""

    def __init__(self, case: HostDrivenCase):
        super().__init__()
        self.case = case
        rng = np.random.default_rng(case.seed + 11)
        np_dtype = {torch.float32: np.float32, torch.float64: np.float64}[case.dtype]
        width = case.head_dim + (case.query == "zeros_pad")
        shape = (case.beams, case.kv_heads, case.max_len, width)
        self.k_buf = rng.standard_normal(shape).astype(np_dtype)
        self.v_buf = rng.standard_normal(shape).astype(np_dtype)
        self.pos = 0
        self.pos_t = torch.zeros((), dtype=torch.long)

    def host(self, x, buf):
        """``x [beams, heads, t, d]`` on the host, through the case's dtype query."""
        a = x.detach().cpu().numpy()
        q = self.case.query
        if q == "astype":
            if a.dtype != buf.dtype:
                a = a.astype(buf.dtype)
            return a.astype(buf.dtype)
        if q == "zeros_pad":
            assert a.shape == (self.case.beams, self.case.kv_heads, a.shape[2], self.case.head_dim), a.shape
            return np.concatenate([a, np.zeros(a.shape[:3] + (1,), dtype=a.dtype)], axis=-1)
        if q == "itemsize":
            assert buf.dtype.itemsize * a.size == x.numel() * x.element_size()
            return a.astype(buf.dtype, copy=False)
        return a

    def reorder(self, buf, beam_idx):
        r = self.case.reorder
        if r == "np_take":
            return np.take(buf, beam_idx.numpy(), axis=0)
        if r == "index_select":
            return torch.from_numpy(buf).index_select(0, beam_idx).numpy()
        return buf

    def forward(self, k, v, beam_idx, input_pos):
        c, t = self.case, k.shape[2]
        if c.position == "attr":
            p = self.pos
        else:
            p = int(self.pos_t.item())
            if c.position == "item_checked":
                torch._check(p >= 0)
                torch._check(p + t <= self.k_buf.shape[2])
        self.k_buf, self.v_buf = self.reorder(self.k_buf, beam_idx), self.reorder(self.v_buf, beam_idx)
        ka, va = self.host(k, self.k_buf), self.host(v, self.v_buf)
        if c.position == "tolist":
            for j, i in enumerate(input_pos.tolist()):
                self.k_buf[:, :, i] = ka[:, :, j]
                self.v_buf[:, :, i] = va[:, :, j]
            end = int(input_pos[-1].item()) + 1
        else:
            self.k_buf[:, :, p : p + t] = ka
            self.v_buf[:, :, p : p + t] = va
            end = p + t
        self.pos = p + t
        self.pos_t += t
        d = c.head_dim
        kh = torch.from_numpy(self.k_buf[:, :, :end, :d]).to(k.device)
        vh = torch.from_numpy(self.v_buf[:, :, :end, :d]).to(v.device)
        return [kh.clone(), vh.clone()]


def hostdriven_kv_steps(case: HostDrivenCase):
    """Fresh random K/V ``[beams, heads, t, d]``, a random beam permutation and the positions, per step."""
    g = torch.Generator().manual_seed(case.seed + 3)
    out, pos = [], 0
    for t in [case.prompt_len] + [1] * case.decode_steps:
        shape = (case.beams, case.kv_heads, t, case.head_dim)
        out.append((torch.randn(shape, generator=g).to(case.dtype), torch.randn(shape, generator=g).to(case.dtype),
                    torch.randperm(case.beams, generator=g), torch.arange(pos, pos + t)))
        pos += t
    return out

# ==== end of issue 23 (items 2, 3, 5) ================================================================================


# ==== growing and evicting host caches created by the model (issue: real cache code; helper 23b) ===============
# Drawn: storage (numpy / host tensor), layout (heads first, grown on axis 1; tokens first, grown on axis 0), how
# the cache starts (None, then the prefill's K stored; an empty array; a random history), the prefill's K stored
# contiguous or as it comes (a transposed view), eviction (none; sink + window after the append, by slices or by a
# boolean mask), a view of the cache's last tokens kept beside it (read at the next step), prompt length, layers. Budget per case (``growing_budget``): prefill + one decode graph; + one for a sink + window cache's
# steady phase; + one where the first stored K is a non-contiguous view (the layout changes at the second decode
# step); + one for a one-token prompt (torch's 0/1 specialization); + one where the kept view of the last tokens
# is the whole cache at the first decode step.


@dataclasses.dataclass(frozen=True)
class GrowingCase:
    storage: str  # "numpy" | "tensor"
    layout: str  # "hsd" (grown on axis 1) | "shd" (grown on axis 0)
    start: str  # "none" | "empty" | "history"
    contiguous_first: bool
    sink: int
    window: int  # 0: no eviction
    evict_by: str  # "slices" (np.concatenate of the head and tail) | "mask" (a boolean mask: nonzero, H2O-style)
    recent_view: bool  # a view of the cache's last tokens kept beside it (two inputs over one memory, read only)
    prompt_len: int
    decode_steps: int
    layers: int
    seed: int

    def short(self) -> str:
        return " ".join(f"{k}={v}" for k, v in dataclasses.asdict(self).items())


@st.composite
def growing_cases(draw, max_decode=8):
    window = draw(st.sampled_from([0, 0, 3, 5]))
    return GrowingCase(storage=draw(st.sampled_from(["numpy", "tensor"])), layout=draw(st.sampled_from(["hsd", "shd"])),
                       start=draw(st.sampled_from(["none", "empty", "history"])),
                       contiguous_first=draw(st.booleans()), sink=draw(st.integers(0, 2)) if window else 0,
                       window=window, evict_by=draw(st.sampled_from(["slices", "mask"])),
                       recent_view=draw(st.booleans()), prompt_len=draw(st.integers(1, 5)),
                       decode_steps=draw(st.integers(6, max_decode)),
                       layers=draw(st.integers(1, 2)), seed=draw(st.integers(0, 2**16)))


def growing_budget(c: GrowingCase) -> int:
    view_first = c.start == "none" and not c.contiguous_first and c.layout == "hsd"
    # a recent-tokens view that is the whole cache at the first decode step (contiguous then, a strided view
    # after): one recompile for its strides
    whole_view = c.recent_view and c.prompt_len + (2 if c.start == "history" else 0) <= 2
    return 2 + (c.window > 0) + view_first + (c.prompt_len == 1) + whole_view


class GrowingModel(nn.Module):
    """One step: per layer, project, append the step's K/V to the layer's host cache (created or grown), evict,
    attend over the cache."""

    HID, H, D = 16, 4, 4

    def __init__(self, c: GrowingCase):
        super().__init__()
        g = torch.Generator().manual_seed(c.seed)
        self.c = c
        self.w = nn.ParameterList(nn.Parameter(torch.randn(self.HID, self.HID, generator=g) / 4)
                                  for _ in range(3 * c.layers))
        rng = np.random.default_rng(c.seed)
        self.caches = []
        for _ in range(c.layers):
            if c.start == "none":
                self.caches.append([None, None])
            else:
                n = 0 if c.start == "empty" else 2
                shape = (self.H, n, self.D) if c.layout == "hsd" else (n, self.H, self.D)
                kv = [rng.standard_normal(shape).astype(np.float32) for _ in range(2)]
                self.caches.append(kv if c.storage == "numpy" else [torch.from_numpy(a) for a in kv])

    def grow(self, old, new):
        c, axis = self.c, (1 if self.c.layout == "hsd" else 0)
        if old is None:
            return (new.copy() if c.storage == "numpy" else new.contiguous()) if c.contiguous_first else new
        a = np.concatenate([old, new], axis=axis) if c.storage == "numpy" else torch.cat([old, new], axis)
        n = a.shape[axis]
        if c.window and n > c.sink + c.window and c.evict_by == "mask":
            keep = torch.cat([torch.arange(c.sink), torch.arange(n - c.window, n)])
            mask = torch.zeros(n, dtype=torch.bool).scatter(0, keep, True)
            if c.storage == "numpy":
                mask = mask.numpy()
            a = a[:, mask] if axis == 1 else a[mask]
        elif c.window and n > c.sink + c.window:
            head = a[:, : c.sink] if axis == 1 else a[: c.sink]
            tail = a[:, -c.window:] if axis == 1 else a[-c.window:]
            a = np.concatenate([head, tail], axis=axis) if c.storage == "numpy" else torch.cat([head, tail], axis)
        return a

    def forward(self, x):
        c, t = self.c, x.shape[0]
        for i, cache in enumerate(self.caches):
            q, k, v = (x @ self.w[3 * i + j] for j in range(3))
            q = q.view(t, self.H, self.D).transpose(0, 1)
            k, v = (a.view(t, self.H, self.D) for a in (k, v))
            if c.layout == "hsd":
                k, v = k.transpose(0, 1), v.transpose(0, 1)
            k, v = k.detach().cpu(), v.detach().cpu()
            if c.storage == "numpy":
                k, v = k.numpy(), v.numpy()
            cache[0], cache[1] = self.grow(cache[0], k), self.grow(cache[1], v)
            kh, vh = (torch.from_numpy(a) if c.storage == "numpy" else a for a in cache)
            if c.layout == "shd":
                kh, vh = kh.transpose(0, 1), vh.transpose(0, 1)
            a = F.scaled_dot_product_attention(q, kh.to(x.device), vh.to(x.device))
            x = x + a.transpose(0, 1).reshape(t, self.HID)
            if c.recent_view:  # the last 2 tokens of the cache, kept as a view, read by the next step
                recent = getattr(self, f"recent{i}", None)
                if recent is not None:
                    r = torch.from_numpy(recent) if c.storage == "numpy" else recent
                    x = x + r.sum() * 0.01
                k_cache = cache[0]
                setattr(self, f"recent{i}", k_cache[:, -2:] if c.layout == "hsd" else k_cache[-2:])
        return x


def growing_steps(c: GrowingCase) -> list:
    g = torch.Generator().manual_seed(c.seed + 1)
    return [torch.randn(c.prompt_len, GrowingModel.HID, generator=g)] + [
        torch.randn(1, GrowingModel.HID, generator=g) for _ in range(c.decode_steps)]
# ==== end of the growing-cache block ==========================================================================
