"""Child process of ``tests/test_store_triton.py``: the compiled paged store through Inductor's Triton backend,
without a GPU.

Two modes, each a process of its own (the first changes process-wide state: an interpreter, a stand-in driver,
Inductor's CPU backend):

``--run OUTDIR``
    ``TRITON_INTERPRET=1`` is set before triton is imported, triton gets a stand-in active driver whose
    ``get_current_target()`` is ``GPUTarget("cuda", 90, 32)`` (Inductor needs a target only to hash its backend),
    and ``torch._inductor.config.cpu_backend = "triton"``: Inductor then generates Triton kernels for CPU tensors
    and Triton's interpreter runs them. Every case (store mode, layout, dtype, quantization, fused RMSNorm + RoPE)
    is compiled once with ``run_and_get_code``; the report records the Triton kernels launched per call (in
    ``call``'s order), whether the compiled result equals eager, and every kernel's source (written to
    ``OUTDIR/case<N>/<kernel>.py``). The interpreter has no libdevice (``extern_elementwise``); the few functions these
    kernels use are given numpy stand-ins (``nearbyint``/``rint``: half to even, as libdevice; ``rsqrt``:
    ``1/sqrt`` in float32, within libdevice's 2 ulp), so the fused and int8 kernels run too (their float results
    are compared within a tolerance, their integer/fp8 codes within one step, every unwritten slot exactly).

``--cubin OUTDIR``
    Without ``TRITON_INTERPRET``: each kernel source in ``OUTDIR`` is loaded and compiled with
    ``triton.compile(ASTSource(fn, signature, constants), target=GPUTarget("cuda", arch, 32))`` for sm_80 and
    sm_90 (Triton's wheel ships ``ptxas``), for every autotuning config Inductor listed; the signature and the
    constants come from the kernel's ``triton_meta``. Triton has no float8_e4m3fn before sm_89 ("type fp8e4nv not
    supported in this architecture"): a kernel that stores e4m3 is reported as such for sm_80.

Prints one JSON object on its last line.
"""

from __future__ import annotations

import glob
import json
import os
import re
import sys
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


# ----------------------------------------------------------------------------------------------------------
# --run: Inductor's Triton backend, kernels run by Triton's interpreter
# ----------------------------------------------------------------------------------------------------------


def _setup_interpreter():
    os.environ["TRITON_INTERPRET"] = "1"
    import numpy as np
    import torch
    import triton  # noqa: F401  (after TRITON_INTERPRET)
    from triton.backends.compiler import GPUTarget
    from triton.backends.driver import DriverBase
    from triton.runtime import driver
    from triton.runtime import interpreter as interp

    class StandInDriver(DriverBase):
        """An active driver for hashing only: nothing is launched through it (the interpreter runs kernels)."""

        @classmethod
        def is_active(cls):
            return True

        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def get_active_torch_device(self):
            return torch.device("cpu")

        def get_benchmarker(self):
            raise NotImplementedError

        def map_python_to_cpp_type(self, ty):
            return ty

    driver.set_active(StandInDriver())

    stand_ins = {"nearbyint": np.rint, "rint": np.rint,
                 "rsqrt": lambda x: (np.float32(1) / np.sqrt(x)).astype(x.dtype)}
    builder = interp.interpreter_builder
    original = builder.create_extern_elementwise

    def create_extern_elementwise(libName, libPath, symbol, argList, retType, isPure):
        for name, fn in stand_ins.items():
            if re.fullmatch(rf"__nv_{name}f?", symbol):
                args = [a.data for a in argList]
                return interp.TensorHandle(fn(*args), argList[0].dtype.scalar)
        return original(libName, libPath, symbol, argList, retType, isPure)

    builder.create_extern_elementwise = create_extern_elementwise
    # Inductor's kernels call the backend-neutral stubs of triton.language.extra.libdevice (bodies ``...``,
    # replaced by the backend's functions only when compiled): give them the CUDA definitions, which reach the
    # builder above
    from triton.language.extra import libdevice
    from triton.language.extra.cuda import libdevice as cuda_libdevice
    for name in stand_ins:
        setattr(libdevice, name, lambda *args, _fn=getattr(cuda_libdevice, name):
                _fn(*args, _semantic=interp.interpreter_semantic))
    torch._inductor.config.cpu_backend = "triton"
    torch._inductor.config.fx_graph_cache = False
    torch._functorch.config.enable_autograd_cache = False


