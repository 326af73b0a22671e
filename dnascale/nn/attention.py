"""Multi-head self- and cross-attention, tensor-parallel over heads.

x -> column-parallel projections (each TP rank computes the q/k/v of heads/tp heads) -> optional per-head qk-norm
-> position hook (RoPE rotates q, k; ALiBi adds to the mask spec) -> core attention (backend chosen in
`attention_backends`) -> row-parallel output projection (all-reduce back to the replicated hidden state).

Fused projection layout: the QKV weight's output rows are ordered [head, (q, k, v), head_dim] (cross-attention's
KV weight [head, (k, v), head_dim]), so megatron's column split along dim 0 hands each rank whole heads with
their q, k and v together. HF converters must (un)interleave accordingly.
Activations are batch-first: [B, T, hidden].
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from megatron.core import tensor_parallel
from megatron.core.model_parallel_config import ModelParallelConfig
from torch import nn

from dnascale.nn.attention_backends import MaskSpec, check_backend, core_attention
from dnascale.nn.norms import HeadSharedNorm
from dnascale.nn.positions import build_attention_positions
from dnascale.nn.tp import InitMethod, divide
from dnascale.parallel import model_parallel_rng


@dataclass
class AttentionConfig:
    hidden: int
    heads: int
    head_dim: int | None = None  # default hidden // heads
    bias: bool = True
    position: str = "none"  # attention-side position kind: "rope" | "alibi" | "learned"/"none" (no-op here)
    rope_base: float = 10000.0
    qk_norm: str | None = None  # None | "rmsnorm" | "layernorm", over head_dim, shared by heads
    qk_norm_eps: float = 1e-6
    dropout: float = 0.0  # on attention probabilities
    causal: bool = False
    window: int | None = None  # local attention radius r: |i - j| <= r
    softmax_scale: float | None = None  # None: 1/sqrt(head_dim); T5 uses 1.0
    backend: str = "auto"
    kv_hidden: int | None = None  # cross-attention only: width of the attended memory (default hidden)

    @property
    def dim_per_head(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden // self.heads

    @property
    def inner(self) -> int:
        return self.heads * self.dim_per_head


class _HeadParallelAttention(nn.Module):
    """What self- and cross-attention share: head bookkeeping, qk-norm, core attention and the output projection."""

    def __init__(self, config: AttentionConfig, mp_config: ModelParallelConfig, output_init_method: InitMethod):
        super().__init__()
        check_backend(config.backend)
        self.config = config
        self.local_heads = divide(config.heads, mp_config.tensor_model_parallel_size, "attention heads over TP")
        self.head_dim = config.dim_per_head
        self.q_norm = self.k_norm = None
        if config.qk_norm is not None:
            self.q_norm = HeadSharedNorm(config.qk_norm, self.head_dim, config.qk_norm_eps)
            self.k_norm = HeadSharedNorm(config.qk_norm, self.head_dim, config.qk_norm_eps)
        self.out = tensor_parallel.RowParallelLinear(
            config.inner, config.hidden, config=mp_config, init_method=output_init_method, bias=config.bias,
            input_is_parallel=True, skip_bias_add=False,
        )

    def _heads(self, projected: torch.Tensor, parts: int) -> tuple[torch.Tensor, ...]:
        """[B, T, local_heads * parts * head_dim] -> `parts` tensors [B, local_heads, T, head_dim]."""
        batch, length, _ = projected.shape
        split = projected.view(batch, length, self.local_heads, parts, self.head_dim)
        return tuple(t.transpose(1, 2) for t in split.unbind(dim=3))

    def _normalize_qk(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.q_norm is None:
            return q, k
        return self.q_norm(q), self.k_norm(k)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: MaskSpec) -> torch.Tensor:
        dropout_p = self.config.dropout if self.training else 0.0
        # Heads differ per TP rank, so their dropout masks must come from this rank's own stream.
        rng = model_parallel_rng() if dropout_p > 0.0 else contextlib.nullcontext()
        with rng:
            attended = core_attention(
                q, k, v, mask, backend=self.config.backend, scale=self.config.softmax_scale, dropout_p=dropout_p
            )
        batch, _, length, _ = attended.shape
        merged = attended.transpose(1, 2).reshape(batch, length, self.local_heads * self.head_dim)
        out, _ = self.out(merged)
        return out


class SelfAttention(_HeadParallelAttention):
    def __init__(
        self,
        config: AttentionConfig,
        mp_config: ModelParallelConfig,
        init_method: InitMethod,
        output_init_method: InitMethod,
    ) -> None:
        super().__init__(config, mp_config, output_init_method)
        self.qkv = tensor_parallel.ColumnParallelLinear(
            config.hidden, 3 * config.inner, config=mp_config, init_method=init_method, bias=config.bias,
            gather_output=False,
        )
        self.positions = build_attention_positions(
            config.position, head_dim=self.head_dim, total_heads=config.heads, rope_base=config.rope_base
        )

    def forward(
        self,
        x: torch.Tensor,
        key_padding: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x [B, T, hidden]; key_padding [B, T] bool (True = real token); positions [T] or [B, T];
        bias: additive scores for this rank's heads, broadcastable to [B, local_heads, T, T]."""
        qkv, _ = self.qkv(x)
        q, k, v = self._heads(qkv, 3)
        q, k = self._normalize_qk(q, k)  # before the rotation, as the models that use both do
        mask = MaskSpec(
            key_padding=key_padding, query_padding=key_padding, causal=self.config.causal,
            window=self.config.window, bias=bias,
        )
        q, k, mask = self.positions(q, k, mask, positions)
        return self._attend(q, k, v, mask)


class CrossAttention(_HeadParallelAttention):
    """Queries from x, keys and values from a memory (e.g. encoder states); no position hook."""

    def __init__(
        self,
        config: AttentionConfig,
        mp_config: ModelParallelConfig,
        init_method: InitMethod,
        output_init_method: InitMethod,
    ) -> None:
        super().__init__(config, mp_config, output_init_method)
        kv_hidden = config.kv_hidden if config.kv_hidden is not None else config.hidden
        self.q = tensor_parallel.ColumnParallelLinear(
            config.hidden, config.inner, config=mp_config, init_method=init_method, bias=config.bias,
            gather_output=False,
        )
        self.kv = tensor_parallel.ColumnParallelLinear(
            kv_hidden, 2 * config.inner, config=mp_config, init_method=init_method, bias=config.bias,
            gather_output=False,
        )

    def forward(
        self,
        x: torch.Tensor,
        memory: torch.Tensor,
        memory_padding: torch.Tensor | None = None,
        query_padding: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x [B, Tq, hidden]; memory [B, Tk, kv_hidden]; memory_padding [B, Tk] bool (True = real)."""
        projected_q, _ = self.q(x)
        (q,) = self._heads(projected_q, 1)
        projected_kv, _ = self.kv(memory)
        k, v = self._heads(projected_kv, 2)
        q, k = self._normalize_qk(q, k)
        mask = MaskSpec(
            key_padding=memory_padding, query_padding=query_padding, causal=self.config.causal,
            window=self.config.window, bias=bias,
        )
        return self._attend(q, k, v, mask)
