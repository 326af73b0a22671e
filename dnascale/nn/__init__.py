"""Tensor-parallel building blocks on megatron-core layers, shared by every model family.

One idea per module: `tp` (megatron config, init, weight layouts), `norms`, `mlp`, `positions`, `embeddings`,
`attention_backends` (core attention and the one place its backend is chosen), `attention`, `checkpointing`,
`block`, `stack`. Import from the modules directly; this package re-exports the main names.
"""

from dnascale.nn.attention import AttentionConfig, CrossAttention, SelfAttention
from dnascale.nn.attention_backends import BACKEND_CHOICES, MaskSpec, core_attention
from dnascale.nn.block import BlockConfig, TransformerBlock
from dnascale.nn.embeddings import TokenEmbedding, padded_vocab_size
from dnascale.nn.mlp import ACTIVATIONS, MLP, MLPConfig
from dnascale.nn.norms import NORMS, build_norm
from dnascale.nn.positions import POSITION_KINDS, alibi_slopes
from dnascale.nn.stack import TransformerStack
from dnascale.nn.tp import megatron_config

__all__ = [
    "ACTIVATIONS", "BACKEND_CHOICES", "NORMS", "POSITION_KINDS", "AttentionConfig", "BlockConfig", "CrossAttention",
    "MLP", "MLPConfig", "MaskSpec", "SelfAttention", "TokenEmbedding", "TransformerBlock", "TransformerStack",
    "alibi_slopes", "build_norm", "core_attention", "megatron_config", "padded_vocab_size",
]
