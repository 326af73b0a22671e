"""Activation memory of dnascale's building blocks: what autograd keeps per position for the backward pass.

Every formula below counts the tensors that our implementation saves for backward (read off the code of
dnascale/nn and dnascale/models/dnachunker, and checked against autograd's saved tensors in
tests/test_memory_model.py), per position of the sequence the block runs on and per tensor-parallel rank t.
Notation: h hidden, i = heads x head_dim, a heads, f ffn_hidden, v bytes per activation element (bf16 2, fp32 4),
m bytes per dropout-mask element (1 on CUDA, v on CPU), 4 for the float32 statistics (norm rstd/mean, softmax
log-sum-exp) that stay float32 in every dtype. A norm keeps its input and statistics (CUDA's fused kernels; on
CPU torch's RMSNorm is a composite that keeps a float32 input and normalised copy, 8h bytes).

Transformer block (pre- or post-LN; the two place the norms differently but save the same four h-wide tensors):

    saved = v * [ 4h                      two norm inputs + the QKV and MLP-up inputs (replicated over TP)
                + 3i/t                    the fused QKV output (V is a view of it, so the whole buffer lives)
                + 2i/t    (RoPE only)     the rotated copies of q and k
                + i/t                     the attention output (the merged-heads out-projection input is a view:
                                          flash kernels and SDPA write [B, T, H, D] order)
                + (2 or 4) f/t ]          MLP: pre- and post-activation; gated: gate, act(gate), up, product
          + m * h * (residual dropouts)   one mask per residual branch when dropout > 0
          + 4 * (a/t + norm statistics)   flash's log-sum-exp per head, rstd (+ mean) per norm
          + materialised attention only:  v * a/t * keys   (the softmax output; + m and v again with attention
                                          dropout: its mask and the dropped probabilities)
    plus, per layer and micro-batch rather than per position (`fixed`): RoPE's float32 cos and sin tables
    [T, head_dim] (per sequence when positions are per sequence, as DNACHUNKER's chunk centres), and on CPU the
    ALiBi bias [a/t, T, T] that SDPA receives as a dense additive mask (flash-attn takes the slopes instead).

This is Korthikanti et al.'s s*b*h*(34 + 5*a*s/h) (bytes, bf16, 4h MLP, no RoPE) re-derived for our code: their
34 = 4 (LN inputs) + 4 (QKV + MLP inputs) + 8 (Q, K, V, out-projection input) + 16 (MLP 4h, pre/post GeLU)
+ 2 (two 1-byte dropout masks); ours keeps the whole fused QKV buffer (Q, K and V), the core-attention output
(= the out-projection input), the RoPE copies, and no score matrix with fused attention (flash-attn,
FlexAttention, SDPA's flash kernel); `attention="materialised"` adds the 5*a*s/h term back. Sliding-window attention (ENBED) attends to 2r+1 keys
(r+1 causal) plus the global block summaries instead of s, which only matters for materialised scores.

Activation checkpointing (torch.utils.checkpoint around a whole layer) keeps only the layer's input (v * h per
position) until backward recomputes it; one layer's `saved` set then lives during its backward again (less the
input, which is the very tensor the checkpoint holds).

Backward working set of one layer (`transient`): autograd frees each node's saved tensors once the node has run,
so what a layer's backward adds on top of its saved set is the gradient in flight: the residual-stream gradient
(h) plus what the widest node produces beyond what it frees, v * [h + max(4i/t, (1|2) f/t)]: the attention's
dq, dk, dv next to d_out (4i/t), or the MLP's inner gradients (f/t after the activation; 2f/t for the gated
product, whose two factors get gradients at once).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dnascale.nn.block import BlockConfig
from dnascale.nn.mlp import ACTIVATIONS
from dnascale.scaling.layout import Layout

STAT_BYTES = torch.float32.itemsize  # norm statistics and softmax log-sum-exp are float32 in every dtype
NORM_STATS = {"layernorm": 2, "rmsnorm": 1}  # float32 values saved per row: (mean, rstd) or rstd


@dataclass(frozen=True)
class Footprint:
    """Bytes per position kept for backward (`saved`) and of the backward working set (`transient`), plus bytes
    kept per layer and micro-batch whatever the batch size (`fixed`: position tables, dense biases)."""

    saved: float = 0.0
    transient: float = 0.0
    fixed: float = 0.0

    def __add__(self, other: "Footprint") -> "Footprint":
        # Saved tensors accumulate; a layer's sub-blocks run their backward one after another.
        return Footprint(self.saved + other.saved, max(self.transient, other.transient), self.fixed + other.fixed)

    def scaled(self, factor: float) -> "Footprint":
        """The same tensors over `factor` times as many positions (e.g. a level of fewer chunks)."""
        return Footprint(self.saved * factor, self.transient * factor, self.fixed)


@dataclass(frozen=True)
class AttentionShape:
    hidden: int
    heads: int
    head_dim: int
    rope: bool = False
    norm: str = "layernorm"
    keys: float = 0.0  # keys each query attends to (only materialised scores depend on it)
    kv_rows: float = 1.0  # rows the K/V projection runs on, per query row (1 + summaries/positions with global keys)
    summary_rows: float = 0.0  # RMS-normed block-summary rows per position (LongT5 transient global)
    residual_dropout: bool = False
    attention_dropout: bool = False
    cross: bool = False  # queries from x, keys/values from a memory of kv_rows rows per position
    alibi: bool = False
    seq_len: float = 0.0  # positions per sequence (for the per-layer position tables)
    positions_per_sequence: bool = False  # RoPE positions given per sequence ([B, T]) rather than shared ([T])

    @property
    def inner(self) -> int:
        return self.heads * self.head_dim


@dataclass(frozen=True)
class MLPShape:
    hidden: int
    ffn: int
    gated: bool
    norm: str = "layernorm"
    residual_dropout: bool = False


def norm_bytes(hidden: float, norm: str, layout: Layout) -> float:
    """A norm keeps its input (v * h) and its float32 statistics. On CPU, torch's RMSNorm is the composite
    x.float() * rsqrt(mean(x^2) + eps): it keeps the float32 input and the float32 normalised x as well."""
    if norm == "rmsnorm" and layout.device == "cpu":
        return STAT_BYTES * hidden * 2 + STAT_BYTES * NORM_STATS[norm]
    return layout.value_bytes * hidden + STAT_BYTES * NORM_STATS[norm]


def attention_footprint(shape: AttentionShape, layout: Layout) -> Footprint:
    """One attention sub-layer (its norm, projections, core attention, output projection, residual dropout)."""
    v, t = layout.value_bytes, layout.tp
    h, inner, local_heads = shape.hidden, shape.inner, shape.heads / layout.tp
    saved = norm_bytes(h, shape.norm, layout)
    if shape.cross:
        # q from the normed x; k, v from the memory rows (a fresh concatenation with its summaries when global).
        saved += v * (h + inner / t)  # q-projection input and output
        saved += v * h * shape.kv_rows + v * 2 * inner / t * shape.kv_rows  # kv-projection input and output
    else:
        saved += v * h * shape.kv_rows  # QKV input: the normed x (followed by its block summaries)
        saved += v * 3 * inner / t * shape.kv_rows  # fused QKV output, alive through the V view
        if shape.rope:
            saved += v * 2 * inner / t  # rotated q and k are new tensors
    if shape.summary_rows:
        saved += shape.summary_rows * norm_bytes(h, "rmsnorm", layout)  # the summaries' own RMSNorm input
    saved += v * inner / t  # core-attention output; the merged heads fed to the out projection are a view of it
    saved += STAT_BYTES * local_heads  # log-sum-exp per head (flash kernels; the materialised path keeps probs)
    fixed = 0.0
    if shape.rope:
        # cos and sin [T, head_dim], float32 whatever the dtype (RotaryPositions computes them in float32).
        tables = 2 * STAT_BYTES * shape.seq_len * shape.head_dim
        fixed += tables * (layout.micro_batch if shape.positions_per_sequence else 1)
    if shape.alibi and layout.device == "cpu":
        fixed += v * local_heads * shape.seq_len * shape.keys
    if layout.attention == "materialised":
        saved += v * local_heads * shape.keys  # softmax output
        if shape.attention_dropout:
            saved += (layout.mask_bytes + v) * local_heads * shape.keys
    if shape.residual_dropout:
        saved += layout.mask_bytes * h
    # dq, dk, dv (over the K/V rows) next to d_out; cross-attention has a separate q projection.
    parts = (2 * shape.kv_rows + 2) if shape.cross else (3 * shape.kv_rows + 1)
    transient = v * (h + parts * inner / t)
    return Footprint(saved, transient, fixed)


def mlp_footprint(shape: MLPShape, layout: Layout) -> Footprint:
    v, t = layout.value_bytes, layout.tp
    inner_tensors = 4 if shape.gated else 2
    saved = norm_bytes(shape.hidden, shape.norm, layout) + v * shape.hidden + v * inner_tensors * shape.ffn / t
    if shape.residual_dropout:
        saved += layout.mask_bytes * shape.hidden
    transient = v * (shape.hidden + (2 if shape.gated else 1) * shape.ffn / t)
    return Footprint(saved, transient)


def block_shapes(block: BlockConfig, seq_len: float, keys: float,
                 positions_per_sequence: bool = False) -> tuple[AttentionShape, MLPShape]:
    """The attention and MLP shapes of a dnascale.nn TransformerBlock config."""
    attention = block.attention
    dropout = block.hidden_dropout > 0
    return (
        AttentionShape(hidden=attention.hidden, heads=attention.heads, head_dim=attention.dim_per_head,
                       rope=attention.position == "rope", norm=block.norm, keys=keys, residual_dropout=dropout,
                       attention_dropout=attention.dropout > 0, alibi=attention.position == "alibi",
                       seq_len=seq_len, positions_per_sequence=positions_per_sequence),
        MLPShape(hidden=block.mlp.hidden, ffn=block.mlp.ffn_hidden, gated=ACTIVATIONS[block.mlp.activation].gated,
                 norm=block.norm, residual_dropout=dropout),
    )


def transformer_block_footprint(block: BlockConfig, seq_len: float, layout: Layout,
                                positions_per_sequence: bool = False) -> Footprint:
    """A dnascale.nn TransformerBlock over `seq_len` positions (full attention unless the config has a window)."""
    window = block.attention.window
    keys = seq_len if window is None else min(seq_len, (window + 1) if block.attention.causal else 2 * window + 1)
    attention, mlp = block_shapes(block, seq_len, keys, positions_per_sequence)
    return attention_footprint(attention, layout) + mlp_footprint(mlp, layout)


@dataclass(frozen=True)
class BiMambaShape:
    """A Mamba-2 BiMamba block (dnascale.models.dnachunker.bimamba); widths from its MambaConfig."""

    hidden: int
    inner: int  # expand * hidden
    heads: int  # inner / headdim
    state: int  # ngroups * d_state
    in_proj: int  # 2 inner + 2 ngroups d_state + heads
    conv_channels: int  # inner + 2 ngroups d_state


def bimamba_footprint(shape: BiMambaShape, layout: Layout) -> Footprint:
    """x + BiMamba(RMSNorm(x)) with the SSD scan in mamba-ssm's fused kernel (the GPU path).

    saved = v * [2h (norm input, in_proj input) + 2 in_proj (the projection and its flipped copy, held by the
    convolutions' inputs) + inner (out_proj input)
                 + per direction: conv_channels (conv output, SiLU input) + inner (kernel's contiguous x)
                   + 2 state (B, C copies) + inner (kernel output y) + inner (SiLU(z)) ]
          + 4 * per direction: 2 inner (the gated product and its RMS-normed value, float32 by the code)
                               + 3 heads (softplus input, the kernel's dt and dA cumsum)
          + 4 * 3 (rstd of the block norm and of the two gated norms)
    The pure-torch SSD (CPU) additionally keeps chunk-local score and decay tensors (heads x chunk per
    position, float32); that path is not modelled.
    """
    v = layout.value_bytes
    direction = v * (shape.conv_channels + 3 * shape.inner + 2 * shape.state)
    direction += STAT_BYTES * (2 * shape.inner + 3 * shape.heads)
    saved = v * (2 * shape.hidden + 2 * shape.in_proj + shape.inner) + 2 * direction
    saved += STAT_BYTES * 3
    # The residual gradient, then both directions' projection gradients (the flip makes a copy) at once.
    transient = v * (shape.hidden + 2 * shape.in_proj)
    return Footprint(saved, transient)
