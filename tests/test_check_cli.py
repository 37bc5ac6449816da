"""``kvpass check FILE.pt2``: a table and exit 1 with findings, exit 0 when clean, exit 2 (one line) when unreadable."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kvpass.cli import main


class Attn(nn.Module):
    """One attention whose K/V history is ``hist`` (plain tensor attributes: captured as constants), or none."""

    def __init__(self, hist: torch.Tensor | None):
        super().__init__()
        self.q = nn.Linear(16, 16, bias=False)
        self.k = nn.Linear(16, 8, bias=False)
        self.v = nn.Linear(16, 8, bias=False)
        self.k_hist = hist
        self.v_hist = None if hist is None else hist.clone()
        self.mask = torch.ones(32, 32, dtype=torch.bool).tril()  # a constant that is not K/V

    def forward(self, x):
        t = x.shape[1]
        q = self.q(x).view(1, t, 2, 8).transpose(1, 2)
        k = self.k(x).view(1, t, 1, 8).transpose(1, 2)
        v = self.v(x).view(1, t, 1, 8).transpose(1, 2)
        if self.k_hist is not None:
            k = torch.cat([self.k_hist, k], dim=2)
            v = torch.cat([self.v_hist, v], dim=2)
        s = k.shape[2]
        mask = self.mask[s - t : s, :s]
        return F.scaled_dot_product_attention(q, k.expand(1, 2, s, 8), v.expand(1, 2, s, 8), attn_mask=mask)


@pytest.fixture(scope="module")
def programs(tmp_path_factory):
    """A dirty .pt2 (zero K/V history baked in), a clean one, a garbage file and a missing path."""
    root = tmp_path_factory.mktemp("cli")
    x = torch.randn(1, 4, 16, generator=torch.Generator().manual_seed(0))
    paths = {"dirty": root / "dirty.pt2", "clean": root / "clean.pt2"}
    torch.export.save(torch.export.export(Attn(torch.zeros(1, 1, 3, 8)), (x,), strict=False), paths["dirty"])
    torch.export.save(torch.export.export(Attn(None), (x,), strict=False), paths["clean"])
    paths["garbage"] = root / "garbage.pt2"
    paths["garbage"].write_text("this is not an exported program\n")
    paths["missing"] = root / "missing.pt2"
    return {k: str(v) for k, v in paths.items()}


def test_findings_print_a_table_and_exit_1(programs, capsys):
    assert main(["check", programs["dirty"]]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"{programs['dirty']}: 2 finding(s): K/V that the capture baked or disconnected"
    assert out[1].split() == ["KIND", "NODE", "SHAPE", "DTYPE", "VALUES", "CONSUMER", "SOURCE"]
    rows = out[2:4]
    assert out[4:] == ["  not inspected: data/sample_inputs/model.pt (pickled)"]
    for row, role in zip(rows, ("k", "v")):
        assert row.startswith(f"constant-kv  c_{role}_hist ({role}_hist)")
        assert "[1, 1, 3, 8]" in row and "float32" in row and "all zeros" in row
        assert f"{'key' if role == 'k' else 'value'} of scaled_dot_product_attention" in row
        assert row.rstrip().endswith(f"in forward: {role} = torch.cat([self.{role}_hist, {role}], dim=2)")


def test_clean_program_exits_0(programs, capsys):
    assert main(["check", programs["clean"]]) == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines() == [
        f"{programs['clean']}: clean: every attention key/value comes from the computation",
        "  not inspected: data/sample_inputs/model.pt (pickled)",
    ]
    assert captured.err == ""


@pytest.mark.parametrize("which, reason", [
    ("missing", "no such file"),
    ("garbage", "not a ZIP archive (File is not a zip file)"),
])
def test_unreadable_file_exits_2_with_one_line(programs, capsys, which, reason):
    assert main(["check", programs[which]]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == f"kvpass check: error: cannot read {programs[which]!r}: {reason}\n"


def test_several_files_exit_with_the_worst_status(programs, capsys):
    assert main(["check", programs["clean"], programs["dirty"]]) == 1
    assert main(["check", programs["dirty"], programs["missing"], programs["clean"]]) == 2
    out = capsys.readouterr().out
    assert out.count("clean: every attention") == 2 and out.count("2 finding(s)") == 2


def test_console_script_exit_code_and_one_line_stderr(programs):
    """The real process: exit status, and no torch traceback (torch.export.load logs one) on stderr."""
    bad = subprocess.run([sys.executable, "-m", "kvpass.cli", "check", programs["garbage"]],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2
    assert bad.stderr.splitlines() == [
        f"kvpass check: error: cannot read {programs['garbage']!r}: not a ZIP archive (File is not a zip file)"
    ]
    trusted = subprocess.run([sys.executable, "-m", "kvpass.cli", "check", "--trusted", programs["garbage"]],
                             capture_output=True, text=True, timeout=300)
    assert trusted.returncode == 2
    assert trusted.stderr.splitlines() == [
        f"kvpass check: error: cannot read {programs['garbage']!r}: torch.export.load failed: RuntimeError: "
        "PytorchStreamReader failed reading zip archive: failed finding central directory."
    ]


def test_check_is_listed_in_help(capsys):
    with pytest.raises(SystemExit) as info:
        main(["check", "--help"])
    assert info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "Exit status: 0 clean, 1 findings, 2 a file is missing or unreadable" in text
    assert "--trusted" in text and "RUNS CODE FROM THE FILE" in text and "--limit NAME=N" in text


def test_program_without_attention_says_so(tmp_path, capsys):
    """No attention is not 'clean': the check says there was nothing to check (and exits 0)."""
    path = tmp_path / "mlp.pt2"
    torch.export.save(torch.export.export(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), (torch.randn(2, 4),)), path)
    assert main(["check", str(path)]) == 0
    assert capsys.readouterr().out.splitlines()[0] == f"{path}: no attention found in this program: nothing to check"


def test_limit_flag_overrides_and_rejects_unknown_names(programs, capsys):
    assert main(["check", "--limit", "max_json_depth=3", programs["clean"]]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nests JSON deeper than 3 (max_json_depth)" in err
    assert main(["check", "--limit", "max_json_depth=100000", programs["clean"]]) == 0
    assert main(["check", "--limit", "nonsense=3", programs["clean"]]) == 2
    assert "unknown limit 'nonsense'; expected NAME=INTEGER" in capsys.readouterr().err
    assert main(["check", "--limit", "max_nodes=-1", programs["clean"]]) == 2
    assert "'max_nodes=-1': a negative value; a limit is an integer >= 0" in capsys.readouterr().err
    assert main(["check", "--limit", "max_nodes=lots", programs["clean"]]) == 2
    assert "'lots' is not an integer" in capsys.readouterr().err
