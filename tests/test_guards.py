"""Negative cases: programs where a careless rewrite would change what is computed (found or hardened while
fuzzing, tests/test_fuzz_rewrite.py). Each runs through ``kvpass.rewrite(verify=True)`` on every Dynamo graph and
must equal eager; on the functional IR most of them are exact by construction (the in-place edit is one more
scatter, in program order), and the tests that pin one side condition of a rule say which
(``tests/mutate_guards.py`` removes each and watches its test fail)."""

import numpy as np
import pytest
import torch

import idioms
import kvpass
from kvpass.tracing import tracing_context


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def rewrite_all(fn, *args):
    """Compile ``fn`` once, rewriting every graph with ``verify=True``; return (result, reports)."""
    reports = []

    def verifying_backend(gm, example_inputs):
        gm, report = kvpass.rewrite(gm, example_inputs=example_inputs, verify=True)
        reports.append(report)
        return gm.forward  # the functional graph writes the buffers itself (copy_ epilogue)

    torch._dynamo.reset()
    with tracing_context():
        out = torch.compile(fn, backend=verifying_backend)(*args)
    return out, reports


def skips(reports):
    return [s.reason for r in reports for s in r.skips]


def matches(reports):
    return [m.pattern for r in reports for m in r.matches]


def test_history_that_aliases_the_buffer_and_is_used_after_a_later_write():
    """``from_numpy`` of a buffer slice aliases it: a follower's later write shows in the owner's history."""
    def step(cache, k, k2):
        t = k.shape[1]
        cache.k[:, cache.pos : cache.pos + t] = k.detach().cpu().numpy()
        hist = torch.from_numpy(cache.k[:, : cache.pos + t])  # aliases cache.k
        cache.k[:, cache.pos : cache.pos + t] = k2.detach().cpu().numpy()  # the follower overwrites
        cache.pos += t
        return hist * 1.0  # eager: sees k2

    k, k2 = rand(2, 3, 4, seed=1), rand(2, 3, 4, seed=2)
    want = step(idioms.HostCache(seed=3), k, k2)
    got, reports = rewrite_all(step, idioms.HostCache(seed=3), k, k2)
    torch.testing.assert_close(got, want)
    assert "scatter_slice" in matches(reports)  # the later use reads the second write: k2


def test_history_copied_before_a_later_write_is_rewritten():
    """The same with ``torch.tensor`` (a copy): nothing aliases, the read is history."""
    def step(cache, k, k2):
        t = k.shape[1]
        cache.k[:, cache.pos : cache.pos + t] = k.detach().cpu().numpy()
        hist = torch.tensor(cache.k[:, : cache.pos + t])
        cache.k[:, cache.pos : cache.pos + t] = k2.detach().cpu().numpy()
        cache.pos += t
        return hist * 1.0

    k, k2 = rand(2, 3, 4, seed=1), rand(2, 3, 4, seed=2)
    want = step(idioms.HostCache(seed=3), k, k2)
    with pytest.warns(UserWarning, match="copy construct"):
        got, reports = rewrite_all(step, idioms.HostCache(seed=3), k, k2)
    torch.testing.assert_close(got, want)
    assert "scatter_slice" in matches(reports)


def test_buffer_mutated_through_a_view_between_write_and_read():
    """``buf[0].fill(0)`` writes the buffer through a view: its contents are no longer known."""
    def step(cache, k):
        t = k.shape[1]
        cache.k[:, cache.pos : cache.pos + t] = k.detach().cpu().numpy()
        row = cache.k[0]
        row *= 0.0
        cache.pos += t
        return torch.from_numpy(cache.k[:, : cache.pos]).clone()

    k = rand(2, 3, 4, seed=4)
    want = step(idioms.HostCache(seed=5), k)
    got, reports = rewrite_all(step, idioms.HostCache(seed=5), k)
    torch.testing.assert_close(got, want)


