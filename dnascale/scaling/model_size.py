"""Parameter counts of a resolved model config (a preset with a sweep's overrides), the way tools/param_counts.py
counts presets: build through the recipe on the `meta` device at tp=1 (shapes only, instant even at 1.2B) and sum,
then split off the embeddings with the family's analytic `count_parameters` where it has one.

Non-embedding parameters are what scaling laws are stated in (Kaplan et al. 2020): token tables cost no matmul
FLOPs and their size follows the vocabulary, which differs between the tokenisations compared here.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ModelSize:
    total: int
    non_embedding: int

    @property
    def embedding(self) -> int:
        return self.total - self.non_embedding


def model_size(model: str, config: Any) -> ModelSize:
    import torch
    import torch.nn as nn

    from dnascale.models.registry import get_recipe

    recipe = get_recipe(model)
    if getattr(config, "tp", 1) != 1:
        config = dataclasses.replace(config, tp=1)  # the whole model, whatever TP size it trains at
    with torch.device("meta"):
        net = recipe.build(config, None)
    total = sum(p.numel() for p in net.parameters())
    analytic = getattr(importlib.import_module(recipe.config_cls.__module__), "count_parameters", None)
    if analytic is not None:
        split = analytic(config)
        if split.get("non_embedding") is not None:
            return ModelSize(total, int(split["non_embedding"]))
        if split.get("embedding") is not None:
            return ModelSize(total, total - int(split["embedding"]))
    # No analytic split: every nn.Embedding table is an embedding.
    embedding = sum(p.numel() for m in net.modules() if isinstance(m, nn.Embedding) for p in m.parameters())
    return ModelSize(total, total - embedding)
