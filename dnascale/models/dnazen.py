"""DNAZEN: a BPE token encoder (E4BU, the DNABERT-2 architecture) fused layer by layer with a G-gram encoder
(Mao, Tian, Song, arXiv 2505.02206; docs/architecture.md, "DNAZEN").

    BPE ids  -> word + token-type embedding -> LayerNorm -> dropout -> h(0)
    G-gram ids (matched per sample) -> G-gram + token-type embedding -> LayerNorm -> dropout -> mu(0)
    for l = 1..L:  h~(l) = E4BULayer_l(h(l-1))            post-LN, ALiBi, GeGLU FFN
                   if l <= L_g: mu(l) = GLayer_l(mu(l-1))  post-LN BERT layer, GELU FFN, no positions
                                h(l) = h~(l) + M mu(l)      v*_i = v_i + sum_j m_ij mu_j (unnormalised, ungated)
                   else:        h(l) = h~(l)
    -> MLM head (dense, GELU, LayerNorm, decoder tied to the word embedding + bias), scored at targets only

M is the token x G-gram matching matrix. It arrives as (batch, token, row) triplets from the collator
(dnascale.data.ggram_masking) and is turned once per forward into the two CSRs of `GGramMatching`, which every
fusion layer reuses. The fusion runs through `fuse`, the one place its backend is chosen (`fusion_backend`):
"auto"/"cpu"/"cuda"/"reference" go through dnascale.ops.ggram_fusion (the csrc scatter-add kernel, or its pure-
torch reference), "dense" is DNAZEN's own formulation h + bmm(M, mu) over the dense [B, N, M] matrix, built once
per forward (kept for the benchmark and as the equivalence check).

Tensor parallelism: both encoders are megatron TP stacks; the fusion acts on the replicated residual stream after
the row-parallel all-reduce, so every TP rank fuses identically (spec §7). ZeRO-3: every parameter is created in
__init__ and used inside its own module's forward (the tied decoder weight is read through the embedding module,
as in the encoder baseline).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from dnascale.errors import ConfigError
from dnascale.models.heads import MLMHead, MLMOutput, masked_lm_loss
from dnascale.nn.attention import AttentionConfig
from dnascale.nn.attention_backends import BACKEND_CHOICES
from dnascale.nn.block import BlockConfig, TransformerBlock
from dnascale.nn.checkpointing import checkpoint
from dnascale.nn.embeddings import TokenEmbedding, padded_vocab_size
from dnascale.nn.mlp import ACTIVATIONS, MLPConfig
from dnascale.nn.tp import InitMethod, megatron_config, normal_init, require_tp_size, scaled_normal_init
from dnascale.ops.extensions import BACKEND_CHOICES as OP_BACKEND_CHOICES
from dnascale.ops.ggram_fusion import GGramMatching, ggram_fusion, ggram_fusion_dense

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "dnazen"
DNAZEN_TOKENIZER = str(ASSETS / "tokenizer")  # BPE 4096 (DNABERT-2 layout) trained on the bundled genomes
BUNDLED_GGRAM_VOCAB = str(ASSETS / "ggram_vocab.tsv.gz")  # PMI vocabulary of the bundled genomes
FUSION_BACKENDS: tuple[str, ...] = (*OP_BACKEND_CHOICES, "dense")
MASKING_MODES = ("budget", "expand")


@dataclass
class DnazenConfig:
    vocab_size: int = 4096  # BPE ids (DNABERT-2: [UNK] [CLS] [SEP] [PAD] [MASK] + pieces)
    ggram_vocab_size: int = 162_709  # G-gram embedding rows: the vocabulary (162,708 released) + padding id 0
    hidden: int = 768
    layers: int = 12  # E4BU layers
    heads: int = 12
    ffn_hidden: int = 3072
    ggram_layers: int = 6  # L_g: G-gram encoder layers, fused into E4BU layers 1..L_g
    ggram_heads: int = 12
    ggram_ffn_hidden: int = 3072
    activation: str = "geglu"  # E4BU FFN (DNABERT-2 GeGLU, exact GELU)
    ggram_activation: str = "gelu"  # G-gram encoder FFN (BERT)
    type_vocab_size: int = 2  # token-type rows (only type 0 is used; kept for DNABERT-2 weight parity)
    max_seq_len: int = 512  # tokens per sequence, [CLS] and [SEP] included
    window_bases: int = 2000  # bases per pretraining window (BPE: ~4-5 bases/token, so ~400-500 tokens)
    max_ggrams: int = 30  # G-gram rows per sequence (first by position)
    dropout: float = 0.1  # embeddings and residual branches, both encoders
    attention_dropout: float = 0.0  # 0 in pretraining (spec §2)
    norm_eps: float = 1e-12
    init_std: float = 0.02
    attention_backend: str = "auto"
    fusion_backend: str = "auto"  # auto | cpu | cuda | reference | dense (see the module docstring)
    activation_checkpointing: bool = False
    tp: int = 1
    vocab_pad_multiple: int = 128  # both embedding tables are padded to a multiple of this (spec §7)
    # Pretraining objective (read by the recipe's collator).
    mask_rate: float = 0.15
    masking: str = "budget"  # "budget": rate stays at mask_rate; "expand": the release rule (rate grows)
    ggram_vocab: str = "bundled"  # a vocabulary file from tools/build_ggram_vocab.py, or "bundled"

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def padded_vocab_size(self) -> int:
        return padded_vocab_size(self.vocab_size, self.vocab_pad_multiple)

    @property
    def padded_ggram_vocab_size(self) -> int:
        return padded_vocab_size(self.ggram_vocab_size, self.vocab_pad_multiple)

    @property
    def ggram_vocab_path(self) -> str:
        return BUNDLED_GGRAM_VOCAB if self.ggram_vocab == "bundled" else self.ggram_vocab

    def validate(self) -> None:
        """Raise ConfigError naming the first bad field and what it allows."""
        for name in ("vocab_size", "ggram_vocab_size", "hidden", "layers", "heads", "ffn_hidden", "ggram_heads",
                     "ggram_ffn_hidden", "type_vocab_size", "window_bases", "max_ggrams", "tp",
                     "vocab_pad_multiple"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)}: must be >= 1")
        if not 0 <= self.ggram_layers <= self.layers:
            raise ConfigError(f"ggram_layers={self.ggram_layers}: must be in [0, layers={self.layers}] "
                              "(the G-gram encoder fuses into E4BU layers 1..ggram_layers)")
        if self.max_seq_len < 3:
            raise ConfigError(f"max_seq_len={self.max_seq_len}: must be >= 3 ([CLS], a token, [SEP])")
        for name in ("dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name}={getattr(self, name)}: must be in [0, 1)")
        if not 0.0 < self.mask_rate < 1.0:
            raise ConfigError(f"mask_rate={self.mask_rate}: must be in (0, 1)")
        for name in ("norm_eps", "init_std"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}={getattr(self, name)}: must be > 0")
        choices = {
            "activation": tuple(ACTIVATIONS),
            "ggram_activation": tuple(ACTIVATIONS),
            "attention_backend": BACKEND_CHOICES,
            "fusion_backend": FUSION_BACKENDS,
            "masking": MASKING_MODES,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name}={getattr(self, name)!r}: choose one of {list(allowed)}")
        for hidden_name, heads_name, ffn_name in (("hidden", "heads", "ffn_hidden"),
                                                  ("hidden", "ggram_heads", "ggram_ffn_hidden")):
            heads = getattr(self, heads_name)
            if self.hidden % heads:
                raise ConfigError(f"hidden={self.hidden} must be divisible by {heads_name}={heads}")
            if heads % self.tp:
                raise ConfigError(f"{heads_name}={heads} must be divisible by tp={self.tp} (heads are split over TP)")
            if getattr(self, ffn_name) % self.tp:
                raise ConfigError(f"{ffn_name}={getattr(self, ffn_name)} must be divisible by tp={self.tp}")
        if self.vocab_pad_multiple % self.tp:
            raise ConfigError(f"vocab_pad_multiple={self.vocab_pad_multiple} must be divisible by tp={self.tp} "
                              "(vocabulary rows are split over TP ranks)")
        if not self.ggram_vocab:
            raise ConfigError("ggram_vocab: give a vocabulary file from tools/build_ggram_vocab.py or 'bundled'")

    def _block(self, *, heads: int, ffn: int, activation: str, position: str) -> BlockConfig:
        return BlockConfig(
            attention=AttentionConfig(hidden=self.hidden, heads=heads, position=position,
                                      dropout=self.attention_dropout, backend=self.attention_backend),
            mlp=MLPConfig(hidden=self.hidden, ffn_hidden=ffn, activation=activation),
            norm="layernorm",
            norm_eps=self.norm_eps,
            hidden_dropout=self.dropout,
            norm_placement="post",
        )

    def token_block(self) -> BlockConfig:
        return self._block(heads=self.heads, ffn=self.ffn_hidden, activation=self.activation, position="alibi")

    def ggram_block(self) -> BlockConfig:
        return self._block(heads=self.ggram_heads, ffn=self.ggram_ffn_hidden, activation=self.ggram_activation,
                           position="none")


class DnazenEmbeddings(nn.Module):
    """Vocab-parallel word table + a replicated token-type table (type 0 only) -> LayerNorm -> dropout."""

    def __init__(self, vocab_size: int, config: DnazenConfig, mp_config, init: InitMethod) -> None:
        super().__init__()
        self.word = TokenEmbedding(vocab_size, config.hidden, config.vocab_pad_multiple, mp_config, init)
        self.token_type = nn.Parameter(torch.empty(config.type_vocab_size, config.hidden))
        with torch.no_grad():
            init(self.token_type)
        self.norm = nn.LayerNorm(config.hidden, eps=config.norm_eps)
        self.dropout = nn.Dropout(config.dropout)

    @property
    def weight(self) -> torch.Tensor:
        return self.word.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.norm(self.word(ids) + self.token_type[0]))


def fuse(h: torch.Tensor, g: torch.Tensor, matching: GGramMatching, backend: str,
         dense: torch.Tensor | None = None) -> torch.Tensor:
    """h + M g: the one place the fusion backend is chosen ("dense" multiplies the prebuilt matrix `dense`)."""
    if backend == "dense":
        return ggram_fusion_dense(h, g, dense if dense is not None else matching)
    return ggram_fusion(h, g, matching, backend=backend)


class DnazenForMLM(nn.Module):
    def __init__(self, config: DnazenConfig) -> None:
        super().__init__()
        config.validate()
        require_tp_size(config.tp)
        self.config = config
        mp_config = megatron_config(config.tp)
        init = normal_init(config.init_std)
        output_init = scaled_normal_init(config.init_std, config.layers)
        ggram_output_init = scaled_normal_init(config.init_std, max(config.ggram_layers, 1))
        self.embeddings = DnazenEmbeddings(config.vocab_size, config, mp_config, init)
        self.layers = nn.ModuleList(
            TransformerBlock(config.token_block(), mp_config, init, output_init) for _ in range(config.layers)
        )
        self.ggram_embeddings = DnazenEmbeddings(config.ggram_vocab_size, config, mp_config, init)
        self.ggram_layers = nn.ModuleList(
            TransformerBlock(config.ggram_block(), mp_config, init, ggram_output_init)
            for _ in range(config.ggram_layers)
        )
        self.head = MLMHead(config.hidden, config.vocab_size, config.padded_vocab_size, "layernorm", config.norm_eps,
                            init)

    def _layer(self, layer: nn.Module, x: torch.Tensor, padding: torch.Tensor | None) -> torch.Tensor:
        if self.config.activation_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(layer, x, padding)
        return layer(x, padding)

    def encode(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        ggram_ids: torch.Tensor | None = None,
        ggram_triplets: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final token states [B, T, hidden] (replicated over TP ranks); padded positions are don't-care.
        Without G-grams (ggram_ids None) this is the plain E4BU encoder."""
        batch, length = input_ids.shape
        if length > self.config.max_seq_len:
            raise ValueError(f"sequence length {length} exceeds max_seq_len={self.config.max_seq_len}")
        padding = None if attention_mask is None else attention_mask.to(torch.bool)
        hidden = self.embeddings(input_ids)
        mu = matching = dense = ggram_padding = None
        if ggram_ids is not None and self.config.ggram_layers:
            if ggram_triplets is None:
                raise ValueError("ggram_ids need ggram_triplets (the token x G-gram matching)")
            if ggram_ids.shape[0] != batch:
                raise ValueError(f"ggram_ids has {ggram_ids.shape[0]} rows for a batch of {batch}")
            ggram_padding = ggram_ids != 0
            mu = self.ggram_embeddings(ggram_ids)
            matching = GGramMatching.from_triplets(ggram_triplets, batch, length, ggram_ids.shape[1],
                                                   token_valid=padding, ggram_valid=ggram_padding)
            if self.config.fusion_backend == "dense":
                dense = matching.dense(torch.promote_types(hidden.dtype, torch.float32))
        for index, layer in enumerate(self.layers):
            hidden = self._layer(layer, hidden, padding)
            if mu is not None and index < self.config.ggram_layers:
                mu = self._layer(self.ggram_layers[index], mu, ggram_padding)
                hidden = fuse(hidden, mu, matching, self.config.fusion_backend, dense)
        return hidden

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        ggram_ids: torch.Tensor | None = None,
        ggram_triplets: torch.Tensor | None = None,
        masked_fraction: torch.Tensor | None = None,
        truncated: torch.Tensor | None = None,
        return_logits: bool = False,
    ) -> MLMOutput:
        """input_ids [B, T]; attention_mask [B, T] bool; labels [B, T] (-100 = not scored); ggram_ids [B, M]
        (0 = padding); ggram_triplets [K, 3] (batch, token, G-gram row); masked_fraction / truncated [B]: the
        collator's per-sample masking rate and cut flags, reported as metrics."""
        hidden = self.encode(input_ids, attention_mask, ggram_ids, ggram_triplets)
        loss, num_targets, full_logits = masked_lm_loss(
            self.head, hidden, self.embeddings.weight, labels, self.config.vocab_size, return_logits
        )
        metrics = {}
        if ggram_ids is not None:
            metrics["ggrams_per_seq"] = float((ggram_ids != 0).sum(dim=1).float().mean())
        if masked_fraction is not None:
            metrics["mask_rate"] = float(masked_fraction.float().mean())
        if truncated is not None:
            metrics["truncated"] = float(truncated.float().mean())
        return MLMOutput(loss=loss, num_targets=num_targets, logits=full_logits, metrics=metrics or None)


