"""The kvpass console script."""

import subprocess
import sys

import pytest

import kvpass
from kvpass.cli import main


def test_version(capsys):
    try:
        main(["--version"])
    except SystemExit as e:
        assert e.code == 0
    assert capsys.readouterr().out.strip() == f"kvpass {kvpass.__version__}"


def test_help_lists_commands():
    out = subprocess.run([sys.executable, "-m", "kvpass.cli", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0
    assert "demo" in out.stdout


def test_no_command_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "usage: kvpass" in capsys.readouterr().out


def _one_line_error(argv, capsys):
    """Run ``kvpass ARGV``; it must exit 2 with exactly one line on stderr, no usage block, nothing on stdout."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    captured = capsys.readouterr()
    assert info.value.code == 2
    lines = captured.err.splitlines()
    assert len(lines) == 1 and "usage:" not in captured.err and captured.out == "", captured.err
    return lines[0]


def test_demo_rejects_negative_steps(capsys):
    line = _one_line_error(["demo", "--steps", "-1"], capsys)
    assert line == "kvpass demo: error: argument --steps: must be >= 0, got -1 (see kvpass demo --help)"


@pytest.mark.parametrize("argv, words", [
    (["demo", "--steps", "x"], "kvpass demo: error: argument --steps: invalid integer value: 'x'"),
    (["demo", "--steps", "0", "--timing"], "0 steps leave nothing to time"),
    (["demo", "--rounds", "0"], "kvpass demo: error: argument --rounds: must be >= 1, got 0"),
    (["demo", "--bogus"], "kvpass demo: error: unrecognized arguments: --bogus"),
    (["bench", "--steps", "0"], "kvpass bench: error: argument --steps: must be >= 1, got 0"),
    (["bench", "--device", "tpu"], "kvpass bench: error: argument --device: invalid choice: 'tpu'"),
    (["bench", "--bogus"], "kvpass bench: error: unrecognized arguments: --bogus"),
    (["check"], "kvpass check: error: the following arguments are required: FILE.pt2"),
    (["frobnicate"], "kvpass: error: argument COMMAND: invalid choice: 'frobnicate'"),
])
def test_usage_errors_are_one_line_and_exit_2(argv, words, capsys):
    assert words in _one_line_error(argv, capsys)


@pytest.mark.parametrize("command", ["demo", "bench", "check"])
def test_every_subcommand_has_full_help(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: kvpass {command}")
    options = [line.strip() for line in out.splitlines() if line.strip().startswith("--")]
    for line in options:  # every option says what it does, on its line or the next
        assert len(line.split(None, 2)) >= 2 or line.endswith(("STEPS", "ROUNDS")), line
    description = out.split("\n\n")[1]
    assert description.rstrip().endswith((".", ")")), description  # a whole sentence, not cut mid-way


def test_bench_help_describes_the_method_and_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "eager, backend=\"inductor\", backend=\"kvpass\" and kvpass.compile, measured side by side in one process" in out
    for words in ("--steps STEPS decode steps after an 8-token prefill", "--rounds ROUNDS timed rounds",
                  "--warmup WARMUP untimed runs of each runner", "--device {cpu,cuda} device to run on",
                  "interleaved", "the median and the min", "computed within each round", "recompile-limit warning"):
        assert words in out, words


@pytest.mark.parametrize("device, words", [
    ("tpu", "'tpu': not a device torch knows; give cpu, cuda or cuda:N"),
    ("meta", "'meta': the demo runs on cpu or cuda, not meta"),
    ("cuda:0", "'cuda:0': CUDA is not available on this machine"),
])
def test_demo_bad_device_is_one_line(device, words, capsys):
    """An unusable ``--device`` is one line and exit 2 (as ``kvpass bench``), before anything runs."""
    if device.startswith("cuda") and __import__("torch").cuda.is_available():
        pytest.skip("CUDA is available here")
    line = _one_line_error(["demo", "--device", device], capsys)
    assert line == f"kvpass demo: error: argument --device: {words} (see kvpass demo --help)"


def test_bench_bad_device(capsys):
    if __import__("torch").cuda.is_available():
        pytest.skip("CUDA is available here")
    assert "CUDA is not available" in _one_line_error(["bench", "--device", "cuda"], capsys)
