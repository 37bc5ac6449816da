"""kvpass inside Inductor: the pattern catalogue as a post-grad ``CustomGraphPass`` on the ATen graph.

Inductor caches compiled graphs (the FX graph cache) under a key that includes each custom pass's ``uuid()``.
A raw callable has no uuid and makes Inductor bypass the cache; a uuid that did not change with the patterns would
serve code compiled by an older catalogue. Ours hashes the source of every module the rewrite imports (the
engine, the IR, the aliasing facts, the rule API, logging, the tracing context, every rule and the store ops'
lowering), plus the selected rule names.
"""

from __future__ import annotations

import hashlib
import os
import inspect
from typing import Callable, Sequence

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass

from . import engine

__all__ = ["KVPassInductorPass", "catalogue_files"]


def catalogue_files(patterns: Sequence) -> tuple[str, ...]:
    """The source files whose contents decide what the pass does (and what the ops it emits lower to: PyTorch's
    caches key a custom op on its name, not on its decomposition)."""
    from . import aliasing, ir, observe, rules, tracing
    from .ops import _store

    files = {inspect.getsourcefile(m) for m in (engine, aliasing, ir, observe, rules, tracing, _store)}
    for p in patterns:
        files.add(inspect.getsourcefile(type(p)))
    return tuple(sorted(f for f in files if f))


def _hash(files: tuple[str, ...], names: tuple[str, ...]) -> str:
    # Not memoized (torch's get_hash_for_files is, on the paths alone): a file edited in a long-lived process must
    # change the key, and hashing a few small files is cheap.
    h = hashlib.sha256(("kvpass:" + ",".join(names)).encode())
    for path in files:
        with open(path, "rb") as f:
            h.update(os.path.basename(path).encode() + b"\0" + f.read())  # not the install location
    return h.hexdigest()


class KVPassInductorPass(CustomGraphPass):
    """Runs ``kvpass.rewrite`` on Inductor's post-grad ATen graph (``post_grad_custom_pre_pass``)."""

    def __init__(self, patterns: Sequence | None = None, on_report: Callable | None = None):
        self.patterns = engine.resolve_patterns(patterns)
        self.on_report = on_report

    def __call__(self, graph: torch.fx.Graph) -> None:
        gm = graph.owning_module
        _, report = engine.rewrite(gm, patterns=self.patterns)
        if self.on_report is not None:  # every graph's report, an empty one too (as with an eager inner)
            self.on_report(report)

    def uuid(self) -> str:
        return _hash(catalogue_files(self.patterns), tuple(p.name for p in self.patterns))
