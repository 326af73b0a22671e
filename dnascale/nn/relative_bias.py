"""T5 relative-position bias: a learned scalar per head and bucket of the relative distance, heads split over TP.

`relative_position_bucket` is T5's (HF `T5Attention._relative_position_bucket`): half of the buckets hold exact
small distances, the rest grow logarithmically up to `max_distance`, beyond which everything shares the last
bucket; bidirectional tables spend half of their buckets on each direction, causal ones only look back.

`RelativePositionBias` holds the table [num_buckets, heads / tp] (megatron-style: the full table is created and
initialised, then this TP rank keeps its heads' columns; marked `partition_dim=1`). Calling it with a tensor of
relative positions (key minus query) returns [local_heads, *positions.shape]; callers evaluate it once per forward
on the few distinct offsets they need (e.g. -r..r for a window) and hand the small result to every layer.
It must be *called* (not read) inside forward, so ZeRO-3's hooks gather its partitioned weight.
"""

from __future__ import annotations

import math

import torch
from megatron.core import tensor_parallel
from torch import nn

from dnascale.nn.tp import InitMethod, divide, tp_rank_and_size


def relative_position_bucket(
    relative_position: torch.Tensor, bidirectional: bool, num_buckets: int = 32, max_distance: int = 128
) -> torch.Tensor:
    """Bucket ids (long) of relative positions `key - query`."""
    buckets = torch.zeros_like(relative_position, dtype=torch.long)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).long() * num_buckets
        distance = relative_position.abs()
    else:
        distance = -torch.clamp(relative_position, max=0)
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    # distance.clamp(min=1) only keeps log() finite where the small branch is taken anyway.
    large = max_exact + (
        torch.log(distance.clamp(min=1).float() / max_exact) / math.log(max_distance / max_exact)
        * (num_buckets - max_exact)
    ).long()
    large = torch.clamp(large, max=num_buckets - 1)
    return buckets + torch.where(is_small, distance.long(), large)


class RelativePositionBias(nn.Module):
    def __init__(
        self, heads: int, *, bidirectional: bool, num_buckets: int, max_distance: int, init_method: InitMethod,
        scale: float = 1.0,
    ) -> None:
        super().__init__()
        tp_rank, tp_size = tp_rank_and_size()
        local = divide(heads, tp_size, "relative-bias heads over TP")
        self.bidirectional = bidirectional
        self.num_buckets = num_buckets
        self.max_distance = max_distance
        self.scale = scale
        master = torch.empty(num_buckets, heads)
        with torch.no_grad():
            init_method(master)
            master /= scale
        # Created and initialised here, not later: under deepspeed.zero.Init a module's parameters are
        # partitioned as soon as its __init__ returns.
        self.weight = nn.Parameter(master[:, tp_rank * local : (tp_rank + 1) * local].contiguous())
        tensor_parallel.set_tensor_model_parallel_attributes(self.weight, is_parallel=True, dim=1, stride=1)

    def forward(self, relative_position: torch.Tensor) -> torch.Tensor:
        """relative_position (key - query), any shape -> bias [local_heads, *shape]."""
        buckets = relative_position_bucket(
            relative_position.to(self.weight.device), self.bidirectional, self.num_buckets, self.max_distance
        )
        return (self.weight * self.scale)[buckets].movedim(-1, 0)
