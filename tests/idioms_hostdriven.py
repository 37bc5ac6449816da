"""Caches that ask numpy about themselves, take their positions from the host, reorder beams or move K/V in odd
transports: written as a user porting such a cache would write them (models for ``tests/test_idioms_hostdriven.py``
and ``tests/test_ports_host_driven.py``).

The classes (issue 23's numbering):

2. **numpy asked about itself**: ``a.astype(buf.dtype)``, ``if a.dtype != buf.dtype``, ``np.zeros(shape, a.dtype)``,
   ``buf.shape`` checks inside the step. Stock Dynamo breaks the graph at ``ndarray.dtype``, so the cache's write
   and read run outside any graph.
3. **host-driven positions**: the position is a tensor read back on the host: ``int(pos_t.item())``,
   ``input_pos[0].item()`` + ``narrow`` (ExecuTorch), ``input_pos.tolist()`` per-token writes. Stock Dynamo breaks
   the graph at ``.item()`` / ``.tolist()`` and specializes the Python int it gets back.
5. **reorders and odd transports**: beam reorder with ``np.take`` / ``index_select`` on the batch dim, K/V kept as
   ``bytes`` and rebuilt with ``np.frombuffer``.

Each model keeps its K/V on the host (buffers poisoned with random values at init, never zeros), attends with
``F.scaled_dot_product_attention`` and returns the attention output. ``forward`` takes the step's hidden states
``x [t, HID]`` (and, for host-driven positions, the position tensor). Eager is the oracle.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import idioms_buffer as ib
from idioms_buffer import HID, H, D, MAX, PREFILL, poison

DECODE = 7  # prefill + 7 decode steps


def masked_out(at, q, kh, vh, mask):
    """``at.out`` with an attention mask (attention over a whole preallocated cache)."""
    a = F.scaled_dot_product_attention(q, kh, vh, attn_mask=mask)
    return at.o_proj(a.transpose(0, 1).reshape(q.shape[1], at.heads * at.d))


class Model(ib.BufferModel):
    """:class:`idioms_buffer.BufferModel` (seeded projections, poisoned ``[H, MAX, D]`` host buffers, ``pos``)."""


# ---- 2: numpy asked about itself ----------------------------------------------------------------------------


class NpDtypeCast(Model):
    """2a. ``if a.dtype != buf.dtype: a = a.astype(buf.dtype)`` before the write (a port that guards its dtype)."""

    def forward(self, x):
        at = self.layers[0]
        q, k, v = at.qkv(x)
        t, p = k.shape[1], self.pos
        a, b = k.detach().cpu().numpy(), v.detach().cpu().numpy()
        if a.dtype != self.k_buf.dtype:
            a = a.astype(self.k_buf.dtype)
        self.k_buf[:, p : p + t] = a
        self.v_buf[:, p : p + t] = b.astype(self.v_buf.dtype)
        self.pos = p + t
        return at.out(q, torch.from_numpy(self.k_buf[:, : p + t]), torch.from_numpy(self.v_buf[:, : p + t]))


class NpZerosLikeDtype(Model):
    """2b. A head-dim pad allocated in the step with the array's own dtype, ``np.zeros((H, t, 1), dtype=a.dtype)``
    + ``np.concatenate``, into a buffer one wider; the read slices the pad off. Plus shape checks:
    ``assert a.shape == (H, t, D)`` and ``if p + t > buf.shape[1]: raise``."""

    def init_cache(self, rng):
        self.k_buf = poison(rng, H, MAX, D + 1)
        self.v_buf = poison(rng, H, MAX, D + 1)

    def pad(self, a):
        assert a.shape == (H, a.shape[1], D), a.shape
        return np.concatenate([a, np.zeros((a.shape[0], a.shape[1], 1), dtype=a.dtype)], axis=-1)

    def forward(self, x):
        at = self.layers[0]
        q, k, v = at.qkv(x)
        t, p = k.shape[1], self.pos
        if p + t > self.k_buf.shape[1]:
            raise ValueError("cache full")
        self.k_buf[:, p : p + t] = self.pad(k.detach().cpu().numpy())
        self.v_buf[:, p : p + t] = self.pad(v.detach().cpu().numpy())
        self.pos = p + t
        kh = torch.from_numpy(self.k_buf[:, : p + t, :D])
        vh = torch.from_numpy(self.v_buf[:, : p + t, :D])
        return at.out(q, kh, vh)


class NpDtypeItemsize(Model):
    """2c. Byte accounting on the buffer's dtype: ``buf.dtype.itemsize``, ``np.dtype(buf.dtype).name`` checks, and a
    write cast with ``a.astype(buf.dtype, copy=False)``."""

    def forward(self, x):
        at = self.layers[0]
        q, k, v = at.qkv(x)
        t, p = k.shape[1], self.pos
        assert self.k_buf.dtype.itemsize * H * t * D == k.numel() * 4
        assert self.v_buf.dtype == np.float32
        self.k_buf[:, p : p + t] = k.detach().cpu().numpy().astype(self.k_buf.dtype, copy=False)
        self.v_buf[:, p : p + t] = v.detach().cpu().numpy()
        self.pos = p + t
        return at.out(q, torch.from_numpy(self.k_buf[:, : p + t]), torch.from_numpy(self.v_buf[:, : p + t]))


# ---- 3: host-driven positions ---------------------------------------------------------------------------------


class ItemPosition(Model):
    """3a. The position kept as a 0-d tensor on the module and read back each step: ``p = int(self.pos_t.item())``."""

    def __init__(self, seed=0):
        super().__init__(seed)
        self.pos_t = torch.zeros((), dtype=torch.long)

    def forward(self, x):
        at = self.layers[0]
        q, k, v = at.qkv(x)
        t = k.shape[1]
        p = int(self.pos_t.item())
        self.k_buf[:, p : p + t] = k.detach().cpu().numpy()
        self.v_buf[:, p : p + t] = v.detach().cpu().numpy()
        self.pos_t += t
        return at.out(q, torch.from_numpy(self.k_buf[:, : p + t]), torch.from_numpy(self.v_buf[:, : p + t]))


class ItemPositionChecked(ItemPosition):
    """3d. :class:`ItemPosition` with the bounds stated where the position is read back (``torch._check(p >= 0)``,
    ``torch._check(p + t <= buf.shape[1])``, as ExecuTorch's cache does): the rewrite can prove its read."""

    def forward(self, x):
        at = self.layers[0]
        q, k, v = at.qkv(x)
        t = k.shape[1]
        p = int(self.pos_t.item())
        torch._check(p >= 0)
        torch._check(p + t <= self.k_buf.shape[1])
        self.k_buf[:, p : p + t] = k.detach().cpu().numpy()
        self.v_buf[:, p : p + t] = v.detach().cpu().numpy()
        self.pos_t += t
        return at.out(q, torch.from_numpy(self.k_buf[:, : p + t]), torch.from_numpy(self.v_buf[:, : p + t]))


class NarrowInputPos(Model):
    """3b. ExecuTorch's dynamic-shape cache update on host tensors: ``start = input_pos[0].item()``,
    ``cache.narrow(1, start, t).copy_(k)``, attention over the whole cache with a causal mask row per position."""

    def init_cache(self, rng):
        self.k_cache = torch.from_numpy(poison(rng, H, MAX, D))
        self.v_cache = torch.from_numpy(poison(rng, H, MAX, D))
        self.mask = torch.tril(torch.ones(MAX, MAX, dtype=torch.bool))

    def cache_state(self):
        return {"k_cache": self.k_cache.clone(), "v_cache": self.v_cache.clone()}

    def forward(self, x, input_pos):
        at = self.layers[0]
        q, k, v = at.qkv(x)
        start = input_pos[0].item()
        t = k.shape[1]
        self.k_cache.narrow(1, start, t).copy_(k.detach().cpu())
        self.v_cache.narrow(1, start, t).copy_(v.detach().cpu())
        return masked_out(at, q, self.k_cache.to(x.device), self.v_cache.to(x.device), self.mask[input_pos])


class TolistPositions(Model):
    """3c. Per-token writes at the positions of an index tensor: ``for i, p in enumerate(input_pos.tolist()):
    buf[:, p] = kn[:, i]``, the history read up to ``input_pos[-1].item() + 1``."""

    def forward(self, x, input_pos):
        at = self.layers[0]
        q, k, v = at.qkv(x)
        kn, vn = k.detach().cpu().numpy(), v.detach().cpu().numpy()
        for i, p in enumerate(input_pos.tolist()):
            self.k_buf[:, p] = kn[:, i]
            self.v_buf[:, p] = vn[:, i]
        end = int(input_pos[-1].item()) + 1
        return at.out(q, torch.from_numpy(self.k_buf[:, :end]), torch.from_numpy(self.v_buf[:, :end]))


# ---- 5: reorders and odd transports ------------------------------------------------------------------------------

BEAMS = 2


class BeamModel(Model):
    """Two beams: buffers ``[BEAMS, H, MAX, D]``, hidden states ``x [BEAMS, t, HID]``, a ``beam_idx [BEAMS]`` per step."""

    def init_cache(self, rng):
        self.k_buf = poison(rng, BEAMS, H, MAX, D)
        self.v_buf = poison(rng, BEAMS, H, MAX, D)

    def qkv(self, x):
        parts = [self.layers[0].qkv(xb) for xb in x]
        return [torch.stack([p[i] for p in parts]) for i in range(3)]

    def attend(self, q, kh, vh):
        at = self.layers[0]
        return torch.stack([at.out(q[b], kh[b], vh[b]) for b in range(q.shape[0])])


class BeamTake(BeamModel):
    """5a. Beam reorder on the host, ``buf = np.take(buf, beam_idx.numpy(), axis=0)``, then the write and the read."""

    def forward(self, x, beam_idx):
        q, k, v = self.qkv(x)
        t, p = k.shape[2], self.pos
        idx = beam_idx.numpy()
        self.k_buf = np.take(self.k_buf, idx, axis=0)
        self.v_buf = np.take(self.v_buf, idx, axis=0)
        self.k_buf[:, :, p : p + t] = k.detach().cpu().numpy()
        self.v_buf[:, :, p : p + t] = v.detach().cpu().numpy()
        self.pos = p + t
        kh = torch.from_numpy(self.k_buf[:, :, : p + t])
        vh = torch.from_numpy(self.v_buf[:, :, : p + t])
        return self.attend(q, kh, vh)


class BeamIndexSelect(BeamModel):
    """5b. transformers' ``_reorder_cache`` on host tensors: ``past.index_select(0, beam_idx.to(past.device))``."""

    def init_cache(self, rng):
        self.k_buf = torch.from_numpy(poison(rng, BEAMS, H, MAX, D))
        self.v_buf = torch.from_numpy(poison(rng, BEAMS, H, MAX, D))

    def cache_state(self):
        return {"k_buf": self.k_buf.clone(), "v_buf": self.v_buf.clone()}

    def forward(self, x, beam_idx):
        q, k, v = self.qkv(x)
        t, p = k.shape[2], self.pos
        self.k_buf = self.k_buf.index_select(0, beam_idx.to(self.k_buf.device))
        self.v_buf = self.v_buf.index_select(0, beam_idx.to(self.v_buf.device))
        self.k_buf[:, :, p : p + t] = k.detach().cpu()
        self.v_buf[:, :, p : p + t] = v.detach().cpu()
        self.pos = p + t
        return self.attend(q, self.k_buf[:, :, : p + t], self.v_buf[:, :, : p + t])


class BeamInPlace(BeamModel):
    """Beam reorders that keep the buffer object (more forms of ``_reorder_cache`` ported to the host), then the
    step's write and the read: :meth:`reorder` is the form."""

    def forward(self, x, beam_idx):
        q, k, v = self.qkv(x)
        t, p = k.shape[2], self.pos
        self.reorder(beam_idx, p)
        host = (lambda a: a.detach().cpu().numpy()) if isinstance(self.k_buf, np.ndarray) else (lambda a: a.detach().cpu())
        self.k_buf[:, :, p : p + t] = host(k)
        self.v_buf[:, :, p : p + t] = host(v)
        self.pos = p + t
        kh, vh = self.k_buf[:, :, : p + t], self.v_buf[:, :, : p + t]
        if isinstance(kh, np.ndarray):
            kh, vh = torch.from_numpy(kh), torch.from_numpy(vh)
        return self.attend(q, kh, vh)


class BeamTakeOut(BeamInPlace):
    """5h. ``np.take(buf, idx, axis=0, out=spare)`` into a second buffer, then the two swapped."""

    def init_cache(self, rng):
        super().init_cache(rng)
        self.k_spare, self.v_spare = np.empty_like(self.k_buf), np.empty_like(self.v_buf)

    def reorder(self, beam_idx, p):
        idx = beam_idx.numpy()
        np.take(self.k_buf, idx, axis=0, out=self.k_spare)
        np.take(self.v_buf, idx, axis=0, out=self.v_spare)
        self.k_buf, self.k_spare = self.k_spare, self.k_buf
        self.v_buf, self.v_spare = self.v_spare, self.v_buf


class BeamFancyInPlace(BeamInPlace):
    """5i. ``buf[:] = buf[idx]`` and ``buf[np.arange(B)] = buf[idx]`` (fancy-index assignment) in place."""

    def reorder(self, beam_idx, p):
        idx = beam_idx.numpy()
        self.k_buf[:] = self.k_buf[idx]
        self.v_buf[np.arange(BEAMS)] = self.v_buf[idx]


class BeamFirstRows(BeamInPlace):
    """5j. Only the rows written so far reordered: ``buf[:, :, :p] = buf[idx, :, :p]``."""

    def reorder(self, beam_idx, p):
        idx = beam_idx.numpy()
        self.k_buf[:, :, :p] = self.k_buf[idx, :, :p]
        self.v_buf[:, :, :p] = self.v_buf[idx, :, :p]


class BeamTensorInPlace(BeamInPlace):
    """5k. Host tensors reordered in place: ``buf.copy_(buf.index_select(0, beam_idx.to(buf.device)))`` and
    ``buf[:, :, :p] = buf[beam_idx, :, :p]``."""

    def init_cache(self, rng):
        self.k_buf = torch.from_numpy(poison(rng, BEAMS, H, MAX, D))
        self.v_buf = torch.from_numpy(poison(rng, BEAMS, H, MAX, D))

    def cache_state(self):
        return {"k_buf": self.k_buf.clone(), "v_buf": self.v_buf.clone()}

    def reorder(self, beam_idx, p):
        self.k_buf.copy_(self.k_buf.index_select(0, beam_idx.to(self.k_buf.device)))
        self.v_buf[:, :, :p] = self.v_buf[beam_idx, :, :p]


class BytesTransport(Model):
    """5c. K/V kept as ``bytes`` (``a.tobytes()``, as for a socket or a shared-memory hop) and rebuilt with
    ``np.frombuffer(b, dtype=np.float32).reshape(...)`` before the write into the buffer."""

    def forward(self, x):
        at = self.layers[0]
        q, k, v = at.qkv(x)
        t, p = k.shape[1], self.pos
        kb, vb = k.detach().cpu().numpy().tobytes(), v.detach().cpu().numpy().tobytes()
        self.k_buf[:, p : p + t] = np.frombuffer(kb, dtype=np.float32).reshape(H, t, D)
        self.v_buf[:, p : p + t] = np.frombuffer(vb, dtype=np.float32).reshape(H, t, D)
        self.pos = p + t
        return at.out(q, torch.from_numpy(self.k_buf[:, : p + t]), torch.from_numpy(self.v_buf[:, : p + t]))


# ---- 3, K/V kept in Python lists of rows (llama2.c pure-Python ports) ---------------------------------------------


class ListRows(Model):
    """Two layers; each keeps its K/V as a Python list of rows (``[H, D]`` per position): the forms below fill
    and read them. ``forward`` returns the last layer's output."""

    LAYERS = 2

    def cache_state(self):
        return {"keys": torch.stack([torch.as_tensor(r).reshape(H, D) for r in self.keys[0][: self.pos]])}

    def forward(self, x):
        p, t = self.pos, x.shape[0]
        for layer, at in enumerate(self.layers):
            q, k, v = at.qkv(x)
            self.store(layer, p, k, v)
            kh, vh = self.history(layer, p + t)
            x = x + at.out(q, kh, vh)
        self.pos = p + t
        return x


class ListRowsTolist(ListRows):
    """3e. Rows as Python floats: ``key_cache[l][pos + j] = k[:, j].reshape(-1).tolist()`` into a preallocated list
    of ``MAX`` rows, read with ``torch.tensor(key_cache[l][:end])`` (a pure-Python llama2.c port moved to torch)."""

    def init_cache(self, rng):
        self.keys = [[poison(rng, H * D).tolist() for _ in range(MAX)] for _ in range(self.LAYERS)]
        self.values = [[poison(rng, H * D).tolist() for _ in range(MAX)] for _ in range(self.LAYERS)]

    def store(self, layer, p, k, v):
        for j in range(k.shape[1]):
            self.keys[layer][p + j] = k[:, j].reshape(-1).tolist()
            self.values[layer][p + j] = v[:, j].reshape(-1).tolist()

    def history(self, layer, end):
        def rows(cache):
            return torch.tensor(cache[layer][:end]).view(end, H, D).transpose(0, 1)

        return rows(self.keys), rows(self.values)


class ListRowsAppend(ListRows):
    """3f. Rows as tensors appended to a list per layer, ``keys[l].append(k[:, j].detach().cpu())``, read with
    ``torch.stack(keys[l], dim=1)``."""

    def init_cache(self, rng):
        self.keys = [[] for _ in range(self.LAYERS)]
        self.values = [[] for _ in range(self.LAYERS)]

    def store(self, layer, p, k, v):
        for j in range(k.shape[1]):
            self.keys[layer].append(k[:, j].detach().cpu())
            self.values[layer].append(v[:, j].detach().cpu())

    def history(self, layer, end):
        return torch.stack(self.keys[layer], dim=1), torch.stack(self.values[layer], dim=1)


class ListRowsPreallocated(ListRowsAppend):
    """3g. A preallocated list of ``MAX`` row tensors written at the position, ``keys[l][pos + j] = k[:, j].cpu()``,
    read with ``torch.stack(keys[l][:end], dim=1)``."""

    def init_cache(self, rng):
        self.keys = [[torch.from_numpy(poison(rng, H, D))] * MAX for _ in range(self.LAYERS)]
        self.values = [[torch.from_numpy(poison(rng, H, D))] * MAX for _ in range(self.LAYERS)]

    def store(self, layer, p, k, v):
        for j in range(k.shape[1]):
            self.keys[layer][p + j] = k[:, j].detach().cpu()
            self.values[layer][p + j] = v[:, j].detach().cpu()

    def history(self, layer, end):
        return torch.stack(self.keys[layer][:end], dim=1), torch.stack(self.values[layer][:end], dim=1)


# ---- 5, numpy views of one buffer shifted against each other (a window of the last W tokens) --------------------

W = 6  # window slots


class ShiftModel(Model):
    """A window of the last ``W`` tokens in ``[H, W, D]`` host buffers, attended whole (poisoned slots included:
    they are the same in eager and compiled)."""

    def init_cache(self, rng):
        self.k_buf = poison(rng, H, W, D)
        self.v_buf = poison(rng, H, W, D)

    def forward(self, x):
        at = self.layers[0]
        q, k, v = at.qkv(x)
        kn, vn = k.detach().cpu().numpy(), v.detach().cpu().numpy()
        for j in range(kn.shape[1]):
            self.shift(self.k_buf, kn[:, j], "k")
            self.shift(self.v_buf, vn[:, j], "v")
        return at.out(q, torch.from_numpy(self.k_buf), torch.from_numpy(self.v_buf))


class ShiftLeft(ShiftModel):
    """5d. Oldest first: ``buf[:, :-1] = buf[:, 1:]`` (the source starts after the destination), newest at ``-1``."""

    def shift(self, buf, row, name):
        buf[:, :-1] = buf[:, 1:]
        buf[:, -1] = row


class ShiftRight(ShiftModel):
    """5e. Newest first: ``buf[:, 1:] = buf[:, :-1]`` (the source starts before the destination: a forward
    element-by-element copy would smear the first slot over all), newest at ``0``."""

    def shift(self, buf, row, name):
        buf[:, 1:] = buf[:, :-1]
        buf[:, 0] = row


class ShiftViewsLeft(ShiftModel):
    """5f. The two shifted views held as attributes beside the buffer, ``older = buf[:, :-1]``, ``newer =
    buf[:, 1:]``; each step ``older[...] = newer``, then the newest at ``buf[:, -1]``."""

    def init_cache(self, rng):
        super().init_cache(rng)
        self.k_older, self.k_newer = self.k_buf[:, :-1], self.k_buf[:, 1:]
        self.v_older, self.v_newer = self.v_buf[:, :-1], self.v_buf[:, 1:]

    def shift(self, buf, row, name):
        getattr(self, f"{name}_older")[...] = getattr(self, f"{name}_newer")
        buf[:, -1] = row


class ShiftViewsRight(ShiftViewsLeft):
    """5g. :class:`ShiftViewsLeft` the other way: ``newer[...] = older`` (overlapping, source before destination),
    then the newest at ``buf[:, 0]``."""

    def shift(self, buf, row, name):
        getattr(self, f"{name}_newer")[...] = getattr(self, f"{name}_older")
        buf[:, 0] = row


#: more beam reorders (``out=``, in place, fancy-index assignment, the first ``pos`` rows only, host tensors)
BEAM_FORMS = {"5h_beam_take_out": BeamTakeOut, "5i_beam_fancy_in_place": BeamFancyInPlace,
              "5j_beam_first_rows": BeamFirstRows, "5k_beam_tensor_in_place": BeamTensorInPlace}

#: K/V kept in Python lists that grow with the position: kvpass names the line and runs that function eagerly
LIST_ROWS = {"3e_list_rows_tolist": ListRowsTolist, "3f_list_rows_append": ListRowsAppend,
             "3g_list_rows_preallocated": ListRowsPreallocated}

#: shifted windows: within one array (one graph input), and through two views of it held beside it (overlapping
#: graph inputs: run as traced, every write reading its source first, as numpy does)
SHIFTS = {"5d_shift_left": ShiftLeft, "5e_shift_right": ShiftRight, "5f_shift_views_left": ShiftViewsLeft,
          "5g_shift_views_right": ShiftViewsRight}


IDIOMS = {
    "2a_np_dtype_cast": NpDtypeCast,
    "2b_np_zeros_dtype_shape_checks": NpZerosLikeDtype,
    "2c_np_dtype_itemsize": NpDtypeItemsize,
    "3a_item_position": ItemPosition,
    "3b_narrow_input_pos": NarrowInputPos,
    "3d_item_position_checked": ItemPositionChecked,
    "3c_tolist_positions": TolistPositions,
    "5a_beam_np_take": BeamTake,
    "5b_beam_index_select": BeamIndexSelect,
}

#: stock Dynamo cannot trace these at all: kvpass names the line and runs them eagerly
UNTRACEABLE = {"5c_bytes_frombuffer": BytesTransport}


def model_class(name):
    """The model class of an idiom name, in any of the tables."""
    return {**IDIOMS, **UNTRACEABLE, **LIST_ROWS, **SHIFTS, **BEAM_FORMS}[name]


def inputs(name, decode=DECODE):
    """The step inputs: a prefill of ``PREFILL`` tokens, then ``decode`` one-token steps, fresh random hidden states;
    with the positions (``input_pos``) or a random beam permutation (``beam_idx``) where the model takes one."""
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    cls = model_class(name)
    lens = [PREFILL] + [1] * decode
    out, pos = [], 0
    for t in lens:
        if issubclass(cls, BeamModel):
            out.append((torch.randn(BEAMS, t, HID, generator=g), torch.randperm(BEAMS, generator=g)))
        elif cls in (NarrowInputPos, TolistPositions):
            out.append((torch.randn(t, HID, generator=g), torch.arange(pos, pos + t)))
        else:
            out.append((torch.randn(t, HID, generator=g),))
        pos += t
    return out


def run_steps(step, xs):
    """``step(*inputs)`` for each step, without autograd; every output copied out at once."""
    with torch.no_grad():
        return [step(*x).detach().clone() for x in xs]


class Measured(ib.Measured):
    """:class:`idioms_buffer.Measured` plus Dynamo's graph-break count and the recompile reasons."""

    breaks = 0
    recompiles: list = []


def measure(name, decode=DECODE, inner=None, compile=None) -> Measured:
    """Eager vs ``kvpass.compile(model, backend=kvpass.backend(inner=<recording eager>))`` (or ``compile(model,
    front)``, e.g. stock ``torch.compile``) over a prefill and ``decode`` steps of fresh random inputs."""
    return measure_model(model_class(name), inputs(name, decode), inner, compile)


def measure_model(cls, xs, inner=None, compile=None) -> Measured:
    """:func:`measure` for any model class ``cls`` (built without arguments) and step inputs ``xs``."""
    import copy

    import kvpass
    from kvpass.testing import RecordingBackend
    from torch._dynamo.utils import counters

    m = Measured()
    m.want = run_steps(cls(), xs)
    m.model = cls()
    rec = RecordingBackend()
    kv = kvpass.backend(inner=inner or rec, on_report=m.reports.append)

    def front(gm, example_inputs, **kw):
        m.dynamo.append(copy.deepcopy(gm))
        return kv(gm, example_inputs, **kw)

    torch._dynamo.reset()
    counters.clear()
    recompiles: list = []
    import logging

    class Keep(logging.Handler):
        def emit(self, record):
            recompiles.append(record.getMessage())

    log = logging.getLogger("torch._dynamo.guards")
    keep = Keep()
    log.addHandler(keep)
    torch._logging.set_logs(recompiles=True)
    try:
        compiled = compile(m.model, front) if compile else kvpass.compile(m.model, backend=front)
        m.got = run_steps(compiled, xs)
    finally:
        log.removeHandler(keep)
        torch._logging.set_logs()
    m.inner = rec.graphs
    m.breaks = max(sum(counters["graph_break"].values()), sum(counters["unimplemented"].values()))
    m.recompiles = recompiles
    return m


def has_attention(gm) -> bool:
    """Whether attention (SDPA, or its ``bmm`` decomposition) is in ``gm``: the cache's read reached a graph."""
    try:
        ib.kv_path(gm)
    except AssertionError:
        return False
    return True


def host_ops(graphs) -> int:
    """Host round-trip ops on an attention's K/V path, over the graphs that hold an attention."""
    return sum(len(ib.kv_host_ops(g)) for g in graphs if has_attention(g))


def table(names=None) -> str:
    """One row per idiom: graphs, graph breaks, K/V-path host ops after kvpass, max |compiled - eager|."""
    rows = ["| idiom | graphs (prefill + %d decode) | graph breaks | graphs with attention | K/V-path host ops, "
            "inner graphs | rewrites | max abs err |" % DECODE, "|---|---:|---:|---:|---:|---:|---:|"]
    for name in names or IDIOMS:
        try:
            m = measure(name)
        except Exception as e:  # noqa: BLE001 - the table records where things stand, failures too
            rows.append(f"| {name} | error: {type(e).__name__}: {str(e).splitlines()[0][:100]} | | | | | |")
            continue
        rows.append(f"| {name} | {len(m.dynamo)} | {m.breaks} | {sum(map(has_attention, m.inner))} | "
                    f"{host_ops(m.inner)} | {sum(len(r.matches) for r in m.reports)} | {m.max_error():.1e} |")
    return "\n".join(rows)


if __name__ == "__main__":
    import sys
    import warnings

    warnings.simplefilter("ignore")
    print(table(sys.argv[1:] or None))
