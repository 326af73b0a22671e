"""Model recipes: the only door through which the training loop, launchers and converters reach a model family.

A `ModelRecipe` bundles what the rest of the stack needs to know about one family: its config class, how to
build it, its masking collator, its FLOPs per token, and (when they exist) its HF state-dict adapter, pipeline
split and tokenizer. Presets are YAML files `dnascale/presets/<recipe>-<preset>.yaml` whose `model:` mapping
holds the config fields; other top-level sections (training, data) belong to dnascale/config.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any, Callable

import torch.nn as nn
import yaml

from dnascale.config import from_dict
from dnascale.data.masking import MLMCollator
from dnascale.data.tokenizers import load_tokenizer
from dnascale.errors import ConfigError
from dnascale.models.hf_adapter import HFAdapter
from dnascale.models.encoder import EncoderConfig, EncoderForMLM, flops_per_token as encoder_flops_per_token
from dnascale.models.encoder_pipeline import pipeline_split as encoder_pipeline_split
from dnascale.models.pipeline_split import PipelineSplit
from dnascale.parallel import ParallelState


@dataclass(frozen=True)
class ModelRecipe:
    name: str
    config_cls: type
    build: Callable[[Any, ParallelState | None], nn.Module]
    # (config, tokenizer, seed) -> collate function producing the family's Batch; None until one is written.
    make_collator: Callable[[Any, Any, int], Callable] | None
    # (config, seq_len) -> training FLOPs (forward + backward) per token.
    flops_per_token: Callable[[Any, int], float]
    # config -> bases per training window (shards are cut to it; the tokenizer template must still fit).
    data_window: Callable[[Any], int]
    hf_adapter: Any = None
    # config -> the model as pipeline layers (dnascale.models.pipeline_split); None: this family cannot run --pp > 1.
    pipeline_split: Callable[[Any], PipelineSplit] | None = None
    tokenizer: str = "nucleotide-char"


_RECIPES: dict[str, ModelRecipe] = {}
ENCODER_TOKENIZER = "nucleotide-char"


def register(recipe: ModelRecipe) -> ModelRecipe:
    if recipe.name in _RECIPES:
        raise ValueError(f"a model recipe named {recipe.name!r} is already registered")
    _RECIPES[recipe.name] = recipe
    return recipe


def get_recipe(name: str) -> ModelRecipe:
    try:
        return _RECIPES[name]
    except KeyError:
        raise ConfigError(f"unknown model {name!r}; known models: {list_recipes()}") from None


def list_recipes() -> list[str]:
    return sorted(_RECIPES)


def _presets_dir(presets_dir: Path | None) -> Traversable:
    return presets_dir if presets_dir is not None else resources.files("dnascale").joinpath("presets")


def list_presets(recipe_name: str, presets_dir: Path | None = None) -> list[str]:
    prefix = f"{recipe_name}-"
    return sorted(
        entry.name[len(prefix) : -len(".yaml")]
        for entry in _presets_dir(presets_dir).iterdir()
        if entry.name.startswith(prefix) and entry.name.endswith(".yaml")
    )


def load_preset(recipe_name: str, preset: str, presets_dir: Path | None = None) -> Any:
    """The validated config of `<recipe>-<preset>.yaml` (its `model:` mapping -> the recipe's config class).

    Presets ship in dnascale/presets; `presets_dir` points at another folder of the same layout.
    """
    recipe = get_recipe(recipe_name)
    available = list_presets(recipe_name, presets_dir)
    if preset not in available:
        raise ConfigError(f"unknown preset {preset!r} for model {recipe_name!r}; available: {available}")
    path = _presets_dir(presets_dir).joinpath(f"{recipe_name}-{preset}.yaml")
    try:
        document = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path.name}: not valid YAML ({err})") from None
    fields = document.get("model") if isinstance(document, dict) else None
    if not isinstance(fields, dict):
        raise ConfigError(f"{path.name}: expected a top-level 'model:' mapping of {recipe.config_cls.__name__} fields")
    return from_dict(recipe.config_cls, fields, source=path.name)  # types, unknown fields, then validate()


def _build_encoder(config: EncoderConfig, parallel: ParallelState | None) -> EncoderForMLM:
    if parallel is not None and parallel.tp_size != config.tp:
        raise ConfigError(f"tp={config.tp} in the model config but the run was started with tp={parallel.tp_size}")
    return EncoderForMLM(config)


def _encoder_data_window(config: EncoderConfig) -> int:
    # One base per token: a window fills max_seq_len once the tokenizer's template ([SEP]) is added.
    template = load_tokenizer(ENCODER_TOKENIZER).template
    return config.max_seq_len - len(template.prefix) - len(template.suffix)


def _encoder_collator(config: EncoderConfig, tokenizer: Any, seed: int) -> MLMCollator:
    # BERT masking: 15% of the bases, 80/10/10 [MASK] / random base / unchanged.
    return MLMCollator(tokenizer, seed=seed, max_length=config.max_seq_len)


register(
    ModelRecipe(
        name="encoder",
        config_cls=EncoderConfig,
        build=_build_encoder,
        make_collator=_encoder_collator,
        flops_per_token=encoder_flops_per_token,
        data_window=_encoder_data_window,
        tokenizer=ENCODER_TOKENIZER,
        hf_adapter=HFAdapter(model_type="dnascale-encoder", class_prefix="DnascaleEncoder"),
        pipeline_split=encoder_pipeline_split,
    )
)


# ENBED (byte-level encoder-decoder): dnascale/models/enbed.py, presets enbed-{tiny,base,large,1b2}.yaml.
from dnascale.models import enbed as _enbed  # noqa: E402

register(
    ModelRecipe(
        name="enbed",
        config_cls=_enbed.EnbedConfig,
        build=_enbed.build,
        make_collator=_enbed.make_collator,
        flops_per_token=_enbed.flops_per_token,
        data_window=_enbed.data_window,
        tokenizer=_enbed.ENBED_TOKENIZER,
        # Encoder-decoder: its head predicts decoder targets, so AutoModelForSeq2SeqLM instead of masked LM.
        hf_adapter=HFAdapter(model_type="dnascale-enbed", class_prefix="DnascaleEnbed", masked_lm=False),
    )
)


# DNAZEN (BPE encoder + PMI G-gram encoder, layer-wise fusion): dnascale/models/dnazen.py,
# presets dnazen-{tiny,base,1b2}.yaml; tokenizer and G-gram vocabulary bundled in dnascale/assets/dnazen.
from dnascale.models import dnazen as _dnazen  # noqa: E402

register(
    ModelRecipe(
        name="dnazen",
        config_cls=_dnazen.DnazenConfig,
        build=_dnazen.build,
        make_collator=_dnazen.make_collator,
        flops_per_token=_dnazen.flops_per_token,
        data_window=_dnazen.data_window,
        tokenizer=_dnazen.DNAZEN_TOKENIZER,
        hf_adapter=HFAdapter(model_type="dnascale-dnazen", class_prefix="DnascaleDnazen",
                             extra_inputs=("ggram_ids", "ggram_triplets")),
    )
)


# DNACHUNKER (learned two-stage chunking around a RoPE trunk): dnascale/models/dnachunker/, presets
# dnachunker-{tiny,172m,1b2}.yaml.
from dnascale.models import dnachunker as _dnachunker  # noqa: E402

register(
    ModelRecipe(
        name="dnachunker",
        config_cls=_dnachunker.DNAChunkerConfig,
        build=_dnachunker.build,
        make_collator=_dnachunker.make_collator,
        flops_per_token=_dnachunker.flops_per_token,
        data_window=_dnachunker.data_window,
        tokenizer=_dnachunker.TOKENIZER,
        hf_adapter=HFAdapter(model_type="dnascale-dnachunker", class_prefix="DnascaleDnachunker"),
    )
)
