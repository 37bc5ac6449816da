"""kvpass.check: K/V that a capture baked as constants or cut off, found in GraphModules, ExportedPrograms, .pt2.

The stock captures of the reference model are pinned as torch 2.13 produces them (node names and kinds), with the
differences of later torch lines named in ``kvpass.compat``, so a PyTorch upgrade that changes what they bake
fails here loudly:

- ``make_fx(tracing_mode="real")`` of a prefill step: every host-buffer read becomes ``_tensor_constant<N>`` +
  ``lift_fresh_copy`` holding the *trace-time* K/V (stale, non-zero); SDPA is decomposed into ``bmm`` /
  ``_safe_softmax`` / ``bmm`` (2.13; one fused op from 2.14 on); the computed K/V end in a dangling
  ``detach -> detach`` (``alias -> alias`` from 2.14 on).
- ``torch.export(strict=True)`` with the caches built before the call: each numpy host buffer is a lifted
  ``CONSTANT_TENSOR`` named ``_captured_<N>`` (a FakeTensor!), written with ``copy_`` into a ``slice`` of it and read
  back through ``slice -> to -> repeat_interleave`` into ``aten.scaled_dot_product_attention``.
- ``torch.export(strict=False)`` fails (``.numpy()`` of a FakeTensor); strict export fails on ``np.pad``.
"""

from __future__ import annotations

import ast
import inspect
import linecache
import re
import contextlib
import pathlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.fx.experimental.proxy_tensor import make_fx

import kvpass
from kvpass.compat import MAKE_FX_DETACH, SDPA_UNBATCHED_DECOMPOSED
from kvpass.fidelity import (
    CONSTANT_KV, DANGLING_KV, MUTATED_CONSTANT, CheckInputError, FidelityError, Finding, ProgramLoadError,
    check, format_findings, require_faithful,
)
from kvpass.examples.shared_kv_model import SHARED, READONLY, SharedKVConfig, reference_model

pytestmark = [
    pytest.mark.filterwarnings("ignore:While compiling, we found certain side effects:UserWarning"),
    pytest.mark.filterwarnings("ignore:No complete tensor found in the group:UserWarning"),
]

NO_PAD = SharedKVConfig(follower_caches=[SHARED, READONLY, SHARED])  # np.pad does not survive Dynamo


