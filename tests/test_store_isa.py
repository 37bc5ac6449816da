"""The compiled paged store under every vector ISA this CPU offers (issue 13, section 1).

Inductor's C++ backend picks its vector ISA from ``ATEN_CPU_CAPABILITY`` (``default``: no vectorization,
``avx2``, ``avx512``), so the same lowering can be right on one machine and wrong on another: kvpass's old
free-slot search used Inductor's vectorized int8 ``argmin``, which is right on AVX2 by luck and wrong on AVX-512
(see "Why not argmin" in ``kvpass/ops/_store.py``). Each ISA the CPU supports (the one
``torch.backends.cpu.get_cpu_capability()`` reports and every lower one) runs ``tests/store_isa_child.py`` in a
process of its own with a fresh Inductor cache: the compiled-vs-reference cases of ``test_store_compile.py``, the
fused RMSNorm + RoPE + store (one scatter kernel, values equal to eager), random batches of every
``store_random`` bucket (padding rows, skipped tokens, shared blocks, chunks, a cache smaller than the batch),
and a structural guard (no ``argmin``/``argmax`` in the generated code). ISAs the CPU lacks are skipped.

The Inductor bug itself is kept as a standalone reproduction (``test_inductor_int8_reductions``): strict xfail
where Inductor vectorizes (AVX2, AVX-512), a pass without vectorization.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile

import pytest
import torch

ISAS = ["default", "avx2", "avx512"]
HERE = os.path.dirname(os.path.abspath(__file__))


def supported_isas() -> list[str]:
    """The capabilities ATen and Inductor can use here: the CPU's own and every lower one (x86 only)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return ["default"]
    native = torch.backends.cpu.get_cpu_capability().lower()  # "AVX2", "AVX512", "DEFAULT"
    native = "avx512" if native.startswith("avx512") else native
    return ISAS[: ISAS.index(native) + 1] if native in ISAS else ["default"]


_REPORTS: dict = {}


def report(isa: str, repro_only: bool = False) -> dict:
    """The child's report under ``isa`` (one child per ISA and session: a full report serves both tests)."""
    if isa not in _REPORTS or (not repro_only and _REPORTS[isa][1]):
        _REPORTS[isa] = (run_child(isa, repro_only), repro_only)
    return _REPORTS[isa][0]


def run_child(isa: str, repro_only: bool = False) -> dict:
    """Run the child under ``ATEN_CPU_CAPABILITY=isa`` with an empty Inductor cache; its JSON report."""
    with tempfile.TemporaryDirectory(prefix=f"kvpass-isa-{isa}-") as cache:
        env = dict(os.environ, ATEN_CPU_CAPABILITY=isa, TORCHINDUCTOR_CACHE_DIR=cache,
                   TORCHINDUCTOR_FX_GRAPH_CACHE="0")
        cmd = [sys.executable, os.path.join(HERE, "store_isa_child.py")] + (["--repro-only"] if repro_only else [])
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200, cwd=HERE)
    assert proc.returncode == 0, f"child under {isa} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    # Inductor names the ISA with its extensions ("avx512 avx512_vnni" on a VNNI CPU)
    assert report["isa"].split()[0] == isa, f"asked Inductor for {isa}, it picked {report['isa']}"
    return report


def _isa_params():
    have = supported_isas()
    return [pytest.param(i, marks=() if i in have else pytest.mark.skip(reason=f"this CPU has no {i}"))
            for i in ISAS]


@pytest.mark.slow
@pytest.mark.parametrize("isa", _isa_params())
def test_compiled_store_is_exact_under_isa(isa):
    results = report(isa)["results"]
    kvpass_results = {k: v for k, v in results.items() if not k.startswith("inductor-")}
    assert len(kvpass_results) == 14, sorted(results)  # 5 cases, fused, no-argmin, 7 buckets
    failures = {k: v for k, v in kvpass_results.items() if v}
    assert not failures, f"under ATEN_CPU_CAPABILITY={isa}:\n" + "\n".join(f"{k}: {v}" for k, v in failures.items())




def _repro_params():
    out = []
    for p in _isa_params():
        isa = p.values[0]
        marks = list(p.marks)
        if isa != "default":
            marks.append(pytest.mark.xfail(strict=True, reason="Inductor's vectorized int8 amin/argmin reduce "
                                                               "lanes they never loaded (pytorch/pytorch#191499)"))
        out.append(pytest.param(isa, marks=marks))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("isa", _repro_params())
def test_inductor_int8_reductions(isa):
    """Not kvpass code: ``torch.compile(torch.amin / torch.argmin)`` of 100 int8 values (101 down to 2) against
    eager. With vectorization, lanes past Inductor's tiling factor hold what the partial load left there (AVX2:
    1, AVX-512: undefined, in practice 0) and are reduced too, and ``argmin_vec_reduce_all`` reads index lanes
    it never stored. Strict xfail where Inductor vectorizes, so a PyTorch that fixes it shows up here (then drop
    the xfail; kvpass's lowering does not depend on it either way)."""
    results = report(isa, repro_only=True)["results"]
    failures = {k: v for k, v in results.items() if k.startswith("inductor-") and v}
    assert not failures, failures
