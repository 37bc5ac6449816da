"""Semantics of the reference caches (DESIGN section 4), host round-trip versions and their functional twins."""

import numpy as np
import pytest
import torch

from kvpass.examples import shared_kv_model as skv
from kvpass.examples.shared_kv_model import (
    FULL, PADDED, READONLY, SHARED, SLIDING, CacheError, SharedKVConfig, kv_owners, reference_model,
)

KV, D, MAX = 2, 8, 16


def rand(rng, t, d=D):
    return torch.randn(KV, t, d, generator=rng)


def host_and_functional():
    return [
        (skv.PositionalKVCache, skv.SharedPositionalKVCache, skv.PaddedSharedPositionalKVCache, skv.OwnerReadOnlyKVCache),
        (skv.FunctionalPositionalKVCache, skv.FunctionalSharedKVCache, skv.FunctionalPaddedSharedKVCache,
         skv.FunctionalOwnerReadOnlyKVCache),
    ]


@pytest.fixture(params=["host", "functional"])
def kinds(request):
    return host_and_functional()[0 if request.param == "host" else 1]


def test_owner_writes_and_advances(kinds, rng):
    owner = kinds[0](MAX, KV, D)
    k1, v1, k2, v2 = rand(rng, 3), rand(rng, 3), rand(rng, 1), rand(rng, 1)
    kh, vh = owner.update(k1, v1)
    assert owner.pos == 3 and owner.step_start == 0
    torch.testing.assert_close(kh, k1, rtol=0, atol=0)
    torch.testing.assert_close(vh, v1, rtol=0, atol=0)
    owner.begin_step()
    assert owner.rotation_position() == 3
    kh, vh = owner.update(k2, v2)
    assert owner.pos == 4 and owner.step_start == 3
    torch.testing.assert_close(kh, torch.cat([k1, k2], 1), rtol=0, atol=0)
    torch.testing.assert_close(vh, torch.cat([v1, v2], 1), rtol=0, atol=0)


def test_owner_overflow_is_a_clear_error(kinds, rng):
    owner = kinds[0](4, KV, D)
    with pytest.raises(CacheError, match="overflow.*max_len is 4"):
        owner.update(rand(rng, 5), rand(rng, 5))
    assert owner.pos == 0


def test_host_owner_stores_in_host_buffer(rng):
    owner = skv.PositionalKVCache(MAX, KV, D)
    k, v = rand(rng, 2), rand(rng, 2)
    owner.update(k, v)
    assert isinstance(owner.k_buf, np.ndarray) and owner.k_buf.shape == (KV, MAX, D)
    np.testing.assert_array_equal(owner.k_buf[:, :2], k.numpy())
    assert not owner.k_buf[:, 2:].any()


def test_shared_follower_last_writer_wins_and_full_view(kinds, rng):
    owner = kinds[0](MAX, KV, D)
    follower = kinds[1](owner)
    ko, vo = rand(rng, 4), rand(rng, 4)
    owner.update(ko, vo)
    kf, vf = rand(rng, 2), rand(rng, 2)
    kh, vh = follower.update(kf, vf)  # follower's pos is 0: overwrites the owner's first two tokens
    assert follower.pos == 2 and owner.pos == 4
    expect_k = torch.cat([kf, ko[:, 2:]], 1)
    torch.testing.assert_close(kh, expect_k, rtol=0, atol=0)  # the owner's full current view [0, 4)
    torch.testing.assert_close(vh, torch.cat([vf, vo[:, 2:]], 1), rtol=0, atol=0)
    # the owner reads what the follower wrote on its next step
    owner.begin_step()
    kh2, _ = owner.update(rand(rng, 1), rand(rng, 1))
    torch.testing.assert_close(kh2[:, :4], expect_k, rtol=0, atol=0)


def test_padded_follower_pads_on_write_and_slices_on_read(kinds, rng):
    owner = kinds[0](MAX, KV, 16)
    follower = kinds[2](owner, 6)
    ko, vo = torch.randn(KV, 3, 16, generator=rng), torch.randn(KV, 3, 16, generator=rng)
    owner.update(ko, vo)
    kf, vf = rand(rng, 3, 6), rand(rng, 3, 6)
    kh, vh = follower.update(kf, vf)
    assert kh.shape == (KV, 3, 6)
    torch.testing.assert_close(kh, kf, rtol=0, atol=0)
    torch.testing.assert_close(vh, vf, rtol=0, atol=0)
    # the owner now holds the follower's K zero-padded to 16
    owner.begin_step()
    kh_owner, _ = owner.update(torch.randn(KV, 1, 16, generator=rng), torch.randn(KV, 1, 16, generator=rng))
    torch.testing.assert_close(kh_owner[:, :3, :6], kf, rtol=0, atol=0)
    assert torch.count_nonzero(kh_owner[:, :3, 6:]) == 0


@pytest.mark.parametrize("bad", [0, -1, 17])
def test_padded_follower_rejects_bad_head_dim(kinds, bad):
    owner = kinds[0](MAX, KV, 16)
    with pytest.raises(CacheError, match=r"layer_head_dim must be in \[1, owner.head_dim=16\]; got " + str(bad)):
        kinds[2](owner, bad)


def test_padded_follower_accepts_bounds(kinds):
    owner = kinds[0](MAX, KV, 16)
    assert kinds[2](owner, 1).head_dim == 1
    assert kinds[2](owner, 16).head_dim == 16


