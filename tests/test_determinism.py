"""Determinism and cache keys: the same input graph gives the same rewritten code in two processes; the Inductor
pass's ``uuid()`` is the same in two processes and changes when any file it covers changes."""

import os
import shutil
import subprocess
import sys

import pytest

import kvpass
from kvpass.inductor_pass import KVPassInductorPass, _hash, catalogue_files

TESTS = os.path.dirname(os.path.abspath(__file__))

# Captures the graphs of a fixed generated decoder (every catalogue idiom that applies to it), rewrites them and
# prints their code: run in a fresh interpreter each time.
REWRITE_SCRIPT = r"""
import sys, hashlib, torch
sys.path.insert(0, {tests!r})
import fuzz_decoders as fd, kvpass
from kvpass.tracing import tracing_context
case = fd.Case(layer_types=("sliding", "full", "sliding", "full"), kv_shared_layers=2, kv_heads=2, q_per_kv=2,
               head_dims=(6, 8), owners=(fd.OwnerIdiom(store="prealloc", k_hop=True),
                                         fd.OwnerIdiom(store="batched", layout="shd", int_index_decode=True)),
               followers=(fd.FollowerIdiom(kind="padded", pad="zeros_assign", head_dim=4),
                          fd.FollowerIdiom(kind="shared", to_device="as_tensor")),
               numpy_mask=True, dtype=torch.float32, prompt_len=4, decode_steps=2, seed=5)
codes, matches = [], 0
def backend(gm, example_inputs):
    global matches
    gm, report = kvpass.rewrite(gm)
    matches += len(report.matches)
    codes.append(gm.code)
    codes.append(report.format())
    return gm.forward
with tracing_context():
    fd.run_steps(torch.compile(fd.build(case), backend=backend), fd.token_steps(case))
print(len(codes) // 2, matches, hashlib.sha256("\n".join(codes).encode()).hexdigest())
"""


def run_python(code):
    env = dict(os.environ, PYTHONHASHSEED="random")  # what differs between two runs of a user's program
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip().splitlines()[-1]


@pytest.mark.slow
def test_rewrite_output_is_identical_in_two_processes():
    script = REWRITE_SCRIPT.format(tests=TESTS)
    first, second = run_python(script), run_python(script)
    assert first == second
    graphs, matches, _ = first.split()
    assert int(graphs) >= 2 and int(matches) >= 10  # prefill and decode graphs, every cache rewritten


@pytest.mark.slow
def test_uuid_is_identical_in_two_processes():
    code = "from kvpass.inductor_pass import KVPassInductorPass as P; print(P().uuid())"
    assert run_python(code) == run_python(code) == KVPassInductorPass().uuid()


def test_uuid_changes_when_any_covered_file_changes(tmp_path):
    """Every file the key covers (every module the rewrite imports, the store lowering, each rule) is hashed by name and
    content, not by install location: copies give the same key, and editing any one of them changes it."""
    p = KVPassInductorPass()
    files = catalogue_files(p.patterns)
    names = tuple(x.name for x in p.patterns)
    assert {os.path.basename(f) for f in files} >= {
        "engine.py", "ir.py", "aliasing.py", "rules.py", "observe.py", "tracing.py", "_store.py"} | {
        f"{m}.py" for m in ("store_loop", "view_fold", "scatter_slice", "pad_slice", "host_elimination")}
    copies = []
    for f in files:
        d = tmp_path / str(len(copies))
        d.mkdir()
        copies.append(str(shutil.copy(f, d)))
    base = _hash(tuple(copies), names)
    assert base == p.uuid()
    seen = {base}
    for c in copies:
        original = open(c).read()
        with open(c, "a") as fh:
            fh.write("\n# edited\n")
        changed = _hash(tuple(copies), names)
        assert changed not in seen, f"editing {os.path.basename(c)} did not change the key"
        seen.add(changed)
        with open(c, "w") as fh:
            fh.write(original)
    assert _hash(tuple(copies), names) == base
    assert kvpass.__version__  # the package under test is importable as installed
