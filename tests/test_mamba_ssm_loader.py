"""mamba_ssm_loader reaches mamba-ssm's Triton SSD module when the package's __init__ fails (a build without the
compiled selective_scan_cuda), on CPU, without triton: a synthetic package in tmp_path stands in for mamba-ssm's
layout (top-level __init__ -> selective_scan_interface -> missing selective_scan_cuda; ssd_combined importing a
sibling and mamba_ssm.utils by absolute name).
"""

from __future__ import annotations

import importlib
import sys
import threading
import types
from pathlib import Path

import pytest

from dnascale.errors import ConfigError
from dnascale.models.dnachunker import mamba_ssm_loader as loader
from dnascale.models.dnachunker import ssm

BROKEN_INIT = "from mamba_ssm.ops.selective_scan_interface import selective_scan_fn  # noqa: F401\n"
WORKING_INIT = "__version__ = 'synthetic'\n"
SSD_COMBINED = """\
from mamba_ssm.ops.triton.ssd_bmm import helper
from mamba_ssm.utils.determinism import MODE


def mamba_chunk_scan_combined(*args, **kwargs):
    return ("synthetic ssd", helper(), MODE)
"""
FILES = {
    "ops/__init__.py": "",
    "ops/selective_scan_interface.py": "raise ImportError(\"No module named 'selective_scan_cuda'\")\n",
    "ops/triton/__init__.py": "",
    "ops/triton/ssd_bmm.py": "def helper():\n    return 'sibling'\n",
    "ops/triton/ssd_combined.py": SSD_COMBINED,
    "utils/__init__.py": "",
    "utils/determinism.py": "MODE = 'utils'\n",
}
SYNTHETIC_RESULT = ("synthetic ssd", "sibling", "utils")


def _mamba_entries() -> dict[str, types.ModuleType]:
    return {name: mod for name, mod in sys.modules.items() if name == "mamba_ssm" or name.startswith("mamba_ssm.")}


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """An empty site dir first on sys.path, mamba_ssm modules (a real install's too) out of sys.modules meanwhile."""
    saved = _mamba_entries()
    for name in saved:
        del sys.modules[name]
    ssm._mamba_ssm_kernel.cache_clear()
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in _mamba_entries():
        del sys.modules[name]
    sys.modules.update(saved)
    ssm._mamba_ssm_kernel.cache_clear()


def _install(site: Path, init: str = BROKEN_INIT, *, drop: tuple[str, ...] = (), **overrides: str) -> None:
    files = {"__init__.py": init, **FILES, **{k.replace("__", "/") + ".py": v for k, v in overrides.items()}}
    for rel, text in files.items():
        if rel in drop:
            continue
        path = site / "mamba_ssm" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    importlib.invalidate_caches()


def test_a_failing_package_init_is_bypassed_and_the_stand_in_leaves_sys_modules(site):
    _install(site)
    kernel, route = loader.load_ssd_kernel()
    assert route == loader.ROUTE_WITHOUT_INIT == "Triton module without the package __init__"
    assert kernel() == SYNTHETIC_RESULT  # the sibling and mamba_ssm.utils imports resolved
    assert "mamba_ssm" not in sys.modules
    assert sys.modules["mamba_ssm.ops.triton.ssd_combined"].mamba_chunk_scan_combined is kernel
    # The subpackages ran their own (real) __init__.py; only the top level was hollow.
    assert sys.modules["mamba_ssm.ops.triton"].__file__ == str(site / "mamba_ssm" / "ops" / "triton" / "__init__.py")
    with pytest.raises(ImportError, match="selective_scan_cuda"):  # a later plain import is honest
        importlib.import_module("mamba_ssm")
    assert loader.load_ssd_kernel() == (kernel, loader.ROUTE_WITHOUT_INIT)  # again, from the loaded modules


def test_a_working_package_is_imported_the_normal_way(site):
    _install(site, WORKING_INIT)
    kernel, route = loader.load_ssd_kernel()
    assert route == loader.ROUTE_PACKAGE == "package import"
    assert kernel() == SYNTHETIC_RESULT
    assert sys.modules["mamba_ssm"].__version__ == "synthetic"


