"""Per-family structure for the memory model: pipeline units (layers) with their activations and TP traffic,
the non-layer ("outer") activations, and which parameter names belong to which unit.

One function per recipe turns a model config + layout into a `ModelShape`, from the config's own fields (the same
BlockConfig the model is built from, where the family has one). Counts are per sequence of the layout's
`seq_len` positions and per tensor-parallel rank; `dnascale.scaling.activations` has the per-position formulas.
Tokens everywhere are the model's input positions: bases for encoder, ENBED and DNACHUNKER, BPE tokens for DNAZEN.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable

from dnascale.data.masking import TokenMasking
from dnascale.errors import ConfigError
from dnascale.nn.mlp import ACTIVATIONS
from dnascale.scaling.activations import (
    STAT_BYTES,
    AttentionShape,
    BiMambaShape,
    Footprint,
    MLPShape,
    attention_footprint,
    bimamba_footprint,
    mlp_footprint,
    norm_bytes,
    transformer_block_footprint,
)
from dnascale.scaling.layout import Layout
from dnascale.scaling.param_census import UnitKey, UnitPattern


@dataclass(frozen=True)
class Activations:
    """What one unit (or the outer parts) of the model costs for one sequence, on one rank."""

    saved: float = 0.0  # bytes kept for backward
    transient: float = 0.0  # bytes of the backward working set
    fixed: float = 0.0  # bytes per micro-batch, whatever its size
    checkpoint_input: float = 0.0  # bytes kept instead of `saved` when checkpointed
    checkpointed: bool = False
    tp_forward: float = 0.0  # elements all-reduced over TP in forward (row-parallel outputs, embeddings)
    tp_backward: float = 0.0  # elements all-reduced over TP in backward (column-parallel input gradients)
    boundary: float = 0.0  # elements handed to the next pipeline stage after this unit

    def __add__(self, other: "Activations") -> "Activations":
        return Activations(
            saved=self.saved + other.saved, transient=max(self.transient, other.transient),
            fixed=self.fixed + other.fixed, checkpoint_input=self.checkpoint_input + other.checkpoint_input,
            checkpointed=self.checkpointed or other.checkpointed, tp_forward=self.tp_forward + other.tp_forward,
            tp_backward=self.tp_backward + other.tp_backward, boundary=max(self.boundary, other.boundary),
        )


def _from_footprint(footprint: Footprint, positions: float, layout: Layout, hidden: int, checkpointed: bool,
                    tp_forward: float, tp_backward: float) -> Activations:
    """A layer over `positions` positions whose residual stream is `hidden` wide; tp_* per position."""
    return Activations(
        saved=footprint.saved * positions, transient=footprint.transient * positions, fixed=footprint.fixed,
        checkpoint_input=layout.value_bytes * hidden * positions, checkpointed=checkpointed,
        tp_forward=tp_forward * positions, tp_backward=tp_backward * positions, boundary=hidden * positions,
    )


@dataclass(frozen=True)
class ModelShape:
    units: tuple[tuple[UnitKey, Activations], ...]  # forward order
    first: Activations  # outer parts on the first pipeline stage (embeddings, level glue)
    last: Activations  # outer parts on the last pipeline stage (final norm, head, loss)
    seq_len: int
    checkpointing: bool
    patterns: tuple[UnitPattern, ...]
    group_order: tuple[str, ...]
    last_stage_prefixes: tuple[str, ...]
    tied_prefixes: tuple[str, ...] = field(default=())


def _head_bytes(hidden: int, vocab_per_rank: float, norm: str, layout: Layout, dense: bool) -> float:
    """Per scored position: BERT's MLM head (dense input, GELU input, norm, decoder input) or a bare projection,
    plus the float32 softmax that vocab-parallel cross-entropy keeps."""
    v = layout.value_bytes
    kept = v * hidden  # the projection's input
    if dense:
        kept += v * hidden * 2 + norm_bytes(hidden, norm, layout)  # dense input, GELU input, norm input
    return kept + STAT_BYTES * vocab_per_rank


def _gated(activation: str) -> int:
    return 1 if ACTIVATIONS[activation].gated else 0


def encoder_shape(config: Any, layout: Layout, seq_len: int, checkpointing: bool) -> ModelShape:
    h, s, t = config.hidden, seq_len, layout.tp
    block = config.block_config()
    footprint = transformer_block_footprint(block, s, layout)
    # Row-parallel outputs (attention out, MLP out) forward; column-parallel inputs (QKV, MLP up [+ gate]) backward.
    layer = _from_footprint(footprint, s, layout, h, checkpointing, 2 * h, (2 + _gated(config.activation)) * h)
    units = tuple((("stack", index), layer) for index in range(config.layers))
    mask = layout.mask_bytes * h * s if config.dropout > 0 else 0.0
    first = Activations(saved=mask, tp_forward=h * s)  # vocab-parallel embedding all-reduce
    targets = TokenMasking().rate * s
    last_saved = norm_bytes(h, config.norm, layout) * s if config.norm_placement == "pre" else 0.0
    last_saved += targets * _head_bytes(h, config.padded_vocab_size / t, config.norm, layout, dense=True)
    last = Activations(saved=last_saved, transient=STAT_BYTES * targets * config.padded_vocab_size / t,
                       tp_backward=targets * h)
    return ModelShape(units, first, last, s, checkpointing, (UnitPattern(r"^(stack)\.layers\.(\d+)\.", "{0}"),),
                      ("stack",), ("stack.final_norm", "head."), ("embeddings.",))


def enbed_shape(config: Any, layout: Layout, seq_len: int, checkpointing: bool) -> ModelShape:
    d, s, t, v = config.hidden, seq_len, layout.tp, layout.value_bytes
    dropout = config.dropout > 0
    summaries = (s // config.global_block) / s  # block summaries per position
    mlp = MLPShape(d, config.ffn_hidden, bool(_gated(config.activation)), "rmsnorm", dropout)
    up = 1 + _gated(config.activation)
    common = dict(hidden=d, heads=config.heads, head_dim=config.head_dim, norm="rmsnorm", residual_dropout=dropout,
                  seq_len=s)
    units = []
    for index, window in enumerate(config.encoder_windows()):
        extra = summaries if config.encoder_global else 0.0
        attention = AttentionShape(keys=min(s, 2 * window + 1) + extra * s, kv_rows=1 + extra, summary_rows=extra,
                                   **common)
        footprint = attention_footprint(attention, layout) + mlp_footprint(mlp, layout)
        units.append((("encoder", index), _from_footprint(footprint, s, layout, d, checkpointing,
                                                          2 * d, (1 + extra) * d + up * d)))
    self_extra = summaries if config.decoder_global else 0.0
    # Causal local window + the complete blocks' summaries (half of them visible on average).
    decoder_self = AttentionShape(keys=min(s, config.decoder_window + 1) + self_extra * s / 2,
                                  kv_rows=1 + self_extra, summary_rows=self_extra, **common)
    if config.cross_attention == "local_global":
        cross = AttentionShape(keys=min(s, 2 * config.cross_window + 1) + summaries * s, kv_rows=1 + summaries,
                               summary_rows=summaries, cross=True, **common)
    else:
        cross = AttentionShape(keys=s, cross=True, **common)
    decoder = attention_footprint(decoder_self, layout) + attention_footprint(cross, layout) + mlp_footprint(mlp,
                                                                                                          layout)
    for index in range(config.decoder_layers):
        units.append((("decoder", index), _from_footprint(
            decoder, s, layout, d, checkpointing, 3 * d,
            (1 + self_extra) * d + d + cross.kv_rows * d + up * d)))  # QKV, cross q, cross kv, MLP up
    mask = layout.mask_bytes * d * s if dropout else 0.0
    # Embedding dropout of the encoder and decoder inputs; the encoder's final norm and output dropout; with
    # checkpointing every decoder layer's checkpoint also holds the encoder output (one tensor, kept once).
    first = Activations(saved=3 * mask + norm_bytes(d, "rmsnorm", layout) * s + (v * d * s if checkpointing else 0),
                        tp_forward=2 * d * s)
    scored = (config.mask_rate if config.copy_weight == 0 else 1.0) * s
    head = _head_bytes(d, config.padded_vocab_size / t, "rmsnorm", layout, dense=False)
    last = Activations(saved=mask + norm_bytes(d, "rmsnorm", layout) * s + scored * head,
                       transient=STAT_BYTES * scored * config.padded_vocab_size / t, tp_backward=scored * d)
    patterns = (UnitPattern(r"^(encoder)\.layers\.(\d+)\.", "{0}"), UnitPattern(r"^(decoder)\.layers\.(\d+)\.", "{0}"))
    return ModelShape(tuple(units), first, last, s, checkpointing, patterns, ("encoder", "decoder"),
                      ("decoder.final_norm", "lm_head."), ("embeddings.",))


def dnazen_shape(config: Any, layout: Layout, seq_len: int, checkpointing: bool) -> ModelShape:
    h, s, t = config.hidden, seq_len, layout.tp
    rows = config.max_ggrams  # G-gram rows per sequence: the G-gram encoder runs over these
    token = transformer_block_footprint(config.token_block(), s, layout)
    ggram = transformer_block_footprint(config.ggram_block(), rows, layout)
    token_layer = _from_footprint(token, s, layout, h, checkpointing, 2 * h,
                                  (2 + _gated(config.activation)) * h)
    ggram_layer = _from_footprint(ggram, rows, layout, h, checkpointing, 2 * h,
                                  (2 + _gated(config.ggram_activation)) * h)
    # Token layer l and G-gram layer l run side by side (the fusion adds mu(l) into h(l)): one pipeline unit.
    units = tuple((("layer", index), token_layer + ggram_layer if index < config.ggram_layers else token_layer)
                  for index in range(config.layers))
    mask = layout.mask_bytes * h if config.dropout > 0 else 0.0
    embedding = norm_bytes(h, "layernorm", layout) + mask  # word + type -> LayerNorm -> dropout
    first = Activations(saved=embedding * (s + (rows if config.ggram_layers else 0)), tp_forward=h * (s + rows))
    targets = config.mask_rate * s
    last = Activations(saved=targets * _head_bytes(h, config.padded_vocab_size / t, "layernorm", layout, dense=True),
                       transient=STAT_BYTES * targets * config.padded_vocab_size / t, tp_backward=targets * h)
    patterns = (UnitPattern(r"^(layers)\.(\d+)\.", "layer"), UnitPattern(r"^(ggram_layers)\.(\d+)\.", "layer"))
    return ModelShape(units, first, last, s, checkpointing, patterns, ("layer",), ("head.",),
                      ("embeddings.word.",))


def dnachunker_shape(config: Any, layout: Layout, seq_len: int, checkpointing: bool) -> ModelShape:
    """Level lengths at the ratio targets: L_0 = T bases, L_s = prod_{r < s} alpha_r T. During MLM pretraining
    mask protection makes the coarser levels somewhat longer (every [MASK] is a singleton chunk)."""
    h, t, v = config.hidden, layout.tp, layout.value_bytes
    mamba = config.mamba_config()
    shape = BiMambaShape(hidden=h, inner=mamba.inner, heads=mamba.heads, state=mamba.ngroups * mamba.d_state,
                         in_proj=mamba.in_proj_size, conv_channels=mamba.conv_channels)
    block = bimamba_footprint(shape, layout)
    lengths = [float(seq_len)]
    for alpha in config.ratio_targets:
        lengths.append(lengths[-1] * alpha)
    units, groups = [], []
    for stage in range(config.stages):
        groups.append(f"encoders.{stage}")
        # Replicated on every TP rank: no TP collectives; never checkpointed (only the trunk is).
        layer = _from_footprint(block, lengths[stage], layout, h, False, 0.0, 0.0)
        units += [((f"encoders.{stage}", index), layer) for index in range(config.stage_layers)]
    trunk_tokens = lengths[-1]
    trunk = transformer_block_footprint(config.block_config(), trunk_tokens, layout, positions_per_sequence=True)
    trunk_layer = _from_footprint(trunk, trunk_tokens, layout, h, checkpointing, 2 * h,
                                  (2 + _gated(config.activation)) * h)
    groups.append("trunk")
    units += [(("trunk", index), trunk_layer) for index in range(config.trunk_layers)]
    for stage in reversed(range(config.stages)):
        groups.append(f"decoders.{stage}")
        layer = _from_footprint(block, lengths[stage], layout, h, False, 0.0, 0.0)
        units += [((f"decoders.{stage}", index), layer) for index in range(config.stage_layers)]
    # Level glue per stage, at the finer level's length: encoder final norm; router q and k (kept by the routing
    # op; their input, the encoder output, is also the residual projection's); dechunk's float32 replicated
    # states, forward and backward smoothing scans and smoothed result; decoder final norm above level 0.
    glue = 0.0
    for stage in range(config.stages):
        per_position = norm_bytes(h, "rmsnorm", layout) + v * h + 2 * v * h + 4 * STAT_BYTES * h
        per_position += norm_bytes(h, "rmsnorm", layout) if stage > 0 else 0.0
        glue += per_position * lengths[stage]
    glue += norm_bytes(h, config.norm, layout) * trunk_tokens  # the trunk's final norm
    first = Activations(saved=glue, tp_forward=h * seq_len)
    targets = TokenMasking().rate * seq_len
    last = Activations(
        saved=targets * (norm_bytes(h, "rmsnorm", layout) + _head_bytes(h, config.padded_vocab_size / t, "rmsnorm",
                                                                          layout, dense=False)),
        transient=STAT_BYTES * targets * config.padded_vocab_size / t, tp_backward=targets * h)
    patterns = (UnitPattern(r"^(encoders\.\d+|decoders\.\d+|trunk)\.layers\.(\d+)\.", "{0}"),)
    return ModelShape(tuple(units), first, last, seq_len, checkpointing, patterns, tuple(groups), ("head.",),
                      ("embeddings.",))


FAMILIES: dict[str, Callable[[Any, Layout, int, bool], ModelShape]] = {
    "encoder": encoder_shape,
    "enbed": enbed_shape,
    "dnazen": dnazen_shape,
    "dnachunker": dnachunker_shape,
}


def model_shape(recipe_name: str, config: Any, layout: Layout) -> ModelShape:
    """The family's shape at the layout's sequence length and checkpointing (None: the config's own)."""
    if recipe_name not in FAMILIES:
        raise ConfigError(f"no memory model for model {recipe_name!r}; modelled: {sorted(FAMILIES)}")
    if layout.tp != getattr(config, "tp", 1):
        dataclasses.replace(config, tp=layout.tp).validate()  # names the width that tp does not divide
    seq_len = layout.seq_len if layout.seq_len is not None else config.max_seq_len
    if seq_len > config.max_seq_len:
        raise ConfigError(f"seq_len={seq_len} exceeds the preset's max_seq_len={config.max_seq_len}")
    checkpointing = (layout.activation_checkpointing if layout.activation_checkpointing is not None
                     else bool(config.activation_checkpointing))
    return FAMILIES[recipe_name](config, layout, seq_len, checkpointing)
