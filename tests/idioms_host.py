"""Issue 12, part A: host-cache idioms as a user writes them (numpy layout ops, tensor rebuilds, host padding by a
follower, host int8 quantization, bf16 through float32, hops that end on the host, a flat 1-D cache).

Each model is a small attention layer with ``Linear`` Q/K/V projections and a cache on the host, written the way
a port of some framework's cache would be (buffers poisoned with random values at init, so a rewrite that reads
a slot nobody wrote shows). ``forward(x [t, HID])`` runs one step (a prefill, then one token per decode step) and
returns the attention output and copies of the histories it attended over. Eager output is the oracle.

``IDIOMS`` maps an id (``<issue item>_<what>``) to the model class.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

HID, H, D, MAX = 8, 2, 4, 16


def poison(rng, *shape, dtype=np.float32):
    return rng.standard_normal(shape).astype(dtype)


def attend(q, k, v):
    """Attention of ``q [H, t, d]`` over the history ``k, v [H, s, d]`` (no mask: the tests compare values)."""
    return F.scaled_dot_product_attention(q, k, v)


class HostLayer(nn.Module):
    """Q/K/V projections (seeded), an int position ``pos`` on the module and the host cache from ``init_cache``."""

    d = D
    dtype = torch.float32

    def __init__(self, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.q_proj = nn.Linear(HID, H * self.d, bias=False)
        self.k_proj = nn.Linear(HID, H * self.d, bias=False)
        self.v_proj = nn.Linear(HID, H * self.d, bias=False)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(HID))
        self.to(self.dtype)
        self.pos = 0
        self.init_cache(np.random.default_rng(seed + 1))

    def init_cache(self, rng):
        """Default: K and V buffers ``[H, MAX, d]`` (heads-major), poisoned."""
        self.k_buf = poison(rng, H, MAX, self.d)
        self.v_buf = poison(rng, H, MAX, self.d)

    def qkv(self, x):
        t = x.shape[0]
        return tuple(p(x).view(t, H, self.d).transpose(0, 1) for p in (self.q_proj, self.k_proj, self.v_proj))


# ---- item 1: numpy layout ops between the device and the buffer -------------------------------------------


class SeqMajorBuffer(HostLayer):
    """A seq-major host buffer ``[MAX, H, D]``: written through ``.transpose(1, 0, 2)``, read back with
    ``torch.as_tensor(buf[:e]).to(dev).transpose(0, 1)``."""

    def init_cache(self, rng):
        self.k_buf = poison(rng, MAX, H, self.d)
        self.v_buf = poison(rng, MAX, H, self.d)

    def forward(self, x):
        q, k, v = self.qkv(x)
        t, p = k.shape[1], self.pos
        self.k_buf[p : p + t] = k.detach().cpu().numpy().transpose(1, 0, 2)
        self.v_buf[p : p + t] = v.detach().cpu().numpy().transpose(1, 0, 2)
        self.pos = p + t
        kh = torch.as_tensor(self.k_buf[: p + t]).to(x.device).transpose(0, 1)
        vh = torch.as_tensor(self.v_buf[: p + t]).to(x.device).transpose(0, 1)
        return attend(q, kh, vh), kh * 1.0, vh * 1.0


class KStoredTransposed(HostLayer):
    """K kept transposed, ``[H, D, MAX]`` (ready for ``q @ kT``), written with ``np.swapaxes``; V ``[H, MAX, D]``."""

    def init_cache(self, rng):
        self.kt_buf = poison(rng, H, self.d, MAX)
        self.v_buf = poison(rng, H, MAX, self.d)

    def forward(self, x):
        q, k, v = self.qkv(x)
        t, p = k.shape[1], self.pos
        self.kt_buf[:, :, p : p + t] = np.swapaxes(k.detach().cpu().numpy(), 1, 2)
        self.v_buf[:, p : p + t] = v.detach().cpu().numpy()
        self.pos = p + t
        kt = torch.from_numpy(self.kt_buf[:, :, : p + t]).to(x.device)
        vh = torch.from_numpy(self.v_buf[:, : p + t]).to(x.device)
        return attend(q, kt.transpose(1, 2), vh), kt * 1.0, vh * 1.0


class FlatHeadsBuffer(HostLayer):
    """Heads merged into one feature dim, ``[MAX, H * D]``: ``.transpose(1, 0, 2).reshape(t, H * D)`` on write,
    ``buf[:e].reshape(e, H, D)`` + ``.transpose(0, 1)`` on read."""

    def init_cache(self, rng):
        self.k_buf = poison(rng, MAX, H * self.d)
        self.v_buf = poison(rng, MAX, H * self.d)

    def forward(self, x):
        q, k, v = self.qkv(x)
        t, p = k.shape[1], self.pos
        self.k_buf[p : p + t] = k.detach().cpu().numpy().transpose(1, 0, 2).reshape(t, H * self.d)
        self.v_buf[p : p + t] = v.detach().cpu().numpy().transpose(1, 0, 2).reshape(t, H * self.d)
        self.pos = p + t
        e = p + t
        kh = torch.from_numpy(self.k_buf[:e].reshape(e, H, self.d)).to(x.device).transpose(0, 1)
        vh = torch.from_numpy(self.v_buf[:e].reshape(e, H, self.d)).to(x.device).transpose(0, 1)
        return attend(q, kh, vh), kh * 1.0, vh * 1.0


class BatchDimNoneSqueeze(HostLayer):
    """A batch dim on the host: K written as ``a[None]`` into ``[1, H, MAX, D]`` and read ``.squeeze(0)`` (numpy);
    V seq-major ``[MAX, H, D]`` with ``np.swapaxes`` on both sides."""

    def init_cache(self, rng):
        self.k_buf = poison(rng, 1, H, MAX, self.d)
        self.v_buf = poison(rng, MAX, H, self.d)

    def forward(self, x):
        q, k, v = self.qkv(x)
        t, p = k.shape[1], self.pos
        self.k_buf[:, :, p : p + t] = k.detach().cpu().numpy()[None]
        self.v_buf[p : p + t] = np.swapaxes(v.detach().cpu().numpy(), 0, 1)
        self.pos = p + t
        kh = torch.from_numpy(self.k_buf[:, :, : p + t].squeeze(0)).to(x.device)
        vh = torch.from_numpy(np.swapaxes(self.v_buf[: p + t], 0, 1)).to(x.device)
        return attend(q, kh, vh), kh * 1.0, vh * 1.0


# ---- item 2: other ways through numpy and back ----------------------------------------------------------


class TensorRebuilds(HostLayer):
    """``np.asarray(t)`` / ``np.array(t, dtype=)`` as the hop to the host; ``torch.tensor(ndarray, device=dev)`` and
    ``torch.asarray(ndarray, device=dev)``, with and without ``dtype=``, back (each history read both ways)."""

    def forward(self, x):
        q, k, v = self.qkv(x)
        t, p = k.shape[1], self.pos
        self.k_buf[:, p : p + t] = np.asarray(k.detach().cpu())
        self.v_buf[:, p : p + t] = np.array(v.detach().cpu(), dtype=np.float32)
        self.pos = p + t
        e, dev = p + t, x.device
        kh = torch.tensor(self.k_buf[:, :e], device=dev)
        vh = torch.asarray(self.v_buf[:, :e], dtype=torch.float32, device=dev)
        kh2 = torch.asarray(self.k_buf[:, :e], device=dev)
        vh2 = torch.tensor(self.v_buf[:, :e], dtype=torch.float32, device=dev)
        return attend(q, kh, vh), attend(q, kh2, vh2), kh * 1.0, vh2 * 1.0


# ---- item 3: a follower pads its head dim with np.zeros + np.concatenate into its owner's buffer -----------


class PaddedFollowerConcat(SeqMajorBuffer):
    """Owner (head dim ``D``) and a follower with head dim ``DF < D`` sharing the owner's seq-major buffer
    ``[MAX, H, D]``. The follower writes at its *own* position, after the owner (last writer wins), its K/V
    transposed to seq-major and padded with ``np.zeros`` + ``np.concatenate(axis=-1)``; then reads the owner's
    view back sliced to ``DF``."""

    DF = 3

    def __init__(self, seed=0):
        super().__init__(seed)
        g = torch.Generator().manual_seed(seed + 7)
        self.fq_proj = nn.Linear(HID, H * self.DF, bias=False)
        self.fk_proj = nn.Linear(HID, H * self.DF, bias=False)
        self.fv_proj = nn.Linear(HID, H * self.DF, bias=False)
        with torch.no_grad():
            for p in (self.fq_proj.weight, self.fk_proj.weight, self.fv_proj.weight):
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(HID))
        self.fpos = 0

    def pad(self, a):
        """``[H, t, DF]`` on the device -> ``[t, H, D]`` on the host, zero-padded."""
        a = a.detach().cpu().numpy().transpose(1, 0, 2)
        z = np.zeros((a.shape[0], a.shape[1], self.d - self.DF), dtype=np.float32)
        return np.concatenate([a, z], axis=-1)

    def forward(self, x):
        out, kh, _ = super().forward(x)  # the owner layer, as in SeqMajorBuffer
        t = x.shape[0]
        # the follower layer (here in the same module: its own projections and its own position)
        fq, fk, fv = (proj(out.transpose(0, 1).reshape(t, H * self.d)).view(t, H, self.DF).transpose(0, 1)
                      for proj in (self.fq_proj, self.fk_proj, self.fv_proj))
        f = self.fpos
        self.k_buf[f : f + t] = self.pad(fk)
        self.v_buf[f : f + t] = self.pad(fv)
        self.fpos = f + t
        end = max(self.pos, self.fpos)
        fkh = torch.from_numpy(self.k_buf[:end, :, : self.DF]).to(x.device).transpose(0, 1)
        fvh = torch.from_numpy(self.v_buf[:end, :, : self.DF]).to(x.device).transpose(0, 1)
        return attend(fq, fkh, fvh), kh * 1.0, fkh * 1.0, fvh * 1.0


# ---- item 9: int8 quantization on the host --------------------------------------------------------------


class HostInt8Quant(HostLayer):
    """K/V quantized to int8 on the host, one scale per token and head (``absmax / 127``, ``np.round``,
    ``np.clip``, ``.astype(np.int8)``), stored with the scales; dequantized on read (``q * scale`` on the
    device)."""

    def init_cache(self, rng):
        self.k_q = rng.integers(-128, 128, (H, MAX, self.d)).astype(np.int8)
        self.v_q = rng.integers(-128, 128, (H, MAX, self.d)).astype(np.int8)
        self.k_s = poison(rng, H, MAX, 1)
        self.v_s = poison(rng, H, MAX, 1)

    @staticmethod
    def quantize(a):
        scale = np.maximum(np.abs(a).max(axis=-1, keepdims=True) / 127.0, 1e-8)
        return np.clip(np.round(a / scale), -128, 127).astype(np.int8), scale.astype(np.float32)

    def forward(self, x):
        q, k, v = self.qkv(x)
        t, p = k.shape[1], self.pos
        kq, ks = self.quantize(k.detach().cpu().numpy())
        vq, vs = self.quantize(v.detach().cpu().numpy())
        self.k_q[:, p : p + t], self.k_s[:, p : p + t] = kq, ks
        self.v_q[:, p : p + t], self.v_s[:, p : p + t] = vq, vs
        self.pos = p + t
        e = p + t
        kh = torch.from_numpy(self.k_q[:, :e]).to(x.device).float() * torch.from_numpy(self.k_s[:, :e]).to(x.device)
        vh = torch.from_numpy(self.v_q[:, :e]).to(x.device).float() * torch.from_numpy(self.v_s[:, :e]).to(x.device)
        return attend(q, kh, vh), kh * 1.0, vh * 1.0


# ---- item 10: a bf16 model through a float32 host buffer ------------------------------------------------


class Bf16ThroughFloat32(HostLayer):
    """A bfloat16 model: numpy has no bfloat16, so K/V go ``.float().cpu().numpy()`` into a float32 buffer and
    come back ``.to(torch.bfloat16)``."""

    dtype = torch.bfloat16


    def forward(self, x):
        q, k, v = self.qkv(x)
        t, p = k.shape[1], self.pos
        self.k_buf[:, p : p + t] = k.float().cpu().numpy()
        self.v_buf[:, p : p + t] = v.detach().float().cpu().numpy()
        self.pos = p + t
        kh = torch.from_numpy(self.k_buf[:, : p + t]).to(x.device).to(torch.bfloat16)
        vh = torch.from_numpy(self.v_buf[:, : p + t]).to(device=x.device, dtype=torch.bfloat16)
        return attend(q, kh, vh), kh * 1.0, vh * 1.0


# ---- item 11: a hop that ends on the host, back later -----------------------------------------------------


class HostTensorCache(HostLayer):
    """A cache of host *tensors* (no numpy): ``k.detach().cpu().to("cpu")`` written into a preallocated CPU tensor,
    ``v.cpu().clone()`` appended to a growing CPU history; both brought back to the device when attended over."""

    def init_cache(self, rng):
        self.k_host = torch.from_numpy(poison(rng, H, MAX, self.d))
        self.v_host = torch.empty(H, 0, self.d)

    def forward(self, x):
        q, k, v = self.qkv(x)
        t, p = k.shape[1], self.pos
        self.k_host[:, p : p + t] = k.detach().cpu().to("cpu")
        self.v_host = torch.cat([self.v_host, v.cpu().clone()], 1)
        self.pos = p + t
        kh = self.k_host[:, : p + t].to(x.device)
        vh = self.v_host.to(x.device)
        return attend(q, kh, vh), kh * 1.0, vh * 1.0


# ---- item 12: a flat 1-D host array, viewed as [H, MAX, D] afresh at every access -------------------------


class FlatArrayCache(HostLayer):
    """A literal port of a framework whose cache is one flat float array: every access goes through a fresh
    ``flat.reshape(H, MAX, D)`` view (written through it, read through another)."""

    def init_cache(self, rng):
        self.k_flat = poison(rng, H * MAX * self.d)
        self.v_flat = poison(rng, H * MAX * self.d)

    def forward(self, x):
        q, k, v = self.qkv(x)
        t, p = k.shape[1], self.pos
        kb = self.k_flat.reshape(H, MAX, self.d)
        kb[:, p : p + t] = k.detach().cpu().numpy()
        vb = self.v_flat.reshape(H, MAX, self.d)
        vb[:, p : p + t] = v.detach().cpu().numpy()
        self.pos = p + t
        kh = torch.from_numpy(self.k_flat.reshape(H, MAX, self.d)[:, : p + t]).to(x.device)
        vh = torch.from_numpy(self.v_flat.reshape(H, MAX, self.d)[:, : p + t]).to(x.device)
        return attend(q, kh, vh), kh * 1.0, vh * 1.0


IDIOMS = {
    "01a_seq_major_buffer": SeqMajorBuffer,
    "01b_k_stored_transposed": KStoredTransposed,
    "01c_flat_heads_reshape": FlatHeadsBuffer,
    "01d_batch_dim_none_squeeze": BatchDimNoneSqueeze,
    "02_tensor_rebuilds": TensorRebuilds,
    "03_padded_follower_concat": PaddedFollowerConcat,
    "09_host_int8_quant": HostInt8Quant,
    "10_bf16_through_float32": Bf16ThroughFloat32,
    "11_host_tensor_cache": HostTensorCache,
    "12_flat_array_cache": FlatArrayCache,
}


# ---- measuring where an idiom stands (tests/test_idioms_host.py asserts on these; ``python tests/idioms_host.py``
# prints them as a table) ----------------------------------------------------------------------------------

PREFILL = 4


def inputs(name, decode=8, dtype=torch.float32):
    """A prefill of ``PREFILL`` tokens, then ``decode`` one-token steps: fresh random hidden states."""
    import zlib

    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    return [torch.randn(t, HID, generator=g).to(dtype) for t in [PREFILL] + [1] * decode]


def run(step, xs):
    """Every step's outputs (copies), without autograd."""
    with torch.no_grad():
        return [[o.detach().clone() for o in step(x)] for x in xs]


