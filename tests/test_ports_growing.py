"""Ports of public growing and evicting KV-cache code to host caches (numpy arrays or CPU tensors), each run as a
user would: ``kvpass.compile(model)`` over a prefill and 7 decode steps of fresh random inputs, against eager.
Each port names its project and file; the cache logic follows the original (names, branches, trimming), the
model around it is the test harness's (``idioms_buffer.Attn``), and the framework's arrays became numpy or CPU
tensors. ``PORTS`` pins each port's graph count (the count before ``HostCacheShapes``, where it differs, in the
comment)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import idioms_buffer as ib
import kvpass

pytestmark = pytest.mark.filterwarnings("ignore:To copy construct from a tensor")


class Harness(nn.Module):
    """Two attention layers, one cache object per layer (``make_cache``); K/V ``[1, heads, T, d]``."""

    def __init__(self, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.layers = nn.ModuleList(ib.Attn(g) for _ in range(2))
        self.cache = [self.make_cache() for _ in self.layers]

    def forward(self, x):
        for at, cache in zip(self.layers, self.cache):
            q, k, v = at.qkv(x)
            kh, vh = cache.update_and_fetch(k[None].detach().cpu(), v[None].detach().cpu())
            x = x + at.out(q, kh[0].to(x.device), vh[0].to(x.device))
        return x


# ---- Blaizzy/mlx-vlm, mlx_vlm/models/cache.py: SimpleKVCache (mx.concatenate -> np.concatenate) -------------
class SimpleKVCache:
    def __init__(self):
        self.keys = None
        self.values = None
        self.cache_length = 0

    def update_and_fetch(self, keys, values):
        keys, values = keys.numpy(), values.numpy()
        if self.cache_length == 0:
            self.keys = keys
            self.values = values
        else:
            self.keys = np.concatenate([self.keys, keys], axis=2)
            self.values = np.concatenate([self.values, values], axis=2)
        self.cache_length += keys.shape[2]
        return torch.from_numpy(self.keys), torch.from_numpy(self.values)


class MlxVlmSimple(Harness):
    make_cache = staticmethod(SimpleKVCache)


# ---- feitreim/Tome, mlx-impl/kvcache.py: KVCache (per-layer lists of None, concatenate on axis 2) -------------
class TomeKVCache:
    def __init__(self, num_layers):
        self.keys = [None] * num_layers
        self.values = [None] * num_layers
        self.offset = 0

    def update(self, k, v, layer_idx):
        if self.keys[layer_idx] is None:
            self.keys[layer_idx] = k
            self.values[layer_idx] = v
        else:
            self.keys[layer_idx] = torch.cat([self.keys[layer_idx], k], dim=2)
            self.values[layer_idx] = torch.cat([self.values[layer_idx], v], dim=2)
        return self.keys[layer_idx], self.values[layer_idx]


class TomeModel(Harness):
    def __init__(self, seed=0):
        super().__init__(seed)
        self.kv = TomeKVCache(len(self.layers))

    make_cache = staticmethod(lambda: None)

    def forward(self, x):
        for i, at in enumerate(self.layers):
            q, k, v = at.qkv(x)
            kh, vh = self.kv.update(k[None].detach().cpu().contiguous(), v[None].detach().cpu().contiguous(), i)
            x = x + at.out(q, kh[0], vh[0])
        self.kv.offset += x.shape[0]
        return x


# ---- Janghyun1230/FastKVzip, math/method/compression/streamingllm.py: StreamingLLM (first tokens + window) ----
class StreamingLLMCompress:
    def __init__(self, budget=6, first_tokens=2):
        assert budget - first_tokens > 0
        self.budget, self.first_tokens = budget, first_tokens

    def __call__(self, key_states, value_states):
        kv_cache_len = key_states.shape[-2]
        if kv_cache_len <= self.budget:
            return key_states, value_states
        local_window_size = self.budget - self.first_tokens
        key_states = torch.cat([key_states[:, :, : self.first_tokens], key_states[:, :, -local_window_size:]], dim=2)
        value_states = torch.cat([value_states[:, :, : self.first_tokens], value_states[:, :, -local_window_size:]],
                                 dim=2)
        return key_states, value_states


class HostDynamicCache:
    """The history the compressor is applied to: host tensors, ``torch.cat`` per step (transformers'
    DynamicCache on the host), compressed after each append."""

    def __init__(self, compress=None):
        self.k = self.v = None
        self.compress = compress

    def update_and_fetch(self, k, v):
        if self.k is None:
            self.k, self.v = k.contiguous(), v.contiguous()
        else:
            self.k, self.v = torch.cat([self.k, k], 2), torch.cat([self.v, v], 2)
        if self.compress is not None:
            self.k, self.v = self.compress(self.k, self.v)
        return self.k, self.v


class FastKVzipStreaming(Harness):
    make_cache = staticmethod(lambda: HostDynamicCache(StreamingLLMCompress()))


# ---- mit-han-lab/streaming-llm, streaming_llm/kv_cache.py: StartRecentKVCache (numpy host history) ----------
def slice2d(x, start, end):
    return x[:, :, start:end, ...]


class StartRecentKVCache:
    def __init__(self, start_size=2, recent_size=4, k_seq_dim=2, v_seq_dim=2):
        self.start_size, self.recent_size = start_size, recent_size
        self.cache_size = start_size + recent_size
        self.k_seq_dim, self.v_seq_dim = k_seq_dim, v_seq_dim
        self.k_slice = self.v_slice = slice2d

    def __call__(self, past_key_values):
        if past_key_values is None:
            return None
        seq_len = past_key_values[0][0].shape[self.k_seq_dim]
        if seq_len <= self.cache_size:
            return past_key_values
        return [[np.concatenate([self.k_slice(k, 0, self.start_size),
                                 self.k_slice(k, seq_len - self.recent_size, seq_len)], axis=self.k_seq_dim),
                 np.concatenate([self.v_slice(v, 0, self.start_size),
                                 self.v_slice(v, seq_len - self.recent_size, seq_len)], axis=self.v_seq_dim)]
                for k, v in past_key_values]


class StreamingLLMModel(Harness):
    """The past starts as an empty host array per layer (``np.zeros((1, H, 0, D))``), grown with
    ``np.concatenate`` and passed through ``StartRecentKVCache`` after each step (its ``__call__``)."""

    make_cache = staticmethod(lambda: None)

    def __init__(self, seed=0):
        super().__init__(seed)
        self.past = [[np.zeros((1, ib.H, 0, ib.D), np.float32)] * 2 for _ in self.layers]
        self.kv_cache = StartRecentKVCache()

    def forward(self, x):
        new = []
        for (pk, pv), at in zip(self.past, self.layers):
            q, k, v = at.qkv(x)
            kk = np.concatenate([pk, k[None].detach().cpu().numpy()], axis=2)
            vv = np.concatenate([pv, v[None].detach().cpu().numpy()], axis=2)
            x = x + at.out(q, torch.from_numpy(kk[0]), torch.from_numpy(vv[0]))
            new.append([kk, vv])
        self.past = self.kv_cache(new)
        return x


# ---- FMInference/H2O, h2o_hf/utils_real_drop/modify_llama.py: H2OKVCache_LayerWise (hh_score, topk, mask) ------
class H2OKVCache_LayerWise:
    def __init__(self, hh_size=2, recent_size=3, k_seq_dim=2, v_seq_dim=2):
        self.hh_size, self.recent_size = hh_size, recent_size
        self.cache_size = hh_size + recent_size
        self.k_seq_dim, self.v_seq_dim = k_seq_dim, v_seq_dim
        self.hh_score = None

    def __call__(self, past_key_values, attn_score_cache):
        self._update_hh_score(attn_score_cache)
        if past_key_values is None:
            return None
        seq_len = past_key_values[0].size(self.k_seq_dim)
        if seq_len <= self.cache_size:
            return past_key_values
        bsz, num_heads, _, head_dim = past_key_values[0].shape
        select_hh_scores = self.hh_score[:, : seq_len - self.recent_size]
        _, keep_topk = torch.topk(select_hh_scores, self.hh_size, dim=-1)
        keep_topk = keep_topk.sort().values
        keep_recent = torch.arange(seq_len - self.recent_size, seq_len).repeat(keep_topk.shape[0], 1)
        keep_idx = torch.cat([keep_topk, keep_recent], dim=-1)
        mask = torch.zeros(self.hh_score.shape, dtype=torch.bool)
        mask = mask.scatter(-1, keep_idx, 1)
        k_hh_recent = past_key_values[0].squeeze(0)[mask].view(bsz, num_heads, -1, head_dim)
        v_hh_recent = past_key_values[1].squeeze(0)[mask].view(bsz, num_heads, -1, head_dim)
        self.hh_score = self.hh_score[mask].view(num_heads, self.cache_size)
        return (k_hh_recent, v_hh_recent)

    def _update_hh_score(self, attn_score_cache):
        num_new_tokens = attn_score_cache.shape[2]
        if self.hh_score is None:
            self.hh_score = attn_score_cache.sum(0).sum(1)
        else:
            attn_score_cache = attn_score_cache.sum(0).sum(1)
            attn_score_cache[:, :-num_new_tokens] += self.hh_score
            self.hh_score = attn_score_cache


class H2OModel(Harness):
    """Host ``[1, H, T, D]`` history per layer (``torch.cat``), attention written out (the scores feed H2O)."""

    make_cache = staticmethod(lambda: None)

    def __init__(self, seed=0):
        super().__init__(seed)
        self.past = [None for _ in self.layers]
        self.h2o = [H2OKVCache_LayerWise() for _ in self.layers]

    def forward(self, x):
        for i, at in enumerate(self.layers):
            q, k, v = at.qkv(x)
            k, v = k[None].detach().cpu(), v[None].detach().cpu()
            kk, vv = (k.contiguous(), v.contiguous()) if self.past[i] is None else (
                torch.cat([self.past[i][0], k], 2), torch.cat([self.past[i][1], v], 2))
            att = torch.softmax(q[None] @ kk.transpose(-1, -2) / ib.D ** 0.5, -1)
            o = (att @ vv)[0]
            x = x + at.o_proj(o.transpose(0, 1).reshape(x.shape[0], at.heads * at.d))
            self.past[i] = self.h2o[i]((kk, vv), att.detach())
        return x


#: port -> (model, graphs over prefill + 7 decode steps; before HostCacheShapes in the comment)
PORTS = {
    "mlx_vlm_simple_kv_cache": (MlxVlmSimple, 3),  # 3: first decode sees the prefill's transposed view (strides)
    "tome_kv_cache": (TomeModel, 2),  # 3 before
    "fastkvzip_streamingllm": (FastKVzipStreaming, 3),  # 4 before: prefill, growing, steady
    "streaming_llm_start_recent": (StreamingLLMModel, 3),  # 4 before: prefill, growing, steady
    # 7 before (the boolean-mask gather ``past[mask]`` broke the graph every step): prefill, growing, steady
    "h2o_layerwise": (H2OModel, 3),
}


def run_port(name, inner):
    cls = PORTS[name][0]
    xs = ib.inputs(name, 7)
    want = ib.run_steps(cls(), xs)
    graphs = []
    kb = kvpass.backend(inner=inner)

    def front(gm, example_inputs, **kw):
        graphs.append(gm)
        return kb(gm, example_inputs, **kw)

    torch._dynamo.reset()
    torch._dynamo.utils.guard_failures.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = ib.run_steps(kvpass.compile(cls(), backend=front), xs)
    failures = [str(r) for reasons in torch._dynamo.utils.guard_failures.values() for r in reasons]
    return got, want, graphs, failures


@pytest.mark.parametrize("name", sorted(PORTS))
def test_port_matches_eager_in_its_graph_count(name):
    got, want, graphs, failures = run_port(name, "eager")
    for i, (g, w) in enumerate(zip(got, want)):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5, msg=lambda s: f"{name} step {i}: {s}")
    assert len(graphs) == PORTS[name][1], f"{name}: {len(graphs)} graphs; recompiles: {failures}"


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(PORTS))
def test_port_through_inductor_matches_eager(name):
    got, want, graphs, _ = run_port(name, "inductor")
    for i, (g, w) in enumerate(zip(got, want)):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4, msg=lambda s: f"{name} step {i}: {s}")
