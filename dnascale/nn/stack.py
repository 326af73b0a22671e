"""A stack of Transformer blocks (one config per layer, so layers may differ, e.g. ENBED's window radii),
with a final norm for pre-norm stacks and optional activation checkpointing per block."""

from __future__ import annotations

from typing import Sequence

import torch
from megatron.core.model_parallel_config import ModelParallelConfig
from torch import nn

from dnascale.nn.block import BlockConfig, TransformerBlock
from dnascale.nn.checkpointing import checkpoint
from dnascale.nn.norms import build_norm
from dnascale.nn.tp import InitMethod


class TransformerStack(nn.Module):
    def __init__(
        self,
        blocks: Sequence[BlockConfig],
        mp_config: ModelParallelConfig,
        init_method: InitMethod,
        output_init_method: InitMethod,
        activation_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        if not blocks:
            raise ValueError("a TransformerStack needs at least one block")
        self.layers = nn.ModuleList(
            TransformerBlock(block, mp_config, init_method, output_init_method) for block in blocks
        )
        last = blocks[-1]
        # Post-norm blocks end normalised already; pre-norm ones leave the residual stream un-normalised.
        self.final_norm = (
            build_norm(last.norm, last.attention.hidden, last.norm_eps) if last.norm_placement == "pre" else None
        )
        self.activation_checkpointing = activation_checkpointing

    def forward(
        self,
        x: torch.Tensor,
        key_padding: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        attention_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        recompute = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.layers:
            if recompute:
                x = checkpoint(layer, x, key_padding, positions, attention_bias)
            else:
                x = layer(x, key_padding, positions, attention_bias)
        return self.final_norm(x) if self.final_norm is not None else x