class Step(nn.Module):
    """The stateful model step as a module, for torch.export (caches live on the wrapped model)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return self.model(input_ids)


def _eager(model, ids, prefill=None):
    model.reset()
    with torch.no_grad():
        if prefill is not None:
            model(prefill)
        return model(ids)


def _ids(gen, n, vocab=64):
    return torch.randint(0, vocab, (1, n), generator=gen)


# --------------------------------------------------------------------------------------------------------
# Stock captures of the reference model (module scope: each is traced once)
# --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def makefx_prefill():
    """make_fx real mode of a prefill step from an empty cache, with stack traces recorded."""
    model = reference_model(SharedKVConfig(), seed=0)
    ids = _ids(torch.Generator().manual_seed(1), 8)

    def step(input_ids):
        model.reset()
        return model(input_ids)

    with torch.no_grad():
        gm = make_fx(step, tracing_mode="real", record_stack_traces=True)(ids)
    gm.trace_caches = model.caches  # the host buffers the trace ran on (tests reset the model later)
    return model, ids, gm


@pytest.fixture(scope="module")
def strict_export():
    """torch.export(strict=True) of a prefill step; the caches exist before the call, as in any real use."""
    model = reference_model(NO_PAD, seed=0)
    model.reset()
    ids = _ids(torch.Generator().manual_seed(2), 8)
    ep = torch.export.export(Step(model), (ids,), strict=True)
    return model, ids, ep


@pytest.fixture(scope="module")
def exported_makefx(makefx_prefill, tmp_path_factory):
    """The make_fx graph exported (its _tensor_constant<N> become buffers) and saved as .pt2."""
    _, ids, gm = makefx_prefill
    ep = torch.export.export(gm, (ids,), strict=False)
    path = tmp_path_factory.mktemp("check") / "makefx_prefill.pt2"
    torch.export.save(ep, path)
    return ep, path


def test_makefx_prefill_flags_every_kv_constant_with_source_line(makefx_prefill):
    model, ids, gm = makefx_prefill
    findings = check(gm)
    consts = [f for f in findings if f.kind == CONSTANT_KV]
    # 6 layers x (K, V): every host read became a constant; nothing else in this graph is one
    assert sorted(f.target for f in consts) == sorted(f"_tensor_constant{i}" for i in range(12))
    if SDPA_UNBATCHED_DECOMPOSED:
        key, value = "key of attention: Q @ K^T bmm", "value of attention: softmax @ V bmm"
    else:
        key, value = "key of _scaled_dot_product_flash_attention_for_cpu", "value of _scaled_dot_product_flash_attention_for_cpu"
    assert sum(f.consumer.startswith(key) for f in consts) == 6
    assert sum(f.consumer.startswith(value) for f in consts) == 6
    for f in consts:
        assert f.all_zeros is False  # real mode bakes the trace-time K/V: stale, not zeros
        assert f.source.startswith("examples/shared_kv_model.py:")
        assert "cache.update(k, v)" in f.source or "cache.read(x.device)" in f.source
        assert f.fx_node.op == "get_attr" and f.fx_node.name == f.node
    # the readonly follower (layer 4) reads without writing: its read is the one at cache.read
    assert sum("cache.read" in f.source for f in consts) == 2
    # the computed K/V of the 5 writing layers end in a dangling detach -> detach (make_fx records each detach as
    # an alias from torch 2.14 on)
    dangling = [f for f in findings if f.kind == DANGLING_KV]
    assert len(dangling) == 10
    assert {f.target for f in dangling} == {"aten.add.Tensor", "aten.transpose.int"}  # RoPE'd K, transposed V
    hop = MAKE_FX_DETACH.overloadpacket.__name__
    for f in dangling:
        assert f"{hop} -> {hop}" in f.consumer and "same-shaped constant _tensor_constant" in f.detail
        assert "cache.update(k, v)" in f.source


def test_makefx_graph_is_really_stale(makefx_prefill):
    """The findings are real: the captured graph does not compute what the model computes, not even on the
    trace-time input, because make_fx's constants *alias* the live numpy host buffers (``from_numpy``), and the
    followers' writes later in the same step overwrote the owners' K/V (pinned on torch 2.13)."""
    model, ids, gm = makefx_prefill
    full_owner = gm.trace_caches[1]  # layer 1 owns the full-attention K/V; layers 3 and 5 follow it
    assert np.shares_memory(gm._tensor_constant2.numpy(), full_owner.k_buf)
    assert np.shares_memory(gm._tensor_constant10.numpy(), full_owner.k_buf)  # the readonly follower's read
    fresh = _ids(torch.Generator().manual_seed(11), 8)
    assert not torch.equal(fresh, ids)
    with torch.no_grad():
        for inp in (fresh, ids):
            err = (gm(inp) - _eager(model, inp)).abs().max()
            assert err > 1e-2, "the baked K/V should make the captured graph wrong"


def test_finding_str_and_table_are_readable(makefx_prefill):
    _, _, gm = makefx_prefill
    findings = check(gm)
    f = next(f for f in findings if f.target == "_tensor_constant0")
    text = str(f)
    assert text.startswith("constant-kv: _tensor_constant0 [2, 8, 8] float32, stale non-zero values -> key of")
    assert "at examples/shared_kv_model.py:" in text and "tensor constant (get_attr)" in text
    table = format_findings(findings)
    lines = table.splitlines()
    assert lines[0].split() == ["KIND", "NODE", "SHAPE", "DTYPE", "VALUES", "CONSUMER", "SOURCE"]
    assert len(lines) == len(findings) + 1
    assert format_findings([]) == "no findings"


def test_makefx_decode_step_after_prefill_bakes_stale_history():
    model = reference_model(SharedKVConfig(), seed=3)
    gen = torch.Generator().manual_seed(3)
    prompt, nxt = _ids(gen, 8), _ids(gen, 1)
    model.reset()
    with torch.no_grad():
        model(prompt)
        gm = make_fx(lambda t: model(t), tracing_mode="real", record_stack_traces=True)(nxt)
    findings = check(gm)
    consts = [f for f in findings if f.kind == CONSTANT_KV]
    assert len(consts) == 12
    assert all(f.all_zeros is False and f.shape[1] == 9 for f in consts)  # 8 stale positions + the trace token
    dangling = [f for f in findings if f.kind == DANGLING_KV]
    assert len(dangling) == 10 and all(f.shape[1] == 1 for f in dangling)  # paired across the sequence dim


def test_strict_export_mutates_the_host_buffer_constant(strict_export):
    model, ids, ep = strict_export
    findings = check(ep)
    assert [f.kind for f in findings] == [MUTATED_CONSTANT] * 6
    assert [f.target for f in findings] == [f"_captured_{i}" for i in range(1, 7)]
    assert [f.node for f in findings] == [f"c__captured_{i}" for i in range(1, 7)]
    for f in findings:
        assert f.all_zeros is None  # torch 2.13 stores these lifted numpy buffers as FakeTensors
        assert f.shape[1] == model.config.max_len  # the whole preallocated buffer
        assert "of scaled_dot_product_attention" in f.consumer
        assert "torch.from_numpy(self." in f.source and "update" in f.source
        assert "written in place by aten.copy_.default" in f.detail and ".numpy()" in f.detail
    by_target = {f.target: f for f in findings}
    # the full-attention owner (layer 1) is read by its shared and its readonly follower too
    assert "2 more attention input(s) (key)" in by_target["_captured_3"].detail
    from torch._subclasses.fake_tensor import FakeTensor

    assert all(isinstance(t, FakeTensor) for t in ep.constants.values())


def test_strict_export_artifact_is_broken_downstream(strict_export, tmp_path):
    """What a user of the stock strict export meets next (pinned on torch 2.13): torch cannot load it back, and
    kvpass.check reports it from the file anyway (its own reader, no torch.export.load)."""
    _, _, ep = strict_export
    with pytest.raises(RuntimeError, match="Constant _captured_1 is mutated"):
        ep.run_decompositions()
    path = tmp_path / "strict.pt2"
    torch.export.save(ep, path)  # saves...
    with pytest.raises(ProgramLoadError, match=r"torch.export.load failed: .*setStorage") as info:
        check(path, trusted=True)  # ...but torch.export.load does not load it back
    assert info.value.path == str(path) and "\n" not in info.value.reason
    from_file = check(path)
    assert [(f.kind, f.target, f.shape, f.consumer, f.source) for f in from_file] == \
        [(f.kind, f.target, f.shape, f.consumer, f.source) for f in check(ep)]
    assert all(f.all_zeros is None and "no bytes stored" in f.detail for f in from_file)


@contextlib.contextmanager
def _dynamo_own_np_pad():
    """Dynamo's own ``np.pad`` handling, whatever an earlier ``backend="kvpass"`` installed (restored after)."""
    from kvpass.tracing import install_traceable, traceable_installed, uninstall_traceable

    was = traceable_installed()
    uninstall_traceable()
    try:
        yield
    finally:
        if was:
            install_traceable()


