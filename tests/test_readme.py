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


@pytest.mark.slow
def test_python_examples_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # what the examples save (model.pt2) lands here
    for code in blocks("python"):
        exec(compile(code, "README.md", "exec"), {})


@pytest.mark.slow
def test_saved_program_is_clean_for_kvpass_check(tmp_path, monkeypatch):
    """The README's "save a program for kvpass check" snippet writes a .pt2 that `kvpass check` calls clean."""
    from kvpass.cli import main

    monkeypatch.chdir(tmp_path)
    (snippet,) = [code for code in blocks("python") if "torch.export.save(" in code]
    exec(compile(snippet, "README.md", "exec"), {})
    assert main(["check", "model.pt2"]) == 0


def test_pattern_catalogue_table_is_in_sync_with_the_docstrings():
    from kvpass.engine import catalogue_markdown

    start, end = README.index("<!-- catalogue -->\n"), README.index("<!-- /catalogue -->")
    assert README[start + len("<!-- catalogue -->\n"):end] == catalogue_markdown()
