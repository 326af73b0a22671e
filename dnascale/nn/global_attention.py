"""Local + transient-global self-attention (LongT5 TGlobal; ENBED's decoder), tensor-parallel over heads.

Each query attends, in one softmax, to
- the sequence keys within its window (|i - j| <= r; j <= i when causal), with a relative-position bias, and
- G block summaries ("global tokens"): the sequence is cut into fixed blocks of k positions, each block's
  hidden states are *summed* and RMS-normalised with this layer's own scale (they are recomputed from every
  layer's input, hence "transient"), and the summaries are projected with the same K and V weights as tokens.
  A summary gets its own bias by block distance j - b(i).

Which summaries a query sees (`fixed_blocks`):
- bidirectional (LongT5 encoder): G = T // k; every summary of a non-empty block is visible. Tokens of an
  incomplete last block join block G - 1 (LongT5's "orphan" rule); padding belongs to no block.
- causal (ENBED decoder): only blocks complete at i, (j + 1) k - 1 <= i, so no summary holds a future token;
  the unfinished current block is covered by the local window (r >= k). Tokens of the incomplete tail belong to
  no summary.

Tensor parallelism (spec §7): the summaries are computed from the replicated hidden state before the QKV
projection, concatenated after the tokens and sent through the same column-parallel QKV layer; each rank then
attends with its heads (and its heads' slice of the bias tables) and the row-parallel output projection
all-reduces. The attention itself goes through `core_attention` with a `MaskSpec` carrying `offset_bias` and
`GlobalKeys`, so the backend is chosen in the one place (`blocked` on CPU, `flex` on CUDA, `reference` oracle).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core import tensor_parallel
from megatron.core.model_parallel_config import ModelParallelConfig
from torch import nn

from dnascale.nn.attention_backends import MaskSpec, check_backend, core_attention
from dnascale.nn.local_attention import GlobalKeys
from dnascale.nn.tp import InitMethod, divide


@dataclass(frozen=True)
class BlockLayout:
    """Fixed global blocks of one batch: built once per forward, shared by every layer of a stack."""

    block: int  # k, positions per block
    count: int  # G, number of summaries (may be 0 for sequences shorter than one block)
    causal: bool
    member: torch.Tensor  # [B or 1, T] long: the block a position is summed into; -1 = none
    query_block: torch.Tensor  # [B or 1, T] long: b(i), the block the global bias measures distance from
    valid: torch.Tensor  # [B or 1, G] bool: the summary exists (its block is non-empty / complete)

    def global_keys(self, bias: torch.Tensor | None) -> GlobalKeys | None:
        if self.count == 0:
            return None
        return GlobalKeys(self.count, self.block, self.query_block, self.valid, bias)


def fixed_blocks(
    length: int, block: int, key_padding: torch.Tensor | None = None, causal: bool = False,
    device: torch.device | None = None,
) -> BlockLayout:
    """Block membership of positions 0..length-1 (key_padding [B, T] bool, True = real; right padding)."""
    positions = torch.arange(length, device=device)
    count = length // block
    real = (torch.ones(1, length, dtype=torch.bool, device=device) if key_padding is None
            else key_padding.to(device=device, dtype=torch.bool))
    ids = (positions // block)[None].expand(real.shape[0], -1)
    if causal:
        member = torch.where(real & (ids < count), ids, -1)
        n_real = real.sum(dim=1, keepdim=True)
        valid = (torch.arange(count, device=device)[None] + 1) * block <= n_real  # blocks made of real tokens
        return BlockLayout(block, count, True, member, ids, valid)
    # LongT5: full blocks = real positions that end a block; orphans of the last, incomplete block join the last
    # full block; with no full block at all a sequence has no summary.
    ends = real & (positions % block == block - 1)[None]
    full = ends.sum(dim=1, keepdim=True)
    member = torch.where(real, torch.minimum(ids, full - 1), -1)
    valid = torch.arange(count, device=device)[None] < full
    return BlockLayout(block, count, False, member, member, valid)


def block_summaries(x: torch.Tensor, layout: BlockLayout) -> torch.Tensor:
    """Sum of the hidden states [B, T, H] of each block's members -> [B, G, H] (padding and orphans excluded)."""
    batch, _, hidden = x.shape
    member = layout.member.expand(batch, -1)
    index = torch.where(member >= 0, member, layout.count)  # non-members go to a spill row, dropped below
    sums = x.new_zeros(batch, layout.count + 1, hidden)
    sums = sums.scatter_add(1, index[..., None].expand(-1, -1, hidden), x)
    return sums[:, : layout.count]


@dataclass
class LocalGlobalAttentionConfig:
    hidden: int
    heads: int
    head_dim: int
    window: int  # local radius r
    causal: bool = False
    global_block: int = 0  # k; 0 = local attention only
    norm_eps: float = 1e-6  # of the summaries' RMSNorm
    softmax_scale: float | None = 1.0  # T5: the 1/sqrt(d) is absorbed by the initialisation
    backend: str = "auto"

    @property
    def inner(self) -> int:
        return self.heads * self.head_dim


