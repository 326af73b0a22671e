"""Sequence classification on top of any pretrained backbone that exposes `encode(input_ids, attention_mask)`.

The head mean-pools the final hidden states over real tokens (padding excluded), then dropout and a linear layer.
Mean pooling rather than a [CLS] state: the nucleotide layouts have no [CLS] (DNACHUNKER pools by mean too), and it
treats every family the same way.
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


class SequenceClassifier(nn.Module):
    def __init__(self, backbone: nn.Module, hidden: int, num_labels: int, dropout: float = 0.1):
        super().__init__()
        if not callable(getattr(backbone, "encode", None)):
            raise TypeError(f"{type(backbone).__name__} has no encode(input_ids, attention_mask) for classification")
        self.backbone = backbone
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden, num_labels)
        nn.init.normal_(self.classifier.weight, std=0.02)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None = None):
        hidden = self.backbone.encode(input_ids, attention_mask)
        weights = attention_mask.to(hidden.dtype).unsqueeze(-1)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)
        logits = self.classifier(self.dropout(pooled))
        loss = F.cross_entropy(logits.float(), labels) if labels is not None else logits.new_zeros(())
        return ClassifierOutput(loss, int(labels.numel()) if labels is not None else 0, logits)
