"""HF classes of the `dnachunker` family (dnascale/models/dnachunker/): model_type "dnascale-dnachunker"."""

from dnascale.hf.base import DnascaleConfig, DnascaleForMaskedLM, DnascaleForSequenceClassification, DnascaleModel


class DnascaleDnachunkerConfig(DnascaleConfig):
    model_type = "dnascale-dnachunker"
    recipe_name = "dnachunker"


class DnascaleDnachunkerModel(DnascaleModel):
    config_class = DnascaleDnachunkerConfig


class DnascaleDnachunkerForMaskedLM(DnascaleForMaskedLM):
    config_class = DnascaleDnachunkerConfig


class DnascaleDnachunkerForSequenceClassification(DnascaleForSequenceClassification):
    config_class = DnascaleDnachunkerConfig