class _LocalGlobalAttention(nn.Module):
    """What the self- and cross-attention variants share: heads, the summaries' norm, core attention, output."""

    def __init__(self, config: LocalGlobalAttentionConfig, mp_config: ModelParallelConfig, output_init: InitMethod):
        super().__init__()
        check_backend(config.backend)
        self.config = config
        self.local_heads = divide(config.heads, mp_config.tensor_model_parallel_size, "attention heads over TP")
        self.out = tensor_parallel.RowParallelLinear(
            config.inner, config.hidden, config=mp_config, init_method=output_init, bias=False,
            input_is_parallel=True, skip_bias_add=False,
        )
        self.global_norm = nn.RMSNorm(config.hidden, eps=config.norm_eps) if config.global_block else None

    def _with_summaries(self, source: torch.Tensor, blocks: BlockLayout | None) -> tuple[torch.Tensor, int]:
        """source [B, T, H] followed by its RMS-normed block summaries, and how many summaries there are."""
        if self.global_norm is None:
            return source, 0
        if blocks is None or blocks.block != self.config.global_block:
            raise ValueError("a global-attention layer needs the BlockLayout of its block size")
        if blocks.count == 0:
            return source, 0
        summaries = self.global_norm(block_summaries(source, blocks))
        return torch.cat([source, summaries], dim=1), blocks.count

    def _heads(self, projected: torch.Tensor, parts: int) -> tuple[torch.Tensor, ...]:
        batch, length, _ = projected.shape
        split = projected.view(batch, length, self.local_heads, parts, self.config.head_dim)
        return tuple(t.transpose(1, 2) for t in split.unbind(dim=3))

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: MaskSpec) -> torch.Tensor:
        batch, _, length, _ = q.shape
        attended = core_attention(q, k, v, mask, backend=self.config.backend, scale=self.config.softmax_scale)
        merged = attended.transpose(1, 2).reshape(batch, length, self.local_heads * self.config.head_dim)
        out, _ = self.out(merged)
        return out


class LocalGlobalSelfAttention(_LocalGlobalAttention):
    """x [B, T, hidden] (already normed) -> [B, T, hidden]; no biases (T5)."""

    def __init__(
        self, config: LocalGlobalAttentionConfig, mp_config: ModelParallelConfig, qkv_init: InitMethod,
        output_init: InitMethod,
    ) -> None:
        super().__init__(config, mp_config, output_init)
        # Output rows ordered [head, (q, k, v), head_dim], as dnascale.nn.attention's fused layout.
        self.qkv = tensor_parallel.ColumnParallelLinear(
            config.hidden, 3 * config.inner, config=mp_config, init_method=qkv_init, bias=False, gather_output=False,
        )

    def forward(
        self,
        x: torch.Tensor,
        key_padding: torch.Tensor | None = None,
        offset_bias: torch.Tensor | None = None,
        blocks: BlockLayout | None = None,
        global_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """key_padding [B, T] bool (True = real); offset_bias [local_heads, 2r+1] by offset j - i; blocks from
        `fixed_blocks` (needed when the layer has global attention); global_bias [local_heads, 2G+1] by block
        distance -G..G."""
        if blocks is not None and self.global_norm is not None and blocks.causal != self.config.causal:
            raise ValueError("the BlockLayout's direction (causal or not) differs from the attention's")
        length = x.shape[1]
        tokens, count = self._with_summaries(x, blocks)
        projected, _ = self.qkv(tokens)
        q, k, v = self._heads(projected, 3)
        mask = MaskSpec(
            key_padding=key_padding, query_padding=key_padding, causal=self.config.causal,
            window=self.config.window, offset_bias=offset_bias,
            global_keys=blocks.global_keys(global_bias) if count else None,
        )
        return self._attend(q[:, :, :length], k, v, mask)


class LocalGlobalCrossAttention(_LocalGlobalAttention):
    """Aligned cross-attention: decoder position i attends to the memory (encoder) positions |j - i| <= r and to
    the memory's block summaries, in one softmax, with relative-position and block-distance biases.

    For sequence-to-sequence maps that keep positions roughly aligned (reconstruction, base edits, indels
    shorter than r); the global summaries keep a coarse view of the whole memory. Queries and memory may differ
    in length (positions are compared as indices); the `blocked` backend serves equal lengths.
    """

    def __init__(
        self, config: LocalGlobalAttentionConfig, mp_config: ModelParallelConfig, q_init: InitMethod,
        kv_init: InitMethod, output_init: InitMethod,
    ) -> None:
        super().__init__(config, mp_config, output_init)
        if config.causal:
            raise ValueError("cross-attention is not causal")
        self.q = tensor_parallel.ColumnParallelLinear(
            config.hidden, config.inner, config=mp_config, init_method=q_init, bias=False, gather_output=False,
        )
        # Rows [head, (k, v), head_dim], as dnascale.nn.attention.CrossAttention.
        self.kv = tensor_parallel.ColumnParallelLinear(
            config.hidden, 2 * config.inner, config=mp_config, init_method=kv_init, bias=False, gather_output=False,
        )

    def forward(
        self,
        x: torch.Tensor,
        memory: torch.Tensor,
        memory_padding: torch.Tensor | None = None,
        query_padding: torch.Tensor | None = None,
        offset_bias: torch.Tensor | None = None,
        memory_blocks: BlockLayout | None = None,
        global_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x [B, Tq, hidden] (normed); memory [B, Tk, hidden]; memory_blocks: `fixed_blocks` of the memory
        (bidirectional); query i's block for the global bias is i // k, the memory block it is aligned with."""
        tokens, count = self._with_summaries(memory, memory_blocks)
        projected_q, _ = self.q(x)
        (q,) = self._heads(projected_q, 1)
        projected_kv, _ = self.kv(tokens)
        k, v = self._heads(projected_kv, 2)
        global_keys = None
        if count:
            aligned = (torch.arange(x.shape[1], device=x.device) // memory_blocks.block)[None]
            global_keys = GlobalKeys(count, memory_blocks.block, aligned, memory_blocks.valid, global_bias)
        mask = MaskSpec(
            key_padding=memory_padding, query_padding=query_padding, window=self.config.window,
            offset_bias=offset_bias, global_keys=global_keys,
        )
        return self._attend(q, k, v, mask)