# ---- sizes and FLOPs ----------------------------------------------------------------------------------------


def _block_parameters(hidden: int, heads: int, ffn: int, activation: str) -> int:
    attention = 4 * hidden * hidden + 4 * hidden  # fused QKV + output projection, with biases
    up = 2 if ACTIVATIONS[activation].gated else 1
    mlp = up * (hidden * ffn + ffn) + ffn * hidden + hidden
    return attention + mlp + 2 * 2 * hidden  # two post-LayerNorms


def count_parameters(config: DnazenConfig) -> dict[str, int]:
    """Analytic parameter count (all TP ranks together): token embedding, G-gram embedding, E4BU layers,
    G-gram layers, MLM head (dense, norm, decoder bias; the decoder weight is the tied word table), total."""
    h = config.hidden
    embedding_extra = config.type_vocab_size * h + 2 * h  # token-type rows + embedding LayerNorm
    parts = {
        "token_embedding": config.padded_vocab_size * h + embedding_extra,
        "ggram_embedding": config.padded_ggram_vocab_size * h + embedding_extra,
        "token_layers": config.layers * _block_parameters(h, config.heads, config.ffn_hidden, config.activation),
        "ggram_layers": config.ggram_layers * _block_parameters(h, config.ggram_heads, config.ggram_ffn_hidden,
                                                                config.ggram_activation),
        "head": h * h + h + 2 * h + config.padded_vocab_size,
    }
    parts["total"] = sum(parts.values())
    parts["non_embedding"] = parts["token_layers"] + parts["ggram_layers"] + parts["head"]
    return parts


