"""What a recipe's `pipeline_split` returns: the model as a flat list of layers for DeepSpeed's PipelineModule.

DeepSpeed runs `x = layer(x)` over the list, cuts it into stages (balancing parameters), and pipes each stage's
output to the next one as a tensor or a tuple of tensors; the last stage's output goes into `loss_fn(outputs,
labels)` with the labels the data iterator handed that stage. So every layer takes and returns a tuple of tensors
(floating ones carry gradients back, integer ones such as attention masks do not), and the layers are listed in the
order the family's own model constructs its parameters (the training side replays the same random draws, so a
pipelined run starts from the weights of the unsplit model).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from dnascale.models.heads import MLMOutput


@dataclass(frozen=True)
class PipelineSplit:
    # deepspeed.pipe LayerSpec / TiedLayerSpec, in construction order. A TiedLayerSpec key that appears twice
    # is one module shared by two stages (e.g. the token table read by the embedding and by the MLM decoder).
    layers: list[Any]
    # (last stage's outputs, labels) -> the family's output with a per-target mean `loss` and `num_targets`.
    loss_fn: Callable[[Any, torch.Tensor], MLMOutput]
    # (layer index, parameter name inside that layer) -> the unsplit model's state-dict key.
    model_key: Callable[[int, str], str]
    # batch -> ((first stage inputs...), labels): what the data iterator yields to the first and last stages.
    pipe_inputs: Callable[[Any], tuple[tuple[torch.Tensor, ...], torch.Tensor]]
