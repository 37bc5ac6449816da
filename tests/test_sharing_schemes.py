"""Other sharing schemes than the bundled one: random layer types, shared-layer counts, follower kinds, head dims.
Each is compiled with kvpass (recording inner backend) and must match eager with no host op left and every
attention's K connected to a k_proj. Seeded, so the same schemes run every time."""

import random

import pytest
import torch

import kvpass
from kvpass.examples.shared_kv_model import FULL, PADDED, READONLY, SHARED, SLIDING, SharedKVConfig, reference_model
from test_backend import Recorder, attention_kv, host_nodes, is_proj, reaches


def schemes(n, seed=0):
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        layers = rng.choice([3, 4, 5, 6, 7])
        types = [rng.choice([SLIDING, FULL]) for _ in range(layers)]
        shared = rng.randint(1, layers - 1)
        first = layers - shared
        if set(types[first:]) - set(types[:first]):
            continue  # a shared type without an owner is a config error (tested elsewhere)
        out.append(dict(num_layers=layers, layer_types=types, kv_shared_layers=shared,
                        follower_caches=[rng.choice([SHARED, PADDED, READONLY]) for _ in range(shared)],
                        kv_heads=rng.choice([1, 2]), head_dim=rng.choice([4, 8]), global_head_dim=16,
                        padded_head_dim=rng.choice([None, 4])))
    return out


# the first two schemes are in the quick subset, the other six only in the full run (each compiles a model: ~10 s)
@pytest.mark.parametrize("scheme", [pytest.param(s, marks=[pytest.mark.slow] if i >= 2 else [])
                                    for i, s in enumerate(schemes(8))], ids=lambda s: "-".join(
    f"{t[0]}{k[0] if k else ''}" for t, k in zip(s["layer_types"], [None] * (s["num_layers"] - s["kv_shared_layers"])
                                                    + s["follower_caches"])))
def test_scheme_compiles_exactly(scheme):
    cfg = SharedKVConfig(**scheme)
    torch._dynamo.reset()
    recorder = Recorder()
    model, oracle = reference_model(cfg, seed=3), reference_model(cfg, seed=3)
    compiled = kvpass.compile(model, backend=kvpass.backend(inner=recorder))
    g = torch.Generator().manual_seed(len(cfg.layer_types))
    with torch.no_grad():
        prompt = torch.randint(0, cfg.vocab_size, (1, 5), generator=g)
        torch.testing.assert_close(compiled(prompt), oracle(prompt), rtol=1e-5, atol=1e-5)
        for _ in range(4):
            tok = torch.randint(0, cfg.vocab_size, (1, 1), generator=g)
            torch.testing.assert_close(compiled(tok), oracle(tok), rtol=1e-5, atol=1e-5)
    assert len(recorder.graphs) == 2
    for gm in recorder.graphs:
        assert host_nodes(gm) == []
        attn = attention_kv(gm)
        assert len(attn) == len(cfg.layer_types)
        for k, v in attn:
            assert reaches(k, is_proj("k_proj")) and reaches(v, is_proj("v_proj"))
