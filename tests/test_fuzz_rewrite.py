"""Differential fuzzing of the rewrite on generated shared-KV decoders (``fuzz_decoders``): eager is the oracle.

Every generated model runs a prefill and teacher-forced decode steps three ways that must agree: eagerly; compiled
with a backend that runs ``kvpass.rewrite(gm, example_inputs, verify=True)`` on each graph Dynamo produces (and
then runs the rewritten graph); and, for a smaller sample, ``torch.compile(model, backend="kvpass")`` with
Inductor generating the code. Each rewritten graph must leave no host op on an attention's K/V path (except for
the families no rewrite can remove soundly: ``Case.structural`` false, results only), and rewriting it again must
change nothing (idempotence).

The cache-step cases also draw issue 11's idiom families (in-place edits of host copies and of history through
views, workspace reuse, aliased numpy views, ``out=`` writes, history used after a later write, clone-then-edit;
see ``fuzz_decoders``) in about three cases of four, mixed with the plain ones: 20 decoders + 120 cache steps =
140 cases per run through ``kvpass.rewrite(verify=True)`` and compiled-vs-eager (and 2 decoders + 12 cache steps
through Inductor), plus 40 buffer-region cases. (Sized to keep the whole suite well under 30 minutes on 2 cores; the
closing notes record larger and other draws, e.g. ``KVPASS_FUZZ_SEED=2026``.)

Fixed seed by default (hypothesis ``derandomize``): the same cases every run. A longer or different run::

    KVPASS_FUZZ_SCALE=10 pytest tests/test_fuzz_rewrite.py         # 10x the cases
    KVPASS_FUZZ_SEED=1234 pytest tests/test_fuzz_rewrite.py        # another draw

The case counts are printed at the end of the test session (conftest.py).
"""

import pytest
import torch
from hypothesis import given

import fuzz_decoders as fd
import kvpass
from kvpass.testing import buffer_reads
from kvpass.tracing import tracing_context

pytestmark = pytest.mark.filterwarnings("ignore:To copy construct from a tensor")  # the torch.tensor(a) idiom

DECODER_CASES, CACHE_CASES = 20, 120  # through kvpass.rewrite(verify=True)
INDUCTOR_DECODERS, INDUCTOR_CACHE_STEPS = 2, 12  # through backend="kvpass" (Inductor)


def tolerance(dtype, inductor=False):
    """How far a compiled run may be from eager: the rewrite alone reorders nothing (tight); Inductor fuses and
    reassociates (its own dtype's rounding)."""
    if not inductor:
        return dict(rtol=1e-6, atol=1e-6) if dtype != torch.float16 else dict(rtol=1e-3, atol=1e-3)
    return {torch.float64: dict(rtol=1e-6, atol=1e-6), torch.float32: dict(rtol=1e-4, atol=1e-4),
            torch.float16: dict(rtol=2e-2, atol=2e-2), torch.bfloat16: dict(rtol=1e-1, atol=1e-1)}[dtype]


def assert_steps_close(got, want, case, **tol):
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        g, w = (list(x) if isinstance(x, (list, tuple)) else [x] for x in (g, w))
        assert len(g) == len(w)
        assert max(b.abs().max() for b in w) > 0.1, "degenerate reference output"
        for j, (a, b) in enumerate(zip(g, w)):
            torch.testing.assert_close(a, b, **tol, msg=lambda m: f"{case.short()}\nstep {i}, output {j}: {m}")


def check_rewrite(case, model, steps, roots=None, extra=None):
    """Eager vs a compile whose backend is ``kvpass.rewrite(verify=True)``; structure of every rewritten graph
    (and ``extra(gm, report)`` on each, when given)."""
    want = fd.run_steps(model(case), steps)
    graphs = []

    def verifying_backend(gm, example_inputs):
        gm, report = kvpass.rewrite(gm, example_inputs=example_inputs, verify=True)
        if case.structural:  # else: a family no rewrite can remove soundly (Case.structural), results only
            left = fd.kv_path_host_nodes(gm, roots)
            assert not left, f"{case.short()}\nhost ops left on the K/V path: {[n.name for n in left]}\n{report.format()}"
            reads = buffer_reads(gm)  # read-after-write through a cache buffer: each one left must be reported
            assert len(reads) <= len(report.skips), (
                f"{case.short()}\nunreported reads of a buffer write: {[n.name for n in reads]}\n{report.format()}")
        if extra is not None:
            extra(gm, report)
        once = kvpass.graph_text(gm)
        _, again = kvpass.rewrite(gm)
        assert not again.matches and kvpass.graph_text(gm) == once, f"{case.short()}: a second rewrite changed the graph"
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    with tracing_context():
        got = fd.run_steps(torch.compile(model(case), backend=verifying_backend), steps)
    assert_steps_close(got, want, case, **tolerance(case.dtype))
    fewest, most = graph_counts(case)
    assert fewest <= len(graphs) <= most, f"{case.short()}: {len(graphs)} graphs, expected {fewest} to {most}"
    return len(graphs)