def flops_per_token(config: DnazenConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward = 3 x forward), the encoder's convention extended to the
    G-gram encoder. `seq_len` is the data window in bases; it is converted to tokens (~`max_seq_len`).

        6 * (N_token_layers + N_head) + 12 * L * d * T                       token encoder
      + (m / T) * (6 * N_ggram_layers + 12 * L_g * d * m)                    G-gram encoder, m = max_ggrams rows
    The fusion (a gather-add of ~T x G-grams-per-token rows of d per layer) and the embeddings are not matmuls.
    """
    del seq_len  # BPE windows fill max_seq_len tokens (window_bases is chosen so)
    n = count_parameters(config)
    tokens, rows = config.max_seq_len, min(config.max_ggrams, config.max_seq_len)
    inner = config.heads * config.head_dim
    token = 6 * (n["token_layers"] + n["head"]) + 12 * config.layers * inner * tokens
    ggram = (rows / tokens) * (6 * n["ggram_layers"] + 12 * config.ggram_layers * config.hidden * rows)
    return float(token + ggram)


# ---- recipe parts (registered in dnascale/models/registry.py) ---------------------------------------------------


def build(config: DnazenConfig, parallel=None) -> DnazenForMLM:
    if parallel is not None and parallel.tp_size != config.tp:
        raise ConfigError(f"tp={config.tp} in the model config but the run was started with tp={parallel.tp_size}")
    return DnazenForMLM(config)


def make_collator(config: DnazenConfig, tokenizer, seed: int):
    """Whole-G-gram masking + matching of the corrupted input (dnascale.data.ggram_masking)."""
    from dnascale.data.ggram import GGramVocab
    from dnascale.data.ggram_masking import GGramMLMCollator, WholeGGramMasking

    vocab = GGramVocab.load(config.ggram_vocab_path)
    if vocab.num_embeddings > config.ggram_vocab_size:
        raise ConfigError(f"{config.ggram_vocab_path} holds {len(vocab)} G-grams but ggram_vocab_size="
                          f"{config.ggram_vocab_size} rows (need >= {vocab.num_embeddings}: + padding id 0)")
    return GGramMLMCollator(tokenizer, vocab, seed=seed, policy=WholeGGramMasking(config.mask_rate, config.masking),
                            max_length=config.max_seq_len, max_ggrams=config.max_ggrams)


def data_window(config: DnazenConfig) -> int:
    """Bases per training window (tokens vary with BPE; the collator cuts a rare overlong window)."""
    return config.window_bases


__all__ = [
    "BUNDLED_GGRAM_VOCAB", "DNAZEN_TOKENIZER", "DnazenConfig", "DnazenEmbeddings", "DnazenForMLM",
    "FUSION_BACKENDS", "build", "count_parameters", "data_window", "flops_per_token", "fuse", "make_collator",
]
