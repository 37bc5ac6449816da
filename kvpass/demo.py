"""``kvpass demo``: the whole story on the bundled reference model, every claim computed on the spot.

1. the model and its sharing scheme;
2. what stock PyTorch does with it: ``kvpass.check`` findings on a ``make_fx`` capture, and the graphs (and host
   round trips in them) Dynamo hands to ``backend="inductor"``;
3. what kvpass does: the rewrite report with the user's lines, the diff of the first layer's cache update, a
   faithful ``kvpass.export`` checked clean, and agreement with eager;
4. with ``--timing``, decode-step latency of eager and ``kvpass.compile`` (with ``--full`` also stock Inductor,
   whose many graphs take minutes to compile on a cold cache), measured side by side with :mod:`kvpass.timing`
   (the method shared with ``kvpass bench``);
5. a one-line takeaway computed from the figures above.
"""

from __future__ import annotations

import json
import sys
import time

import torch

from .testing import RecordingBackend, host_round_trip_nodes
from .timing import RECOMPILE_LIMIT_NOTE, captured_recompile_limit_warnings, measure

__all__ = ["run_demo", "run_hf_demo", "format_demo", "format_hf_demo", "takeaway", "main", "QUICK", "FULL"]

#: ``kvpass demo`` (8 decode steps, nothing timed: no Inductor compile, a result in about a minute on a cold
#: cache) and ``kvpass demo --timing`` (eager and kvpass.compile timed: 5 rounds; Inductor compiles 2 graphs)
QUICK = {"steps": 8, "rounds": 5, "runners": ("eager", "kvpass.compile")}
#: ``kvpass demo --full``: stock Inductor timed too (it compiles every one of its graphs: minutes on a cold cache)
FULL = {"steps": 16, "rounds": 9, "runners": ("eager", "inductor", "kvpass.compile")}


_START = [time.perf_counter()]  # when the current demo began (progress lines say the seconds since)


def _progress(msg: str, quiet: bool) -> None:
    if not quiet:
        print(f"  ... {msg} ({time.perf_counter() - _START[0]:.0f} s)", file=sys.stderr, flush=True)


def _steps(step, model, prompt, decode):
    """Prefill then teacher-forced decode through ``step``; the logits of each call (untimed: timing is
    :mod:`kvpass.timing`'s job)."""
    model.reset()
    with torch.no_grad():
        outs = [step(prompt)]
        for tok in decode:
            outs.append(step(tok.reshape(1, 1)))
    return outs


