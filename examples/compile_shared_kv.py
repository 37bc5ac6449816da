"""The reference shared-KV decoder compiled with kvpass.

``kvpass.compile(model, backend=kvpass.backend(on_report=...))`` is ``torch.compile(model, backend="kvpass")``
with the tracing settings scoped to the model, and a callback that receives each graph's rewrite report.

    python examples/compile_shared_kv.py [--steps 16]

Generates greedily from the same prompt eagerly and compiled, and prints the tokens, the compiled-graph count
and what kvpass rewrote (pattern and your source line); ends with ``PASS`` (exit 0) or ``FAIL: ...`` (exit 1).
"""

import argparse
import sys

import torch
import torch._dynamo.utils

import kvpass
from kvpass.examples.shared_kv_model import reference_model


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="the reference model compiled with kvpass")
    parser.add_argument("--steps", type=int, default=16, help="greedy decode steps after the prompt (default 16)")
    args = parser.parse_args(argv)
    prompt = torch.randint(0, 64, (8,), generator=torch.Generator().manual_seed(0))

    eager_model = reference_model(seed=1)
    want = eager_model.generate(prompt, args.steps)

    model = reference_model(seed=1)
    reports = []
    torch._dynamo.utils.counters.clear()
    compiled = kvpass.compile(model, backend=kvpass.backend(on_report=reports.append))
    got = model.generate(prompt, args.steps, step_fn=compiled)

    print(f"eager tokens:    {want.tolist()}")
    print(f"compiled tokens: {got.tolist()}")
    print(f"compiled graphs: {torch._dynamo.utils.counters['stats']['unique_graphs']} "
          f"(prefill, and one decode graph for every position)")
    print("what kvpass rewrote in the prefill graph:")
    print("  " + reports[0].format().replace("\n", "\n  "))
    same = torch.equal(got, want)
    print("tokens identical" if same else "TOKENS DIFFER")
    failures = ([] if same else ["compiled tokens differ from eager"]) + \
        ([] if reports and reports[0].matches else ["kvpass rewrote nothing in the prefill graph"])
    print("PASS" if not failures else f"FAIL: {'; '.join(failures)}")
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
