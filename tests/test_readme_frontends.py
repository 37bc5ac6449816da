"""README's table of what each front end does with a host round trip stays true: each row's claim is measured here
on the default reference model (``reference_model()``: a padded, a shared and a read-only follower) with stock
PyTorch, and every fact measured must be written in that row (an exception's class name, the op it comes from,
what the capture contains). When a PyTorch upgrade changes a behaviour, the row that no longer says what happens
fails here, by name."""

import re
from pathlib import Path

import pytest
import torch
import torch._dynamo.utils
from torch.fx.experimental.proxy_tensor import make_fx

from kvpass.compat import MAKE_FX_DETACH
from kvpass.examples.shared_kv_model import SHARED, READONLY, SharedKVConfig, reference_model
from kvpass.timing import captured_recompile_limit_warnings
from test_failure_modes import Step  # one model step as a module (what a user hands to torch.export)

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()

pytestmark = pytest.mark.usefixtures("stock_numpy_tracing")  # stock Dynamo, whatever ran before


def _rows() -> dict[str, str]:
    """The table between ``<!-- frontends -->`` markers: first cell (front end) -> the whole row's text."""
    start, end = README.index("<!-- frontends -->"), README.index("<!-- /frontends -->")
    table = [line for line in README[start:end].splitlines() if line.startswith("|")]
    return {line.strip("|").split("|")[0].strip(): line for line in table[2:]}  # after the header and its rule


def _row(key: str) -> str:
    found = [text for first, text in _rows().items() if first.startswith(key)]
    assert len(found) == 1, f"README front-end table: expected one row starting with {key!r}, got {list(_rows())}"
    return found[0]


def _says(row: str, *facts: str) -> None:
    for fact in facts:
        assert fact in row, f"README row does not say what was measured: {fact!r} missing from\n{row}"


def _ids(gen, n):
    return torch.randint(0, 64, (1, n), generator=gen)


def test_table_has_one_row_per_front_end():
    keys = ["`torch.compile`, the reference model", "`torch.compile`, float `.tolist()`", "`torch.export(strict=True)`",
            "`make_fx` real mode, `torch.jit.trace`", "`make_fx` fake/symbolic, `torch.export(strict=False)`"]
    for key in keys:
        _row(key)
    assert len(_rows()) == len(keys)


def _stock_compile(model, steps):
    """Prefill 8 + ``steps`` decode steps under stock torch.compile with a counting backend: (graphs of the
    prefill, new graphs per decode step, graph-break reasons, numpy wrapper names in the graphs, limit hits)."""
    gen = torch.Generator().manual_seed(0)
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(model, backend=counting)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    per_step = []
    with torch.no_grad(), captured_recompile_limit_warnings() as hits:
        compiled(_ids(gen, 8))
        prefill = len(graphs)
        for _ in range(steps):
            before = len(graphs)
            compiled(_ids(gen, 1))
            per_step.append(len(graphs) - before)
    reasons = " ".join(str(k) for k in torch._dynamo.utils.counters["graph_break"])
    names = {getattr(n.target, "__name__", "") for g in graphs for n in g.graph.nodes}
    return prefill, per_step, reasons, names, hits


@pytest.mark.slow
def test_torch_compile_row():
    """Graph breaks in np.pad, numpy buffers as graph inputs, the recompile limit at the first decode step, then
    eager; without the padded follower, one recompile per decode step until the limit."""
    prefill, per_step, reasons, names, hits = _stock_compile(reference_model(), 10)
    measured = []
    if "aten._local_scalar_dense" in reasons:
        measured.append("data-dependent `aten._local_scalar_dense`")
    if {"wrapped___setitem__", "wrapped_getitem"} <= names:
        measured.append("graph input")
    if per_step[0] and not any(per_step[1:]):
        measured += [f"{prefill} graphs for the prefill", f"{per_step[0]} more at the first decode step"]
    if hits and hits[0].startswith("recompile_limit="):
        measured.append(f"recompile limit ({hits[0].split('=')[1].split()[0]})")
        measured.append("then eager")
    row = _row("`torch.compile`, the reference model")
    _says(row, *measured)
    assert len(measured) == 6, (measured, prefill, per_step, reasons[:300], hits)

    no_pad = reference_model(SharedKVConfig(follower_caches=[SHARED, SHARED, READONLY]))
    prefill, per_step, reasons, names, hits = _stock_compile(no_pad, 10)
    # np.pad was the only graph break; now each position is one more graph until the limit, then none
    assert reasons == "" and prefill == 1, reasons
    limit = torch._dynamo.config.recompile_limit
    assert per_step == [1] * (limit - 1) + [0] * (10 - limit + 1) and hits, per_step
    _says(row, "Without the padded follower", "a **recompile every decode step**", f"recompile limit ({limit})")


