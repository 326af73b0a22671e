"""Resume a ZeRO-3 checkpoint at another data-parallel and/or tensor-parallel size, Adam state included.

Weights and optimizer state, in three steps; each is done by the party that knows that layout:
  1. ZeRO partitions -> whole TP shards: DeepSpeed's own `ds_to_universal` (ZeRO-3 path), run once per old TP
     rank on a symlink view that shows that rank's files as TP rank 0 (its TP merge needs universal-checkpoint
     patterns our megatron-core layers do not carry; see docs/architecture.md "Checkpoint conversion"). It writes
     one full fp32 / exp_avg / exp_avg_sq tensor per parameter and the optimizer's common state (Adam's step).
  2. TP shards -> full tensors -> this run's TP shards: `TPLayout.merge` / `TPLayout.split`, the same marks the
     HF converter uses. Replicated parameters' weights must agree on every TP rank; their Adam moments are
     taken from TP rank 0 (they agree up to summation order).
  3. Each rank loads its TP rank's universal folder with DeepSpeed's ZeRO-3 universal loader
     (`load_hp_checkpoint_state_from_checkpoint_dir_stage3`), which cuts every tensor into this DP group's
     partitions. Rank 0 does steps 1-2 once, into `<out>/reshard-<tag>/` (removed after the load), so the source
     checkpoint is only read.
What DeepSpeed's loader does not restore is set here: each parameter group's own hyperparameters (it copies
group 0's, which would decay the no-decay group), and the LR schedule, which is a pure function of the step.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import tempfile
import warnings
from argparse import Namespace
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from dnascale.convert.consolidate import zero_files_by_tp_rank, read_recipe_config
from dnascale.convert.tp_layout import TPLayout
from dnascale.errors import CheckpointError
from dnascale.train import checkpoint

ADAM_KEYS = ("fp32", "exp_avg", "exp_avg_sq")
OPTIMIZER_STATE = "optimizer_state.pt"


@dataclass(frozen=True)
class Reshard:
    """A resume whose checkpoint was written with `saved` topology, into this run's `current` one."""

    saved: checkpoint.Topology
    current: checkpoint.Topology

    def check(self, tag_dir: Path, zero_stage: int) -> None:
        """One-line errors for what cannot be resharded."""
        if self.saved.pp != 1 or self.current.pp != 1:
            raise CheckpointError(f"{tag_dir}: resharding a pipeline-parallel run (pp={self.saved.pp} -> "
                                  f"{self.current.pp}) is not supported")
        if zero_stage != 3:
            raise CheckpointError(f"{tag_dir}: resharding needs a ZeRO-3 ds_config (this run has stage {zero_stage})")


def _universal_one_tp_rank(files: list[Path], out: Path) -> None:
    """DeepSpeed's ds_to_universal on one old TP rank's files, shown to it as TP rank 0."""
    from deepspeed.checkpoint import ds_to_universal

    with tempfile.TemporaryDirectory(prefix="dnascale-reshard-") as view:
        tag = Path(view) / "tag"
        tag.mkdir()
        for path in files:
            name = path.name.replace(f"_mp_rank_{path.name.split('_mp_rank_')[1][:2]}_", "_mp_rank_00_")
            os.symlink(path.resolve(), tag / name)
        args = Namespace(input_folder=str(tag), output_folder=str(out), num_extract_workers=1,
                         num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=False)
        deepspeed_logger = logging.getLogger("DeepSpeed")
        level = deepspeed_logger.level
        deepspeed_logger.setLevel(logging.ERROR)
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                ds_to_universal.main(args)
        except (ValueError, KeyError, RuntimeError, EOFError, OSError, FileNotFoundError) as err:
            first = str(err).splitlines()[0] if str(err) else ""
            raise CheckpointError(f"{files[0].parent}: DeepSpeed could not convert it ({type(err).__name__}: "
                                  f"{first})") from None
        finally:
            deepspeed_logger.setLevel(level)


def _read_tensor(path: Path) -> torch.Tensor:
    value = torch.load(path, map_location="cpu", weights_only=True)
    return value["param"] if isinstance(value, dict) else value


