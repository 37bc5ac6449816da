"""Installability: the entry-point backend, the console script, and kvpass.patterns inside a built wheel."""

import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]


def run_python(code: str, cwd, env_extra=None, timeout=300):
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.slow
def test_backend_resolves_without_importing_kvpass(tmp_path):
    out = run_python("""
        import sys, torch
        assert "kvpass" not in sys.modules
        f = lambda x: torch.sin(x) * 2 + 1
        x = torch.randn(5, generator=torch.Generator().manual_seed(1))
        y = torch.compile(f, backend="kvpass")(x)
        torch.testing.assert_close(y, f(x))
        from torch._dynamo.backends.registry import lookup_backend
        import kvpass.registered_backend
        assert lookup_backend("kvpass") is kvpass.registered_backend.kvpass_backend
        print("ok")
    """, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md", "kvpass", "patterns", "examples"):
        p = REPO / name
        if p.is_dir():
            shutil.copytree(p, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pt2"))
        elif p.exists():
            shutil.copy(p, src / name)
    dist = tmp_path_factory.mktemp("dist")
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                          str(dist), str(src)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    (whl,) = dist.glob("kvpass-*.whl")
    return whl


def test_wheel_ships_patterns_inside_kvpass(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert "kvpass/patterns/__init__.py" in names
    assert "kvpass/examples/shared_kv_model.py" in names
    assert "kvpass/ops/__init__.py" in names
    assert "kvpass/fidelity/archive.py" in names  # kvpass.check's package
    assert not [n for n in names if n.startswith(("patterns/", "examples/"))], "no top-level patterns package"
    (ep,) = [n for n in names if n.endswith("entry_points.txt")]
    text = zipfile.ZipFile(wheel).read(ep).decode()
    assert "[torch_dynamo_backends]" in text and "kvpass = kvpass.registered_backend:kvpass_backend" in text
    assert "[console_scripts]" in text and "kvpass = kvpass.cli:main" in text
    (meta,) = [n for n in names if n.endswith("METADATA")]
    metadata = zipfile.ZipFile(wheel).read(meta).decode()
    # the wheel declares pyproject.toml's tested ranges, each as written there
    shipped = {str(r) for r in map(Requirement, _metadata_values(metadata, "Requires-Dist")) if not r.marker}
    assert shipped == {str(Requirement(r)) for r in _pyproject()["dependencies"]}


def _metadata_values(metadata: str, field: str) -> list[str]:
    return [line.split(": ", 1)[1] for line in metadata.splitlines() if line.startswith(field + ": ")]


def test_installed_wheel_imports_patterns(wheel, tmp_path):
    site = tmp_path / "site"
    out = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    out = run_python("""
        import kvpass, kvpass.patterns, kvpass.examples.shared_kv_model as m, kvpass.fidelity.archive as a
        print(kvpass.patterns.__file__); print(m.__file__); print(a.__file__)
    """, cwd=tmp_path, env_extra={"PYTHONPATH": str(site)})
    assert out.returncode == 0, out.stderr[-3000:]
    for line in out.stdout.split():
        assert line.startswith(str(site)), line


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def _declared_requirements():
    project = _pyproject()
    return [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["test"]]


def test_every_dependency_declares_its_tested_range_and_the_installed_version_is_in_it():
    """A fresh install resolves to tested versions: each runtime and test dependency has a lower and an upper
    bound in pyproject.toml, and what this suite runs with lies inside them (so a test run outside the tested
    range says so here first, instead of as a puzzling failure elsewhere)."""
    from importlib.metadata import PackageNotFoundError, version

    from packaging.version import Version

    reqs = _declared_requirements()
    assert {r.name for r in reqs} >= {"torch", "numpy", "transformers", "pytest", "expecttest", "hypothesis"}
    for req in reqs:
        ops = {spec.operator for spec in req.specifier}
        assert ">=" in ops and "<" in ops, f"{req}: declare the tested range as >=LOW,<HIGH"
        try:
            installed = Version(version(req.name))
        except PackageNotFoundError:
            pytest.fail(f"{req.name} is declared but not installed")
        # a local build tag (2.13.0+cpu, +cu128) is the same release
        assert req.specifier.contains(Version(installed.public), prereleases=True), (
            f"{req.name} {installed} is outside the tested range {req.specifier} declared in pyproject.toml")
