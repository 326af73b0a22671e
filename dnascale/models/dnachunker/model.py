"""DNACHUNKER: learned two-stage chunking around a RoPE Transformer trunk, trained with MLM (arXiv 2601.03019).

    bases --embedding (16 rows, tied to the head)--> level 0 (T bp)
    stage s = 1, 2:  x^ = BiMamba x stage_layers (level s-1) --Router_s--> b, p --chunk--> level s (T' then T'')
    trunk:           pre-LN RoPE Transformer over level 2, chunk s at RoPE position (first bp + last bp) / 2
    stage s = 2, 1:  dechunk (replicate, bidirectional gated smoothing, STE confidence) to level s-1
                     + (1 - kappa) W_res x^  (masked residual gating)  --> BiMamba x stage_layers
    head:            RMSNorm -> tied embedding -> vocab-parallel cross-entropy at the MLM targets
    loss = MLM + ratio_loss_weight * sum_s ratio_loss_s

Mask protection: [MASK] inputs are singleton chunks at every stage (forced boundaries at the mask and after it).
kappa_t (residual gating) = the chunk holding t contains a [MASK]; with protection it is the mask itself.

Parallelism: the trunk is megatron tensor-parallel (the shared `TransformerStack`); embedding and head are
vocab-parallel; BiMamba stages, routers and residual projections are replicated on every TP rank and see
replicated inputs, so every rank takes the same boundary decisions (docs/architecture.md, DNACHUNKER).
ZeRO-3: all parameters are created in __init__ and every one is used on every forward, whatever the chunk
counts (variable lengths change shapes, never which modules run).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from torch import nn

from dnascale.errors import ConfigError
from dnascale.models.dnachunker import chunking
from dnascale.models.dnachunker.bimamba import MIXERS, BiMambaStack, MambaConfig
from dnascale.models.dnachunker.dechunk import DechunkLayer
from dnascale.models.dnachunker.routing import ROUTER_INITS, Router, protected_boundaries, ratio_loss
from dnascale.models.dnachunker.ssm import SCAN_BACKEND_CHOICES
from dnascale.models.heads import IGNORE_INDEX, gather_logits, mlm_loss
from dnascale.nn.attention import AttentionConfig
from dnascale.nn.attention_backends import BACKEND_CHOICES
from dnascale.nn.block import BlockConfig
from dnascale.nn.embeddings import TokenEmbedding, padded_vocab_size
from dnascale.nn.mlp import ACTIVATIONS, MLPConfig
from dnascale.nn.norms import NORMS
from dnascale.nn.stack import TransformerStack
from dnascale.nn.tp import megatron_config, normal_init, require_tp_size, scaled_normal_init, tp_rank_and_size
from dnascale.ops.extensions import BACKEND_CHOICES as OP_BACKEND_CHOICES

TOKENIZER = "nucleotide-char"  # Caduceus ids: [CLS]=0 [SEP]=1 [BOS]=2 [MASK]=3 [PAD]=4 [RESERVED]=5 [UNK]=6 A..N=7..11
MASK_ID = 3


@dataclass
class DNAChunkerConfig:
    vocab_size: int = 16  # 12 live ids, 16 rows
    hidden: int = 640  # d at every level
    vocab_pad_multiple: int = 16
    max_seq_len: int = 8192  # tokens per window, [SEP] included
    # BiMamba encoder/decoder stages
    stage_layers: int = 2  # BiMamba blocks per encoder stage and per decoder stage
    mixer: str = "mamba2"  # "mamba2" (SSD, H-Net) | "mamba1" (selective scan, Caduceus)
    d_state: int | None = None  # None: 128 for mamba2, 16 for mamba1
    d_conv: int = 4
    expand: int = 2
    headdim: int = 64  # mamba2
    ngroups: int = 1  # mamba2
    dt_rank: int | None = None  # mamba1; None: ceil(hidden / 16) (40 at d = 640)
    ssm_chunk_size: int = 64  # SSD chunk and parallel-scan chunk (pure-torch paths)
    scan_backend: str = "auto"  # "auto" | "torch" | "sequential" | "mamba_ssm"
    # routing, chunking, dechunking
    ratio_targets: tuple[float, ...] = (0.33, 0.33)  # alpha per stage; its length is the number of stages
    ratio_loss_weight: float = 1.0  # lambda
    ratio_over_forced: bool = False  # count protected (forced) positions in F and G (the older code) or not
    mask_protection: bool = True
    residual_gating: bool = True
    router_init: str = "identity"  # "identity" (H-Net) | "normal"
    routing_backend: str = "auto"  # the csrc op's backend: "auto" | "reference" | "cpu" | "cuda"
    smoothing_eps: float = 1e-4
    # main network (shared RoPE Transformer trunk)
    trunk_layers: int = 30
    heads: int = 10
    ffn_hidden: int = 2560
    rope_base: float = 10000.0
    qk_norm: str | None = None  # None | "rmsnorm" | "layernorm" (the older code used per-head RMSNorm)
    trunk_bias: bool = False
    norm: str = "layernorm"  # trunk norms; BiMamba blocks and the head use RMSNorm
    activation: str = "gelu"
    attention_backend: str = "auto"
    attention_dropout: float = 0.0
    dropout: float = 0.0  # trunk residual branches
    activation_checkpointing: bool = False  # trunk blocks
    init_std: float = 0.02
    norm_eps: float = 1e-5
    tp: int = 1

    @property
    def stages(self) -> int:
        return len(self.ratio_targets)

    @property
    def state_size(self) -> int:
        if self.d_state is not None:
            return self.d_state
        return 128 if self.mixer == "mamba2" else 16

    @property
    def padded_vocab_size(self) -> int:
        return padded_vocab_size(self.vocab_size, self.vocab_pad_multiple)

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def mamba_config(self) -> MambaConfig:
        return MambaConfig(
            hidden=self.hidden, mixer=self.mixer, d_state=self.state_size, d_conv=self.d_conv, expand=self.expand,
            headdim=self.headdim, ngroups=self.ngroups, dt_rank=self.dt_rank, chunk_size=self.ssm_chunk_size,
            scan_backend=self.scan_backend, norm_eps=self.norm_eps, init_std=self.init_std,
            output_init_std=self.init_std / math.sqrt(2.0 * 2 * self.stages * self.stage_layers),
        )

    def block_config(self) -> BlockConfig:
        return BlockConfig(
            attention=AttentionConfig(
                hidden=self.hidden, heads=self.heads, bias=self.trunk_bias, position="rope",
                rope_base=self.rope_base, qk_norm=self.qk_norm, dropout=self.attention_dropout,
                backend=self.attention_backend,
            ),
            mlp=MLPConfig(hidden=self.hidden, ffn_hidden=self.ffn_hidden, activation=self.activation,
                          bias=self.trunk_bias),
            norm=self.norm, norm_eps=self.norm_eps, hidden_dropout=self.dropout, norm_placement="pre",
        )

    def validate(self) -> None:
        """Raise ConfigError naming the first bad field and what it allows."""
        for name in ("vocab_size", "hidden", "vocab_pad_multiple", "max_seq_len", "stage_layers", "d_conv",
                     "expand", "headdim", "ngroups", "ssm_chunk_size", "trunk_layers", "heads", "ffn_hidden", "tp"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)}: must be >= 1")
        for name in ("d_state", "dt_rank"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)}: must be >= 1 (or null for the mixer's default)")
        if not self.ratio_targets:
            raise ConfigError("ratio_targets: needs one target per stage (at least one stage)")
        for stage, target in enumerate(self.ratio_targets, start=1):
            if not 0.0 < target < 1.0:
                raise ConfigError(f"ratio_targets[{stage - 1}]={target}: stage {stage}'s target must be in (0, 1)")
        if self.ratio_loss_weight < 0:
            raise ConfigError(f"ratio_loss_weight={self.ratio_loss_weight}: must be >= 0")
        if not 0.0 < self.smoothing_eps < 0.5:
            raise ConfigError(f"smoothing_eps={self.smoothing_eps}: must be in (0, 0.5)")
        for name in ("dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name}={getattr(self, name)}: must be in [0, 1)")
        for name in ("init_std", "norm_eps", "rope_base"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}={getattr(self, name)}: must be > 0")
        choices = {
            "mixer": MIXERS, "scan_backend": SCAN_BACKEND_CHOICES, "router_init": ROUTER_INITS,
            "routing_backend": OP_BACKEND_CHOICES, "norm": tuple(NORMS), "activation": tuple(ACTIVATIONS),
            "attention_backend": BACKEND_CHOICES, "qk_norm": (None, *NORMS),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name}={getattr(self, name)!r}: choose one of {list(allowed)}")
        if self.mixer == "mamba2" and (self.expand * self.hidden) % self.headdim:
            raise ConfigError(f"headdim={self.headdim} must divide expand * hidden = {self.expand * self.hidden}")
        if self.mixer == "mamba2" and ((self.expand * self.hidden) // self.headdim) % self.ngroups:
            raise ConfigError(f"ngroups={self.ngroups} must divide the Mamba-2 heads "
                              f"({(self.expand * self.hidden) // self.headdim})")
        if self.hidden % self.heads:
            raise ConfigError(f"hidden={self.hidden} must be divisible by heads={self.heads}")
        if self.head_dim % 2:
            raise ConfigError(f"RoPE needs an even head dimension, got hidden/heads = {self.head_dim}")
        for name, value in (("heads", self.heads), ("ffn_hidden", self.ffn_hidden),
                            ("vocab_pad_multiple", self.vocab_pad_multiple)):
            if value % self.tp:
                raise ConfigError(f"{name}={value} must be divisible by tp={self.tp} (split over TP ranks)")
        if self.vocab_size <= MASK_ID:
            raise ConfigError(f"vocab_size={self.vocab_size}: the Caduceus layout needs ids up to 11")


class StageRouting(NamedTuple):
    """What stage s decided (tensors detached), at the resolution it routed (level s-1) and mapped to bp."""

    boundary: torch.Tensor  # [B, L_{s-1}] bool: a chunk of level s starts here
    prob: torch.Tensor  # [B, L_{s-1}] float32: boundary probability
    num_chunks: torch.Tensor  # [B] long: chunks of level s per sequence
    boundary_bp: torch.Tensor  # [B, T] bool: the first base pair of every chunk of level s
    chunk_start: torch.Tensor  # [B, L_s] long: first bp of each chunk of level s
    chunk_end: torch.Tensor  # [B, L_s] long: last bp (inclusive)
    chunk_padding: torch.Tensor  # [B, L_s] bool: real chunks


class DNAChunkerOutput(NamedTuple):
    """loss: MLM + lambda * ratio losses (what is optimised); num_targets: MLM targets in the batch; logits: [B, T,
    vocab_size] on request; metrics: Python floats the training loop averages and logs (`mlm_loss`, and per stage s
    `ratio_loss_s{s}`, `compression_s{s}` = chunks / positions, `free_compression_s{s}` = the same over positions
    the router decided (not forced by protection), `boundary_prob_s{s}`, `chunks_s{s}` = chunks per sequence, plus
    `bp_per_trunk_token`); routing: one StageRouting per stage on request. A NamedTuple so that ZeRO-3's output
    hooks can walk it (see dnascale.models.heads.MLMOutput)."""

    loss: torch.Tensor
    num_targets: int
    logits: torch.Tensor | None = None
    metrics: dict | None = None
    routing: tuple | None = None


class ResidualProjection(nn.Module):
    """W_res (d x d, bias-free), zero at init as in H-Net: the decoder starts from the dechunked trunk output."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(hidden, hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class TiedLMHead(nn.Module):
    """Final RMSNorm, then logits from this rank's rows of the tied embedding (vocab-parallel, no bias)."""

    def __init__(self, hidden: int, vocab_size: int, padded_vocab: int, eps: float) -> None:
        super().__init__()
        tp_rank, tp_size = tp_rank_and_size()
        self.vocab_size = vocab_size
        self.vocab_start = tp_rank * (padded_vocab // tp_size)
        self.norm = nn.RMSNorm(hidden, eps=eps)

    def forward(self, hidden: torch.Tensor, decoder_weight: torch.Tensor) -> torch.Tensor:
        normed = self.norm(hidden)
        if tp_rank_and_size()[1] > 1:  # identity forward; backward sums the vocabulary slices' input gradients
            normed = tensor_parallel.copy_to_tensor_model_parallel_region(normed)
        logits = F.linear(normed, decoder_weight)
        ids = torch.arange(self.vocab_start, self.vocab_start + logits.shape[-1], device=logits.device)
        return logits.masked_fill(ids >= self.vocab_size, torch.finfo(logits.dtype).min)


def _fixed_positions(level: chunking.ChunkedSequence, force: torch.Tensor | None) -> torch.Tensor:
    """Positions whose boundary the router does not decide: each sequence's first real position and forced ones."""
    first = level.padding & ~F.pad(level.padding[:, :-1], (1, 0), value=False)
    return first if force is None else first | force


class DNAChunkerForMLM(nn.Module):
    def __init__(self, config: DNAChunkerConfig) -> None:
        super().__init__()
        config.validate()
        require_tp_size(config.tp)
        self.config = config
        mp_config = megatron_config(config.tp)
        init = normal_init(config.init_std)
        self.embeddings = TokenEmbedding(config.vocab_size, config.hidden, config.vocab_pad_multiple, mp_config, init)
        mamba = config.mamba_config()
        stages = range(config.stages)
        self.encoders = nn.ModuleList(BiMambaStack(mamba, config.stage_layers, final_norm=True) for _ in stages)
        self.routers = nn.ModuleList(
            Router(config.hidden, config.router_init, config.init_std, config.routing_backend) for _ in stages
        )
        self.trunk = TransformerStack(
            [config.block_config() for _ in range(config.trunk_layers)], mp_config, init,
            scaled_normal_init(config.init_std, config.trunk_layers),
            activation_checkpointing=config.activation_checkpointing,
        )
        self.chunk_layer = chunking.ChunkLayer()
        self.dechunk_layer = DechunkLayer(config.smoothing_eps, config.ssm_chunk_size)
        self.residuals = nn.ModuleList(ResidualProjection(config.hidden) for _ in stages)
        # decoders[s] restores level s; the bp-level one leaves its normalisation to the head.
        self.decoders = nn.ModuleList(BiMambaStack(mamba, config.stage_layers, final_norm=s > 0) for s in stages)
        self.head = TiedLMHead(config.hidden, config.vocab_size, config.padded_vocab_size, config.norm_eps)

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        """(base-level output states [B, T, d] before the head's norm, the levels [ChunkedSequence] from bases to
        trunk tokens, each stage's routing [BoundaryOutput], each stage's positions not decided by its router)."""
        config = self.config
        if input_ids.shape[1] > config.max_seq_len:
            raise ValueError(f"sequence length {input_ids.shape[1]} exceeds max_seq_len={config.max_seq_len}")
        padding = (torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None
                   else attention_mask.to(torch.bool))
        masked = (input_ids == MASK_ID) & padding
        levels = [chunking.base_level(self.embeddings(input_ids), padding, masked)]
        encoded, routings, fixed = [], [], []
        for stage in range(config.stages):
            level = levels[-1]
            x = self.encoders[stage](level.hidden, level.padding)
            force = protected_boundaries(level.masked) if config.mask_protection else None
            routing = self.routers[stage](x, force, level.padding)
            encoded.append(x)
            routings.append(routing)
            fixed.append(_fixed_positions(level, force))
            levels.append(self.chunk_layer(level, x, routing))

        top = levels[-1]
        y = self.trunk(top.hidden, key_padding=top.padding, positions=top.centre)

        for stage in reversed(range(config.stages)):
            level, routing = levels[stage], routings[stage]
            y = self.dechunk_layer(y, routing, level.padding)
            residual = self.residuals[stage](encoded[stage])
            if config.residual_gating:
                kappa = chunking.chunk_contains_mask(levels[stage + 1], routing)
                residual = residual * (~kappa).to(residual.dtype)[..., None]
            y = self.decoders[stage](y + residual, level.padding)
        return y, levels, routings, fixed

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Base-level final states [B, T, d] for sequence classification: after dechunking and the bp-level decoder,
        through the head's final RMSNorm (the base-level decoder has no norm of its own), without the tied
        projection. The spec's fine-tuning protocol mean-pools these bp-level states (docs/architecture.md)."""
        hidden, _, _, _ = self.hidden_states(input_ids, attention_mask)
        return self.head.norm(hidden)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        return_logits: bool = False,
        return_routing: bool = False,
    ) -> DNAChunkerOutput:
        """input_ids [B, T] long (right-padded); attention_mask [B, T] bool (True = real); labels [B, T] long,
        -100 where nothing is predicted. The head runs only at target positions unless logits are asked for."""
        config = self.config
        hidden, levels, routings, fixed = self.hidden_states(input_ids, attention_mask)
        decoder_weight = self.embeddings.weight
        if labels is None:
            labels = torch.full_like(input_ids, IGNORE_INDEX)
        targets = labels != IGNORE_INDEX
        num_targets = int(targets.sum())
        if return_logits:
            logits = self.head(hidden, decoder_weight)
            per_target = mlm_loss(logits[targets], labels[targets])
            full_logits = gather_logits(logits, config.vocab_size)
        else:
            per_target = mlm_loss(self.head(hidden[targets], decoder_weight), labels[targets])
            full_logits = None
        mlm = per_target.sum() / max(num_targets, 1)  # an empty selection still backpropagates (a zero)

        ratio_terms = []
        metrics = {"mlm_loss": float(mlm.detach())}
        for stage, (routing, target) in enumerate(zip(routings, config.ratio_targets)):
            level, free = levels[stage], levels[stage].padding & ~fixed[stage]
            counted = level.padding if config.ratio_over_forced else free
            term = ratio_loss(routing.boundary, routing.prob, counted, target)
            ratio_terms.append(term)
            metrics.update(_stage_metrics(stage + 1, routing, level.padding, free, term))
        loss = mlm + config.ratio_loss_weight * torch.stack(ratio_terms).sum()
        metrics["bp_per_trunk_token"] = float(levels[0].padding.sum()) / max(float(levels[-1].padding.sum()), 1.0)
        routing_out = _routing_outputs(levels, routings) if return_routing else None
        return DNAChunkerOutput(loss=loss, num_targets=num_targets, logits=full_logits, metrics=metrics,
                                routing=routing_out)


