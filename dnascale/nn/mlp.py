"""Feed-forward block: column-parallel up-projection(s) -> activation -> row-parallel down-projection.

Activations are chosen by name. A gated one computes act(x W_gate) * (x W_in) (GeGLU / SwiGLU; T5 v1.1's
wi_0 / wi_1). The gate and the input projection are two column-parallel layers rather than one fused [2f, h]
matrix: megatron splits a column-parallel weight along dim 0, which would hand one rank all of the gate and the
other all of the input half.
Between the two projections each TP rank holds ffn_hidden / tp features; the row-parallel output all-reduces.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.model_parallel_config import ModelParallelConfig
from torch import nn

from dnascale.nn.tp import InitMethod


@dataclass(frozen=True)
class Activation:
    fn: Callable[[torch.Tensor], torch.Tensor]
    gated: bool


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


ACTIVATIONS: dict[str, Activation] = {
    "gelu": Activation(F.gelu, gated=False),
    "gelu_tanh": Activation(_gelu_tanh, gated=False),
    "relu": Activation(F.relu, gated=False),
    "geglu": Activation(F.gelu, gated=True),
    "geglu_tanh": Activation(_gelu_tanh, gated=True),  # T5 v1.1 / ByT5 / ENBED
    "swiglu": Activation(F.silu, gated=True),
}


@dataclass
class MLPConfig:
    hidden: int
    ffn_hidden: int
    activation: str = "gelu"
    bias: bool = True


class MLP(nn.Module):
    def __init__(
        self, config: MLPConfig, mp_config: ModelParallelConfig, init_method: InitMethod, output_init_method: InitMethod
    ) -> None:
        super().__init__()
        if config.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {config.activation!r}; choose one of {sorted(ACTIVATIONS)}")
        self.activation = ACTIVATIONS[config.activation]

        def column() -> tensor_parallel.ColumnParallelLinear:
            return tensor_parallel.ColumnParallelLinear(
                config.hidden, config.ffn_hidden, config=mp_config, init_method=init_method, bias=config.bias,
                gather_output=False,
            )

        self.fc_in = column()
        self.fc_gate = column() if self.activation.gated else None
        self.fc_out = tensor_parallel.RowParallelLinear(
            config.ffn_hidden, config.hidden, config=mp_config, init_method=output_init_method, bias=config.bias,
            input_is_parallel=True, skip_bias_add=False,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up, _ = self.fc_in(x)
        if self.fc_gate is None:
            inner = self.activation.fn(up)
        else:
            gate, _ = self.fc_gate(x)
            inner = self.activation.fn(gate) * up
        out, _ = self.fc_out(inner)
        return out
