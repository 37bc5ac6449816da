"""kvpass.timing: the one timing method behind ``kvpass demo`` and ``kvpass bench``.

The runners here record made-up samples instead of measuring, so every assertion is about the method (warm-up,
interleaving, gc, per-round ratios, what is called inconclusive), never about how fast this machine is."""

import gc
import logging

import pytest
import torch

from kvpass.timing import (Measurement, captured_recompile_limit_warnings, measure, RECOMPILE_LIMIT_NOTE,
                           WIDE_SPREAD)


@pytest.fixture(autouse=True)
def collections(monkeypatch):
    """Count ``gc.collect()`` calls instead of running them: a full collection of this test process's heap (every
    graph the suite compiled so far) takes about a second, and these tests are about the method, not the heap."""
    calls = []
    monkeypatch.setattr(gc, "collect", lambda *a: calls.append(a) or 0)
    return calls


def _fake(log, name, per_round, gc_states=None):
    """A runner that records ``per_round[i]`` (three samples around it) in its i-th call."""
    calls = []

    def work(timer):
        calls.append(name)
        log.append(name)
        if gc_states is not None:
            gc_states.append(gc.isenabled())
        v = per_round[min(len(calls) - 1, len(per_round) - 1)]
        timer.samples += [v * 0.9, v, v * 5]  # median is v: one slow outlier sample does not move it
    return work


def test_same_warmup_then_interleaved_rotating_rounds_with_gc_off(collections):
    log, gc_states = [], []
    runners = {n: _fake(log, n, [1.0] * 10, gc_states) for n in ("a", "b", "c")}
    m = measure(runners, rounds=3, warmup=2, compiles=None)
    assert log[:6] == ["a", "a", "b", "b", "c", "c"]  # the same warm-up for every runner, before any timing
    assert log[6:] == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]  # interleaved, the order rotating
    assert gc.isenabled() and not any(gc_states)  # the collector is off during every turn, on again after
    assert len(collections) == len(log)  # and a full collection runs before every turn
    assert m.samples_per_round == {"a": 3, "b": 3, "c": 3} and m.rounds == 3 and m.warmup == 2


def test_figures_are_per_round_medians_and_ratios_are_per_round():
    log = []
    # warm-up values (first two calls) are discarded; the machine slows down in round 2 for both runners
    base = _fake(log, "base", [99, 99, 10.0, 30.0, 10.0])
    fast = _fake(log, "fast", [99, 99, 2.0, 6.0, 2.5])
    m = measure({"base": base, "fast": fast}, rounds=3, warmup=2, compiles=None)
    assert m.per_round == {"base": [10.0, 30.0, 10.0], "fast": [2.0, 6.0, 2.5]}
    r = m.ratio("base", "fast")
    assert r.values == [5.0, 5.0, 4.0] and r.median == 5.0 and (r.lo, r.hi) == (4.0, 5.0)
    # a ratio of medians taken over the whole run would say 10/2.5 = 4.0: per round, the slow period cancels
    assert m.conclusive("base", "fast")
    assert m.runner("base").width == 3.0 > WIDE_SPREAD
    notes = m.notes("base")
    assert any("spread too large to conclude" in n and "base 3.0x" in n for n in notes)
    assert not any("no conclusion" in n for n in notes)


def test_a_ratio_across_1x_is_inconclusive_and_marked():
    m = Measurement({"eager": [1.0, 1.0, 1.0], "x": [0.8, 1.1, 0.9]}, rounds=3, warmup=1,
                    samples_per_round={"eager": 1, "x": 1})
    assert not m.conclusive("eager", "x")
    assert any("across 1x: no conclusion" in n for n in m.notes("eager"))
    row = [line for line in m.table("eager") if line.startswith("| x |")][0]
    assert row.endswith("? |")
    d = m.to_dict("eager")
    assert d["runners"]["x"]["conclusive"] is False and d["method"]["interleaved"] is True
    assert d["runners"]["x"]["ms"]["median"] == pytest.approx(900.0)


def test_compiles_inside_the_timed_rounds_are_reported():
    count = [0]

    def compiling(timer):
        count[0] += 1  # "compiles" on every call, timed rounds included
        timer.samples.append(1.0)

    def steady(timer):
        timer.samples.append(1.0)

    m = measure({"steady": steady, "compiling": compiling}, rounds=4, warmup=1, compiles=lambda: count[0])
    assert m.warmup_compiles == {"steady": 0, "compiling": 1}
    assert m.compiles_during_timing == 4
    assert any("4 compile(s) happened during the timed rounds" in n for n in m.notes("steady"))


def test_a_runner_that_times_nothing_is_an_error():
    with pytest.raises(ValueError, match="timed nothing"):
        measure({"idle": lambda timer: None}, rounds=1, warmup=0, compiles=None)
    with pytest.raises(ValueError, match="rounds must be >= 1"):
        measure({}, rounds=0)


def test_dynamo_recompile_limit_warning_is_captured_not_printed(caplog):
    """Stock Dynamo's multi-line warning (here with recompile_limit=1 and an eager backend) is kept out of
    stderr and summarized; other warnings still pass."""

    def f(x, n):
        return x * n

    compiled = torch.compile(f, backend="eager")
    x = torch.randn(3, generator=torch.Generator().manual_seed(0))
    with torch._dynamo.config.patch(recompile_limit=1, automatic_dynamic_shapes=False), \
            captured_recompile_limit_warnings() as hits:
        for n in (2, 3, 4):  # a Python int: specialized, one recompile per value
            torch.testing.assert_close(compiled(x, n), x * n)
        logging.getLogger("torch._dynamo.convert_frame").warning("another warning")
    logged = [r.getMessage() for r in caplog.records]
    assert not any("hit config.recompile_limit" in m for m in logged) and "another warning" in logged
    assert len(hits) >= 1 and hits[0].startswith("recompile_limit=1 in 'f' (test_timing.py:")
    limit, _, where = hits[0].partition(" in ")
    assert "expected stock behaviour" in RECOMPILE_LIMIT_NOTE.format(limit=limit, where=where)