def _stage_metrics(stage: int, routing, padding: torch.Tensor, free: torch.Tensor, term: torch.Tensor) -> dict:
    boundary = routing.boundary
    real = float(padding.sum())
    free_count = float(free.sum())
    return {
        f"ratio_loss_s{stage}": float(term.detach()),
        f"compression_s{stage}": float((boundary & padding).sum()) / max(real, 1.0),
        f"free_compression_s{stage}": float((boundary & free).sum()) / free_count if free_count else float("nan"),
        f"boundary_prob_s{stage}": float((routing.prob.detach().float() * padding).sum()) / max(real, 1.0),
        f"chunks_s{stage}": float(routing.num_chunks.float().mean()),
    }


def _routing_outputs(levels, routings) -> tuple[StageRouting, ...]:
    base = levels[0].padding
    outputs = []
    for stage, routing in enumerate(routings):
        coarse = levels[stage + 1]
        starts = torch.where(coarse.padding, coarse.start, torch.zeros_like(coarse.start))
        hits = torch.zeros(base.shape, dtype=torch.long, device=base.device)
        hits.scatter_add_(1, starts, coarse.padding.long())
        boundary_bp = (hits > 0) & base
        outputs.append(StageRouting(
            boundary=routing.boundary.detach(), prob=routing.prob.detach().float(),
            num_chunks=routing.num_chunks.detach(), boundary_bp=boundary_bp,
            chunk_start=coarse.start.detach(), chunk_end=coarse.end.detach(), chunk_padding=coarse.padding.detach(),
        ))
    return tuple(outputs)