def test_owner_read_only_never_writes_and_reads_owner_history(kinds, rng):
    owner = kinds[0](MAX, KV, D)
    reader = kinds[3](owner)
    assert reader.writes is False and not hasattr(reader, "update")
    k, v = rand(rng, 5), rand(rng, 5)
    owner.update(k, v)
    snapshot = (owner.k_buf.copy(), owner.v_buf.copy()) if hasattr(owner, "k_buf") else (owner.k.clone(), owner.v.clone())
    kh, vh = reader.read(torch.device("cpu"))
    torch.testing.assert_close(kh, k, rtol=0, atol=0)
    torch.testing.assert_close(vh, v, rtol=0, atol=0)
    after = (owner.k_buf, owner.v_buf) if hasattr(owner, "k_buf") else (owner.k, owner.v)
    for a, b in zip(snapshot, after):
        assert (a == b).all()
    assert owner.pos == 5


def test_owner_read_only_requires_owner_in_same_step(kinds, rng):
    owner = kinds[0](MAX, KV, D)
    reader = kinds[3](owner)
    with pytest.raises(CacheError, match="owner layer has not run in this step"):
        reader.read(torch.device("cpu"))
    owner.update(rand(rng, 2), rand(rng, 2))
    reader.read(torch.device("cpu"))
    owner.begin_step()  # a new step: the owner has not run yet
    with pytest.raises(CacheError, match="owner layer has not run in this step"):
        reader.rotation_position()


def test_followers_rotate_at_pre_advance_position(kinds, rng):
    owner = kinds[0](MAX, KV, D)
    shared, reader = kinds[1](owner), kinds[3](owner)
    owner.update(rand(rng, 4), rand(rng, 4))
    shared.update(rand(rng, 4), rand(rng, 4))
    for _ in range(3):
        owner.begin_step()
        before = owner.rotation_position()
        owner.update(rand(rng, 1), rand(rng, 1))
        assert owner.pos == before + 1
        # mlx-lm #1702: followers must not rotate at owner.pos (already advanced)
        assert reader.rotation_position() == before
        assert shared.rotation_position() == before
        shared.update(rand(rng, 1), rand(rng, 1))


def test_owners_are_last_non_shared_layer_of_each_type():
    cfg = SharedKVConfig(num_layers=8, kv_shared_layers=3)
    # types: s f s f s | f s f ; first shared = 5
    assert kv_owners(cfg) == {5: 3, 6: 4, 7: 3}
    cfg = SharedKVConfig(num_layers=5, layer_types=[SLIDING, SLIDING, FULL, SLIDING, FULL], kv_shared_layers=2,
                         follower_caches=[SHARED, READONLY])
    assert kv_owners(cfg) == {3: 1, 4: 2}


def test_shared_layer_without_owner_is_rejected():
    with pytest.raises(CacheError, match="shared layer 3 has type 'full_attention'.*no KV owner"):
        SharedKVConfig(num_layers=4, layer_types=[SLIDING, SLIDING, SLIDING, FULL], kv_shared_layers=1)


def test_config_rejects_bad_values():
    with pytest.raises(CacheError, match="kv_shared_layers"):
        SharedKVConfig(kv_shared_layers=6)
    with pytest.raises(CacheError, match="follower_caches: unknown kind 'bogus'"):
        SharedKVConfig(follower_caches=["bogus", SHARED, SHARED])
    with pytest.raises(CacheError, match="layer_types has 2 entries"):
        SharedKVConfig(layer_types=[SLIDING, FULL])


def test_default_model_has_every_variant_and_mixed_head_dims():
    model = reference_model()
    names = {type(c).__name__ for c in model.caches}
    assert names == {"PositionalKVCache", "SharedPositionalKVCache", "PaddedSharedPositionalKVCache", "OwnerReadOnlyKVCache"}
    cfg = model.config
    assert cfg.kv_shared_layers > 0 and cfg.sandwich_norms and cfg.global_head_dim != cfg.head_dim


@pytest.mark.parametrize("follower_caches", [None, [SHARED, SHARED, SHARED], [READONLY, READONLY, READONLY],
                                             [PADDED, PADDED, PADDED]])
def test_functional_twin_matches_host_model(rng, follower_caches):
    cfg = SharedKVConfig(follower_caches=follower_caches)
    host, twin = reference_model(cfg, seed=3), reference_model(cfg, functional=True, seed=3)
    prompt = torch.randint(0, cfg.vocab_size, (1, 7), generator=rng)
    with torch.no_grad():
        torch.testing.assert_close(host(prompt), twin(prompt), rtol=1e-5, atol=1e-5)
        for _ in range(6):
            tok = torch.randint(0, cfg.vocab_size, (1, 1), generator=rng)
            a, b = host(tok), twin(tok)
            assert a.abs().max() > 0.1  # not a degenerate all-zero output
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_generate_is_greedy_and_deterministic(rng):
    model = reference_model(seed=1)
    prompt = torch.randint(0, 64, (8,), generator=rng)
    a = model.generate(prompt, 5)
    b = model.generate(prompt, 5)
    assert a.shape == (5,) and torch.equal(a, b)
    # step by step by hand gives the same tokens
    model.reset()
    with torch.no_grad():
        logits = model(prompt.reshape(1, -1))
        for t in a:
            assert logits[-1].argmax() == t
            logits = model(t.reshape(1, 1))


def test_sandwich_norms_matter(rng):
    # With sandwich norms the attention output is normalized: corrupting K/V changes the logits visibly.
    model = reference_model(seed=2)
    prompt = torch.randint(0, 64, (1, 6), generator=rng)
    with torch.no_grad():
        good = model(prompt)
        model.reset()
        owner = model.caches[1]
        real_update = owner.update
        owner.update = lambda k, v: tuple(torch.zeros_like(h) for h in real_update(k, v))
        bad = model(prompt)
    assert (good - bad).abs().max() > 1e-2
