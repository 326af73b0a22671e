"""Where the pretraining data comes from: a given shard directory, or the bundled genomes sharded on first use."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch.distributed as dist

from dnascale.data.shards import ShardConfig, build_shards, file_sha256, load_manifest
from dnascale.errors import DataError

BUNDLED_GENOMES = Path(__file__).resolve().parents[1] / "genomes"
DEFAULT_CORPUS = ("scerevisiae_r64_chrI.fna.gz", "ecoli_k12_mg1655.fna.gz")


def cache_root() -> Path:
    return Path(os.environ.get("DNASCALE_CACHE", Path.home() / ".cache" / "dnascale"))


def bundled_shards(window: int, tokenizer: str, seed: int = 0) -> Path:
    """Shards of the bundled genomes for this window/tokenizer, built once into the cache (atomically)."""
    inputs = [BUNDLED_GENOMES / name for name in DEFAULT_CORPUS]
    config = ShardConfig(window=window, tokenizer=tokenizer, seed=seed, val_fraction=0.02)
    key_material = json.dumps(
        {"inputs": [file_sha256(p) for p in inputs], "config": config.to_dict()}, sort_keys=True, default=str
    )
    key = hashlib.sha256(key_material.encode()).hexdigest()[:16]
    target = cache_root() / "shards" / f"bundled-{tokenizer}-w{window}-{key}"
    if (target / "manifest.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        build_shards(inputs, staging, config, overwrite=True)
        try:
            staging.rename(target)
        except OSError:
            pass  # another process finished the same build first; its result is identical
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve_data(data: str | None, window: int, tokenizer: str, rank: int) -> Path:
    """The shard directory to train on; rank 0 builds the bundled one while the others wait."""
    if data is not None:
        path = Path(data)
        if not path.exists():
            raise DataError(f"{data}: data path does not exist (expected a shard directory from tools/build_shards.py)")
        load_manifest(path)
        return path
    if rank == 0:
        path = bundled_shards(window, tokenizer)
    if dist.is_initialized():
        dist.barrier()
    if rank != 0:
        path = bundled_shards(window, tokenizer)  # now a cache hit
    return path
