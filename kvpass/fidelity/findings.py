"""What :func:`kvpass.check` reports: :class:`Finding`, the :class:`CheckResult` list, the errors, the table."""

from __future__ import annotations

import dataclasses
from typing import Iterable

import torch
import torch.fx

from ..errors import KVPassError

__all__ = [
    "Finding", "CheckResult", "format_findings", "FidelityError", "CheckInputError", "ProgramLoadError",
    "CONSTANT_KV", "MUTATED_CONSTANT", "DANGLING_KV", "INPUT_FREE_KV",
]

#: ``Finding.kind`` of a tensor constant that reaches an attention's key or value.
CONSTANT_KV = "constant-kv"
#: ``Finding.kind`` of such a constant that the graph also writes in place (the strict-export host buffer).
MUTATED_CONSTANT = "mutated-constant"
#: ``Finding.kind`` of a computed K/V whose only use is a dangling ``detach`` chain.
DANGLING_KV = "dangling-kv"
#: ``Finding.kind`` of an attention key/value that depends on no token input and on no constant: it is the same
#: for every input (for example zeros made in the graph, or a buffer the program never writes).
INPUT_FREE_KV = "input-free-kv"


#: what each kind of finding means for the user's program, in plain words (``Finding.meaning``)
MEANINGS = {
    CONSTANT_KV: "attention reads K/V frozen into the program as a constant: every run attends over the values "
                 "seen while it was captured, not over this run's tokens",
    MUTATED_CONSTANT: "attention reads a K/V buffer frozen into the program as a constant that the program also "
                      "writes: it starts from the capture's values, not from an empty cache",
    DANGLING_KV: "the K/V this line computes never reaches attention in the captured program (its copy to the "
                 "cache was cut off, e.g. by a trip through numpy): attention reads stale or zero K/V instead",
    INPUT_FREE_KV: "attention reads K/V that do not depend on the tokens at all (the same for every input)",
}


class CheckInputError(KVPassError, TypeError):
    """:func:`check` was given something that is neither a GraphModule, an ExportedProgram nor a path."""


class ProgramLoadError(KVPassError, OSError):
    """A ``.pt2`` path given to :func:`kvpass.check` is missing, is not a readable PT2 archive, or breaks a limit
    of :class:`kvpass.fidelity.archive.Limits` (or, with ``trusted=True``, ``torch.export.load`` fails).

    ``path`` is the path as given, ``reason`` a one-line cause naming the member or node.
    """

    def __init__(self, path: str, reason: str):
        self.path, self.reason = path, reason
        super().__init__(f"kvpass.check({path!r}): cannot read it: {reason}")


class FidelityError(KVPassError):
    """Raised by :func:`require_faithful` when a graph has K/V that do not come from the computation.

    ``findings`` holds the :class:`Finding` objects; the message is their table.
    """

    def __init__(self, findings: list["Finding"], what: str = "graph"):
        self.findings = list(findings)
        super().__init__(
            f"{what} is not faithful: {len(self.findings)} K/V value(s) do not come from the computation\n"
            + format_findings(self.findings)
        )


