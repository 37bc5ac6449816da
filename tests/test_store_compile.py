"""The paged store ops under torch.compile: the lowering (index arithmetic + one scatter), its masking, and
its fusion with the producer of K (RMSNorm + RoPE).

Each test compiles few graphs (compiles dominate the runtime). Inductor's on-disk caches are turned off here:
AOTAutograd keys its cache on the Dynamo graph, which names the op but not kvpass's decomposition, so a cached
artifact could hide a change to the lowering.
"""

from __future__ import annotations

import re

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch._inductor.utils import run_and_get_code

import kvpass
from kvpass.ops.reference import reference_store
from test_store_ops import SPECS, Spec, build, chunks_of

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(autouse=True)
def _fresh_inductor():
    with torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        yield


def _store_kv(key, value, key_cache, value_cache, block_table, cu_q_lens, context_kv_lens, chunks, layout):
    kvpass.store_paged_kv(key, value, key_cache, value_cache, block_table, cu_q_lens, context_kv_lens,
                          chunk_metadata=chunks, layout=layout)


def _store_single(key, value, key_cache, value_cache, block_table, cu_q_lens, context_kv_lens, chunks, layout):
    torch.ops.kvpass.store_paged_single(key, key_cache, block_table, cu_q_lens, context_kv_lens, chunks,
                                        layout=layout)


COMPILED = [  # (spec, layout, dtype, op, addressing)
    ("padding_rows_32_-1_35", "HND", torch.float32, "kv", "table"),
    ("bucket_padded_bs8", "NHD", torch.bfloat16, "kv", "table"),
    ("decode_padding_rows", "HND", torch.float16, "single", "table"),
    ("past_table_width", "NHD", torch.float32, "single", "table"),
    ("holes_in_table", "HND", torch.float32, "single", "chunks"),
]


@pytest.mark.parametrize("name,layout,dtype,op,addressing", COMPILED,
                         ids=["-".join([c[0], c[1], str(c[2])[6:], c[3], c[4]]) for c in COMPILED])
def test_compiled_equals_eager_and_reference(name, layout, dtype, op, addressing):
    fn = _store_kv if op == "kv" else _store_single
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(fn, backend=counter, fullgraph=True, dynamic=False)
    for seed in (1, 2):  # new data (contexts, tables, states) with the same shapes: no recompile
        case = build(SPECS[name], dtype, layout, seed=seed)
        if addressing == "chunks":
            args = (case.key, case.value, None, None, None, None, None, chunks_of(case, seed=seed, extras=False))
        else:
            args = (case.key, case.value, None, None, *case.index, None)
        eager_k, eager_v = case.caches()
        fn(*args[:2], eager_k, eager_v, *args[4:], layout)
        comp_k, comp_v = case.caches()
        compiled(*args[:2], comp_k, comp_v, *args[4:], layout)
        ref_k = reference_store(case.key, case.key_cache, *args[4:7], chunk_metadata=args[7], layout=layout)
        assert not torch.equal(ref_k, case.key_cache)
        assert torch.equal(eager_k, ref_k) and torch.equal(comp_k, ref_k), "compiled K store differs"
        assert torch.equal(comp_v, eager_v)
    assert counter.frame_count == 1


def test_compiled_when_no_slot_is_free():
    """More tokens than cache slots (every slot may be written): the trace-time fallback stays exact."""
    g = torch.Generator().manual_seed(3)
    states = torch.randn(40, 2, 32, generator=g)
    cache = torch.randn(2, 2, 16, 32, generator=g)  # 32 slots < 40 tokens
    table = torch.tensor([[1, 0]], dtype=torch.int32)  # tokens 32..39 are past the table
    cu, ctx = torch.tensor([0, 40], dtype=torch.int32), torch.tensor([0], dtype=torch.int32)
    ref = reference_store(states, cache, table, cu, ctx)
    assert not torch.equal(ref, cache)
    for tbl in (table, torch.tensor([[1, -1]], dtype=torch.int32)):  # all slots written / a free slot exists
        ref = reference_store(states, cache, tbl, cu, ctx)
        out = cache.clone()
        torch.compile(kvpass.store_paged_single, fullgraph=True)(states, out, tbl, cu, ctx)
        assert torch.equal(out, ref)