def test_two_rows_of_one_buffer_are_not_the_same_read():
    """``buf[0, :, :p]`` and ``buf[1, :, :p]`` slice the same range of different rows: no reuse."""
    def step(buf, k):
        a = torch.from_numpy(buf[0, :, :4]).to(k.device)
        b = torch.from_numpy(buf[1, :, :4]).to(k.device)
        return a * 2.0 + b + k

    buf = np.random.default_rng(6).standard_normal((2, 3, 8, 4)).astype(np.float32)
    k = rand(3, 4, 4, seed=7)
    got, reports = rewrite_all(step, buf, k)
    torch.testing.assert_close(got, step(buf, k))


def test_concatenated_history_mutated_before_the_rebuild():
    def step(cache, k):
        cache.k = np.concatenate([cache.k, k.detach().cpu().numpy()], axis=1)
        cache.k[:, 0] = 0.0
        return torch.from_numpy(cache.k).to(k.device) * 1.0

    k = rand(2, 3, 4, seed=8)
    want = step(idioms.HostHistory(seed=9), k)
    got, reports = rewrite_all(step, idioms.HostHistory(seed=9), k)
    torch.testing.assert_close(got, want)


def test_tensor_rebuilt_from_concatenated_history_mutated_in_place():
    def step(cache, k):
        cache.k = np.concatenate([cache.k, k.detach().cpu().numpy()], axis=1)
        hist = torch.from_numpy(cache.k)
        hist.mul_(2.0)  # writes through to cache.k in eager
        return torch.from_numpy(cache.k) + hist

    k = rand(2, 3, 4, seed=10)
    want = step(idioms.HostHistory(seed=11), k)
    got, reports = rewrite_all(step, idioms.HostHistory(seed=11), k)
    torch.testing.assert_close(got, want)


def test_concatenated_history_sliced_before_the_rebuild_is_rewritten():
    def step(cache, k):
        cache.k = np.concatenate([cache.k, k.detach().cpu().numpy()], axis=1)
        return torch.from_numpy(np.ascontiguousarray(cache.k[:, 1:, :2])).to(k.device) * 1.0

    k = rand(2, 3, 4, seed=12)
    want = step(idioms.HostHistory(seed=13), k)
    got, reports = rewrite_all(step, idioms.HostHistory(seed=13), k)
    torch.testing.assert_close(got, want)


def test_zero_buffer_written_twice_is_not_a_pad():
    def step(k):
        h, t, d = k.shape
        z = np.zeros((h, t, d + 4), dtype=np.float32)
        z[:, :, :d] = k.detach().cpu().numpy()
        z[:, :, d:] = 1.0  # not zeros any more
        return torch.from_numpy(z).to(k.device) * 1.0

    k = rand(2, 3, 4, seed=14)
    got, reports = rewrite_all(step, k)
    torch.testing.assert_close(got, step(k))


def test_value_that_escapes_to_python_stays_exact_across_the_break():
    """A host copy printed and compared in Python: Dynamo breaks the graph and the array reaches the next graph as
    an input. The read after the write is still history of that input (exact, checked by ``verify``)."""
    def step(cache, k):
        a = k.detach().cpu().numpy()
        print("kv sum", float(a.sum()))
        if (a > 0).sum() > 3:  # a value compared in Python
            a = a * 2.0
        t = k.shape[1]
        cache.k[:, cache.pos : cache.pos + t] = a
        cache.pos += t
        return torch.from_numpy(cache.k[:, : cache.pos]).to(k.device) * 1.0

    k = rand(2, 3, 4, seed=15)
    want = step(idioms.HostCache(seed=16), k)
    got, reports = rewrite_all(step, idioms.HostCache(seed=16), k)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert len(reports) >= 2  # the graph broke


def test_dtype_change_through_the_buffer_is_not_history():
    """float64 K written into a float32 host buffer: numpy rounds it; the read is not K."""
    def step(cache, k):
        t = k.shape[1]
        cache.k[:, cache.pos : cache.pos + t] = k.detach().cpu().numpy()
        cache.pos += t
        return torch.from_numpy(cache.k[:, : cache.pos]).to(k.device).double() - k.sum()

    k = rand(2, 3, 4, seed=18).double() / 3
    want = step(idioms.HostCache(seed=19), k)
    got, reports = rewrite_all(step, idioms.HostCache(seed=19), k)
    torch.testing.assert_close(got, want, rtol=0, atol=0)  # scatter_slice keeps copy() when the dtype changes


