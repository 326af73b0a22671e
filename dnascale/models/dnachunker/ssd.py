"""Mamba-2 state-space duality (SSD) scan: chunked matmul form in pure torch, and the sequential oracle.

Per head h (state S_t of shape [headdim P, d_state N]; B and C are shared by the heads of a group):

    S_t = exp(dt_t A_h) S_{t-1} + dt_t x_t B_t^T          y_t = S_t C_t + D_h x_t

Inputs (dt is taken as given: softplus, bias and padding masks are the mixer's job, so every backend sees the
same numbers): x [b, l, h, p], dt [b, l, h] (>= 0), A [h] (< 0), B and C [b, l, g, n] with h divisible by g,
D [h] or None, initial_state [b, h, p, n] or None. Returns y [b, l, h, p] (and the final state on request).

`ssd_chunked` is the matmul ("dual") form of the Mamba-2 paper's minimal SSD: inside chunks of Q steps, y is a
masked attention-like product C B^T * exp(segment sums of dt A) applied to dt x; the chunks' end states are
carried across chunks by the same construction one level up (a [c+1, c+1] decay matrix). Everything is batched
matmuls and cumsums: no Python loop over time. Padding the length up to a multiple of Q with dt = 0 changes
nothing (decay 1, no input), and the recurrence is causal, so padded steps never reach real outputs.
Computed in float32 at least; returned in x's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DEFAULT_CHUNK = 64


def segsum(x: torch.Tensor) -> torch.Tensor:
    """[..., T] -> [..., T, T] with out[i, j] = x_{j+1} + ... + x_i for j <= i and -inf above the diagonal.

    Built from masked cumsums of x itself (not differences of one long cumsum), so no precision is lost to
    subtracting two large running sums.
    """
    length = x.shape[-1]
    x = x[..., :, None].expand(*x.shape, length)  # [..., i, j] = x_i
    strictly_lower = torch.tril(torch.ones(length, length, dtype=torch.bool, device=x.device), diagonal=-1)
    x = x.masked_fill(~strictly_lower, 0.0)
    sums = torch.cumsum(x, dim=-2)  # [..., i, j] = sum_{j < k <= i} x_k
    lower = torch.tril(torch.ones(length, length, dtype=torch.bool, device=x.device), diagonal=0)
    return sums.masked_fill(~lower, float("-inf"))


def _expand_groups(t: torch.Tensor, heads: int) -> torch.Tensor:
    groups = t.shape[2]
    if heads % groups:
        raise ValueError(f"heads ({heads}) must be divisible by the B/C groups ({groups})")
    return t.repeat_interleave(heads // groups, dim=2) if groups != heads else t


def _promote_inputs(x, dt, A, B, C):
    """(output dtype, compute dtype, inputs in the compute dtype with B/C groups expanded to the heads): at least
    float32, so bf16/fp16 inputs accumulate the recurrence in float32 and return in their own dtype."""
    out_dtype = x.dtype
    compute = torch.promote_types(x.dtype, torch.float32)
    x, dt, A, B, C = (t.to(compute) for t in (x, dt, A, B, C))
    heads = x.shape[2]
    return out_dtype, compute, (x, dt, A, _expand_groups(B, heads), _expand_groups(C, heads))


def ssd_chunked(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    *,
    D: torch.Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK,
    initial_state: torch.Tensor | None = None,
    return_final_state: bool = False,
):
    batch, length, heads, headdim = x.shape
    out_dtype, compute, (x, dt, A, B, C) = _promote_inputs(x, dt, A, B, C)
    state_dim = B.shape[-1]
    chunk = max(1, min(chunk_size, length))
    padded = -(-length // chunk) * chunk
    pad = padded - length
    if pad:
        x_in, dt, B, C = (F.pad(t, [0, 0] * (t.dim() - 2) + [0, pad]) for t in (x, dt, B, C))
    else:
        x_in = x
    nc = padded // chunk
    xdt = (x_in * dt[..., None]).reshape(batch, nc, chunk, heads, headdim)  # discretised input dt x
    Bc = B.reshape(batch, nc, chunk, heads, state_dim)
    Cc = C.reshape(batch, nc, chunk, heads, state_dim)
    a = (dt * A).reshape(batch, nc, chunk, heads).permute(0, 3, 1, 2)  # [b, h, c, l] log-decays (<= 0)
    a_cum = torch.cumsum(a, dim=-1)

    # 1. Within chunks: y_l = sum_{s <= l} (C_l . B_s) exp(a_{s+1} + ... + a_l) dt_s x_s. The exponent is a
    #    difference of chunk-local cumsums (as mamba-ssm's kernels compute it): one subtraction instead of
    #    segsum's masked cumsum over a [l, s] grid, and chunk-local sums stay small.
    lower = torch.tril(torch.ones(chunk, chunk, dtype=torch.bool, device=x.device))
    decay_within = torch.exp((a_cum[..., :, None] - a_cum[..., None, :]).masked_fill(~lower, float("-inf")))
    scores = torch.einsum("bclhn,bcshn->bhcls", Cc, Bc) * decay_within
    y = torch.einsum("bhcls,bcshp->bclhp", scores, xdt)

    # 2. Each chunk's end state from a zero start: sum_s exp(a_{s+1} + ... + a_end) dt_s x_s B_s^T.
    decay_to_end = torch.exp(a_cum[..., -1:] - a_cum)  # [b, h, c, l]
    states = torch.einsum("bclhn,bhcl,bclhp->bchpn", Bc, decay_to_end, xdt)

    # 3. Carry the states across chunks: state entering chunk c = sum_{c' < c} decay(c'..c) end_state(c').
    if initial_state is None:
        initial_state = states.new_zeros(batch, heads, headdim, state_dim)
    states = torch.cat([initial_state.to(compute)[:, None], states], dim=1)  # [b, c+1, h, p, n]
    decay_chunks = torch.exp(segsum(F.pad(a_cum[..., -1], (1, 0))))  # [b, h, c+1, c+1]
    carried = torch.einsum("bhzc,bchpn->bzhpn", decay_chunks, states)
    incoming, final_state = carried[:, :-1], carried[:, -1]

    # 4. The incoming state's contribution inside each chunk: C_l . (exp(a_1 + ... + a_l) S_in).
    y = y + torch.einsum("bclhn,bchpn,bhcl->bclhp", Cc, incoming, torch.exp(a_cum))
    y = y.reshape(batch, padded, heads, headdim)[:, :length]
    if D is not None:
        y = y + x * D.to(compute)[:, None]
    y = y.to(out_dtype)
    return (y, final_state) if return_final_state else y


def ssd_sequential(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    *,
    D: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    return_final_state: bool = False,
):
    """The oracle: the recurrence one time step at a time (same signature as `ssd_chunked`, no chunk size)."""
    batch, length, heads, headdim = x.shape
    out_dtype, compute, (x, dt, A, B, C) = _promote_inputs(x, dt, A, B, C)
    state = (x.new_zeros(batch, heads, headdim, B.shape[-1]) if initial_state is None
             else initial_state.to(compute))
    ys = []
    for t in range(length):
        decay = torch.exp(dt[:, t] * A)  # [b, h]
        state = decay[..., None, None] * state + torch.einsum("bhp,bhn->bhpn", x[:, t] * dt[:, t, :, None], B[:, t])
        ys.append(torch.einsum("bhpn,bhn->bhp", state, C[:, t]))
    y = torch.stack(ys, dim=1)
    if D is not None:
        y = y + x * D.to(compute)[:, None]
    y = y.to(out_dtype)
    return (y, state) if return_final_state else y
