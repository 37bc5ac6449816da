"""kvpass's exceptions. Every error kvpass raises on purpose is a :class:`KVPassError`."""

from __future__ import annotations

import re

import torch.fx


class KVPassError(Exception):
    """Base class of kvpass's errors; the message names the argument or graph node and the user's source line."""


class KVPassWarning(UserWarning):
    """Something kvpass cannot rewrite or compile as asked (a ``.tolist()`` round trip that will recompile, graph
    inputs over the same host memory that run as traced); the message says why and the fix."""


class RewriteMismatch(KVPassError):
    """``kvpass.rewrite(..., verify=True)`` ran the graph before and after the rewrite and the outputs differ."""


class PatternError(KVPassError, ValueError):
    """An unknown pattern name, or a pattern object that does not follow the pattern API."""


def user_source_line(node: torch.fx.Node | None) -> str:
    """The innermost user frame of ``node.meta["stack_trace"]`` as ``file:line in fn: code``, or ``"<unknown>"``.

    Dynamo and export record the Python stack that created each node; its last ``File ...`` entry is the
    user's line (frames of torch itself are skipped).
    """
    if node is None:
        return "<unknown>"
    return source_line_of_trace(node.meta.get("stack_trace"))


def source_line_of_trace(trace: str | None) -> str:
    """:func:`user_source_line` of a ``stack_trace`` string (``"<unknown>"`` for none)."""
    trace = trace or ""
    frames = []
    lines = trace.strip().splitlines()
    for i, line in enumerate(lines):
        line = line.strip()
        if line.startswith("File "):
            code = lines[i + 1].strip() if i + 1 < len(lines) and not lines[i + 1].strip().startswith("File ") else ""
            frames.append((line, code))
    user = [f for f in frames if "/torch/" not in f[0]] or frames
    if not user:
        return "<unknown>"
    loc, code = user[-1]
    # 'File "/a/b.py", line 12, in fn'  ->  'b.py:12 in fn'
    try:
        path = loc.split('"')[1]
        rest = loc.split('"', 2)[2]  # ', line 12, in fn'
        lineno = rest.split("line ")[1].split(",")[0]
        fn = rest.split(" in ", 1)[1] if " in " in rest else "?"
        # Dynamo names the code after a graph break torch_dynamo_resume_in_<fn>_at_<line>
        fn = re.sub(r"^torch_dynamo_resume_in_(.+)_at_\d+$", r"\1", fn)
        short = "/".join(path.split("/")[-2:])
        text = f"{short}:{lineno} in {fn}"
    except IndexError:
        text = loc
    return f"{text}: {code}" if code else text