def _max_err(a, b) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def run_demo(steps: int = 16, seed: int = 0, device: str = "cpu", model_factory=None, quiet: bool = False,
             timing: bool = True, rounds: int = 9, runners=FULL["runners"]) -> dict:
    """Run the demo and return its results as a dict (what ``kvpass demo --json`` prints).

    ``model_factory(seed)`` builds the model (default: the bundled reference model); tests pass a perturbed one
    to check that the report follows the model. ``runners`` are the timed ones (``"eager"``, ``"inductor"``,
    ``"kvpass.compile"``).
    """
    from torch.fx.experimental.proxy_tensor import make_fx

    from . import backend as kv_backend
    from . import check, diff
    from . import compile as kv_compile
    from .examples.shared_kv_model import kv_owners, reference_model
    from .faithful_export import export as kv_export
    from .tracing import install_traceable, traceable_installed, uninstall_traceable

    _START[0] = time.perf_counter()
    factory = model_factory or (lambda s: reference_model(seed=s))
    dev = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    config = factory(seed).config
    prompt = torch.randint(0, config.vocab_size, (1, 8), generator=gen).to(dev)
    decode = torch.randint(0, config.vocab_size, (steps,), generator=gen).to(dev)
    out: dict = {"steps": steps, "device": str(dev), "torch": torch.__version__}
    owners = kv_owners(config)
    out["model"] = {
        "layers": [{"layer": i, "type": t, "head_dim": config.layer_head_dim(i),
                    "cache": config.follower_kind(i) or ("owner" if i in owners.values() else "own"),
                    "owner": owners.get(i)} for i, t in enumerate(config.layer_types)],
        "kv_shared_layers": config.kv_shared_layers, "sandwich_norms": config.sandwich_norms,
    }

    eager_model = factory(seed).to(dev)
    eager_outs = _steps(eager_model, eager_model, prompt, decode)

    # -- stock PyTorch ------------------------------------------------------------------------------------
    _progress("eager run done; stock make_fx capture", quiet)
    model = factory(seed).to(dev)
    model.reset()
    with torch.no_grad():
        baked = make_fx(lambda ids: model(ids), tracing_mode="real", record_stack_traces=True)(prompt)
    findings = check(baked)
    stock: dict = {"make_fx_findings": len(findings), "findings": [str(f) for f in findings[:3]],
                   "meanings": [f.meaning for f in findings[:3]]}

    _progress("stock Dynamo graphs (what backend='inductor' receives)", quiet)
    was_installed = traceable_installed()
    uninstall_traceable()  # stock Dynamo, whatever this process did before
    try:
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        recorder = RecordingBackend()
        model = factory(seed).to(dev)
        with torch._dynamo.config.patch(allow_unspec_int_on_nn_module=False), \
                captured_recompile_limit_warnings() as limits:
            _steps(torch.compile(model, backend=recorder), model, prompt, decode)
        stock["recompile_limit_hits"] = limits
        stock["graphs"] = len(recorder.graphs)
        stock["graph_breaks"] = sum(torch._dynamo.utils.counters["graph_break"].values())
        stock["host_ops_in_graphs"] = sum(len(host_round_trip_nodes(g)) for g in recorder.graphs)
    finally:
        if was_installed:
            install_traceable()
    out["stock"] = stock

    # -- kvpass -------------------------------------------------------------------------------------------
    _progress("kvpass.compile (rewrite report, graphs)", quiet)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    recorder, reports = RecordingBackend(), []
    model = factory(seed).to(dev)
    kv_outs = _steps(kv_compile(model, backend=kv_backend(inner=recorder, on_report=reports.append)), model,
                     prompt, decode)
    report = reports[0]
    text = diff(report.before, recorder.graphs[0])  # the functional graph before and after the rules
    kv: dict = {
        "graphs": len(recorder.graphs),
        "graph_breaks": sum(torch._dynamo.utils.counters["graph_break"].values()),
        "host_ops_in_graphs": sum(len(host_round_trip_nodes(g)) for g in recorder.graphs),
        "report_counts": {k: v for k, v in report.counts.items() if v},
        "report": [f"{m.pattern}: {m.source}" for m in report.matches],
        "skips": [f"{s.pattern}: {s.source}: {s.reason}" for s in report.skips],
        "max_abs_err_vs_eager": _max_err(kv_outs, eager_outs),
        "diff_first_layer": _first_hunks(text),
    }

    _progress("kvpass.export of the prefill, then kvpass.check", quiet)
    model = factory(seed).to(dev)
    model.reset()
    try:
        ep = kv_export(model, (prompt,))
        kv["export_findings"] = len(check(ep))
        model_ref = factory(seed).to(dev)
        model_ref.reset()
        with torch.no_grad():
            kv["export_max_abs_err_vs_eager"] = (ep.module()(prompt) - model_ref(prompt)).abs().max().item()
    except Exception as exc:  # the demo reports what happened instead of dying
        kv["export_error"] = f"{type(exc).__name__}: {exc}".splitlines()[0]
    out["kvpass"] = kv

    # -- timing -------------------------------------------------------------------------------------------
    if timing:
        from .benchmark import time_decode

        _progress(f"timing {', '.join(runners)} (kvpass.timing: same warm-up, interleaved rounds)", quiet)
        t = time_decode(lambda: factory(seed), prompt, decode, runners=tuple(runners),
                        rounds=rounds, warmup=2, progress=lambda msg: _progress(msg, quiet))
        m = t["measurement"]
        out["timing"] = m.to_dict("eager")
        out["timing"]["compiled_graphs"] = m.warmup_compiles
        out["timing"]["recompile_limit_hits"] = t["recompile_limit"]
        out["timing"]["table"] = m.table("eager", extra={"graphs": {n: str(c) for n, c in m.warmup_compiles.items()}})
        if "inductor" in m.per_round:
            out["timing"]["kvpass_vs_inductor"] = m.ratio("inductor", "kvpass.compile").to_dict()
            out["timing"]["kvpass_vs_inductor"]["conclusive"] = m.conclusive("inductor", "kvpass.compile")
        out["decode_step_ms"] = {n: m.runner(n).median * 1e3 for n in m.per_round}
    torch._dynamo.reset()
    out["takeaway"] = takeaway(out)
    return out