def _cases():
    """``{name: (fn, make_args, compare)}``: ``make_args()`` gives fresh arguments (caches last-but-some), ``fn``
    stores into the caches in place; ``compare(eager_caches, compiled_caches, before)`` returns None or a
    message."""
    import torch

    import kvpass
    from test_store_ops import SPECS, build, chunks_of, slot_mapping_of

    def bits(t):
        return t.view(torch.uint8) if t.dtype.itemsize == 1 and t.dtype != torch.int8 else t

    def exact(eager, comp, before):
        for e, c, b in zip(eager, comp, before):
            differ = bits(e) != bits(c)
            if e.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
                differ &= ~_interpreter_fp8_error(c, e)
            if differ.any():
                return f"compiled differs from eager in {int(differ.sum())} elements"
            if torch.equal(bits(e), bits(b)):
                return "eager wrote nothing (a vacuous case)"
        return None

    def close(eager, comp, before, step=1):
        """Float producers (RMSNorm): values within a tolerance / one quantization step, unwritten slots exact."""
        for e, c, b in zip(eager, comp, before):
            written = (bits(e) != bits(b)).reshape(-1, e.shape[-1]).any(-1)
            if not written.any():
                return "eager wrote nothing (a vacuous case)"
            cr, br = bits(c).reshape(-1, c.shape[-1]), bits(b).reshape(-1, b.shape[-1])
            if not torch.equal(cr[~written], br[~written]):
                return "compiled store touched an unwritten slot"
            if e.dtype.is_floating_point and e.dtype.itemsize > 1:
                if not torch.allclose(c.float(), e.float(), rtol=1e-4, atol=1e-4):
                    return f"compiled values differ: max {float((c.float() - e.float()).abs().max())}"
            elif (bits(c).int() - bits(e).int()).abs().max() > step:
                return "compiled codes differ by more than one step"
        return None

    def with_duplicates(case, slots):
        """Two valid tokens into one slot (the last must win) and a skipped token."""
        slots = slots.clone()
        valid = (slots >= 0).nonzero().flatten()
        slots[valid[-1]] = slots[valid[0]]  # token valid[-1] now rewrites valid[0]'s slot: it wins
        slots[valid[1]] = -1
        return slots

    cases = {}

    def slot_case(name, op, layout, dtype, cache_dtype=None, scale=None, pad=3):
        def make():
            c = build(SPECS["padding_rows_0_-1_5_q402"], dtype, layout, seed=5)
            slots = with_duplicates(c, slot_mapping_of(c, seed=5))
            k = torch.cat([c.key, torch.randn(pad, *c.key.shape[1:]).to(dtype)])  # a padded tail: ignored
            v = torch.cat([c.value, torch.randn(pad, *c.value.shape[1:]).to(dtype)])
            kc, vc = c.caches()
            if cache_dtype is not None:
                kc, vc = (torch.randint(-90, 90, kc.shape).to(cache_dtype) for _ in range(2))
            return (k, v, kc, vc), dict(slot_mapping=slots), scale
        cases[name] = (op, make, [2, 3] if op.kv else [2])

    def table_case(name, op, layout, dtype, spec, cache_dtype=None, scale=None, share=True):
        def make():
            c = build(SPECS[spec], dtype, layout, seed=7)
            table = c.block_table.clone()
            if share:  # two rows share a physical block: their overlapping positions are duplicates
                rows = [r for r in range(table.shape[0]) if c.context_kv_lens[r] >= 0]
                table[rows[-1], :] = table[rows[0], :]
            kc, vc = c.caches()
            if cache_dtype is not None:
                kc, vc = (torch.randint(-90, 90, kc.shape).to(cache_dtype) for _ in range(2))
            return ((c.key, c.value, kc, vc),
                    dict(block_table=table, cu_q_lens=c.cu_q_lens, context_kv_lens=c.context_kv_lens), scale)
        cases[name] = (op, make, [2, 3] if op.kv else [2])

    def kv_op(layout):
        def fn(k, v, kc, vc, kw, scale):
            q = {} if scale is None else dict(k_scale=scale, v_scale=scale)
            kvpass.store_paged_kv(k, v, kc, vc, layout=layout, **kw, **q)
        fn.kv = True
        return fn

    def single_op(layout):
        def fn(k, v, kc, vc, kw, scale):
            kvpass.store_paged_single(k, kc, layout=layout, scale=scale, **kw)
        fn.kv = False
        return fn

    per_head = torch.tensor([0.011, 0.017, 0.023, 0.031])
    per_tensor = torch.tensor([0.02])
    slot_case("kv/slot_mapping/HND/fp32", kv_op("HND"), "HND", torch.float32)
    slot_case("kv/slot_mapping/NHD/bf16", kv_op("NHD"), "NHD", torch.bfloat16)
    slot_case("single/slot_mapping/NHD/fp16", single_op("NHD"), "NHD", torch.float16)
    table_case("kv/block_table+cu_q_lens/NHD/bf16", kv_op("NHD"), "NHD", torch.bfloat16, "padding_rows_0_-1_5_q402")
    table_case("kv/block_table+cu_q_lens/HND/fp32", kv_op("HND"), "HND", torch.float32, "bucket_padded_bs8")
    table_case("kv/decode/HND/fp16", kv_op("HND"), "HND", torch.float16, "decode_padding_rows")
    table_case("single/block_table/HND/fp32", single_op("HND"), "HND", torch.float32, "holes_in_table", share=False)
    table_case("kv/int8-per-head/block_table/HND", kv_op("HND"), "HND", torch.float32, "padding_rows_0_-1_5_q402",
               cache_dtype=torch.int8, scale=per_head)
    slot_case("kv/fp8e4m3-per-tensor/slot_mapping/NHD", kv_op("NHD"), "NHD", torch.bfloat16,
              cache_dtype=torch.float8_e4m3fn, scale=per_tensor)
    slot_case("single/fp8e5m2-per-head/slot_mapping/HND", single_op("HND"), "HND", torch.float16,
              cache_dtype=torch.float8_e5m2, scale=per_head)

    def make_chunks():
        c = build(SPECS["holes_in_table"], torch.float32, "HND", seed=9)
        kc, vc = c.caches()
        return (c.key, c.value, kc, vc), dict(chunk_metadata=chunks_of(c, seed=9, extras=False)), None
    cases["single/chunk_metadata/HND/fp32"] = (single_op("HND"), make_chunks, [2])

    out = {name: (op, make, exact, at) for name, (op, make, at) in cases.items()}

    # RMSNorm + RoPE + (quantize +) store: the producers must run in the store's kernel
    from test_store_compile import _fused_inputs

    def rms_norm_rope(k, weight, cos, sin, eps=1e-6):
        """test_store_compile's RMSNorm + RoPE with the rotation's sign pointwise: its ``cat`` of two constant
        halves costs two kernels of its own on the Triton path, whatever the store does."""
        x = k.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight
        half = x.shape[-1] // 2
        sign = torch.where(torch.arange(x.shape[-1]) < half, -1.0, 1.0)
        return (x * cos + torch.roll(x, half, -1) * sign * sin).to(k.dtype)

    def fused_op(k, weight, cos, sin, cache, kw, scale):
        kvpass.store_paged_single(rms_norm_rope(k, weight, cos, sin), cache, scale=scale, **kw)

    def fused_make(cache_dtype=None, scale=None):
        def make():
            case, extra = _fused_inputs()
            cache = case.key_cache.clone()
            if cache_dtype is not None:
                cache = torch.randint(-90, 90, cache.shape).to(cache_dtype)
            kw = dict(block_table=case.block_table, cu_q_lens=case.cu_q_lens, context_kv_lens=case.context_kv_lens)
            return (case.key, *extra, cache), kw, scale
        return make

    out["fused/rmsnorm+rope+store/HND/fp32"] = (fused_op, fused_make(), close, [4])
    out["fused/rmsnorm+rope+int8/HND"] = (fused_op, fused_make(torch.int8, per_head), close, [4])
    return out


