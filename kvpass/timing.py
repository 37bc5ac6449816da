"""One timing method for every latency kvpass prints (``kvpass demo``, ``kvpass bench``, ``bench/decode.py``).

The method, in one place so that every figure means the same thing:

1. **The same warm-up for every runner**: each runner does ``warmup`` untimed rounds of its work first (compiles,
   autotuning, caches and allocator warm-up happen there, for eager as much as for compiled runners).
2. **Interleaved rounds**: then ``rounds`` timed rounds; in each round every runner does its work once, in an
   order that rotates from round to round, so a slow period of the machine hits every runner, not one of them.
3. **The process's own load stays out**: ``gc.collect()`` before each runner's turn, the garbage collector
   disabled during it; Dynamo's compile counter is read before and after the timed rounds, and any compile in
   there is reported (:attr:`Measurement.compiles_during_timing`).
4. **Median and spread**: a runner's figure for a round is the median of the samples its work timed (e.g. every
   decode step); over the rounds it gets the median and the spread (min-max) of those figures.
5. **Ratios per round**: ``baseline / runner`` is computed within each round (both measured seconds apart), then
   its median and spread over the rounds. A ratio whose range contains 1 does not say which runner is faster,
   and a runner whose figures vary more than :data:`WIDE_SPREAD` between rounds was measured on a noisy machine:
   :meth:`Measurement.notes` says so in words, and the tables mark it.

A runner is a callable ``work(timer)`` that does one round of work and times the parts that count with
``timer.time(fn, *args)`` (or appends seconds to ``timer.samples`` itself)::

    def eager(timer):
        model.reset()
        model(prompt)                     # prefill: not timed
        for tok in decode:
            timer.time(model, tok)        # each decode step: one sample

    m = measure({"eager": eager, "compiled": compiled_work}, rounds=9, warmup=2)
    print("\\n".join(m.table("eager")))
"""

from __future__ import annotations

import contextlib
import gc
import logging
import re
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping

__all__ = ["Timer", "Spread", "Measurement", "measure", "dynamo_compiles", "captured_recompile_limit_warnings",
           "RECOMPILE_LIMIT_NOTE", "WIDE_SPREAD"]

#: A runner whose per-round figures vary more than this factor (max / min) was measured on a noisy machine.
WIDE_SPREAD = 1.5


class Timer:
    """Given to a runner's work: collects the samples (seconds) of one round."""

    def __init__(self, sync: Callable[[], None] | None = None):
        self.samples: list[float] = []
        self._sync = sync or (lambda: None)

    def time(self, fn, *args, **kwargs):
        """Run ``fn(*args, **kwargs)``, record its wall time (device synchronized before and after), return its
        result."""
        self._sync()
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        self._sync()
        self.samples.append(time.perf_counter() - t0)
        return out


@dataclass
class Spread:
    """The median and the range (min, max) of a list of figures."""

    values: list[float]
    median: float = field(init=False)
    lo: float = field(init=False)
    hi: float = field(init=False)

    def __post_init__(self):
        if not self.values:
            raise ValueError("Spread of no values")
        self.median, self.lo, self.hi = statistics.median(self.values), min(self.values), max(self.values)

    @property
    def width(self) -> float:
        """max / min of the figures (1.0: no spread)."""
        return self.hi / self.lo if self.lo > 0 else float("inf")

    def to_dict(self, scale: float = 1.0) -> dict:
        return {"median": self.median * scale, "min": self.lo * scale, "max": self.hi * scale,
                "values": [v * scale for v in self.values]}


@dataclass
class Measurement:
    """What :func:`measure` returns: per runner, the per-round figures (seconds), and how they were taken."""

    per_round: dict[str, list[float]]
    rounds: int
    warmup: int
    samples_per_round: dict[str, int]
    compiles_during_timing: int = 0
    #: per runner: compiles counted during its warm-up (its compiled graphs), and its first warm-up round's seconds
    warmup_compiles: dict[str, int] = field(default_factory=dict)
    first_round_s: dict[str, float] = field(default_factory=dict)

    def runner(self, name: str) -> Spread:
        """Median and spread over the rounds of ``name``'s per-round figure (seconds)."""
        return Spread(self.per_round[name])

    def ratio(self, baseline: str, name: str) -> Spread:
        """``baseline / name`` computed in each round, then its median and spread (>1: ``name`` is faster)."""
        return Spread([b / x for b, x in zip(self.per_round[baseline], self.per_round[name])])

    def conclusive(self, baseline: str, name: str) -> bool:
        """True when every round agrees on which of the two is faster (the ratio's range excludes 1)."""
        r = self.ratio(baseline, name)
        return r.lo > 1.0 or r.hi < 1.0

    def notes(self, baseline: str) -> list[str]:
        """Sentences on what the figures cannot support: wide spreads, ratios that do not decide, compiles."""
        out = []
        noisy = [f"{n} {self.runner(n).width:.1f}x" for n in self.per_round if self.runner(n).width > WIDE_SPREAD]
        if noisy:
            out.append(f"spread too large to conclude precisely: per-round figures vary by {', '.join(noisy)} "
                       f"(max/min over {self.rounds} rounds; above {WIDE_SPREAD}x the machine was busy: rerun "
                       "on a quiet machine)")
        for n in self.per_round:
            if n != baseline and not self.conclusive(baseline, n):
                r = self.ratio(baseline, n)
                out.append(f"{n} vs {baseline}: the per-round ratio ranges {r.lo:.2f}x-{r.hi:.2f}x, across 1x: "
                           "no conclusion on which is faster")
        if self.compiles_during_timing:
            out.append(f"{self.compiles_during_timing} compile(s) happened during the timed rounds: the figures "
                       "include compile time")
        return out

    def table(self, baseline: str, extra: Mapping[str, Mapping[str, str]] | None = None, unit_ms: bool = True) -> list[str]:
        """A markdown table: per runner the median and min-max of its figure, and its ratio to ``baseline``
        (median of the per-round ratios, with their min-max; ``?`` marks a ratio that does not decide).
        ``extra`` adds columns: ``{column: {runner: text}}``."""
        extra = dict(extra or {})
        scale = 1e3 if unit_ms else 1.0
        unit = "ms" if unit_ms else "s"
        head = ["runner", *extra, f"median {unit}", f"min-max {unit}", f"vs {baseline} (median, min-max)"]
        lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
        for n in self.per_round:
            s, r = self.runner(n), self.ratio(baseline, n)
            mark = "" if n == baseline or self.conclusive(baseline, n) else " ?"
            cells = [n, *(extra[c].get(n, "") for c in extra), f"{s.median * scale:.3f}",
                     f"{s.lo * scale:.3f}-{s.hi * scale:.3f}", f"{r.median:.2f}x ({r.lo:.2f}-{r.hi:.2f}){mark}"]
            lines.append("| " + " | ".join(cells) + " |")
        return lines

    def to_dict(self, baseline: str) -> dict:
        """JSON-ready: the method, per runner its figure in ms (median, min, max, per round) and its ratio."""
        return {
            "method": {"warmup_rounds": self.warmup, "rounds": self.rounds, "interleaved": True,
                       "figure": "median of the samples of one round; then median and min-max over the rounds",
                       "samples_per_round": self.samples_per_round,
                       "compiles_during_timing": self.compiles_during_timing},
            "runners": {n: {"ms": self.runner(n).to_dict(1e3),
                            f"vs_{baseline}": self.ratio(baseline, n).to_dict(),
                            "conclusive": n == baseline or self.conclusive(baseline, n)} for n in self.per_round},
            "notes": self.notes(baseline),
        }


