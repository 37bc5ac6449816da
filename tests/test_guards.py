"""Negative cases: programs where a rewrite would change what is computed. Each pins one guard of the catalogue:
the pass must skip (with the reason in the report) or rewrite exactly, and ``verify=True`` (eager before vs
after) would raise if the guard were removed. Found or hardened while fuzzing (tests/test_fuzz_rewrite.py)."""

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
        return gm.forward

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
    assert "the read's result aliases the buffer and is used after a later write to it" in skips(reports)


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
    assert "buffer_history" in matches(reports)


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
    assert any("mutates the buffer in a way kvpass does not model" in s for s in skips(reports)), skips(reports)


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
    assert "shared_read" not in matches(reports)


def test_concatenated_history_mutated_before_the_rebuild():
    def step(cache, k):
        cache.k = np.concatenate([cache.k, k.detach().cpu().numpy()], axis=1)
        cache.k[:, 0] = 0.0
        return torch.from_numpy(cache.k).to(k.device) * 1.0

    k = rand(2, 3, 4, seed=8)
    want = step(idioms.HostHistory(seed=9), k)
    got, reports = rewrite_all(step, idioms.HostHistory(seed=9), k)
    torch.testing.assert_close(got, want)
    assert any("the concatenated host array is mutated in place" in s for s in skips(reports)), skips(reports)


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
    assert any("rebuilt from the concatenated host array is mutated in place" in s for s in skips(reports)), \
        skips(reports)


def test_concatenated_history_sliced_before_the_rebuild_is_rewritten():
    def step(cache, k):
        cache.k = np.concatenate([cache.k, k.detach().cpu().numpy()], axis=1)
        return torch.from_numpy(np.ascontiguousarray(cache.k[:, 1:, :2])).to(k.device) * 1.0

    k = rand(2, 3, 4, seed=12)
    want = step(idioms.HostHistory(seed=13), k)
    got, reports = rewrite_all(step, idioms.HostHistory(seed=13), k)
    torch.testing.assert_close(got, want)
    assert "host_concat" in matches(reports)


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
    assert "the zero buffer is written more than once" in skips(reports)


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
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert any("dtype changes through the buffer" in s for s in skips(reports)), skips(reports)


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
    assert set(matches(reports)) <= {"host_concat"}  # the table's np.concatenate may become torch.cat: same values


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
    assert any("mutated in place" in s for s in skips(reports)), skips(reports)


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
