"""A tiny Gemma-4-like decoder with cross-layer shared KV caches, written the way a port would be.

This is kvpass's reference model and the oracle of its tests: its *eager* output is the truth. Its caches
round-trip K/V through host memory (``.detach().cpu().numpy()`` into a preallocated numpy buffer,
``torch.from_numpy(...).to(device)`` back, ``np.pad`` for head-dim padding): exactly the idioms that make
``torch.compile`` recompile every step and make ``torch.export``/``make_fx`` bake the buffer as a constant.

``functional=True`` builds the same model with round-trip-free caches (device tensors and ``torch.cat``):
the functional twin. Both agree to fp32 rounding.

Layer layout (Gemma 4): layer types alternate sliding/full; sliding layers use ``head_dim``, full layers the
larger ``global_head_dim``; the last ``kv_shared_layers`` layers own no cache and reuse the K/V of the *owner*
of their type: the last non-shared layer of that type before the first shared layer. Batch is 1 and caches are
``[kv_heads, seq, head_dim]`` as in the seed report.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

SLIDING = "sliding_attention"
FULL = "full_attention"

# Follower cache kinds, per shared layer.
SHARED = "shared"  # SharedPositionalKVCache: writes into the owner's buffer, reads the full view
PADDED = "padded"  # PaddedSharedPositionalKVCache: smaller head dim, zero-padded on write
READONLY = "readonly"  # OwnerReadOnlyKVCache: Gemma 4 semantics, reads the owner's history, never writes

__all__ = [
    "SLIDING", "FULL", "SHARED", "PADDED", "READONLY",
    "SharedKVConfig", "CacheError", "PositionalKVCache", "SharedPositionalKVCache",
    "PaddedSharedPositionalKVCache", "OwnerReadOnlyKVCache", "FunctionalPositionalKVCache",
    "FunctionalSharedKVCache", "FunctionalPaddedSharedKVCache", "FunctionalOwnerReadOnlyKVCache",
    "SharedKVDecoder", "kv_owners", "build_caches", "reference_model",
]


class CacheError(ValueError):
    """A KV cache was built or used against its contract (sizes, owner order, capacity)."""


# --------------------------------------------------------------------------------------------------------
# Config and sharing scheme
# --------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class SharedKVConfig:
    """Configuration of :class:`SharedKVDecoder`.

    ``follower_caches`` gives the cache kind of each shared layer in order (``"shared"``, ``"padded"`` or
    ``"readonly"``); it defaults to cycling through all three so that one model exercises every variant.
    ``padded_head_dim`` is the head dim of padded followers (default ``head_dim``; it must not exceed the owner's).
    """

    vocab_size: int = 64
    hidden_size: int = 32
    intermediate_size: int = 64
    num_layers: int = 6
    layer_types: Sequence[str] | None = None  # default: sliding, full, sliding, full, ...
    num_heads: int = 4
    kv_heads: int = 2
    head_dim: int = 8
    global_head_dim: int = 16
    kv_shared_layers: int = 3
    follower_caches: Sequence[str] | None = None
    padded_head_dim: int | None = None
    sandwich_norms: bool = True
    sliding_window: int = 6
    max_len: int = 64
    rope_theta: float = 10_000.0
    global_rope_theta: float = 1_000_000.0
    rms_eps: float = 1e-6

    def __post_init__(self):
        if self.layer_types is None:
            self.layer_types = [SLIDING if i % 2 == 0 else FULL for i in range(self.num_layers)]
        self.layer_types = list(self.layer_types)
        if len(self.layer_types) != self.num_layers:
            raise CacheError(f"layer_types has {len(self.layer_types)} entries, num_layers is {self.num_layers}")
        bad = [t for t in self.layer_types if t not in (SLIDING, FULL)]
        if bad:
            raise CacheError(f"layer_types: unknown type {bad[0]!r}; use {SLIDING!r} or {FULL!r}")
        if not 0 <= self.kv_shared_layers < self.num_layers:
            raise CacheError(f"kv_shared_layers must be in [0, num_layers); got {self.kv_shared_layers}")
        if self.num_heads % self.kv_heads:
            raise CacheError(f"num_heads ({self.num_heads}) must be a multiple of kv_heads ({self.kv_heads})")
        if self.follower_caches is None:
            kinds = (PADDED, SHARED, READONLY)
            self.follower_caches = [kinds[i % 3] for i in range(self.kv_shared_layers)]
        self.follower_caches = list(self.follower_caches)
        if len(self.follower_caches) != self.kv_shared_layers:
            raise CacheError(
                f"follower_caches has {len(self.follower_caches)} entries, kv_shared_layers is {self.kv_shared_layers}"
            )
        for kind in self.follower_caches:
            if kind not in (SHARED, PADDED, READONLY):
                raise CacheError(f"follower_caches: unknown kind {kind!r}; use {SHARED!r}, {PADDED!r} or {READONLY!r}")
        if self.padded_head_dim is None:
            self.padded_head_dim = self.head_dim
        kv_owners(self)  # validates the sharing scheme

    @property
    def first_shared_layer(self) -> int:
        return self.num_layers - self.kv_shared_layers

    def type_head_dim(self, layer_type: str) -> int:
        return self.global_head_dim if layer_type == FULL else self.head_dim

    def layer_head_dim(self, i: int) -> int:
        """Head dim of layer ``i``: its type's, except padded followers, which use ``padded_head_dim``."""
        if self.follower_kind(i) == PADDED:
            return self.padded_head_dim
        return self.type_head_dim(self.layer_types[i])

    def follower_kind(self, i: int) -> str | None:
        """Cache kind of layer ``i`` if it is a shared layer, else ``None``."""
        if i < self.first_shared_layer:
            return None
        return self.follower_caches[i - self.first_shared_layer]


def kv_owners(config: SharedKVConfig) -> dict[int, int]:
    """Map each shared layer to its owner: the last non-shared layer of the same type before the first shared one.

    Raises :class:`CacheError` when a shared layer's type has no such layer.
    """
    first = config.num_layers - config.kv_shared_layers
    last_of_type: dict[str, int] = {}
    for i in range(first):
        last_of_type[config.layer_types[i]] = i
    owners = {}
    for i in range(first, config.num_layers):
        t = config.layer_types[i]
        if t not in last_of_type:
            raise CacheError(
                f"shared layer {i} has type {t!r} but no non-shared layer of that type precedes layer {first}; "
                f"it has no KV owner"
            )
        owners[i] = last_of_type[t]
    return owners


# --------------------------------------------------------------------------------------------------------
# Host-round-trip caches (the way a port of the seed writes them)
# --------------------------------------------------------------------------------------------------------


class PositionalKVCache:
    """Owner cache: a preallocated host buffer ``[kv_heads, max_len, head_dim]``.

    ``update(k, v)`` writes the new tokens at ``pos``, advances ``pos`` and returns the history ``[0, pos)`` on
    the device of ``k``. K/V go to the host with ``.detach().cpu().numpy()`` and come back with ``from_numpy``.
    """

    writes = True

    def __init__(self, max_len: int, kv_heads: int, head_dim: int):
        if max_len < 1 or kv_heads < 1 or head_dim < 1:
            raise CacheError(f"max_len, kv_heads, head_dim must be >= 1; got {max_len}, {kv_heads}, {head_dim}")
        self.max_len, self.kv_heads, self.head_dim = max_len, kv_heads, head_dim
        self.k_buf = np.zeros((kv_heads, max_len, head_dim), dtype=np.float32)
        self.v_buf = np.zeros((kv_heads, max_len, head_dim), dtype=np.float32)
        self.pos = 0
        self.step_start: int | None = None  # where this step's write began; None until update() runs this step

    def begin_step(self) -> None:
        """Mark the start of a model step (followers that read this cache check the owner ran in it)."""
        self.step_start = None

    def rotation_position(self) -> int:
        """Position of the first new token of this step (for RoPE), read before ``update``."""
        return self.pos

    def _check_room(self, end: int) -> None:
        if end > self.max_len:
            raise CacheError(f"KV cache overflow: writing up to position {end} but max_len is {self.max_len}")

    def update(self, k: torch.Tensor, v: torch.Tensor):
        t = k.shape[1]
        self._check_room(self.pos + t)
        self.k_buf[:, self.pos : self.pos + t] = k.detach().cpu().numpy()
        self.v_buf[:, self.pos : self.pos + t] = v.detach().cpu().numpy()
        self.step_start = self.pos
        self.pos += t
        k_hist = torch.from_numpy(self.k_buf[:, : self.pos]).to(k.device)
        v_hist = torch.from_numpy(self.v_buf[:, : self.pos]).to(v.device)
        return k_hist, v_hist


class SharedPositionalKVCache:
    """Follower with its own ``pos``: writes its K/V into the owner's buffer at that position (last writer wins)
    and returns the owner's full current view, ``[0, max(owner.pos, pos))``."""

    writes = True

    def __init__(self, owner: PositionalKVCache):
        self.owner = owner
        self.head_dim = owner.head_dim
        self.pos = 0

    def begin_step(self) -> None:
        pass

    def rotation_position(self) -> int:
        return self.pos

    def update(self, k: torch.Tensor, v: torch.Tensor):
        o, t = self.owner, k.shape[1]
        o._check_room(self.pos + t)
        o.k_buf[:, self.pos : self.pos + t] = k.detach().cpu().numpy()
        o.v_buf[:, self.pos : self.pos + t] = v.detach().cpu().numpy()
        self.pos += t
        end = max(o.pos, self.pos)
        return torch.from_numpy(o.k_buf[:, :end]).to(k.device), torch.from_numpy(o.v_buf[:, :end]).to(v.device)


class PaddedSharedPositionalKVCache(SharedPositionalKVCache):
    """Shared follower with a smaller head dim: zero-pads K/V up to the owner's head dim on write (``np.pad``)
    and slices the view back to ``layer_head_dim`` on read."""

    def __init__(self, owner: PositionalKVCache, layer_head_dim: int):
        if not 1 <= layer_head_dim <= owner.head_dim:
            raise CacheError(
                f"layer_head_dim must be in [1, owner.head_dim={owner.head_dim}]; got {layer_head_dim}"
            )
        super().__init__(owner)
        self.head_dim = layer_head_dim

    def update(self, k: torch.Tensor, v: torch.Tensor):
        o, t = self.owner, k.shape[1]
        o._check_room(self.pos + t)
        pad = ((0, 0), (0, 0), (0, o.head_dim - self.head_dim))
        o.k_buf[:, self.pos : self.pos + t] = np.pad(k.detach().cpu().numpy(), pad)
        o.v_buf[:, self.pos : self.pos + t] = np.pad(v.detach().cpu().numpy(), pad)
        self.pos += t
        end = max(o.pos, self.pos)
        d = self.head_dim
        k_hist = torch.from_numpy(o.k_buf[:, :end, :d]).to(k.device)
        v_hist = torch.from_numpy(o.v_buf[:, :end, :d]).to(v.device)
        return k_hist, v_hist


class OwnerReadOnlyKVCache:
    """Gemma 4 follower: never writes; returns the owner's history up to the owner's current position.

    The owner must have run earlier in the same step; its rotation position is the owner's position before
    that step's write (not ``owner.pos``, which has already advanced).
    """

    writes = False

    def __init__(self, owner: PositionalKVCache):
        self.owner = owner
        self.head_dim = owner.head_dim

    def begin_step(self) -> None:
        pass

    def _owner_step_start(self) -> int:
        if self.owner.step_start is None:
            raise CacheError("OwnerReadOnlyKVCache: the owner layer has not run in this step; run it first")
        return self.owner.step_start

    def rotation_position(self) -> int:
        return self._owner_step_start()

    def read(self, device: torch.device):
        self._owner_step_start()
        o = self.owner
        return torch.from_numpy(o.k_buf[:, : o.pos]).to(device), torch.from_numpy(o.v_buf[:, : o.pos]).to(device)


# --------------------------------------------------------------------------------------------------------
# Functional twin: same semantics, device tensors and torch.cat, no host round trip
# --------------------------------------------------------------------------------------------------------


class FunctionalPositionalKVCache:
    """Round-trip-free :class:`PositionalKVCache`: history is a device tensor grown with ``torch.cat``."""

    writes = True

    def __init__(self, max_len: int, kv_heads: int, head_dim: int):
        self.max_len, self.kv_heads, self.head_dim = max_len, kv_heads, head_dim
        self.k = torch.zeros(kv_heads, 0, head_dim)
        self.v = torch.zeros(kv_heads, 0, head_dim)
        self.pos = 0
        self.step_start: int | None = None

    begin_step = PositionalKVCache.begin_step
    rotation_position = PositionalKVCache.rotation_position
    _check_room = PositionalKVCache._check_room

    def write(self, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write ``k``/``v`` at ``[start, start+T)`` (last writer wins), growing the history as needed."""
        t = k.shape[1]
        self._check_room(start + t)
        self.k = torch.cat([self.k[:, :start].to(k.device), k, self.k[:, start + t :].to(k.device)], dim=1)
        self.v = torch.cat([self.v[:, :start].to(v.device), v, self.v[:, start + t :].to(v.device)], dim=1)

    def update(self, k: torch.Tensor, v: torch.Tensor):
        self.write(self.pos, k, v)
        self.step_start = self.pos
        self.pos += k.shape[1]
        return self.k[:, : self.pos], self.v[:, : self.pos]


class FunctionalSharedKVCache:
    """Round-trip-free :class:`SharedPositionalKVCache`."""

    writes = True

    def __init__(self, owner: FunctionalPositionalKVCache):
        self.owner, self.head_dim, self.pos = owner, owner.head_dim, 0

    begin_step = SharedPositionalKVCache.begin_step
    rotation_position = SharedPositionalKVCache.rotation_position

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def update(self, k: torch.Tensor, v: torch.Tensor):
        o, t = self.owner, k.shape[1]
        o.write(self.pos, self._pad(k), self._pad(v))
        self.pos += t
        end = max(o.pos, self.pos)
        return o.k[:, :end, : self.head_dim], o.v[:, :end, : self.head_dim]


class FunctionalPaddedSharedKVCache(FunctionalSharedKVCache):
    """Round-trip-free :class:`PaddedSharedPositionalKVCache` (``F.pad`` instead of ``np.pad``)."""

    def __init__(self, owner: FunctionalPositionalKVCache, layer_head_dim: int):
        if not 1 <= layer_head_dim <= owner.head_dim:
            raise CacheError(
                f"layer_head_dim must be in [1, owner.head_dim={owner.head_dim}]; got {layer_head_dim}"
            )
        super().__init__(owner)
        self.head_dim = layer_head_dim

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x, (0, self.owner.head_dim - self.head_dim))


class FunctionalOwnerReadOnlyKVCache:
    """Round-trip-free :class:`OwnerReadOnlyKVCache`."""

    writes = False

    def __init__(self, owner: FunctionalPositionalKVCache):
        self.owner, self.head_dim = owner, owner.head_dim

    begin_step = OwnerReadOnlyKVCache.begin_step
    _owner_step_start = OwnerReadOnlyKVCache._owner_step_start
    rotation_position = OwnerReadOnlyKVCache.rotation_position

    def read(self, device: torch.device):
        self._owner_step_start()
        o = self.owner
        return o.k[:, : o.pos].to(device), o.v[:, : o.pos].to(device)


def build_caches(config: SharedKVConfig, functional: bool = False) -> list:
    """One cache per layer: owners/non-shared layers get a positional cache, shared layers a follower of their
    owner's cache, of the kind ``config.follower_caches`` names."""
    if functional:
        own, shared, padded, readonly = (
            FunctionalPositionalKVCache, FunctionalSharedKVCache, FunctionalPaddedSharedKVCache,
            FunctionalOwnerReadOnlyKVCache,
        )
    else:
        own, shared, padded, readonly = (
            PositionalKVCache, SharedPositionalKVCache, PaddedSharedPositionalKVCache, OwnerReadOnlyKVCache,
        )
    owners = kv_owners(config)
    caches: list = []
    for i, t in enumerate(config.layer_types):
        kind = config.follower_kind(i)
        if kind is None:
            caches.append(own(config.max_len, config.kv_heads, config.type_head_dim(t)))
        elif kind == SHARED:
            caches.append(shared(caches[owners[i]]))
        elif kind == PADDED:
            caches.append(padded(caches[owners[i]], config.layer_head_dim(i)))
        else:
            caches.append(readonly(caches[owners[i]]))
    return caches


# --------------------------------------------------------------------------------------------------------
# The decoder
# --------------------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """Gemma RMSNorm (scale is ``1 + weight``)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * (1.0 + self.weight)


def apply_rope(x: torch.Tensor, start: int, theta: float) -> torch.Tensor:
    """Rotate-half RoPE on ``x [heads, T, d]`` for positions ``start .. start+T-1``."""
    d, t = x.shape[-1], x.shape[-2]
    inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float32, device=x.device) / d))
    pos = torch.arange(t, dtype=torch.float32, device=x.device) + start
    ang = pos[:, None] * inv_freq[None, :]
    cos, sin = torch.cat([ang.cos(), ang.cos()], -1), torch.cat([ang.sin(), ang.sin()], -1)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return x * cos + torch.cat([-x2, x1], -1) * sin