def takeaway(r: dict, kv_name: str = "kvpass.compile") -> str:
    """The demo's last line, from the figures of the run: graphs before and after, agreement with eager, and the
    decode-step speed-up over eager (or why the run does not decide one)."""
    s, k = r["stock"], r["kvpass"]
    err = k["max_abs_err_vs_eager"]
    parts = [f"stock torch.compile {s['graphs']} graphs, {s['host_ops_in_graphs']} host round-trip ops -> "
             f"{kv_name} {k['graphs']} graphs, {k['host_ops_in_graphs']} host ops",
             "outputs identical to eager" if err == 0 else f"outputs within {err:.1e} of eager"]
    t = r.get("timing")
    if t and kv_name in t["runners"]:
        ratio, ok = t["runners"][kv_name]["vs_eager"], t["runners"][kv_name]["conclusive"]
        if ok:
            parts.append(f"decode step {ratio['median']:.1f}x faster than eager "
                         f"({ratio['min']:.1f}x-{ratio['max']:.1f}x over {t['method']['rounds']} rounds)"
                         if ratio["median"] >= 1 else
                         f"decode step {1 / ratio['median']:.1f}x SLOWER than eager")
        else:
            parts.append(f"speed vs eager undecided on this machine ({ratio['min']:.2f}x-{ratio['max']:.2f}x "
                         "per round: a busy machine; rerun when it is quiet)")
    elif not t:
        parts.append("speed: kvpass demo --timing (Inductor compiles: minutes on a cold cache)")
    return "In short: " + "; ".join(parts) + "."


def _hf_steps(model, step, prompt, steps):
    """Greedy decode with a StaticCache through ``step``: the tokens (untimed)."""
    from .examples.hf_gemma4 import greedy

    return greedy(model, step, prompt, steps)


def run_hf_demo(steps: int = 16, seed: int = 0, quiet: bool = False, timing: bool = True, rounds: int = 9) -> dict:
    """The same story on transformers' Gemma4 with a tiny random config (shared KV layers, ``attention_k_eq_v``,
    two head dims): no host round trips there, so kvpass must find nothing and change nothing."""
    from . import backend as kv_backend
    from . import check
    from .examples.hf_gemma4 import tiny_gemma4

    model = tiny_gemma4()
    c = model.config
    prompt = torch.randint(0, c.vocab_size, (1, 6), generator=torch.Generator().manual_seed(seed + 3))
    out: dict = {"model_name": "hf-gemma4", "steps": steps, "device": "cpu", "torch": torch.__version__,
                 "model": {"layers": [{"layer": i, "type": t, "head_dim": layer.self_attn.head_dim}
                                      for i, (t, layer) in enumerate(zip(c.layer_types, model.model.layers))],
                           "num_kv_shared_layers": c.num_kv_shared_layers, "attention_k_eq_v": c.attention_k_eq_v}}
    want = _hf_steps(model, model.forward, prompt, steps)

    _progress("transformers' own export path, then kvpass.check", quiet)
    from transformers.integrations.executorch import TorchExportableModuleForDecoderOnlyLM

    ep = TorchExportableModuleForDecoderOnlyLM(model, batch_size=1, max_cache_len=16).export(input_ids=prompt)
    stock = {"export_findings": len(check(ep))}
    torch._dynamo.reset()
    recorder = RecordingBackend()
    _hf_steps(model, torch.compile(model.forward, backend=recorder), prompt, steps)
    stock["graphs"] = len(recorder.graphs)
    out["stock"] = stock

    _progress("kvpass backend", quiet)
    torch._dynamo.reset()
    recorder, reports = RecordingBackend(), []
    got = _hf_steps(model, torch.compile(model.forward, backend=kv_backend(inner=recorder, on_report=reports.append)),
                       prompt, steps)
    out["kvpass"] = {"graphs": len(recorder.graphs), "tokens_identical": got == want, "tokens": got,
                     "rewrites": sum(len(r.matches) for r in reports), "skips": sum(len(r.skips) for r in reports)}
    if timing:
        import types

        from .benchmark import own_code
        from .examples.hf_gemma4 import greedy

        def runner(backend):
            step = model.forward if backend is None else torch.compile(
                types.MethodType(own_code(type(model).forward), model), backend=backend)
            return lambda timer: greedy(model, step, prompt, steps, timer.samples)

        _progress("timing eager, inductor, kvpass (kvpass.timing: same warm-up, interleaved rounds)", quiet)
        torch._dynamo.reset()
        with captured_recompile_limit_warnings() as limits:
            m = measure({"eager": runner(None), "inductor": runner("inductor"), "kvpass": runner(kv_backend())},
                        rounds=rounds, warmup=2, progress=lambda msg: _progress(msg, quiet))
        out["timing"] = m.to_dict("eager")
        out["timing"]["compiled_graphs"] = m.warmup_compiles
        out["timing"]["recompile_limit_hits"] = limits
        out["timing"]["table"] = m.table("eager", extra={"graphs": {n: str(c) for n, c in m.warmup_compiles.items()}})
        out["timing"]["kvpass_vs_inductor"] = m.ratio("inductor", "kvpass").to_dict()
        out["timing"]["kvpass_vs_inductor"]["conclusive"] = m.conclusive("inductor", "kvpass")
        out["decode_step_ms"] = {n: m.runner(n).median * 1e3 for n in m.per_round}
    torch._dynamo.reset()
    return out