def test_a_broken_ssd_module_under_a_working_package_is_not_retried_without_the_init(site):
    _install(site, WORKING_INIT, ops__triton__ssd_combined="import triton_missing_for_this_test\n")
    with pytest.raises(loader.MambaSSMUnavailable) as caught:
        loader.load_ssd_kernel()
    message = str(caught.value)
    assert message.startswith("mamba-ssm imports but its SSD kernel does not")
    assert "triton_missing_for_this_test" in message and "\n" not in message


def test_a_package_without_ssd_combined_names_both_failures_on_one_line(site):
    _install(site, drop=("ops/triton/ssd_combined.py",))
    with pytest.raises(loader.MambaSSMUnavailable) as caught:
        loader.load_ssd_kernel()
    assert not isinstance(caught.value, loader.MambaSSMNotInstalled)
    message = str(caught.value)
    assert "\n" not in message
    assert "package import failed (ImportError: No module named 'selective_scan_cuda')" in message
    assert "without the package __init__ too (ModuleNotFoundError:" in message
    assert "mamba_ssm.ops.triton.ssd_combined" in message
    # Nothing the failed fallback imported stays; mamba_ssm.ops is the failed package import's own leftover.
    assert sorted(_mamba_entries()) == ["mamba_ssm.ops"]


def test_a_multiline_error_is_reported_on_one_line(site):
    _install(site, ops__triton__ssd_combined="raise RuntimeError('triton:\\n  no GPU driver found')\n")
    with pytest.raises(loader.MambaSSMUnavailable, match=r"RuntimeError: triton: no GPU driver found\)$"):
        loader.load_ssd_kernel()


def test_not_installed_says_so(site, monkeypatch):
    monkeypatch.setattr(sys, "path", [str(site)])  # hides a real mamba-ssm install too
    with pytest.raises(loader.MambaSSMNotInstalled, match="^mamba-ssm is not installed$"):
        loader.load_ssd_kernel()


def test_an_importlib_import_racing_the_fallback_waits_and_then_imports_the_real_package(site):
    hook = types.ModuleType("_dnascale_loader_race_hook")
    inside, attempted = threading.Event(), threading.Event()

    def wait_for_racer() -> None:  # runs inside ssd_combined, while the stand-in is registered
        inside.set()
        attempted.wait(5)
        threading.Event().wait(0.3)  # give a racer that is not blocked the time to return the stand-in

    hook.pause = wait_for_racer
    _install(site, ops__triton__ssd_combined="import _dnascale_loader_race_hook\n_dnascale_loader_race_hook.pause()\n"
             + SSD_COMBINED)
    seen: list[object] = []

    def racer() -> None:
        inside.wait(5)
        attempted.set()
        try:
            seen.append(importlib.import_module("mamba_ssm"))
        except ImportError as err:
            seen.append(err)

    sys.modules[hook.__name__] = hook
    try:
        thread = threading.Thread(target=racer)
        thread.start()
        kernel, route = loader.load_ssd_kernel()
        thread.join(10)
    finally:
        del sys.modules[hook.__name__]
    assert route == loader.ROUTE_WITHOUT_INIT and kernel() == SYNTHETIC_RESULT
    assert len(seen) == 1 and isinstance(seen[0], ImportError), f"the racer got {seen!r}, not the honest failure"
    assert "selective_scan_cuda" in str(seen[0])


def test_the_scan_backend_rule_uses_the_loader(site):
    _install(site)
    assert ssm.mamba_ssm_unavailable("ssd", "cuda") is None
    assert ssm.resolve_scan_backend("ssd", "auto", "cuda") == "mamba_ssm"
    assert ssm.resolve_scan_backend("ssd", "auto", "cpu") == "torch"  # the kernel imports, but CPU stays torch
    assert "selective_scan_cuda" in ssm.mamba_ssm_unavailable("selective", "cuda")


def test_an_unusable_kernel_is_refused_with_both_reasons(site):
    _install(site, drop=("ops/triton/ssd_combined.py",))
    assert ssm.resolve_scan_backend("ssd", "auto", "cuda") == "torch"
    with pytest.raises(ConfigError, match=r"cannot run the ssd scan: .*selective_scan_cuda.*without the package"):
        ssm.resolve_scan_backend("ssd", "mamba_ssm", "cuda")
