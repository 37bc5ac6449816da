"""GPU benchmark of the compiled paged store: bandwidth against a device-to-device copy, fused against unfused
producers, and the generated kernels per call.

Usage::

    python bench/store_gpu.py                 # CUDA; prints Markdown tables for BENCHMARKS.md ("Paged store on a GPU")
    python bench/store_gpu.py --quick         # fewer rounds

Without CUDA it prints why and exits 0 (nothing measured). Cases (bf16, 8 kv heads x 128, block size 16, HND
caches with room for twice the tokens, blocks shuffled):

* bandwidth: ``torch.compile(kvpass.store_paged_kv)`` with ``slot_mapping`` and with ``block_table`` +
  ``cu_q_lens``, 16384 and 4096 tokens, against ``copy_`` of the same K+V bytes into a preallocated buffer (the
  device-to-device floor); goal: the store at >= 85% of the copy's bandwidth at 16384 tokens. The store's time
  includes its plan (computed per call here; a model shares it across layers);
* fusion: RMSNorm + RoPE + ``store_paged_single`` compiled as one graph against three separately compiled steps;
* kernels: the Triton kernels launched per call (``run_and_get_code``) for each addressing mode.

Method (as ``bench/store.py``, ``kvpass/timing.py``): the same warm-up for every runner, interleaved rounds,
median and min-max per runner, ratios computed per round. Every store is first checked equal to eager.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import kvpass  # noqa: E402
from store import make_case, rms_norm, timeit_rounds  # noqa: E402


def rope(x, cos, sin):
    """Rotate-half RoPE with a pointwise sign (no ``cat`` of constants: those are kernels of their own)."""
    half = x.shape[-1] // 2
    sign = torch.where(torch.arange(x.shape[-1], device=x.device) < half, -1.0, 1.0).to(x.dtype)
    return x * cos + torch.roll(x, half, -1) * sign * sin


def slots_of(c, block_size):
    """The block-table addressing of a prefill case as a vLLM slot mapping (int64, one slot per token)."""
    cu, ctx, table = (c["cu_q_lens"].long(), c["context_kv_lens"].long(), c["block_table"].long())
    tokens = c["key"].shape[0]
    e = torch.arange(tokens, device=cu.device)
    b = torch.searchsorted(cu[1:], e, right=True)
    p = ctx[b] + e - cu[b]
    return table[b, p // block_size] * block_size + p % block_size


def kernels_per_call(fn, *args):
    """Triton kernels launched by one call of the compiled ``fn`` (names, in order)."""
    from torch._inductor.utils import run_and_get_code

    _, code = run_and_get_code(fn, *args)
    call = code[0][code[0].index("def call"):]
    return re.findall(r"(triton_\w+)\.run\(", call)


def bandwidth(args, rounds):
    """The store against copy_ of the same bytes, per mode and size."""
    out = ["| tokens | addressing | K+V MiB | store ms (median, min-max) | copy_ ms (median) | copy_ / store per round "
           "(median, min-max) | store GB/s (bytes written) | kernels per call |", "|---|---|---|---|---|---|---|---|"]
    gen = torch.Generator().manual_seed(0)
    for n in (16384, 4096):
        c = make_case("prefill", n, 8, 128, 16, torch.bfloat16, "cuda", gen)
        kv = (c["key"], c["value"])
        modes = {"slot_mapping": dict(slot_mapping=slots_of(c, 16)),
                 "block_table + cu_q_lens": dict(block_table=c["block_table"], cu_q_lens=c["cu_q_lens"],
                                                 context_kv_lens=c["context_kv_lens"])}
        for mode, kw in modes.items():
            fn = torch.compile(lambda k, v, kc, vc, kw=kw: kvpass.store_paged_kv(k, v, kc, vc, **kw), dynamic=False)
            ek, ev, ck, cv = (c["key_cache"].clone(), c["value_cache"].clone(), c["key_cache"].clone(),
                              c["value_cache"].clone())
            kvpass.store_paged_kv(*kv, ek, ev, **kw)
            kernels = kernels_per_call(fn, *kv, ck, cv)
            if not (torch.equal(ek, ck) and torch.equal(ev, cv)):
                raise SystemExit(f"{mode} {n}: compiled store differs from eager")
            kd, vd = torch.empty_like(kv[0]), torch.empty_like(kv[1])
            s = timeit_rounds({"store": lambda: fn(*kv, ck, cv),
                               "copy": lambda: (kd.copy_(kv[0]), vd.copy_(kv[1]))}, "cuda", rounds)
            ratios = [b / a for a, b in zip(s["store"], s["copy"])]
            nbytes = 2 * kv[0].numel() * kv[0].element_size()
            med = statistics.median(s["store"])
            out.append(f"| {n} | {mode} | {nbytes / 2**20:.1f} | {med:.4f} ({min(s['store']):.4f}-"
                       f"{max(s['store']):.4f}) | {statistics.median(s['copy']):.4f} | "
                       f"{100 * statistics.median(ratios):.1f}% ({100 * min(ratios):.1f}-{100 * max(ratios):.1f}%) | "
                       f"{nbytes / med / 1e6:.0f} | {len(kernels)} |")
    return "\n".join(out)


def fusion(args, rounds):
    """RMSNorm + RoPE + store of K: one compiled graph against three compiled steps."""
    out = ["| tokens | 3 compiled steps ms (median) | 1 compiled graph ms (median) | unfused / fused per round "
           "(median, min-max) | kernels per call (fused) |", "|---|---|---|---|---|"]
    gen = torch.Generator().manual_seed(1)
    norm_c, rope_c = torch.compile(rms_norm, dynamic=False), torch.compile(rope, dynamic=False)
    store_c = torch.compile(kvpass.store_paged_single, dynamic=False)

    def norm_rope_store(k, w, cos, sin, cache, *idx):
        kvpass.store_paged_single(rope(rms_norm(k, w), cos, sin), cache, *idx)

    fused_c = torch.compile(norm_rope_store, dynamic=False)
    for n in (16384, 4096):
        c = make_case("prefill", n, 8, 128, 16, torch.bfloat16, "cuda", gen)
        k, kc = c["key"], c["key_cache"]
        idx = (c["block_table"], c["cu_q_lens"], c["context_kv_lens"])
        w = torch.randn(128, generator=gen).to(torch.bfloat16).cuda()
        cos, sin = (torch.randn(n, 1, 128, generator=gen).to(torch.bfloat16).cuda() for _ in range(2))
        ref, out_ = kc.clone(), kc.clone()
        norm_rope_store(k, w, cos, sin, ref, *idx)
        kernels = kernels_per_call(fused_c, k, w, cos, sin, out_, *idx)
        torch.testing.assert_close(out_, ref, rtol=5e-2, atol=5e-2)
        s = timeit_rounds({"unfused": lambda: store_c(rope_c(norm_c(k, w), cos, sin), kc, *idx),
                           "fused": lambda: fused_c(k, w, cos, sin, kc, *idx)}, "cuda", rounds)
        ratios = [a / b for a, b in zip(s["unfused"], s["fused"])]
        out.append(f"| {n} | {statistics.median(s['unfused']):.4f} | {statistics.median(s['fused']):.4f} | "
                   f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}) | {len(kernels)} |")
    return "\n".join(out)


def main(argv=None):
    """Parse arguments; without CUDA, say so and exit 0."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="5 rounds instead of 15")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/store_gpu.py: no CUDA device here; nothing measured (run it on a GPU machine)")
        return 0
    torch._inductor.config.fx_graph_cache = False
    torch._functorch.config.enable_autograd_cache = False
    rounds = 5 if args.quick else 15
    print(f"# torch {torch.__version__}, {torch.cuda.get_device_name()}, bf16, 8 kv heads x 128, block size 16")
    print("\nStore bandwidth against a device-to-device copy_ of the same bytes")
    print(bandwidth(args, rounds))
    print("\nRMSNorm + RoPE + store_paged_single: fused (one graph) against unfused (three compiled steps)")
    print(fusion(args, rounds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