def test_tolist_row():
    """Not in the reference model: measured on the idiom itself (a float .tolist() + torch.tensor copy)."""
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def copy_through_list(k):
        return torch.tensor(k.tolist()) * 2

    compiled = torch.compile(copy_through_list, backend=counting)
    torch._dynamo.utils.counters.clear()
    gen = torch.Generator().manual_seed(1)
    counts = []
    for _ in range(5):
        k = torch.randn(2, 3, generator=gen)
        torch.testing.assert_close(compiled(k), k * 2)
        counts.append(len(graphs))
    breaks = " ".join(torch._dynamo.utils.counters["graph_break"])
    inputs = [n for n in graphs[-1].graph.nodes if n.op == "placeholder"]
    measured = []
    if "tolist()" in breaks:
        measured.append("graph break at `.tolist()`")
    if counts[1] == counts[0] + 1 and len(set(counts[1:])) == 1:
        measured.append("one recompile")
    if len(inputs) == k.numel():
        measured.append("one graph input per element")
    _says(_row("`torch.compile`, float `.tolist()`"), *measured)
    assert measured == ["graph break at `.tolist()`", "one recompile", "one graph input per element"], (counts, inputs)


@pytest.mark.slow
def test_strict_export_row():
    """The default reference model fails in np.pad; without the padded follower, the buffers are lifted as
    mutated constants and the program attends over the trace-time buffers."""
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad(), pytest.raises(Exception) as info:
        torch.export.export(Step(reference_model()), (_ids(gen, 8),), strict=True)
    error = type(info.value).__name__
    row = _row("`torch.export(strict=True)`")
    _says(row, f"`{error}`", "`np.pad`", "unbacked symbols")
    assert "unbacked symbols" in str(info.value)
    # the same model without its padded follower (the one np.pad) exports: np.pad is what fails
    no_pad = reference_model(SharedKVConfig(follower_caches=[SHARED, SHARED, READONLY]))
    with torch.no_grad():
        ep = torch.export.export(Step(no_pad), (_ids(gen, 8),), strict=True)
    kinds = {s.kind.name for s in ep.graph_signature.input_specs}
    copies = [n for n in ep.graph.nodes if n.target is torch.ops.aten.copy_.default]
    _says(row, "`CONSTANT_TENSOR`", "`copy_`", "trace-time buffer")
    assert "CONSTANT_TENSOR" in kinds and copies and not ep.graph_signature.buffers_to_mutate


def test_make_fx_real_and_jit_trace_row(recwarn):
    gen = torch.Generator().manual_seed(3)
    ids, fresh = _ids(gen, 8), _ids(gen, 8)
    model = reference_model()

    def prefill(x):
        model.reset()
        return model(x)

    with torch.no_grad():
        gm = make_fx(prefill, tracing_mode="real")(ids)
        want = prefill(fresh)
        stale_fx = (gm(fresh) - want).abs().max().item()
        traced = torch.jit.trace(Step(model), (ids,), check_trace=False)
        model.reset()
        stale_jit = (traced(fresh) - want).abs().max().item()
    constants = [n for n in gm.graph.nodes if n.op == "get_attr" and "_tensor_constant" in str(n.target)]
    dangling = [n for n in gm.graph.nodes if n.target is MAKE_FX_DETACH and not n.users]
    _says(_row("`make_fx` real mode, `torch.jit.trace`"), "`_tensor_constant0`", "`detach` dangles",
          "stale or all-zero K/V")
    assert constants and dangling
    assert stale_fx > 1e-3 and stale_jit > 1e-3  # both answer a fresh prompt with the first prompt's K/V


def test_make_fx_fake_and_nonstrict_export_row():
    gen = torch.Generator().manual_seed(4)
    model = reference_model()
    messages = []
    # the real parameters are allowed in, as a user tracing a module in fake mode does: the host copy fails
    for capture in (lambda: make_fx(Step(model), tracing_mode="fake", _allow_non_fake_inputs=True)(_ids(gen, 8)),
                    lambda: make_fx(Step(model), tracing_mode="symbolic", _allow_non_fake_inputs=True)(_ids(gen, 8)),
                    lambda: torch.export.export(Step(model), (_ids(gen, 8),), strict=False)):
        model.reset()
        with torch.no_grad(), pytest.raises(Exception) as info:
            capture()
        messages.append(f"{type(info.value).__name__}: {info.value}")
    _says(_row("`make_fx` fake/symbolic, `torch.export(strict=False)`"), "`.numpy()`", "raises", "no export")
    assert all(re.search(r"\.numpy\(\)", m) for m in messages), messages
