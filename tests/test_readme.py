"""README.md stays runnable: its commands are what CI runs, and its Python examples execute."""

import pytest
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def blocks(lang):
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def test_quick_start_commands_are_what_ci_runs():
    ci = (REPO / ".ci" / "run").read_text()
    commands = [line for b in blocks("bash") for line in b.strip().splitlines()]
    assert len(commands) >= 2
    assert "kvpass demo" in commands[0] and "pytest" in commands[1]
    for cmd in commands[:2]:
        assert cmd in ci.splitlines(), f"README command not in .ci/run: {cmd}"


#: packages a README block may need that kvpass does not install: the block is skipped where one is missing
OPTIONAL = ("onnxruntime", "onnxscript", "executorch", "iree", "transformers")


def _block_id(code: str) -> str:
    for name in OPTIONAL:
        if re.search(rf"^\s*import\s.*\b{name}\b", code, flags=re.M):
            return name
    first = next(line for line in code.splitlines() if line.strip() and not line.startswith(("import", "from", "#")))
    return re.sub(r"\W+", "_", first)[:40].strip("_")


PYTHON_BLOCKS = blocks("python")


@pytest.mark.slow
@pytest.mark.parametrize("code", PYTHON_BLOCKS, ids=[_block_id(c) for c in PYTHON_BLOCKS])
def test_python_block_runs_as_written(code, tmp_path, monkeypatch):
    """Every ```python block of the README runs as it is, in a folder of its own (what it saves lands there);
    a block that imports a package kvpass does not install is skipped where that package is missing."""
    import importlib.util

    for name in OPTIONAL:
        if re.search(rf"^\s*(import|from)\s.*\b{name}\b", code, flags=re.M) and importlib.util.find_spec(name) is None:
            pytest.skip(f"{name} is not installed")
    if "onnxruntime" in code and importlib.util.find_spec("onnxscript") is None:
        pytest.skip("onnxscript is not installed (torch.onnx.export needs it)")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {"__name__": "readme_block"})


def test_every_fenced_block_is_tested():
    """The README's fenced blocks are python (run above), bash (checked below) or text (output, not run)."""
    langs = re.findall(r"^```(\w*)$", README, flags=re.M)[::2]  # opening fences
    assert set(langs) <= {"python", "bash", "text"}, langs


def test_bash_blocks_are_ci_commands_or_valid_pytest_calls():
    """A bash line of the README is a command .ci/run runs as written, or a pytest call whose options pytest
    accepts (collected, not run, on the unit layer's file, which every README selection keeps tests of)."""
    import shlex
    import subprocess
    import sys

    ci = (REPO / ".ci" / "run").read_text().splitlines()
    for line in (line for b in blocks("bash") for line in b.strip().splitlines()):
        command = line.split("#")[0].strip()
        if command in ci:
            continue
        argv = shlex.split(command)
        assert argv[0] == ".venv/bin/pytest", f"README bash line neither in .ci/run nor a pytest call: {line}"
        argv = [a for a in argv[1:] if a not in ("-n", "2")]
        proc = subprocess.run([sys.executable, "-m", "pytest", *argv, "--collect-only", "-p", "no:xdist",
                               "tests/test_unit_rules.py"], cwd=REPO, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]


@pytest.mark.slow
def test_saved_program_is_clean_for_kvpass_check(tmp_path, monkeypatch):
    """The README's "save a program for kvpass check" snippet writes a .pt2 that `kvpass check` calls clean."""
    from kvpass.cli import main

    monkeypatch.chdir(tmp_path)
    (snippet,) = [code for code in blocks("python") if "\"model.pt2\")" in code]
    exec(compile(snippet, "README.md", "exec"), {})
    assert main(["check", "model.pt2"]) == 0


def test_pattern_catalogue_table_is_in_sync_with_the_docstrings():
    from kvpass.engine import catalogue_markdown

    start, end = README.index("<!-- catalogue -->\n"), README.index("<!-- /catalogue -->")
    assert README[start + len("<!-- catalogue -->\n"):end] == catalogue_markdown()
