"""Token embeddings, vocabulary-parallel: each TP rank holds a contiguous slice of the (padded) vocabulary rows.

The table is padded to a multiple of `pad_multiple` rows, chosen independently of the TP size so that a
checkpoint keeps its shapes when re-sharded to another TP size (the multiple must be divisible by the TP size).
Padding rows are never looked up; output heads that tie to this table mask their logits out.
"""

from __future__ import annotations

import math

import torch
from megatron.core import tensor_parallel
from megatron.core.model_parallel_config import ModelParallelConfig
from torch import nn

from dnascale.nn.tp import InitMethod, tp_rank_and_size


def padded_vocab_size(vocab_size: int, pad_multiple: int) -> int:
    return int(math.ceil(vocab_size / pad_multiple) * pad_multiple)


class TokenEmbedding(nn.Module):
    def __init__(
        self, vocab_size: int, hidden: int, pad_multiple: int, mp_config: ModelParallelConfig, init_method: InitMethod
    ) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.padded_vocab_size = padded_vocab_size(vocab_size, pad_multiple)
        self.word = tensor_parallel.VocabParallelEmbedding(
            self.padded_vocab_size, hidden, init_method=init_method, config=mp_config
        )

    @property
    def weight(self) -> torch.Tensor:
        """This rank's rows [padded_vocab / tp, hidden] (for heads tied to the embedding)."""
        return self.word.weight

    def vocab_range(self) -> tuple[int, int]:
        """[start, end) of the padded vocabulary ids held by this TP rank."""
        tp_rank, tp_size = tp_rank_and_size()
        per_rank = self.padded_vocab_size // tp_size
        return tp_rank * per_rank, (tp_rank + 1) * per_rank

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.word(input_ids)
