"""Trace-fidelity check: find K/V that a capture baked into the graph instead of computing it.

A decoder whose KV cache round-trips through host memory (``k.detach().cpu().numpy()`` into a preallocated
array, ``torch.from_numpy(buf[:, :pos])`` back) runs fine eagerly, but a tracer cannot see the host side: the
buffer it reads back is captured as a *tensor constant* holding whatever it held at trace time (zeros, or the
trace-time K/V), and the K/V the graph computed is cut off. :func:`check` finds that in a graph a user hands it.

**How** (:mod:`.dataflow`): every value gets two facts, whether it depends on the program's *token inputs*
(user inputs) and which *sources* (tensor constants; buffers) it carries elements of, through every op, through
higher-order-op bodies, and through memory (an in-place write into a view of a constant makes every read of
that constant carry what was written). Then, for each attention's key and value (SDPA-like ops by their schema's
``query``/``key``/``value`` names, flex attention, the ``Q @ K^T -> softmax`` and ``softmax @ V`` matmuls):

``constant-kv``
    it carries elements of a tensor constant (``get_attr`` of ``_tensor_constant*``, a lifted
    ``CONSTANT_TENSOR``, a captured constant lifted as a buffer) of more than one floating-point element, or of
    a buffer that the program never writes from its token inputs;
``mutated-constant``
    such a constant that the program also writes in place (the host buffer of ``torch.export(strict=True)``);
    also reported, with no attention read, for a constant written with values computed from the tokens;
``input-free-kv``
    it depends on no token input at all and carries no such constant (zeros made in the graph);
``dangling-kv``
    a computed K/V whose only use is a dangling ``detach`` chain (``alias`` from torch 2.14 on) while a
    same-shaped constant feeds the attention instead (``make_fx`` real mode).

A constant concatenated with a computed K/V along a non-last dim (rank 3+) is a ``constant-kv`` even when no
attention is in the graph.

**The rule that keeps rotary tables, masks and weights quiet** (and catches a baked K through ``flip``, ``roll``
or a multiply by a rotary table): *a constant is K/V data only where its elements are placed into the value,
not where it is a coefficient*. An op that mixes its inputs arithmetically (elementwise arithmetic, matmul /
linear / einsum, norms, attention) treats an input that does not depend on the tokens as a coefficient when
another input does: ``k * cos`` carries ``k``'s sources, not ``cos``; ``x @ W_k`` carries nothing of ``W_k``.
When no input of such an op depends on the tokens, the operands broadcast into the result (a ``[T, d]`` table
times a ``[1, H, T, d]`` baked K) are the coefficients. Every other op (views, copies, ``cat``, scatters and
in-place writes, ``flip``, ``roll``, ``where``, and any op kvpass does not know) places elements and carries
all its inputs, so a new op can add findings but never hide one. Masks reach the scores, not K/V; index-like
arguments (``index``, ``mask``, ``condition``) carry no elements; parameters and buffers written from the tokens
(a ``StaticCache`` exported as buffers) are not sources; empty and one-element constants (an empty history, a
position counter) and integer/bool constants are never K/V.

**Files** (:mod:`.archive`): a ``.pt2`` path is read by a reader that executes nothing from the file (``zipfile``
+ ``json`` + ``numpy``), within :class:`~kvpass.fidelity.archive.Limits`; ``torch.export.load`` runs only with
``trusted=True``. ``check`` only reads graphs and imports no rewrite pattern, so ``kvpass.export`` (and anything
else) can call :func:`require_faithful` on its result.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
import torch.fx

from .archive import Limits, read_archive
from .dataflow import analyse
from .findings import (
    CONSTANT_KV, DANGLING_KV, INPUT_FREE_KV, MUTATED_CONSTANT, CheckInputError, CheckResult, FidelityError,
    Finding, ProgramLoadError, format_findings,
)
from .graph import Program, from_exported_program, from_graph_module
from .rules import attentions, run_rules

__all__ = [
    "check", "Finding", "CheckResult", "format_findings", "require_faithful", "Limits",
    "FidelityError", "CheckInputError", "ProgramLoadError",
    "CONSTANT_KV", "MUTATED_CONSTANT", "DANGLING_KV", "INPUT_FREE_KV",
]


def check(obj: Any, *, trusted: bool = False, limits: Limits | None = None) -> CheckResult:
    """Find K/V values in a captured graph that do not come from the computation.

    Args:
        obj: a ``torch.fx.GraphModule`` (``make_fx``, ``torch.jit``-style tracers, ``ep.module()``, Dynamo), a
            ``torch.export.ExportedProgram``, or a path (``str``/``os.PathLike``) to a ``.pt2`` file written by
            ``torch.export.save``.
        trusted: for a path only: load it with ``torch.export.load`` (which runs pickled code and AOTInductor
            libraries from the file) instead of the reader that executes nothing. Only for files you made.
        limits: for a path only: the bounds on the archive (:class:`~kvpass.fidelity.archive.Limits`; the
            defaults when ``None``).

    Returns:
        A :class:`CheckResult`: the findings in graph order (a list; ``[]`` when every attention key/value is
        connected to the computation), with ``.attentions`` (0: no attention to check) and ``.not_inspected``.

    Raises:
        CheckInputError: ``obj`` is of another type.
        ProgramLoadError: the path is missing, is not a readable PT2 archive, or breaks a limit.
    """
    not_inspected: list[str] = []
    if isinstance(obj, (str, os.PathLike)):
        if trusted:
            obj = _load_trusted(obj)
        else:
            programs, reader = read_archive(obj, limits)
            with reader:
                try:
                    results = [_run(p) for p in programs]
                except ProgramLoadError:
                    raise
                except (MemoryError, RecursionError, Exception) as e:  # noqa: BLE001 - a hostile file: one line
                    raise ProgramLoadError(os.fspath(obj), f"cannot analyse its graph ({type(e).__name__}: "
                                                           f"{_first_line(str(e))[:120]})") from None
            out = CheckResult([f for r in results for f in r], sum(r.attentions for r in results),
                              reader.not_inspected)
            out.bytes_read = reader.bytes_read
            return out
    if isinstance(obj, torch.export.ExportedProgram):
        return _run(from_exported_program(obj), not_inspected)
    if isinstance(obj, torch.fx.GraphModule):
        return _run(from_graph_module(obj), not_inspected)
    hint = " (capture it first: make_fx, torch.export.export)" if isinstance(obj, torch.nn.Module) else ""
    raise CheckInputError(
        f"kvpass.check(obj): expected a torch.fx.GraphModule, a torch.export.ExportedProgram or a path to a "
        f".pt2 file, got {type(obj).__name__}{hint}"
    )


def _run(program: Program, not_inspected=()) -> CheckResult:
    atts = attentions(program)
    findings, count = run_rules(program, analyse(program, {a.op for a in atts}), atts)
    return CheckResult(findings, count, list(not_inspected) or program.not_inspected)


def require_faithful(obj: Any, what: str = "graph") -> None:
    """Run :func:`check` on ``obj`` and raise :class:`FidelityError` if it has findings (for ``kvpass.export``)."""
    findings = check(obj)
    if findings:
        raise FidelityError(findings, what)


class _CollectLogs(logging.Handler):
    """Collects the one-line cause of records logged while ``torch.export.load`` runs."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.causes: list[str] = []

    def emit(self, record):
        exc = record.exc_info[1] if record.exc_info else None
        text = f"{type(exc).__name__}: {_first_line(str(exc))}" if exc is not None else record.getMessage()
        self.causes.append(_first_line(text))


