"""Build, load and choose the csrc/ kernels: the one place where an op's backend is decided.

Every csrc op has three backends:
- `reference`: pure torch, in the op's module; the test oracle; runs anywhere;
- `cpu`: the C++ kernel in csrc/<op>/<op>_cpu.cpp, for CPU tensors;
- `cuda`: the CUDA kernel in csrc/<op>/<op>_cuda.cu, for CUDA tensors.

`resolve_backend(op, requested, device_type)` is the dispatch rule. "auto" takes the extension that matches the
tensors' device when it loads, else the reference; `DNASCALE_OPS_BACKEND=reference` makes "auto" always take the
reference (for debugging a kernel, or on a machine whose compiler you do not trust). A backend named explicitly
("cpu", "cuda") is used or refused with a ConfigError, never silently replaced.

Loading an extension, first use per process:
1. a prebuilt library shipped in the package (`dnascale/ops/_<op>_<device>*.so`, built at install time when the
   packaging builds it), if it loads against this torch;
2. otherwise a JIT build with torch.utils.cpp_extension into a cache directory: `$DNASCALE_EXTENSIONS_DIR`, else
   `$TORCH_EXTENSIONS_DIR/dnascale`, else `~/.cache/dnascale/extensions`; one subdirectory per torch version,
   Python version, CUDA version and CPU architecture, so a cache shared over NFS by different nodes or
   environments never hands one of them a foreign build. torch rebuilds when a source or flag changes.
   Concurrent builders (several ranks, test processes) are serialised by an flock on `.build.lock` in that
   directory, which the kernel releases when its holder dies; torch's own lock file ("baton") is not, so a builder
   killed mid-compile used to leave every later one waiting forever. Under our flock a baton can only be such a
   leftover, and is removed.
3. If that fails (no C++ compiler, no ninja, no CUDA toolkit, a compile error), ONE warning is logged per
   (op, device) with the reason and "auto" falls back to the reference; the package imports and works regardless.

The kernels are registered with the torch dispatcher as `torch.ops.dnascale.<name>`; their schemas are defined
here (Python) so that the CPU and CUDA libraries are independent of each other and only register
implementations. The libraries use no pybind11, which keeps a JIT build to ~10 s per op on two cores.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import logging
import os
import pathlib
import platform
import shutil
import sys
import threading

import torch

from dnascale.errors import ConfigError

logger = logging.getLogger("dnascale.ops")

OPS: tuple[str, ...] = ("routing_boundary", "ggram_fusion")
BACKENDS: tuple[str, ...] = ("reference", "cpu", "cuda")
BACKEND_CHOICES: tuple[str, ...] = ("auto", *BACKENDS)
ENV_BACKEND = "DNASCALE_OPS_BACKEND"
ENV_BUILD_DIR = "DNASCALE_EXTENSIONS_DIR"

CSRC = pathlib.Path(__file__).resolve().parents[2] / "csrc"
PREBUILT = pathlib.Path(__file__).resolve().parent  # where setup.py puts dnascale.ops._<op>_<device> libraries

# Operator schemas (torch.ops.dnascale.*). Shapes and semantics are documented next to each op's Python face.
SCHEMAS: dict[str, tuple[str, ...]] = {
    "routing_boundary": (
        "routing_boundary_fwd(Tensor q, Tensor k, Tensor? force, Tensor? padding, float eps)"
        " -> (Tensor, Tensor, Tensor, Tensor)",
        "routing_boundary_bwd(Tensor grad_prob, Tensor q, Tensor k, Tensor? force, Tensor? padding, float eps)"
        " -> (Tensor, Tensor)",
    ),
    "ggram_fusion": (
        "ggram_fusion_fwd(Tensor h, Tensor g, Tensor token_ptr, Tensor token_ggram) -> Tensor",
        "ggram_fusion_grad_g(Tensor grad_out, Tensor ggram_ptr, Tensor ggram_token, int num_ggram_rows) -> Tensor",
        # CUDA only: scatter with float atomics over the per-token CSR (non-deterministic summation order).
        "ggram_fusion_grad_g_atomic(Tensor grad_out, Tensor token_ptr, Tensor token_ggram, int num_ggram_rows)"
        " -> Tensor",
    ),
}

# One translation unit per op and device (compile time on a 2-core CI box matters more than sharing code).
SOURCES: dict[tuple[str, str], str] = {
    (op, device): f"{op}/{op}_{device}.{'cpp' if device == 'cpu' else 'cu'}" for op in OPS for device in ("cpu", "cuda")
}
# at::parallel_for is an inline OpenMP region: without -fopenmp it silently runs on one thread. (On Linux the
# extension then shares torch's own libgomp, which is already loaded under the same soname.)
_OPENMP = ["-fopenmp"] if sys.platform.startswith("linux") and torch.backends.openmp.is_available() else []
CFLAGS = ["-O3", *_OPENMP]
LDFLAGS = [*_OPENMP]
NVCC_FLAGS = ["-O3"]

_lock = threading.Lock()
_status: dict[tuple[str, str], str | None] = {}  # (op, device) -> None when loaded, else why not
_warned: set[str] = set()
_library: torch.library.Library | None = None


def _define_schemas() -> None:
    """Define every dnascale:: op schema once per process (libraries only add implementations)."""
    global _library
    if _library is not None:
        return
    library = torch.library.Library("dnascale", "FRAGMENT")  # noqa: TOR901 (kept alive in a module global)
    for schemas in SCHEMAS.values():
        for schema in schemas:
            library.define(schema)
    _library = library


def build_directory(device: str) -> pathlib.Path:
    """Where JIT builds for `device` go; keyed by everything that makes a build non-portable."""
    root = os.environ.get(ENV_BUILD_DIR)
    if root:
        base = pathlib.Path(root)
    elif os.environ.get("TORCH_EXTENSIONS_DIR"):
        base = pathlib.Path(os.environ["TORCH_EXTENSIONS_DIR"]) / "dnascale"
    else:
        base = pathlib.Path.home() / ".cache" / "dnascale" / "extensions"
    cuda = torch.version.cuda or "cpu"
    tag = f"torch{torch.__version__}-py{sys.version_info.major}{sys.version_info.minor}-cu{cuda}-{platform.machine()}"
    return base / tag.replace("+", "_") / device


def _compiler_missing(device: str) -> str | None:
    from torch.utils import cpp_extension

    cxx = cpp_extension.get_cxx_compiler()
    if shutil.which(cxx) is None:
        return f"no C++ compiler ({cxx!r} not on PATH; set CXX)"
    if shutil.which("ninja") is None:
        try:
            cpp_extension.verify_ninja_availability()
        except RuntimeError:
            return "ninja is not installed (pip install ninja)"
    if device == "cuda":
        if torch.version.cuda is None:
            return "this torch build has no CUDA"
        if cpp_extension.CUDA_HOME is None:
            return "no CUDA toolkit found (set CUDA_HOME)"
    return None


def _load_prebuilt(op: str, device: str) -> bool:
    for path in sorted(glob.glob(str(PREBUILT / f"_{op}_{device}*.so"))):
        try:
            torch.ops.load_library(path)
            return True
        except OSError as err:  # built against another torch: fall through to a JIT build
            logger.info("dnascale: prebuilt %s does not load (%s); building it instead", path, err)
    return False


@contextlib.contextmanager
def _exclusive_build(directory: pathlib.Path):
    """Hold the build directory's flock; drop a baton that a killed builder left behind."""
    with open(directory / ".build.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            stale = directory / "lock"  # torch.utils.file_baton's name
            if stale.exists():
                logger.warning("dnascale: removing %s, left by a build that was killed", stale)
                stale.unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _jit_build(op: str, device: str) -> None:
    from torch.utils import cpp_extension

    source = CSRC / SOURCES[(op, device)]
    if not source.is_file():
        raise FileNotFoundError(f"kernel source {source} is missing (a non-editable install without csrc/?)")
    directory = build_directory(device) / op
    directory.mkdir(parents=True, exist_ok=True)
    logger.info("dnascale: loading the %s %s kernel from %s (compiled there on first use)", op, device, directory)
    with _exclusive_build(directory):
        cpp_extension.load(
            name=f"dnascale_{op}_{device}",
            sources=[str(source)],
            extra_cflags=CFLAGS + os.environ.get("DNASCALE_EXTENSIONS_CFLAGS", "").split(),
            extra_ldflags=LDFLAGS,
            extra_cuda_cflags=NVCC_FLAGS if device == "cuda" else None,
            build_directory=str(directory),
            is_python_module=False,
            verbose=os.environ.get("DNASCALE_EXTENSIONS_VERBOSE") == "1",
        )


def _summarise(err: Exception) -> str:
    """One line for the warning: the first compiler error if there is one, else the exception's last line."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower() and "Error building extension" not in line]
    return f"{type(err).__name__}: {(errors or lines or [''])[0 if errors else -1][:300]}"


def extension_unavailable(op: str, device: str) -> str | None:
    """None when the `device` ("cpu"/"cuda") kernel of `op` is loaded (building it on first use), else why not."""
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; known: {list(OPS)}")
    key = (op, device)
    with _lock:
        if key in _status:
            return _status[key]
        reason: str | None = None
        if device == "cuda" and not torch.cuda.is_available():
            reason = "CUDA is not available"
        else:
            try:
                _define_schemas()
                if not _load_prebuilt(op, device):
                    reason = _compiler_missing(device)
                    if reason is None:
                        _jit_build(op, device)
            except Exception as err:  # noqa: BLE001 (any build failure means: use the reference)
                reason = _summarise(err)
        # One warning per distinct reason (a missing compiler is reported once, not once per op); the absence of
        # a GPU is no news and is not reported at all.
        if reason is not None and reason not in _warned and not (device == "cuda" and not torch.cuda.is_available()):
            _warned.add(reason)
            logger.warning("dnascale: the %s %s kernel is unavailable (%s); falling back to the pure-torch reference",
                           op, device, reason)
        _status[key] = reason
        return reason


def resolve_backend(op: str, requested: str, device_type: str) -> str:
    """The backend ("reference", "cpu" or "cuda") that serves a call of `op` on `device_type` tensors."""
    if requested not in BACKEND_CHOICES:
        raise ConfigError(f"{op}: backend={requested!r} is unknown; choose one of {list(BACKEND_CHOICES)}")
    if requested == "reference":
        return "reference"
    if requested == "auto":
        forced = os.environ.get(ENV_BACKEND, "auto").strip().lower() or "auto"
        if forced not in ("auto", "reference"):
            raise ConfigError(f"{ENV_BACKEND}={forced!r} is not understood; use 'reference' (or unset it)")
        if forced == "reference" or device_type not in ("cpu", "cuda"):
            return "reference"
        return device_type if extension_unavailable(op, device_type) is None else "reference"
    if requested != device_type:
        raise ConfigError(f"{op}: backend={requested!r} cannot run on {device_type} tensors")
    reason = extension_unavailable(op, requested)
    if reason is not None:
        raise ConfigError(f"{op}: backend={requested!r} cannot be used: {reason}")
    return requested


def available_backends(op: str) -> dict[str, str | None]:
    """{backend: None if usable here, else why not}: for logs, benchmarks, `python -m dnascale.ops.extensions`."""
    return {"reference": None, "cpu": extension_unavailable(op, "cpu"), "cuda": extension_unavailable(op, "cuda")}


if __name__ == "__main__":  # build everything this machine can build, and say what is usable
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in OPS:
        print(name, available_backends(name))
