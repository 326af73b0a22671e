"""HF classes of the `encoder` family (dnascale/models/encoder.py): model_type "dnascale-encoder"."""

from dnascale.hf.base import DnascaleConfig, DnascaleForMaskedLM, DnascaleForSequenceClassification, DnascaleModel


class DnascaleEncoderConfig(DnascaleConfig):
    model_type = "dnascale-encoder"
    recipe_name = "encoder"


class DnascaleEncoderModel(DnascaleModel):
    config_class = DnascaleEncoderConfig


class DnascaleEncoderForMaskedLM(DnascaleForMaskedLM):
    config_class = DnascaleEncoderConfig


class DnascaleEncoderForSequenceClassification(DnascaleForSequenceClassification):
    config_class = DnascaleEncoderConfig
