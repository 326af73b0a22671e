"""A pretraining checkpoint (any DP x TP layout, ZeRO 1-3) -> one full fp32 state dict at TP=1.

Two steps, each done by the party that knows the layout:
  1. ZeRO partitions: DeepSpeed's own `zero_to_fp32` rebuilds each TP rank's fp32 weights from every DP rank's
     optimizer partitions. It refuses a directory holding several TP ranks' files ("Expected 1 of
     '*_optim_states.pt'"), so it is pointed at a view (symlinks) holding one TP rank's files at a time.
  2. TP shards: merged by each parameter's megatron partition marks (dnascale.convert.tp_layout).
Only DeepSpeed's loader unpickles DeepSpeed's files; our own files are JSON. Nothing is written next to the
checkpoint, so a read-only or shared checkpoint directory is fine.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from dnascale.config import from_dict
from dnascale.convert.init_weights import INIT_FORMAT, init_shard_name
from dnascale.convert.tp_layout import TPLayout
from dnascale.errors import CheckpointError
from dnascale.models.registry import ModelRecipe, get_recipe
from dnascale.train import checkpoint

_ZERO_FILE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_(optim|model)_states\.pt$")
# ZeRO-1/2 write the module states once per TP rank (ZeRO-3 once per DP rank, in a _ZERO_FILE); zero_to_fp32 needs
# that file beside the optimizer partitions.
_STAGE12_MODEL_FILE = re.compile(r"^mp_rank_(\d+)_model_states\.pt$")


@dataclass(frozen=True)
class ConsolidatedCheckpoint:
    tag_dir: Path
    recipe: ModelRecipe
    preset: str | None
    config: Any  # the recipe's config class, with tp=1
    tokenizer: dict  # dnascale_model.json's tokenizer entry (name, spec, vocab_size)
    state_dict: dict[str, torch.Tensor]  # full fp32 tensors, TP=1 names and shapes
    step: int
    source_topology: dict  # world_size / tp / pp / dp the run was written with


def resolve_tag_dir(path: str | os.PathLike[str]) -> Path:
    """A checkpoint tag directory, given it, its `checkpoints/` parent (uses `latest`) or the run's --out."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    for root in (path, path / "checkpoints"):
        if (root / checkpoint.LATEST).is_file():
            tag = checkpoint.find_resume_tag(root)
            return root / tag
    if (path / checkpoint.MODEL_INFO).is_file() or any(path.glob("*_model_states.pt")):
        return path
    raise CheckpointError(f"{path}: not a dnascale checkpoint (no {checkpoint.MODEL_INFO}, no 'latest' file)")


def read_recipe_config(info: dict, source: str) -> tuple[ModelRecipe, Any]:
    recipe = get_recipe(info.get("recipe"))
    config = from_dict(recipe.config_cls, info.get("config"), source=f"{source}: config")
    return recipe, config


def zero_files_by_tp_rank(tag_dir: Path) -> dict[int, list[Path]]:
    """TP rank -> that rank's DeepSpeed files (every DP rank's model and optimizer states)."""
    by_tp: dict[int, list[Path]] = {}
    for path in tag_dir.iterdir():
        match = _ZERO_FILE.match(path.name)
        if match:
            by_tp.setdefault(int(match.group(2)), []).append(path)
        elif match := _STAGE12_MODEL_FILE.match(path.name):
            by_tp.setdefault(int(match.group(1)), []).append(path)
    return by_tp


def _zero_to_fp32_one_tp_rank(files: list[Path]) -> dict[str, torch.Tensor]:
    from deepspeed.utils import zero_to_fp32

    with tempfile.TemporaryDirectory(prefix="dnascale-consolidate-") as view:
        tag = Path(view) / "tag"
        tag.mkdir()
        for path in files:
            os.symlink(path.resolve(), tag / path.name)
        # zero_to_fp32 prints a line per phase and draws its own bars; ours is the one the user should see.
        deepspeed_logger = logging.getLogger("DeepSpeed")
        level = deepspeed_logger.level
        deepspeed_logger.setLevel(logging.ERROR)
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                state = zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(view, tag="tag")
        except (ValueError, KeyError, RuntimeError, EOFError, OSError) as err:
            raise CheckpointError(f"{files[0].parent}: DeepSpeed could not consolidate it ({type(err).__name__}: "
                                  f"{str(err).splitlines()[0] if str(err) else ''})") from None
        finally:
            deepspeed_logger.setLevel(level)
    return {name: tensor.float() for name, tensor in state.items()}


