"""Decode-step latency and compiled-graph count on the reference shared-KV model: eager, backend="inductor",
backend="kvpass" and kvpass.compile, measured side by side in one process (kvpass bench,
python bench/decode.py).

Method (kvpass.timing, the same for kvpass demo): every runner first generates --warmup times from empty
caches (prefill 8 + --steps decode steps; compiles happen there: the "first run" column and the compiled-graph
count), then --rounds timed rounds run the runners interleaved, in a rotating order, each generating once per
round with the garbage collector off. A runner's figure for a round is its median decode step; the table gives
the median and the min-max of those figures over the rounds, and each ratio is computed within each round, then
its median and min-max. A ratio whose range contains 1x is marked "?", and a spread wider than 1.5x is called out:
the machine was too busy to conclude. Stock Inductor's recompile-limit warning is captured and summarized in
one line (expected stock behaviour). Each runner compiles its own copy of the model's forward code, so the
runners do not share Dynamo's per-code recompile limit.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import types

import torch
import torch._dynamo.utils

from .argtypes import positive_int
from .timing import RECOMPILE_LIMIT_NOTE, captured_recompile_limit_warnings, measure

__all__ = ["decode_benchmark", "time_decode", "own_code", "RUNNERS", "main"]

#: runner name -> how it runs the model
RUNNERS = ("eager", "inductor", "kvpass", "kvpass.compile")


def own_code(fn: types.FunctionType) -> types.FunctionType:
    """A copy of ``fn`` with its own code object (same source, same lines, same closure). Dynamo keeps its cache
    and recompile limit per code object, so runners compiled side by side in one process from copies stay
    independent, as if each ran in a fresh process."""
    new = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    new.__qualname__, new.__doc__, new.__kwdefaults__ = fn.__qualname__, fn.__doc__, fn.__kwdefaults__
    new.__dict__.update(fn.__dict__)
    return new


def _own_forward(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with a forward of its own code object (:func:`own_code`), through a same-named subclass."""
    cls = type(model)
    fn = own_code(cls.forward)
    model.__class__ = type(cls.__name__, (cls,), {"forward": fn, "__module__": cls.__module__,
                                                  "__qualname__": cls.__qualname__})
    return model


def _runner(name: str, model):
    from . import compile as kvpass_compile

    if name == "eager":
        return model
    if name == "inductor":
        return torch.compile(model, backend="inductor")
    if name == "kvpass":
        return torch.compile(model, backend="kvpass")
    if name == "kvpass.compile":
        return kvpass_compile(model)
    raise ValueError(f"unknown runner {name!r}; choose from {RUNNERS}")


def time_decode(model_factory, prompt, decode, runners=RUNNERS, rounds: int = 9, warmup: int = 2,
                progress=None) -> dict:
    """Time a decode step of ``model_factory()`` under each runner with :func:`kvpass.timing.measure`.

    Returns ``{"measurement": Measurement, "outputs": {runner: logits of its last round}, "recompile_limit":
    [captured warnings], "device": ...}``. Stock Inductor traces with stock Dynamo settings
    (:func:`kvpass.tracing.stock_tracing`), whatever naming ``backend="kvpass"`` changed in this process."""
    from .tracing import stock_tracing

    device = prompt.device
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    torch._dynamo.reset()
    works, outputs = {}, {}
    for name in runners:
        model = _own_forward(model_factory().to(device))
        step = _runner(name, model)
        ctx = stock_tracing if name == "inductor" else contextlib.nullcontext
        outputs[name] = []

        def work(timer, step=step, model=model, ctx=ctx, out=outputs[name]):
            with ctx(), torch.no_grad():
                model.reset()
                logits = [step(prompt)]
                for tok in decode:
                    logits.append(timer.time(step, tok.reshape(1, 1)))
            out[:] = logits

        works[name] = work
    with captured_recompile_limit_warnings() as limits:
        m = measure(works, rounds=rounds, warmup=warmup, sync=sync, progress=progress)
    torch._dynamo.reset()
    return {"measurement": m, "outputs": outputs, "recompile_limit": limits}




def build_parser(prog=None, parser_class=argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of ``kvpass bench`` / ``python bench/decode.py``."""
    parser = parser_class(prog=prog, description=__doc__.split("\n\n")[0].replace("\n", " "),
                          epilog=__doc__.split("\n\n", 1)[1].replace("\n", " "))
    parser.add_argument("--steps", type=positive_int, default=16,
                        help="decode steps after an 8-token prefill in each run (default 16)")
    parser.add_argument("--rounds", type=positive_int, default=9,
                        help="timed rounds, the runners interleaved in each (default 9)")
    parser.add_argument("--warmup", type=positive_int, default=2,
                        help="untimed runs of each runner before the rounds; compiles happen here (default 2)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="device to run on (default cpu)")
    return parser


def main(argv=None, prog=None, parser_class=argparse.ArgumentParser) -> int:
    """Run the decode benchmark and print its table (markdown) on stdout; progress goes to stderr."""
    from .examples.shared_kv_model import reference_model

    parser = build_parser(prog, parser_class)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 64, (1, 8), generator=gen).to(device)
    decode = torch.randint(0, 64, (args.steps,), generator=gen).to(device)
    result = time_decode(lambda: reference_model(seed=1), prompt, decode, rounds=args.rounds, warmup=args.warmup,
                         progress=lambda msg: print(f"  ... {msg}", file=sys.stderr, flush=True))
    m, outs = result["measurement"], result["outputs"]
    err = {n: f"{max((a - b).abs().max().item() for a, b in zip(o, outs['eager'])):.1e}" for n, o in outs.items()}
    print(f"\nreference model, prefill 8 + {args.steps} decode steps, device={device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; {args.warmup} warm-up run(s) per runner, then {args.rounds} "
          "interleaved rounds; decode step in ms\n")
    print("\n".join(m.table("eager", extra={
        "compiled graphs": {n: str(m.warmup_compiles[n]) for n in outs},
        "first run (s)": {n: f"{m.first_round_s[n]:.1f}" for n in outs},
        "max abs err vs eager": err})))
    if "inductor" in outs:
        r = m.ratio("inductor", "kvpass.compile")
        print(f"\nkvpass.compile vs inductor (per round): {r.median:.2f}x ({r.lo:.2f}-{r.hi:.2f})"
              + ("" if m.conclusive("inductor", "kvpass.compile") else " ?"))
    for note in m.notes("eager"):
        print(f"note: {note}")
    for hit in result["recompile_limit"][:1]:
        limit, _, where = hit.partition(" in ")
        print(RECOMPILE_LIMIT_NOTE.format(limit=limit, where=where))
    return 0


decode_benchmark = main