class Attention(nn.Module):
    """GQA attention with q/k norms whose K/V go through the layer's cache."""

    def __init__(self, config: SharedKVConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.layer_type = config.layer_types[layer_idx]
        self.num_heads, self.kv_heads = config.num_heads, config.kv_heads
        self.head_dim = config.layer_head_dim(layer_idx)
        self.theta = config.global_rope_theta if self.layer_type == FULL else config.rope_theta
        self.window = config.sliding_window if self.layer_type == SLIDING else None
        h, d = config.hidden_size, self.head_dim
        self.q_proj = nn.Linear(h, self.num_heads * d, bias=False)
        self.k_proj = nn.Linear(h, self.kv_heads * d, bias=False)
        self.v_proj = nn.Linear(h, self.kv_heads * d, bias=False)
        self.o_proj = nn.Linear(self.num_heads * d, h, bias=False)
        self.q_norm = RMSNorm(d, config.rms_eps)
        self.k_norm = RMSNorm(d, config.rms_eps)

    def forward(self, x: torch.Tensor, cache) -> torch.Tensor:
        t, d = x.shape[0], self.head_dim
        start = cache.rotation_position()
        q = self.q_norm(self.q_proj(x).view(t, self.num_heads, d).transpose(0, 1))
        q = apply_rope(q, start, self.theta)
        if cache.writes:
            k = self.k_norm(self.k_proj(x).view(t, self.kv_heads, d).transpose(0, 1))
            k = apply_rope(k, start, self.theta)
            v = self.v_proj(x).view(t, self.kv_heads, d).transpose(0, 1)
            k_hist, v_hist = cache.update(k, v)
        else:
            k_hist, v_hist = cache.read(x.device)
        rep = self.num_heads // self.kv_heads
        k_hist = k_hist.repeat_interleave(rep, dim=0)
        v_hist = v_hist.repeat_interleave(rep, dim=0)
        s = k_hist.shape[1]
        qpos = torch.arange(t, device=x.device)[:, None] + start
        kpos = torch.arange(s, device=x.device)[None, :]
        mask = kpos <= qpos
        if self.window is not None:
            mask = mask & (kpos > qpos - self.window)
        out = F.scaled_dot_product_attention(q, k_hist, v_hist, attn_mask=mask)
        return self.o_proj(out.transpose(0, 1).reshape(t, self.num_heads * d))


class DecoderLayer(nn.Module):
    """Pre-norm block with Gemma sandwich norms (post-attention and post-FFN RMSNorm) when configured."""

    def __init__(self, config: SharedKVConfig, layer_idx: int):
        super().__init__()
        h, eps = config.hidden_size, config.rms_eps
        self.self_attn = Attention(config, layer_idx)
        self.input_layernorm = RMSNorm(h, eps)
        self.pre_feedforward_layernorm = RMSNorm(h, eps)
        self.sandwich = config.sandwich_norms
        if self.sandwich:
            self.post_attention_layernorm = RMSNorm(h, eps)
            self.post_feedforward_layernorm = RMSNorm(h, eps)
        self.gate_proj = nn.Linear(h, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(h, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, h, bias=False)

    def forward(self, x: torch.Tensor, cache) -> torch.Tensor:
        a = self.self_attn(self.input_layernorm(x), cache)
        if self.sandwich:
            a = self.post_attention_layernorm(a)
        x = x + a
        h = self.pre_feedforward_layernorm(x)
        f = self.down_proj(F.gelu(self.gate_proj(h), approximate="tanh") * self.up_proj(h))
        if self.sandwich:
            f = self.post_feedforward_layernorm(f)
        return x + f


class SharedKVDecoder(nn.Module):
    """The reference decoder. Holds its caches; ``forward(input_ids)`` runs one step (prefill or decode) for a
    batch of one and returns logits ``[T, vocab]``. ``reset()`` empties the caches.

    ``functional=True`` selects the round-trip-free twin caches.
    """

    def __init__(self, config: SharedKVConfig | None = None, functional: bool = False):
        super().__init__()
        self.config = config or SharedKVConfig()
        self.functional = functional
        c = self.config
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(c, i) for i in range(c.num_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_eps)
        self.reset()

    def reset(self) -> None:
        """Start a new sequence: fresh, empty caches."""
        self.caches = build_caches(self.config, functional=self.functional)

    def init_random_(self, seed: int = 0) -> "SharedKVDecoder":
        """Give every parameter (norm scales included) random values, so no norm is an identity."""
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.dim() == 1 else 1.0 / math.sqrt(p.shape[-1])))
        return self

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if input_ids.dim() == 2:
            if input_ids.shape[0] != 1:
                raise CacheError(f"input_ids: batch must be 1, got shape {tuple(input_ids.shape)}")
            input_ids = input_ids[0]
        for cache in self.caches:
            cache.begin_step()
        x = self.embed_tokens(input_ids) * math.sqrt(self.config.hidden_size)
        for layer, cache in zip(self.layers, self.caches):
            x = layer(x, cache)
        return self.norm(x) @ self.embed_tokens.weight.t()

    @torch.no_grad()
    def generate(self, prompt_ids: torch.Tensor, steps: int, step_fn=None) -> torch.Tensor:
        """Greedy decoding from empty caches: prefill ``prompt_ids`` then ``steps`` decode steps.

        ``step_fn`` (default: ``self``) runs one step; pass a compiled model to decode with it.
        Returns the ``steps`` generated token ids.
        """
        step_fn = self if step_fn is None else step_fn
        self.reset()
        logits = step_fn(prompt_ids.reshape(1, -1))
        out = []
        for _ in range(steps):
            nxt = logits[-1].argmax().reshape(1, 1)
            out.append(nxt)
            logits = step_fn(nxt)
        return torch.cat(out, dim=1)[0] if out else torch.empty(0, dtype=torch.long)


