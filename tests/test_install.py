"""Reproducible installs: tools/constraints.txt pins every dependency, and tools/setup.sh installs exactly those."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

import version_drift  # noqa: E402


def _requirement_names(requirements: list[str]) -> set[str]:
    return {version_drift.canonical(re.match(r"[A-Za-z0-9._-]+", r).group(0)) for r in requirements}


def test_every_dependency_of_the_project_and_its_test_extra_is_pinned():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = _requirement_names(project["dependencies"] + project["optional-dependencies"]["test"]) - {"torch"}
    pins = version_drift.read_pins()
    assert not wanted - set(pins), f"not pinned in tools/constraints.txt: {sorted(wanted - set(pins))}"
    # torch stays out: setup.sh installs the CPU wheel, and a GPU machine keeps its CUDA build.
    assert "torch" not in pins and not any(name.startswith("nvidia-") for name in pins)


def test_this_environment_has_the_pinned_versions():
    """What tools/setup.sh installed is what the constraints say (CI installs through it from a clean venv)."""
    changed = version_drift.drift(version_drift.read_pins())
    assert not changed, "installed versions differ from tools/constraints.txt (run bash tools/setup.sh): " + ", ".join(
        f"{d.package} {d.installed} (pinned {d.pinned})" for d in changed)


def test_setuptools_vendored_copies_are_not_taken_for_installed_packages(monkeypatch, tmp_path):
    """setuptools puts setuptools/_vendor on sys.path (older packaging, platformdirs ... with their dist-info) once
    pkg_resources is imported by some test; the full suite once reported those as drift. A vendored copy of numpy
    at another version, after site-packages as setuptools puts it, must not count."""
    vendor = tmp_path / "setuptools" / "_vendor"
    info = vendor / "numpy-0.0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: numpy\nVersion: 0.0.1\n")
    monkeypatch.setattr(sys, "path", [*sys.path, str(vendor)])
    assert any(d.version == "0.0.1" for d in version_drift.metadata.distributions(name="numpy"))  # it is visible
    assert not version_drift.drift(version_drift.read_pins())


def test_a_malformed_constraints_line_is_a_one_line_error(tmp_path):
    bad = tmp_path / "constraints.txt"
    bad.write_text("# header\nnumpy==2.0.0\nscipy>=1.0\n")
    result = subprocess.run([sys.executable, str(REPO / "tools" / "version_drift.py"), "--constraints", str(bad)],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == f"error: {bad}: line 3: expected 'name==version', got 'scipy>=1.0'"


def test_drift_reports_packages_at_other_versions(tmp_path):
    pins = tmp_path / "constraints.txt"
    installed = version_drift.read_pins()["numpy"]
    pins.write_text(f"numpy=={installed}\npytest==0.0.1\nno-such-package-dnascale==1.0\n")
    changed = {d.package: d for d in version_drift.drift(version_drift.read_pins(pins))}
    assert set(changed) == {"pytest", "no-such-package-dnascale"}
    assert changed["no-such-package-dnascale"].installed is None and changed["pytest"].pinned == "0.0.1"
    result = subprocess.run([sys.executable, str(REPO / "tools" / "version_drift.py"), "--constraints", str(pins),
                             "--check"], capture_output=True, text=True)
    assert result.returncode == 1 and "2 packages differ" in result.stdout


@pytest.mark.parametrize("flag", ["--lastest", "latest"])
def test_setup_refuses_an_unknown_option_before_installing_anything(flag):
    result = subprocess.run(["bash", str(REPO / "tools" / "setup.sh"), flag], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip() == (f"error: tools/setup.sh: unknown option '{flag}'; "
                                     "expected --gpu, --latest or --freeze")