def test_rotary_table_built_on_the_host_is_left_exact():
    """A round trip that is not K/V: cos/sin tables computed with numpy and brought to the device."""
    def step(q, positions):
        inv = 1.0 / (10000 ** (np.arange(0, 4, 2, dtype=np.float32) / 4))
        ang = np.outer(positions.detach().cpu().numpy().astype(np.float32), inv)
        cos = torch.from_numpy(np.concatenate([np.cos(ang), np.cos(ang)], -1)).to(q.device)
        return q * cos

    q, positions = rand(3, 4, seed=17), torch.arange(3)
    got, reports = rewrite_all(step, q, positions)  # verify=True: the graph's result is unchanged by the rewrite
    torch.testing.assert_close(got, step(q, positions))  # Dynamo traces np.cos as torch.cos: rounding differs
    assert not matches(reports)  # no cache buffer: nothing to rewrite


def test_history_mutated_in_place_writes_the_buffer():
    """``from_numpy`` of the history aliases the buffer: ``add_`` on it changes what the next step reads, even
    though the graph never uses the result again (``verify`` compares the buffer after the run, too)."""
    def step(cache, k):
        t = k.shape[1]
        cache.k[:, cache.pos : cache.pos + t] = k.detach().cpu().numpy()
        cache.pos += t
        hist = torch.from_numpy(cache.k[:, : cache.pos])
        hist.add_(1.0)
        return k * 2.0

    k = rand(2, 3, 4, seed=20)
    eager_cache, cache = idioms.HostCache(seed=21), idioms.HostCache(seed=21)
    want = step(eager_cache, k)
    got, reports = rewrite_all(step, cache, k)
    torch.testing.assert_close(got, want)
    np.testing.assert_array_equal(cache.k, eager_cache.k)


def test_dtype_round_trip_through_the_host_is_not_a_hop():
    """K rounded to float16 on the host and brought back as float32: not K any more (the float16 part of the trip
    may go, the rounding may not)."""
    def step(k):
        back = torch.from_numpy(k.detach().cpu().to(torch.float16).numpy()).to(k.device, torch.float32)
        return back - k

    k = rand(2, 3, 4, seed=22)
    want = step(k)
    got, reports = rewrite_all(step, k)
    torch.testing.assert_close(got, want, rtol=0, atol=0)  # zero only if the rounding were lost
    assert want.abs().max() > 0


# ---- side conditions of the rules on the functional IR (tests/mutate_guards.py removes each) ---------------


def test_read_past_the_end_of_the_write_keeps_the_buffer_tail():
    """Write ``[p, p+t)``, read ``[p, p+t+2)``: the read is not inside the write (scatter_slice's ``b <= e``)."""
    def step(cache, k):
        t = k.shape[1]
        cache.k[:, cache.pos : cache.pos + t] = k.detach().cpu().numpy()
        out = torch.from_numpy(cache.k[:, cache.pos : cache.pos + t + 2]) * 1.0
        cache.pos += t
        return out

    k = rand(2, 3, 4, seed=23)
    want = step(idioms.HostCache(seed=24), k)
    got, reports = rewrite_all(step, idioms.HostCache(seed=24), k)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert "scatter_slice" in matches(reports)


def test_read_overlapping_the_write_partially_is_selected_by_position():
    """Write ``[2, 5)``, read ``[3, 8)``: neither inside, outside nor around (the ``a <= s, e <= b`` case), so the
    read is selected position by position (scatter_slice's ``where`` case), never taken as a ``cat``."""
    def step(cache, k):
        cache.k[:, 2:5] = k.detach().cpu().numpy()
        return torch.from_numpy(cache.k[:, 3:8]) * 1.0

    k = rand(2, 3, 4, seed=25)
    want = step(idioms.HostCache(seed=26), k)
    got, reports = rewrite_all(step, idioms.HostCache(seed=26), k)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not skips(reports) and any("where" in m.detail for r in reports for m in r.matches), skips(reports)