def _interpreter_fp8_error(got, want):
    """Where Triton's interpreter's float32 -> fp8 conversion (numpy emulation) can differ from torch's: a
    rounding carry into the next binade keeps the exponent (31.35 -> 16 instead of 32 in e4m3: exactly half) and
    ties round away from zero (25 -> 26 instead of 24: the adjacent code). Compiled code rounds as torch does;
    these cases wait for a GPU for bit-exactness, and :func:`_interpreter_fp8` pins that the interpreter still
    errs in these two ways only."""
    import torch

    halved = got.float() * 2 == want.float()
    adjacent = ((got.view(torch.uint8).int() - want.view(torch.uint8).int()).abs() == 1) & (
        got.float().sign() == want.float().sign())
    return halved | adjacent


def _interpreter_fp8():
    """How Triton's interpreter converts float32 to float8_e4m3fn against torch, on random values and exact
    ties: ``(mismatches, all of them of the kinds :func:`_interpreter_fp8_error` allows)``."""
    import torch
    import triton
    import triton.language as tl

    @triton.jit
    def convert(x, y, n, B: tl.constexpr):
        i = tl.arange(0, B)
        tl.store(y + i, tl.load(x + i, i < n).to(tl.float8e4nv), i < n)

    x = torch.randn(4096, generator=torch.Generator().manual_seed(0)) * 30
    x[:64] = torch.arange(64) * 2 + 17.0  # 17, 19, ..., 143: ties between e4m3 codes from 16 up
    y = torch.empty(4096, dtype=torch.float8_e4m3fn)
    convert[(1,)](x, y, 4096, B=4096)
    e = x.to(torch.float8_e4m3fn)
    differ = y.view(torch.uint8) != e.view(torch.uint8)
    return [int(differ.sum()), bool(_interpreter_fp8_error(y[differ], e[differ]).all())]


