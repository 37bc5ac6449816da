"""Faithful ``torch.export`` of the reference shared-KV decoder with :func:`kvpass.export`.

Run it::

    python examples/faithful_export.py [--out prefill.pt2]

It writes the exported prefill program to ``--out`` (default ``prefill.pt2`` in the current directory) and prints
that path, so you can inspect it afterwards (``kvpass check prefill.pt2``); it ends with ``PASS`` (exit 0) or
``FAIL: ...`` (exit 1).

What it does, printing each step:

1. builds the reference model (``kv_shared_layers=3``: a padded, a shared and a read-only follower; sandwich
   norms) whose caches round-trip K/V through host numpy buffers;
2. shows the seed's bug: the stock ``make_fx`` capture bakes the K/V as constants (``kvpass.check`` finds them);
3. exports a prefill step from an empty cache with ``kvpass.export`` (cache buffers become mutable buffers of the
   program), saves it as ``.pt2`` at ``--out``, loads it back, checks it (no findings) and compares it with eager
   on fresh random tokens;
4. exports a one-token decode step with the positions and the cache state as inputs, and decodes a few tokens
   with it after an eager prefill, comparing every step with eager.

Importing this file has no side effects; :func:`main` does the work.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch

import kvpass

try:  # run from a source checkout (python examples/faithful_export.py) or installed (kvpass.examples)
    from kvpass.examples.shared_kv_model import SharedKVConfig, reference_model
except ImportError:  # pragma: no cover - kvpass installed without its examples
    from shared_kv_model import SharedKVConfig, reference_model

__all__ = ["main", "user_inputs", "TOLERANCE"]

#: the largest |exported - eager| accepted (fp32, same math)
TOLERANCE = 1e-4


def user_inputs(ep: torch.export.ExportedProgram) -> list[str]:
    """The names of ``ep``'s user inputs, in call order (the contract of :func:`kvpass.export`)."""
    kind = torch.export.graph_signature.InputKind.USER_INPUT
    return [spec.arg.name for spec in ep.graph_signature.input_specs if spec.kind == kind]


