"""Side conditions of issue 12A's rule changes (``view_fold``, the by-position case of ``scatter_slice``): each
test pins one, and ``tests/mutate_guards.py`` removes it and watches the test fail. Every case runs through
``kvpass.rewrite(verify=True)`` on each Dynamo graph and must equal eager bit for bit."""

import numpy as np
import torch

from test_guards import matches, rand, rewrite_all, skips


class FlatCache:
    """A flat 1-D host array holding a ``[2, 16, 4]`` cache; ``pos`` and a follower's ``fpos``."""

    def __init__(self, seed=0):
        self.k = np.random.default_rng(seed).standard_normal(2 * 16 * 4).astype(np.float32)
        self.pos = 0
        self.fpos = 0


def test_flat_buffer_viewed_in_another_shape_is_not_folded():
    """Written through ``reshape(2, 16, 4)``, read through ``reshape(16, 2, 4)``: a reshape chain that does not
    come back to a shape it had is not the write (``view_fold``'s shape condition)."""
    def step(cache, k):
        t = k.shape[1]
        cache.k.reshape(2, 16, 4)[:, cache.pos : cache.pos + t] = k.detach().cpu().numpy()
        cache.pos += t
        return torch.from_numpy(cache.k.reshape(16, 2, 4)[: cache.pos]) * 1.0

    k = rand(2, 3, 4, seed=41)
    want = step(FlatCache(seed=42), k)
    got, reports = rewrite_all(step, FlatCache(seed=42), k)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert "view_fold" not in matches(reports)
    assert any("reshape to a shape it was not written in" in s for s in skips(reports)), skips(reports)


def test_flat_buffer_read_back_through_its_write_view_is_folded():
    """The positive case: the same view shape on write and read folds, and the read decomposes."""
    def step(cache, k):
        t = k.shape[1]
        cache.k.reshape(2, 16, 4)[:, cache.pos : cache.pos + t] = k.detach().cpu().numpy()
        cache.pos += t
        return torch.from_numpy(cache.k.reshape(2, 16, 4)[:, : cache.pos]) * 1.0

    k = rand(2, 3, 4, seed=43)
    want = step(FlatCache(seed=44), k)
    got, reports = rewrite_all(step, FlatCache(seed=44), k)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert "view_fold" in matches(reports) and "scatter_slice" in matches(reports)


def test_reshapes_of_a_value_that_is_not_a_cache_are_left_alone():
    """``x.reshape(-1).reshape(shape)`` beside a host cache: not the program's state, so no fold and no report
    (``view_fold``'s state condition)."""
    def step(cache, k, x):
        t = k.shape[1]
        cache.k.reshape(2, 16, 4)[:, cache.pos : cache.pos + t] = k.detach().cpu().numpy()
        cache.pos += t
        y = (x * 2).reshape(-1).reshape(x.shape)
        return y + 1, torch.from_numpy(cache.k.reshape(2, 16, 4)[:, : cache.pos]) * 1.0

    k, x = rand(2, 3, 4, seed=45), rand(3, 5, seed=46)
    want = step(FlatCache(seed=47), k, x)
    got, reports = rewrite_all(step, FlatCache(seed=47), k, x)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    assert matches(reports).count("view_fold") == 1, matches(reports)  # the cache's read only


def test_follower_at_its_own_position_is_selected_by_position():
    """Owner writes ``[p, p+t)``, a follower ``[f, f+t)`` (last writer wins), the follower reads
    ``[0, max(p, f) + t)``: ``p`` and ``f`` are two symbols in the decode graph, so the read is selected by
    position when the graph runs; eager's values on every step, including steps where ``f != p``."""
    def step(cache, k, kf):
        t = k.shape[1]
        b = cache.k.reshape(2, 16, 4)
        b[:, cache.pos : cache.pos + t] = k.detach().cpu().numpy()
        b[:, cache.fpos : cache.fpos + t] = kf.detach().cpu().numpy()
        cache.pos += t
        cache.fpos += t
        return torch.from_numpy(b[:, : max(cache.pos, cache.fpos)]) * 1.0

    import kvpass

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.cache = FlatCache(seed=48)

        def forward(self, k, kf):
            return step(self.cache, k, kf)

    eager, compiled_model = M(), M()
    reports = []
    compiled = kvpass.compile(compiled_model, backend=kvpass.backend(inner="eager", on_report=reports.append))
    g = torch.Generator().manual_seed(49)
    for i, t in enumerate([3, 1, 1, 1, 1]):
        if i == 2:  # the follower falls behind: f != p from here on
            for m in (eager, compiled_model):
                m.cache.fpos -= 1
        k, kf = torch.randn(2, t, 4, generator=g), torch.randn(2, t, 4, generator=g)
        with torch.no_grad():
            want = eager(k, kf)
            got = compiled(k, kf)
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=lambda m: f"step {i}: {m}")
    assert not [s for r in reports for s in r.skips]
    assert any("where" in m.detail for r in reports for m in r.matches), [m for r in reports for m in r.matches]