def format_hf_demo(r: dict) -> str:
    """The human-readable output of ``kvpass demo --model hf-gemma4``."""
    m, s, k = r["model"], r["stock"], r["kvpass"]
    lines = [f"kvpass demo --model hf-gemma4: transformers Gemma4ForCausalLM, tiny random config, prefill 6 + "
             f"{r['steps']} greedy steps (torch {r['torch']})",
             f"  num_kv_shared_layers={m['num_kv_shared_layers']}, attention_k_eq_v={m['attention_k_eq_v']}, "
             f"head dims per layer {[layer['head_dim'] for layer in m['layers']]}", "",
             "Stock PyTorch",
             f"  transformers' export path (static cache): kvpass.check finds {s['export_findings']} problem(s)",
             f"  Dynamo hands backend='inductor' {s['graphs']} graphs", "",
             "kvpass (no host round trips in this model: it must find nothing and change nothing)",
             f"  rewrites reported: {k['rewrites']} (skips: {k['skips']}); graphs: {k['graphs']}; greedy tokens "
             f"identical to eager: {'yes' if k['tokens_identical'] else 'NO'}"]
    return "\n".join(lines + _format_timing(r, "kvpass"))


def _first_hunks(text: str, max_lines: int = 28) -> str:
    lines = text.splitlines()
    return "\n".join(lines[:max_lines]) + ("\n..." if len(lines) > max_lines else "")


def format_demo(r: dict) -> str:
    """The human-readable demo output."""
    lines = [f"kvpass demo: reference shared-KV decoder, prefill 8 + {r['steps']} decode steps on {r['device']} "
             f"(torch {r['torch']})", ""]
    for layer in r["model"]["layers"]:
        role = layer["cache"] + (f" follower of layer {layer['owner']}" if layer["owner"] is not None else "")
        lines.append(f"  layer {layer['layer']}: {layer['type']:<17} head_dim={layer['head_dim']:<3} {role}")
    if any(layer["owner"] is not None for layer in r["model"]["layers"]):
        lines.append("  (a follower layer reuses its owner layer's K/V instead of computing its own: shared = it "
                     "writes into the owner's cache too, readonly = it only reads it, padded = it has a smaller "
                     "head dim and pads its K/V with np.pad)")
    s, k = r["stock"], r["kvpass"]
    lines += ["", "Stock PyTorch",
              f"  make_fx capture: kvpass.check finds {s['make_fx_findings']} K/V value(s) that do not come from "
              "the computation, e.g.:"]
    for i, f in enumerate(s["findings"][:2]):
        if i < len(s.get("meanings", [])):
            lines.append(f"    what it means: {s['meanings'][i]}")
        lines.append(f"      {f}".replace("\n    ", "\n      "))
    lines += [f"  backend='inductor' receives {s['graphs']} graphs ({s['graph_breaks']} graph breaks), with "
              f"{s['host_ops_in_graphs']} host round-trip ops in them"]
    lines += [f"  {line}" for line in _recompile_note(s.get("recompile_limit_hits"))]
    lines += ["",
              "kvpass",
              f"  kvpass.compile: {k['graphs']} graphs ({k['graph_breaks']} graph breaks), "
              f"{k['host_ops_in_graphs']} host ops left; rewrites in the prefill graph: {k['report_counts']}"]
    lines += [f"    {m}" for m in k["report"][:6]]
    if len(k["report"]) > 6:
        lines.append(f"    ... {len(k['report']) - 6} more")
    lines += [f"    skipped {m}" for m in k["skips"]]
    lines += ["  first changes in the prefill graph (kvpass.diff):"]
    lines += [f"    {line}" for line in k["diff_first_layer"].splitlines()]
    if "export_error" in k:
        lines.append(f"  kvpass.export: {k['export_error']}")
    else:
        lines.append(f"  kvpass.export of the prefill: kvpass.check finds {k['export_findings']} problem(s); "
                     f"max abs difference from eager {k['export_max_abs_err_vs_eager']:.1e}")
    lines.append(f"  compiled vs eager over all steps: max abs difference {k['max_abs_err_vs_eager']:.1e}")
    lines += _format_timing(r, "kvpass.compile")
    if "wall_s" in r:
        lines += ["", f"(demo took {r['wall_s']} s)"]
    if "takeaway" in r:
        lines += [r["takeaway"]] if "wall_s" in r else ["", r["takeaway"]]
    return "\n".join(lines)