# ---------------------------------------------------------------------------------------------------------------
# Sizes and FLOPs (analytic; tests check them against the built modules)


def _mamba_block_parameters(config: DNAChunkerConfig) -> int:
    m = config.mamba_config()
    inner, state = m.inner, m.d_state
    if m.mixer == "mamba2":
        direction = m.conv_channels * (m.d_conv + 1) + 3 * m.heads + inner  # conv, dt_bias/A_log/D, gated norm
    else:
        # conv, x_proj, dt_proj (weight and bias), A_log, D
        direction = (inner * (m.d_conv + 1) + (m.rank + 2 * state) * inner + inner * m.rank + inner
                     + inner * state + inner)
    return config.hidden + m.in_proj_size * config.hidden + config.hidden * inner + 2 * direction


def _trunk_layer_parameters(config: DNAChunkerConfig) -> int:
    h, f = config.hidden, config.ffn_hidden
    bias = 1 if config.trunk_bias else 0
    norm = 2 * h if config.norm == "layernorm" else h
    attention = 4 * h * h + 4 * h * bias
    if config.qk_norm is not None:
        attention += 2 * (2 * config.head_dim if config.qk_norm == "layernorm" else config.head_dim)
    mlp = (2 if ACTIVATIONS[config.activation].gated else 1) * (h * f + f * bias) + f * h + h * bias
    return 2 * norm + attention + mlp


