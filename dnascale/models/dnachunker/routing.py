"""Routing: boundary probabilities from adjacent positions, mask protection, and the ratio loss.

    q_t = W_q x_t,  k_t = W_k x_t   (bias-free d x d; identity at init, as H-Net)
    p_t = (1 - cos(q_t, k_{t-1})) / 2,  p = 1 at each sequence's first position,  b_t = [p_t >= 0.5]

computed by the csrc op `dnascale.ops.routing_boundary` (reference / C++ / CUDA, chosen there), which also
applies forced boundaries and padding and numbers the chunks.

Mask protection: every [MASK] is a singleton chunk, i.e. boundaries are forced at the masked position t and at
t + 1. The routing op gives forced positions p = 1 (and no gradient), so they count in the ratio statistics as
boundaries with probability 1 (the older code's choice, kept by the spec).

Ratio loss per stage (H-Net's, with N = 1/alpha): with F = mean_t b_t and G = mean_t p_t over a sequence's real
positions,  L = F G / alpha + (1 - F)(1 - G) / (1 - alpha);  its minimum, 1, is at F = G = alpha. Computed per
sequence and averaged over the sequences of the batch (the older code's choice).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dnascale.ops.routing_boundary import BoundaryOutput, routing_boundary

ROUTER_INITS: tuple[str, ...] = ("identity", "normal")


class Router(nn.Module):
    def __init__(self, hidden: int, init: str = "identity", init_std: float = 0.02, backend: str = "auto") -> None:
        super().__init__()
        if init not in ROUTER_INITS:
            raise ValueError(f"unknown router init {init!r}; choose one of {list(ROUTER_INITS)}")
        self.backend = backend
        self.q_weight = nn.Parameter(torch.empty(hidden, hidden))
        self.k_weight = nn.Parameter(torch.empty(hidden, hidden))
        with torch.no_grad():
            for weight in (self.q_weight, self.k_weight):
                if init == "identity":
                    nn.init.eye_(weight)
                else:
                    nn.init.normal_(weight, std=init_std)

    def forward(
        self, x: torch.Tensor, force: torch.Tensor | None = None, padding: torch.Tensor | None = None
    ) -> BoundaryOutput:
        """x [B, L, hidden]; force [B, L] bool (boundaries that must open a chunk); padding [B, L] bool."""
        q = F.linear(x, self.q_weight)
        k = F.linear(x, self.k_weight)
        return routing_boundary(q, k, force=force, padding=padding, backend=self.backend)


def protected_boundaries(masked: torch.Tensor) -> torch.Tensor:
    """Forced boundaries that make every masked position a singleton chunk: at t and at t + 1 for masked t."""
    after = F.pad(masked[:, :-1], (1, 0), value=False)
    return masked | after


def ratio_loss(
    boundary: torch.Tensor, prob: torch.Tensor, padding: torch.Tensor | None, target: float
) -> torch.Tensor:
    """Mean over sequences of F G / alpha + (1 - F)(1 - G) / (1 - alpha) (module docstring); float32 at least."""
    prob = prob.to(torch.promote_types(prob.dtype, torch.float32))
    real = torch.ones_like(prob) if padding is None else padding.to(prob.dtype)
    count = real.sum(dim=1)
    keep = count > 0
    frac_boundary = (boundary.to(prob.dtype) * real).sum(dim=1) / count.clamp(min=1)
    mean_prob = (prob * real).sum(dim=1) / count.clamp(min=1)
    per_sequence = frac_boundary * mean_prob / target + (1 - frac_boundary) * (1 - mean_prob) / (1 - target)
    return per_sequence[keep].mean() if bool(keep.any()) else per_sequence.sum() * 0.0