def test_stock_captures_that_fail_on_host_round_trips():
    ids = _ids(torch.Generator().manual_seed(4), 8)
    model = reference_model(NO_PAD, seed=0)
    model.reset()
    with pytest.raises(RuntimeError, match=r"\.numpy\(\) is not supported for tensor subclasses"):
        torch.export.export(Step(model), (ids,), strict=False)
    padded = reference_model(SharedKVConfig(), seed=0)  # has a padded follower: np.pad under Dynamo
    padded.reset()
    with _dynamo_own_np_pad(), pytest.raises(Exception, match="unbacked symbols"):
        torch.export.export(Step(padded), (ids,), strict=True)


def test_strict_export_with_caches_created_in_the_call_is_faithful():
    """When the step itself builds the (empty) host buffers, Dynamo traces np.zeros: no constant, correct."""
    model = reference_model(NO_PAD, seed=5)
    gen = torch.Generator().manual_seed(5)

    class FromEmpty(Step):
        def forward(self, input_ids):
            self.model.reset()
            return self.model(input_ids)

    ep = torch.export.export(FromEmpty(model), (_ids(gen, 8),), strict=True)
    assert check(ep) == []
    fresh = _ids(gen, 8)
    torch.testing.assert_close(ep.module()(fresh), _eager(model, fresh))


