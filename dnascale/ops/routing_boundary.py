"""DNACHUNKER routing boundaries: boundary probabilities from adjacent (q, k) and the chunk numbering they imply.

Inputs: q, k [B, T, D] (already projected: q_t = W_q x_t, k_t = W_k x_t), float64/float32/bfloat16/float16;
optional `force` [B, T] bool (mask protection, packed-sequence starts) and `padding` [B, T] bool (True = real
position). Every backend computes, with `eps` = EPS = 1e-6 unless given:

    kind(b, t) = PAD     if padding[b, t] is False
                 START   elif t == 0 or padding[b, t-1] is False or force[b, t]
                 SCORED  otherwise
    SCORED:  cos_t = <q_t, k_{t-1}> / max(|q_t| * |k_{t-1}|, eps)         (norms: Euclidean, each taken separately)
             p_t   = clamp((1 - cos_t) / 2, 0, 1)
             boundary_t = p_t >= 0.5
    START:   p_t = 1, boundary_t = True     (a sequence's first real position always opens a chunk)
    PAD:     p_t = 0, boundary_t = False    (padding never opens a chunk, even where forced)
    chunk_index[b, t] = (number of boundaries at positions <= t) - 1;  num_chunks[b] = number of boundaries.

So on padding, chunk_index is the index of the last chunk opened before it (-1 on left padding before the first
real position); a left-padded sequence starts at its first real position without needing `force`.
Zero vectors are safe: the eps makes cos = 0 (p = 0.5, a boundary) with finite gradients. eps is applied to the
product of the norms, as torch.nn.functional.cosine_similarity documents its eps (whose default is 1e-8); 1e-6
caps the gradient of a zero query at |k| / 1e-6 and is far below real norm products (|q||k| ~ D after projection).

Gradients reach q and k only through `prob`, only at SCORED positions (p is a constant 1 or 0 elsewhere), with
torch's rules at the kinks: no gradient where (1 - cos) / 2 falls outside [0, 1] (clamp), and none through the norm
product where it is below eps (clamp_min). `prob` is computed and returned in float32 for half/bfloat16/float32
inputs (float64 for float64), so the boundary decision is never taken on a rounded bf16 value.

Backends (see dnascale/ops/extensions.py for the rule): "reference" (eager torch, like H-Net's router; the oracle),
"cpu" (csrc/routing_boundary/routing_boundary_cpu.cpp), "cuda" (csrc/routing_boundary/routing_boundary_cuda.cu).
Tolerances between an extension and the float64 reference on the same inputs, checked by
tests/test_ops_routing_boundary.py: prob within 1e-12 (float64) or 1e-5 (float32, bfloat16, float16 inputs: all
accumulate in float32; only summation order differs), absolute; `boundary` agrees wherever |p - 0.5| exceeds ten
times that; grad_q and grad_k (returned in the input dtype) within 1e-10 (float64), 1e-4 (float32), 2e-3 (float16)
and 2e-2 (bfloat16), relative to the largest gradient entry.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from dnascale.ops.extensions import resolve_backend

EPS = 1e-6


class BoundaryOutput(NamedTuple):
    """Routing outputs. A NamedTuple rather than a dataclass: DeepSpeed ZeRO-3's forward hooks, torch pytree,
    activation checkpointing and torch.compile all walk tuples natively (and keep field access), whereas a dataclass
    output would have to be registered as a pytree node with each of them."""

    prob: torch.Tensor  # [B, T] float32 (float64 for float64 inputs), differentiable w.r.t. q and k
    boundary: torch.Tensor  # [B, T] bool
    chunk_index: torch.Tensor  # [B, T] int64, inclusive cumsum of boundary minus 1
    num_chunks: torch.Tensor  # [B] int64


def _position_kinds(shape: tuple[int, int], force, padding, device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(start [B, T] bool, real [B, T] bool or None) per the module docstring."""
    batch, length = shape
    start = torch.zeros(batch, length, dtype=torch.bool, device=device)
    start[:, :1] = True
    if padding is not None:
        start[:, 1:] |= ~padding[:, :-1]
    if force is not None:
        start |= force
    if padding is not None:
        start &= padding
    return start, padding