def graph_counts(case):
    """How many graphs a case may compile: the prefill's and one for all decode positions, plus what torch
    specializes itself: decoding from position 1 (a one-token prompt; an int torch may specialize), and a last
    step that reads the whole buffer (its slice is contiguous, which Dynamo guards on when it traces the read's
    clone: ``(16 + 16*pos) != 144``), unless the case leaves a slot of slack. A ring or a growing buffer: up to
    one more per decode step (a wrap or a growth may recompile; tests/test_idioms_buffer.py pins the counts of
    those idioms over 8 steps)."""
    region = getattr(case, "region", "")
    case = getattr(case, "case", case)  # a RegionCase's Case
    most = 2 + (case.prompt_len == 1 and case.decode_steps > 1) + (case.slack == 0 and case.decode_steps > 1)
    if region.startswith(("ring", "grow")):
        return 2, max(most, 1 + case.decode_steps)
    return 2, most


def check_inductor(case, model, steps):
    """Eager vs ``torch.compile(model, backend="kvpass")`` (the registered backend, Inductor inside)."""
    want = fd.run_steps(model(case), steps)
    torch._dynamo.reset()
    got = fd.run_steps(torch.compile(model(case), backend="kvpass"), steps)
    assert_steps_close(got, want, case, **tolerance(case.dtype, inductor=True))


@fd.fuzz(DECODER_CASES)
@given(fd.cases(max_layers=4, max_decode=1))
def _fuzz_decoders(case):
    fd.COUNTS["rewrite graphs"] += check_rewrite(case, fd.build, fd.token_steps(case))
    fd.COUNTS["rewrite cases (decoders)"] += 1


@fd.fuzz(CACHE_CASES)
@given(fd.cache_cases())
def _fuzz_cache_steps(case):
    fd.COUNTS["rewrite graphs"] += check_rewrite(case, fd.CacheStep, fd.kv_steps(case), roots="clones")
    fd.COUNTS["rewrite cases (cache steps)"] += 1


@pytest.mark.slow
def test_generated_decoders_rewrite_exactly():
    before = fd.COUNTS["rewrite cases (decoders)"]
    _fuzz_decoders()
    assert fd.COUNTS["rewrite cases (decoders)"] - before >= round(DECODER_CASES * fd.SCALE) * 0.9  # allow dedupes


@pytest.mark.slow
def test_generated_cache_steps_rewrite_exactly():
    before = fd.COUNTS["rewrite cases (cache steps)"]
    _fuzz_cache_steps()
    assert fd.COUNTS["rewrite cases (cache steps)"] - before >= round(CACHE_CASES * fd.SCALE) * 0.9


@fd.fuzz(INDUCTOR_DECODERS)
@given(fd.cases(max_layers=2, max_decode=2))
def _fuzz_inductor_decoders(case):
    check_inductor(case, fd.build, fd.token_steps(case))
    fd.COUNTS["inductor cases (decoders)"] += 1


@fd.fuzz(INDUCTOR_CACHE_STEPS)
@given(fd.cache_cases(max_decode=2))
def _fuzz_inductor_cache_steps(case):
    check_inductor(case, fd.CacheStep, fd.kv_steps(case))
    fd.COUNTS["inductor cases (cache steps)"] += 1


@pytest.mark.slow
def test_generated_decoders_through_inductor_match_eager():
    before = fd.COUNTS["inductor cases (decoders)"]
    _fuzz_inductor_decoders()
    assert fd.COUNTS["inductor cases (decoders)"] - before >= round(INDUCTOR_DECODERS * fd.SCALE) * 0.9


