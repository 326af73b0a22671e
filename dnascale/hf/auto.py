"""Which HF classes each family has, and their registration with transformers' Auto classes.

Class names follow the recipe's adapter: `<class_prefix>Config`, `...Model`, `...ForMaskedLM` (masked-LM
families), `...ForConditionalGeneration` (ENBED, encoder-decoder), `...ForSequenceClassification`.
"""

from __future__ import annotations

import importlib

from dnascale.models.registry import get_recipe

# recipe -> the module holding its HF classes (one file per family)
FAMILY_MODULES = {
    "encoder": "dnascale.hf.encoder",
    "enbed": "dnascale.hf.enbed",
    "dnazen": "dnascale.hf.dnazen",
    "dnachunker": "dnascale.hf.dnachunker",
}
# Auto class -> class-name suffix
_SUFFIXES = {
    "AutoConfig": "Config",
    "AutoModel": "Model",
    "AutoModelForMaskedLM": "ForMaskedLM",
    "AutoModelForSeq2SeqLM": "ForConditionalGeneration",
    "AutoModelForSequenceClassification": "ForSequenceClassification",
}


def family_classes(recipe_name: str) -> dict[str, type]:
    """Auto class name -> this family's class, for the Auto classes it supports."""
    module = importlib.import_module(FAMILY_MODULES[recipe_name])
    prefix = get_recipe(recipe_name).hf_adapter.class_prefix
    found = {auto: getattr(module, prefix + suffix, None) for auto, suffix in _SUFFIXES.items()}
    return {auto: cls for auto, cls in found.items() if cls is not None}


def model_type_to_recipe() -> dict[str, str]:
    return {get_recipe(name).hf_adapter.model_type: name for name in FAMILY_MODULES}


_registered = False


def register_auto_classes() -> None:
    """AutoConfig.register / AutoModel*.register for every family (idempotent)."""
    global _registered
    if _registered:
        return
    import transformers

    for recipe_name in FAMILY_MODULES:
        classes = family_classes(recipe_name)
        config_cls = classes.pop("AutoConfig")
        transformers.AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
        for auto_name, cls in classes.items():
            getattr(transformers, auto_name).register(config_cls, cls, exist_ok=True)
    _registered = True
