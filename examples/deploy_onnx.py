"""Deploy the reference shared-KV decoder to ONNX Runtime with ``kvpass.export(..., cache="outputs")``.

Run it::

    python examples/deploy_onnx.py [--out decoder.onnx] [--steps 8]

It writes the ONNX program (``decoder.onnx`` and its weights, ``decoder.onnx.data``) to a temporary folder that
it removes at the end; ``--out PATH`` keeps it at ``PATH``.

It exports one program for prefill and decode, converts it with ``torch.onnx.export`` as it is, and generates
greedily in ONNX Runtime from an empty cache: the loop below is all a user writes (the state goes out of one call
and into the next; nothing of kvpass is needed at run time). Every step is compared with the eager model; it ends
with ``PASS`` (exit 0) or ``FAIL: ...`` (exit 1). Needs ``pip install onnx onnxruntime onnxscript``.

Importing this file has no side effects; :func:`main` does the work.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch

import kvpass

try:  # run from a source checkout (python examples/deploy_onnx.py) or installed (kvpass.examples)
    from kvpass.examples.shared_kv_model import reference_model
except ImportError:  # pragma: no cover - kvpass installed without its examples
    from shared_kv_model import reference_model

__all__ = ["main", "generate", "zeros_for", "TOLERANCE"]

#: the largest |ONNX Runtime - eager| accepted (fp32, same math)
TOLERANCE = 1e-5

#: ONNX Runtime's input type names -> numpy dtypes (a cache holds float tensors and, e.g. in transformers'
#: caches, int64 counters: each input gets zeros of its own type)
ORT_DTYPES = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
              "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8,
              "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_}


def zeros_for(node_arg) -> np.ndarray:
    """Zeros of an ONNX Runtime input's shape and type (``sess.get_inputs()[i]``): its part of an empty cache."""
    return np.zeros(node_arg.shape, ORT_DTYPES[node_arg.type])


def generate(path: str, prompt: np.ndarray, steps: int) -> tuple[list[int], list[np.ndarray]]:
    """Greedy generation in ONNX Runtime: the user's loop. Returns the tokens and each step's logits."""
    import onnxruntime as ort

    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]  # input_ids, position, then the cache tensors
    cache = [zeros_for(i) for i in sess.get_inputs()[2:]]  # an empty cache, each input of its own type
    position, ids, tokens, all_logits = np.zeros(1, np.int64), prompt, [], []
    for _ in range(steps + 1):
        logits, position, *cache = sess.run(None, dict(zip(names, [ids, position, *cache])))
        all_logits.append(logits)
        ids = logits[-1:].argmax(-1).reshape(1, 1)
        tokens.append(int(ids[0, 0]))
    return tokens[:steps], all_logits  # the tokens fed back (the last call's argmax is not)


def main(out: str | None = None, steps: int = 8, seed: int = 0, verbose: bool = True, temporary: bool = False) -> dict:
    """Export, convert, generate in ONNX Runtime and compare with eager; ``result["failures"]`` lists what went
    wrong (empty: PASS). ``out=None`` writes the ONNX program to a temporary folder, removed at the end."""
    if out is None:
        with tempfile.TemporaryDirectory(prefix="kvpass-onnx-") as tmp:
            return main(os.path.join(tmp, "decoder.onnx"), steps, seed, verbose, temporary=True)
    say = print if verbose else (lambda *a, **k: None)
    t0 = time.perf_counter()

    def progress(msg):
        if verbose:
            print(f"  ... {msg} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)

    progress("kvpass.export(cache='outputs'): one program for prefill and decode")
    model = reference_model(seed=seed)
    max_len = model.config.max_len
    prompt = torch.randint(0, model.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(seed + 1))
    model.reset()
    ep = kvpass.export(model, (prompt,), cache="outputs", positions="pos",
                       dynamic_shapes={"input_ids": {1: torch.export.Dim("T", min=1, max=max_len - 1)}})
    progress("torch.onnx.export (the slow part: a minute or more)")
    torch.onnx.export(ep, f=out, dynamo=True, verbose=False)
    say(f"kvpass.export(cache='outputs') -> torch.onnx.export -> {out}"
        + (" (a temporary folder, removed at the end; --out PATH keeps the program)" if temporary else ""))

    progress("generating in ONNX Runtime, then comparing with eager")
    tokens, got = generate(out, prompt.numpy(), steps)
    model.reset()
    with torch.no_grad():
        want = [model(prompt)] + [model(torch.tensor([[t]])) for t in tokens]
    errors = [float(np.abs(g - w.numpy()).max()) for g, w in zip(got, want)]
    say(f"ONNX Runtime: prefill 8 + {steps} greedy decode steps from an empty cache, tokens {tokens}")
    say(f"max |onnxruntime - eager| per step = [{', '.join(f'{e:.1e}' for e in errors)}]")
    failures = [] if max(errors) <= TOLERANCE else [f"ONNX Runtime and eager differ by {max(errors):.1e}"]
    say("PASS" if not failures else f"FAIL: {'; '.join(failures)}")
    return {"tokens": tokens, "errors": errors, "failures": failures, "path": out}


def cli(argv=None) -> int:
    """Command-line entry point: exit status 0 on PASS, 1 on FAIL."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None,
                        help="keep the ONNX program at this path (default: a temporary folder, removed at the end)")
    parser.add_argument("--steps", type=int, default=8, help="greedy decode steps after the prompt")
    args = parser.parse_args(argv)
    return 1 if main(out=args.out, steps=args.steps)["failures"] else 0


if __name__ == "__main__":
    sys.exit(cli())
