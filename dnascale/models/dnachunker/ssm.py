"""The one place where a state-space scan's backend is chosen, and the two scans' public faces.

Scans (same math on every backend; see each module's docstring):
- `ssd_scan`: Mamba-2 SSD (dnascale.models.dnachunker.ssd), the default mixer's scan;
- `selective_scan`: Mamba-1 S6 (dnascale.models.dnachunker.selective_scan), the Caduceus-style option.

Backends:
- "torch": chunked pure-torch scans (matmul form for SSD, two-level parallel scan for S6); any device;
- "sequential": the step-by-step recurrences, the oracles (slow; for tests and debugging);
- "mamba_ssm": mamba-ssm's kernels on CUDA tensors: the Triton SSD kernel (`mamba_chunk_scan_combined`, no CUDA
  build needed; `mamba_ssm_loader` reaches it even where `import mamba_ssm` fails for want of the compiled
  extension) and, for S6, `selective_scan_fn` (needs mamba-ssm's compiled `selective_scan_cuda`).
"auto" takes "mamba_ssm" for CUDA tensors when the kernel imports, else "torch". A backend named explicitly is
used or refused with a ConfigError that says why, never silently replaced.
"""

from __future__ import annotations

import functools

from dnascale.errors import ConfigError
from dnascale.models.dnachunker import selective_scan as s6
from dnascale.models.dnachunker import ssd
from dnascale.models.dnachunker.mamba_ssm_loader import MambaSSMUnavailable, load_ssd_kernel

SCAN_KINDS: tuple[str, ...] = ("ssd", "selective")
SCAN_BACKENDS: tuple[str, ...] = ("torch", "sequential", "mamba_ssm")
SCAN_BACKEND_CHOICES: tuple[str, ...] = ("auto", *SCAN_BACKENDS)


@functools.lru_cache(maxsize=None)
def _mamba_ssm_kernel(kind: str):
    """(kernel, None) if mamba-ssm provides it here, else (None, reason)."""
    if kind == "ssd":
        try:
            return load_ssd_kernel()[0], None
        except MambaSSMUnavailable as err:
            return None, f"mamba-ssm {kind} kernel not importable ({err})"
    try:
        import selective_scan_cuda  # noqa: F401  (mamba-ssm's compiled extension; imported lazily by it)
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as kernel
    except Exception as err:  # ImportError, or a broken CUDA install
        return None, f"mamba-ssm {kind} kernel not importable ({type(err).__name__}: {err})"
    return kernel, None


def mamba_ssm_unavailable(kind: str, device_type: str) -> str | None:
    """Why the mamba-ssm kernel for `kind` cannot serve tensors on `device_type` (None: it can)."""
    if device_type != "cuda":
        return f"mamba-ssm kernels run on CUDA tensors only (got {device_type})"
    return _mamba_ssm_kernel(kind)[1]


def resolve_scan_backend(kind: str, requested: str, device_type: str) -> str:
    if kind not in SCAN_KINDS:
        raise ValueError(f"unknown scan kind {kind!r}; choose one of {list(SCAN_KINDS)}")
    if requested not in SCAN_BACKEND_CHOICES:
        raise ConfigError(f"scan_backend={requested!r}: choose one of {list(SCAN_BACKEND_CHOICES)}")
    if requested == "auto":
        return "mamba_ssm" if mamba_ssm_unavailable(kind, device_type) is None else "torch"
    if requested == "mamba_ssm":
        reason = mamba_ssm_unavailable(kind, device_type)
        if reason is not None:
            raise ConfigError(f"scan_backend='mamba_ssm' cannot run the {kind} scan: {reason}")
    return requested


def ssd_scan(x, dt, A, B, C, *, D=None, chunk_size: int = ssd.DEFAULT_CHUNK, backend: str = "auto"):
    """Mamba-2 SSD: x [b, l, h, p], dt [b, l, h] (final, >= 0), A [h], B/C [b, l, g, n], D [h] -> y [b, l, h, p]."""
    chosen = resolve_scan_backend("ssd", backend, x.device.type)
    if chosen == "sequential":
        return ssd.ssd_sequential(x, dt, A, B, C, D=D)
    if chosen == "mamba_ssm":
        kernel = _mamba_ssm_kernel("ssd")[0]
        return kernel(x.contiguous(), dt.contiguous(), A.float(), B.contiguous(), C.contiguous(), chunk_size,
                      D=None if D is None else D.float())
    return ssd.ssd_chunked(x, dt, A, B, C, D=D, chunk_size=chunk_size)


def selective_scan(u, delta, A, B, C, *, D=None, z=None, delta_bias=None, delta_softplus: bool = False,
                   chunk_size: int = s6.DEFAULT_CHUNK, backend: str = "auto"):
    """Mamba-1 S6: u/delta [b, d, l], A [d, n], B/C [b, n, l] or [b, g, n, l] -> y [b, d, l]."""
    chosen = resolve_scan_backend("selective", backend, u.device.type)
    if chosen == "sequential":
        return s6.selective_scan_sequential(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    if chosen == "mamba_ssm":
        kernel = _mamba_ssm_kernel("selective")[0]
        return kernel(u.contiguous(), delta.contiguous(), A.float(), B.contiguous(), C.contiguous(),
                      None if D is None else D.float(), z, None if delta_bias is None else delta_bias.float(),
                      delta_softplus)
    return s6.selective_scan_chunked(u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk_size=chunk_size)
