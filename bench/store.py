"""Benchmark of the paged KV store: upstream's per-chunk loop vs kvpass's eager op vs the compiled op vs copy_.

Usage::

    python bench/store.py                      # CPU, fp32, 8 kv heads x 128 head_dim, block size 16
    python bench/store.py --device cuda --dtype bfloat16
    python bench/store.py --quick              # fewer repetitions (a smoke run)
    python bench/store.py --decode-step        # only the decode-step table (--layers layers in one compiled step)

Cases: prefill of 4096 and 16384 new tokens (4 sequences with ragged, block-unaligned contexts) and decode of
8 and 64 sequences (one token each). Every case stores K and V (``store_paged_kv``) into HND caches with room
for twice the written tokens, blocks shuffled. Columns (milliseconds per call: the median of ``--reps``
interleaved rounds after the same warm-up for every runner; ratios computed per round, median and min-max):

* ``chunk loop``: the upstream torch reference's algorithm (per sequence, per block chunk, ``.item()`` and two
  slice assignments): ``kvpass.ops.reference.loop_store_paged_kv``;
* ``token loop``: a per-token Python loop (DESIGN section 5's baseline): ``token_loop_store_paged_kv``;
* ``eager``: ``kvpass.store_paged_kv`` (validation + vectorized index arithmetic + one ``index_put_`` per cache);
* ``compiled``: ``torch.compile(kvpass.store_paged_kv)`` (Inductor-generated scatter);
* ``copy_``: ``copy_`` of the same bytes (new K and V into preallocated buffers), the floor;
* ``compiled copy_``: the same two ``copy_`` as a ``torch.compile``'d function: the floor of any compiled call
  (guards, wrapper, one generated kernel), which dominates a decode store of a few KiB;
* ratios: chunk loop / compiled, token loop / compiled, compiled / copy_, eager / copy_.

A "modes" table (issue 16) times the compiled ``store_paged_kv`` in each addressing / cache mode side by side on
the same prefill batch: block table, ``slot_mapping`` (vLLM addressing), int8 cache with per-kv-head scales and
float8_e4m3fn cache with a per-tensor scale (both block-table addressed), each against ``copy_`` of the same
bytes written (K+V in the cache's dtype: 1 byte per element for the quantized caches). Method: the same warm-up
for every runner, interleaved rounds, the median and min-max per runner, and the ratio to ``copy_`` computed
per round (median and min-max of those ratios); GB/s = bytes written / median time. For the quantized caches,
"quantize only" is the same quantization compiled into contiguous buffers (no scatter): the floor of an exact
quantized store, which reads 4 bytes of float32 states and divides once per byte it writes.

A decode-step table (``--decode-step``) times the store of ``--layers`` layers (one new token per sequence, one
addressing for all layers) in one compiled function against ``2 * layers`` eager ``copy_`` of the same bytes and
the same copies compiled as one function, and the standalone compiled call of one layer against its two
``copy_`` (the floor of a standalone call: Dynamo's guards and the wrapper).

A further table times the K path of a layer, RMSNorm + RoPE + ``store_paged_single``, as three separately compiled
steps (K materialized between them) against one compiled graph (Inductor fuses the three into the scatter kernel).

Before timing, every implementation's result is checked against the chunk loop (exact equality). Inductor's
on-disk caches are disabled so that the compiled column measures the current lowering, not a cached one.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import kvpass  # noqa: E402
from kvpass.ops._store import quantize  # noqa: E402
from kvpass.ops.reference import loop_store_paged_kv, token_loop_store_paged_kv  # noqa: E402


def make_case(kind, n, heads, head_dim, block_size, dtype, device, gen):
    """Inputs of one case: prefill of ``n`` tokens over 4 sequences, or decode of ``n`` sequences."""
    if kind == "prefill":
        rows = 4
        q = torch.full((rows,), n // rows, dtype=torch.int64)
        ctx = torch.randint(0, 4 * block_size, (rows,), generator=gen)
    else:
        rows = n
        q = torch.ones(rows, dtype=torch.int64)
        ctx = torch.randint(0, 1024, (rows,), generator=gen)  # (4096 before issue 21: 64 rows' caches took 4 GiB)
    width = int(((ctx + q + block_size - 1) // block_size).max())
    num_blocks = 2 * rows * width
    perm = torch.randperm(num_blocks, generator=gen)[: rows * width]
    block_table = perm.reshape(rows, width).to(torch.int32)
    tokens = int(q.sum())
    cu = torch.zeros(rows + 1, dtype=torch.int64)
    cu[1:] = q.cumsum(0)
    key = torch.randn(tokens, heads, head_dim, generator=gen).to(dtype)
    value = torch.randn(tokens, heads, head_dim, generator=gen).to(dtype)
    cache_shape = (num_blocks, heads, block_size, head_dim)
    key_cache = torch.randn(cache_shape, generator=gen).to(dtype)
    value_cache = torch.randn(cache_shape, generator=gen).to(dtype)
    to = dict(device=device)
    return dict(
        key=key.to(**to), value=value.to(**to), key_cache=key_cache.to(**to), value_cache=value_cache.to(**to),
        block_table=block_table.to(**to), cu_q_lens=None if kind == "decode" else cu.to(torch.int32).to(**to),
        context_kv_lens=ctx.to(torch.int32).to(**to),
    )


def timeit_all(fns: dict, device, reps, min_time=0.1) -> dict:
    """Milliseconds per call of each function: the best of ``reps`` timed batches, the functions interleaved
    batch by batch so that a burst of load from elsewhere on the machine does not land on one column only."""
    return {name: min(v) for name, v in timeit_rounds(fns, device, reps, min_time=min_time).items()}


def run(args):
    """The store table's rows: for each case, the five implementations' times (after an equality check)."""
    device, dtype = args.device, getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(0)
    reps = 3 if args.quick else args.reps
    compiled = torch.compile(kvpass.store_paged_kv, dynamic=False)
    compiled_copy = torch.compile(lambda kd, vd, k, v: (kd.copy_(k), vd.copy_(v)), dynamic=False)
    cases = [("prefill", 4096), ("prefill", 16384), ("decode", 8), ("decode", 64)]
    if args.decode_only:
        cases = cases[2:]
    rows = []
    for kind, n in cases:
        c = make_case(kind, n, args.heads, args.head_dim, args.block_size, dtype, device, gen)
        kc0, vc0 = c["key_cache"].clone(), c["value_cache"].clone()
        idx = (c["block_table"], c["cu_q_lens"], c["context_kv_lens"])
        kv = (c["key"], c["value"])
        # correctness first: every implementation against the loop reference
        ref = loop_store_paged_kv(*kv, kc0.clone(), vc0.clone(), *idx)
        for name, fn in (("eager", kvpass.store_paged_kv), ("compiled", compiled),
                         ("token loop", token_loop_store_paged_kv)):
            kc, vc = kc0.clone(), vc0.clone()
            fn(*kv, kc, vc, *idx)
            if not (torch.equal(kc, ref[0]) and torch.equal(vc, ref[1])):
                raise SystemExit(f"{kind} {n}: {name} result differs from the loop reference")
        kc, vc = kc0.clone(), vc0.clone()
        kdst, vdst = torch.empty_like(c["key"]), torch.empty_like(c["value"])
        samples = timeit_rounds({
            "chunk loop": lambda: loop_store_paged_kv(*kv, kc, vc, *idx),
            "token loop": lambda: token_loop_store_paged_kv(*kv, kc, vc, *idx),
            "eager": lambda: kvpass.store_paged_kv(*kv, kc, vc, *idx),
            "compiled": lambda: compiled(*kv, kc, vc, *idx),
            "copy_": lambda: (kdst.copy_(c["key"]), vdst.copy_(c["value"])),
            "compiled copy_": lambda: compiled_copy(kdst, vdst, c["key"], c["value"]),
        }, device, reps)
        times = {k: statistics.median(v) for k, v in samples.items()}
        times["ratios"] = {(a, b): [x / y for x, y in zip(samples[a], samples[b])]
                           for a, b in (("compiled", "copy_"), ("eager", "copy_"), ("compiled", "compiled copy_"))}
        label = f"prefill {n} tok" if kind == "prefill" else f"decode {n} seq"
        rows.append((label, times, 2 * c["key"].numel() * c["key"].element_size()))
    return rows


def timeit_rounds(fns: dict, device, rounds, warmup=3, min_time=0.05) -> dict:
    """Per runner, the milliseconds per call of each of ``rounds`` interleaved rounds (after ``warmup`` calls of
    every runner, the same for all), each round timing a batch of calls sized to about ``min_time``."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    inner = {}
    for name, fn in fns.items():
        for _ in range(warmup):
            fn()
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        inner[name] = max(1, int(min_time / max(time.perf_counter() - t0, 1e-6)))
    samples = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            for _ in range(inner[name]):
                fn()
            sync()
            samples[name].append((time.perf_counter() - t0) / inner[name] * 1e3)
    return samples


