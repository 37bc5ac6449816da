"""kvpass.hf.export_step on transformers' Gemma 4 and Gemma 3n text models with their default layer types (sliding
and full attention, shared K/V; tiny random configs, a 4-token window shorter than the prompt): one program for
the prefill and every decode step, run in ONNX Runtime (the `test` extra installs it) within 1e-5 of eager over a
prefill and 8 decode steps past the window; ExecuTorch and IREE where installed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import kvpass

pytest.importorskip("transformers")

from kvpass.examples.hf_export import (MAX_CACHE_LEN, MODELS, TOL, WINDOW,  # noqa: E402
                                       decode_in_onnxruntime, onnx_session)
from kvpass.faithful_export import ExportInputError  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore:While compiling, we found certain side effects:UserWarning"),
    pytest.mark.filterwarnings("ignore:No complete tensor found in the group:UserWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]

DECODE_STEPS = 8
PROMPT = 6  # longer than the window: the prefill fills it and every decode step runs past it


@pytest.fixture(scope="module")
def models():
    return {name: build() for name, build in MODELS.items()}


_programs: dict = {}


def program(models, name):
    """The exported step of ``models[name]``, made once per test process (the export takes tens of seconds)."""
    if name not in _programs:
        _programs[name] = kvpass.hf.export_step(models[name], max_cache_len=MAX_CACHE_LEN)
    return _programs[name]


def _prompt(model, seed):
    return torch.randint(0, model.config.vocab_size, (1, PROMPT), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_default_layer_types_have_sliding_layers_and_shared_kv(models, name):
    c = models[name].config
    assert "sliding_attention" in c.layer_types and "full_attention" in c.layer_types
    assert c.num_kv_shared_layers > 0 and c.sliding_window == WINDOW < PROMPT


@pytest.mark.parametrize("name", sorted(MODELS))
def test_full_length_sliding_layers_match_eager_past_the_window(models, name):
    """The step module eagerly (the cache layout the export traces: sliding layers stored at full length, the
    window applied by transformers' mask) against the model over the whole sequence without a cache, over a
    prefill and decode steps past the window; and the cache holds no sliding-window layer."""
    from transformers.cache_utils import StaticLayer

    model = models[name]
    step = kvpass.hf.StepModule(model, MAX_CACHE_LEN)
    stored = [layer for layer in step.cache.layers if type(layer).__name__ != "DummyLayer"]  # shared: no store
    assert stored and {type(layer) for layer in stored} == {StaticLayer}
    assert set(step.state_dict()) == set(model.state_dict())  # the model's own parameter names
    seq = ids = _prompt(model, 1)
    with torch.no_grad():
        for _ in range(1 + DECODE_STEPS):
            got = step(ids)
            want = model(input_ids=seq, use_cache=False).logits[:, -ids.shape[1]:]
            torch.testing.assert_close(got, want, rtol=TOL, atol=TOL)
            ids = got[:, -1:].argmax(-1)
            seq = torch.cat([seq, ids], 1)
    assert step.pos == PROMPT + DECODE_STEPS


def test_bad_arguments_are_named(models):
    with pytest.raises(ExportInputError, match=r"export_step\(model\): expected a transformers model"):
        kvpass.hf.export_step(torch.nn.Linear(2, 2), max_cache_len=16)
    with pytest.raises(ExportInputError, match=r"max_cache_len=2"):
        kvpass.hf.export_step(models["gemma4"], max_cache_len=2)
    with pytest.raises(ExportInputError, match=r"example_tokens=16"):
        kvpass.hf.export_step(models["gemma4"], max_cache_len=16, example_tokens=16)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(MODELS))
def test_exported_step_is_faithful_and_runs_in_onnxruntime(models, name, tmp_path):
    """One program: kvpass.check finds nothing; torch.onnx.export takes it as it is; ONNX Runtime runs the prefill
    and 8 decode steps from an empty cache, fed only the program's own outputs, within 1e-5 of eager."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model = models[name]
    ep = program(models, name)
    assert kvpass.check(ep) == []
    assert list(ep.graph_signature.user_inputs[:2]) == ["input_ids", "position"]
    # optimize=False: onnxscript's graph optimizer takes most of the conversion time and changes no value
    sess = onnx_session(ep, tmp_path / "decoder.onnx", optimize=False)
    errors, position = decode_in_onnxruntime(sess, model, _prompt(model, 2), DECODE_STEPS)
    print(f"{name}: max |onnxruntime - eager| per step = [{', '.join(f'{e:.1e}' for e in errors)}]")
    assert len(errors) == 1 + DECODE_STEPS and max(errors) < TOL, errors
    assert position == PROMPT + DECODE_STEPS


@pytest.mark.slow
def test_stock_strict_export_of_the_same_step_bakes_the_cache(models):
    """Stock ``torch.export(strict=True)`` of the same step module captures the cache's K/V tensors as constants
    mutated in place: kvpass.check flags each owner layer's K and V (the program would attend over the
    trace-time zeros)."""
    model = models["gemma4"]
    step = kvpass.hf.StepModule(model, MAX_CACHE_LEN)
    ep = torch.export.export(step, (_prompt(model, 3),), strict=True)
    findings = kvpass.check(ep)
    owners = sum(1 for layer in step.cache.layers if type(layer).__name__ != "DummyLayer")
    assert [f.kind for f in findings] == ["mutated-constant"] * (2 * owners), findings
    assert {f.consumer.split(" of ")[0] for f in findings} == {"key", "value"}


# --------------------------------------------------------------------------------------------------------
# ExecuTorch and IREE: where installed (README "Deploy")
# --------------------------------------------------------------------------------------------------------


@pytest.fixture
def executorch_runtime():
    pytest.importorskip("executorch.exir")
    return pytest.importorskip("executorch.runtime")


@pytest.fixture
def iree():
    return pytest.importorskip("iree.compiler"), pytest.importorskip("iree.runtime")


def _chain(run, model, prompt, cache, to_torch=lambda x: x):
    """Prefill + DECODE_STEPS greedy steps through ``run(ids, position, cache)``; max |got - eager| per step."""
    position, ids, seq, errors = torch.zeros(1, dtype=torch.int64), prompt, prompt, []
    for _ in range(1 + DECODE_STEPS):
        logits, position, cache = run(ids, position, cache)
        logits = to_torch(logits)
        with torch.no_grad():
            want = model(input_ids=seq, use_cache=False).logits[:, -ids.shape[1]:]
        errors.append(float((logits - want).abs().max()))
        ids = logits[:, -1:].argmax(-1)
        seq = torch.cat([seq, ids], 1)
    return errors


def _empty_cache(ep):
    specs = [n.meta["val"] for n in ep.graph.nodes if n.name in ep.graph_signature.user_inputs]
    return [torch.zeros(v.shape, dtype=v.dtype) for v in specs[2:]]


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(MODELS))
def test_executorch_runs_prefill_and_decode(executorch_runtime, models, name):
    import io

    from executorch.exir import to_edge

    ep = program(models, name)
    saved = io.BytesIO()
    torch.export.save(ep, saved)
    methods = {m: torch.export.load(io.BytesIO(saved.getvalue())) for m in ("prefill", "decode")}
    loaded = executorch_runtime.Runtime.get().load_program(to_edge(methods).to_executorch().buffer)
    prefill, decode = loaded.load_method("prefill"), loaded.load_method("decode")

    def run(ids, position, cache):
        logits, position, *cache = (prefill if ids.shape[1] > 1 else decode).execute([ids, position, *cache])
        return logits, position, cache

    errors = _chain(run, models[name], _prompt(models[name], 4), _empty_cache(ep))
    assert max(errors) < TOL, errors


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(MODELS))
def test_iree_runs_prefill_and_decode(iree, models, name):
    ireec, ireert = iree
    from iree.compiler.extras.fx_importer import FxImporter

    ep = program(models, name)
    importer = FxImporter()
    importer.import_frozen_program(ep, func_name="main")
    vmfb = ireec.compile_str(str(importer.module), target_backends=["llvm-cpu"], input_type="torch")
    ctx = ireert.SystemContext(config=ireert.Config("local-task"))
    ctx.add_vm_module(ireert.VmModule.copy_buffer(ctx.instance, vmfb))
    main = ctx.modules.module["main"]

    def run(ids, position, cache):
        logits, position, *cache = main(ids.numpy(), np.asarray(position), *[np.asarray(c) for c in cache])
        return torch.from_numpy(logits.to_host()), position.to_host(), [c.to_host() for c in cache]

    errors = _chain(run, models[name], _prompt(models[name], 5), _empty_cache(ep))
    assert max(errors) < 1e-3, errors  # IREE's fast math: looser than fp32 rounding, as for the reference model
