"""A bidirectional Transformer encoder over nucleotide tokens with an MLM head: the fixed-tokenization baseline.

tokens -> vocab-parallel embedding (+ learned positions if chosen) -> dropout -> N Transformer blocks
(pre-norm by default) -> final norm -> MLM head tied to the embedding, evaluated only at target positions.

ZeRO-3 ready: every parameter is created in __init__, forward mutates no Python state, and the tied decoder
weight is read through the embedding module inside forward (DeepSpeed gathers such external parameters).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dnascale.errors import ConfigError
from dnascale.models.heads import MLMHead, MLMOutput, masked_lm_loss
from dnascale.nn.attention import AttentionConfig
from dnascale.nn.attention_backends import BACKEND_CHOICES
from dnascale.nn.block import NORM_PLACEMENTS, BlockConfig
from dnascale.nn.embeddings import TokenEmbedding, padded_vocab_size
from dnascale.nn.mlp import ACTIVATIONS, MLPConfig
from dnascale.nn.norms import NORMS
from dnascale.nn.positions import POSITION_KINDS, build_input_positions
from dnascale.nn.stack import TransformerStack
from dnascale.nn.tp import megatron_config, normal_init, require_tp_size, scaled_normal_init


@dataclass
class EncoderConfig:
    vocab_size: int = 16
    hidden: int = 768
    layers: int = 12
    heads: int = 12
    ffn_hidden: int = 3072
    position: str = "rope"  # "rope" | "alibi" | "learned" | "none"
    norm: str = "layernorm"  # "layernorm" | "rmsnorm"
    activation: str = "gelu"  # see dnascale.nn.mlp.ACTIVATIONS
    attention_backend: str = "auto"  # "auto" | "reference" | "sdpa" | "flex" | "flash"
    max_seq_len: int = 2048
    dropout: float = 0.1  # embeddings and residual branches
    init_std: float = 0.02
    activation_checkpointing: bool = False
    tp: int = 1
    attention_dropout: float = 0.0
    norm_eps: float = 1e-5
    norm_placement: str = "pre"  # "pre" | "post"
    bias: bool = True  # biases in the attention and MLP projections
    qk_norm: str | None = None  # None | "layernorm" | "rmsnorm"
    rope_base: float = 10000.0
    vocab_pad_multiple: int = 64  # embedding rows padded to a multiple of this (independent of tp)

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def padded_vocab_size(self) -> int:
        return padded_vocab_size(self.vocab_size, self.vocab_pad_multiple)

    def validate(self) -> None:
        """Raise ConfigError naming the first bad field and what it allows. (Field types are checked where
        configs come from outside, in dnascale.config.from_dict.)"""
        for name in ("vocab_size", "hidden", "layers", "heads", "ffn_hidden", "max_seq_len", "tp",
                     "vocab_pad_multiple"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)}: must be >= 1")
        for name in ("dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name}={getattr(self, name)}: must be in [0, 1)")
        for name in ("init_std", "norm_eps", "rope_base"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}={getattr(self, name)}: must be > 0")
        choices = {
            "position": POSITION_KINDS,
            "norm": tuple(NORMS),
            "activation": tuple(ACTIVATIONS),
            "attention_backend": BACKEND_CHOICES,
            "norm_placement": NORM_PLACEMENTS,
            "qk_norm": (None, *NORMS),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name}={getattr(self, name)!r}: choose one of {list(allowed)}")
        if self.hidden % self.heads:
            raise ConfigError(f"hidden={self.hidden} must be divisible by heads={self.heads}")
        if self.heads % self.tp:
            raise ConfigError(f"heads={self.heads} must be divisible by tp={self.tp} (heads are split over TP ranks)")
        if self.ffn_hidden % self.tp:
            raise ConfigError(f"ffn_hidden={self.ffn_hidden} must be divisible by tp={self.tp}")
        if self.vocab_pad_multiple % self.tp:
            raise ConfigError(
                f"vocab_pad_multiple={self.vocab_pad_multiple} must be divisible by tp={self.tp} "
                f"(vocabulary rows are split over TP ranks)"
            )
        if self.position == "rope" and self.head_dim % 2:
            raise ConfigError(f"position='rope' needs an even head dimension, got hidden/heads = {self.head_dim}")

    def block_config(self) -> BlockConfig:
        return BlockConfig(
            attention=AttentionConfig(
                hidden=self.hidden, heads=self.heads, bias=self.bias, position=self.position,
                rope_base=self.rope_base, qk_norm=self.qk_norm, dropout=self.attention_dropout,
                backend=self.attention_backend,
            ),
            mlp=MLPConfig(hidden=self.hidden, ffn_hidden=self.ffn_hidden, activation=self.activation, bias=self.bias),
            norm=self.norm,
            norm_eps=self.norm_eps,
            hidden_dropout=self.dropout,
            norm_placement=self.norm_placement,
        )


class EncoderForMLM(nn.Module):
    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        config.validate()
        require_tp_size(config.tp)
        self.config = config
        mp_config = megatron_config(config.tp)
        init = normal_init(config.init_std)
        output_init = scaled_normal_init(config.init_std, config.layers)
        self.embeddings = TokenEmbedding(config.vocab_size, config.hidden, config.vocab_pad_multiple, mp_config, init)
        self.input_positions = build_input_positions(
            config.position, max_seq_len=config.max_seq_len, hidden=config.hidden, init_method=init
        )
        self.embedding_dropout = nn.Dropout(config.dropout)
        self.stack = TransformerStack(
            [config.block_config() for _ in range(config.layers)], mp_config, init, output_init,
            activation_checkpointing=config.activation_checkpointing,
        )
        self.head = MLMHead(
            config.hidden, config.vocab_size, config.padded_vocab_size, config.norm, config.norm_eps, init
        )

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Final hidden states [B, T, hidden] (replicated over TP ranks); padded positions are don't-care."""
        if input_ids.shape[1] > self.config.max_seq_len:
            raise ValueError(f"sequence length {input_ids.shape[1]} exceeds max_seq_len={self.config.max_seq_len}")
        hidden = self.embeddings(input_ids)
        if self.input_positions is not None:
            hidden = self.input_positions(hidden, None)
        hidden = self.embedding_dropout(hidden)
        key_padding = None if attention_mask is None else attention_mask.to(torch.bool)
        return self.stack(hidden, key_padding)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        return_logits: bool = False,
    ) -> MLMOutput:
        """input_ids [B, T] long; attention_mask [B, T] bool (True = real token); labels [B, T] long, -100 where
        no prediction is scored. The head runs only at target positions unless logits are asked for."""
        hidden = self.encode(input_ids, attention_mask)
        loss, num_targets, full_logits = masked_lm_loss(
            self.head, hidden, self.embeddings.weight, labels, self.config.vocab_size, return_logits
        )
        return MLMOutput(loss=loss, num_targets=num_targets, logits=full_logits)


