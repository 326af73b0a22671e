"""Import mamba-ssm's Triton SSD kernel, also where mamba-ssm was built without its CUDA extension.

mamba-ssm's `__init__` imports `selective_scan_interface`, which imports the compiled `selective_scan_cuda`
unconditionally, so a pure-Python build (MAMBA_SKIP_CUDA_BUILD=TRUE) cannot be imported at all, although its
Triton SSD kernel (`mamba_ssm.ops.triton.ssd_combined.mamba_chunk_scan_combined`) needs only triton and einops.

Two routes, in this order:
1. "package import": the plain `import mamba_ssm.ops.triton.ssd_combined`, as any user would write it;
2. "Triton module without the package __init__", taken only when the package's own `__init__` is what failed:
   a hollow `mamba_ssm` package (its `__path__` is the installed folder, found by `importlib.util.find_spec`,
   which does not run the `__init__`) stands in while `mamba_ssm.ops.triton.ssd_combined` is imported the normal
   way, so its absolute imports of siblings resolve. Then the stand-in leaves `sys.modules` again, so a later
   `import mamba_ssm` runs the real `__init__` and succeeds or fails honestly; the loaded submodules stay.

Only the top-level package is hollow. The subpackages (`mamba_ssm.ops`, `.ops.triton`, `.utils`) load through
their own `__init__.py`, which are empty in mamba-ssm 2.3: running them keeps those modules genuine, and should a
release put CUDA-only imports there, the fallback fails and says so instead of hiding them.

`load_ssd_kernel` is uncached (tests call it directly); `ssm._mamba_ssm_kernel` caches its answer per process.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.machinery
import importlib.util
import sys
import threading
import types
from collections.abc import Callable, Iterator
from typing import Any

PACKAGE = "mamba_ssm"
SSD_MODULE = "mamba_ssm.ops.triton.ssd_combined"
SSD_KERNEL = "mamba_chunk_scan_combined"
ROUTE_PACKAGE = "package import"
ROUTE_WITHOUT_INIT = "Triton module without the package __init__"

_HOLLOW_MARK = "__dnascale_hollow__"
_MESSAGE_CHARS = 300
# Serialises this loader's callers: two concurrent fallbacks would fight over the one stand-in.
_loader_lock = threading.Lock()


class MambaSSMUnavailable(ImportError):
    """mamba-ssm's SSD kernel cannot be imported here; the message is one line saying why."""


class MambaSSMNotInstalled(MambaSSMUnavailable):
    """No mamba_ssm package on the path at all (an optional extra: callers may skip rather than fail)."""


def load_ssd_kernel() -> tuple[Callable[..., Any], str]:
    """(mamba_chunk_scan_combined, route), route being ROUTE_PACKAGE or ROUTE_WITHOUT_INIT.

    Raises MambaSSMUnavailable with a one-line reason (both routes' failures where both were tried), its subclass
    MambaSSMNotInstalled where there is no mamba_ssm package at all.
    """
    with _loader_lock:
        try:
            kernel = _kernel_in(importlib.import_module(SSD_MODULE))
            # Submodules left behind by an earlier failed `import mamba_ssm` let this succeed without the package.
            return kernel, ROUTE_PACKAGE if _real_package_loaded() else ROUTE_WITHOUT_INIT
        except Exception as err:  # ImportError, or whatever a broken CUDA/Triton install raises on import
            package_error = err
        if _real_package_loaded():
            # The package's __init__ ran fine, so the SSD module itself is what fails: no other route helps.
            raise MambaSSMUnavailable(
                f"mamba-ssm imports but its SSD kernel does not ({_one_line(package_error)})") from package_error
        spec = _installed_spec()
        if spec is None:
            raise MambaSSMNotInstalled("mamba-ssm is not installed")
        try:
            return _kernel_in(_import_without_package_init(spec)), ROUTE_WITHOUT_INIT
        except Exception as err:
            raise MambaSSMUnavailable(
                f"mamba-ssm is installed but its SSD kernel is unusable: package import failed "
                f"({_one_line(package_error)}); without the package __init__ too ({_one_line(err)})") from err


def _kernel_in(module: types.ModuleType) -> Callable[..., Any]:
    kernel = getattr(module, SSD_KERNEL, None)
    if not callable(kernel):
        raise ImportError(f"{module.__name__} has no {SSD_KERNEL}")
    return kernel


def _real_package_loaded() -> bool:
    # A failed package __init__ is taken out of sys.modules by the import system, so presence means it ran.
    module = sys.modules.get(PACKAGE)
    return module is not None and not getattr(module, _HOLLOW_MARK, False)


def _installed_spec() -> importlib.machinery.ModuleSpec | None:
    try:
        return importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):  # a broken finder or a half-registered module: same as not there
        return None


def _import_without_package_init(spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
    before = set(_package_entries())
    hollow = _hollow_package(spec)
    with _import_system_lock(PACKAGE):
        sys.modules[PACKAGE] = hollow
        imported = False
        try:
            module = importlib.import_module(SSD_MODULE)
            imported = True
            return module
        finally:
            if sys.modules.get(PACKAGE) is hollow:
                del sys.modules[PACKAGE]
            if not imported:  # leave sys.modules as the fallback found it
                for name in set(_package_entries()) - before:
                    del sys.modules[name]
            hollow.__spec__._initializing = False


def _hollow_package(spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
    if not spec.submodule_search_locations:
        raise ImportError(f"{PACKAGE} at {spec.origin} is a module, not a package")
    hollow_spec = importlib.machinery.ModuleSpec(PACKAGE, None, origin=spec.origin, is_package=True)
    hollow_spec.submodule_search_locations = list(spec.submodule_search_locations)
    module = importlib.util.module_from_spec(hollow_spec)
    setattr(module, _HOLLOW_MARK, True)
    # As for a module mid-import: importlib callers in other threads then wait on the module lock held below
    # and afterwards import the real package; a bare `import mamba_ssm` statement racing it still waits, but
    # gets the stand-in, whose missing attributes fail loudly rather than quietly.
    hollow_spec._initializing = True
    return module


@contextlib.contextmanager
def _import_system_lock(name: str) -> Iterator[None]:
    # The import system's own per-module lock (reentrant, with deadlock detection), not the global import lock,
    # which blocks every other thread's imports and can deadlock against a module lock they hold.
    manager = getattr(importlib._bootstrap, "_ModuleLockManager", None)  # private; in CPython since 3.3
    with manager(name) if manager is not None else contextlib.nullcontext():
        yield


def _package_entries() -> list[str]:
    return [name for name in list(sys.modules) if name == PACKAGE or name.startswith(PACKAGE + ".")]


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or "no message"
    if len(text) > _MESSAGE_CHARS:
        text = text[:_MESSAGE_CHARS] + "..."
    return f"{type(err).__name__}: {text}"
