"""Write an HF model directory from a consolidated (TP=1, fp32) dnascale checkpoint.

    config.json                       the family's HF config (dnascale config fields, tokenizer, auto_map)
    model.safetensors                 or model-0000i-of-0000n.safetensors + model.safetensors.index.json
    tokenizer.json, tokenizer_config.json, special_tokens_map.json, dnascale_tokenizer.json (+ bpe.model)
    configuration_dnascale.py, modeling_dnascale.py   trust_remote_code entry points (they import dnascale)

The weights pass through the recipe's declarative adapter (dnascale.models.hf_adapter); nothing else changes them
but the optional cast to bf16.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from dnascale.data.tokenizers import Tokenizer, load_tokenizer
from dnascale.errors import CheckpointError, ConfigError
from dnascale.hf.auto import FAMILY_MODULES, family_classes

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
CONFIG_SHIM = "configuration_dnascale.py"
MODELING_SHIM = "modeling_dnascale.py"


@dataclass(frozen=True)
class ExportOptions:
    dtype: str = "fp32"  # "fp32" | "bf16"
    max_shard_bytes: int = 2 * 1024**3  # above this, the weights are split into several files plus an index
    progress: bool = True


def check_tokenizer(tokenizer_info: dict, config: Any, source: str) -> Tokenizer:
    """The tokenizer a checkpoint names, checked against the name it recorded and the model's vocabulary."""
    spec = tokenizer_info.get("spec")
    if not spec:
        raise CheckpointError(f"{source}: no tokenizer spec recorded")
    tokenizer = load_tokenizer(spec)
    recorded = tokenizer_info.get("name")
    if recorded is not None and tokenizer.name != recorded:
        raise CheckpointError(f"{source}: tokenizer spec {spec!r} loads {tokenizer.name!r}, but the checkpoint was "
                              f"trained with {recorded!r}; mismatched tokenizer")
    if tokenizer.vocab_size > config.vocab_size:
        raise CheckpointError(f"{source}: tokenizer {tokenizer.name!r} has {tokenizer.vocab_size} ids but the model's "
                              f"vocab_size is {config.vocab_size}; mismatched tokenizer")
    return tokenizer


def _shards(state: Mapping[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Greedy split in name order; a tensor larger than max_bytes gets a file of its own."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(state):
        tensor = state[name]
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    return shards


def write_weights(state: Mapping[str, torch.Tensor], out_dir: Path, max_bytes: int, progress: bool) -> list[str]:
    from safetensors.torch import save_file
    from tqdm import tqdm

    shards = _shards(state, max_bytes)
    names = [WEIGHTS] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in tqdm(list(zip(names, shards)), desc="writing safetensors", unit="file", disable=not progress):
        # safetensors refuses tensors that share storage or are views; every exported tensor gets its own copy.
        save_file({k: v.detach().contiguous().clone() for k, v in shard.items()}, str(out_dir / name),
                  metadata={"format": "pt"})
    if len(shards) > 1:
        total = sum(t.numel() * t.element_size() for t in state.values())
        index = {"metadata": {"total_size": total},
                 "weight_map": {k: name for name, shard in zip(names, shards) for k in shard}}
        (out_dir / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return names


def _write_shims(out_dir: Path, recipe_name: str, classes: dict[str, type]) -> dict[str, str]:
    """trust_remote_code entry points: thin re-exports of the installed dnascale package's classes."""
    module = FAMILY_MODULES[recipe_name]
    config_cls = classes["AutoConfig"].__name__
    models = sorted(cls.__name__ for auto, cls in classes.items() if auto != "AutoConfig")
    note = ('"""Remote-code entry point of a dnascale export: the classes live in the installed `dnascale` package\n'
            '(pip install dnascale); see its docs/architecture.md, "Checkpoint conversion"."""\n\n')
    (out_dir / CONFIG_SHIM).write_text(note + f"from {module} import {config_cls}  # noqa: F401\n")
    (out_dir / MODELING_SHIM).write_text(
        note + f"from {module} import {config_cls}, {', '.join(models)}  # noqa: F401\n")
    auto_map = {"AutoConfig": f"{CONFIG_SHIM[:-3]}.{config_cls}"}
    auto_map.update({auto: f"{MODELING_SHIM[:-3]}.{cls.__name__}"
                     for auto, cls in classes.items() if auto != "AutoConfig"})
    return auto_map


def export_hf(consolidated: Any, out_dir: str | os.PathLike[str], options: ExportOptions = ExportOptions()) -> Path:
    """`consolidated`: a dnascale.convert.consolidate.ConsolidatedCheckpoint (or anything with the same fields)."""
    if options.dtype not in DTYPES:
        raise ConfigError(f"--dtype {options.dtype!r}: choose one of {sorted(DTYPES)}")
    recipe = consolidated.recipe
    source = str(consolidated.tag_dir)
    tokenizer = check_tokenizer(consolidated.tokenizer, consolidated.config, source)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    classes = family_classes(recipe.name)
    auto_map = _write_shims(out, recipe.name, classes)
    architecture = classes.get("AutoModelForMaskedLM") or classes.get("AutoModelForSeq2SeqLM") or classes["AutoModel"]
    tokenizer_info = dict(consolidated.tokenizer, name=tokenizer.name, vocab_size=tokenizer.vocab_size)
    extra_fields, extra_tensors = classes["AutoConfig"].export_extras(consolidated.config)
    hf_config = classes["AutoConfig"].from_recipe_config(
        consolidated.config, consolidated.preset, tokenizer_info, **extra_fields, architectures=[architecture.__name__],
        auto_map=auto_map, dtype={"fp32": "float32", "bf16": "bfloat16"}[options.dtype],
    )
    hf_config.save_pretrained(str(out))
    dtype = DTYPES[options.dtype]
    state = {k: v.to(dtype) for k, v in recipe.hf_adapter.to_hf(consolidated.state_dict).items()}
    state.update(extra_tensors)  # not weights: kept in their own dtype
    write_weights(state, out, options.max_shard_bytes, options.progress)
    tokenizer.save_hf(out)
    tokenizer.save(out)  # dnascale's own description, so convert_from_hf (and load_tokenizer) can read it back
    classes["AutoConfig"].export_files(consolidated.config, out)
    return out