def count_parameters(config: EncoderConfig) -> dict[str, int]:
    """Analytic parameter count of EncoderForMLM (all TP ranks together): {"embedding", "non_embedding", "total"}.

    embedding: the (padded) token table, plus the learned position table if any. non_embedding: everything
    else, i.e. the blocks, the final norm and the MLM head (dense, norm, decoder bias; its decoder weight is the
    tied embedding).
    """
    h, f, layers = config.hidden, config.ffn_hidden, config.layers
    inner = config.heads * config.head_dim
    norm = 2 * h if config.norm == "layernorm" else h
    bias = 1 if config.bias else 0
    attention = 3 * h * inner + 3 * inner * bias + inner * h + h * bias
    if config.qk_norm is not None:
        attention += 2 * (2 * config.head_dim if config.qk_norm == "layernorm" else config.head_dim)
    up_projections = 2 if ACTIVATIONS[config.activation].gated else 1
    mlp = up_projections * (h * f + f * bias) + f * h + h * bias
    block = 2 * norm + attention + mlp
    final_norm = norm if config.norm_placement == "pre" else 0
    head = h * h + h + norm + config.padded_vocab_size
    embedding = config.padded_vocab_size * h + (config.max_seq_len * h if config.position == "learned" else 0)
    non_embedding = layers * block + final_norm + head
    return {"embedding": embedding, "non_embedding": non_embedding, "total": embedding + non_embedding}


def flops_per_token(config: EncoderConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward = 3 x forward), the PaLM / torchtitan convention:

        6 * N_non_embedding  +  12 * layers * (heads * head_dim) * seq_len

    6 * N: each non-embedding weight does one multiply-add (2 FLOPs) per token forward and twice that backward.
    12 * L * d * T: the two attention matmuls (q k^T and probs v), 2 * T * d multiply-adds each per token and
    layer forward, times 3. Embedding lookups cost no matmul FLOPs; the tied MLM decoder (2 * hidden * vocab per
    target, ~15% of tokens) and norms/softmax/activations are left out, as the convention does.
    """
    attention = 12 * config.layers * config.heads * config.head_dim * seq_len
    return float(6 * count_parameters(config)["non_embedding"] + attention)
