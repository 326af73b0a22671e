"""The MLM encoder (dnascale.models.encoder) as pipeline layers: the `encoder` recipe's pipeline split.

  index      layer                 parameters (EncoderForMLM name)        (in) -> (out)
  0          tied "word"           embeddings.word.weight                 (input_ids, mask) -> (hidden, mask)
  1          InputPositionsPipe    input_positions.* (learned only)       + positions, embedding dropout
  2..L+1     BlockPipe             stack.layers.<i>.*                     one Transformer block each
  L+2        HeadTransformPipe     stack.final_norm.*, head.dense_*,      final norm, MLM dense -> GELU -> norm
                                   head.norm.*
  L+3        tied "word", decode   (the token table again)                -> vocab-parallel logits, no bias yet
  L+4        DecoderBiasPipe       head.bias                              + bias; padding vocabulary rows masked
  loss_fn    last stage            -                                      cross-entropy at the labels' targets

Why this shape:
- The MLM decoder is tied to the token table, which lives in the first stage. DeepSpeed's TiedLayerSpec keeps a
  copy in each stage that uses it, broadcasts the first stage's copy at start and after a load, and all-reduces the
  two stages' gradients before the optimizer step: the same sum autograd forms when both uses share one tensor.
  Only the table itself is tied (every parameter of a tied module counts as replicated on the later stage), so the
  decoder bias is a layer of its own after the decode.
- The attention mask travels with the hidden states as an int64 tensor (DeepSpeed sends integer tensors without
  gradients; bool tensors need NCCL workarounds).
- The labels never travel through the pipe: DeepSpeed hands them to the last stage from the data iterator. So the
  head runs at every position and `loss_fn` picks the targets (the unsplit model selects them first; the logits
  at the target rows are the same up to float rounding).
- Layers are listed in EncoderForMLM's construction order, and each builds its parameters in the same order and
  with the same init functions, so the same random stream gives the same weights (tests/test_pipeline.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from torch import nn

from dnascale.data.batch import Batch
from dnascale.models.encoder import EncoderConfig
from dnascale.models.heads import IGNORE_INDEX, MLMOutput, mlm_loss
from dnascale.models.pipeline_split import PipelineSplit
from dnascale.nn.block import TransformerBlock
from dnascale.nn.checkpointing import checkpoint
from dnascale.nn.embeddings import TokenEmbedding
from dnascale.nn.norms import build_norm
from dnascale.nn.positions import build_input_positions
from dnascale.nn.tp import megatron_config, normal_init, require_tp_size, scaled_normal_init, tp_rank_and_size

WORD = "word"  # the TiedLayerSpec key of the token table


class WordEmbeddingPipe(nn.Module):
    """The vocab-parallel token table; forward embeds, `decode` is its second use as the MLM decoder weight."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.max_seq_len = config.max_seq_len
        self.embeddings = TokenEmbedding(config.vocab_size, config.hidden, config.vocab_pad_multiple,
                                         megatron_config(config.tp), normal_init(config.init_std))

    def forward(self, inputs: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        input_ids, mask = inputs
        if input_ids.shape[1] > self.max_seq_len:
            raise ValueError(f"sequence length {input_ids.shape[1]} exceeds max_seq_len={self.max_seq_len}")
        return self.embeddings(input_ids), mask


def decode(table: WordEmbeddingPipe, inputs: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The tied table's second use: transformed hidden states -> this TP rank's vocabulary logits (no bias)."""
    transformed, mask = inputs
    # Identity forward; backward all-reduces the input gradient over TP (each rank saw a vocabulary slice).
    transformed = tensor_parallel.copy_to_tensor_model_parallel_region(transformed)
    return F.linear(transformed, table.embeddings.weight), mask


class InputPositionsPipe(nn.Module):
    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.input_positions = build_input_positions(config.position, max_seq_len=config.max_seq_len,
                                                     hidden=config.hidden, init_method=normal_init(config.init_std))
        self.embedding_dropout = nn.Dropout(config.dropout)

    def forward(self, inputs: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, mask = inputs
        if self.input_positions is not None:
            hidden = self.input_positions(hidden, None)
        return self.embedding_dropout(hidden), mask


class BlockPipe(nn.Module):
    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.block = TransformerBlock(config.block_config(), megatron_config(config.tp), normal_init(config.init_std),
                                      scaled_normal_init(config.init_std, config.layers))
        self.activation_checkpointing = config.activation_checkpointing

    def forward(self, inputs: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, mask = inputs
        key_padding = mask.to(torch.bool)
        if self.activation_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(self.block, hidden, key_padding), mask
        return self.block(hidden, key_padding), mask


class HeadTransformPipe(nn.Module):
    """The stack's final norm (pre-norm stacks) and MLMHead's dense -> GELU -> norm, built as MLMHead builds them."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        last = config.block_config()
        self.final_norm = build_norm(last.norm, config.hidden, last.norm_eps) if last.norm_placement == "pre" else None
        self.dense_weight = nn.Parameter(torch.empty(config.hidden, config.hidden))
        self.dense_bias = nn.Parameter(torch.zeros(config.hidden))
        with torch.no_grad():
            normal_init(config.init_std)(self.dense_weight)
        self.norm = build_norm(config.norm, config.hidden, config.norm_eps)

    def forward(self, inputs: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, mask = inputs
        if self.final_norm is not None:
            hidden = self.final_norm(hidden)
        return self.norm(F.gelu(F.linear(hidden, self.dense_weight, self.dense_bias))), mask


class DecoderBiasPipe(nn.Module):
    """MLMHead's vocab-parallel decoder bias; logits of padding vocabulary rows pushed to the dtype's minimum."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        tp_rank, tp_size = tp_rank_and_size()
        per_rank = config.padded_vocab_size // tp_size
        self.vocab_size = config.vocab_size
        self.vocab_start = tp_rank * per_rank
        self.bias = nn.Parameter(torch.zeros(per_rank))
        tensor_parallel.set_tensor_model_parallel_attributes(self.bias, is_parallel=True, dim=0, stride=1)

    def forward(self, inputs: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        logits, mask = inputs
        logits = logits + self.bias
        ids = torch.arange(self.vocab_start, self.vocab_start + logits.shape[-1], device=logits.device)
        return logits.masked_fill(ids >= self.vocab_size, torch.finfo(logits.dtype).min), mask


def mlm_loss_at_targets(outputs: tuple[torch.Tensor, torch.Tensor], labels: torch.Tensor) -> MLMOutput:
    """Mean cross-entropy over the target positions of vocab-parallel logits [B, T, V/tp] (as masked_lm_loss)."""
    logits, _ = outputs
    targets = labels != IGNORE_INDEX
    num_targets = int(targets.sum())
    per_target = mlm_loss(logits[targets], labels[targets])
    return MLMOutput(loss=per_target.sum() / max(num_targets, 1), num_targets=num_targets)


def pipe_inputs(batch: Batch) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
    if batch.extras:
        raise ValueError(f"the encoder pipeline takes no extra inputs, got {sorted(batch.extras)}")
    return (batch.input_ids, batch.attention_mask.to(torch.long)), batch.labels


def model_key(config: EncoderConfig):
    """(layer index, name in the layer) -> EncoderForMLM's state-dict key."""
    last = config.layers + 2

    def key(index: int, name: str) -> str:
        if index == 0 or index == last + 1:
            return name  # embeddings.word.weight
        if index == 1:
            return name  # input_positions.*
        if index < last:
            return f"stack.layers.{index - 2}.{name.removeprefix('block.')}"
        if index == last:
            if name.startswith("final_norm."):
                return f"stack.{name}"
            return f"head.{name}"
        if index == last + 2:
            return f"head.{name}"
        raise IndexError(f"layer {index}: the encoder pipeline has {last + 3} layers")

    return key


def pipeline_split(config: EncoderConfig) -> PipelineSplit:
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    config.validate()
    require_tp_size(config.tp)
    tied = "embeddings.word.weight"
    layers = [
        TiedLayerSpec(WORD, WordEmbeddingPipe, config, tied_weight_attr=tied),
        LayerSpec(InputPositionsPipe, config),
        *(LayerSpec(BlockPipe, config) for _ in range(config.layers)),
        LayerSpec(HeadTransformPipe, config),
        TiedLayerSpec(WORD, WordEmbeddingPipe, config, forward_fn=decode, tied_weight_attr=tied),
        LayerSpec(DecoderBiasPipe, config),
    ]
    return PipelineSplit(layers=layers, loss_fn=mlm_loss_at_targets, model_key=model_key(config),
                         pipe_inputs=pipe_inputs)