def run(outdir):
    _setup_interpreter()
    import torch
    from torch._inductor.utils import run_and_get_code

    report = {"_interpreter_fp8": _interpreter_fp8()}
    only = os.environ.get("KVPASS_TRITON_CASES")
    for number, (name, (op, make, compare, caches_at)) in enumerate(_cases().items()):
        if only and not re.search(only, name):
            continue
        entry = report[name] = {"kernels": None, "error": None, "sources": []}
        try:
            torch._dynamo.reset()
            args, kw, scale = make()
            before = [args[i].clone() for i in caches_at]
            eager_args = [a.clone() if i in caches_at else a for i, a in enumerate(args)]
            op(*eager_args, kw, scale)
            comp_args = [a.clone() if i in caches_at else a for i, a in enumerate(args)]
            compiled = torch.compile(lambda *a: op(*a, kw, scale), fullgraph=True, dynamic=False)
            _, code = run_and_get_code(compiled, *comp_args)
            wrapper = code[0]
            call = wrapper[wrapper.index("def call"):]
            entry["kernels"] = re.findall(r"(triton_\w+)\.run\(", call)
            entry["extern"] = sorted(set(re.findall(r"(extern_kernels\.\w+|torch\.ops\.\w+\.\w+)", call)))
            for kname, src in re.findall(r"(triton_\w+) = async_compile\.triton\('\w+', '''(.*?)''', device_str",
                                         wrapper, re.S):
                os.makedirs(os.path.join(outdir, f"case{number}"), exist_ok=True)
                with open(os.path.join(outdir, f"case{number}", f"{kname}.py"), "w") as f:
                    f.write(src)
                entry["sources"].append(f"case{number}/{kname}")
            entry["error"] = compare([eager_args[i] for i in caches_at], [comp_args[i] for i in caches_at], before)
        except Exception:  # noqa: BLE001 - reported to the parent, which fails the test with it
            entry["error"] = traceback.format_exc()[-3000:]
    print(json.dumps(report))


# ----------------------------------------------------------------------------------------------------------
# --cubin: every kernel to cubin for sm_80 and sm_90
# ----------------------------------------------------------------------------------------------------------


def cubin(outdir):
    assert not os.environ.get("TRITON_INTERPRET"), "compile to cubin without the interpreter"
    import importlib.util

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    report = {}
    for path in sorted(glob.glob(os.path.join(outdir, "case*", "triton_*.py"))):
        kname = os.path.basename(path)[:-3]
        key = os.path.relpath(path, outdir)[:-3]
        try:
            spec = importlib.util.spec_from_file_location(kname, path)
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
            tuner = getattr(mod, kname)
            archs = {}
            for arch in (80, 90):
                sizes = []
                for cfg in tuner.configs:
                    meta = tuner._create_compile_meta(cfg)
                    src = ASTSource(tuner.fn, meta["signature"], meta["constants"], meta["configs"][0])
                    try:
                        binary = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                                options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
                    except Exception as e:  # noqa: BLE001
                        if arch < 89 and "type fp8e4nv not supported in this architecture" in str(e):
                            sizes = "no float8_e4m3fn before sm_89 (Triton)"  # the hardware's limit, not kvpass's
                            break
                        raise
                    sizes.append(len(binary.asm["cubin"]))
                archs[f"sm_{arch}"] = sizes
            report[key] = {"error": None, "cubin_bytes": archs}
        except Exception:  # noqa: BLE001
            report[key] = {"error": traceback.format_exc()[-3000:]}
    print(json.dumps(report))


if __name__ == "__main__":
    mode, outdir = sys.argv[1], sys.argv[2]
    {"--run": run, "--cubin": cubin}[mode](outdir)
