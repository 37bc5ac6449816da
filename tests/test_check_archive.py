"""``kvpass check`` on hostile ``.pt2`` files: nothing from the file runs, every bad file is one line and exit 2.

The archives are built from a real ``torch.export.save`` output, edited member by member. Every loading path of
``torch.export.load`` that runs code from the file (issue 14) is planted with a payload that would create a
marker file; ``test_trusted_load_really_runs_the_payloads`` shows the payloads are live (``--trusted``, i.e. the
``torch.export.load`` that ``kvpass check`` used before, creates the markers), and the untrusted reader must not.
The checks run in a child process under an audit hook (``sys.addaudithook``) that records any library load,
process start, unpickling, ``eval``/``exec`` or file write while ``kvpass check`` runs.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shlex
import subprocess
import sys
import zipfile
import zlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kvpass.fidelity import CheckResult, Limits, ProgramLoadError, check
from kvpass.fidelity.archive import json_depth


class Attn(nn.Module):
    """One attention whose K history is a baked constant (findings: exit 1 when the file is read)."""

    def __init__(self):
        super().__init__()
        self.q = nn.Linear(16, 16, bias=False)
        self.k = nn.Linear(16, 8, bias=False)
        self.hist = torch.randn(1, 1, 3, 8, generator=torch.Generator().manual_seed(0))

    def forward(self, x):
        t = x.shape[1]
        q = self.q(x).view(1, t, 2, 8).transpose(1, 2)
        k = torch.cat([self.hist, self.k(x).view(1, t, 1, 8).transpose(1, 2)], 2).expand(1, 2, t + 3, 8)
        return F.scaled_dot_product_attention(q, k, k)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A valid archive and its members (root folder stripped)."""
    path = tmp_path_factory.mktemp("base") / "base.pt2"
    torch.export.save(torch.export.export(Attn(), (torch.randn(1, 4, 16),), strict=False), path)
    with zipfile.ZipFile(path) as zf:
        root = zf.namelist()[0].split("/")[0] + "/"
        members = {n[len(root):]: zf.read(n) for n in zf.namelist()}
    return path, root, members


def build(path, root, members: dict, extra: dict | None = None, method=zipfile.ZIP_STORED):
    """Write an archive with ``members`` (relative names) under ``root`` plus ``extra`` (names as given)."""
    with zipfile.ZipFile(path, "w", method) as zf:
        for rel, data in members.items():
            zf.writestr(root + rel, data)
        for name, data in (extra or {}).items():
            zf.writestr(name, data)
    return str(path)


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(self.marker)}",)


def _pickle(marker) -> bytes:
    return pickle.dumps(_Payload(str(marker)))


def _edit_json(members, rel, fn):
    doc = json.loads(members[rel])
    fn(doc)
    members[rel] = json.dumps(doc).encode()


def _planted(base, tmp_path):
    """``{case: (path, marker)}``: one archive per loading path that runs code in ``torch.export.load``."""
    _, root, members = base
    tmp_path.mkdir(parents=True, exist_ok=True)
    out = {}

    def variant(name, edit, extra=None):
        m = dict(members)
        marker = tmp_path / f"marker_{name}"
        extra_members = edit(m, marker) or {}
        out[name] = (build(tmp_path / f"{name}.pt2", root, m, {root + k: v for k, v in extra_members.items()}),
                     marker)

    def weight_pickle(m, marker):
        def fn(doc):
            doc["config"]["q.weight"]["use_pickle"] = True
        _edit_json(m, "data/weights/model_weights_config.json", fn)
        m["data/weights/weight_0"] = _pickle(marker)

    def constant_pickle(m, marker):
        def fn(doc):
            doc["config"]["hist"]["use_pickle"] = True
        _edit_json(m, "data/constants/model_constants_config.json", fn)
        name = json.loads(m["data/constants/model_constants_config.json"])["config"]["hist"]["path_name"]
        m["data/constants/" + name] = _pickle(marker)

    def opaque(m, marker):
        def fn(doc):
            doc["config"]["evil"] = {"path_name": "opaque_obj_0", "is_param": False, "use_pickle": True,
                                     "tensor_meta": None}
        _edit_json(m, "data/constants/model_constants_config.json", fn)
        return {"data/constants/opaque_obj_0": _pickle(marker)}

    def sample_inputs(m, marker):
        m["data/sample_inputs/model.pt"] = _pickle(marker)

    def legacy_weights(m, marker):
        return {"data/weights/model.pt": _pickle(marker)}

    def legacy_constants(m, marker):
        return {"data/constants/model.pt": _pickle(marker)}

    def sym_expr(m, marker):
        code = f"__import__('os').system('touch {marker}')"

        def fn(doc):
            values = doc["graph_module"]["graph"]["tensor_values"]
            values["x"]["sizes"][0] = {"as_expr": {"expr_str": code, "hint": {"as_int": 1}}}
            doc["range_constraints"] = {code: {"min_val": 1, "max_val": 8}}
        _edit_json(m, "models/model.json", fn)

    def aoti(m, marker):
        flags = {"compiler": "sh", "cflags": ["-c", f"touch {marker}"], "ldflags": []}
        return {"data/aotinductor/model/model.so": b"\x7fELF" + b"\0" * 60,
                "data/aotinductor/model/model.cpp": b"int main() { return 0; }\n",
                "data/aotinductor/model/model_compile_flags.json": json.dumps(flags).encode(),
                "data/aotinductor/model/model_linker_flags.json": json.dumps(flags).encode()}

    for name, fn in [("weight_use_pickle", weight_pickle), ("constant_use_pickle", constant_pickle),
                     ("opaque_obj_constant", opaque), ("sample_inputs", sample_inputs),
                     ("legacy_weights_pt", legacy_weights), ("legacy_constants_pt", legacy_constants),
                     ("symint_expr_str", sym_expr), ("aotinductor_so_cpp_flags", aoti)]:
        variant(name, fn)
    return out