def dynamo_compiles() -> int:
    """How many graphs Dynamo has compiled in this process so far (its ``unique_graphs`` counter)."""
    import torch._dynamo.utils

    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def _turn(work, sync) -> list[float]:
    timer = Timer(sync)
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        work(timer)
    finally:
        if enabled:
            gc.enable()
    return timer.samples


def measure(runners: Mapping[str, Callable[[Timer], object]], rounds: int = 9, warmup: int = 2,
            sync: Callable[[], None] | None = None, compiles: Callable[[], int] | None = dynamo_compiles,
            progress: Callable[[str], None] | None = None) -> Measurement:
    """Time ``runners`` (name -> ``work(timer)``) with the method of this module and return the figures.

    ``sync`` synchronizes the device around each sample (``torch.cuda.synchronize`` on GPU); ``compiles`` counts
    compiles so far (default: Dynamo's counter; ``None`` to skip the check); ``progress`` receives a line per
    phase."""
    if rounds < 1 or warmup < 0:
        raise ValueError(f"measure: rounds must be >= 1 and warmup >= 0, got rounds={rounds}, warmup={warmup}")
    names = list(runners)
    say = progress or (lambda msg: None)
    warmup_compiles: dict[str, int] = {}
    first_round_s: dict[str, float] = {}
    for name in names:  # the same warm-up for every runner (compiles happen here)
        say(f"warm-up {name} ({warmup} round(s), compiles included)")
        before = compiles() if compiles else 0
        for i in range(warmup):
            t0 = time.perf_counter()
            _turn(runners[name], sync)
            if i == 0:
                first_round_s[name] = time.perf_counter() - t0
        warmup_compiles[name] = (compiles() if compiles else 0) - before
    say(f"{rounds} timed rounds, runners interleaved")
    before = compiles() if compiles else 0
    per_round: dict[str, list[float]] = {n: [] for n in names}
    counts: dict[str, int] = {}
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:  # rotate the order from round to round
            samples = _turn(runners[name], sync)
            if not samples:
                raise ValueError(f"measure: runner {name!r} timed nothing (use timer.time(fn, ...) in its work)")
            per_round[name].append(statistics.median(samples))
            counts[name] = len(samples)
    after = compiles() if compiles else 0
    return Measurement(per_round, rounds, warmup, counts, compiles_during_timing=after - before,
                       warmup_compiles=warmup_compiles, first_round_s=first_round_s)


#: The one line printed instead of Dynamo's multi-line warning when a stock baseline hits the recompile limit.
RECOMPILE_LIMIT_NOTE = ("note: stock Inductor hit Dynamo's recompile limit ({limit}) on {where}: expected stock "
                        "behaviour (every decode position is specialized until the limit, then that frame runs "
                        "eagerly); Dynamo's warning was captured, not printed")


class _RecompileLimitFilter(logging.Filter):
    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if str(record.msg).startswith("torch._dynamo hit config."):
            self.records.append(record)
            return False
        return True


@contextlib.contextmanager
def captured_recompile_limit_warnings():
    """Scoped: Dynamo's "hit config.recompile_limit" warnings are kept in the yielded list of one-line summaries
    (``"<limit> in <function>"``) instead of going to stderr; other log records pass as usual."""
    logger = logging.getLogger("torch._dynamo.convert_frame")
    filt = _RecompileLimitFilter()
    logger.addFilter(filt)
    found: list[str] = []
    try:
        yield found
    finally:
        logger.removeFilter(filt)
        for rec in filt.records:
            args = rec.args if isinstance(rec.args, tuple) else ()
            limit = f"{args[0]}={args[1]}" if len(args) >= 2 else "recompile_limit"
            where = re.sub(r"\(([^()]*[/\\])?([^/\\()]+)\)", r"(\2)", str(args[2])) if len(args) >= 3 else "a frame"
            found.append(f"{limit} in {where}")
