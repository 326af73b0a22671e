"""Dechunk layer: back from chunks to the finer level with bidirectional gated smoothing and a straight-through gate.

Inputs: compressed states z [B, L', d], and the routing output (b, p, chunk numbering) and padding of the level
being restored (length L). With P_t the smoothing gate below:

1. replicate:   z~_t = z_{c(t)},  c(t) = chunk holding t
2. smooth:      f_t = P_t z~_t + (1 - P_t) f_{t-1}                (forward scan)
                g_t = P_{t+1} z~_t + (1 - P_{t+1}) g_{t+1}        (backward scan; one gate governs both directions)
                z^_t = (f_t + g_t) / 2
3. confidence:  c_t = b_t P_t + (1 - b_t)(1 - P_t);  z^_t <- z^_t * STE(c_t)   (value 1, gradient of c_t)

The gate: P_t = clamp(p_t, eps, 1 - eps) at scored positions, and exactly 1 where the router fixed p_t = 1 (each
sequence's first position, forced boundaries i.e. protected [MASK] singletons) and on padding (so P_{L+1} = 1
after the last real position). Exact ones make a protected singleton's output its own chunk state, with nothing
smoothed in from its neighbours, and make chunk + dechunk with boundaries forced everywhere the identity.
Both scans run in parallel form (`scan.linear_scan`); the router receives gradient through P (steps 2 and 3),
the hard boundaries none.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dnascale.models.dnachunker.scan import DEFAULT_CHUNK, linear_scan
from dnascale.ops.routing_boundary import BoundaryOutput

SMOOTHING_EPS = 1e-4


def straight_through(x: torch.Tensor) -> torch.Tensor:
    """Exactly 1 in the forward pass, identity gradient in the backward pass (x - x is exactly 0)."""
    return 1.0 + (x - x.detach())


def smoothing_gate(prob: torch.Tensor, padding: torch.Tensor | None, eps: float = SMOOTHING_EPS) -> torch.Tensor:
    """P [B, L] (float32 at least) from the router's p (module docstring)."""
    prob = prob.to(torch.promote_types(prob.dtype, torch.float32))
    gate = prob.clamp(eps, 1.0 - eps)
    fixed = prob >= 1.0  # the router's exact ones: first positions and forced boundaries
    fixed[:, 0] = True  # P_1 := 1 whatever p says
    if padding is not None:
        first = padding & ~F.pad(padding[:, :-1], (1, 0), value=False)
        fixed = fixed | first | ~padding
    return torch.where(fixed, torch.ones_like(gate), gate)


def dechunk(
    z: torch.Tensor,
    routing: BoundaryOutput,
    padding: torch.Tensor | None,
    *,
    eps: float = SMOOTHING_EPS,
    chunk_size: int = DEFAULT_CHUNK,
) -> torch.Tensor:
    """z [B, L', d] -> [B, L, d] at the level `routing` was computed on (module docstring)."""
    width = z.shape[-1]
    index = routing.chunk_index.clamp(min=0)
    replicated = z.gather(1, index[..., None].expand(-1, -1, width))
    gate = smoothing_gate(routing.prob, padding, eps)
    compute = torch.promote_types(z.dtype, gate.dtype)
    replicated = replicated.to(compute)
    P = gate.to(compute)[..., None]  # [B, L, 1]
    P_next = F.pad(P[:, 1:], (0, 0, 0, 1), value=1.0)  # P_{t+1}, with P_{L+1} = 1
    forward = linear_scan(1.0 - P, P * replicated, chunk_size=chunk_size)
    backward = linear_scan(1.0 - P_next, P_next * replicated, reverse=True, chunk_size=chunk_size)
    smoothed = (forward + backward) / 2
    confidence = torch.where(routing.boundary, gate, 1.0 - gate).to(compute)
    return (smoothed * straight_through(confidence)[..., None]).to(z.dtype)


class DechunkLayer(torch.nn.Module):
    """`dechunk` as a (parameter-free) module, so that hooks and profilers see it by name."""

    def __init__(self, eps: float = SMOOTHING_EPS, chunk_size: int = DEFAULT_CHUNK) -> None:
        super().__init__()
        self.eps = eps
        self.chunk_size = chunk_size

    def forward(self, z: torch.Tensor, routing: BoundaryOutput, padding: torch.Tensor | None) -> torch.Tensor:
        return dechunk(z, routing, padding, eps=self.eps, chunk_size=self.chunk_size)
