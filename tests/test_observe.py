"""What kvpass shows through PyTorch's channels: ``TORCH_LOGS``, ``tlparse`` artifacts, ``counters["kvpass"]``;
and ``torch.compile`` keywords reaching Inductor through the kvpass backend."""

import pytest
import os
import subprocess
import sys

import numpy as np
import torch

import kvpass

SCRIPT = """
import numpy as np, torch, kvpass
buf = np.random.default_rng(0).standard_normal((2, 8, 4)).astype(np.float32)
def step(buf, k):
    buf[:, 2:5] = k.detach().cpu().numpy()
    return torch.from_numpy(buf[:, :5]) * 2.0
with torch.no_grad():
    kvpass.compile(step, backend=kvpass.backend(inner="eager"))(buf, torch.randn(2, 3, 4))
"""


def run_script(tmp_path, **env):
    script = tmp_path / "host_cache_step.py"
    script.write_text(SCRIPT)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                         env={**os.environ, **env})
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout + out.stderr


@pytest.mark.slow
def test_torch_logs_shows_the_report_and_the_graphs(tmp_path):
    text = run_script(tmp_path, TORCH_LOGS="+kvpass")
    assert "kvpass rewrite:" in text and "scatter_slice" in text
    assert "host_cache_step.py:5 in step: buf[:, 2:5] = k.detach().cpu().numpy()" in text
    assert "kvpass: graph before the rewrite" in text and "kvpass: graph after the rewrite" in text
    quiet = run_script(tmp_path)
    assert "kvpass rewrite:" not in quiet


def test_tlparse_trace_has_the_kvpass_artifacts(tmp_path):
    trace = tmp_path / "trace"
    run_script(tmp_path, TORCH_TRACE=str(trace))
    logs = "".join(p.read_text() for p in trace.iterdir())
    for name in ("kvpass_report", "kvpass_before", "kvpass_after"):
        assert f'"name": "{name}"' in logs, name


def test_counters_count_matches_per_rule():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    buf = np.random.default_rng(1).standard_normal((2, 8, 4)).astype(np.float32)

    def step(buf, k):
        buf[:, 2:5] = k.detach().cpu().numpy()
        return torch.from_numpy(buf[:, :5]) * 2.0

    with torch.no_grad():
        kvpass.compile(step, backend=kvpass.backend(inner="eager"))(buf, torch.randn(2, 3, 4))
    assert counters["kvpass"]["scatter_slice"] == 1


def test_mode_and_options_reach_inductor():
    """``torch.compile`` hands ``mode=``/``options=`` to a custom backend as keywords; they reach Inductor."""
    def f(x):
        return torch.from_numpy(x.detach().cpu().numpy()).sin() * 2

    x = torch.randn(8)
    for kwargs in ({"mode": "reduce-overhead"}, {"options": {"max_autotune": False}}, {"dynamic": True}):
        torch._dynamo.reset()
        torch.testing.assert_close(kvpass.compile(f, **kwargs)(x), f(x))
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(f, backend="kvpass", mode="reduce-overhead")(x), f(x))
