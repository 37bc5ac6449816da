"""The object the ``torch_dynamo_backends`` entry point names: ``torch.compile(model, backend="kvpass")``.

Dynamo imports this module when ``torch.compile`` is called with ``backend="kvpass"``, before it traces anything.
That is the one moment a plain ``torch.compile`` lets kvpass change how Dynamo traces (a backend callback only
runs after a trace, and ``torch.compile`` drops a backend's ``backend_ctx_ctor``), so naming the backend puts in
force, for the rest of the process, what :func:`kvpass.compile` scopes to each call
(:data:`kvpass.tracing.DYNAMO_CONFIG` and the traceable ``np.pad``):

- ``torch._dynamo.config.allow_unspec_int_on_nn_module = True``: a cache position kept as an int attribute
  reached from the module is otherwise specialized, one graph per decode position until Dynamo's recompile limit,
  then eager (measured: 8 graphs and 0.48x stock Inductor's decode speed; with it, 2 graphs);
- Dynamo traces ``np.pad`` of traced arrays through :func:`kvpass.tracing.traceable_np_pad` (same values).

``import kvpass`` alone changes nothing; use :func:`kvpass.compile` to keep both scoped to the compiled model.
"""

from __future__ import annotations

from . import dynamo_backend
from .tracing import install_process_wide

install_process_wide()


def kvpass_backend(gm, example_inputs, **kwargs):
    """The registered ``"kvpass"`` backend: :func:`kvpass.dynamo_backend.kvpass_backend`, with the process-wide
    tracing settings re-asserted (idempotent) so that the traces after this one get them even if something reset
    them since this module was imported. ``mode=``/``options=`` from ``torch.compile`` reach Inductor."""
    install_process_wide()
    return dynamo_backend.kvpass_backend(gm, example_inputs, **kwargs)


__all__ = ["kvpass_backend"]
