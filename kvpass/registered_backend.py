"""The object the ``torch_dynamo_backends`` entry point names: ``torch.compile(model, backend="kvpass")``.

Dynamo imports this module when ``torch.compile`` is called with ``backend="kvpass"``, before it traces anything.
That is the one moment a plain ``torch.compile`` lets kvpass change how Dynamo traces, so this module (and only
this one: ``import kvpass`` does not) makes ``np.pad`` of traced arrays capturable for the rest of the process
(:func:`kvpass.tracing.install_traceable_numpy`; same values as ``np.pad``, no graph break). Dynamo config that
changes specialization (one decode graph for every position) is not set process-wide: use :func:`kvpass.compile`.
"""

from __future__ import annotations

from .dynamo_backend import kvpass_backend
from .tracing import install_traceable_numpy

install_traceable_numpy()

__all__ = ["kvpass_backend"]
