"""The model behind an inference run: a checkpoint (any ZeRO stage, DP and TP size, or an init dir) or an HF export,
read by the fine-tuning loader (dnascale.finetune.run.load_backbone -> dnascale/convert/consolidate.py or
dnascale.hf.load), built whole (heads included: MLM scores need them) at TP=1 on one device, in eval mode."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dnascale.errors import CheckpointError, ConfigError
from dnascale.infer.families import FamilyRunner, runner_for


@dataclass(frozen=True)
class LoadedModel:
    recipe: str
    preset: str
    config: Any
    checkpoint: str  # resolved path as given
    weights_sha256: str  # of the loaded fp32 weights: a checkpoint directory whose `latest` moved is another model
    runner: FamilyRunner


def _weights_digest(state: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().to(torch.float32).contiguous().cpu()
        digest.update(name.encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def resolve_device(name: str) -> torch.device:
    if name not in ("cpu", "cuda"):
        raise ConfigError(f"--device {name!r}: choose cpu or cuda")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: this machine has no CUDA device (torch.cuda.is_available() is False)")
    return torch.device(name)


def load_model(checkpoint: str, device: torch.device, autocast_dtype: torch.dtype | None = None) -> LoadedModel:
    from dnascale.finetune.run import FinetuneConfig, load_backbone
    from dnascale.models.registry import get_recipe
    from dnascale.parallel import init_distributed

    if checkpoint == "none":
        raise CheckpointError("inference needs trained weights: give a checkpoint or an HF export, not 'none'")
    backbone = load_backbone(FinetuneConfig(task="", out="", checkpoint=checkpoint))
    init_distributed(tp=1, seed=0)  # megatron's groups at TP=1: the weights were merged to one rank
    recipe = get_recipe(backbone.recipe)
    model = recipe.build(backbone.config, None)
    missing, _ = model.load_state_dict(backbone.state_dict, strict=False)
    if missing:
        raise CheckpointError(f"{checkpoint}: lacks {len(missing)} of the model's weights, e.g. {missing[0]}")
    model.to(device).eval()
    runner = runner_for(recipe, model, backbone.config, backbone.tokenizer_spec, device, autocast_dtype)
    return LoadedModel(backbone.recipe, backbone.preset, backbone.config, str(Path(checkpoint).resolve()),
                       _weights_digest(backbone.state_dict), runner)
