"""Small host-round-trip idioms (the shapes the catalogue must handle), shared by the rewrite tests.

Each function takes device tensors (and, for stateful ones, a cache object holding numpy buffers) and returns
tensors; run eagerly they are the oracle.
"""

import numpy as np
import torch
import torch.nn.functional as F


class HostCache:
    """An owner cache in the port's style: a preallocated numpy buffer ``[heads, max_len, d]`` and a position."""

    def __init__(self, heads=2, max_len=16, d=4, seed=0):
        rng = np.random.default_rng(seed)
        # poisoned, not zeros: a rewrite that reads stale slots shows up
        self.k = rng.standard_normal((heads, max_len, d)).astype(np.float32)
        self.pos = 0


def host_hop(k):
    """K leaves the device and comes back unchanged."""
    back = torch.from_numpy(k.detach().cpu().numpy()).to(k.device)
    return back * 2.0 + 1.0


def host_hop_tensor_copy(k):
    """The same through ``torch.tensor`` (a copy) and ``np.ascontiguousarray``."""
    back = torch.tensor(np.ascontiguousarray(k.detach().cpu().numpy())).to(k.device)
    return back.sum(-1)


def write_then_read(cache, k):
    """Owner update: write the new tokens at ``pos``, read the history ``[0, pos + t)``."""
    t = k.shape[1]
    cache.k[:, cache.pos : cache.pos + t] = k.detach().cpu().numpy()
    cache.pos += t
    hist = torch.from_numpy(cache.k[:, : cache.pos]).to(k.device)
    return hist @ hist.transpose(-1, -2)


def two_reads(cache, k):
    """An owner write, then two layers reading the same history (a read-only follower)."""
    t = k.shape[1]
    cache.k[:, cache.pos : cache.pos + t] = k.detach().cpu().numpy()
    cache.pos += t
    a = torch.from_numpy(cache.k[:, : cache.pos]).to(k.device)
    b = torch.from_numpy(cache.k[:, : cache.pos]).to(k.device)
    return a.sum() + (b * 3).sum()


def padded_write_read(cache, k):
    """A padded follower: np.pad to the buffer's head dim on write, slice back on read."""
    t, d = k.shape[1], k.shape[2]
    full = cache.k.shape[2]
    cache.k[:, cache.pos : cache.pos + t] = np.pad(k.detach().cpu().numpy(), ((0, 0), (0, 0), (0, full - d)))
    cache.pos += t
    return torch.from_numpy(cache.k[:, : cache.pos, :d]).to(k.device) * 1.5


def zeros_assign_pad(k):
    """Head-dim padding with np.zeros + slice assignment, rebuilt on the device."""
    h, t, d = k.shape
    z = np.zeros((h, t, d + 4), dtype=np.float32)
    z[:, :, :d] = k.detach().cpu().numpy()
    return torch.from_numpy(z).to(k.device) + 1.0


def concatenate_pad(k):
    """Head-dim padding with np.concatenate and a zero block."""
    h, t, d = k.shape
    z = np.concatenate([k.detach().cpu().numpy(), np.zeros((h, t, 3), dtype=np.float32)], axis=-1)
    return torch.from_numpy(z).to(k.device) * 2.0


def pad_then_slice(k):
    """Padding that meets the slice removing it (what a padded follower reduces to on the device)."""
    return F.pad(k, (0, 4))[..., : k.shape[-1]] * 3.0


def tensor_buffer_write_read(buf, k, pos: int):
    """The idiom on a device tensor buffer: slice assign, then read the prefix."""
    t = k.shape[1]
    buf[:, pos : pos + t] = k
    return buf[:, : pos + t] * 1.0


# ---- negative cases: each must be left unchanged (or rewritten exactly) ------------------------------------


def mutated_between(k):
    """The host array is changed between the hop and the rebuild: not a copy of K any more."""
    a = k.detach().cpu().numpy()
    a[:, 0] = 0.0
    return torch.from_numpy(a).to(k.device) * 1.0


def dtype_change(k):
    """A dtype change through numpy: not a hop."""
    a = k.detach().cpu().numpy().astype(np.float16)
    return torch.from_numpy(a).to(k.device).float() * 1.0


def mask_round_trip(scores):
    """A round trip that is not K/V (a causal mask): a pure hop is still exactly the identity."""
    t = scores.shape[-1]
    mask = torch.from_numpy(np.tril(np.ones((t, t), dtype=np.float32)))
    return scores * mask


class HostHistory:
    """A cache that keeps its history as a growing numpy array (appended with np.concatenate)."""

    def __init__(self, heads=2, d=4, seed=0):
        rng = np.random.default_rng(seed)
        self.k = rng.standard_normal((heads, 3, d)).astype(np.float32)  # some history already there


def concat_history(cache, k):
    """Append on the host, read the whole history back on the device."""
    cache.k = np.concatenate([cache.k, k.detach().cpu().numpy()], axis=1)
    hist = torch.from_numpy(cache.k).to(k.device)
    return hist @ hist.transpose(-1, -2)


class BatchedHostCache:
    """A cache with a batch dim written and read with an integer index: ``buf[0, :, pos:pos+t]``."""

    def __init__(self, heads=2, max_len=16, d=4, seed=0):
        rng = np.random.default_rng(seed)
        self.k = rng.standard_normal((1, heads, max_len, d)).astype(np.float32)
        self.pos = 0


def batched_write_read(cache, k):
    """``k [heads, t, d]`` written at batch row 0; the history read back for row 0."""
    t = k.shape[1]
    cache.k[0, :, cache.pos : cache.pos + t] = k.detach().cpu().numpy()
    cache.pos += t
    hist = torch.from_numpy(cache.k[0, :, : cache.pos]).to(k.device)
    return hist.sum(-1)


def one_token_write_read(cache, k):
    """A decode step that writes one position with an integer index: ``buf[:, pos] = k[:, 0]``."""
    cache.k[:, cache.pos] = k[:, 0].detach().cpu().numpy()
    cache.pos += 1
    return torch.from_numpy(cache.k[:, : cache.pos]).to(k.device) * 2.0


def shared_write_read(cache, k, kf):
    """Owner and a shared follower in one step: the follower writes its K at its own position (last writer
    wins) and reads the owner's whole view."""
    t = k.shape[1]
    cache.k[:, cache.pos : cache.pos + t] = k.detach().cpu().numpy()
    cache.pos += t
    cache.k[:, cache.pos - t : cache.pos] = kf.detach().cpu().numpy()
    return torch.from_numpy(cache.k[:, : cache.pos]).to(k.device) * 1.0


def history_before_write(cache, k):
    """The old history read before the step's write, then concatenated with the new tokens."""
    t = k.shape[1]
    hist = torch.from_numpy(cache.k[:, : cache.pos]).clone()
    cache.k[:, cache.pos : cache.pos + t] = k.detach().cpu().numpy()
    cache.pos += t
    return torch.cat([hist, k], 1) * 1.0
