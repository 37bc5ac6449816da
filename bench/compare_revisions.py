"""Decode-step latency and compile time of the reference model under two kvpass source trees, side by side.

    git worktree add /tmp/kvpass-old <commit>
    python bench/compare_revisions.py /tmp/kvpass-old . --rounds 5 --steps 40

Each round runs one fresh process per tree, alternating (old, new, old, new ...), so both see the same machine
load; every process does the same thing: ``kvpass.compile(reference_model())`` with Inductor, a prefill of 8
tokens, the same warm-up decode steps, then ``--steps`` timed decode steps (``time.perf_counter`` around each
call, GC off). It reports per tree the median step of each round, the compile time (prefill + first decode
step, both compiles), and per round the ratio new/old; the summary is the median and the min-max of the
per-round ratios. A process loads ``kvpass``, ``kvpass.patterns`` and ``kvpass.examples`` from its tree (an
editable install of another tree is bypassed).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CHILD = r"""
import gc, importlib.util, json, os, sys, time
tree = os.path.abspath(sys.argv[1]); steps = int(sys.argv[2]); warmup = int(sys.argv[3])
sys.path.insert(0, tree)
import kvpass
for name, sub in (("kvpass.patterns", "patterns"), ("kvpass.examples", "examples")):
    spec = importlib.util.spec_from_file_location(name, os.path.join(tree, sub, "__init__.py"),
                                                  submodule_search_locations=[os.path.join(tree, sub)])
    mod = importlib.util.module_from_spec(spec); sys.modules[name] = mod; spec.loader.exec_module(mod)
assert kvpass.__file__.startswith(tree), kvpass.__file__
import torch
torch.set_num_threads(1)
from kvpass.examples.shared_kv_model import reference_model
g = torch.Generator().manual_seed(0)
model = reference_model(seed=1)
compiled = kvpass.compile(model)
times = []
with torch.no_grad():
    t0 = time.perf_counter()
    compiled(torch.randint(0, 64, (1, 8), generator=g))
    compiled(torch.randint(0, 64, (1, 1), generator=g))
    compile_s = time.perf_counter() - t0
    for _ in range(warmup):
        compiled(torch.randint(0, 64, (1, 1), generator=g))
    gc.collect(); gc.disable()
    for _ in range(steps):
        tok = torch.randint(0, 64, (1, 1), generator=g)
        t = time.perf_counter(); compiled(tok); times.append(time.perf_counter() - t)
    gc.enable()
times.sort()
print(json.dumps({"median_ms": 1e3 * times[len(times) // 2], "compile_s": compile_s}))
"""


def run(tree, steps, warmup, cache_dir):
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache_dir)
    out = subprocess.run([sys.executable, "-c", CHILD, tree, str(steps), str(warmup)], capture_output=True,
                         text=True, env=env, timeout=1200)
    if out.returncode != 0:
        raise SystemExit(f"{tree}: {out.stderr.strip().splitlines()[-1]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("old", help="source tree of the baseline (a git worktree)")
    p.add_argument("new", help="source tree to compare")
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds (one process per tree per round)")
    p.add_argument("--steps", type=int, default=40, help="timed decode steps per process")
    p.add_argument("--warmup", type=int, default=5, help="decode steps run before timing, the same for both")
    a = p.parse_args(argv)
    rows = {"old": [], "new": []}
    for r in range(a.rounds):
        for which in ("old", "new"):
            tree = getattr(a, which)
            # a fresh Inductor cache per process: compile time is the cold compile, for both trees alike
            rows[which].append(run(tree, a.steps, a.warmup, f"/tmp/kvpass-bench-cache-{which}-{r}"))
        o, n = rows["old"][-1], rows["new"][-1]
        print(f"round {r}: old {o['median_ms']:.3f} ms (compile {o['compile_s']:.1f} s), new {n['median_ms']:.3f} ms "
              f"(compile {n['compile_s']:.1f} s), new/old {n['median_ms'] / o['median_ms']:.3f}", flush=True)
    ratios = [n["median_ms"] / o["median_ms"] for o, n in zip(rows["old"], rows["new"])]
    cratios = [n["compile_s"] / o["compile_s"] for o, n in zip(rows["old"], rows["new"])]
    for which in ("old", "new"):
        ms = [x["median_ms"] for x in rows[which]]
        cs = [x["compile_s"] for x in rows[which]]
        print(f"{which}: decode step median {statistics.median(ms):.3f} ms (rounds {min(ms):.3f}-{max(ms):.3f}); "
              f"compile {statistics.median(cs):.1f} s ({min(cs):.1f}-{max(cs):.1f})")
    print(f"new/old decode step: median {statistics.median(ratios):.3f} (rounds {min(ratios):.3f}-{max(ratios):.3f}); "
          f"compile: median {statistics.median(cratios):.3f} ({min(cratios):.3f}-{max(cratios):.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
