"""Deploy the reference shared-KV decoder to ExecuTorch with ``kvpass.export(..., cache="outputs")``.

Run it::

    python examples/deploy_executorch.py [--out decoder.pte] [--steps 8]

It exports one program for prefill and decode, lowers it with ``to_edge(...).to_executorch()`` as it is into one
``.pte`` with a ``prefill`` and a ``decode`` method (portable kernels), and generates greedily in the ExecuTorch
runtime from an empty cache: the loop below is all a user writes (the state goes out of one call and into the
next; nothing of kvpass is needed at run time). Every step is compared with the eager model; it ends with ``PASS``
(exit 0) or ``FAIL: ...`` (exit 1). Needs ``pip install executorch``; without it, it says so and exits 0.

Importing this file has no side effects; :func:`main` does the work.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import sys

import torch

import kvpass

try:  # run from a source checkout (python examples/deploy_executorch.py) or installed (kvpass.examples)
    from kvpass.examples.shared_kv_model import reference_model
except ImportError:  # pragma: no cover - kvpass installed without its examples
    from shared_kv_model import reference_model

__all__ = ["main", "lower", "generate", "TOLERANCE"]

#: the largest |ExecuTorch - eager| accepted (fp32, same math)
TOLERANCE = 1e-5


def lower(ep: torch.export.ExportedProgram, out: str) -> None:
    """One ``.pte`` whose ``prefill`` and ``decode`` methods are both ``ep``. Each method is lowered from its own
    copy (``torch.export.load``): ExecuTorch 1.5.1's ``to_edge`` fails with ``PendingUnbackedSymbolNotFound`` when
    one in-memory program is given for two methods (they share one ShapeEnv)."""
    from executorch.exir import to_edge

    saved = io.BytesIO()
    torch.export.save(ep, saved)
    methods = {name: torch.export.load(io.BytesIO(saved.getvalue())) for name in ("prefill", "decode")}
    with open(out, "wb") as f:
        f.write(to_edge(methods).to_executorch().buffer)


def generate(path: str, prompt: torch.Tensor, steps: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy generation in the ExecuTorch runtime: the user's loop. Returns the tokens and each step's logits."""
    from executorch.runtime import Runtime

    program = Runtime.get().load_program(path)
    prefill, decode = program.load_method("prefill"), program.load_method("decode")
    meta = decode.metadata  # input_ids, position, then the cache tensors
    cache = [torch.zeros(tuple(meta.input_tensor_meta(i).sizes())) for i in range(2, meta.num_inputs())]  # empty
    position, ids, tokens, all_logits = torch.zeros(1, dtype=torch.int64), prompt, [], []
    for _ in range(steps + 1):
        method = prefill if ids.shape[1] > 1 else decode
        logits, position, *cache = method.execute([ids, position, *cache])
        all_logits.append(logits)
        ids = logits[-1:].argmax(-1).reshape(1, 1)
        tokens.append(int(ids[0, 0]))
    return tokens[:steps], all_logits  # the tokens fed back (the last call's argmax is not)


def main(out: str = "decoder.pte", steps: int = 8, seed: int = 0, verbose: bool = True) -> dict:
    """Export, lower, generate in ExecuTorch and compare with eager; ``result["failures"]`` lists what went wrong
    (empty: PASS); ``result["skipped"]`` is set when ExecuTorch is not installed."""
    say = print if verbose else (lambda *a, **k: None)
    if importlib.util.find_spec("executorch") is None:
        say("SKIP: ExecuTorch is not installed (pip install executorch); nothing was run")
        return {"skipped": True, "failures": []}
    model = reference_model(seed=seed)
    max_len = model.config.max_len
    prompt = torch.randint(0, model.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(seed + 1))
    model.reset()
    ep = kvpass.export(model, (prompt,), cache="outputs", positions="pos",
                       dynamic_shapes={"input_ids": {1: torch.export.Dim("T", min=1, max=max_len - 1)}})
    lower(ep, out)
    say(f"kvpass.export(cache='outputs') -> to_edge(prefill, decode).to_executorch() -> {out}")

    tokens, got = generate(out, prompt, steps)
    model.reset()
    with torch.no_grad():
        want = [model(prompt)] + [model(torch.tensor([[t]])) for t in tokens]
    errors = [float((g - w).abs().max()) for g, w in zip(got, want)]
    say(f"ExecuTorch (portable): prefill 8 + {steps} greedy decode steps from an empty cache, tokens {tokens}")
    say(f"max |executorch - eager| per step = [{', '.join(f'{e:.1e}' for e in errors)}]")
    failures = [] if max(errors) <= TOLERANCE else [f"ExecuTorch and eager differ by {max(errors):.1e}"]
    say("PASS" if not failures else f"FAIL: {'; '.join(failures)}")
    return {"tokens": tokens, "errors": errors, "failures": failures, "path": out, "skipped": False}


def cli(argv=None) -> int:
    """Command-line entry point: exit status 0 on PASS (or when ExecuTorch is not installed), 1 on FAIL."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="decoder.pte", help="where to write the ExecuTorch program")
    parser.add_argument("--steps", type=int, default=8, help="greedy decode steps after the prompt")
    args = parser.parse_args(argv)
    return 1 if main(out=args.out, steps=args.steps)["failures"] else 0


if __name__ == "__main__":
    sys.exit(cli())