def kv_path(gm):
    """The nodes an attention's K or V may depend on: everything the graph's outputs depend on (these models
    compute nothing but attention and the histories they attend over; AOTAutograd may have decomposed the
    attention into ``bmm`` + softmax, so its K/V are not always arguments of one attention op)."""
    stack = [n for n in gm.graph.nodes if n.op == "output"]
    seen = set()
    while stack:
        n = stack.pop()
        if isinstance(n, torch.fx.Node) and n not in seen:
            seen.add(n)
            stack.extend(n.all_input_nodes)
    return seen


_WRITES = ("slice_scatter", "select_scatter", "index_put", "copy")
_VIEWS = ("slice", "select", "view", "_unsafe_view", "reshape", "permute", "transpose", "unsqueeze", "squeeze")


def _aten_name(node):
    packet = getattr(node.target, "overloadpacket", None) if isinstance(node, torch.fx.Node) else None
    return packet.__name__ if packet is not None else None


def reads_of_writes(gm):
    """Reads (``slice``/``select``) of a cache buffer's state after a write in this graph, through any views:
    the state is a graph input with a ``copy_`` epilogue, a write a functional scatter into it."""
    states = {n.args[0] for n in gm.graph.nodes if _aten_name(n) == "copy_" and n.args[0].op == "placeholder"}

    def written_state(x):
        wrote = False
        while isinstance(x, torch.fx.Node) and x.op == "call_function" and _aten_name(x) in _WRITES + _VIEWS:
            wrote = wrote or _aten_name(x) in _WRITES
            x = x.args[0]
        return wrote and x in states

    return [n for n in gm.graph.nodes if _aten_name(n) in ("slice", "select") and written_state(n.args[0])]


