"""Chunk layer: keep the state at each chunk's first position (H-Net selection), padded per batch.

With t_1 < ... < t_n the boundary positions of a sequence, chunk j is represented by x[t_j]. Sequences keep
their own chunk counts; the batch is padded to the largest count (right padding, validity in `padding`).
Besides the states, each chunk carries its span in base pairs (first and last base it covers, for the trunk's
RoPE positions at the span centre) and whether it contains a [MASK] (for the next stage's protection and the
decoder's masked residual gating). The gather is differentiable w.r.t. the states; positions carry no gradient.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from dnascale.ops.routing_boundary import BoundaryOutput


class ChunkedSequence(NamedTuple):
    """One level of the hierarchy: per-position tensors of length L (bases at level 0, chunks above)."""

    hidden: torch.Tensor  # [B, L, d]
    padding: torch.Tensor  # [B, L] bool, True = real position
    start: torch.Tensor  # [B, L] long: first base pair covered (0-based, in the input window)
    end: torch.Tensor  # [B, L] long: last base pair covered (inclusive)
    masked: torch.Tensor  # [B, L] bool: covers a [MASK]

    @property
    def centre(self) -> torch.Tensor:
        """Span centres in bp, (start + end) / 2, as float32 (the trunk's RoPE positions)."""
        return (self.start + self.end).float() / 2


def base_level(hidden: torch.Tensor, padding: torch.Tensor, masked: torch.Tensor) -> ChunkedSequence:
    """Level 0: every base is its own span."""
    positions = torch.arange(hidden.shape[1], device=hidden.device).expand(hidden.shape[0], -1)
    return ChunkedSequence(hidden, padding, positions, positions, masked & padding)


def _per_chunk_max(values: torch.Tensor, routing: BoundaryOutput, padding: torch.Tensor, width: int,
                   fill: int) -> torch.Tensor:
    """max of `values` over each chunk's real positions -> [B, width] (`fill` where a chunk has none)."""
    index = routing.chunk_index.clamp(min=0)
    source = torch.where(padding, values, torch.full_like(values, fill))
    out = torch.full((values.shape[0], width), fill, dtype=values.dtype, device=values.device)
    return out.scatter_reduce(1, index.clamp(max=width - 1), source, reduce="amax", include_self=True)


def chunk(level: ChunkedSequence, hidden: torch.Tensor, routing: BoundaryOutput) -> ChunkedSequence:
    """The next, coarser level: `hidden` [B, L, d] (this level's encoder output) kept at its boundaries."""
    batch, length, width = hidden.shape
    num = int(routing.num_chunks.max()) if batch else 0
    num = max(num, 1)
    positions = torch.arange(length, device=hidden.device)
    # Boundaries first, in order; then the rest (never selected within `num` for sequences with fewer chunks
    # than `num`, which are masked out by `padding` below).
    key = positions[None] + length * (~routing.boundary).long()
    order = key.argsort(dim=1)[:, :num]
    chunk_padding = torch.arange(num, device=hidden.device)[None] < routing.num_chunks[:, None]
    states = hidden.gather(1, order[..., None].expand(-1, -1, width))
    states = states * chunk_padding[..., None].to(states.dtype)  # padded chunks hold zeros, not stray states
    start = torch.where(chunk_padding, level.start.gather(1, order), torch.zeros_like(order))
    end = _per_chunk_max(level.end, routing, level.padding, num, fill=-1)
    end = torch.where(chunk_padding, end, torch.zeros_like(end))
    masked = _per_chunk_max(level.masked.long(), routing, level.padding, num, fill=0).bool() & chunk_padding
    return ChunkedSequence(states, chunk_padding, start, end, masked)


def chunk_contains_mask(coarse: ChunkedSequence, routing: BoundaryOutput) -> torch.Tensor:
    """kappa at the finer level [B, L]: whether the chunk holding each position contains a [MASK]."""
    return coarse.masked.gather(1, routing.chunk_index.clamp(min=0))


class ChunkLayer(torch.nn.Module):
    """`chunk` as a (parameter-free) module, so that hooks and profilers see it by name."""

    def forward(self, level: ChunkedSequence, hidden: torch.Tensor, routing: BoundaryOutput) -> ChunkedSequence:
        return chunk(level, hidden, routing)