def _format_timing(r: dict, kv_name: str) -> list[str]:
    """The timing table and what it can and cannot support (kvpass.timing)."""
    t = r.get("timing")
    if not t:
        return []
    method = t["method"]
    steps = max(method["samples_per_round"].values())
    lines = ["", f"Decode step in ms (kvpass.timing: {method['warmup_rounds']} warm-up runs per runner, then "
             f"{method['rounds']} interleaved rounds of {steps} steps; per round the median step; median and "
             "min-max over the rounds; ratios per round, '?' where they do not decide)"]
    lines += [f"  {row}" for row in t["table"]]
    k = t.get("kvpass_vs_inductor")
    if k:
        lines.append(f"  {kv_name} vs inductor, per round: {k['median']:.2f}x ({k['min']:.2f}-{k['max']:.2f})"
                     + ("" if k["conclusive"] else ": the range spans 1x, no conclusion"))
    else:
        lines.append("  (stock Inductor is not timed by default: its graphs take minutes to compile on a cold "
                     "cache; kvpass demo --full times it too)")
    lines += [f"  note: {n}" for n in t["notes"]]
    if not r.get("stock", {}).get("recompile_limit_hits"):  # said once, where it first happened
        lines += [f"  {line}" for line in _recompile_note(t.get("recompile_limit_hits"))]
    return lines


def _recompile_note(hits) -> list[str]:
    """One line for Dynamo's captured recompile-limit warnings (expected stock behaviour), or nothing."""
    if not hits:
        return []
    limit, _, where = hits[0].partition(" in ")
    return [RECOMPILE_LIMIT_NOTE.format(limit=limit, where=where)]


def device_problem(device: str) -> str | None:
    """Why ``kvpass demo`` cannot run on ``device`` (one line), or None: the demo runs on the CPU or on an
    available CUDA device."""
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        return "not a device torch knows; give cpu, cuda or cuda:N"
    if dev.type not in ("cpu", "cuda"):
        return f"the demo runs on cpu or cuda, not {dev.type}"
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            return "CUDA is not available on this machine"
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            return f"this machine has {torch.cuda.device_count()} CUDA device(s)"
    return None


def main(args) -> int:
    """CLI entry: ``kvpass demo`` (see ``kvpass demo --help``)."""
    if args.model not in ("reference", "hf-gemma4"):
        print(f"kvpass demo: error: --model {args.model!r}: choose 'reference' or 'hf-gemma4'", file=sys.stderr)
        return 2
    if args.model == "hf-gemma4":
        if args.device != "cpu":
            print("kvpass demo: error: --model hf-gemma4 runs on cpu only", file=sys.stderr)
            return 2
        t0 = time.perf_counter()
        result = run_hf_demo(steps=FULL["steps"] if args.steps is None else args.steps, seed=args.seed,
                             quiet=args.json, timing=(args.timing or args.full) and not args.no_timing,
                             rounds=(FULL if args.full else QUICK)["rounds"] if args.rounds is None else args.rounds)
        result["wall_s"] = round(time.perf_counter() - t0, 1)
        print(json.dumps(result, indent=2) if args.json else format_hf_demo(result))
        k = result["kvpass"]
        return 0 if k["tokens_identical"] and k["rewrites"] == 0 else 1
    mode = FULL if args.full else QUICK
    steps = mode["steps"] if args.steps is None else args.steps
    rounds = mode["rounds"] if args.rounds is None else args.rounds
    t0 = time.perf_counter()
    result = run_demo(steps=steps, seed=args.seed, device=args.device, quiet=args.json,
                      timing=(args.timing or args.full) and not args.no_timing, rounds=rounds,
                      runners=mode["runners"])
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(format_demo(result))
    ok = result["kvpass"]["max_abs_err_vs_eager"] < 1e-4 and result["kvpass"]["host_ops_in_graphs"] == 0
    return 0 if ok else 1