def reference_model(config: SharedKVConfig | None = None, functional: bool = False, seed: int = 0) -> SharedKVDecoder:
    """The bundled reference model in eval mode with random weights (``seed``)."""
    return SharedKVDecoder(config, functional=functional).init_random_(seed).eval()


def main(argv=None) -> int:
    """``python examples/shared_kv_model.py``: print the reference model's layers and check one greedy run against
    its functional twin (``PASS`` / ``FAIL: ...``). The module is meant to be imported (``reference_model()``)."""
    import argparse

    parser = argparse.ArgumentParser(description="kvpass's reference shared-KV decoder (import it: "
                                                 "from kvpass.examples.shared_kv_model import reference_model)")
    parser.add_argument("--steps", type=int, default=4, help="greedy decode steps of the check (default 4)")
    args = parser.parse_args(argv)
    config = reference_model().config
    owners = kv_owners(config)
    for i, kind in enumerate(config.layer_types):
        role = config.follower_kind(i) or ("owner" if i in owners.values() else "own")
        print(f"layer {i}: {kind:<17} head_dim={config.layer_head_dim(i):<3} {role}"
              + (f" follower of layer {owners[i]}" if i in owners else ""))
    prompt = torch.arange(8) % config.vocab_size
    with torch.no_grad():
        host = reference_model(seed=1).generate(prompt, args.steps)
        twin = reference_model(seed=1, functional=True).generate(prompt, args.steps)
    print(f"greedy tokens, host round-trip caches: {host.tolist()}; functional twin: {twin.tolist()}")
    if not torch.equal(host, twin):
        print("FAIL: the host round-trip caches and the functional twin disagree")
        return 1
    print("PASS")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
