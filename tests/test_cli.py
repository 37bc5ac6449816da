"""The kvpass console script."""

import subprocess
import sys

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


def test_demo_runs(capsys):
    assert main(["demo", "--steps", "2", "--no-timing"]) == 0
    out = capsys.readouterr().out
    assert "readonly follower of layer 1" in out
    assert "kvpass.compile: 2 graphs (0 graph breaks), 0 host ops left" in out
    assert "kvpass.check finds 0 problem(s)" in out


def test_demo_json(capsys):
    import json

    assert main(["demo", "--steps", "2", "--no-timing", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["stock"]["make_fx_findings"] > 0 and result["kvpass"]["export_findings"] == 0
    assert result["kvpass"]["report_counts"]["scatter_slice"] == 16


def test_demo_rejects_negative_steps(capsys):
    try:
        main(["demo", "--steps", "-1"])
    except SystemExit as e:
        assert e.code == 2
    assert "--steps must be >= 0" in capsys.readouterr().err


def test_bench_help_and_bad_device(capsys):
    try:
        main(["bench", "--help"])
    except SystemExit as e:
        assert e.code == 0
    assert "usage: kvpass bench" in capsys.readouterr().out
    try:
        main(["bench", "--device", "cuda"]) if not __import__("torch").cuda.is_available() else None
    except SystemExit as e:
        assert e.code == 2
        assert "CUDA is not available" in capsys.readouterr().err
