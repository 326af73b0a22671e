"""HF classes of the `enbed` family (dnascale/models/enbed.py): model_type "dnascale-enbed".

ENBED is an encoder-decoder whose head predicts the decoder's targets, so it has AutoModel (encoder states),
AutoModelForSeq2SeqLM (teacher-forced decoder logits; no incremental decoding cache, so `generate` is not
supported) and AutoModelForSequenceClassification (mean-pooled encoder states), but no masked-LM class.
"""

from __future__ import annotations

import torch
from transformers.modeling_outputs import Seq2SeqLMOutput

from dnascale.hf.base import DnascaleConfig, DnascaleForSequenceClassification, DnascaleModel, DnascalePreTrainedModel
from dnascale.models.heads import IGNORE_INDEX


class DnascaleEnbedConfig(DnascaleConfig):
    model_type = "dnascale-enbed"
    recipe_name = "enbed"


class DnascaleEnbedModel(DnascaleModel):
    config_class = DnascaleEnbedConfig


class DnascaleEnbedForConditionalGeneration(DnascalePreTrainedModel):
    config_class = DnascaleEnbedConfig

    def __init__(self, config: DnascaleEnbedConfig) -> None:
        super().__init__(config)
        self.dnascale = self._build_dnascale()
        self.post_init()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, decoder_input_ids: torch.Tensor | None = None,
                decoder_attention_mask: torch.Tensor | None = None, **kwargs) -> Seq2SeqLMOutput:
        """labels [B, T'] (decoder inputs are derived from them, T5-style) or decoder_input_ids."""
        out = self.dnascale(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                            decoder_input_ids=decoder_input_ids, decoder_attention_mask=decoder_attention_mask,
                            return_logits=True)
        has_targets = labels is not None and bool((labels != IGNORE_INDEX).any())
        return Seq2SeqLMOutput(loss=out.loss if has_targets else None, logits=out.logits)


class DnascaleEnbedForSequenceClassification(DnascaleForSequenceClassification):
    config_class = DnascaleEnbedConfig
