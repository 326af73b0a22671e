"""One Transformer block: attention and MLP sub-layers, each wrapped in a residual with a norm.

Norm placement is chosen by name:
- "pre" (default; pre-LN Transformers, T5):  x = x + drop(attn(norm1(x)));  x = x + drop(mlp(norm2(x)))
- "post" (original BERT, DNABERT-2/DNAZEN):  x = norm1(x + drop(attn(x)));  x = norm2(x + drop(mlp(x)))
The residual stream is replicated over TP ranks; hidden dropout draws from the default generator, which is
seeded alike on the ranks of a TP group, so the replicas stay identical.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core.model_parallel_config import ModelParallelConfig
from torch import nn

from dnascale.nn.attention import AttentionConfig, SelfAttention
from dnascale.nn.mlp import MLP, MLPConfig
from dnascale.nn.norms import build_norm
from dnascale.nn.tp import InitMethod

NORM_PLACEMENTS: tuple[str, ...] = ("pre", "post")


@dataclass
class BlockConfig:
    attention: AttentionConfig
    mlp: MLPConfig
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    hidden_dropout: float = 0.0
    norm_placement: str = "pre"


class TransformerBlock(nn.Module):
    def __init__(
        self, config: BlockConfig, mp_config: ModelParallelConfig, init_method: InitMethod,
        output_init_method: InitMethod,
    ) -> None:
        super().__init__()
        if config.norm_placement not in NORM_PLACEMENTS:
            raise ValueError(f"unknown norm_placement {config.norm_placement!r}; choose one of {NORM_PLACEMENTS}")
        self.pre_norm = config.norm_placement == "pre"
        hidden = config.attention.hidden
        self.attn_norm = build_norm(config.norm, hidden, config.norm_eps)
        self.attention = SelfAttention(config.attention, mp_config, init_method, output_init_method)
        self.mlp_norm = build_norm(config.norm, hidden, config.norm_eps)
        self.mlp = MLP(config.mlp, mp_config, init_method, output_init_method)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(
        self,
        x: torch.Tensor,
        key_padding: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        attention_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.pre_norm:
            x = x + self.dropout(self.attention(self.attn_norm(x), key_padding, positions, attention_bias))
            return x + self.dropout(self.mlp(self.mlp_norm(x)))
        x = self.attn_norm(x + self.dropout(self.attention(x, key_padding, positions, attention_bias)))
        return self.mlp_norm(x + self.dropout(self.mlp(x)))
