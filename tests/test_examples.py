"""The examples run as a user runs them (``python examples/NAME.py``) and report success."""

import importlib.util
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent


def run_example(name, *args):
    proc = subprocess.run([sys.executable, f"examples/{name}.py", *args], cwd=REPO_ROOT, timeout=300,
                          capture_output=True, text=True)
    assert proc.returncode == 0, f"{name} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc.stdout


@pytest.mark.slow
def test_paged_store_batching():
    out = run_example("paged_store_batching")
    assert "store_paged_kv eager vs torch.compile (fullgraph): caches identical" in out
    assert "padding row skipped, every other slot untouched): ok" in out
    assert "attention C: 4 queries over 7 cached tokens read through block_table == contiguous history" in out
    assert out.rstrip().endswith("PASS: paged store and attention agree with the contiguous reference")


@pytest.mark.slow
def test_hf_gemma4_fast():
    pytest.importorskip("transformers")
    out = run_example("hf_gemma4", "--fast")
    assert "kvpass.backend(inner='eager')" in out
    assert "tokens identical: yes" in out
    assert "kvpass rewrites reported: 0 " in out
    assert "compiled graphs: " in out
    assert out.rstrip().endswith("PASS")


EXAMPLES = sorted(p.stem for p in (REPO_ROOT / "examples").glob("*.py")
                  if p.stem != "__init__" and 'if __name__ == "__main__":' in p.read_text())


@pytest.mark.slow
@pytest.mark.parametrize("name", EXAMPLES)
def test_every_example_has_help(name):
    """``python examples/NAME.py --help`` prints its usage and exits 0 without running anything."""
    proc = subprocess.run([sys.executable, f"examples/{name}.py", "--help"], cwd=REPO_ROOT, timeout=300,
                          capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: "), proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "PASS" not in proc.stdout


def test_examples_import_without_side_effects():
    """Importing an example runs nothing (all the work is in main())."""
    code = ("import sys; sys.path.insert(0, 'examples');\n"
            "import paged_store_batching, hf_gemma4, deploy_onnx, deploy_executorch\n"
            "assert callable(paged_store_batching.main) and callable(hf_gemma4.main)\n"
            "assert callable(deploy_onnx.main) and callable(deploy_onnx.generate)\n"
            "assert callable(deploy_executorch.main) and callable(deploy_executorch.generate)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, timeout=120, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""


@pytest.mark.slow
@pytest.mark.parametrize("name, modules, suffix, conversion, runtime", [
    ("deploy_onnx", ("onnxruntime", "onnxscript"), "onnx", "torch.onnx.export", "onnxruntime"),
    ("deploy_executorch", ("executorch.exir", "executorch.runtime"), "pte",
     "to_edge(prefill, decode).to_executorch()", "executorch"),
])
def test_deploy_example(tmp_path, name, modules, suffix, conversion, runtime):
    """Prefill + 6 greedy decode steps in the runtime from an empty cache, each within 1e-5 of eager."""
    for module in modules:
        pytest.importorskip(module)
    out = run_example(name, "--out", str(tmp_path / f"decoder.{suffix}"), "--steps", "6")
    assert f"kvpass.export(cache='outputs') -> {conversion}" in out
    (errors,) = re.findall(rf"max \|{runtime} - eager\| per step = \[(.*)\]", out)
    errors = [float(e) for e in errors.split(",")]
    assert len(errors) == 7 and max(errors) < 1e-5, out
    assert out.rstrip().endswith("PASS")


def load_example(name):
    """The example file as a fresh module (``examples/`` is not on the path), to patch before calling it."""
    spec = importlib.util.spec_from_file_location(f"{name}_example", REPO_ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_deploy_onnx_fails_loudly(tmp_path, monkeypatch, capsys):
    """The example says FAIL and exits 1 when ONNX Runtime and eager disagree: here the runtime's logits are
    replaced by wrong ones (the export and conversion, which ``test_deploy_example`` runs, are skipped)."""
    module = load_example("deploy_onnx")
    monkeypatch.setattr(module.kvpass, "export", lambda *a, **k: None)
    monkeypatch.setattr(module.torch.onnx, "export", lambda *a, **k: None)
    wrong = lambda path, prompt, steps: ([0] * steps, [np.full(1, 1e3, np.float32)] * (steps + 1))  # noqa: E731
    monkeypatch.setattr(module, "generate", wrong)
    assert module.cli(["--out", str(tmp_path / "d.onnx"), "--steps", "1"]) == 1
    out = capsys.readouterr().out
    assert "FAIL: ONNX Runtime and eager differ by" in out and "PASS" not in out


def test_deploy_executorch_skips_cleanly_without_executorch(monkeypatch, capsys):
    """Where ExecuTorch is not installed the example says so and exits 0 (nothing exported)."""
    module = load_example("deploy_executorch")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(module.importlib.util, "find_spec",
                        lambda name, *a: None if name == "executorch" else real_find_spec(name, *a))
    assert module.cli(["--steps", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("SKIP: ExecuTorch is not installed") and "PASS" not in out


def test_deploy_onnx_writes_to_a_temporary_folder_by_default(tmp_path, monkeypatch, capsys):
    """Without --out the ONNX program goes to a temporary folder, removed at the end: nothing is left in the
    current folder (the export and conversion are replaced: only where the files go is checked here)."""
    module = load_example("deploy_onnx")
    monkeypatch.chdir(tmp_path)
    written = []

    def fake_onnx_export(ep, f, **kwargs):
        written.append(pathlib.Path(f))
        pathlib.Path(f).write_bytes(b"onnx")
        pathlib.Path(f"{f}.data").write_bytes(b"weights")

    monkeypatch.setattr(module.kvpass, "export", lambda *a, **k: None)
    monkeypatch.setattr(module.torch.onnx, "export", fake_onnx_export)
    monkeypatch.setattr(module, "generate", lambda path, prompt, steps: ([0] * steps, [np.zeros(1, np.float32)] * (steps + 1)))
    module.cli(["--steps", "1"])
    (path,) = written
    assert path.parent != tmp_path and not path.parent.exists()
    assert list(tmp_path.iterdir()) == []
    assert "kvpass.export" in capsys.readouterr().err  # progress lines on stderr


def test_deploy_onnx_empty_cache_has_each_input_dtype():
    """The user's loop feeds zeros of each input's own type (a cache may hold int64 counters next to floats)."""
    from types import SimpleNamespace

    module = load_example("deploy_onnx")
    floats = module.zeros_for(SimpleNamespace(shape=[2, 3], type="tensor(float)"))
    counters = module.zeros_for(SimpleNamespace(shape=[1], type="tensor(int64)"))
    assert floats.dtype == np.float32 and floats.shape == (2, 3) and counters.dtype == np.int64