def test_a_write_that_may_be_empty_is_not_selected_by_position():
    """``select_by_position`` gathers ``V[(i - s) * inside]``: index 0 of ``V`` outside the write, valid only
    where ``V`` is not empty. A write of ``n >= 0`` tokens (an unbacked length, not proven ``>= 1``) read at
    another unordered position is left and reported; with ``n >= 1`` proven the same read is selected. Both run
    with ``n = 0`` and ``n = 2`` and equal eager."""
    def step(buf, v, s_t, n_t, a_t, least):
        s, n, a = s_t.item(), n_t.item(), a_t.item()
        torch._check(s >= 0)
        torch._check(n >= least)
        torch._check(s + n <= buf.shape[1])
        torch._check(n <= v.shape[1])
        torch._check(a >= 0)
        torch._check(a + 3 <= buf.shape[1])
        buf[:, s : s + n] = v[:, :n]
        return buf[:, a : a + 3] * 1.0

    for least, ns in ((0, (0, 2)), (1, (1, 2))):
        for n in ns:
            args = (rand(2, 10, 4, seed=60), rand(2, 4, 4, seed=61), torch.tensor(3), torch.tensor(n),
                    torch.tensor(2), least)
            fresh = lambda: [x.clone() if isinstance(x, torch.Tensor) else x for x in args]  # noqa: E731
            want = step(*fresh())
            with torch._dynamo.config.patch(capture_scalar_outputs=True):
                got, reports = rewrite_all(step, *fresh())
            torch.testing.assert_close(got, want, rtol=0, atol=0, msg=lambda m: f"n >= {least}, n = {n}: {m}")
            selected = any("where" in m.detail for r in reports for m in r.matches)
            assert selected == (least == 1), (least, n, skips(reports))
            assert least == 1 or any("order is not known" in s for s in skips(reports)), skips(reports)


def test_one_position_write_then_a_read_of_another_position():
    """``buf[:, p] = k``, then ``buf[:, p - 1]``: a select of another index is the old buffer (``i != j``)."""
    def step(cache, k):
        cache.k[:, 5] = k[:, 0].detach().cpu().numpy()
        return torch.from_numpy(cache.k[:, 4]) * 1.0 + torch.from_numpy(cache.k[:, 5]) * 2.0

    k = rand(2, 1, 4, seed=27)
    want = step(idioms.HostCache(seed=28), k)
    got, reports = rewrite_all(step, idioms.HostCache(seed=28), k)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert "scatter_slice" in matches(reports)


def test_scatter_into_an_intermediate_is_not_a_cache():
    """Gemma3n's AltUp ``corrected[1:] += first`` read back as ``hidden[0]``, beside a real host cache: only the
    cache's read is rewritten and reported (a scatter into an intermediate is not the user's cache, and a skip or
    match about it would be noise)."""
    def step(cache, k, x, y):
        buf = x * 2
        buf[1:] += y
        t = k.shape[1]
        cache.k[:, cache.pos : cache.pos + t] = k.detach().cpu().numpy()
        cache.pos += t
        return buf[0] + 1, torch.from_numpy(cache.k[:, : cache.pos]) * 1.0

    x, y, k = rand(4, 3, seed=29), rand(3, 3, seed=30), rand(2, 3, 4, seed=31)
    want = step(idioms.HostCache(seed=32), k, x, y)
    got, reports = rewrite_all(step, idioms.HostCache(seed=32), k, x, y)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert matches(reports) == ["scatter_slice"] and not skips(reports)


def test_tensor_buffer_written_in_another_dtype():
    """A float32 tensor buffer written with float64 K: ``copy_`` rounds, so the read is not K itself."""
    def step(buf, k):
        buf[:, 2:5] = k
        return buf[:, :5].double() - k.sum()

    k = rand(2, 3, 4, seed=37).double() / 3
    buf, eager_buf = rand(2, 8, 4, seed=38), rand(2, 8, 4, seed=38)
    want = step(eager_buf, k)
    got, reports = rewrite_all(step, buf, k)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(buf, eager_buf, rtol=0, atol=0)
    assert "scatter_slice" in matches(reports)


