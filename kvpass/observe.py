"""What kvpass shows of its work, through PyTorch's own channels.

- ``TORCH_LOGS="+kvpass"``: the report and the functional graph before and after the rewrite;
  ``TORCH_LOGS="kvpass"``: the report alone. ``kvpass`` is a log registered with ``torch._logging`` (so
  ``torch._logging.set_logs(kvpass=logging.DEBUG)`` works too); in the environment variable torch reads it as
  the module name, which is why it works although torch parses ``TORCH_LOGS`` before kvpass is imported (a
  separate artifact name would be rejected at ``import torch``);
- ``tlparse``: the report and both graphs as ``trace_structured`` artifacts (``kvpass_report``,
  ``kvpass_before``, ``kvpass_after``);
- ``torch._dynamo.utils.counters["kvpass"]``: matches per rule, and ``skipped`` / ``aliased_inputs_fallback``.
"""

from __future__ import annotations

import logging


__all__ = ["emit", "count", "log"]

_registered = False


def _register() -> None:
    global _registered
    if _registered:
        return
    from torch._logging._internal import register_log

    try:
        register_log("kvpass", "kvpass")
    except Exception:  # noqa: BLE001 - already registered by another import of this module
        pass
    _registered = True


_register()
log = logging.getLogger("kvpass")


def count(key: str, n: int = 1) -> None:
    """Add ``n`` to ``torch._dynamo.utils.counters["kvpass"][key]``."""
    from torch._dynamo.utils import counters

    counters["kvpass"][key] += n


def emit(report, before, after) -> None:
    """Log the report (``kvpass`` at INFO) and the graphs before and after (``kvpass`` at DEBUG), emit all three as
    tlparse artifacts, and count matches per rule and skips."""
    from torch._logging import trace_structured

    for name, n in report.counts.items():
        if n:
            count(name, n)
    if report.skips:
        count("skipped", len(report.skips))
    if not (report.matches or report.skips):
        return
    text = report.format()
    log.info("kvpass rewrite:\n%s", text)
    log.debug("kvpass: graph before the rewrite\n%s\nkvpass: graph after the rewrite\n%s",
                     _code(before), _code(after))
    trace_structured("artifact", metadata_fn=lambda: {"name": "kvpass_report", "encoding": "string"},
                     payload_fn=lambda: text)
    trace_structured("artifact", metadata_fn=lambda: {"name": "kvpass_before", "encoding": "string"},
                     payload_fn=lambda: _code(before))
    trace_structured("artifact", metadata_fn=lambda: {"name": "kvpass_after", "encoding": "string"},
                     payload_fn=lambda: _code(after))


def _code(gm) -> str:
    try:
        return gm.print_readable(print_output=False)
    except Exception:  # noqa: BLE001 - logging must never break a compile
        return str(getattr(gm, "graph", gm))
