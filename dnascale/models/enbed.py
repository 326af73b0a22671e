"""ENBED: a byte-level encoder-decoder over nucleotides with local and block-global attention (arXiv 2311.02333).

    corrupted bases + </s> --shared embedding--> encoder: N x [sliding-window self-attention, gated-GELU FFN]
    <pad> + original bases --shared embedding--> decoder: M x [causal local + block-global self-attention,
                                                               cross-attention to the encoder, gated-GELU FFN]
    -> untied LM head (vocab-parallel) -> cross-entropy against original bases + </s>

T5 v1.1 conventions throughout (docs/architecture.md, "ENBED"): pre-norm RMSNorm (scale only, eps 1e-6) before every
sub-layer plus a final one per stack, no biases, attention logits not divided by sqrt(d_kv) (the initialisation
absorbs it), gated-GELU(tanh) FFN, dropout on embeddings/residual branches/stack outputs, untied LM head, no
absolute positions: T5 relative-position buckets, one table per attention stack shared by its layers (plus one
block-distance table for the global summaries).

Encoder layer l uses radius 64 for l < 3 and 128 after (the paper); the decoder uses radius 128 plus causal
global summaries of complete 16-base blocks. Self-attention goes through `core_attention` with an offset bias and
global keys (`blocked` on CPU: linear memory with autograd; `flex` on CUDA).

Cross-attention, `cross_attention="local_global"` (default): decoder position i attends to encoder positions
|j - i| <= 128 (a relative-position table of its own) and to the encoder's 16-base block summaries (whole-sequence
view, block-distance table), in one softmax; linear in length like the rest. The aligned position starts with a
learnable bias of +`cross_alignment_prior` (about half the attention mass at initialisation): T5's position-free
full cross-attention has to discover by content where position i of the input is, which a demo-length run does
not achieve (docs/architecture.md, ENBED). `"full"` keeps T5's dense cross-attention (any lengths; memory still
linear through sdpa's flash kernel on CPU, compute quadratic). All relative tables are stored divided by
`relative_bias_scale` (10) and multiplied back in forward: under AdamW this gives them a 10x learning rate, about
the step size T5's Adafactor gave them, without which a scalar bias needs thousands of steps to sharpen.

The pretraining objective (`EnbedCollator` builds the batch): 15% of the bases are selected; 80% of those become
the mask sentinel 383, 10% a random base, 10% stay. The decoder is teacher-forced on the original sequence
(shifted right behind the start id 0) and predicts the original bases and </s>. The loss is the cross-entropy at
the selected positions plus `copy_weight` x that at the other positions, divided by the number of selected
positions: with copy_weight 0 (the default) it is exactly the MLM loss in nats per masked base.

ZeRO-3 ready like the encoder: every parameter is created and initialised in __init__ (shape-dependent inits run
on the full master weight, before megatron slices it), and every parameter is used through its module's call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from megatron.core import tensor_parallel
from torch import nn

from dnascale.errors import ConfigError
from dnascale.models.heads import gather_logits, mlm_loss
from dnascale.nn.attention import AttentionConfig, CrossAttention
from dnascale.nn.attention_backends import BACKEND_CHOICES
from dnascale.nn.checkpointing import checkpoint
from dnascale.nn.embeddings import TokenEmbedding, padded_vocab_size
from dnascale.nn.global_attention import (
    LocalGlobalAttentionConfig,
    LocalGlobalCrossAttention,
    LocalGlobalSelfAttention,
    fixed_blocks,
)
from dnascale.nn.mlp import ACTIVATIONS, MLP, MLPConfig
from dnascale.nn.relative_bias import RelativePositionBias
from dnascale.nn.tp import InitMethod, megatron_config, normal_init, require_tp_size, tp_rank_and_size

IGNORE_INDEX = -100
ENBED_TOKENIZER = "nucleotide-byte"  # ByT5 ids: <pad>=0 </s>=1 <unk>=2, A=68 C=70 G=74 T=87 N=81, mask 383
DECODER_START_ID = 0  # T5: the decoder starts from <pad>
CROSS_ATTENTION_KINDS = ("local_global", "full")


@dataclass
class EnbedConfig:
    vocab_size: int = 384
    hidden: int = 768  # d_model
    ffn_hidden: int = 2048  # d_ff
    heads: int = 12
    head_dim: int = 64  # d_kv
    encoder_layers: int = 8
    decoder_layers: int = 4
    encoder_window: int = 128  # local radius r of encoder layers >= encoder_early_layers
    encoder_early_window: int = 64  # r of the first encoder_early_layers layers
    encoder_early_layers: int = 3
    decoder_window: int = 128
    global_block: int = 16  # k: positions per global summary
    decoder_global: bool = True  # causal block summaries in decoder self-attention (the paper)
    encoder_global: bool = False  # LongT5-TGlobal summaries in the encoder too (off: the paper's encoder is local)
    cross_attention: str = "local_global"  # "local_global": aligned window + encoder block summaries; "full": T5
    cross_window: int = 128  # local radius of "local_global" cross-attention
    cross_alignment_prior: float = 6.0  # initial extra bias at offset 0 of aligned cross-attention (learnable)
    # T5 buckets. Off: no position bias at all, which lets flash-attn serve the local layers on CUDA (on CPU then
    # name attention_backend: blocked for long inputs, since "auto" routes plain windows to dense sdpa).
    relative_bias: bool = True
    relative_buckets: int = 32
    relative_max_distance: int = 128
    relative_bias_scale: float = 10.0  # tables stored / scale and used x scale: x10 LR for them under AdamW
    max_seq_len: int = 16384  # encoder (and decoder) length in tokens, </s> included
    dropout: float = 0.1
    norm_eps: float = 1e-6
    init_factor: float = 1.0  # T5's initializer_factor
    activation: str = "geglu_tanh"
    attention_backend: str = "auto"  # self-attention; see dnascale.nn.attention_backends
    cross_attention_backend: str = "auto"
    activation_checkpointing: bool = False
    tp: int = 1
    vocab_pad_multiple: int = 128  # 384 rows stay 384 (divisible by tp 1, 2, 4, 8)
    # Pretraining objective (read by the recipe's collator and by the loss).
    mask_rate: float = 0.15  # fraction of bases selected
    mask_token_fraction: float = 0.8  # of the selected: -> mask sentinel
    random_token_fraction: float = 0.1  # of the selected: -> random base (the rest stay unchanged)
    copy_weight: float = 0.0  # loss weight of the unselected positions (reconstruction by copying)

    @property
    def inner(self) -> int:
        return self.heads * self.head_dim

    @property
    def padded_vocab_size(self) -> int:
        return padded_vocab_size(self.vocab_size, self.vocab_pad_multiple)

    def encoder_windows(self) -> list[int]:
        return [self.encoder_early_window if layer < self.encoder_early_layers else self.encoder_window
                for layer in range(self.encoder_layers)]

    def validate(self) -> None:
        """Raise ConfigError naming the first bad field and what it allows."""
        for name in ("vocab_size", "hidden", "ffn_hidden", "heads", "head_dim", "encoder_layers", "decoder_layers",
                     "encoder_window", "encoder_early_window", "decoder_window", "cross_window", "global_block",
                     "relative_buckets", "relative_max_distance", "tp", "vocab_pad_multiple"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)}: must be >= 1")
        if self.encoder_early_layers < 0:
            raise ConfigError(f"encoder_early_layers={self.encoder_early_layers}: must be >= 0")
        if self.max_seq_len < 2:
            raise ConfigError(f"max_seq_len={self.max_seq_len}: must be >= 2 (at least one base and </s>)")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout={self.dropout}: must be in [0, 1)")
        for name in ("mask_token_fraction", "random_token_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{name}={getattr(self, name)}: must be in [0, 1]")
        if not 0.0 < self.mask_rate < 1.0:
            raise ConfigError(f"mask_rate={self.mask_rate}: must be in (0, 1)")
        if self.mask_token_fraction + self.random_token_fraction > 1.0:
            raise ConfigError("mask_token_fraction + random_token_fraction must be <= 1 (the rest stay unchanged)")
        for name in ("norm_eps", "init_factor", "relative_bias_scale"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}={getattr(self, name)}: must be > 0")
        if self.copy_weight < 0:
            raise ConfigError(f"copy_weight={self.copy_weight}: must be >= 0")
        if self.relative_buckets % 2:
            raise ConfigError(f"relative_buckets={self.relative_buckets}: must be even (half per direction)")
        for name in ("attention_backend", "cross_attention_backend"):
            if getattr(self, name) not in BACKEND_CHOICES:
                raise ConfigError(f"{name}={getattr(self, name)!r}: choose one of {list(BACKEND_CHOICES)}")
        if self.cross_attention not in CROSS_ATTENTION_KINDS:
            raise ConfigError(f"cross_attention={self.cross_attention!r}: choose one of {list(CROSS_ATTENTION_KINDS)}")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"activation={self.activation!r}: choose one of {sorted(ACTIVATIONS)}")
        if self.decoder_global and self.global_block > self.decoder_window:
            raise ConfigError(
                f"global_block={self.global_block} must be <= decoder_window={self.decoder_window}: the causal "
                f"decoder sees its unfinished block only through the local window"
            )
        for name in ("heads", "ffn_hidden", "vocab_pad_multiple"):
            if getattr(self, name) % self.tp:
                raise ConfigError(f"{name}={getattr(self, name)} must be divisible by tp={self.tp}")


def _normal(std: float) -> InitMethod:
    return normal_init(std)


def _t5_qkv_init(config: EnbedConfig) -> InitMethod:
    """Fused [head, (q, k, v), head_dim] rows: k, v ~ N(0, d^-1/2); q additionally x d_kv^-1/2 (T5 absorbs the
    attention scale into q's initialisation)."""
    std = config.init_factor * config.hidden**-0.5

    def init(weight: torch.Tensor) -> torch.Tensor:
        torch.nn.init.normal_(weight, mean=0.0, std=std)
        with torch.no_grad():
            weight.view(config.heads, 3, config.head_dim, -1)[:, 0].mul_(config.head_dim**-0.5)
        return weight

    return init


def _t5_cross_init(config: EnbedConfig) -> InitMethod:
    """CrossAttention calls one init on its q weight [inner, d] and its kv weight [2 inner, d]: tell them apart
    by their row count."""
    q_std = config.init_factor * (config.hidden * config.head_dim) ** -0.5
    kv_std = config.init_factor * config.hidden**-0.5

    def init(weight: torch.Tensor) -> torch.Tensor:
        std = q_std if weight.shape[0] == config.inner else kv_std
        return torch.nn.init.normal_(weight, mean=0.0, std=std)

    return init


class EnbedOutput(NamedTuple):
    """loss: (CE at selected + copy_weight x CE elsewhere) / num_targets (a NamedTuple so ZeRO-3 finds tensors).
    num_targets: selected (MLM) positions, or all target positions when no mlm_mask is given.
    mlm_loss / copy_loss: detached mean CE at the selected / other scored positions (None when there are none).
    logits: [B, T, vocab_size] decoder logits, only on request.
    metrics: floats the training loop logs (averaged over micro-batches and ranks): mlm_loss, plus copy_loss when
    copy_weight > 0 (the same keys on every rank, 0.0 when a batch has no such position)."""

    loss: torch.Tensor
    num_targets: int
    logits: torch.Tensor | None = None
    mlm_loss: torch.Tensor | None = None
    copy_loss: torch.Tensor | None = None
    metrics: dict[str, float] | None = None


class _FeedForward(nn.Module):
    def __init__(self, config: EnbedConfig, mp_config) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(config.hidden, eps=config.norm_eps)
        self.mlp = MLP(
            MLPConfig(config.hidden, config.ffn_hidden, config.activation, bias=False), mp_config,
            _normal(config.init_factor * config.hidden**-0.5), _normal(config.init_factor * config.ffn_hidden**-0.5),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.norm(x))


def _self_attention(config: EnbedConfig, mp_config, window: int, causal: bool, use_global: bool):
    attention = LocalGlobalAttentionConfig(
        hidden=config.hidden, heads=config.heads, head_dim=config.head_dim, window=window, causal=causal,
        global_block=config.global_block if use_global else 0, norm_eps=config.norm_eps, softmax_scale=1.0,
        backend=config.attention_backend,
    )
    output_init = _normal(config.init_factor * config.inner**-0.5)
    return LocalGlobalSelfAttention(attention, mp_config, _t5_qkv_init(config), output_init)


class EncoderLayer(nn.Module):
    def __init__(self, config: EnbedConfig, mp_config, window: int) -> None:
        super().__init__()
        self.window = window
        self.attn_norm = nn.RMSNorm(config.hidden, eps=config.norm_eps)
        self.attention = _self_attention(config, mp_config, window, causal=False, use_global=config.encoder_global)
        self.ffn = _FeedForward(config, mp_config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, padding, offset_bias, blocks, global_bias):
        x = x + self.dropout(self.attention(self.attn_norm(x), padding, offset_bias, blocks, global_bias))
        return x + self.dropout(self.ffn(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: EnbedConfig, mp_config) -> None:
        super().__init__()
        self.window = config.decoder_window
        self.attn_norm = nn.RMSNorm(config.hidden, eps=config.norm_eps)
        self.attention = _self_attention(config, mp_config, config.decoder_window, causal=True,
                                         use_global=config.decoder_global)
        self.cross_norm = nn.RMSNorm(config.hidden, eps=config.norm_eps)
        output_init = _normal(config.init_factor * config.inner**-0.5)
        if config.cross_attention == "full":
            self.cross = CrossAttention(
                AttentionConfig(hidden=config.hidden, heads=config.heads, head_dim=config.head_dim, bias=False,
                                softmax_scale=1.0, backend=config.cross_attention_backend),
                mp_config, _t5_cross_init(config), output_init,
            )
        else:
            self.cross = LocalGlobalCrossAttention(
                LocalGlobalAttentionConfig(
                    hidden=config.hidden, heads=config.heads, head_dim=config.head_dim, window=config.cross_window,
                    global_block=config.global_block, norm_eps=config.norm_eps, softmax_scale=1.0,
                    backend=config.cross_attention_backend,
                ),
                mp_config, _t5_cross_init(config), _t5_cross_init(config), output_init,
            )
        self.ffn = _FeedForward(config, mp_config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, padding, offset_bias, blocks, global_bias, memory, memory_padding, cross_offset_bias,
                memory_blocks, cross_global_bias):
        x = x + self.dropout(self.attention(self.attn_norm(x), padding, offset_bias, blocks, global_bias))
        if isinstance(self.cross, LocalGlobalCrossAttention):
            crossed = self.cross(self.cross_norm(x), memory, memory_padding, padding, cross_offset_bias,
                                 memory_blocks, cross_global_bias)
        else:
            crossed = self.cross(self.cross_norm(x), memory, memory_padding, padding)
        x = x + self.dropout(crossed)
        return x + self.dropout(self.ffn(x))


class _Stack(nn.Module):
    """Layers + the stack's shared relative-position tables + final norm and dropout (T5's T5Stack)."""

    def __init__(self, config: EnbedConfig, layers: list[nn.Module], causal: bool, use_global: bool) -> None:
        super().__init__()
        self.config = config
        self.causal = causal
        self.use_global = use_global
        self.layers = nn.ModuleList(layers)
        table_init = _normal(config.init_factor * config.hidden**-0.5)
        tables = dict(bidirectional=not causal, num_buckets=config.relative_buckets,
                      max_distance=config.relative_max_distance, init_method=table_init,
                      scale=config.relative_bias_scale)
        self.relative_bias = RelativePositionBias(config.heads, **tables) if config.relative_bias else None
        # gamma: bias by block distance j - b(i) for the global summaries (LongT5's side bias).
        self.global_bias = (RelativePositionBias(config.heads, **tables)
                            if config.relative_bias and use_global else None)
        self.final_norm = nn.RMSNorm(config.hidden, eps=config.norm_eps)
        self.dropout = nn.Dropout(config.dropout)

    def _run(self, x: torch.Tensor, padding: torch.Tensor | None, *extra) -> torch.Tensor:
        length = x.shape[1]
        offset_bias: dict[int, torch.Tensor | None] = {}
        for window in sorted({layer.window for layer in self.layers}):
            offset_bias[window] = (None if self.relative_bias is None else
                                   self.relative_bias(torch.arange(-window, window + 1, device=x.device)))
        blocks = global_bias = None
        if self.use_global:
            blocks = fixed_blocks(length, self.config.global_block, padding, causal=self.causal, device=x.device)
            if self.global_bias is not None and blocks.count:
                global_bias = self.global_bias(torch.arange(-blocks.count, blocks.count + 1, device=x.device))
        recompute = self.config.activation_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.layers:
            args = (x, padding, offset_bias[layer.window], blocks, global_bias, *extra)
            x = checkpoint(layer, *args) if recompute else layer(*args)
        return self.dropout(self.final_norm(x))


class EnbedEncoder(_Stack):
    def __init__(self, config: EnbedConfig, mp_config) -> None:
        layers = [EncoderLayer(config, mp_config, window) for window in config.encoder_windows()]
        super().__init__(config, layers, causal=False, use_global=config.encoder_global)

    def forward(self, embedded: torch.Tensor, padding: torch.Tensor | None = None) -> torch.Tensor:
        return self._run(embedded, padding)


class EnbedDecoder(_Stack):
    def __init__(self, config: EnbedConfig, mp_config) -> None:
        layers = [DecoderLayer(config, mp_config) for _ in range(config.decoder_layers)]
        super().__init__(config, layers, causal=True, use_global=config.decoder_global)
        aligned = config.cross_attention == "local_global"
        tables = dict(bidirectional=True, num_buckets=config.relative_buckets,
                      max_distance=config.relative_max_distance, scale=config.relative_bias_scale)
        table_init = _normal(config.init_factor * config.hidden**-0.5)

        def aligned_init(table: torch.Tensor) -> torch.Tensor:
            table_init(table)
            table[0] += config.cross_alignment_prior  # bucket 0 is offset 0: the aligned encoder position
            return table

        # The cross-attention's own tables (by offset j - i, and by block distance to the aligned block).
        self.cross_relative_bias = (RelativePositionBias(config.heads, init_method=aligned_init, **tables)
                                    if config.relative_bias and aligned else None)
        self.cross_global_bias = (RelativePositionBias(config.heads, init_method=table_init, **tables)
                                  if config.relative_bias and aligned else None)

    def forward(self, embedded, padding, memory, memory_padding) -> torch.Tensor:
        cross_offset_bias = memory_blocks = cross_global_bias = None
        if self.config.cross_attention == "local_global":
            window = self.config.cross_window
            if self.cross_relative_bias is not None:
                cross_offset_bias = self.cross_relative_bias(torch.arange(-window, window + 1, device=memory.device))
            memory_blocks = fixed_blocks(memory.shape[1], self.config.global_block, memory_padding, causal=False,
                                         device=memory.device)
            if self.cross_global_bias is not None and memory_blocks.count:
                count = memory_blocks.count
                cross_global_bias = self.cross_global_bias(torch.arange(-count, count + 1, device=memory.device))
        return self._run(embedded, padding, memory, memory_padding, cross_offset_bias, memory_blocks,
                         cross_global_bias)


def _check_tp(config: EnbedConfig) -> None:
    config.validate()
    require_tp_size(config.tp)


def shift_right(labels: torch.Tensor, start_id: int = DECODER_START_ID) -> torch.Tensor:
    """Decoder inputs for teacher forcing: [start, y_0, ..., y_{n-2}], ignored labels read as <pad> (T5)."""
    shifted = labels.new_full(labels.shape, start_id)
    shifted[:, 1:] = labels[:, :-1]
    return shifted.masked_fill(shifted == IGNORE_INDEX, DECODER_START_ID)


class EnbedForPretraining(nn.Module):
    def __init__(self, config: EnbedConfig) -> None:
        super().__init__()
        _check_tp(config)
        self.config = config
        mp_config = megatron_config(config.tp)
        self.embeddings = TokenEmbedding(  # shared by encoder and decoder inputs (T5 `shared`)
            config.vocab_size, config.hidden, config.vocab_pad_multiple, mp_config, _normal(config.init_factor)
        )
        self.embedding_dropout = nn.Dropout(config.dropout)
        self.encoder = EnbedEncoder(config, mp_config)
        self.decoder = EnbedDecoder(config, mp_config)
        # Untied, vocab-parallel: logits stay split over TP ranks into vocab_parallel_cross_entropy.
        self.lm_head = tensor_parallel.ColumnParallelLinear(
            config.hidden, config.padded_vocab_size, config=mp_config,
            init_method=_normal(config.init_factor * config.hidden**-0.5), bias=False, gather_output=False,
        )
        tp_rank, tp_size = tp_rank_and_size()
        self.vocab_start = tp_rank * (config.padded_vocab_size // tp_size)

    def _check_length(self, length: int) -> None:
        if length > self.config.max_seq_len:
            raise ValueError(f"sequence length {length} exceeds max_seq_len={self.config.max_seq_len}")

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Final encoder states [B, T, hidden] (replicated over TP ranks); sequence classification mean-pools them
        (dnascale.finetune.classifier, the one classification path of every family)."""
        self._check_length(input_ids.shape[1])
        padding = None if attention_mask is None else attention_mask.to(torch.bool)
        return self.encoder(self.embedding_dropout(self.embeddings(input_ids)), padding)

    def decode(self, decoder_input_ids, decoder_padding, memory, memory_padding) -> torch.Tensor:
        self._check_length(decoder_input_ids.shape[1])
        embedded = self.embedding_dropout(self.embeddings(decoder_input_ids))
        return self.decoder(embedded, decoder_padding, memory, memory_padding)

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., H] -> vocab-parallel logits [..., padded_vocab / tp]; padding rows pushed to -inf-ish."""
        logits, _ = self.lm_head(hidden)
        if self.config.padded_vocab_size > self.config.vocab_size:
            ids = torch.arange(self.vocab_start, self.vocab_start + logits.shape[-1], device=logits.device)
            logits = logits.masked_fill(ids >= self.config.vocab_size, torch.finfo(logits.dtype).min)
        return logits

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        mlm_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        return_logits: bool = False,
    ) -> EnbedOutput:
        """input_ids [B, T] (corrupted, with </s>); attention_mask [B, T] bool; labels [B, T'] the decoder
        targets (-100 = none), from which the teacher-forced decoder inputs are derived unless given;
        mlm_mask [B, T'] bool: the selected (MLM) positions (None: every target counts with weight 1);
        decoder_attention_mask [B, T'] bool, optional (right padding needs none)."""
        if labels is None and decoder_input_ids is None:
            raise ValueError("ENBED needs labels (targets, teacher-forced) or decoder_input_ids")
        encoder_padding = None if attention_mask is None else attention_mask.to(torch.bool)
        memory = self.encode(input_ids, encoder_padding)
        if decoder_input_ids is None:
            decoder_input_ids = shift_right(labels)
        if labels is None:
            labels = torch.full_like(decoder_input_ids, IGNORE_INDEX)
        # Right padding needs no decoder mask: causality already hides it from every real position (T5).
        decoder_padding = None if decoder_attention_mask is None else decoder_attention_mask.to(torch.bool)
        hidden = self.decode(decoder_input_ids, decoder_padding, memory, encoder_padding)

        targets = labels != IGNORE_INDEX
        if mlm_mask is None:
            selected = targets
            weights = targets.to(hidden.dtype)
        else:
            selected = mlm_mask.to(torch.bool) & targets
            weights = torch.where(selected, 1.0, self.config.copy_weight) * targets
        num_targets = int(selected.sum())
        scored = weights > 0
        per_position = mlm_loss(self.lm_logits(hidden[scored]), labels[scored])
        # An empty selection still yields a 0 attached to the graph, so backward runs on every rank alike.
        loss = (per_position * weights[scored].float()).sum() / max(num_targets, 1)
        with torch.no_grad():
            is_mlm = selected[scored]
            mlm = per_position[is_mlm].mean() if is_mlm.any() else None
            copy = per_position[~is_mlm].mean() if (~is_mlm).any() else None
        logits = gather_logits(self.lm_logits(hidden), self.config.vocab_size) if return_logits else None
        metrics = {"mlm_loss": 0.0 if mlm is None else float(mlm)}
        if self.config.copy_weight > 0:
            metrics["copy_loss"] = 0.0 if copy is None else float(copy)
        return EnbedOutput(loss=loss, num_targets=num_targets, logits=logits, mlm_loss=mlm, copy_loss=copy,
                           metrics=metrics)


def count_parameters(config: EnbedConfig) -> dict[str, int]:
    """Analytic parameter count of EnbedForPretraining (all TP ranks together).

    embedding: the shared token table; non_embedding: everything else (layers, relative-position tables, final
    norms and the untied LM head).
    """
    d, f, inner = config.hidden, config.ffn_hidden, config.inner
    up = 2 if ACTIVATIONS[config.activation].gated else 1
    ffn = up * d * f + f * d + d  # projections + its pre-norm
    attention = 4 * d * inner + d  # qkv + out + pre-norm
    encoder_layer = attention + ffn + (d if config.encoder_global else 0)
    aligned = config.cross_attention == "local_global"
    cross = 4 * d * inner + d + (d if aligned else 0)  # q, kv, out, pre-norm (+ the summaries' norm)
    decoder_layer = attention + (d if config.decoder_global else 0) + cross + ffn
    table = config.relative_buckets * config.heads
    tables = 0
    if config.relative_bias:
        tables = table * (2 + int(config.encoder_global) + int(config.decoder_global) + 2 * int(aligned))
    embedding = config.padded_vocab_size * d
    head = config.padded_vocab_size * d
    non_embedding = (config.encoder_layers * encoder_layer + config.decoder_layers * decoder_layer + tables
                     + 2 * d + head)
    return {"embedding": embedding, "non_embedding": non_embedding, "total": embedding + non_embedding}


def flops_per_token(config: EnbedConfig, seq_len: int) -> float:
    """Training FLOPs (forward + backward = 3 x forward) per encoder token; the decoder runs over as many tokens.

        6 * N_matmul  +  6 * 2 * inner * (keys attended per query, summed over the attention layers)

    N_matmul: the layers' projection weights, plus the LM head weighted by the share of positions scored
    (mask_rate with copy_weight 0, all otherwise). Keys per query: 2r+1 (encoder window), r+1 (causal window),
    T/k global summaries (half visible on average when causal), 2r+1 + T/k for aligned cross-attention, T
    for full cross-attention. The scores and the
    weighted sum are 2 * inner multiply-adds per key, i.e. 4 * inner FLOPs forward, x3 for training.
    Embedding lookups, norms, softmax and activations are left out (PaLM convention).
    """
    d, f, inner = config.hidden, config.ffn_hidden, config.inner
    up = 2 if ACTIVATIONS[config.activation].gated else 1
    ffn = (up + 1) * d * f
    matmul = config.encoder_layers * (4 * d * inner + ffn) + config.decoder_layers * (8 * d * inner + ffn)
    scored = config.mask_rate if config.copy_weight == 0 else 1.0
    matmul += scored * config.padded_vocab_size * d
    globals_ = seq_len / config.global_block
    keys = sum(2 * r + 1 + (globals_ if config.encoder_global else 0) for r in config.encoder_windows())
    cross = (2 * config.cross_window + 1 + globals_) if config.cross_attention == "local_global" else seq_len
    keys += config.decoder_layers * (config.decoder_window + 1 + (globals_ / 2 if config.decoder_global else 0)
                                     + cross)
    return float(6 * matmul + 12 * inner * keys)


# ---- recipe parts (registered in dnascale/models/registry.py) ---------------------------------------------------

def build(config: EnbedConfig, parallel=None) -> EnbedForPretraining:
    """The pretraining model; `parallel` (a dnascale.parallel.ParallelState) must agree with config.tp."""
    if parallel is not None and parallel.tp_size != config.tp:
        raise ConfigError(f"tp={config.tp} in the model config but the run was started with tp={parallel.tp_size}")
    return EnbedForPretraining(config)


def make_collator(config: EnbedConfig, tokenizer, seed: int):
    """MLM corruption of the encoder input, full original sequence as decoder target (module docstring)."""
    from dnascale.data.enbed_masking import EnbedCollator

    return EnbedCollator(tokenizer, seed=seed, mask_rate=config.mask_rate,
                         mask_token_fraction=config.mask_token_fraction,
                         random_token_fraction=config.random_token_fraction, max_length=config.max_seq_len)


def data_window(config: EnbedConfig) -> int:
    """Bases per training window: one token per base, plus </s>."""
    return config.max_seq_len - 1


__all__ = [
    "DECODER_START_ID", "ENBED_TOKENIZER", "EnbedConfig", "EnbedDecoder", "EnbedEncoder",
    "EnbedForPretraining", "EnbedOutput", "build", "count_parameters",
    "data_window", "flops_per_token", "make_collator", "shift_right",
]