def _load_trusted(path) -> torch.export.ExportedProgram:
    """``torch.export.load`` (runs code from the file: only with ``trusted=True``), errors as one line."""
    shown = os.fspath(path)
    if not os.path.exists(shown):
        raise ProgramLoadError(shown, "no such file")
    if os.path.isdir(shown):
        raise ProgramLoadError(shown, "it is a directory, not a .pt2 file")
    # torch.export.load logs a whole traceback as a warning (then tries a legacy format) before it raises:
    # keep its cause for our one-line message, and keep the traceback off the user's terminal.
    logger = logging.getLogger("torch.export")
    handler = _CollectLogs()
    saved = (logger.handlers[:], logger.propagate)
    logger.handlers[:] = [handler]
    logger.propagate = False
    try:
        ep = torch.export.load(shown)
    except Exception as e:  # noqa: BLE001 - any failure to load is the same user-facing error
        cause = next((c for c in handler.causes if c), "") or f"{type(e).__name__}: {_first_line(str(e))}"
        raise ProgramLoadError(shown, f"torch.export.load failed: {cause}") from e
    finally:
        logger.handlers[:] = saved[0]
        logger.propagate = saved[1]
    if not isinstance(ep, torch.export.ExportedProgram):  # pragma: no cover - torch contract
        raise ProgramLoadError(shown, f"it loaded as {type(ep).__name__}, not an ExportedProgram")
    return ep


def _first_line(text: str) -> str:
    """The first non-empty line of ``text``, cut after its first sentence when that is long."""
    line = next((line.strip() for line in text.splitlines() if line.strip()), "")
    if len(line) > 120 and ". " in line[20:]:
        line = line[: line.index(". ", 20) + 1]
    return line
