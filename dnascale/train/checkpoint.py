"""Atomic, resumable checkpoints: DeepSpeed's model/optimizer/scheduler state plus ours (step, data position, RNG).

Layout of `<out>/checkpoints/`:
  latest                   the tag of the newest COMPLETE checkpoint (written atomically, last)
  step_000100/             DeepSpeed's files (every rank's ZeRO partitions and the module states)
    client_rank00000.pt    per rank: step, loader state, RNG states, dp_rank, grad_accum (tensors and plain types)
    dnascale_model.json    the recipe name, preset, full model config and tokenizer: what the weights are
    COMPLETE               JSON: step, topology and the size of every file, written after all ranks finished

`latest` only ever names a checkpoint whose COMPLETE marker exists, so a run killed mid-save resumes from the
previous one. Our own files are read with `torch.load(weights_only=True)`; DeepSpeed reads its own files.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from dnascale.errors import CheckpointError

LATEST = "latest"
COMPLETE = "COMPLETE"


def tag_for(step: int) -> str:
    return f"step_{step:07d}"


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _to_safe(value: Any) -> Any:
    """Turn numpy RNG arrays into tensors so the file loads with weights_only=True."""
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value.copy())
    if isinstance(value, dict):
        return {k: _to_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_safe(v) for v in value)
    return value


@dataclass(frozen=True)
class Topology:
    world_size: int
    tp: int
    pp: int
    dp: int

    def to_dict(self) -> dict:
        return {"world_size": self.world_size, "tp": self.tp, "pp": self.pp, "dp": self.dp}


MODEL_INFO = "dnascale_model.json"


def save(engine, checkpoint_dir: str | Path, step: int, client_state: dict, topology: Topology, rank: int,
         model_info: dict, keep: int | None = None) -> Path:
    """Collective: every rank calls it. Returns the checkpoint's directory. Keeps the newest `keep` tags."""
    root = Path(checkpoint_dir)
    tag = tag_for(step)
    engine.save_checkpoint(str(root), tag=tag, save_latest=False)
    tag_dir = root / tag
    if rank == 0:
        _atomic_write_text(tag_dir / MODEL_INFO, json.dumps(model_info, indent=1, sort_keys=True, default=str))
    client_path = tag_dir / f"client_rank{rank:05d}.pt"
    tmp = client_path.with_name(client_path.name + ".tmp")
    torch.save(_to_safe(client_state), tmp)
    os.replace(tmp, client_path)
    if dist.is_initialized():
        dist.barrier()
    if rank == 0:
        files = {p.name: p.stat().st_size for p in sorted(tag_dir.iterdir()) if p.is_file() and p.name != COMPLETE}
        marker = {"step": step, "topology": topology.to_dict(), "files": files}
        _atomic_write_text(tag_dir / COMPLETE, json.dumps(marker, indent=1, sort_keys=True))
        _atomic_write_text(root / LATEST, tag)
        if keep is not None:
            _prune(root, keep)
    if dist.is_initialized():
        dist.barrier()
    return tag_dir


def _prune(root: Path, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints (never the one `latest` names)."""
    import shutil

    latest = (root / LATEST).read_text().strip()
    complete = sorted(p for p in root.glob("step_*") if (p / COMPLETE).is_file())
    for old in complete[: max(0, len(complete) - keep)]:
        if old.name != latest:
            shutil.rmtree(old, ignore_errors=True)


def find_resume_tag(checkpoint_dir: str | Path) -> str | None:
    """The tag `latest` names, or None when the directory holds no checkpoint yet."""
    latest = Path(checkpoint_dir) / LATEST
    if not latest.is_file():
        return None
    tag = latest.read_text().strip()
    if not tag:
        raise CheckpointError(f"{latest}: empty; the checkpoint directory is corrupt")
    return tag


def verify(checkpoint_dir: str | Path, tag: str, topology: Topology) -> dict:
    """Check the COMPLETE marker, every listed file's size and the topology; return the marker."""
    tag_dir = Path(checkpoint_dir) / tag
    marker_path = tag_dir / COMPLETE
    if not tag_dir.is_dir():
        raise CheckpointError(f"{tag_dir}: checkpoint directory is missing")
    if not marker_path.is_file():
        raise CheckpointError(f"{tag_dir}: partial checkpoint (no {COMPLETE} marker); it was not finished")
    try:
        marker = json.loads(marker_path.read_text())
    except json.JSONDecodeError:
        raise CheckpointError(f"{marker_path}: corrupt marker (not JSON)") from None
    for name, size in marker.get("files", {}).items():
        path = tag_dir / name
        if not path.is_file():
            raise CheckpointError(f"{tag_dir}: file {name} listed in {COMPLETE} is missing")
        if path.stat().st_size != size:
            raise CheckpointError(f"{path}: size {path.stat().st_size} bytes, expected {size}; the file is corrupt")
    saved = marker.get("topology", {})
    if saved != topology.to_dict():
        raise CheckpointError(
            f"{tag_dir}: written with {saved}, this run has {topology.to_dict()}; load it with dnascale.train.reshard"
        )
    return marker


def saved_topology(checkpoint_dir: str | Path, tag: str) -> Topology | None:
    """The topology a checkpoint was written with, or None when its marker is missing or unreadable (then
    `verify` names the problem)."""
    try:
        raw = json.loads((Path(checkpoint_dir) / tag / COMPLETE).read_text())["topology"]
        return Topology(**{k: int(raw[k]) for k in ("world_size", "tp", "pp", "dp")})
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError):
        return None


def read_model_info(tag_dir: str | Path) -> dict:
    path = Path(tag_dir) / MODEL_INFO
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{tag_dir}: no {MODEL_INFO}; not a dnascale checkpoint") from None
    except json.JSONDecodeError:
        raise CheckpointError(f"{path}: corrupt (not JSON)") from None


def load(engine, checkpoint_dir: str | Path, tag: str, topology: Topology, rank: int, recipe: str) -> dict:
    """Collective: load DeepSpeed state into `engine` and return this rank's client state."""
    marker = verify(checkpoint_dir, tag, topology)
    tag_dir = Path(checkpoint_dir) / tag
    saved_recipe = read_model_info(tag_dir).get("recipe")
    if saved_recipe != recipe:
        raise CheckpointError(f"{tag_dir}: a {saved_recipe!r} checkpoint, but this run trains {recipe!r}")
    try:
        path, _ = engine.load_checkpoint(
            str(checkpoint_dir), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
        )
    except (RuntimeError, KeyError, EOFError, OSError) as err:
        raise CheckpointError(f"{tag_dir}: DeepSpeed could not load it ({type(err).__name__}: {err})") from None
    if path is None:
        raise CheckpointError(f"{tag_dir}: DeepSpeed found no loadable checkpoint")
    client_path = tag_dir / f"client_rank{rank:05d}.pt"
    try:
        client = torch.load(client_path, weights_only=True, map_location="cpu")
    except Exception as err:  # any failure here means the file is not what we wrote
        raise CheckpointError(f"{client_path}: unreadable ({type(err).__name__})") from None
    if client.get("step") != marker["step"]:
        raise CheckpointError(f"{client_path}: step {client.get('step')} but {COMPLETE} says {marker['step']}")
    return client