def test_two_caches_on_one_numpy_pool_run_as_eager():
    """``a.k = pool[:]``, ``b.k = pool[:]``: two graph inputs over the same memory, which functionalization
    treats as independent. The backend sees the overlap at call time and runs the traced graph (a warning)."""
    class Cache:
        def __init__(self, pool):
            self.k = pool[:]
            self.pos = 0

    def step(a, b, k):
        t = k.shape[1]
        a.k[:, a.pos : a.pos + t] = k.detach().cpu().numpy()
        a.pos += t
        return torch.from_numpy(b.k[:, : a.pos]) * 1.0  # b sees a's write in eager

    def fresh():
        pool = np.random.default_rng(31).standard_normal((2, 16, 4)).astype(np.float32)
        return Cache(pool), Cache(pool), pool

    k = rand(2, 3, 4, seed=32)
    a, b, pool = fresh()
    want = step(a, b, k)
    a2, b2, pool2 = fresh()
    torch._dynamo.reset()
    with pytest.warns(kvpass.KVPassWarning, match="views of the same host memory"):
        got = kvpass.compile(step, backend=kvpass.backend(inner="eager"))(a2, b2, k)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    np.testing.assert_array_equal(pool2, pool)


def test_rewritten_graph_runs_as_traced_on_inputs_that_share_memory():
    """``kvpass.rewrite`` returns a module that checks its inputs: over one numpy pool it runs the graph as traced
    (eager's aliasing), so ``verify`` passes and so does a later call on other aliased inputs."""
    from kvpass.testing import capture_graphs

    def step(a, b, k):
        a[:, 0:3] = k.detach().cpu().numpy()
        return torch.from_numpy(b[:, :3]) * 1.0  # b sees a's write in eager

    def pool():
        return np.random.default_rng(33).standard_normal((2, 16, 4)).astype(np.float32)

    k = rand(2, 3, 4, seed=34)
    with tracing_context():
        _, graphs = capture_graphs(step, pool(), pool(), k, transform=lambda gm: gm)
    (g,) = graphs
    names = [n.name for n in g.before.graph.nodes if n.op == "placeholder"]
    shared = pool()
    inputs = [k if "k" in name else torch.from_numpy(shared[:]) for name in names]  # a and b: one pool
    with pytest.warns(kvpass.KVPassWarning, match="views of the same host memory"):  # once, in verify's run
        gm, _ = kvpass.rewrite(g.before, example_inputs=inputs, verify=True)
    shared2 = pool()
    want = step(pool_a := pool(), pool_a, k)
    got = gm(*[k if "k" in name else torch.from_numpy(shared2[:]) for name in names])
    torch.testing.assert_close(got[0], want, rtol=0, atol=0)
    np.testing.assert_array_equal(shared2, pool_a)


def test_verify_copies_inputs_that_share_memory_together():
    """``verify`` runs both graphs on copies that overlap where the inputs overlap (one deepcopy memo would not
    do it for two numpy views: they are two storages), and never writes the caller's arrays."""
    from kvpass.aliasing import copy_together

    pool = np.random.default_rng(36).standard_normal((2, 16, 4)).astype(np.float32)
    a, b = torch.from_numpy(pool[:, 2:]), torch.from_numpy(pool[:, :8])
    ca, cb = copy_together([a, b])
    ca[:, 0] = 7.0  # pool[:, 2] in both
    assert (cb[:, 2] == 7.0).all() and not (pool == 7.0).any()
    torch.testing.assert_close(cb[:, 3:], b[:, 3:], rtol=0, atol=0)


def test_padding_on_another_dim_is_not_cancelled():
    """``F.pad`` on two dims, sliced on one: the other dim's padding stays (pad_slice's side condition)."""
    def step(k):
        return torch.nn.functional.pad(k, (0, 4, 1, 1))[..., : k.shape[-1]] * 3.0

    k = rand(2, 3, 4, seed=35)
    got, reports = rewrite_all(step, k)
    torch.testing.assert_close(got, step(k), rtol=0, atol=0)
    assert "pad_slice" not in matches(reports)


def test_slice_that_keeps_padding_is_not_cancelled():
    def step(k):
        return torch.nn.functional.pad(k, (0, 4))[..., : k.shape[-1] + 2] * 3.0

    k = rand(2, 3, 4, seed=36)
    got, reports = rewrite_all(step, k)
    torch.testing.assert_close(got, step(k), rtol=0, atol=0)
    assert "pad_slice" not in matches(reports)