def routing_boundary_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    force: torch.Tensor | None = None,
    padding: torch.Tensor | None = None,
    eps: float = EPS,
) -> BoundaryOutput:
    """Eager torch, written the way H-Net's router is (shifted cosine, clamp, pad, threshold): the oracle."""
    _check(q, k, force, padding)
    force = None if force is None else force.to(device=q.device, dtype=torch.bool)
    padding = None if padding is None else padding.to(device=q.device, dtype=torch.bool)
    batch, length, _ = q.shape
    compute = torch.promote_types(q.dtype, torch.float32)
    qf, kf = q.to(compute), k.to(compute)
    q_next, k_prev = qf[:, 1:], kf[:, :-1]
    dot = (q_next * k_prev).sum(dim=-1)
    norms = torch.linalg.vector_norm(q_next, dim=-1) * torch.linalg.vector_norm(k_prev, dim=-1)
    cos = dot / torch.clamp_min(norms, eps)
    prob = torch.clamp((1 - cos) / 2, 0.0, 1.0)
    prob = F.pad(prob, (1, 0), value=1.0)
    start, real = _position_kinds((batch, length), force, padding, q.device)
    prob = torch.where(start, torch.ones_like(prob), prob)
    if real is not None:
        prob = torch.where(real, prob, torch.zeros_like(prob))
    boundary = (prob >= 0.5) | start
    if real is not None:
        boundary &= real
    chunk_index = torch.cumsum(boundary, dim=1, dtype=torch.long) - 1
    return BoundaryOutput(prob, boundary, chunk_index, boundary.sum(dim=1, dtype=torch.long))


class _RoutingBoundaryFunction(torch.autograd.Function):
    """The csrc kernels (CPU or CUDA, by the tensors' device) with their analytic backward."""

    @staticmethod
    def forward(ctx, q, k, force, padding, eps):
        prob, boundary, chunk_index, num_chunks = torch.ops.dnascale.routing_boundary_fwd(q, k, force, padding, eps)
        ctx.save_for_backward(q, k, force, padding)
        ctx.eps = eps
        ctx.mark_non_differentiable(boundary, chunk_index, num_chunks)
        return prob, boundary, chunk_index, num_chunks

    @staticmethod
    def backward(ctx, grad_prob, *_unused):
        q, k, force, padding = ctx.saved_tensors
        if grad_prob is None:
            return None, None, None, None, None
        grad_q, grad_k = torch.ops.dnascale.routing_boundary_bwd(grad_prob, q, k, force, padding, ctx.eps)
        return (
            grad_q if ctx.needs_input_grad[0] else None,
            grad_k if ctx.needs_input_grad[1] else None,
            None,
            None,
            None,
        )


def routing_boundary(
    q: torch.Tensor,
    k: torch.Tensor,
    force: torch.Tensor | None = None,
    padding: torch.Tensor | None = None,
    *,
    eps: float = EPS,
    backend: str = "auto",
) -> BoundaryOutput:
    """Boundary probabilities, boundaries and chunk numbering (module docstring); backend per extensions.py."""
    _check(q, k, force, padding)
    force = None if force is None else force.to(device=q.device, dtype=torch.bool)
    padding = None if padding is None else padding.to(device=q.device, dtype=torch.bool)
    if resolve_backend("routing_boundary", backend, q.device.type) == "reference":
        return routing_boundary_reference(q, k, force, padding, eps)
    return BoundaryOutput(*_RoutingBoundaryFunction.apply(q, k, force, padding, float(eps)))


def _check(q, k, force, padding) -> None:
    if q.dim() != 3 or q.shape != k.shape:
        raise ValueError(f"routing_boundary: q and k must both be [B, T, D]; got {tuple(q.shape)} and {tuple(k.shape)}")
    if q.dtype != k.dtype or not q.is_floating_point():
        raise ValueError(f"routing_boundary: q and k must share a floating dtype; got {q.dtype} and {k.dtype}")
    for name, mask in (("force", force), ("padding", padding)):
        if mask is not None and tuple(mask.shape) != tuple(q.shape[:2]):
            raise ValueError(f"routing_boundary: {name} must be [B, T] = {tuple(q.shape[:2])}; got {tuple(mask.shape)}")
