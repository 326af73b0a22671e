"""Shared HF classes: a config that carries the dnascale model config, and models that wrap the dnascale module.

The HF models hold the family's TP=1 dnascale module as `.dnascale` and call its own encode()/forward(), so the
HF forward is the training forward (no second implementation to drift). What that costs: the modeling code needs
the `dnascale` package (and torch, megatron-core) installed; see docs/architecture.md, "Checkpoint conversion".
Every family file (encoder.py, enbed.py, dnazen.py, dnachunker.py) subclasses these with its model_type.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput, MaskedLMOutput, SequenceClassifierOutput

from dnascale.config import from_dict
from dnascale.convert.tp_layout import EXTRA_STATE_SUFFIX
from dnascale.hf.runtime import ensure_single_process_groups
from dnascale.models.heads import IGNORE_INDEX
from dnascale.models.registry import get_recipe


class DnascaleConfig(PretrainedConfig):
    model_type = "dnascale"
    recipe_name: ClassVar[str] = ""

    dnascale_config: dict | None = None  # the recipe config's fields (tp is always 1 here)
    preset: str | None = None
    tokenizer_info: dict | None = None  # dnascale_model.json's tokenizer entry: name, spec, vocab_size
    classifier_dropout: float = 0.1
    hidden_size: int = 0
    vocab_size: int = 0

    def recipe_config(self) -> Any:
        recipe = get_recipe(self.recipe_name)
        fields = dict(self.dnascale_config or {}, tp=1)
        return from_dict(recipe.config_cls, fields, source="config.json: dnascale_config")

    @classmethod
    def export_extras(cls, config: Any) -> tuple[dict, dict[str, torch.Tensor]]:
        """(extra config.json fields, extra tensors for model.safetensors) a family exports beside its weights;
        none by default (DNAZEN ships its G-gram vocabulary this way)."""
        return {}, {}

    @classmethod
    def export_files(cls, config: Any, out_dir: Any) -> None:
        """Write the files a family's inputs need beside the weights (DNAZEN: its G-gram vocabulary), so a copied
        export needs nothing from the machine that trained it; none by default."""

    @classmethod
    def with_export_files(cls, config: Any, export_dir: Any) -> Any:
        """`config` pointed at the files `export_files` wrote into `export_dir` (unchanged where there are none)."""
        return config

    @classmethod
    def from_recipe_config(cls, config: Any, preset: str | None, tokenizer_info: dict, **kwargs) -> "DnascaleConfig":
        import dataclasses

        fields = dict(dataclasses.asdict(config), tp=1)
        return cls(dnascale_config=fields, preset=preset, tokenizer_info=dict(tokenizer_info),
                   hidden_size=int(config.hidden), vocab_size=int(config.vocab_size), **kwargs)


class DnascalePreTrainedModel(PreTrainedModel):
    config_class = DnascaleConfig
    base_model_prefix = "dnascale"
    main_input_name = "input_ids"

    def _build_dnascale(self) -> nn.Module:
        ensure_single_process_groups()
        module = get_recipe(self.config.recipe_name).build(self.config.recipe_config(), None)
        # megatron's layers create their weights in an explicit float32; from_pretrained(dtype=...) announces the
        # dtype it wants through torch's default dtype, so the whole module follows it.
        return module.to(torch.get_default_dtype())

    def _init_weights(self, module: nn.Module) -> None:
        # The dnascale module initialises itself (and its weights are loaded over it); only heads created here
        # for fine-tuning need an init.
        if getattr(module, "_dnascale_new_head", False):
            nn.init.normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)

    def state_dict(self, *args, **kwargs):
        # megatron's layers add a weightless `_extra_state` entry (None) per layer; transformers would count those
        # as missing tensors on load and safetensors cannot hold them, so the HF view leaves them out.
        state = super().state_dict(*args, **kwargs)
        for key in [k for k in state if k.endswith(EXTRA_STATE_SUFFIX)]:
            del state[key]
        return state

    def get_input_embeddings(self) -> nn.Module:
        embeddings = self.dnascale.embeddings
        return getattr(embeddings, "word", embeddings)

    def _extras(self, input_ids: torch.Tensor, kwargs: dict) -> dict:
        """The family's extra encode() inputs (adapter.extra_inputs) present in kwargs; other keys (the
        tokenizer's token_type_ids, HF's return_dict ...) are ignored. Families may derive missing ones."""
        names = get_recipe(self.config.recipe_name).hf_adapter.extra_inputs
        return {name: kwargs[name] for name in names if kwargs.get(name) is not None}


class DnascaleModel(DnascalePreTrainedModel):
    """AutoModel: the backbone's final per-position states (what fine-tuning pools)."""

    def __init__(self, config: DnascaleConfig) -> None:
        super().__init__(config)
        self.dnascale = self._build_dnascale()
        self.post_init()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs) -> BaseModelOutput:
        hidden = self.dnascale.encode(input_ids, attention_mask, **self._extras(input_ids, kwargs))
        return BaseModelOutput(last_hidden_state=hidden)


class DnascaleForMaskedLM(DnascalePreTrainedModel):
    """AutoModelForMaskedLM: full-vocabulary logits at every position; loss as in pretraining when labels given."""

    def __init__(self, config: DnascaleConfig) -> None:
        super().__init__(config)
        self.dnascale = self._build_dnascale()
        self.post_init()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, **kwargs) -> MaskedLMOutput:
        out = self.dnascale(input_ids=input_ids, attention_mask=attention_mask, labels=labels, return_logits=True,
                            **self._extras(input_ids, kwargs))
        has_targets = labels is not None and bool((labels != IGNORE_INDEX).any())
        return MaskedLMOutput(loss=out.loss if has_targets else None, logits=out.logits)


class DnascaleForSequenceClassification(DnascalePreTrainedModel):
    """AutoModelForSequenceClassification: final states mean-pooled over real tokens, dropout, linear (the
    protocol of dnascale/finetune/classifier.py). The linear head is new (randomly initialised)."""

    def __init__(self, config: DnascaleConfig) -> None:
        super().__init__(config)
        self.dnascale = self._build_dnascale()
        self.dropout = nn.Dropout(config.classifier_dropout)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.classifier._dnascale_new_head = True
        self.post_init()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, **kwargs) -> SequenceClassifierOutput:
        hidden = self.dnascale.encode(input_ids, attention_mask, **self._extras(input_ids, kwargs))
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        weights = attention_mask.to(hidden.dtype).unsqueeze(-1)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)
        logits = self.classifier(self.dropout(pooled))
        loss = F.cross_entropy(logits.float(), labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)

