"""Normalisation layers, chosen by name ("layernorm" | "rmsnorm").

Norms act on replicated activations, so their weights are replicated across TP ranks and their gradients agree
without any communication. The exception is a norm applied per attention head (qk-norm): each TP rank only sees
its own heads, so `HeadSharedNorm` routes its weight through megatron's copy-to-TP-region (identity forward,
all-reduce backward) to sum the per-rank gradient contributions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from torch import nn

from dnascale.nn.tp import tp_rank_and_size

NORMS: dict[str, type[nn.Module]] = {
    "layernorm": nn.LayerNorm,  # weight + bias (BERT, pre-LN Transformers)
    "rmsnorm": nn.RMSNorm,  # scale only (T5, LLaMA)
}


def build_norm(name: str, dim: int, eps: float) -> nn.Module:
    """A replicated norm over the last dimension."""
    try:
        cls = NORMS[name]
    except KeyError:
        raise ValueError(f"unknown norm {name!r}; choose one of {sorted(NORMS)}") from None
    return cls(dim, eps=eps)


class HeadSharedNorm(nn.Module):
    """A norm over the head dimension whose weight is shared by all heads, heads being split over TP ranks."""

    def __init__(self, name: str, head_dim: int, eps: float) -> None:
        super().__init__()
        if name not in NORMS:
            raise ValueError(f"unknown norm {name!r}; choose one of {sorted(NORMS)}")
        self.name = name
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(head_dim))
        self.bias = nn.Parameter(torch.zeros(head_dim)) if name == "layernorm" else None

    def _shared(self, param: torch.Tensor | None) -> torch.Tensor | None:
        if param is None or tp_rank_and_size()[1] == 1:
            return param
        return tensor_parallel.copy_to_tensor_model_parallel_region(param)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (x.shape[-1],)
        if self.name == "rmsnorm":
            return F.rms_norm(x, shape, self._shared(self.weight), self.eps)
        return F.layer_norm(x, shape, self._shared(self.weight), self._shared(self.bias), self.eps)
