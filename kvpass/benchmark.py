"""Decode-step latency and compiled-graph count on the reference shared-KV model: eager, backend="inductor",
backend="kvpass", kvpass.compile, side by side in one process (``kvpass bench``, ``python bench/decode.py``).

    kvpass bench [--steps 16] [--repeats 5] [--device cpu|cuda]

Each runner starts from a reset Dynamo, generates once from empty caches (prefill 8 + ``--steps`` decode steps,
compiles included: the "first run" column, and the compiled-graph count), then ``--repeats`` more times on the
same positions; the step latency is the median decode step over those warm runs. Runners are measured one
after the other (Dynamo's recompile limit is per code object, shared by all model instances), so run it on a
quiet machine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch._dynamo.utils

from . import compile as kvpass_compile
from .examples.shared_kv_model import reference_model

__all__ = ["decode_benchmark", "main"]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def generate(step, model, prompt, decode, device):
    """Prefill + teacher-forced decode; returns (logits per step, decode step times in seconds)."""
    model.reset()
    times, outs = [], []
    with torch.no_grad():
        outs.append(step(prompt))
        for tok in decode:
            sync(device)
            t0 = time.perf_counter()
            outs.append(step(tok.reshape(1, 1)))
            sync(device)
            times.append(time.perf_counter() - t0)
    return outs, times


def main(argv=None, prog=None) -> int:
    """Run the decode benchmark and print its table (markdown) on stdout; progress goes to stderr."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 64, (1, 8), generator=gen).to(device)
    decode = torch.randint(0, 64, (args.steps,), generator=gen).to(device)

    runners = {
        "eager": lambda m: m,
        "inductor": lambda m: torch.compile(m, backend="inductor"),
        "kvpass": lambda m: torch.compile(m, backend="kvpass"),
        "kvpass.compile": lambda m: kvpass_compile(m),
    }
    rows, oracle = [], None
    for name, make in runners.items():
        # Dynamo's cache and recompile limit are per code object, shared by every model instance: start clean.
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        model = reference_model(seed=1).to(device)
        step = make(model)
        print(f"[{name}] first run (compiles included) ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        generate(step, model, prompt, decode, device)
        first = time.perf_counter() - t0
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"] if name != "eager" else 0
        warm = []
        for _ in range(args.repeats):
            outs, times = generate(step, model, prompt, decode, device)
            warm += times
        oracle = outs if oracle is None else oracle
        err = max((a - b).abs().max().item() for a, b in zip(outs, oracle))
        rows.append((name, graphs, first, statistics.median(warm) * 1e3, err))

    eager_ms = rows[0][3]
    inductor_ms = rows[1][3]
    print(f"\nreference model, prefill 8 + {args.steps} decode steps, device={device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads\n")
    print("| runner | compiled graphs | first run (s) | decode step (ms, median) | vs eager | vs inductor | max abs err vs eager |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, graphs, first, ms, err in rows:
        print(f"| {name} | {graphs} | {first:.1f} | {ms:.3f} | {eager_ms / ms:.2f}x | {inductor_ms / ms:.2f}x | {err:.1e} |")
    return 0


decode_benchmark = main