def kv_path_problems(gm):
    """What an attention's K/V path must not hold in the graph handed to the inner compiler: host round-trip ops
    (a copy to another device, numpy-wrapped ops, ``as_tensor``/``from_numpy``/``tensor``: ``host_round_trip_nodes``)
    and reads of a cache buffer's state *after this step's write* (K/V would reach attention through the buffer,
    not through the graph's edges). On this CPU machine ``.cpu()`` is a no-op, so the second kind is what a host
    round trip leaves behind."""
    from kvpass.testing import host_round_trip_nodes

    path = kv_path(gm)
    bad = set(host_round_trip_nodes(gm)) | set(reads_of_writes(gm))
    return [n for n in gm.graph.nodes if n in path and n in bad]


def measure(name, decode=8, patterns=None):
    """Compile ``IDIOMS[name]`` with ``kvpass.compile(backend=kvpass.backend(inner=RecordingBackend))`` and run a
    prefill and ``decode`` steps; returns what it saw: graphs compiled, host ops on K/V paths in the Dynamo graphs
    (before) and problems left on K/V paths in the graphs handed to the inner compiler (after), the reports, and
    the max abs difference from eager. ``patterns``: the rules to run (``[]``: none, to see the checks fail)."""
    import kvpass
    from kvpass.testing import RecordingBackend

    import fuzz_decoders as fd

    cls = IDIOMS[name]
    xs = inputs(name, decode, cls.dtype)
    want = run(cls(), xs)
    rec, reports, dynamo_host = RecordingBackend(), [], []
    inner = kvpass.backend(inner=rec, patterns=patterns, on_report=reports.append)

    def backend(gm, example_inputs, **kw):
        dynamo_host.append(len(fd.kv_path_host_nodes(gm)))
        return inner(gm, example_inputs, **kw)

    torch._dynamo.reset()
    model = cls()
    got = run(kvpass.compile(model, backend=backend), xs)
    diff = max(float((a.double() - b.double()).abs().max()) for g, w in zip(got, want) for a, b in zip(g, w))
    return dict(graphs=len(rec.graphs), dynamo_host=sum(dynamo_host),
                left=[[n.name for n in kv_path_problems(g)] for g in rec.graphs], reports=reports, diff=diff,
                got=got, want=want, inner_graphs=rec.graphs)


def table(names=None, decode=8) -> str:
    """The markdown table of :func:`measure` for each idiom."""
    rows = ["| idiom | graphs (prefill + %d decode) | host ops on K/V paths (Dynamo graphs) | K/V-path problems left "
            "(inner graphs) | rewrites | skips | max abs diff vs eager |" % decode, "|---|---:|---:|---:|---:|---:|---:|"]
    for name in names or IDIOMS:
        try:
            m = measure(name, decode)
        except Exception as e:  # noqa: BLE001 - a table of where things stand records failures too
            rows.append(f"| {name} | error: {type(e).__name__}: {str(e).splitlines()[0][:80]} | | | | | |")
            continue
        rows.append(f"| {name} | {m['graphs']} | {m['dynamo_host']} | {sum(map(len, m['left']))} | "
                    f"{sum(len(r.matches) for r in m['reports'])} | {sum(len(r.skips) for r in m['reports'])} | "
                    f"{m['diff']:.1e} |")
    return "\n".join(rows)


if __name__ == "__main__":
    import sys
    import warnings

    warnings.simplefilter("ignore")
    print(table(sys.argv[1:] or None))