def test_exported_program_and_pt2_inputs(exported_makefx, makefx_prefill):
    ep, path = exported_makefx
    from torch.export.graph_signature import InputKind

    buffers = [s.target for s in ep.graph_signature.input_specs if s.kind == InputKind.BUFFER]
    assert buffers == [f"_tensor_constant{i}" for i in range(12)]  # make_fx constants arrive as buffers
    findings = check(ep)
    consts = [f for f in findings if f.kind == CONSTANT_KV]
    assert len(consts) == 12
    assert all("lifted as a buffer" in f.detail and f.all_zeros is False for f in consts)
    # The computed K/V's unused detach chains: torch 2.13's export drops them (the K/V are then left with no use
    # at all, which is no finding); from 2.14 on the chains are aliases and export keeps them, so the computed
    # K/V are reported disconnected exactly as in the make_fx graph (a computed value, not a constant).
    dangling = [(f.node, f.consumer) for f in findings if f.kind == DANGLING_KV]
    assert len(findings) == len(consts) + len(dangling)
    if MAKE_FX_DETACH is torch.ops.aten.detach.default:
        assert dangling == []
    else:
        assert dangling == [(f.node, f.consumer) for f in check(makefx_prefill[2]) if f.kind == DANGLING_KV]
    assert all("cache." in f.source for f in findings)  # stack traces survive export
    for arg in (path, str(path)):
        loaded = check(arg)
        assert [(f.kind, f.target, f.shape, f.consumer, f.source) for f in loaded] == \
            [(f.kind, f.target, f.shape, f.consumer, f.source) for f in findings]
    unlifted = check(ep.module())  # the unlifted GraphModule: get_attr again
    assert [(f.kind, f.target) for f in unlifted] == [(f.kind, f.target) for f in findings]


@pytest.mark.parametrize("strict", [True, False], ids=["strict", "nonstrict"])
def test_functional_twin_export_is_clean_and_matches_eager(strict):
    twin = reference_model(SharedKVConfig(), functional=True, seed=6)
    gen = torch.Generator().manual_seed(6)
    twin.reset()  # empty [kv, 0, d] histories: captured as empty constants, which hold no K/V
    ep = torch.export.export(Step(twin), (_ids(gen, 8),), strict=strict)
    assert any(s.kind.name == "CONSTANT_TENSOR" for s in ep.graph_signature.input_specs)
    assert check(ep) == []
    fresh = _ids(gen, 8)
    twin.reset()
    torch.testing.assert_close(ep.module()(fresh), _eager(twin, fresh))


# --------------------------------------------------------------------------------------------------------
# Small hand-made graphs: every rule, and the constants that must stay silent
# --------------------------------------------------------------------------------------------------------


class OneLayer(nn.Module):
    """One GQA attention layer whose K history is a plain tensor attribute (a port's host buffer, captured).

    It also carries constants that are *not* K/V: a rotary table, an additive mask, a weight.
    """

    def __init__(self, hist: torch.Tensor | None, style: str = "sdpa", no_grad_attention: bool = False):
        super().__init__()
        g = torch.Generator().manual_seed(7)
        self.q = nn.Linear(16, 16, bias=False)
        self.k = nn.Linear(16, 8, bias=False)
        self.v = nn.Linear(16, 8, bias=False)
        self.hist = hist
        self.cos = torch.randn(32, 4, generator=g)
        self.mask = torch.randn(1, 1, 1, 32, generator=g)
        self.w_out = torch.randn(16, 16, generator=g) / 4
        self.style, self.no_grad_attention = style, no_grad_attention

    def forward(self, x):
        t = x.shape[1]
        q = (self.q(x).view(1, t, 2, 8).transpose(1, 2)) * self.cos[:t].repeat(1, 2)
        k = self.k(x).view(1, t, 1, 8).transpose(1, 2)
        v = self.v(x).view(1, t, 1, 8).transpose(1, 2)
        if self.hist is not None:
            k = torch.cat([self.hist, k], dim=2)  # the read-back history, next to the computed K
            v = torch.cat([torch.zeros_like(self.hist) + v.mean(), v], dim=2)
        k, v = k.expand(1, 2, -1, 8), v.expand(1, 2, -1, 8)
        s = k.shape[2]

        def attend(q, k, v):
            if self.style == "sdpa":
                return F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask[..., :s])
            w = (q @ k.transpose(-2, -1)) / 8**0.5 + self.mask[..., :s]
            return torch.softmax(w, -1) @ v

        if self.no_grad_attention:
            with torch.no_grad():
                o = attend(q, k, v)
        else:
            o = attend(q, k, v)
        return o.transpose(1, 2).reshape(1, t, 16) @ self.w_out


