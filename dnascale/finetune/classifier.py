"""Sequence classification on top of any pretrained backbone that exposes `encode(input_ids, attention_mask, ...)`.

The one classification path of every family (encoder, ENBED, DNAZEN, DNACHUNKER): the backbone's per-position
final states are mean-pooled over real tokens (padding excluded), then dropout and a linear layer. Mean pooling
rather than a [CLS] state: the nucleotide layouts have no [CLS], DNACHUNKER's and ENBED's specs pool by mean, and
it treats every family the same way. Family-specific encode() arguments (DNAZEN's G-gram matching) arrive as
keyword tensors from dnascale.finetune.inputs and are passed through untouched.

Parts of a pretraining model that encode() never reaches (the MLM head, ENBED's decoder and LM head) are removed
before training (`ENCODE_UNUSED`): otherwise they would carry optimizer state and ZeRO partitions for nothing
(ENBED's decoder is about 40% of its parameters), and the saved classifier would hold them.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


class ClassifierOutput(NamedTuple):  # a NamedTuple so ZeRO-3 can see the loss tensor (see MLMOutput)
    loss: torch.Tensor
    num_targets: int
    logits: torch.Tensor


# recipe -> top-level submodules of its pretraining model that encode() does not use.
ENCODE_UNUSED: dict[str, tuple[str, ...]] = {
    "encoder": ("head",),
    "dnazen": ("head",),
    "enbed": ("decoder", "lm_head"),
    "dnachunker": (),  # encode() ends with the head's RMSNorm; the head has no other parameters (tied embedding)
}


def drop_unused(backbone: nn.Module, recipe: str) -> nn.Module:
    """`backbone` without the submodules encode() never reaches (see ENCODE_UNUSED)."""
    for name in ENCODE_UNUSED.get(recipe, ()):
        setattr(backbone, name, None)  # a None submodule has no parameters and no state-dict entries
    return backbone


class SequenceClassifier(nn.Module):
    def __init__(self, backbone: nn.Module, hidden: int, num_labels: int, dropout: float = 0.1):
        super().__init__()
        if not callable(getattr(backbone, "encode", None)):
            raise TypeError(f"{type(backbone).__name__} has no encode(input_ids, attention_mask) for classification")
        if num_labels < 2:
            raise ValueError(f"num_labels={num_labels}: a classifier needs at least 2 classes")
        self.backbone = backbone
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden, num_labels)
        nn.init.normal_(self.classifier.weight, std=0.02)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None = None,
                **extras: torch.Tensor) -> ClassifierOutput:
        hidden = self.backbone.encode(input_ids, attention_mask, **extras)
        weights = attention_mask.to(hidden.dtype).unsqueeze(-1)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)
        logits = self.classifier(self.dropout(pooled))
        loss = F.cross_entropy(logits.float(), labels) if labels is not None else logits.new_zeros(())
        return ClassifierOutput(loss, int(labels.numel()) if labels is not None else 0, logits)