def main(seed: int = 0, prompt_len: int = 8, decode_steps: int = 4, verbose: bool = True,
         out: str = "prefill.pt2") -> dict:
    """Run the demonstration, saving the exported prefill to ``out``; return the numbers it printed (max abs
    errors, finding counts, the path) and ``result["failures"]``, the list of what went wrong (empty: PASS)."""
    say = print if verbose else (lambda *a, **k: None)
    config = SharedKVConfig()
    model = reference_model(config, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    say(f"reference model: {config.num_layers} layers, kv_shared_layers={config.kv_shared_layers} "
        f"(followers: {', '.join(config.follower_caches)}), sandwich_norms={config.sandwich_norms}")
    result: dict = {}

    # -- the seed's bug: a stock capture bakes the host buffers as constants ---------------------------------
    from torch.fx.experimental.proxy_tensor import make_fx

    ids = torch.randint(0, config.vocab_size, (1, prompt_len), generator=gen)

    def step(input_ids):
        model.reset()
        return model(input_ids)

    with torch.no_grad():
        stock = make_fx(step, tracing_mode="real", record_stack_traces=True)(ids)
    findings = kvpass.check(stock)
    result["stock_findings"] = len(findings)
    say(f"\nstock make_fx capture: kvpass.check finds {len(findings)} K/V value(s) not from the computation, e.g.")
    first = next((f for f in findings if f.kind == "constant-kv"), findings[0])
    say("  " + str(first).replace("\n", "\n  "))

    # -- prefill from an empty cache --------------------------------------------------------------------------
    model.reset()
    ep = kvpass.export(model, (ids,))
    buffers = [s.target for s in ep.graph_signature.input_specs if s.kind.name == "BUFFER"]
    say(f"\nkvpass.export(model, (input_ids,)): inputs {user_inputs(ep)}, cache buffers {buffers}")
    path = os.path.abspath(out)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.export.save(ep, path)
    result["path"] = path
    findings = kvpass.check(path)  # loads the .pt2 and checks it
    result["pt2_findings"] = len(findings)
    loaded = torch.export.load(path)
    say(f"saved the exported prefill to {path} ({os.path.getsize(path) // 1024} KiB) and loaded it back; "
        f"kvpass.check({os.path.basename(path)}) -> {findings}")
    fresh = torch.randint(0, config.vocab_size, (1, prompt_len), generator=gen)
    model.reset()
    with torch.no_grad():
        want = model(fresh)
        got = loaded.module()(fresh)
    result["prefill_err"] = (got - want).abs().max().item()
    say(f"prefill of {prompt_len} fresh random tokens: max |exported - eager| = {result['prefill_err']:.3g} "
        f"(logits up to {want.abs().max().item():.3g})")

    # -- decode with the cache state passed in ---------------------------------------------------------------
    model.reset()
    with torch.no_grad():
        model(torch.randint(0, config.vocab_size, (1, 2), generator=gen))  # an example state with history
    tok = torch.randint(0, config.vocab_size, (1, 1), generator=gen)
    decode = kvpass.export(model, (tok,), positions="pos", cache="inputs")
    names = user_inputs(decode)
    say(f"\nkvpass.export(model, (token,), positions='pos', cache='inputs'): inputs {names}")
    result["decode_findings"] = len(kvpass.check(decode))
    run = decode.module()
    model.reset()
    prompt = torch.randint(0, config.vocab_size, (1, prompt_len), generator=gen)
    with torch.no_grad():
        logits = model(prompt)  # eager prefill; its host buffers become the program's cache state
        state = {n: torch.from_numpy(np.array(_attr(model, n))) for n in names if n.endswith("_buf")}
        errs = []
        for _ in range(decode_steps):
            tok = logits[-1].argmax().reshape(1, 1)
            pos = {n: int(_attr(model, n)) for n in names if n.endswith("_pos")}
            got = run(tok, **state, **pos)  # writes the new K/V into `state` in place
            logits = model(tok)
            errs.append((got - logits).abs().max().item())
        state_err = max((state[n] - torch.from_numpy(_attr(model, n))).abs().max().item() for n in state)
    result["decode_errs"], result["state_err"] = errs, state_err
    say(f"{decode_steps} greedy decode steps after an eager prefill of {prompt_len}: max |exported - eager| per "
        f"step = {[f'{e:.3g}' for e in errs]}; cache state vs eager host buffers: {state_err:.3g}")

    failures = []
    if result["stock_findings"] == 0:
        failures.append("the stock make_fx capture was expected to bake K/V (kvpass.check found nothing)")
    if result["pt2_findings"] or result["decode_findings"]:
        failures.append(f"kvpass.check found {result['pt2_findings']} problem(s) in {path} and "
                        f"{result['decode_findings']} in the decode program")
    worst = max([result["prefill_err"], state_err, *errs])
    if not worst < TOLERANCE:  # also catches NaN
        failures.append(f"exported and eager differ by {worst:.3g} (tolerance {TOLERANCE:g})")
    result["failures"] = failures
    return result


def cli(argv: list[str] | None = None) -> int:
    """``python examples/faithful_export.py [--out PATH]``: exit 0 and ``PASS``, or exit 1 and ``FAIL: ...``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0].strip("`"))
    parser.add_argument("--out", default="prefill.pt2",
                        help="where to write the exported prefill program (default: prefill.pt2 in the current "
                             "directory); check it later with `kvpass check PATH`")
    parser.add_argument("--seed", type=int, default=0, help="random seed for the weights and tokens (default 0)")
    args = parser.parse_args(argv)
    result = main(seed=args.seed, out=args.out)
    print(f"\nexported prefill program: {result['path']}")
    if result["failures"]:
        print("FAIL: " + "; ".join(result["failures"]))
        return 1
    print("PASS")
    return 0


def _attr(model, name: str):
    """``model.caches[i].<attr>`` from an input name such as ``caches_3_pos`` or ``caches_0_k_buf``."""
    _, index, attr = name.split("_", 2)
    return getattr(model.caches[int(index)], attr)


if __name__ == "__main__":
    sys.exit(cli())