def _capture(module, x, how):
    if how == "make_fx":
        with torch.no_grad():
            return make_fx(module, tracing_mode="real", record_stack_traces=True)(x)
    return torch.export.export(module, (x,), strict=(how == "strict"))


CAPTURES = ["make_fx", "strict", "nonstrict"]


@pytest.mark.parametrize("how", CAPTURES)
@pytest.mark.parametrize("style", ["sdpa", "matmul"])
@pytest.mark.parametrize("values", ["zeros", "stale"])
def test_kv_constant_flagged_whether_zero_or_stale(how, style, values):
    gen = torch.Generator().manual_seed(8)
    hist = torch.zeros(1, 1, 3, 8) if values == "zeros" else torch.randn(1, 1, 3, 8, generator=gen)
    x = torch.randn(1, 4, 16, generator=gen)
    findings = check(_capture(OneLayer(hist, style), x, how))
    assert len(findings) == 1, format_findings(findings)
    (f,) = findings
    assert f.kind == CONSTANT_KV and f.shape == (1, 1, 3, 8) and f.dtype == torch.float32
    assert f.all_zeros is (values == "zeros")
    assert f.consumer.startswith("key of")
    assert " via cat (" in f.consumer
    if how != "make_fx":
        assert f.target == "hist" and f.node == "c_hist"
        assert f.source.endswith("in forward: k = torch.cat([self.hist, k], dim=2)  # the read-back history, "
                                 "next to the computed K")
    else:
        assert f.target.startswith("_tensor_constant")
        assert "test_check.py" in f.source


@pytest.mark.parametrize("how", CAPTURES)
def test_rotary_tables_masks_and_weights_are_not_kv(how):
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(1, 4, 16, generator=gen)
    for style in ("sdpa", "matmul"):
        captured = _capture(OneLayer(None, style), x, how)
        assert check(captured) == []
        if how == "make_fx":  # the three constants are there, and are not reported
            names = [n.target for n in captured.graph.nodes if n.op == "get_attr"
                     and str(n.target).startswith("_tensor_constant")]
            assert len(names) == 3


