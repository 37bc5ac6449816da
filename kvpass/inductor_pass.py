"""kvpass inside Inductor: the pattern catalogue as a post-grad ``CustomGraphPass`` on the ATen graph.

Inductor caches compiled graphs (the FX graph cache) under a key that includes each custom pass's ``uuid()``.
A raw callable has no uuid and makes Inductor bypass the cache; a uuid that did not change with the patterns would
serve code compiled by an older catalogue. Ours hashes the source of every kvpass module the pass can run:
the engine and every selected rule, and every kvpass module those import, found by reading their import
statements (function-level imports included) to a fixed point, so a new helper module changes the key the day
a rule imports it; plus the selected rule names.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
import os
from typing import Callable, Sequence

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass

from . import engine

__all__ = ["KVPassInductorPass", "catalogue_files"]


def catalogue_files(patterns: Sequence) -> tuple[str, ...]:
    """The source files whose contents decide what the pass does: the engine, the rules and every kvpass module
    they import, directly or not (PyTorch's caches key a custom op the rules emit on its name, not on its
    decomposition, so the store ops' lowering is among them through ``store_loop``'s import)."""
    roots = [engine.__name__] + [type(p).__module__ for p in patterns]
    return tuple(sorted(f for f in (_source_of(m) for m in _kvpass_imports(roots)) if f))


def _source_of(module: str) -> str | None:
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, AttributeError, ValueError):  # ``from .engine import rewrite``: a name, not a module
        return None
    return spec.origin if spec is not None and spec.origin and spec.origin.endswith(".py") else None


def _kvpass_imports(roots: Sequence[str]) -> set[str]:
    """``roots`` and every ``kvpass`` module reachable from them through ``import`` statements (anywhere in the
    module: kvpass imports lazily inside functions), packages' ``__init__`` included. Over-inclusion only costs a
    cache miss; a module left out could serve a stale compile."""
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name in seen or (name not in roots and not (name == "kvpass" or name.startswith("kvpass."))):
            continue  # a root is hashed whatever its package (a user's own rule); below it, only kvpass
        path = _source_of(name)
        if path is None:
            continue
        seen.add(name)
        st = os.stat(path)
        todo += _imports_of(name, path, st.st_mtime_ns, st.st_size)
        parent = name.rpartition(".")[0]
        if parent:
            todo.append(parent)  # importing kvpass.x runs kvpass/__init__.py first
    return seen


@functools.lru_cache(maxsize=None)
def _imports_of(name: str, path: str, mtime_ns: int, size: int) -> tuple[str, ...]:
    """The absolute names ``import`` statements in module ``name`` (file ``path``) mention, modules or not.
    Cached per file version (``mtime_ns``, ``size``): an edited file is read again."""
    is_package = os.path.basename(path) == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[:len(parts) - (node.level - 1)]
                base = ".".join(parts + ([base] if base else []))
            out.append(base)
            out += [f"{base}.{alias.name}" for alias in node.names]  # ``from . import rules``: a module
    return tuple(out)


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
