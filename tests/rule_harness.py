"""The unit layer's harness: one rule on a small functional ATen graph, checked against eager.

A case is plain user code ``fn(*tensors)`` that writes into and reads from a cache buffer given as an input.
:func:`run_rule` traces it to kvpass's IR the cheap way (``make_fx`` of ``torch.func.functionalize``: SSA values,
a write as a ``*_scatter``, the buffer's new value written back by a ``copy_`` epilogue, as AOTAutograd does),
runs one rule, then runs the rewritten graph and ``fn`` itself on fresh random inputs of the traced shapes and
asserts both the results and every input afterwards (a cache written in place is a result) bit for bit. No Dynamo,
no AOTAutograd, no compiler: milliseconds per case (``pytest -m unit``).
"""

from __future__ import annotations

import dataclasses

import torch
from torch.fx.experimental.proxy_tensor import make_fx

import kvpass
from kvpass.report import Report
from kvpass.testing import buffer_reads

__all__ = ["RuleRun", "run_rule", "fresh_like"]


@dataclasses.dataclass
class RuleRun:
    """What one rule did to one case: the graph before and after, and the rule's report."""

    before: torch.fx.GraphModule
    after: torch.fx.GraphModule
    report: Report

    @property
    def matches(self) -> int:
        return sum(self.report.counts.values())

    def targets(self, which: str = "after") -> list:
        """The ops of the graph, in order."""
        return [n.target for n in getattr(self, which).graph.nodes if n.op == "call_function"]

    def buffer_reads(self) -> int:
        """Reads of a functional write into a cache buffer still in the rewritten graph."""
        return len(buffer_reads(self.after))


def fresh_like(args, seed: int):
    """New random tensors of the shapes and dtypes of ``args`` (integers drawn in ``[0, 4)``); non-tensors as given."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for a in args:
        if not isinstance(a, torch.Tensor):
            out.append(a)
        elif a.dtype.is_floating_point:
            out.append(torch.randn(a.shape, generator=g).to(a.dtype))
        elif a.dtype == torch.bool:
            out.append(torch.rand(a.shape, generator=g) < 0.5)
        else:
            out.append(torch.randint(0, 4, a.shape, generator=g, dtype=a.dtype))
    return out


def _clone(args):
    return [a.clone() if isinstance(a, torch.Tensor) else a for a in args]


def run_rule(fn, args, rule: str, *, mode: str = "real", seeds=(1, 2)) -> RuleRun:
    """Trace ``fn(*args)`` to the functional IR with ``make_fx(tracing_mode=mode)``, apply ``rule`` alone, and
    check the rewritten graph against ``fn`` on fresh random inputs (``seeds``), outputs and inputs after the run
    bit for bit. ``mode="symbolic"`` makes every input size a symbol (the rule must prove its bounds for all)."""
    gm = make_fx(torch.func.functionalize(fn, remove="mutations"), tracing_mode=mode)(*_clone(args))
    after, report = kvpass.rewrite(gm, patterns=[rule])
    for seed in seeds:
        inputs = fresh_like(args, seed)
        eager_in, graph_in = _clone(inputs), _clone(inputs)
        expected = fn(*eager_in)
        with torch.no_grad():
            got = after(*graph_in)
        torch.testing.assert_close(got, expected, rtol=0, atol=0, equal_nan=True,
                                   msg=lambda m: f"{rule} changed the result (seed {seed}): {m}\n{after.code}")
        for i, (a, b) in enumerate(zip(graph_in, eager_in)):
            if isinstance(a, torch.Tensor):
                torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True,
                                           msg=lambda m: f"{rule}: input {i} after the run differs: {m}")
    return RuleRun(report.before, after, report)  # the engine's snapshot of the graph before the rule

