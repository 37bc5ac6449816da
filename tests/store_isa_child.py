"""Child process of ``tests/test_store_isa.py``: the compiled store under one ``ATEN_CPU_CAPABILITY``.

Inductor picks its vector ISA (and ATen its kernels) from ``ATEN_CPU_CAPABILITY`` when it first generates code,
so each ISA runs in a process of its own, started with that variable and an empty ``TORCHINDUCTOR_CACHE_DIR``
(Inductor's FX graph cache does not key on the ISA: a warm cache compiled under AVX2 serves vectorized C++ to a
``default`` run, which then fails to build; measured on torch 2.13). Prints one JSON object on its last line:
``{"isa": <the ISA Inductor picked>, "results": {check: null | "what went wrong"}}``.

Usage: ``python tests/store_isa_child.py [--repro-only]``.
"""

from __future__ import annotations

import json
import os
import re
import sys
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

torch._inductor.config.fx_graph_cache = False
torch._functorch.config.enable_autograd_cache = False

from torch._inductor.utils import run_and_get_code  # noqa: E402

import kvpass  # noqa: E402
from kvpass.ops.reference import reference_store  # noqa: E402

SEEDS_PER_BUCKET = 6


def inductor_reductions_repro():
    """Inductor's vectorized int8 reductions against eager (pytorch/pytorch#191499): not kvpass code."""
    x = torch.arange(2, 102, dtype=torch.int8).flip(0).contiguous()  # 101..2: min 2 at index 99
    out = {}
    for name, fn in (("amin", torch.amin), ("argmin", torch.argmin)):
        torch._dynamo.reset()
        got = torch.compile(fn, fullgraph=True)(x)
        want = fn(x)
        out[name] = None if torch.equal(got, want) else f"compiled {int(got)} != eager {int(want)}"
    return out


def kvpass_checks():
    from store_random import BUCKETS, check, draw, store_fn
    from test_store_compile import COMPILED, _fused_inputs, _store_kv, _store_single, norm_rope_store
    from test_store_ops import SPECS, build, chunks_of

    results = {}

    def record(name, f):
        try:
            results[name] = f()
        except Exception:  # a crash is a failure of that check, not of the run
            results[name] = traceback.format_exc(limit=3)

    def compiled_case(name, layout, dtype, op, addressing):
        fn = _store_kv if op == "kv" else _store_single
        compiled = torch.compile(fn, fullgraph=True, dynamic=False)
        for seed in (1, 2):
            case = build(SPECS[name], dtype, layout, seed=seed)
            if addressing == "chunks":
                idx = (None, None, None, chunks_of(case, seed=seed, extras=False))
            else:
                idx = (*case.index, None)
            ck, cv = case.caches()
            compiled(case.key, case.value, ck, cv, *idx, layout)
            ref = reference_store(case.key, case.key_cache, *idx[:3], chunk_metadata=idx[3], layout=layout)
            if not torch.equal(ck, ref):
                return f"seed {seed}: compiled K differs from the reference"
        return None

    for c in COMPILED:
        record("compiled-" + "-".join([c[0], c[1], str(c[2])[6:], c[3], c[4]]), lambda c=c: compiled_case(*c))

    def fused():
        case, extra = _fused_inputs()
        eager = case.key_cache.clone()
        norm_rope_store(case.key, *extra, eager, *case.index)
        out = case.key_cache.clone()
        _, code = run_and_get_code(torch.compile(norm_rope_store, fullgraph=True), case.key, *extra, out,
                                   *case.index)
        written = (eager != case.key_cache).any(-1)
        if not torch.equal(out[~written], case.key_cache[~written]):
            return "compiled store touched an unwritten slot"
        if not torch.allclose(out, eager, rtol=1e-5, atol=1e-5):
            return f"{int((out != eager).sum())} elements differ from eager"
        call = code[0][code[0].index("def call"):]
        scatters = [k for k in re.findall(r"(cpp_fused\w*)\(", call) if "index_put" in k]
        if len(scatters) != 1 or not all(op in scatters[0] for op in ("mean", "rsqrt", "roll")):
            return f"RMSNorm + RoPE not fused into one scatter kernel: {scatters}"
        return None

    record("fused-norm-rope", fused)

    def no_vector_argmin():
        """Structural guard: no argmin/argmax reduction in any generated store kernel (the miscompiled op)."""
        case = build(SPECS["past_table_width"], torch.float32, "NHD", seed=1)
        _, code = run_and_get_code(torch.compile(_store_single, fullgraph=True), case.key, case.value,
                                   case.key_cache.clone(), case.value_cache.clone(), *case.index, None, "NHD")
        found = sorted(set(re.findall(r"\b(arg(?:min|max)\w*|IndexValueVec)\b", "\n".join(code))))
        return f"generated code uses {found}" if found else None

    record("no-argmin-in-generated-code", no_vector_argmin)

    for b in BUCKETS:
        def fuzz(b=b):
            compiled = torch.compile(store_fn(b), fullgraph=True, dynamic=False)
            for seed in range(SEEDS_PER_BUCKET):
                msg = check(draw(b, seed), compiled)
                if msg:
                    return f"seed {seed}: {msg}"
            return None
        record("random-" + b.name, fuzz)
    return results


def main():
    from torch._inductor import cpu_vec_isa

    picked = cpu_vec_isa.pick_vec_isa()
    isa = str(picked) if picked else "default"  # the invalid ISA (no vectorization) is falsy
    results = inductor_reductions_repro()
    results = {"inductor-int8-" + k: v for k, v in results.items()}
    if "--repro-only" not in sys.argv:
        results.update(kvpass_checks())
    print(json.dumps({"isa": isa, "capability": torch.backends.cpu.get_cpu_capability(), "results": results}))


if __name__ == "__main__":
    main()
