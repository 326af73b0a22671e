"""Tensor-parallel plumbing shared by every building block: megatron's config, init methods, weight layouts.

Weight layout (megatron's, recorded on each parameter by megatron as `tensor_model_parallel` / `partition_dim`):
column-parallel weights [out, in] are split along dim 0, their biases along dim 0; row-parallel weights
[out, in] along dim 1, their biases are replicated; vocab-parallel embeddings split the vocabulary rows (dim 0).
A parameter without the `tensor_model_parallel` mark is replicated on every TP rank.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping

import torch
from megatron.core import parallel_state
from megatron.core.model_parallel_config import ModelParallelConfig

InitMethod = Callable[[torch.Tensor], torch.Tensor]


def megatron_config(tp: int, params_dtype: torch.dtype | None = None) -> ModelParallelConfig:
    """The ModelParallelConfig our layers are built with.

    Weights are always initialised on CPU from one full "master" matrix and then sliced (megatron's
    use_cpu_initialization path): the full weights then depend only on the seed, not on the TP size, and nothing
    touches CUDA before DeepSpeed moves the module. `params_dtype` defaults to torch's default dtype, so megatron's
    layers follow `torch.set_default_dtype` like every other parameter (the parity tests build models in float64).
    """
    return ModelParallelConfig(
        tensor_model_parallel_size=tp,
        params_dtype=params_dtype if params_dtype is not None else torch.get_default_dtype(),
        use_cpu_initialization=True,
        perform_initialization=True,
    )


def tp_rank_and_size() -> tuple[int, int]:
    """(rank, size) in the tensor-parallel group; (0, 1) when megatron's groups are not built."""
    if not parallel_state.model_parallel_is_initialized():
        return 0, 1
    return parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_tensor_model_parallel_world_size()


def require_tp_size(expected: int) -> None:
    """A model built for `expected` TP ranks refuses to be built in a process group of another size."""
    _, size = tp_rank_and_size()
    if size != expected:
        from dnascale.errors import ConfigError

        raise ConfigError(f"tp={expected} but this process runs with a tensor-parallel size of {size}")


def divide(numerator: int, denominator: int, what: str) -> int:
    if numerator % denominator != 0:
        raise ValueError(f"{what}: {numerator} is not divisible by {denominator}")
    return numerator // denominator


def normal_init(std: float) -> InitMethod:
    def init(tensor: torch.Tensor) -> torch.Tensor:
        return torch.nn.init.normal_(tensor, mean=0.0, std=std)

    return init


def scaled_normal_init(std: float, num_layers: int) -> InitMethod:
    """For projections that write into the residual stream: std / sqrt(2 * layers) keeps its variance bounded."""
    return normal_init(std / math.sqrt(2.0 * num_layers))


def shard_for_rank(full: torch.Tensor, param: torch.nn.Parameter, tp_rank: int, tp_size: int) -> torch.Tensor:
    """This TP rank's slice of a full (TP=1) tensor, following the marks megatron put on `param`."""
    if not getattr(param, "tensor_model_parallel", False) or tp_size == 1:
        return full
    dim = param.partition_dim
    return torch.chunk(full, tp_size, dim=dim)[tp_rank]


class _GatherLastDim(torch.autograd.Function):
    """All-gather along the last dim over the TP group; backward keeps this rank's slice.

    megatron's gather_from_tensor_model_parallel_region does the same but allocates on the CUDA device, so it
    fails on CPU. torch.distributed.nn's all_gather would sum the (replicated) gradients in backward: tp times
    too large for a result that every rank goes on to use identically.
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        ctx.rank = torch.distributed.get_rank(group)
        ctx.width = tensor.shape[-1]
        pieces = [torch.empty_like(tensor) for _ in range(torch.distributed.get_world_size(group))]
        torch.distributed.all_gather(pieces, tensor.contiguous(), group=group)
        return torch.cat(pieces, dim=-1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        start = ctx.rank * ctx.width
        return grad[..., start : start + ctx.width].contiguous(), None


def gather_last_dim(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate the TP ranks' slices of the last dimension (on CPU and GPU); identity at TP=1."""
    if tp_rank_and_size()[1] == 1:
        return tensor
    return _GatherLastDim.apply(tensor, parallel_state.get_tensor_model_parallel_group())


@torch.no_grad()
def load_full_state_dict(module: torch.nn.Module, full: Mapping[str, torch.Tensor]) -> None:
    """Copy a full (unsharded) state dict into a TP-sharded module, slicing by each parameter's layout."""
    tp_rank, tp_size = tp_rank_and_size()
    params = dict(module.named_parameters())
    missing = sorted(set(params) - set(full))
    if missing:
        raise KeyError(f"full state dict lacks {missing}")
    for name, param in params.items():
        piece = shard_for_rank(full[name], param, tp_rank, tp_size)
        if piece.shape != param.shape:
            raise ValueError(f"{name}: shard {tuple(piece.shape)} does not fit parameter {tuple(param.shape)}")
        param.copy_(piece)