def _malformed(base, tmp_path):
    """``{case: path}``: archives that must each give exit 2 and one line."""
    src, root, members = base
    out = {}
    raw = src.read_bytes() if hasattr(src, "read_bytes") else open(src, "rb").read()

    # a byte of the stored model.json flipped, CRC left as it was
    with zipfile.ZipFile(src) as zf:
        info = zf.getinfo(root + "models/model.json")
    data_start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    with open(src, "rb") as f:
        f.seek(info.header_offset + 28)
        extra_len = int.from_bytes(f.read(2), "little")
    data_start = info.header_offset + 30 + len(info.filename.encode()) + extra_len
    flipped = bytearray(raw)
    flipped[data_start + 100] ^= 0x20
    out["crc_mismatch"] = tmp_path / "crc.pt2"
    out["crc_mismatch"].write_bytes(bytes(flipped))
    out["truncated"] = tmp_path / "truncated.pt2"
    out["truncated"].write_bytes(raw[: len(raw) // 2])
    out["truncated_directory"] = tmp_path / "truncated_dir.pt2"
    out["truncated_directory"].write_bytes(raw[:-10])
    # zip bomb: 300 MB of zeros deflated to a few hundred KB
    bomb = tmp_path / "bomb.pt2"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as zf:
        for rel, data in members.items():
            zf.writestr(root + rel, data)
        zf.writestr(root + "data/weights/weight_9", b"\0" * (300 << 20))
    out["zip_bomb"] = bomb
    out["dotdot_member"] = build(tmp_path / "dotdot.pt2", root, members, {"../x": b"owned"})
    out["dotdot_inside"] = build(tmp_path / "dotdot2.pt2", root, members, {root + "data/../../x": b"owned"})
    out["absolute_member"] = build(tmp_path / "abs.pt2", root, members, {"/tmp/x": b"owned"})
    deep = dict(members)
    deep["models/model.json"] = b"[" * 100_000 + b"]" * 100_000
    out["deep_json"] = build(tmp_path / "deep.pt2", root, deep)
    huge = dict(members)

    def claim(doc):
        doc["config"]["hist"]["tensor_meta"]["sizes"] = [{"as_int": 2**40}]
        doc["config"]["hist"]["tensor_meta"]["strides"] = [{"as_int": 1}]
    _edit_json(huge, "data/constants/model_constants_config.json", claim)
    out["tensor_2pow40"] = build(tmp_path / "huge.pt2", root, huge)
    short = dict(members)

    def overclaim(doc):
        doc["config"]["hist"]["tensor_meta"]["sizes"] = [{"as_int": 1000}]
        doc["config"]["hist"]["tensor_meta"]["strides"] = [{"as_int": 1}]
    _edit_json(short, "data/constants/model_constants_config.json", overclaim)
    out["payload_shorter_than_claim"] = build(tmp_path / "short.pt2", root, short)
    missing_ref = dict(members)
    _edit_json(missing_ref, "models/model.json",
               lambda d: d["graph_module"]["graph"]["nodes"][0]["inputs"][0].update(
                   {"arg": {"as_tensor": {"name": "nowhere"}}}))
    out["undefined_value"] = build(tmp_path / "undef.pt2", root, missing_ref)
    out["not_json"] = build(tmp_path / "notjson.pt2", root, {**members, "models/model.json": b"{not json"})
    out["json_array_root"] = build(tmp_path / "arr.pt2", root, {**members, "models/model.json": b"[1, 2]"})
    out["no_model"] = build(tmp_path / "nomodel.pt2", root,
                            {k: v for k, v in members.items() if not k.startswith("models/")})
    out["duplicate_member"] = tmp_path / "dup.pt2"
    with zipfile.ZipFile(out["duplicate_member"], "w") as zf:
        for rel, data in members.items():
            zf.writestr(root + rel, data)
        with pytest.warns(UserWarning, match="Duplicate name"):
            zf.writestr(root + "models/model.json", b"{}")
    return {k: str(v) for k, v in out.items()}


# the driver: runs `kvpass check` on each file in this process under an audit hook, one JSON line per file
_DRIVER = r"""
import contextlib, io, json, os, sys, time
import encodings.cp437, kvpass.cli, kvpass.fidelity, torch  # every import (zipfile decodes names with cp437) first
FORBIDDEN = ("ctypes.dlopen", "subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.fork",
             "os.forkpty", "pickle.find_class", "exec", "compile", "os.remove", "os.rename", "os.mkdir",
             "shutil.", "tempfile.")
events = []
def hook(event, args):
    if event.startswith(FORBIDDEN):
        events.append(event)
    elif event == "open" and len(args) >= 3:
        mode, flags = args[1], args[2] or 0
        if (isinstance(mode, str) and any(c in mode for c in "wax+")) or flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            events.append(f"open for writing: {args[0]}")
def peak_kib():  # VmHWM: this process's own peak RSS (ru_maxrss would carry pytest's over exec)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))
extra = json.loads(sys.argv[1])
sys.addaudithook(hook)
for path in sys.argv[2:]:
    events.clear()
    out, err = io.StringIO(), io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = kvpass.cli.main(["check", *extra, path])
        except BaseException as e:
            rc = f"raised {type(e).__name__}: {e}"
    print(json.dumps({"path": path, "rc": rc, "stdout": out.getvalue(), "stderr": err.getvalue(),
                      "seconds": time.perf_counter() - t0, "events": list(events),
                      "maxrss_kib": peak_kib()}), flush=True)
"""


def run_checks(paths, cwd, extra=()):
    """``{path: result}`` of ``kvpass check`` on each path, in one child process under the audit hook."""
    proc = subprocess.run([sys.executable, "-c", _DRIVER, json.dumps(list(extra)), *paths], cwd=cwd,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(results) == len(paths), proc.stdout[-2000:] + proc.stderr[-2000:]
    return {r["path"]: r for r in results}


def _listing(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def test_planted_payloads_never_run(base, tmp_path):
    planted = _planted(base, tmp_path / "files")
    work = tmp_path / "work"
    work.mkdir()
    before = _listing(tmp_path)
    results = run_checks([p for p, _ in planted.values()], cwd=work)
    for case, (path, marker) in planted.items():
        r = results[path]
        assert not marker.exists(), case
        assert r["events"] == [], (case, r["events"])
        assert r["rc"] in (0, 1), (case, r)
        assert "Traceback" not in r["stderr"] + r["stdout"], case
    assert _listing(tmp_path) == before  # nothing written anywhere in the test's folder, no extraction
    assert _listing(work) == []
    # the pickled and AOTInductor members are listed as not inspected; the findings are still found
    expected = {"weight_use_pickle": "data/weights/weight_0 for 'q.weight' (pickled)",
                "constant_use_pickle": "for 'hist' (pickled)",
                "opaque_obj_constant": "data/constants/opaque_obj_0 for 'evil' (pickled)",
                "sample_inputs": "data/sample_inputs/model.pt (pickled)",
                "legacy_weights_pt": "data/weights/model.pt (pickled)",
                "legacy_constants_pt": "data/constants/model.pt (pickled)",
                "aotinductor_so_cpp_flags": "data/aotinductor/model/model.so (AOTInductor artifact: never loaded"}
    for case, text in expected.items():
        out = results[planted[case][0]]["stdout"]
        assert "not inspected:" in out and text in out, (case, out)
    for case, (path, _) in planted.items():
        assert results[path]["rc"] == 1 and "constant-kv  c_hist (hist)" in results[path]["stdout"], case
    assert "values unknown" in results[planted["constant_use_pickle"][0]]["stdout"]


def test_trusted_load_really_runs_the_payloads(base, tmp_path):
    """The payloads are live: ``torch.export.load`` (``--trusted``, what ``kvpass check`` did before issue 14)
    runs them. The planted archives above are therefore real tests of the untrusted reader. (The AOTInductor
    members are run by ``torch._inductor.aoti_load_package``, not by ``torch.export.load``.)"""
    planted = _planted(base, tmp_path / "files")
    cases = ["weight_use_pickle", "constant_use_pickle", "opaque_obj_constant", "sample_inputs",
             "legacy_weights_pt", "legacy_constants_pt", "symint_expr_str"]
    run_checks([planted[c][0] for c in cases], cwd=tmp_path, extra=["--trusted"])
    assert [c for c in cases if planted[c][1].exists()] == cases


def test_malformed_archives_exit_2_with_one_line(base, tmp_path):
    bad = _malformed(base, tmp_path)
    results = run_checks(list(bad.values()), cwd=tmp_path)
    reasons = {}
    for case, path in bad.items():
        r = results[path]
        assert r["rc"] == 2, (case, r)
        lines = r["stderr"].splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"kvpass check: error: cannot read {path!r}: "), (case, r)
        assert r["stdout"] == "" and r["events"] == [], (case, r)
        assert r["seconds"] < 30, (case, r["seconds"])
        reasons[case] = lines[0].split(": ", 3)[-1]
    assert max(r["maxrss_kib"] for r in results.values()) < 4 * 1024 * 1024
    assert "Bad CRC-32" in reasons["crc_mismatch"] and "models/model.json" in reasons["crc_mismatch"]
    assert "zip bomb" in reasons["zip_bomb"] and "weight_9" in reasons["zip_bomb"]
    assert "'../x': a '..' component" in reasons["dotdot_member"]
    assert "'..' component" in reasons["dotdot_inside"]
    assert "an absolute path" in reasons["absolute_member"]
    assert "nests JSON deeper than 512 (max_json_depth)" in reasons["deep_json"]
    assert "claims 1099511627776 elements" in reasons["tensor_2pow40"]
    assert "addresses 4000 bytes but member" in reasons["payload_shorter_than_claim"]
    assert "undefined value 'nowhere'" in reasons["undefined_value"]
    assert "appears twice" in reasons["duplicate_member"]
    assert "no models/<name>.json" in reasons["no_model"]


def test_api_raises_program_load_error_and_limits_are_overridable(base, tmp_path):
    path, root, members = base
    deep = build(tmp_path / "deep.pt2", root, {**members, "models/model.json": b"[" * 600 + b"]" * 600})
    with pytest.raises(ProgramLoadError, match="max_json_depth"):
        check(deep)
    with pytest.raises(ProgramLoadError, match="not valid JSON|expected an object"):
        check(deep, limits=Limits(max_json_depth=1000))  # past the depth limit: parsed, then rejected
    with pytest.raises(ProgramLoadError, match=r"3 members, over the limit of 2 \(max_members\)|max_members"):
        check(path, limits=Limits(max_members=2))
    with pytest.raises(ProgramLoadError, match="max_archive_bytes"):
        check(path, limits=Limits(max_archive_bytes=100))
    result = check(path)
    assert isinstance(result, CheckResult) and result.attentions == 1 and len(result) == 1


def test_crc_of_unread_members_only_with_verify_all(base, tmp_path):
    """A flipped byte in a weight the check does not need is not read, so not noticed by default; with
    ``verify_all_crcs`` every member is streamed and the mismatch is an error."""
    path, root, members = base
    raw = bytearray(open(path, "rb").read())
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(root + "data/weights/weight_0")
    start = info.header_offset + 30 + int.from_bytes(raw[info.header_offset + 26: info.header_offset + 28], "little") \
        + int.from_bytes(raw[info.header_offset + 28: info.header_offset + 30], "little")
    raw[start + 5] ^= 0x01
    flipped = tmp_path / "w.pt2"
    flipped.write_bytes(bytes(raw))
    assert len(check(flipped)) == 1
    with pytest.raises(ProgramLoadError, match="Bad CRC-32 for file .*weight_0"):
        check(flipped, limits=Limits(verify_all_crcs=True))


def test_json_depth_prescan():
    assert json_depth(b'{"a": [1, {"b": "[[[[{{{"}]}', 10) == 3
    assert json_depth(b'"\\"[["', 10) == 0
    assert json_depth(b"[" * 10_000, 5) == 10_000
    assert json_depth(b'["a\\\\", ["]"]]', 9) == 2  # an escaped backslash ends the string


def test_a_failure_while_analysing_a_file_is_one_line(base, monkeypatch):
    """Whatever a hostile graph makes the analysis do, a file gives a ProgramLoadError, never a traceback."""
    import kvpass.fidelity as fidelity

    def boom(*a, **k):
        raise IndexError("list index out of range\nsecond line")

    monkeypatch.setattr(fidelity, "run_rules", boom)
    with pytest.raises(ProgramLoadError, match=r"cannot analyse its graph \(IndexError: list index out of range\)$"):
        check(base[0])