def prepare(tag_dir: Path, work: Path, new_tp: int) -> None:
    """Rank 0: write `work/tp_rank_XX/zero/<param>/{fp32,exp_avg,exp_avg_sq}.pt` for every new TP rank."""
    info = checkpoint.read_model_info(tag_dir)
    recipe, config = read_recipe_config(info, str(tag_dir / checkpoint.MODEL_INFO))
    layout = TPLayout.of_recipe(recipe, config)
    by_tp = zero_files_by_tp_rank(tag_dir)
    if sorted(by_tp) != list(range(config.tp)):
        raise CheckpointError(f"{tag_dir}: expected ZeRO files for TP ranks 0..{config.tp - 1}, found "
                              f"{sorted(by_tp)}; only ZeRO-3 checkpoints can be resharded")
    universal = [work / f"old_tp{rank:02d}" / "tag" for rank in range(config.tp)]
    for rank, out in enumerate(universal):
        _universal_one_tp_rank(by_tp[rank], out)
    for key in ADAM_KEYS:
        shards = []
        for out in universal:
            shard = {}
            for name in layout.partition_dim:
                path = out / "zero" / name / f"{key}.pt"
                if not path.is_file():
                    raise CheckpointError(f"{tag_dir}: no {key} state for {name} after conversion")
                # DeepSpeed's ZeRO-3 merge writes flat tensors; the TP shard's shape is the layout's, cut by tp.
                shape = list(layout.shapes[name])
                dim = layout.partition_dim[name]
                if dim is not None:
                    shape[dim] //= config.tp
                shard[name] = _read_tensor(path).reshape(shape)
            shards.append(shard)
        if key != "fp32":  # moments of replicated parameters: TP rank 0's (weights are checked equal below)
            shards = [{n: (s[n] if layout.partition_dim[n] is not None else shards[0][n]) for n in s} for s in shards]
        full = layout.merge(shards, str(tag_dir), recipe.name)
        for tp_rank in range(new_tp):
            for name, tensor in layout.split(full, tp_rank, new_tp).items():
                target = work / f"tp_rank_{tp_rank:02d}" / "zero" / name
                target.mkdir(parents=True, exist_ok=True)
                torch.save(tensor.clone(), target / f"{key}.pt")
    for tp_rank in range(new_tp):  # Adam's step and the loss-scaler state: DeepSpeed's own file, copied as is
        target = work / f"tp_rank_{tp_rank:02d}" / "zero" / OPTIMIZER_STATE
        shutil.copy2(universal[0] / "zero" / OPTIMIZER_STATE, target)
    for out in universal:
        shutil.rmtree(out.parent, ignore_errors=True)


def load(engine, scheduler, resume_dir: Path, tag: str, work: Path, tp_rank: int, tp_size: int, step: int,
         rank: int) -> None:
    """Collective: reshard (rank 0) and load weights + Adam state into `engine`; set the LR schedule to `step`."""
    tag_dir = Path(resume_dir) / tag
    error = None
    if rank == 0:
        shutil.rmtree(work, ignore_errors=True)
        try:
            prepare(tag_dir, work, tp_size)
        except CheckpointError as err:
            error = str(err)
    if dist.is_initialized():  # every rank must raise the same error, or the others would hang in a barrier
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        raise CheckpointError(error)
    zero = engine.optimizer
    inner = zero.optimizer
    groups = [{k: v for k, v in group.items() if k != "params"} for group in inner.param_groups]
    zero.checkpoint_event_prologue()
    zero.load_hp_checkpoint_state_from_checkpoint_dir_stage3(str(work / f"tp_rank_{tp_rank:02d}"))
    zero.checkpoint_event_epilogue()
    for group, own in zip(inner.param_groups, groups):
        group.update(own)
    # LambdaLR's state is its step count: after `step` engine steps the factor is that of `step`.
    scheduler.last_epoch = step - 1
    with warnings.catch_warnings():  # "step() before optimizer.step()": expected, nothing was stepped yet
        warnings.simplefilter("ignore")
        scheduler.step()
    engine.global_steps = step
    if dist.is_initialized():
        dist.barrier()
    if rank == 0:
        shutil.rmtree(work, ignore_errors=True)


def read_clients(tag_dir: Path) -> dict[int, dict]:
    """Every rank's client file of a checkpoint (our own files: weights_only), by global rank."""
    clients = {}
    for path in sorted(tag_dir.glob("client_rank*.pt")):
        try:
            clients[int(path.stem[len("client_rank"):])] = torch.load(path, weights_only=True, map_location="cpu")
        except Exception as err:  # any failure here means the file is not what we wrote
            raise CheckpointError(f"{path}: unreadable ({type(err).__name__})") from None
    if not clients:
        raise CheckpointError(f"{tag_dir}: no client_rank*.pt files")
    return clients
