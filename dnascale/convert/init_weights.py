"""Load an init directory (tools/convert_from_hf.py's output) into a built dnascale model at its TP size.

Each TP rank reads only its own file (tp_rank_XX.safetensors) and copies it into its parameters; the file's TP
size must be the model's. A ZeRO-3 model (parameters partitioned by deepspeed.zero.Init over the data-parallel
group) is gathered, written on the group's first rank and re-partitioned from there (GatheredParameters).
`launchers/pretrain.py --init-from DIR` calls this on the freshly built model, before the engine exists.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from dnascale.errors import CheckpointError
from dnascale.nn.tp import tp_rank_and_size

MODEL_INFO = "dnascale_model.json"
INIT_FORMAT = "dnascale-init"


def init_shard_name(tp_rank: int) -> str:
    return f"tp_rank_{tp_rank:02d}.safetensors"


def read_init_info(init_dir: str | os.PathLike[str]) -> dict:
    path = Path(init_dir) / MODEL_INFO
    try:
        info = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        raise CheckpointError(f"{path}: missing or not JSON; not a directory written by convert_from_hf.py") from None
    if info.get("format") != INIT_FORMAT:
        raise CheckpointError(f"{path}: format {info.get('format')!r}, expected {INIT_FORMAT!r}")
    return info


@torch.no_grad()
def load_init_weights(model: nn.Module, init_dir: str | os.PathLike[str], recipe: str) -> None:
    from safetensors.torch import load_file

    info = read_init_info(init_dir)
    if info["recipe"] != recipe:
        raise CheckpointError(f"{init_dir}: weights of a {info['recipe']!r} model, but this run builds {recipe!r}")
    tp_rank, tp_size = tp_rank_and_size()
    saved_tp = int(info["config"]["tp"])
    if saved_tp != tp_size:
        raise CheckpointError(f"{init_dir}: written for tp={saved_tp}, this run has tp={tp_size}; rerun "
                              f"convert_from_hf.py with --tp {tp_size}")
    shard = load_file(str(Path(init_dir) / init_shard_name(tp_rank)))
    params = dict(model.named_parameters())
    missing = sorted(set(params) - set(shard))
    if missing:
        raise CheckpointError(f"{init_dir}: no weights for {missing[:3]} ({len(missing)} missing)")
    partitioned = [p for p in params.values() if hasattr(p, "ds_id")]
    if not partitioned:
        _copy(params, shard, init_dir)
        return
    import deepspeed

    # Every rank of the partitioning group read the same file; DeepSpeed broadcasts the group's rank 0 copy
    # (modifier_rank is a rank within each parameter's group, the data-parallel group here).
    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=0):
        _copy(params, shard, init_dir)


def _copy(params: dict[str, nn.Parameter], shard: dict[str, torch.Tensor], init_dir) -> None:
    for name, param in params.items():
        if tuple(shard[name].shape) != tuple(param.shape):
            raise CheckpointError(f"{init_dir}: {name} is {tuple(shard[name].shape)}, the model has "
                                  f"{tuple(param.shape)}; use the preset/overrides the weights were exported with")
        param.data.copy_(shard[name])
