"""Benchmark of the paged KV store: upstream's per-chunk loop vs kvpass's eager op vs the compiled op vs copy_.

Usage::

    python bench/store.py                      # CPU, fp32, 8 kv heads x 128 head_dim, block size 16
    python bench/store.py --device cuda --dtype bfloat16
    python bench/store.py --quick              # fewer repetitions (a smoke run)

Cases: prefill of 4096 and 16384 new tokens (4 sequences with ragged, block-unaligned contexts) and decode of
8 and 64 sequences (one token each). Every case stores K and V (``store_paged_kv``) into HND caches with room
for twice the written tokens, blocks shuffled. Columns (milliseconds per call: the best of ``--reps`` timed
batches after warm-up, the implementations interleaved batch by batch; best-of because the machine may be shared):

* ``chunk loop``: the upstream torch reference's algorithm (per sequence, per block chunk, ``.item()`` and two
  slice assignments): ``kvpass.ops.reference.loop_store_paged_kv``;
* ``token loop``: a per-token Python loop (DESIGN section 5's baseline): ``token_loop_store_paged_kv``;
* ``eager``: ``kvpass.store_paged_kv`` (validation + vectorized index arithmetic + one ``index_put_`` per cache);
* ``compiled``: ``torch.compile(kvpass.store_paged_kv)`` (Inductor-generated scatter);
* ``copy_``: ``copy_`` of the same bytes (new K and V into preallocated buffers), the floor;
* ratios: chunk loop / compiled, token loop / compiled, compiled / copy_, eager / copy_.

A second table times the K path of a layer, RMSNorm + RoPE + ``store_paged_single``, as three separately compiled
steps (K materialized between them) against one compiled graph (Inductor fuses the three into the scatter kernel).

Before timing, every implementation's result is checked against the chunk loop (exact equality). Inductor's
on-disk caches are disabled so that the compiled column measures the current lowering, not a cached one.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import kvpass  # noqa: E402
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
        ctx = torch.randint(0, 4096, (rows,), generator=gen)
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
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    inner = {}
    for name, fn in fns.items():
        for _ in range(3):
            fn()
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        inner[name] = max(1, int(min_time / max(time.perf_counter() - t0, 1e-6)))
    samples = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            for _ in range(inner[name]):
                fn()
            sync()
            samples[name].append((time.perf_counter() - t0) / inner[name] * 1e3)
    return {name: min(v) for name, v in samples.items()}


def run(args):
    """The store table's rows: for each case, the five implementations' times (after an equality check)."""
    device, dtype = args.device, getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(0)
    reps = 3 if args.quick else args.reps
    compiled = torch.compile(kvpass.store_paged_kv, dynamic=False)
    cases = [("prefill", 4096), ("prefill", 16384), ("decode", 8), ("decode", 64)]
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
        times = timeit_all({
            "chunk loop": lambda: loop_store_paged_kv(*kv, kc, vc, *idx),
            "token loop": lambda: token_loop_store_paged_kv(*kv, kc, vc, *idx),
            "eager": lambda: kvpass.store_paged_kv(*kv, kc, vc, *idx),
            "compiled": lambda: compiled(*kv, kc, vc, *idx),
            "copy_": lambda: (kdst.copy_(c["key"]), vdst.copy_(c["value"])),
        }, device, reps)
        label = f"prefill {n} tok" if kind == "prefill" else f"decode {n} seq"
        rows.append((label, times, 2 * c["key"].numel() * c["key"].element_size()))
    return rows


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
        times = timeit_all({
            "eager": lambda: norm_rope_store(k, w, cos, sin, kc, *idx),
            "unfused": unfused,
            "fused": lambda: fused_c(k, w, cos, sin, kc, *idx),
        }, device, reps)
        rows.append((f"prefill {n} tok", times))
    out = ["| case | eager ms | 3 compiled steps ms | 1 compiled graph ms | unfused / fused |", "|---|---|---|---|---|"]
    for label, t in rows:
        out.append(f"| {label} | {t['eager']:.3f} | {t['unfused']:.3f} | {t['fused']:.3f} "
                   f"| {t['unfused'] / t['fused']:.2f}x |")
    return "\n".join(out)


def fmt_table(rows):
    """The results as a Markdown table (milliseconds per call, ratios)."""
    cols = ["chunk loop", "token loop", "eager", "compiled", "copy_"]
    out = ["| case | K+V bytes | " + " | ".join(f"{c} ms" for c in cols)
           + " | chunk loop / compiled | token loop / compiled | compiled / copy_ | eager / copy_ |",
           "|" + "---|" * (len(cols) + 6)]
    for label, t, nbytes in rows:
        out.append(f"| {label} | {nbytes / 2**20:.2f} MiB | " + " | ".join(f"{t[c]:.3f}" for c in cols)
                   + f" | {t['chunk loop'] / t['compiled']:.1f}x | {t['token loop'] / t['compiled']:.1f}x"
                   + f" | {t['compiled'] / t['copy_']:.2f}x | {t['eager'] / t['copy_']:.2f}x |")
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
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch._inductor.config.fx_graph_cache = False  # measure the current lowering, not a cached artifact
    torch._functorch.config.enable_autograd_cache = False
    rows = run(args)
    print(f"# torch {torch.__version__}, device {args.device}, {args.dtype}, {args.heads} kv heads x "
          f"{args.head_dim} head_dim, block size {args.block_size}, threads {torch.get_num_threads()}")
    print(fmt_table(rows))
    if not args.no_fused:
        print()
        print("K path: RMSNorm + RoPE + store_paged_single")
        print(run_fused(args))


if __name__ == "__main__":
    main()
