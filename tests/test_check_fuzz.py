"""Fuzzing ``kvpass.check`` on mutated ``.pt2`` archives (hypothesis, 1,000 cases per run, a few seconds).

Each case mutates a valid archive (its raw bytes, its member list, or one value anywhere in its JSON members)
and must end in a :class:`CheckResult` or a :class:`ProgramLoadError` whose reason is one line, within a time
bound, without any code from the file being run: every way torch has of running it (``pickle``, ``torch.load``,
``torch.export.load``, ``sympy.sympify``, ``ctypes``, ``subprocess``, ``os.system``) is replaced by a tripwire
for the duration of the test. ``KVPASS_FUZZ_SCALE`` / ``KVPASS_FUZZ_SEED`` change the draw (tests/fuzz_decoders).
"""

from __future__ import annotations

import copy
import ctypes
import json
import os
import pickle
import subprocess
import time
import zipfile

import pytest
import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from hypothesis import given
from torch import nn

from fuzz_decoders import fuzz
from kvpass.fidelity import CheckResult, ProgramLoadError, check


class Tiny(nn.Module):
    """One attention with a baked history, a rotary table and a mask: a small archive with every kind of input."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.qkv = nn.Linear(8, 24, bias=False)
        self.hist = torch.randn(1, 2, 2, 4, generator=g)
        self.rot = torch.randn(16, 4, generator=g)
        self.register_buffer("mask", torch.ones(16, 16, dtype=torch.bool).tril())

    def forward(self, x):
        t = x.shape[1]
        q, k, v = (z.view(1, t, 2, 4).transpose(1, 2) for z in self.qkv(x).chunk(3, -1))
        k = torch.cat([self.hist, k * self.rot[:t]], 2)
        v = torch.cat([self.hist.flip(2), v], 2)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask[:t, : t + 2])


@pytest.fixture(scope="module")
def valid(tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz") / "valid.pt2"
    torch.export.save(torch.export.export(Tiny(), (torch.randn(1, 3, 8),), strict=False), path)
    with zipfile.ZipFile(path) as zf:
        members = [(i.filename, zf.read(i)) for i in zf.infolist()]
    assert [f.target for f in check(path)] == ["hist"]  # one finding (K and V), rot and mask quiet
    return path.read_bytes(), members


@pytest.fixture
def tripwires(monkeypatch):
    """Every way of running code from a file raises (and is recorded) while the test runs."""
    calls = []

    def wire(name):
        def tripped(*a, **k):
            calls.append(name)
            raise AssertionError(f"kvpass.check called {name}")
        return tripped

    import sympy

    for owner, attr in [(pickle, "loads"), (pickle, "load"), (pickle, "Unpickler"), (torch, "load"),
                        (torch.export, "load"), (sympy, "sympify"), (ctypes, "CDLL"), (subprocess, "Popen"),
                        (os, "system"), (torch.ops, "load_library")]:
        monkeypatch.setattr(owner, attr, wire(f"{getattr(owner, '__name__', owner)}.{attr}"))
    return calls


_JSON_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-2**70, max_value=2**70), st.floats(allow_nan=True),
    st.text(max_size=12), st.sampled_from(["../x", "/etc/passwd", "tensor_0", "weight_0", "opaque_obj_0",
                                           "torch.ops.aten.copy_.default", "torch.ops.higher_order.cond"]),
    st.lists(st.integers(min_value=-3, max_value=2**41), max_size=4),
    st.dictionaries(st.sampled_from(["as_int", "as_tensor", "name", "as_expr", "use_pickle", "as_graph"]),
                    st.one_of(st.integers(), st.text(max_size=4), st.booleans()), max_size=2),
)


def _paths(doc, prefix=()):
    """Every path to a value in a JSON document."""
    out = [prefix]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out.extend(_paths(v, prefix + (k,)))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out.extend(_paths(v, prefix + (i,)))
    return out


def _set(doc, path, value):
    if not path:
        return value
    node = doc
    for p in path[:-1]:
        node = node[p]
    node[path[-1]] = value
    return doc


@st.composite
def mutations(draw, valid):
    raw, members = valid
    kind = draw(st.sampled_from(["flip", "truncate", "json", "json", "json", "drop", "rename", "duplicate"]))
    if kind == "flip":
        data = bytearray(raw)
        for _ in range(draw(st.integers(1, 4))):
            data[draw(st.integers(0, len(data) - 1))] ^= 1 << draw(st.integers(0, 7))
        return kind, bytes(data)
    if kind == "truncate":
        return kind, raw[: draw(st.integers(0, len(raw) - 1))]
    members = list(members)
    i = draw(st.integers(0, len(members) - 1))
    name, data = members[i]
    if kind == "json":
        jsons = [j for j, (n, _) in enumerate(members) if n.endswith(".json")]
        i = draw(st.sampled_from(jsons))
        name, data = members[i]
        doc = json.loads(data)
        paths = _paths(doc)
        path = paths[draw(st.integers(0, len(paths) - 1))]
        doc = _set(copy.deepcopy(doc), path, draw(_JSON_VALUES))
        members[i] = (name, json.dumps(doc).encode())
    elif kind == "drop":
        members.pop(i)
    elif kind == "rename":
        root = name.split("/")[0]
        members[i] = (draw(st.sampled_from([f"{root}/../x", f"/{name}", f"{root}/data/weights/{name[-3:]}",
                                            "x", f"{root}/models/other.json"])), data)
    else:
        members.append(members[i])
    return kind, members


@fuzz(1000)
@given(data=st.data())
def test_mutated_archives_give_findings_or_one_line_error(valid, tripwires, tmp_path_factory, data):
    kind, content = data.draw(mutations(valid))
    path = tmp_path_factory.getbasetemp() / "case.pt2"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        import warnings

        with zipfile.ZipFile(path, "w") as zf, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # duplicate names
            for name, member in content:
                zf.writestr(name, member)
    t0 = time.perf_counter()
    try:
        result = check(path)
    except ProgramLoadError as e:
        assert "\n" not in e.reason and e.reason, (kind, e.reason)
    else:
        assert isinstance(result, CheckResult), kind
        for f in result:
            assert "\n" not in f.consumer
    assert time.perf_counter() - t0 < 5, kind
    assert tripwires == []
