"""Position information, chosen by kind: "rope" | "alibi" | "learned" | "none".

A kind acts in at most two places, and each place has one hook:
- on the token embeddings (`build_input_positions`): "learned" adds a trained absolute table;
- inside attention (`build_attention_positions`): "rope" rotates q and k, "alibi" adds -slope_h * |i - j| to the
  scores through the attention mask spec. Both are parameter-free, so every attention layer builds its own.

ALiBi slopes are the paper's geometric sequence over *all* heads (interleaving the next power of two's slopes
when the head count is not a power of two); each TP rank keeps the slice for the heads it holds.
RoPE uses the rotate-half layout (first half of the head dimension pairs with the second half, as GPT-NeoX and
HF LLaMA) and accepts fractional positions (DNACHUNKER places chunks at their centre in bp).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import torch
from torch import nn

from dnascale.nn.attention_backends import MaskSpec
from dnascale.nn.tp import tp_rank_and_size

POSITION_KINDS: tuple[str, ...] = ("rope", "alibi", "learned", "none")


def alibi_slopes(num_heads: int) -> list[float]:
    """Slopes for all heads: 2^(-8/n), 2^(-16/n), ... for n a power of two; otherwise the closest lower power
    of two's sequence followed by every other slope of the next power of two's sequence."""

    def geometric(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    lower = 2 ** int(math.floor(math.log2(num_heads)))
    if lower == num_heads:
        return geometric(num_heads)
    return geometric(lower) + geometric(2 * lower)[0::2][: num_heads - lower]


class AttentionPositions(nn.Module):
    """Hook through which a position kind acts inside attention: (q, k, mask) -> (q, k, mask)."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, mask: MaskSpec, positions: torch.Tensor | None):
        return q, k, mask


class RotaryPositions(AttentionPositions):
    def __init__(self, head_dim: int, base: float) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rope needs an even head_dim, got {head_dim}")
        self.head_dim = head_dim
        self.base = base

    def _cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # Recomputed every call, in at least float32: no buffer that a bf16 cast of the module could degrade.
        half = self.head_dim // 2
        exponent = torch.arange(half, device=positions.device, dtype=dtype) / half
        inv_freq = self.base ** (-exponent)
        angles = positions.to(dtype)[..., None] * inv_freq  # [..., T, half]
        angles = torch.cat((angles, angles), dim=-1)
        if angles.dim() == 3:  # per-sequence positions [B, T] -> [B, 1, T, D]
            angles = angles[:, None]
        return angles.cos(), angles.sin()

    @staticmethod
    def _rotate_half(x: torch.Tensor) -> torch.Tensor:
        first, second = x.chunk(2, dim=-1)
        return torch.cat((-second, first), dim=-1)

    def forward(self, q, k, mask, positions):
        if positions is None:
            positions = torch.arange(q.shape[-2], device=q.device)
        dtype = torch.promote_types(q.dtype, torch.float32)
        cos, sin = self._cos_sin(positions, dtype)

        def rotate(x: torch.Tensor) -> torch.Tensor:
            xf = x.to(dtype)
            return (xf * cos + self._rotate_half(xf) * sin).to(x.dtype)

        return rotate(q), rotate(k), mask


class AlibiPositions(AttentionPositions):
    def __init__(self, total_heads: int) -> None:
        super().__init__()
        tp_rank, tp_size = tp_rank_and_size()
        local = total_heads // tp_size
        # A tuple of floats, not a buffer: nothing for ZeRO-3 to partition or for a dtype cast to round.
        self.slopes = tuple(alibi_slopes(total_heads)[tp_rank * local : (tp_rank + 1) * local])

    def forward(self, q, k, mask, positions):
        slopes = torch.tensor(self.slopes, dtype=torch.float32, device=q.device)
        return q, k, dataclasses.replace(mask, alibi_slopes=slopes)


def build_attention_positions(kind: str, *, head_dim: int, total_heads: int, rope_base: float) -> AttentionPositions:
    builders: dict[str, Callable[[], AttentionPositions]] = {
        "rope": lambda: RotaryPositions(head_dim, rope_base),
        "alibi": lambda: AlibiPositions(total_heads),
        "learned": AttentionPositions,  # acts on the input embeddings instead
        "none": AttentionPositions,
    }
    if kind not in builders:
        raise ValueError(f"unknown position kind {kind!r}; choose one of {list(POSITION_KINDS)}")
    return builders[kind]()


class LearnedPositionEmbedding(nn.Module):
    """A trained absolute position table [max_seq_len, hidden], replicated on every TP rank."""

    def __init__(self, max_seq_len: int, hidden: int, init_method: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(max_seq_len, hidden))
        with torch.no_grad():
            init_method(self.weight)

    def forward(self, hidden: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
        if positions is None:
            positions = torch.arange(hidden.shape[1], device=hidden.device)
        return hidden + self.weight[positions.long()].to(hidden.dtype)


def build_input_positions(
    kind: str, *, max_seq_len: int, hidden: int, init_method: Callable[[torch.Tensor], torch.Tensor]
) -> LearnedPositionEmbedding | None:
    if kind not in POSITION_KINDS:
        raise ValueError(f"unknown position kind {kind!r}; choose one of {list(POSITION_KINDS)}")
    return LearnedPositionEmbedding(max_seq_len, hidden, init_method) if kind == "learned" else None