@dataclasses.dataclass(frozen=True)
class Finding:
    """One K/V value that does not come from the computation.

    Attributes:
        kind: ``"constant-kv"``, ``"mutated-constant"``, ``"dangling-kv"`` or ``"input-free-kv"`` (see
            :mod:`kvpass.fidelity`).
        node: name of the graph node: the constant's ``get_attr``/placeholder, or the computed K/V left dangling.
        target: the constant's name (``_tensor_constant0``, ``lifted_tensor_4``, ``_captured_1``) or, for
            ``dangling-kv``, the op that computed the K/V.
        shape: the tensor's shape.
        dtype: the tensor's dtype (``None`` when unknown).
        all_zeros: ``True``/``False`` for a constant whose values are known; ``None`` when they are not (a
            FakeTensor constant, or a ``dangling-kv`` finding, which is not a constant).
        consumer: which attention input it reaches, for example ``"key of scaled_dot_product_attention
            (scaled_dot_product_attention_1) via cat (cat_3) (+2 more: key)"``: the first one found, the ``cat``
            it went through, how many other attention inputs it also reaches.
        source: the user's source line (``file:line in fn: code``) from ``node.meta["stack_trace"]``: of the
            constant's node, or of the first node on its way to the consumer that has one; ``"<unknown>"``
            when the capture recorded none (``make_fx`` needs ``record_stack_traces=True``).
        detail: anything else worth knowing (the in-place writes, the paired constant, the path).
        fx_node: the ``torch.fx.Node`` itself (not compared, not printed).
    """

    kind: str
    node: str
    target: str
    shape: tuple
    dtype: torch.dtype | None
    all_zeros: bool | None
    consumer: str
    source: str
    detail: str = ""
    fx_node: torch.fx.Node | None = dataclasses.field(default=None, compare=False, repr=False)

    @property
    def meaning(self) -> str:
        """What this finding means for the program, in plain words (see :data:`MEANINGS`)."""
        return MEANINGS.get(self.kind, "attention reads K/V that do not come from the computation")

    @property
    def values(self) -> str:
        """``"all zeros"``, ``"stale non-zero values"`` or ``"values unknown"``."""
        if self.kind == DANGLING_KV:
            return "computed, disconnected"
        if self.kind == INPUT_FREE_KV:
            return "same for every input"
        if self.all_zeros is None:
            return "values unknown"
        return "all zeros" if self.all_zeros else "stale non-zero values"

    def __str__(self) -> str:
        dtype = str(self.dtype).replace("torch.", "") if self.dtype is not None else "?"
        head = f"{self.kind}: {self.node}"
        if self.target and self.target != self.node:
            head += f" ({self.target})"
        text = (f"{head} {list(self.shape)} {dtype}, {self.values} -> {self.consumer}\n"
                f"    at {self.source}")
        if self.detail:
            text += f"\n    {self.detail}"
        return text



def format_findings(findings: Iterable[Finding]) -> str:
    """A fixed-width table of ``findings``, one row each, the user's source line last."""
    findings = list(findings)
    if not findings:
        return "no findings"
    rows = [("KIND", "NODE", "SHAPE", "DTYPE", "VALUES", "CONSUMER", "SOURCE")]
    for f in findings:
        node = f.node if not f.target or f.target == f.node else f"{f.node} ({f.target})"
        dtype = str(f.dtype).replace("torch.", "") if f.dtype is not None else "?"
        rows.append((f.kind, node, str(list(f.shape)), dtype, f.values, f.consumer, f.source))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:-1], widths)) + "  " + r[-1] for r in rows]
    return "\n".join(line.rstrip() for line in lines)




class CheckResult(list):
    """The findings of :func:`kvpass.check` (a ``list`` of :class:`Finding`), with what the check saw.

    Attributes:
        attentions: how many attention ops (SDPA-like ops, flex attention, ``Q @ K^T -> softmax -> @ V``) the
            program has; ``0`` means there was nothing to check, which is not the same as clean.
        not_inspected: parts of a file that were never loaded, one line each (pickled members, AOTInductor
            libraries), for example ``"data/sample_inputs/model.pt (pickled)"``.
        bytes_read: for a file, the bytes read from it (its directory, the JSON, reported constants' payloads).
    """

    def __init__(self, findings=(), attentions: int = 0, not_inspected: Iterable[str] = ()):
        super().__init__(findings)
        self.attentions = attentions
        self.not_inspected = list(not_inspected)
        self.bytes_read: int | None = None  # bytes read from a .pt2 file (None for an in-memory program)

    def summary(self) -> str:
        """One line: the number of findings, ``clean: ...`` or ``no attention found in this program``."""
        if self:
            return f"{len(self)} finding(s): K/V that the capture baked or disconnected"
        if self.attentions == 0:
            return "no attention found in this program: nothing to check"
        return "clean: every attention key/value comes from the computation"
