"""Local (sliding-window) attention with optional global block-summary keys, in memory linear in the length.

The semantics are those of `attention_backends.MaskSpec` (the oracle is the dense `reference` backend on the same
spec): query i sees the sequence keys j with |i - j| <= window (and j <= i when causal, and key_padding), each
with `offset_bias[h, j - i + window]` (a relative-position table cut to the window) and ALiBi if given; plus,
when `global_keys` is set, the last G keys, which are block summaries (`GlobalKeys`: LongT5's transient-global
tokens) with their own visibility and block-distance bias. One softmax covers local and global keys together.

`blocked_attention` is the pure-torch fast path (the `blocked` backend). The layout is LongT5's:
- queries are cut into blocks of L = window positions (the last block padded);
- query block c attends to key blocks c-1, c, c+1 (c-1, c when causal): 3L (2L) keys, masked to the window;
  the offset structure is the same for every block, so one [L, 3L] mask and bias table serve them all;
- the G global keys are appended to every block's keys.
Scores cost B*H*T*(3L + G) instead of B*H*T*T. Blocks are processed in chunks of at most `chunk_elements`
scores; when gradients are needed and there is more than one chunk, each chunk runs under activation
checkpointing, so the backward pass keeps only q, k, v and the output (not the scores) and peak memory stays
linear in T even though G = T / block grows with T.

`flex_mods` expresses the same spec as FlexAttention mask/score mods (block-sparse when compiled on CUDA).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

if TYPE_CHECKING:
    from dnascale.nn.attention_backends import MaskSpec

DEFAULT_CHUNK_ELEMENTS = 1 << 20  # scores per chunk (4 MiB in float32); a few such tensors are alive at once


@dataclass(frozen=True)
class GlobalKeys:
    """The last `count` keys (and values) are summaries of fixed blocks of `block` sequence positions.

    Summary j is visible to query i when `valid[b, j]` (default: all) and, if the MaskSpec is causal, when block j
    is complete at i: (j + 1) * block - 1 <= i. `bias[h, j - query_block[b, i] + count]` is added to its score (a
    bias by block distance from the query's own block b(i), distances -count..count; b(i) = count happens for the
    incomplete tail of a causal layout); `query_block` is needed only with `bias`.
    """

    count: int
    block: int
    query_block: torch.Tensor | None = None  # [B or 1, Tq] long: b(i); -1 for queries in no block (padding)
    valid: torch.Tensor | None = None  # [B or 1, count] bool
    bias: torch.Tensor | None = None  # [H, 2 * count + 1] float, this rank's heads

    def __post_init__(self) -> None:
        if self.bias is not None and self.query_block is None:
            raise ValueError("GlobalKeys.bias needs query_block (the block distance is measured from b(i))")

    def allowed_at(self, positions: torch.Tensor, causal: bool) -> torch.Tensor:
        """Visibility [B or 1, *positions.shape, G] of the summaries from query `positions` (long tensor)."""
        j = torch.arange(self.count, device=positions.device)
        if causal:
            visible = ((j + 1) * self.block - 1) <= positions[..., None]
        else:
            visible = torch.ones(*positions.shape, self.count, dtype=torch.bool, device=positions.device)
        visible = visible[None]
        if self.valid is not None:
            valid = self.valid.to(device=positions.device, dtype=torch.bool)
            visible = visible & valid.view(valid.shape[0], *([1] * positions.dim()), self.count)
        return visible

    def bias_at(self, query_block: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
        """Bias [B or 1, H, *query_block.shape[1:], G] for queries whose blocks are `query_block` [B or 1, ...]."""
        if self.bias is None:
            return None
        j = torch.arange(self.count, device=query_block.device)
        index = (j - query_block[..., None] + self.count).clamp(0, 2 * self.count)
        return self.bias.to(dtype)[:, index].transpose(0, 1)

    def allowed(self, tq: int, causal: bool, device: torch.device) -> torch.Tensor:
        """[B or 1, 1, Tq, G] bool."""
        return self.allowed_at(torch.arange(tq, device=device), causal)[:, None]

    def additive(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
        """[B or 1, H, Tq, G] float, or None."""
        if self.bias is None:
            return None
        return self.bias_at(self.query_block.to(device), dtype).to(device)


def blocked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: "MaskSpec",
    scale: float,
    *,
    block: int | None = None,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> torch.Tensor:
    """q [B, H, T, D]; k, v [B, H, T + G, D] -> [B, H, T, D]. Needs `mask.window`; no dense `mask.bias`."""
    if mask.window is None:
        raise ValueError("blocked_attention needs MaskSpec.window")
    if mask.bias is not None:
        raise ValueError("blocked_attention takes no dense bias; use MaskSpec.offset_bias")
    batch, heads, length, dim = q.shape
    n_global = mask.num_global
    if k.shape[-2] != length + n_global:
        raise ValueError(f"blocked_attention: {length} queries need {length} sequence keys (+{n_global} global), "
                         f"got {k.shape[-2]} keys")
    radius = mask.window
    block = max(radius, 1) if block is None else block
    if block < radius:
        raise ValueError(f"block {block} must be >= window {radius} (a query block sees only its neighbours)")
    compute = torch.promote_types(q.dtype, torch.float32)
    device = q.device
    n_blocks = -(-length // block)
    pad = n_blocks * block - length
    neighbours = 2 if mask.causal else 3  # key blocks per query block
    width = neighbours * block
    right = pad + (0 if mask.causal else block)

    qf, kf, vf = (t.to(compute) for t in (q, k, v))
    q_blocks = F.pad(qf, (0, 0, 0, pad)).view(batch, heads, n_blocks, block, dim)
    k_pad = F.pad(kf[:, :, :length], (0, 0, block, right))
    v_pad = F.pad(vf[:, :, :length], (0, 0, block, right))
    keys = mask.key_padding
    keys = torch.ones(1, length, dtype=torch.bool, device=device) if keys is None else keys.to(device, torch.bool)
    keys_pad = F.pad(keys, (block, right), value=False)

    # The offset structure of a query block against its key window, identical for every block.
    offset = torch.arange(width, device=device)[None, :] - block - torch.arange(block, device=device)[:, None]
    local_keep = offset.abs() <= radius
    if mask.causal:
        local_keep = local_keep & (offset <= 0)
    local_bias = None
    if mask.offset_bias is not None:
        local_bias = mask.offset_bias.to(device=device, dtype=compute)[:, (offset + radius).clamp(0, 2 * radius)]
    if mask.alibi_slopes is not None:
        alibi = -mask.alibi_slopes.to(device=device, dtype=compute)[:, None, None] * offset.abs().to(compute)
        local_bias = alibi if local_bias is None else local_bias + alibi

    global_keys = mask.global_keys
    k_global = v_global = query_block = None
    if n_global:
        k_global, v_global = kf[:, :, length:], vf[:, :, length:]
        if global_keys.query_block is not None:
            query_block = F.pad(global_keys.query_block.to(device), (0, pad), value=-1)

    def attend(q_chunk, k_chunk, v_chunk, keys_chunk, first_block: int):
        n = q_chunk.shape[2]
        k_win = k_chunk.unfold(2, width, block)  # [B, H, n, D, width], a view
        v_win = v_chunk.unfold(2, width, block)
        scores = torch.einsum("bhcqd,bhcdk->bhcqk", q_chunk, k_win) * scale
        if local_bias is not None:
            scores = scores + local_bias[None, :, None]
        keep = local_keep[None, None, None] & keys_chunk.unfold(1, width, block)[:, None, :, None, :]
        if n_global:
            positions = (first_block * block + torch.arange(n * block, device=device)).view(n, block)
            global_scores = torch.einsum("bhcqd,bhgd->bhcqg", q_chunk, k_global) * scale
            if query_block is not None:
                global_bias = global_keys.bias_at(query_block[:, first_block * block : (first_block + n) * block]
                                                  .view(-1, n, block), compute)
                if global_bias is not None:
                    global_scores = global_scores + global_bias
            global_keep = global_keys.allowed_at(positions, mask.causal)[:, None]
            lead = torch.broadcast_shapes(keep.shape[:-1], global_keep.shape[:-1])
            scores = torch.cat([scores, global_scores], dim=-1)
            keep = torch.cat([keep.expand(*lead, -1), global_keep.expand(*lead, -1)], dim=-1)
        # A row that sees no key (padding, or a query with nothing in reach) gets an all-zero output.
        sees_something = keep.any(dim=-1, keepdim=True)
        scores = scores.masked_fill(~keep, float("-inf")).masked_fill(~sees_something, 0.0)
        probs = torch.softmax(scores, dim=-1) * sees_something
        out = torch.einsum("bhcqk,bhcdk->bhcqd", probs[..., :width], v_win)
        if n_global:
            out = out + torch.einsum("bhcqg,bhgd->bhcqd", probs[..., width:], v_global)
        return out

    per_block = batch * heads * block * (width + n_global)
    blocks_per_chunk = max(1, chunk_elements // per_block)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    recompute = needs_grad and blocks_per_chunk < n_blocks
    outputs = []
    for first in range(0, n_blocks, blocks_per_chunk):
        last = min(first + blocks_per_chunk, n_blocks)
        span = slice(first * block, (last + neighbours - 1) * block)
        args = (q_blocks[:, :, first:last], k_pad[:, :, span], v_pad[:, :, span], keys_pad[:, span])
        if recompute:
            outputs.append(torch.utils.checkpoint.checkpoint(
                attend, *args, first, use_reentrant=False, preserve_rng_state=False
            ))
        else:
            outputs.append(attend(*args, first))
    out = torch.cat(outputs, dim=2).reshape(batch, heads, n_blocks * block, dim)[:, :, :length]
    return out.to(q.dtype)


def flex_mods(
    mask: "MaskSpec", batch: int, tq: int, tk: int, dtype: torch.dtype, device: torch.device
) -> tuple[Callable, Callable | None]:
    """FlexAttention (mask_mod, score_mod) for a spec with offset_bias and/or global keys (see module docstring)."""
    n_global = mask.num_global
    n_seq = tk - n_global
    causal, window = mask.causal, mask.window
    keys = None if mask.key_padding is None else mask.key_padding.to(device, torch.bool).expand(batch, n_seq)
    global_keys = mask.global_keys
    valid = query_block = global_table = None
    block = 1
    if global_keys is not None:
        block = global_keys.block
        if global_keys.valid is not None:
            valid = global_keys.valid.to(device, torch.bool).expand(batch, n_global)
        if global_keys.bias is not None:
            query_block = global_keys.query_block.to(device).expand(batch, tq)
            global_table = global_keys.bias.to(device=device, dtype=dtype)
    offset_table = None if mask.offset_bias is None else mask.offset_bias.to(device=device, dtype=dtype)
    slopes = None if mask.alibi_slopes is None else mask.alibi_slopes.to(device=device, dtype=dtype)

    def mask_mod(b, h, q_idx, kv_idx):
        is_sequence = kv_idx < n_seq
        keep = is_sequence
        if causal:
            keep = keep & (q_idx >= kv_idx)
        if window is not None:
            keep = keep & ((q_idx - kv_idx).abs() <= window)
        if keys is not None:
            keep = keep & keys[b, kv_idx.clamp(max=n_seq - 1)]
        if n_global:
            j = (kv_idx - n_seq).clamp(min=0)
            summary = ~is_sequence
            if causal:
                summary = summary & ((j + 1) * block - 1 <= q_idx)
            if valid is not None:
                summary = summary & valid[b, j]
            keep = keep | summary
        return keep

    if offset_table is None and global_table is None and slopes is None:
        return mask_mod, None

    def score_mod(score, b, h, q_idx, kv_idx):
        is_sequence = kv_idx < n_seq
        if slopes is not None:
            score = score - torch.where(is_sequence, slopes[h] * (q_idx - kv_idx).abs(), 0.0)
        if offset_table is not None:
            index = (kv_idx - q_idx + window).clamp(0, 2 * window)
            score = score + torch.where(is_sequence, offset_table[h, index], 0.0)
        if global_table is not None:
            j = (kv_idx - n_seq).clamp(min=0)
            index = (j - query_block[b, q_idx] + n_global).clamp(0, 2 * n_global)
            score = score + torch.where(is_sequence, 0.0, global_table[h, index])
        return score

    return mask_mod, score_mod