def run_modes(args):
    """The modes table: compiled store in each addressing / cache mode vs ``copy_`` of the same bytes."""
    import statistics

    device, dtype = args.device, getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(2)
    rounds = 5 if args.quick else max(args.reps, 7)
    out = ["| case | mode | bytes written | compiled ms (median, min-max) | copy_ ms (median) "
           "| compiled / copy_ per round (median, min-max) | compiled GB/s "
           "| quantize only ms (median) | compiled / quantize only per round |", "|---|---|---|---|---|---|---|---|---|"]
    for n in ((4096,) if args.quick else (4096, 16384)):
        c = make_case("prefill", n, args.heads, args.head_dim, args.block_size, dtype, device, gen)
        idx = (c["block_table"], c["cu_q_lens"], c["context_kv_lens"])
        kv = (c["key"], c["value"])
        bs = args.block_size
        slots = torch.full((n,), -1, dtype=torch.int64)
        cu, ctx, table = (
            c["cu_q_lens"].cpu().tolist(), c["context_kv_lens"].cpu().tolist(), c["block_table"].cpu().tolist())
        for b in range(len(ctx)):
            for t in range(cu[b], cu[b + 1]):
                p_ = ctx[b] + t - cu[b]
                slots[t] = table[b][p_ // bs] * bs + p_ % bs
        slots = slots.to(device)
        heads = args.heads
        k_scale = torch.linspace(0.01, 0.03, heads, device=device)
        v_scale = torch.tensor([0.02], device=device)
        modes = {
            "block table": (dtype, dict(block_table=idx[0], cu_q_lens=idx[1], context_kv_lens=idx[2])),
            "slot_mapping": (dtype, dict(slot_mapping=slots)),
            "int8, per-head scale": (torch.int8, dict(block_table=idx[0], cu_q_lens=idx[1], context_kv_lens=idx[2],
                                                      k_scale=k_scale, v_scale=k_scale)),
            "fp8 e4m3, per-tensor scale": (torch.float8_e4m3fn, dict(block_table=idx[0], cu_q_lens=idx[1],
                                                                    context_kv_lens=idx[2], k_scale=v_scale,
                                                                    v_scale=v_scale)),
        }
        runners, copies, nbytes, quantize_only = {}, {}, {}, {}
        for mode, (cdt, kw) in modes.items():
            kc, vc = c["key_cache"].to(cdt), c["value_cache"].to(cdt)
            fn = torch.compile(lambda k, v, kc, vc, kw=kw: kvpass.store_paged_kv(k, v, kc, vc, **kw), dynamic=False)
            ek, ev, ck, cv = kc.clone(), vc.clone(), kc.clone(), vc.clone()
            kvpass.store_paged_kv(*kv, ek, ev, **kw)
            fn(*kv, ck, cv)
            same = all(torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in ((ek, ck), (ev, cv)))
            if not same:
                raise SystemExit(f"modes: {mode}: compiled result differs from eager")
            src = (c["key"].to(cdt), c["value"].to(cdt))
            dst = (torch.empty_like(src[0]), torch.empty_like(src[1]))
            runners[mode] = lambda fn=fn, kc=kc, vc=vc: fn(*kv, kc, vc)
            copies[mode] = lambda src=src, dst=dst: (dst[0].copy_(src[0]), dst[1].copy_(src[1]))
            nbytes[mode] = 2 * src[0].numel() * src[0].element_size()
            if "k_scale" in kw:  # the floor of an exact quantized store: the same quantization, no scatter
                q = torch.compile(lambda k, v, kd, vd, kw=kw, cdt=cdt: (
                    kd.copy_(quantize(k, kw["k_scale"], cdt)), vd.copy_(quantize(v, kw["v_scale"], cdt))),
                    dynamic=False)
                quantize_only[mode] = lambda q=q, dst=dst: q(*kv, *dst)
        fns = {**{("store", m): f for m, f in runners.items()}, **{("copy", m): f for m, f in copies.items()},
               **{("quantize", m): f for m, f in quantize_only.items()}}
        samples = timeit_rounds(fns, device, rounds)
        for mode in modes:
            s_, c_ = samples[("store", mode)], samples[("copy", mode)]
            ratios = [a / b for a, b in zip(s_, c_)]
            med = statistics.median(s_)
            floor = "| - | - |"
            if ("quantize", mode) in samples:
                q_ = samples[("quantize", mode)]
                qr = [a / b for a, b in zip(s_, q_)]
                floor = (f"| {statistics.median(q_):.3f} | {statistics.median(qr):.2f}x "
                         f"({min(qr):.2f}-{max(qr):.2f}) |")
            out.append(f"| prefill {n} tok | {mode} | {nbytes[mode] / 2**20:.2f} MiB | {med:.3f} ({min(s_):.3f}-"
                       f"{max(s_):.3f}) | {statistics.median(c_):.3f} | {statistics.median(ratios):.2f}x "
                       f"({min(ratios):.2f}-{max(ratios):.2f}) | {nbytes[mode] / med / 1e6:.2f} {floor}")
    return "\n".join(out)


def run_decode_step(args):
    """The decode store as it runs in a compiled decode step: ``--layers`` layers each storing one new K/V token per
    sequence (one addressing for all of them) in one compiled function, against the same bytes moved by
    ``2 * layers`` eager ``copy_`` and by the same copies compiled as one function; plus the standalone compiled
    call of one layer (its floor: Dynamo's guards and the wrapper). Contexts are drawn below 256 (the caches of
    every layer are held at once)."""
    import re

    from torch._inductor.utils import run_and_get_code

    device, dtype = args.device, getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(4)
    rounds = 5 if args.quick else max(args.reps, 7)
    layers = args.layers

    def step(keys, values, kcs, vcs, block_table, ctx):
        for k, v, kc, vc in zip(keys, values, kcs, vcs):
            kvpass.store_paged_kv(k, v, kc, vc, block_table, None, ctx)

    def copies(kds, vds, keys, values):
        for kd, vd, k, v in zip(kds, vds, keys, values):
            kd.copy_(k)
            vd.copy_(v)

    def plain_scatters(keys, values, kcs, vcs, block_table, ctx):
        """What a hand-written decode store compiles to (no skipped rows, no duplicates: no plan)."""
        rows_ = torch.arange(ctx.shape[0], device=ctx.device)
        pos = ctx.long()
        blk = block_table[rows_, pos // args.block_size].long()[:, None]
        off = (pos % args.block_size)[:, None]
        heads = torch.arange(args.heads, device=ctx.device)[None, :]
        for k, v, kc, vc in zip(keys, values, kcs, vcs):
            kc.index_put_((blk, heads, off), k)
            vc.index_put_((blk, heads, off), v)

    out = ["| sequences | layers | K+V bytes per step | compiled step ms (median, min-max) | eager copy_ ms | "
           "compiled copy_ ms | compiled plain index_put_ ms | step / eager copy_ per round | "
           "step / compiled copy_ per round | step / compiled plain index_put_ per round | "
           "standalone store (1 layer) / copy_ (1 layer) per round | generated kernels + ATen calls per step |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for n in (8, 64):
        rows = n
        ctx = torch.randint(0, 256, (rows,), generator=gen)
        width = int(((ctx + 1 + args.block_size - 1) // args.block_size).max())
        num_blocks = rows * width + 8
        table = torch.randperm(num_blocks, generator=gen)[: rows * width].reshape(rows, width).to(torch.int32)
        shape = (num_blocks, args.heads, args.block_size, args.head_dim)
        keys = [torch.randn(rows, args.heads, args.head_dim, generator=gen).to(dtype).to(device)
                for _ in range(layers)]
        values = [torch.randn(rows, args.heads, args.head_dim, generator=gen).to(dtype).to(device)
                  for _ in range(layers)]
        kcs = [torch.randn(shape, generator=gen).to(dtype).to(device) for _ in range(layers)]
        vcs = [torch.randn(shape, generator=gen).to(dtype).to(device) for _ in range(layers)]
        table, ctx = table.to(device), ctx.to(torch.int32).to(device)
        compiled_step = torch.compile(step, dynamic=False)
        compiled_copies = torch.compile(copies, dynamic=False)
        compiled_plain = torch.compile(plain_scatters, dynamic=False)
        one = torch.compile(kvpass.store_paged_kv, dynamic=False)
        # correctness first: the compiled step against eager kvpass
        ek, ev = [c.clone() for c in kcs], [c.clone() for c in vcs]
        ck, cv = [c.clone() for c in kcs], [c.clone() for c in vcs]
        step(keys, values, ek, ev, table, ctx)
        _, code = run_and_get_code(compiled_step, keys, values, ck, cv, table, ctx)
        if not all(torch.equal(a, b) for a, b in zip(ek + ev, ck + cv)):
            raise SystemExit(f"decode step {n}: compiled result differs from eager")
        call = code[0][code[0].index("def call"):]
        kernels = re.findall(r"\b(cpp_fused\w*|triton_\w+\.run)\(", call)
        aten_calls = re.findall(r"= torch\.ops\.aten\.\w+", call)
        kds, vds = [torch.empty_like(k) for k in keys], [torch.empty_like(v) for v in values]
        samples = timeit_rounds({
            "step": lambda: compiled_step(keys, values, kcs, vcs, table, ctx),
            "copy_": lambda: copies(kds, vds, keys, values),
            "compiled copy_": lambda: compiled_copies(kds, vds, keys, values),
            "plain index_put_": lambda: compiled_plain(keys, values, kcs, vcs, table, ctx),
            "one": lambda: one(keys[0], values[0], kcs[0], vcs[0], table, None, ctx),
            "one copy_": lambda: (kds[0].copy_(keys[0]), vds[0].copy_(values[0])),
        }, device, rounds)

        def ratio(a, b):
            r = [x / y for x, y in zip(samples[a], samples[b])]
            return f"{statistics.median(r):.2f}x ({min(r):.2f}-{max(r):.2f})"

        st = samples["step"]
        nbytes = 2 * layers * keys[0].numel() * keys[0].element_size()
        out.append(f"| {n} | {layers} | {nbytes / 2**10:.0f} KiB | {statistics.median(st):.3f} ({min(st):.3f}-"
                   f"{max(st):.3f}) | {statistics.median(samples['copy_']):.3f} | "
                   f"{statistics.median(samples['compiled copy_']):.3f} | "
                   f"{statistics.median(samples['plain index_put_']):.3f} | {ratio('step', 'copy_')} | "
                   f"{ratio('step', 'compiled copy_')} | {ratio('step', 'plain index_put_')} | "
                   f"{ratio('one', 'one copy_')} | "
                   f"{len(kernels)} + {len(aten_calls)} |")
    return "\n".join(out)


def rms_norm(k, weight, eps=1e-6):
    """RMSNorm over head_dim (the K norm of Gemma-style attention)."""
    x = k.float()
    return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight).to(k.dtype)


def rope(x, cos, sin):
    """Rotate-half RoPE, written with ``roll`` (Inductor indexes it in place instead of materializing a cat)."""
    half = x.shape[-1] // 2
    sign = torch.cat([-torch.ones(half, device=x.device), torch.ones(half, device=x.device)]).to(x.dtype)
    return x * cos + torch.roll(x, half, -1) * sign * sin


def norm_rope_store(k, weight, cos, sin, cache, block_table, cu_q_lens, context_kv_lens):
    """The K path of a decoder layer: norm, RoPE, store: one graph, so Inductor can fuse it."""
    kvpass.store_paged_single(rope(rms_norm(k, weight), cos, sin), cache, block_table, cu_q_lens, context_kv_lens)


def run_fused(args):
    """RMSNorm + RoPE + store of K: three separately compiled steps vs one compiled graph (and eager)."""
    device, dtype = args.device, getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(1)
    reps = 3 if args.quick else args.reps
    norm_c, rope_c = torch.compile(rms_norm, dynamic=False), torch.compile(rope, dynamic=False)
    store_c = torch.compile(kvpass.store_paged_single, dynamic=False)
    fused_c = torch.compile(norm_rope_store, dynamic=False)
    rows = []
    for n in (4096, 16384):
        c = make_case("prefill", n, args.heads, args.head_dim, args.block_size, dtype, device, gen)
        k, kc, idx = c["key"], c["key_cache"], (c["block_table"], c["cu_q_lens"], c["context_kv_lens"])
        w = torch.randn(args.head_dim, generator=gen).to(dtype).to(device)
        cos = torch.randn(n, 1, args.head_dim, generator=gen).to(dtype).to(device)
        sin = torch.randn(n, 1, args.head_dim, generator=gen).to(dtype).to(device)

        def unfused():
            store_c(rope_c(norm_c(k, w), cos, sin), kc, *idx)

        ref, out = kc.clone(), kc.clone()
        norm_rope_store(k, w, cos, sin, ref, *idx)
        fused_c(k, w, cos, sin, out, *idx)
        tol = 1e-4 if dtype == torch.float32 else 5e-2
        torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
        samples = timeit_rounds({
            "eager": lambda: norm_rope_store(k, w, cos, sin, kc, *idx),
            "unfused": unfused,
            "fused": lambda: fused_c(k, w, cos, sin, kc, *idx),
        }, device, reps)
        rows.append((f"prefill {n} tok", {k: statistics.median(v) for k, v in samples.items()}))
    out = ["| case | eager ms | 3 compiled steps ms | 1 compiled graph ms | unfused / fused |", "|---|---|---|---|---|"]
    for label, t in rows:
        out.append(f"| {label} | {t['eager']:.3f} | {t['unfused']:.3f} | {t['fused']:.3f} "
                   f"| {t['unfused'] / t['fused']:.2f}x |")
    return "\n".join(out)


def fmt_table(rows):
    """The results as a Markdown table (milliseconds per call, ratios)."""
    cols = ["chunk loop", "token loop", "eager", "compiled", "copy_", "compiled copy_"]
    out = ["| case | K+V bytes | " + " | ".join(f"{c} ms" for c in cols)
           + " | chunk loop / compiled | token loop / compiled | compiled / copy_ | eager / copy_ "
             "| compiled / compiled copy_ |",
           "|" + "---|" * (len(cols) + 7)]
    for label, t, nbytes in rows:
        out.append(f"| {label} | {nbytes / 2**20:.2f} MiB | " + " | ".join(f"{t[c]:.3f}" for c in cols)
                   + f" | {t['chunk loop'] / t['compiled']:.1f}x | {t['token loop'] / t['compiled']:.1f}x"
                   + "".join(f" | {statistics.median(r):.2f}x ({min(r):.2f}-{max(r):.2f})" for r in (
                       t["ratios"][("compiled", "copy_")], t["ratios"][("eager", "copy_")],
                       t["ratios"][("compiled", "compiled copy_")])) + " |")
    return "\n".join(out)


def main(argv=None):
    """Parse arguments, run the four cases, print the table."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--quick", action="store_true", help="3 repetitions per measurement")
    p.add_argument("--no-fused", action="store_true", help="skip the RMSNorm + RoPE + store table")
    p.add_argument("--no-modes", action="store_true", help="skip the addressing / quantized modes table")
    p.add_argument("--only-modes", action="store_true", help="print only the modes table")
    p.add_argument("--decode-only", action="store_true", help="the store table's decode cases only")
    p.add_argument("--decode-step", action="store_true",
                   help="print only the decode-step table (the store of --layers layers in one compiled function)")
    p.add_argument("--layers", type=int, default=8, help="layers of the decode-step table (default 8)")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("bench/store.py --device cuda: no CUDA device here; nothing measured (bench/store_gpu.py measures the "
              "GPU store against a device-to-device copy)")
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    torch._inductor.config.fx_graph_cache = False  # measure the current lowering, not a cached artifact
    torch._functorch.config.enable_autograd_cache = False
    print(f"# torch {torch.__version__}, device {args.device}, {args.dtype}, {args.heads} kv heads x "
          f"{args.head_dim} head_dim, block size {args.block_size}, threads {torch.get_num_threads()}")
    if args.decode_step:
        print(f"Decode step: the store of {args.layers} layers in one compiled function")
        print(run_decode_step(args))
        return
    if not args.only_modes:
        print(fmt_table(run(args)))
    if not args.no_modes:
        print()
        print("Compiled store_paged_kv by mode (issue 16)")
        print(run_modes(args))
    if not args.no_fused and not args.only_modes:
        print()
        print("K path: RMSNorm + RoPE + store_paged_single")
        print(run_fused(args))


if __name__ == "__main__":
    main()
