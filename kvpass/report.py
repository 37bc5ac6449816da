"""What a rewrite did: one :class:`Match` per rewrite, one :class:`Skip` per candidate a rule left alone (and why),
gathered in a :class:`Report`. Rules write to it; the pass manager (``kvpass.engine``) merges, logs and returns it.
It imports nothing of kvpass but the error helpers, so rules depend on it, not on the engine."""

from __future__ import annotations

import dataclasses
from typing import Iterable

import torch
import torch.fx

from .errors import user_source_line

__all__ = ["Match", "Skip", "Report"]


@dataclasses.dataclass
class Match:
    """One rewrite: the pattern, the nodes it replaced (by name, before the rewrite) and the user's line."""

    pattern: str
    nodes: list[str]
    source: str
    detail: str = ""


@dataclasses.dataclass
class Skip:
    """A candidate the pattern left unchanged, and why (it could not prove the rewrite safe)."""

    pattern: str
    node: str
    source: str
    reason: str


@dataclasses.dataclass
class Report:
    """What :func:`rewrite` did: ``matches`` (one per rewrite), ``skips`` (candidates left alone, with reasons),
    ``counts`` (matches per pattern, every pattern that ran has an entry)."""

    matches: list[Match] = dataclasses.field(default_factory=list)
    skips: list[Skip] = dataclasses.field(default_factory=list)
    counts: dict[str, int] = dataclasses.field(default_factory=dict)
    #: the functional ATen graph the rules started from (``None`` until :func:`rewrite` ran)
    before: object = dataclasses.field(default=None, repr=False, compare=False)

    def add_match(self, pattern: str, nodes: Iterable[torch.fx.Node], anchor: torch.fx.Node | None = None,
                  detail: str = "") -> None:
        nodes = list(nodes)
        anchor = anchor if anchor is not None else (nodes[0] if nodes else None)
        self.matches.append(Match(pattern, [n.name for n in nodes], user_source_line(anchor), detail))

    def add_skip(self, pattern: str, node: torch.fx.Node, reason: str) -> None:
        self.skips.append(Skip(pattern, node.name, user_source_line(node), reason))

    def extend(self, other: "Report") -> None:
        self.matches += other.matches
        self.skips += other.skips
        for k, v in other.counts.items():
            self.counts[k] = self.counts.get(k, 0) + v

    def __bool__(self) -> bool:
        return bool(self.matches)

    def format(self) -> str:
        """A readable table of matches and skips."""
        if not self.matches and not self.skips:
            return "kvpass: no host round trips found"
        rows = [f"{m.pattern:<18} {m.source}" + (f"  [{m.detail}]" if m.detail else "") for m in self.matches]
        rows += [f"{'skipped ' + s.pattern:<18} {s.source}: {s.reason}" for s in self.skips]
        return "\n".join(rows)