@pytest.mark.slow
def test_generated_cache_steps_through_inductor_match_eager():
    before = fd.COUNTS["inductor cases (cache steps)"]
    _fuzz_inductor_cache_steps()
    assert fd.COUNTS["inductor cases (cache steps)"] - before >= round(INDUCTOR_CACHE_STEPS * fd.SCALE) * 0.9


# ==== issue 12, part B: buffer-region idioms (fuzz_decoders.region_cases) ==========================================

REGION_CASES = 40


def region_check(rc):
    """The step's K/V reach every history handed out through graph edges, not through a cache-buffer write."""
    import idioms_buffer

    def check(gm, report):
        through = idioms_buffer.kv_through_buffer(gm, roots="clones")
        # a ring read before it is full (``[:pos + 1]`` against a write at ``pos % W``) needs ``pos >= 0`` known:
        # without attention around it (RoPE, a mask) nothing in a cache step's graph bounds ``pos`` from below,
        # so such a read may be left, reported (README, Limitations)
        allowed = rc.region.startswith("ring") and report.skips and all(
            "order is not known" in s.reason for s in report.skips)
        assert allowed or not through, (
            f"{rc.short()}\nK/V through a buffer write: {[n.name for n in through]}\n{report.format()}")
        assert allowed or not report.skips, f"{rc.short()}\n{report.format()}"
    return check


@fd.fuzz(REGION_CASES)
@given(fd.region_cases())
def _fuzz_region_steps(rc):
    fd.COUNTS["rewrite graphs"] += check_rewrite(rc, fd.RegionStep, fd.region_kv_steps(rc), roots="clones",
                                                 extra=region_check(rc))
    fd.COUNTS["rewrite cases (buffer regions)"] += 1


@pytest.mark.slow
def test_generated_buffer_regions_rewrite_exactly():
    before = fd.COUNTS["rewrite cases (buffer regions)"]
    _fuzz_region_steps()
    assert fd.COUNTS["rewrite cases (buffer regions)"] - before >= round(REGION_CASES * fd.SCALE) * 0.9

# ==== end of issue 12, part B ======================================================================================


# ==== issue 23 (items 2, 3, 5): numpy dtype/shape queries, positions read back from tensors, beam reorders =========
# (fuzz_decoders.hostdriven_cases). Same checks as the cache steps, with ``kvpass.tracing_context`` in force (as
# ``kvpass.compile`` has it): results, idempotence, every read of a buffer write left in place reported, and 2
# graphs (the prefill's and one decode graph; the prompt has 2 or more tokens).

HOSTDRIVEN_CASES, INDUCTOR_HOSTDRIVEN = 20, 3


@fd.fuzz(HOSTDRIVEN_CASES)
@given(fd.hostdriven_cases())
def _fuzz_hostdriven_steps(case):
    fd.COUNTS["rewrite graphs"] += check_rewrite(case, fd.HostDrivenStep, fd.hostdriven_kv_steps(case), roots="clones")
    fd.COUNTS["rewrite cases (host-driven)"] += 1


@pytest.mark.slow
def test_generated_host_driven_caches_rewrite_exactly():
    before = fd.COUNTS["rewrite cases (host-driven)"]
    _fuzz_hostdriven_steps()
    assert fd.COUNTS["rewrite cases (host-driven)"] - before >= round(HOSTDRIVEN_CASES * fd.SCALE) * 0.9


@fd.fuzz(INDUCTOR_HOSTDRIVEN)
@given(fd.hostdriven_cases(max_decode=6).filter(lambda c: c.position != "tolist"))  # Inductor's NameError: see
def _fuzz_inductor_hostdriven(case):  # test_idioms_hostdriven.INDUCTOR_XFAIL
    want = fd.run_steps(fd.HostDrivenStep(case), fd.hostdriven_kv_steps(case))
    torch._dynamo.reset()
    got = fd.run_steps(kvpass.compile(fd.HostDrivenStep(case)), fd.hostdriven_kv_steps(case))
    assert_steps_close(got, want, case, **tolerance(case.dtype, inductor=True))
    fd.COUNTS["inductor cases (host-driven)"] += 1


@pytest.mark.slow
def test_generated_host_driven_caches_through_inductor_match_eager():
    before = fd.COUNTS["inductor cases (host-driven)"]
    _fuzz_inductor_hostdriven()
    assert fd.COUNTS["inductor cases (host-driven)"] - before >= round(INDUCTOR_HOSTDRIVEN * fd.SCALE) * 0.9

# ==== end of issue 23 (items 2, 3, 5) ===============================================================================
