"""First-order linear recurrences h_t = a_t * h_{t-1} + b_t along dim 1, in parallel form, plus the sequential oracle.

Used by the Mamba-1 selective scan (a = exp(delta * A), b = delta * B * x, per channel and state) and by the
dechunk layer's gated smoothing (a = 1 - P, b = P * z, both directions).

`linear_scan` is a two-level ("chunked") parallel scan, with no Python loop over time:
1. cut the sequence into chunks of `chunk_size` steps and run a Hillis-Steele inclusive scan inside every chunk at
   once (log2(chunk_size) elementwise steps), giving each step's state from a zero state at the chunk start and
   the cumulative decay since that start;
2. run the same scan over the chunks' summaries (their end states and total decays) to get every chunk's
   incoming state;
3. add each incoming state, times the cumulative decay, to its chunk.
Work is O(L log chunk_size) elementwise ops, done in place on working copies. Its backward pass is the adjoint
recurrence, itself one reverse scan (`_LinearScan`), so only a and h are kept for it. Decays are multiplied,
never divided or taken in log space, so a_t = 0 (a hard reset) is fine.

`linear_scan_sequential` is the same recurrence one step at a time: the oracle the tests compare against.
Shapes: a and b are [B, L, ...] and broadcast against each other (e.g. a [B, L, 1] with b [B, L, D]).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DEFAULT_CHUNK = 64


def _pad_time(x: torch.Tensor, amount: int, value: float) -> torch.Tensor:
    if amount == 0:
        return x
    pad = [0, 0] * (x.dim() - 2) + [0, amount]
    return F.pad(x, pad, value=value)


def _shift(x: torch.Tensor, offset: int, dim: int, fill: float) -> torch.Tensor:
    """x moved `offset` steps later along `dim`; the first `offset` entries are `fill`."""
    kept = x.narrow(dim, 0, x.shape[dim] - offset)
    shape = list(x.shape)
    shape[dim] = offset
    return torch.cat([x.new_full(shape, fill), kept], dim=dim)


def _hillis_steele_(a: torch.Tensor, b: torch.Tensor, dim: int) -> None:
    """In place: inclusive scan of the affine maps h -> a h + b along `dim`. Afterwards a holds the cumulative
    decays and b the states reached from a zero start. (No autograd: working copies only.)"""
    length = a.shape[dim]
    offset = 1
    while offset < length:
        # Compose each element with the one `offset` earlier: (a1, b1) then (a2, b2) = (a1 a2, a2 b1 + b2).
        # Each right-hand side is a fresh tensor computed before the in-place write, so overlaps are safe.
        late_a, late_b = a.narrow(dim, offset, length - offset), b.narrow(dim, offset, length - offset)
        early_a, early_b = a.narrow(dim, 0, length - offset), b.narrow(dim, 0, length - offset)
        late_b.add_(late_a * early_b)
        late_a.copy_(late_a * early_a)
        offset *= 2


def _scan_(a: torch.Tensor, b: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """h_t = a_t h_{t-1} + b_t along dim 1 from h_{-1} = 0, two-level; a and b are contiguous working copies of
    the same shape, overwritten. Returns h."""
    batch, length, *rest = b.shape
    chunk = max(1, min(chunk_size, length))
    padded = -(-length // chunk) * chunk
    if padded != length:
        a = _pad_time(a, padded - length, 1.0)
        b = _pad_time(b, padded - length, 0.0)
    num_chunks = padded // chunk
    a = a.view(batch, num_chunks, chunk, *rest)
    b = b.view(batch, num_chunks, chunk, *rest)
    _hillis_steele_(a, b, dim=2)  # within each chunk, from a zero state at its start
    if num_chunks > 1:
        # Incoming state of chunk c = state at the end of chunk c - 1 (a scan over the chunk summaries).
        ends_a, ends_b = a[:, :, -1].clone(), b[:, :, -1].clone()
        _hillis_steele_(ends_a, ends_b, dim=1)
        incoming = _shift(ends_b, 1, dim=1, fill=0.0)
        b.add_(a * incoming.unsqueeze(2))
    return b.view(batch, padded, *rest)[:, :length]


def _working_copy(x: torch.Tensor, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device=x.device).copy_(x.expand(shape))


class _LinearScan(torch.autograd.Function):
    """Forward: the in-place two-level scan on working copies. Backward: the adjoint recurrence, itself a scan
    run backwards in time,  g_t = dh_t + a_{t+1} g_{t+1};  then db_t = g_t and da_t = g_t h_{t-1}.
    Saves a and h only (autograd through the forward would keep every step's temporaries)."""

    @staticmethod
    def forward(ctx, a, b, chunk_size):
        shape = torch.broadcast_shapes(a.shape, b.shape)
        dtype = torch.promote_types(a.dtype, b.dtype)
        h = _scan_(_working_copy(a, shape, dtype), _working_copy(b, shape, dtype), chunk_size)
        ctx.save_for_backward(a, h)
        ctx.chunk_size = chunk_size
        ctx.b_shape, ctx.b_dtype = b.shape, b.dtype
        return h

    @staticmethod
    def backward(ctx, grad_h):
        a, h = ctx.saved_tensors
        shape = h.shape
        a_next = _working_copy(a, shape, h.dtype).roll(-1, dims=1)  # a_{t+1}; the wrapped-around last entry:
        a_next[:, -1] = 0.0  # nothing comes after the end
        g = _scan_(a_next.flip(1), _working_copy(grad_h, shape, h.dtype).flip(1), ctx.chunk_size).flip(1)
        grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            h_prev = _shift(h, 1, dim=1, fill=0.0)
            grad_a = (g * h_prev).sum_to_size(a.shape).to(a.dtype)
        if ctx.needs_input_grad[1]:
            grad_b = g.sum_to_size(ctx.b_shape).to(ctx.b_dtype)
        return grad_a, grad_b, None


def linear_scan(
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    reverse: bool = False,
    initial: torch.Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK,
) -> torch.Tensor:
    """h_t = a_t h_{t-1} + b_t along dim 1 with h_{-1} = `initial` (default 0); `reverse` runs from the end
    (h_t = a_t h_{t+1} + b_t). Returns h with the broadcast shape of a and b (and their promoted dtype)."""
    if reverse:
        return linear_scan(a.flip(1), b.flip(1), initial=initial, chunk_size=chunk_size).flip(1)
    if initial is not None:
        # Fold the initial state into the first step: h_0 = a_0 h_{-1} + b_0.
        shape = torch.broadcast_shapes(a.shape, b.shape)
        b = b.expand(shape)
        first = b[:, :1] + a[:, :1] * initial.unsqueeze(1)
        b = torch.cat([first, b[:, 1:]], dim=1)
    return _LinearScan.apply(a, b, chunk_size)


def linear_scan_sequential(
    a: torch.Tensor, b: torch.Tensor, *, reverse: bool = False, initial: torch.Tensor | None = None
) -> torch.Tensor:
    """The oracle: the same recurrence, one time step at a time."""
    shape = torch.broadcast_shapes(a.shape, b.shape)
    a, b = a.expand(shape), b.expand(shape)
    steps = range(shape[1] - 1, -1, -1) if reverse else range(shape[1])
    state = torch.zeros_like(b[:, 0]) if initial is None else initial.expand_as(b[:, 0])
    out = [None] * shape[1]
    for t in steps:
        state = a[:, t] * state + b[:, t]
        out[t] = state
    return torch.stack(out, dim=1)
