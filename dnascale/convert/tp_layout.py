"""How each parameter of a model family is laid out over tensor-parallel ranks, and merging/splitting by it.

The layout is read from the marks megatron-core puts on every parameter it creates (`tensor_model_parallel`,
`partition_dim`, `partition_stride`; see dnascale/nn/tp.py): vocab-parallel embedding rows and column-parallel
outputs split along dim 0, row-parallel inputs along dim 1, everything unmarked is replicated. A recipe's
`hf_adapter.tp_overrides` may name parameters by regex to override that (none of ours need it today). The marks
are the same at every TP size, so a TP=1 build on the meta device (no memory, no process group) is enough.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from dnascale.errors import CheckpointError

# Megatron keeps per-layer metadata in `_extra_state` entries; they hold no weights and are rebuilt on load.
EXTRA_STATE_SUFFIX = "._extra_state"


@dataclass(frozen=True)
class TPLayout:
    # parameter name -> the dim split over TP ranks, or None when every rank holds the whole tensor
    partition_dim: dict[str, int | None]
    # parameter name -> its full (TP=1) shape
    shapes: dict[str, tuple[int, ...]]

    @classmethod
    def of_recipe(cls, recipe: Any, config: Any) -> "TPLayout":
        """Build the family at TP=1 on the meta device and read its parameters' marks."""
        single = dataclasses.replace(config, tp=1)
        with torch.device("meta"):
            model = recipe.build(single, None)
        overrides = tuple(getattr(recipe.hf_adapter, "tp_overrides", ()) or ())
        dims: dict[str, int | None] = {}
        for name, param in model.named_parameters():
            dim = param.partition_dim if getattr(param, "tensor_model_parallel", False) else None
            if getattr(param, "partition_stride", 1) != 1:
                # A strided split interleaves the ranks' pieces; no family uses one, so refuse rather than guess.
                raise NotImplementedError(f"{name}: partition_stride {param.partition_stride} is not supported")
            for pattern, override in overrides:
                if re.fullmatch(pattern, name):
                    dim = override
            dims[name] = dim
        return cls(dims, {name: tuple(p.shape) for name, p in model.named_parameters()})

    def check_keys(self, state: Mapping[str, torch.Tensor], source: str, recipe: str) -> None:
        """One line naming what is missing/unexpected: the usual sign of another family's weights."""
        names = {k for k in state if not k.endswith(EXTRA_STATE_SUFFIX)}
        missing, unexpected = sorted(set(self.shapes) - names), sorted(names - set(self.shapes))
        if missing or unexpected:
            raise CheckpointError(
                f"{source}: weights do not match the {recipe!r} model (missing {len(missing)}: {missing[:3]}, "
                f"unexpected {len(unexpected)}: {unexpected[:3]}); is it a checkpoint of another family?"
            )

    def merge(self, shards: list[Mapping[str, torch.Tensor]], source: str, recipe: str) -> dict[str, torch.Tensor]:
        """Per-TP-rank state dicts (rank order) -> the full TP=1 state dict, shapes checked."""
        for shard in shards:
            self.check_keys(shard, source, recipe)
        full: dict[str, torch.Tensor] = {}
        for name, dim in self.partition_dim.items():
            pieces = [shard[name] for shard in shards]
            if dim is None:
                # Replicated tensors must agree; a difference means the ranks' files are from different runs.
                for rank, piece in enumerate(pieces[1:], start=1):
                    if not torch.equal(piece, pieces[0]):
                        raise CheckpointError(f"{source}: replicated parameter {name} differs on TP rank {rank}")
                tensor = pieces[0]
            else:
                tensor = torch.cat(pieces, dim=dim)
            if tuple(tensor.shape) != self.shapes[name]:
                raise CheckpointError(
                    f"{source}: {name} merges to {tuple(tensor.shape)} but the {recipe!r} config expects "
                    f"{self.shapes[name]}; the checkpoint and dnascale_model.json disagree"
                )
            full[name] = tensor
        return full

    def split(self, full: Mapping[str, torch.Tensor], tp_rank: int, tp_size: int) -> dict[str, torch.Tensor]:
        """This TP rank's slice of every tensor of a full state dict."""
        out = {}
        for name, dim in self.partition_dim.items():
            tensor = full[name]
            if dim is not None and tp_size > 1:
                if tensor.shape[dim] % tp_size:
                    raise CheckpointError(
                        f"{name}: dim {dim} of size {tensor.shape[dim]} does not split over tp={tp_size}")
                tensor = torch.chunk(tensor, tp_size, dim=dim)[tp_rank]
            out[name] = tensor.contiguous()
        return out
