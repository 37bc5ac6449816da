"""The kvpass examples that show compile and the standalone rewrite run as written."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_example(name, *args):
    out = subprocess.run([sys.executable, f"examples/{name}.py", *args], cwd=REPO, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return out.stdout


@pytest.mark.slow
def test_compile_shared_kv():
    out = run_example("compile_shared_kv", "--steps", "6")
    assert "tokens identical" in out and "compiled graphs: 2" in out and "scatter_slice" in out
    assert out.rstrip().endswith("PASS")


@pytest.mark.slow
def test_standalone_rewrite():
    out = run_example("standalone_rewrite")
    assert "scatter_slice" in out and "-slice_1 = aten.slice.Tensor(slice_scatter" in out
    assert out.rstrip().splitlines()[-1].startswith("PASS: ")