def count_parameters(config: DNAChunkerConfig) -> dict[str, int]:
    """Parameters of DNAChunkerForMLM (all TP ranks together), by part, plus "total"."""
    h, stages, per_stage = config.hidden, config.stages, config.stage_layers
    block = _mamba_block_parameters(config)
    trunk_norm = 2 * h if config.norm == "layernorm" else h
    parts = {
        "embedding": config.padded_vocab_size * h,
        "encoders": stages * (per_stage * block + h),
        "routers": stages * 2 * h * h,
        "trunk": config.trunk_layers * _trunk_layer_parameters(config) + trunk_norm,
        "residuals": stages * h * h,
        "decoders": stages * per_stage * block + (stages - 1) * h,
        "head": h,
    }
    parts["total"] = sum(parts.values())
    return parts


def flops_per_token(config: DNAChunkerConfig, seq_len: int) -> float:
    """Training FLOPs per base pair (forward + backward), the 6N + attention convention of the encoder recipe,
    with each part weighted by the fraction of positions it runs on at the target compression: stage s's encoder,
    router, residual projection and decoder run on prod_{r < s} alpha_r of the bases, the trunk (and its
    attention over T'' = prod alpha x seq_len chunks) on prod alpha. During MLM pretraining protected [MASK]
    singletons make the trunk longer than that. SSM scans, gathers and smoothing scans are not counted."""
    h = config.hidden
    block = _mamba_block_parameters(config)
    per_stage = 2 * config.stage_layers * block + 3 * h * h  # encoder + decoder blocks, router, residual
    fraction, weighted = 1.0, 0.0
    for target in config.ratio_targets:
        weighted += fraction * per_stage
        fraction *= target
    trunk_tokens = fraction * seq_len
    weighted += fraction * config.trunk_layers * _trunk_layer_parameters(config)
    attention = 12 * config.trunk_layers * h * trunk_tokens * fraction
    return float(6 * weighted + attention)


# ---------------------------------------------------------------------------------------------------------------
# Recipe hooks (dnascale.models.registry)


def build(config: DNAChunkerConfig, parallel=None) -> DNAChunkerForMLM:
    if parallel is not None and parallel.tp_size != config.tp:
        raise ConfigError(f"tp={config.tp} in the model config but the run was started with tp={parallel.tp_size}")
    return DNAChunkerForMLM(config)


def make_collator(config: DNAChunkerConfig, tokenizer, seed: int):
    from dnascale.data.chunker_masking import ChunkerMLMCollator

    return ChunkerMLMCollator(tokenizer, seed=seed, max_length=config.max_seq_len)


def data_window(config: DNAChunkerConfig) -> int:
    """Bases per window: max_seq_len minus the template's [SEP]."""
    return config.max_seq_len - 1
