"""Read an HF directory written by dnascale.hf.export back into dnascale weights, and write them per TP rank.

An "init directory" (tools/convert_from_hf.py's output) holds what a dnascale model of that family needs to start
from these weights at a chosen TP size:

    dnascale_model.json          recipe, preset, config (tp = the chosen size), tokenizer; "format": "dnascale-init"
    tp_rank_00.safetensors ...   each TP rank's slice of every parameter (dnascale names, the HF file's dtype)

dnascale.convert.init_weights loads a rank's file into a built model; dnascale.convert.consolidate reads the
directory back (merging the ranks) so tools/convert_to_hf.py accepts it too.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dnascale.config import from_dict
from dnascale.convert.tp_layout import TPLayout
from dnascale.errors import CheckpointError
from dnascale.hf.auto import model_type_to_recipe
from dnascale.hf.export import INDEX, WEIGHTS, check_tokenizer
from dnascale.models.registry import ModelRecipe, get_recipe

from dnascale.convert.init_weights import INIT_FORMAT, MODEL_INFO, init_shard_name


@dataclass(frozen=True)
class HFCheckpoint:
    hf_dir: Path
    recipe: ModelRecipe
    preset: str | None
    config: Any  # the recipe's config class, tp=1
    tokenizer: dict  # name, spec, vocab_size
    state_dict: dict[str, torch.Tensor]  # dnascale names, full (TP=1) tensors


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path.parent}: no {path.name}; not an HF model directory") from None
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: not valid JSON ({err.msg})") from None


def _read_weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if (hf_dir / INDEX).is_file():
        files = sorted(set(_read_json(hf_dir / INDEX).get("weight_map", {}).values()))
    elif (hf_dir / WEIGHTS).is_file():
        files = [WEIGHTS]
    else:
        raise CheckpointError(f"{hf_dir}: no {WEIGHTS} or {INDEX}; only safetensors weights are read")
    state: dict[str, torch.Tensor] = {}
    for name in files:
        try:
            state.update(load_file(str(hf_dir / name)))  # safetensors: no pickle, nothing executes
        except (FileNotFoundError, SafetensorError, OSError) as err:
            raise CheckpointError(f"{hf_dir / name}: unreadable ({type(err).__name__}: {err})") from None
    return state


def _check_hf_tokenizer(hf_dir: Path, tokenizer_info: dict, config: Any) -> None:
    """tokenizer.json next to the weights must be the tokenizer the config names (same size, same ids)."""
    path = hf_dir / "tokenizer.json"
    if not path.is_file():
        return  # weights-only directory: the tokenizer the config names is used
    document = _read_json(path)
    vocab = document.get("model", {}).get("vocab", {})  # a dict (WordLevel, BPE) or a list (Unigram)
    size = max([len(vocab)] + [int(t.get("id", -1)) + 1 for t in document.get("added_tokens", [])])
    expected = tokenizer_info.get("vocab_size")
    if expected is not None and size != expected:
        raise CheckpointError(f"{path}: {size} token ids but config.json's tokenizer_info "
                              f"({tokenizer_info.get('name')}) has {expected}; mismatched tokenizer")
    if size > config.vocab_size:
        raise CheckpointError(f"{path}: {size} token ids but the model's vocab_size is {config.vocab_size}; "
                              f"mismatched tokenizer")


def read_hf(hf_dir: str | os.PathLike[str]) -> HFCheckpoint:
    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        raise CheckpointError(f"{hf_dir}: no such directory")
    config_path = hf_dir / "config.json"
    hf_config = _read_json(config_path)
    families = model_type_to_recipe()
    model_type = hf_config.get("model_type")
    if model_type not in families:
        raise CheckpointError(f"{config_path}: model_type {model_type!r} is not a dnascale family; expected one of "
                              f"{sorted(families)}")
    recipe = get_recipe(families[model_type])
    fields = hf_config.get("dnascale_config")
    config = from_dict(recipe.config_cls, dict(fields or {}, tp=1) if isinstance(fields, dict) else fields,
                       source=f"{config_path}: dnascale_config")
    tokenizer_info = dict(hf_config.get("tokenizer_info") or {})
    state = recipe.hf_adapter.from_hf(_read_weights(hf_dir))
    layout = TPLayout.of_recipe(recipe, config)
    layout.check_keys(state, str(hf_dir), recipe.name)  # first: another family's weights is the likelier mix-up
    _check_hf_tokenizer(hf_dir, tokenizer_info, config)
    for name, shape in layout.shapes.items():
        if tuple(state[name].shape) != shape:
            raise CheckpointError(f"{hf_dir}: {name} has shape {tuple(state[name].shape)} but config.json's "
                                  f"dnascale_config gives {shape}")
    return HFCheckpoint(hf_dir, recipe, hf_config.get("preset"), config, tokenizer_info,
                        {k: state[k] for k in layout.shapes})


def write_init_dir(checkpoint: HFCheckpoint, out_dir: str | os.PathLike[str], tp: int, progress: bool = True) -> Path:
    """Split the weights over `tp` ranks (megatron layouts) and write an init directory."""
    from safetensors.torch import save_file
    from tqdm import tqdm

    config = dataclasses.replace(checkpoint.config, tp=tp)
    config.validate()  # names the field that does not divide by tp (heads, ffn_hidden, vocab_pad_multiple ...)
    if checkpoint.tokenizer:
        check_tokenizer(checkpoint.tokenizer, config, str(checkpoint.hf_dir / "config.json"))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    layout = TPLayout.of_recipe(checkpoint.recipe, config)
    for rank in tqdm(range(tp), desc="writing TP ranks", unit="rank", disable=not progress):
        shard = layout.split(checkpoint.state_dict, rank, tp)
        save_file({k: v.clone() for k, v in shard.items()}, str(out / init_shard_name(rank)), metadata={"format": "pt"})
    info = {"format": INIT_FORMAT, "recipe": checkpoint.recipe.name, "preset": checkpoint.preset,
            "config": dataclasses.asdict(config), "tokenizer": checkpoint.tokenizer, "source": str(checkpoint.hf_dir)}
    (out / MODEL_INFO).write_text(json.dumps(info, indent=1, sort_keys=True, default=str) + "\n")
    return out