def test_compiled_masks_out_of_range_targets():
    """Under compile the data-dependent checks cannot run; out-of-range targets are masked, never written."""
    case = build(Spec([0, 3, 9], [12, 9, 10], 2, 32, 8, spare_blocks=0), torch.float32, "HND", seed=6)
    nb = case.key_cache.shape[0]
    bad = case.block_table.clone()
    bad[0, 0], bad[1, 0], bad[2, 1] = nb, -7, nb + 100  # rejected in eager, skipped under compile
    assert (bad >= 0).any()
    with pytest.raises(ValueError, match="block_table: block ids must lie in"):
        kvpass.store_paged_single(case.key, case.key_cache.clone(), bad, *case.index[1:])
    expected = reference_store(case.key, case.key_cache, torch.where((bad < 0) | (bad >= nb), -1, bad),
                               *case.index[1:])
    out = case.key_cache.clone()
    torch.compile(kvpass.store_paged_single, fullgraph=True)(case.key, out, bad, *case.index[1:])
    assert torch.equal(out, expected) and not torch.equal(out, case.key_cache)

    # chunks: past the block, past the tokens, past the cache; only their in-range elements are stored
    bs, tokens = case.key_cache.shape[2], case.key.shape[0]
    chunks = torch.tensor([[0, 1, 6, 4], [tokens - 2, 2, 0, 4], [2, nb, 0, 2], [4, 3, 1, 1]], dtype=torch.int32)
    expected = case.key_cache.clone()
    for src, blk, off, n in chunks.tolist():
        for i in range(n):
            if 0 <= blk < nb and off + i < bs and src + i < tokens:
                expected[blk, :, off + i] = case.key[src + i]
    out = case.key_cache.clone()
    torch.compile(kvpass.store_paged_single, fullgraph=True)(case.key, out, chunk_metadata=chunks)
    assert torch.equal(out, expected)


# ----------------------------------------------------------------------------------------------------------
# Fusion with the producer of K
# ----------------------------------------------------------------------------------------------------------


def rms_norm_rope(k, weight, cos, sin, eps=1e-6):
    """RMSNorm over head_dim, then rotate-half RoPE (written with roll, which Inductor indexes in place)."""
    x = k.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight
    half = x.shape[-1] // 2
    sign = torch.cat([-torch.ones(half, device=k.device), torch.ones(half, device=k.device)])
    return (x * cos + torch.roll(x, half, -1) * sign * sin).to(k.dtype)


def norm_rope_store(k, weight, cos, sin, cache, block_table, cu_q_lens, context_kv_lens):
    kvpass.store_paged_single(rms_norm_rope(k, weight, cos, sin), cache, block_table, cu_q_lens, context_kv_lens)


def _fused_inputs(device="cpu"):
    case = build(Spec([3, 17, -1, 40], [30, 34, 2, 9], 4, 128, 16), torch.float32, "HND", seed=8, device=device)
    g = torch.Generator().manual_seed(9)
    tokens = case.key.shape[0]
    extra = [torch.randn(128, generator=g), torch.randn(tokens, 1, 128, generator=g),
             torch.randn(tokens, 1, 128, generator=g)]
    return case, [t.to(device) for t in extra]


def _check_fused(case, extra, code, kernel_re):
    wrapper = code[0]
    call = wrapper[wrapper.index("def call"):]
    kernels = re.findall(kernel_re, call)
    scatters = [k for k in kernels if "index_put" in k]
    assert len(scatters) == 1, f"expected one scatter kernel, got {kernels}"
    for op in ("mean", "rsqrt", "roll"):  # the RMSNorm reduction and the RoPE rotation run in the scatter kernel
        assert op in scatters[0], f"{op} not fused into {scatters[0]}"
    tokens, heads, dim = case.key.shape
    allocations = re.findall(r"empty_strided_\w+\((\([^)]*\))", call)
    assert allocations, "the check below would be vacuous"
    assert f"({tokens}, {heads}, {dim})" not in allocations, f"normalized K was materialized: {allocations}"
    assert "torch.ops.kvpass" not in wrapper and "auto_functionalized" not in wrapper


def _check_fused_triton(case, code):
    """On the Triton path the store is kvpass's masked scatter (``kvpass/ops/_masked_store.py``): it runs last,
    after the plan, and holds the RMSNorm reduction and the RoPE rotation (tests/test_store_triton.py checks the
    same without a GPU)."""
    wrapper = code[0]
    call = wrapper[wrapper.index("def call"):]
    kernels = re.findall(r"(triton_\w+)\.run\(", call)
    for op in ("mean", "rsqrt", "roll"):
        assert op in kernels[-1], f"{op} not fused into the store kernel {kernels[-1]}"
    tokens, heads, dim = case.key.shape
    assert f"({tokens}, {heads}, {dim})" not in str(re.findall(r"empty_strided_\w+\((\([^)]*\))", call))
    assert "torch.ops.kvpass" not in wrapper and "auto_functionalized" not in wrapper


