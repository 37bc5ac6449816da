"""The demo computes its claims: a model without round trips gives another report than the bundled one."""

import pytest

from kvpass.demo import format_demo, run_demo
from kvpass.examples.shared_kv_model import reference_model


@pytest.mark.slow
def test_demo_follows_the_model(capsys, monkeypatch):
    """One run of ``kvpass demo --json`` on the bundled model (its JSON, and its text form: what ``kvpass demo``
    prints for the same result), and the functional twin through ``run_demo``."""
    import json

    import kvpass.demo
    from kvpass.cli import main

    assert main(["demo", "--steps", "2", "--no-timing", "--json"]) == 0
    host = json.loads(capsys.readouterr().out)
    assert host["kvpass"]["export_findings"] == 0
    monkeypatch.setattr(kvpass.demo, "run_demo", lambda **kw: dict(host))  # the text of the same result
    assert main(["demo", "--steps", "2", "--no-timing"]) == 0
    out = capsys.readouterr().out
    assert "readonly follower of layer 1" in out
    assert "kvpass.compile: 2 graphs (0 graph breaks), 0 host ops left" in out
    assert "kvpass.check finds 0 problem(s)" in out
    assert "what it means: " in out  # each example finding is explained in words
    # the last line is the takeaway, from the run's own figures
    assert out.rstrip().splitlines()[-1] == (
        f"In short: stock torch.compile {host['stock']['graphs']} graphs, {host['stock']['host_ops_in_graphs']} host "
        "round-trip ops -> kvpass.compile 2 graphs, 0 host ops; outputs identical to eager; speed: kvpass demo "
        "--timing (Inductor compiles: minutes on a cold cache).")
    monkeypatch.undo()
    twin = run_demo(steps=2, timing=False, quiet=True, model_factory=lambda s: reference_model(functional=True, seed=s))
    # the bundled model: stock captures bake K/V, kvpass rewrites the round trips away
    assert host["stock"]["make_fx_findings"] > 0 and host["stock"]["host_ops_in_graphs"] > 0
    assert host["kvpass"]["report_counts"] == {"scatter_slice": 16, "pad_slice": 2}
    # its functional twin (device tensors and torch.cat): nothing baked, nothing to rewrite
    assert twin["stock"]["make_fx_findings"] == 0 and twin["stock"]["host_ops_in_graphs"] == 0
    assert twin["kvpass"]["report_counts"] == {} and twin["kvpass"]["report"] == []
    for r in (host, twin):
        assert r["kvpass"]["max_abs_err_vs_eager"] < 1e-5
    assert "Decode step" not in format_demo(host)


@pytest.mark.slow
def test_demo_on_hf_gemma4_finds_nothing(capsys):
    import json

    from kvpass.cli import main

    assert main(["demo", "--model", "hf-gemma4", "--steps", "4", "--no-timing", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["stock"]["export_findings"] == 0
    assert r["kvpass"]["rewrites"] == 0 and r["kvpass"]["tokens_identical"]
    assert r["kvpass"]["graphs"] <= r["stock"]["graphs"]


def test_demo_rejects_unknown_model(capsys):
    from kvpass.cli import main

    assert main(["demo", "--model", "llama"]) == 2
    assert "choose 'reference' or 'hf-gemma4'" in capsys.readouterr().err


def _timed(vs_eager, conclusive):
    ratio = dict(zip(("median", "min", "max"), vs_eager))
    return {"stock": {"graphs": 22, "host_ops_in_graphs": 60},
            "kvpass": {"graphs": 2, "host_ops_in_graphs": 0, "max_abs_err_vs_eager": 0.0},
            "timing": {"method": {"rounds": 5},
                       "runners": {"kvpass.compile": {"vs_eager": ratio, "conclusive": conclusive}}}}


def test_takeaway_says_only_what_the_figures_support():
    """The demo's last line: the speed-up where every round agrees, "undecided" where the ratio spans 1x."""
    from kvpass.demo import takeaway

    head = "In short: stock torch.compile 22 graphs, 60 host round-trip ops -> kvpass.compile 2 graphs, 0 host ops; "
    assert takeaway(_timed((4.73, 2.88, 9.84), True)) == (
        head + "outputs identical to eager; decode step 4.7x faster than eager (2.9x-9.8x over 5 rounds).")
    assert "speed vs eager undecided on this machine (0.64x-3.10x per round" in takeaway(_timed((1.2, 0.64, 3.1), False))
    assert "decode step 2.0x SLOWER than eager" in takeaway(_timed((0.5, 0.4, 0.6), True))
    r = _timed((1, 1, 1), True)
    r["kvpass"]["max_abs_err_vs_eager"] = 3e-7
    assert "outputs within 3.0e-07 of eager" in takeaway(r)
