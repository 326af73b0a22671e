"""The typed batch every collator produces and every model consumes."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T] long, with the tokenizer's template (e.g. [CLS] x [SEP]) and padding
    attention_mask: torch.Tensor  # [B, T] bool, True on real tokens (not padding)
    labels: torch.Tensor  # [B, T] long, the original id at MLM targets, -100 elsewhere
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # family-specific tensors (G-gram matrix, ...)

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def to(self, device: torch.device | str) -> "Batch":
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for name in ("input_ids", "attention_mask", "labels"):
            moved[name] = moved[name].to(device, non_blocking=True)
        moved["extras"] = {k: v.to(device, non_blocking=True) for k, v in self.extras.items()}
        return Batch(**moved)