class MoreConstants(nn.Module):
    """Constants around a clean attention: bool causal mask, rotary cos/sin, a K weight and a batched V weight."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(10)
        self.q = nn.Linear(16, 16, bias=False)
        self.k = nn.Linear(16, 8, bias=False)
        self.v = nn.Linear(16, 8, bias=False)
        self.cos, self.sin = torch.randn(32, 8, generator=g), torch.randn(32, 8, generator=g)
        self.bias = torch.randn(1, 1, 32, 32, generator=g)
        self.causal = torch.ones(32, 32, dtype=torch.bool).tril()
        self.w_k = torch.randn(8, 8, generator=g) / 3
        self.w_v = torch.randn(2, 8, 8, generator=g) / 3

    def forward(self, x):
        t = x.shape[1]
        q = self.q(x).view(1, t, 2, 8).transpose(1, 2)
        k = self.k(x).view(1, t, 1, 8).transpose(1, 2) @ self.w_k
        v = self.v(x).view(1, t, 1, 8).transpose(1, 2).expand(1, 2, t, 8)
        v = torch.bmm(v.reshape(2, t, 8), self.w_v).view(1, 2, t, 8)

        def rope(z):
            return z * self.cos[:t] + torch.cat([-z[..., 4:], z[..., :4]], -1) * self.sin[:t]

        q, k = rope(q), rope(k).expand(1, 2, t, 8)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=self.causal[:t, :t])
        w = torch.softmax(q @ k.transpose(-2, -1) + self.bias[..., :t, :t], -1)
        return a + w @ v


@pytest.mark.parametrize("how", CAPTURES)
def test_clean_graph_with_many_non_kv_constants(how):
    x = torch.randn(1, 5, 16, generator=torch.Generator().manual_seed(12))
    assert check(_capture(MoreConstants(), x, how)) == []


class CatOnly(nn.Module):
    """A captured history concatenated with the computed K along the sequence, handed to no known attention."""

    def __init__(self):
        super().__init__()
        self.k = nn.Linear(16, 8, bias=False)
        self.hist = torch.randn(1, 3, 2, 4, generator=torch.Generator().manual_seed(13))

    def forward(self, x):
        return torch.cat([self.hist, self.k(x).view(1, -1, 2, 4)], dim=1)


class WriteOnly(nn.Module):
    """A projected K written into a captured buffer (setitem) that this graph never reads. An inference module:
    its weight does not require grad (strict export refuses, from torch 2.14 on, to write a value that requires
    grad into a plain tensor attribute)."""

    def __init__(self):
        super().__init__()
        self.k = nn.Linear(16, 8, bias=False).requires_grad_(False)
        self.buf = torch.zeros(2, 10, 4)
        self.steps = torch.zeros(())

    def forward(self, x):
        k = self.k(x[0]).view(-1, 2, 4).transpose(0, 1)
        self.buf[:, : k.shape[1]] = k
        self.steps.add_(1)  # a mutated scalar counter: not K/V
        return k.sum()


@pytest.mark.parametrize("how", CAPTURES)
def test_cat_along_sequence_with_computed_kv(how):
    x = torch.randn(1, 4, 16, generator=torch.Generator().manual_seed(14))
    (f,) = check(_capture(CatOnly(), x, how))
    assert f.kind == CONSTANT_KV and f.all_zeros is False
    assert f.consumer.startswith("cat along dim 1 with computed K/V")


@pytest.mark.parametrize("how", CAPTURES)
def test_mutated_constant_written_with_projected_kv(how):
    x = torch.randn(1, 4, 16, generator=torch.Generator().manual_seed(15))
    (f,) = check(_capture(WriteOnly(), x, how))
    assert f.kind == MUTATED_CONSTANT and f.shape == (2, 10, 4)
    assert f.all_zeros is (how != "make_fx")  # real mode really ran the write into the captured buffer
    assert f.consumer == "no attention read in this graph; written with a projected K/V"
    if how != "make_fx":
        assert "written in place by aten.copy_.default" in f.detail
        assert f.detail.endswith("self.buf[:, : k.shape[1]] = k")


def test_attention_inside_a_no_grad_region_is_followed_into_the_subgraph():
    x = torch.randn(1, 4, 16, generator=torch.Generator().manual_seed(16))
    ep = torch.export.export(OneLayer(torch.randn(1, 1, 3, 8), "sdpa", no_grad_attention=True), (x,), strict=False)
    assert any("wrap_with_set_grad_enabled" in str(n.target) for n in ep.graph.nodes)
    (f,) = check(ep)
    assert f.node == "c_hist" and f.consumer.startswith("key of scaled_dot_product_attention")


def test_a_dangling_detach_without_a_kv_constant_is_not_a_finding():
    lin = nn.Linear(16, 8, bias=False)

    def fn(x):
        k = lin(x).view(1, -1, 2, 4).transpose(1, 2)
        k.detach().cpu()  # e.g. a debug dump: dangling, but nothing replaced this K
        v = lin(x).view(1, -1, 2, 4).transpose(1, 2)
        return F.scaled_dot_product_attention(v, v, v)

    with torch.no_grad():
        gm = make_fx(fn, tracing_mode="real")(torch.randn(1, 4, 16, generator=torch.Generator().manual_seed(17)))
    assert any(n.target == MAKE_FX_DETACH and not n.users for n in gm.graph.nodes)
    assert check(gm) == []


# --------------------------------------------------------------------------------------------------------
# Hugging Face Gemma4 (tiny random config, no hub): no false positives through the stock export path
# --------------------------------------------------------------------------------------------------------


def _gemma4_export(model, ids, strict):
    from transformers.integrations.executorch import TorchExportableModuleForDecoderOnlyLM

    wrapper = TorchExportableModuleForDecoderOnlyLM(model, batch_size=1, max_cache_len=16)
    return wrapper.export(input_ids=ids, strict=strict)


@pytest.mark.slow
def test_hf_gemma4_static_cache_export_is_clean_and_matches_eager(gemma4, tmp_path):
    gen = torch.Generator().manual_seed(19)
    ids = _ids(gen, 6, vocab=128)
    ep = _gemma4_export(gemma4, ids, strict=True)  # transformers' default
    assert gemma4.config.num_kv_shared_layers > 0 and gemma4.config.attention_k_eq_v
    assert check(ep) == []
    torch.export.save(ep, tmp_path / "gemma4.pt2")
    from_file = check(tmp_path / "gemma4.pt2")  # the untrusted reader: same verdict, attentions were seen
    assert from_file == [] and from_file.attentions == check(ep).attentions >= gemma4.config.num_hidden_layers
    fresh = _ids(gen, 6, vocab=128)
    with torch.no_grad():
        got = ep.module()(input_ids=fresh, cache_position=torch.arange(6))
        want = gemma4(fresh).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def _source_location(source: str):
    """``path:line in func: code`` (a finding's ``source``) -> (path, line, func, code)."""
    m = re.fullmatch(r"(?P<path>[^:]+):(?P<line>\d+) in (?P<func>\w+): (?P<code>.*)", source, flags=re.S)
    assert m, source
    return m["path"], int(m["line"]), m["func"], m["code"]


def test_hf_gemma4_nonstrict_export_lifts_its_kv_cache_as_mutated_constants(gemma4):
    """Non-strict export reaches the StaticCache tensors through the cache object, not the registered buffers, so
    the owner layers' K/V caches become lifted constants written in place (run_decompositions then fails).
    kvpass.check reports exactly those, one K and one V per owner layer, each at the line of the attention's
    forward that writes the cache (checked against transformers' own source file, whatever its text)."""
    ids = _ids(torch.Generator().manual_seed(20), 6, vocab=128)
    ep = _gemma4_export(gemma4, ids, strict=False)
    findings = check(ep)
    config = gemma4.config
    owners = config.num_hidden_layers - config.num_kv_shared_layers  # layers that own (write) a K/V cache
    assert [f.kind for f in findings] == [MUTATED_CONSTANT] * (2 * owners)
    assert [f.consumer.split(" of ")[0] for f in findings] == ["key", "value"] * owners
    lifted = {s.target for s in ep.graph_signature.input_specs if s.kind.name == "CONSTANT_TENSOR"}
    assert {f.target for f in findings} <= lifted and len({f.target for f in findings}) == 2 * owners
    attention = type(gemma4.model.layers[0].self_attn)
    src_file = inspect.getsourcefile(attention)
    lines, first = inspect.getsourcelines(attention.forward)
    for f in findings:
        assert f.all_zeros is True  # the trace-time cache: what the exported program would attend over
        assert re.search(r"written in place by aten\.index_copy_?\.default", f.detail), f.detail
        path, line, func, code = _source_location(f.source)
        assert src_file.replace("\\", "/").endswith(path) and func == "forward"
        assert first <= line < first + len(lines)  # inside the attention's forward ...
        assert linecache.getline(src_file, line).strip() == code.strip()  # ... and quoted as it is on disk
    # the other lifted constants (scalar cumulative lengths) are mutated too, and stay silent: not K/V
    assert len(lifted) > 2 * owners


# --------------------------------------------------------------------------------------------------------
# API
# --------------------------------------------------------------------------------------------------------


def test_public_api_and_errors(tmp_path):
    assert kvpass.check is check and kvpass.Finding is Finding
    assert "check" in kvpass.__all__ and "Finding" in kvpass.__all__
    with pytest.raises(CheckInputError, match=r"kvpass.check\(obj\): expected .* got Linear \(capture it first"):
        check(nn.Linear(2, 2))
    with pytest.raises(CheckInputError, match="got int"):
        check(3)
    missing = tmp_path / "nope.pt2"
    with pytest.raises(ProgramLoadError, match="no such file") as info:
        check(missing)
    assert isinstance(info.value, kvpass.KVPassError) and isinstance(info.value, OSError)
    assert str(missing) in str(info.value)
    garbage = tmp_path / "garbage.pt2"
    garbage.write_bytes(b"not a zip archive")
    with pytest.raises(ProgramLoadError, match="not a ZIP archive"):
        check(garbage)


def test_require_faithful_for_export():
    x = torch.randn(1, 4, 16, generator=torch.Generator().manual_seed(21))
    dirty = _capture(OneLayer(torch.zeros(1, 1, 3, 8)), x, "nonstrict")
    with pytest.raises(FidelityError, match="not faithful: 1 K/V value") as info:
        require_faithful(dirty, what="exported program")
    assert info.value.findings == check(dirty) and "c_hist" in str(info.value)
    require_faithful(_capture(OneLayer(None), x, "nonstrict"))  # clean: no raise


def test_check_module_imports_no_pattern():
    """DESIGN section 2: the check reads graphs and needs no rewrite pattern (nor the backend or the CLI)."""
    source = pathlib.Path(kvpass.check.__code__.co_filename).read_text()
    modules = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            modules.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            modules.add(("." * node.level) + (node.module or ""))
    assert not any("pattern" in m or "backend" in m or "cli" in m or "engine" in m for m in modules), modules