def test_norm_rope_fuse_into_the_one_scatter_kernel():
    case, extra = _fused_inputs()
    eager = case.key_cache.clone()
    norm_rope_store(case.key, *extra, eager, *case.index)
    out = case.key_cache.clone()
    _, code = run_and_get_code(torch.compile(norm_rope_store, fullgraph=True), case.key, *extra, out, *case.index)
    _check_fused(case, extra, code, r"(cpp_fused\w*)\(")
    written = (eager != case.key_cache).any(-1)
    assert written.any()
    assert torch.equal(out[~written], case.key_cache[~written]), "compiled store touched an unwritten slot"
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@requires_cuda
def test_cuda_compiled_equals_eager_and_fuses():
    case, extra = _fused_inputs("cuda")
    eager = case.key_cache.clone()
    norm_rope_store(case.key, *extra, eager, *case.index)
    out = case.key_cache.clone()
    _, code = run_and_get_code(torch.compile(norm_rope_store, fullgraph=True), case.key, *extra, out, *case.index)
    _check_fused_triton(case, code)
    written = (eager != case.key_cache).any(-1)
    assert torch.equal(out[~written], case.key_cache[~written])
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    for name, layout, dtype, op, _ in COMPILED[:3]:
        c = build(SPECS[name], dtype, layout, seed=1, device="cuda")
        kc, vc = c.caches()
        torch.compile(kvpass.store_paged_kv)(c.key, c.value, kc, vc, *c.index, layout=layout)
        assert torch.equal(kc, reference_store(c.key, c.key_cache, *c.index, layout=layout))
        assert torch.equal(vc, reference_store(c.value, c.value_cache, *c.index, layout=layout))


# ----------------------------------------------------------------------------------------------------------
# Quantized store under compile (issue 16): the quantize step fuses into the one scatter kernel
# ----------------------------------------------------------------------------------------------------------


def norm_rope_store_quantized(k, weight, cos, sin, cache, block_table, cu_q_lens, context_kv_lens, scale):
    kvpass.store_paged_single(rms_norm_rope(k, weight, cos, sin), cache, block_table, cu_q_lens, context_kv_lens,
                              scale=scale)


@pytest.mark.parametrize("cache_dtype,per_head", [(torch.int8, True), (torch.float8_e4m3fn, False)],
                         ids=["int8-scaleH", "fp8e4m3-scale1"])
def test_norm_rope_quantize_fuse_into_the_one_scatter_kernel(cache_dtype, per_head):
    """RMSNorm + RoPE + quantize + store: one generated scatter kernel, nothing of (tokens, heads, dim) allocated.
    The compiled normalization may round differently from eager in the last float bit, so the quantized values
    agree within one quantization step (int8: |difference| <= 1; fp8: adjacent codes); slots not written keep
    their bytes exactly."""
    case, extra = _fused_inputs()
    heads = case.key.shape[1]
    scale = torch.full((heads if per_head else 1,), 0.02) * (torch.arange(heads) + 1 if per_head else 1)
    g = torch.Generator().manual_seed(12)
    raw = torch.randint(-100, 100, case.key_cache.shape, generator=g)
    cache0 = raw.to(cache_dtype)
    eager = cache0.clone()
    norm_rope_store_quantized(case.key, *extra, eager, *case.index, scale)
    out = cache0.clone()
    _, code = run_and_get_code(torch.compile(norm_rope_store_quantized, fullgraph=True), case.key, *extra, out,
                               *case.index, scale)
    _check_fused(case, extra, code, r"(cpp_fused\w*)\(")
    call = code[0][code[0].index("def call"):]
    scatter = next(k for k in re.findall(r"(cpp_fused\w*)\(", call) if "index_put" in k)
    for op in ("div", "round" if cache_dtype == torch.int8 else "clamp"):  # the quantize step is in it too
        assert op in scatter, f"{op} not fused into {scatter}"
    b = (lambda t: t) if cache_dtype == torch.int8 else (lambda t: t.view(torch.uint8))
    written = (b(eager) != b(cache0)).any(-1)
    assert written.sum() > 10
    assert torch.equal(b(out)[~written], b(cache0)[~written]), "compiled store touched an unwritten slot"
    if cache_dtype == torch.int8:
        assert (out.int() - eager.int()).abs().max() <= 1
    else:  # adjacent fp8 codes of the same sign differ by 1 in their bit pattern
        assert (b(out).int() - b(eager).int()).abs().max() <= 1
    assert (b(out) == b(eager)).float().mean() > 0.99
