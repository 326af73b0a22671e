"""Mamba-1 selective scan (S6): chunked parallel scan in pure torch, and the sequential oracle.

Per channel d and state n (the interface and layout of mamba-ssm's `selective_scan_fn`):

    delta = softplus(delta + delta_bias) if delta_softplus else delta + delta_bias
    h_t[d, n] = exp(delta_t[d] A[d, n]) h_{t-1}[d, n] + delta_t[d] B_t[n] u_t[d]
    y_t[d] = sum_n C_t[n] h_t[d, n] + D[d] u_t[d];   y *= silu(z) when z is given

Inputs: u, delta [b, d, l]; A [d, n] (< 0); B, C [b, n, l] (one group) or [b, g, n, l] (d divisible by g);
D [d] or None; z [b, d, l] or None; delta_bias [d] or None. Returns y [b, d, l] in u's dtype (computed in float32
at least).

Unlike Mamba-2's scalar decay per head, the decay here differs per (channel, state), so there is no small
matmul form; `selective_scan_chunked` materialises exp(delta A) and delta B u as [b, l, d, n] and runs the
two-level parallel scan of `scan.linear_scan` over time: no Python loop over time steps. Memory is O(b l d n):
right for CPU-sized models; mamba-ssm's CUDA kernel (when its extension is built) keeps the state in SRAM.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dnascale.models.dnachunker.scan import DEFAULT_CHUNK, linear_scan, linear_scan_sequential


def _prepare(u, delta, A, B, C, delta_bias, delta_softplus):
    compute = torch.promote_types(u.dtype, torch.float32)
    u, delta, A, B, C = (t.to(compute) for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.to(compute)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    channels = u.shape[1]
    if B.dim() == 4:  # [b, g, n, l] -> per channel [b, l, d, n]
        B = B.repeat_interleave(channels // B.shape[1], dim=1).permute(0, 3, 1, 2)
        C = C.repeat_interleave(channels // C.shape[1], dim=1).permute(0, 3, 1, 2)
    else:  # [b, n, l] shared by all channels -> [b, l, 1, n]
        B, C = B.permute(0, 2, 1)[:, :, None], C.permute(0, 2, 1)[:, :, None]
    # Time second, as linear_scan wants, and contiguous in that layout: [b, l, d, n].
    delta_t = delta.transpose(1, 2).contiguous()  # [b, l, d]
    decay = torch.exp(delta_t[..., None] * A)
    drive = (delta_t * u.transpose(1, 2))[..., None] * B
    return u, decay, drive, C


def _finish(h, C, u, D, z, out_dtype):
    y = (h * C).sum(dim=-1).transpose(1, 2)  # [b, d, l]
    if D is not None:
        y = y + u * D.to(y.dtype)[:, None]
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y.to(out_dtype)


def selective_scan_chunked(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                           chunk_size: int = DEFAULT_CHUNK):
    out_dtype = u.dtype
    u, decay, drive, C = _prepare(u, delta, A, B, C, delta_bias, delta_softplus)
    h = linear_scan(decay, drive, chunk_size=chunk_size)
    return _finish(h, C, u, D, z, out_dtype)


def selective_scan_sequential(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """The oracle: the same recurrence, one time step at a time."""
    out_dtype = u.dtype
    u, decay, drive, C = _prepare(u, delta, A, B, C, delta_bias, delta_softplus)
    h = linear_scan_sequential(decay, drive)
    return _finish(h, C, u, D, z, out_dtype)