def consolidate(path: str | os.PathLike[str], progress: bool = True) -> ConsolidatedCheckpoint:
    """Read a complete checkpoint (tag dir, checkpoints dir or run dir) into one TP=1 fp32 state dict."""
    from tqdm import tqdm

    tag_dir = resolve_tag_dir(path)
    if (tag_dir / checkpoint.MODEL_INFO).is_file() and not (tag_dir / checkpoint.COMPLETE).is_file():
        info = checkpoint.read_model_info(tag_dir)
        if info.get("format") == INIT_FORMAT:
            return _consolidate_init_dir(tag_dir, info, progress)
    if not (tag_dir / checkpoint.COMPLETE).is_file():
        raise CheckpointError(f"{tag_dir}: partial checkpoint (no {checkpoint.COMPLETE} marker); it was not finished")
    marker_topology = _read_marker_topology(tag_dir)
    marker = checkpoint.verify(tag_dir.parent, tag_dir.name, checkpoint.Topology(**marker_topology))
    info = checkpoint.read_model_info(tag_dir)
    recipe, config = read_recipe_config(info, str(tag_dir / checkpoint.MODEL_INFO))
    tp = marker_topology["tp"]
    if marker_topology.get("pp", 1) != 1:
        raise CheckpointError(f"{tag_dir}: a pipeline-parallel checkpoint (pp={marker_topology['pp']}); "
                              f"conversion reads ZeRO x TP checkpoints only")
    if config.tp != tp:
        raise CheckpointError(f"{tag_dir}: {checkpoint.MODEL_INFO} says tp={config.tp} but the run had tp={tp}")
    by_tp = zero_files_by_tp_rank(tag_dir)
    if sorted(by_tp) != list(range(tp)):
        raise CheckpointError(f"{tag_dir}: expected ZeRO files for TP ranks 0..{tp - 1}, found ranks "
                              f"{sorted(by_tp)}; only ZeRO (stage 1-3) checkpoints are supported")
    layout = TPLayout.of_recipe(recipe, config)
    shards = []
    for rank in tqdm(range(tp), desc="consolidating TP ranks", unit="rank", disable=not progress):
        shards.append(_zero_to_fp32_one_tp_rank(by_tp[rank]))
    state = layout.merge(shards, str(tag_dir), recipe.name)
    return ConsolidatedCheckpoint(
        tag_dir=tag_dir, recipe=recipe, preset=info.get("preset"), config=replace(config, tp=1),
        tokenizer=dict(info.get("tokenizer") or {}), state_dict=state, step=int(marker["step"]),
        source_topology=marker_topology,
    )


def _consolidate_init_dir(init_dir: Path, info: dict, progress: bool) -> ConsolidatedCheckpoint:
    """An init directory (tools/convert_from_hf.py): safetensors per TP rank, merged like a checkpoint's shards."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from tqdm import tqdm

    recipe, config = read_recipe_config(info, str(init_dir / checkpoint.MODEL_INFO))
    layout = TPLayout.of_recipe(recipe, config)
    shards = []
    for rank in tqdm(range(config.tp), desc="reading TP ranks", unit="rank", disable=not progress):
        path = init_dir / init_shard_name(rank)
        try:
            shards.append(load_file(str(path)))
        except (FileNotFoundError, SafetensorError, OSError) as err:
            raise CheckpointError(
                f"{path}: missing or unreadable ({type(err).__name__}); the directory is partial") from None
    state = layout.merge(shards, str(init_dir), recipe.name)
    tp = config.tp
    return ConsolidatedCheckpoint(
        tag_dir=init_dir, recipe=recipe, preset=info.get("preset"), config=replace(config, tp=1),
        tokenizer=dict(info.get("tokenizer") or {}), state_dict=state, step=0,
        source_topology={"world_size": tp, "tp": tp, "pp": 1, "dp": 1},
    )


def _read_marker_topology(tag_dir: Path) -> dict:
    path = tag_dir / checkpoint.COMPLETE
    try:
        topology = json.loads(path.read_text())["topology"]
        return {k: int(topology[k]) for k in ("world_size", "tp", "pp", "dp")}
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        raise CheckpointError(f"{path}: corrupt marker (expected JSON with a topology)") from None
