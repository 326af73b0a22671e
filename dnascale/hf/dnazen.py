"""HF classes of the `dnazen` family (dnascale/models/dnazen.py): model_type "dnascale-dnazen".

DNAZEN's encoder takes the token x G-gram matching (`ggram_ids` [B, M], `ggram_triplets` [K, 3]). The export
ships the G-gram vocabulary inside model.safetensors (`ggram_table`: each row's token ids, -1 padded; its width is
`ggram_max_len` in config.json), so when a caller (e.g. `pipeline("fill-mask")`) gives only input_ids the model
matches them itself, exactly as fine-tuning does (dnascale.data.ggram: GGramMatcher + build_rows, at most
`max_ggrams` rows per sequence). Explicit `ggram_ids`/`ggram_triplets` are used as given.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dnascale.hf.base import DnascaleConfig, DnascaleForMaskedLM, DnascaleForSequenceClassification, DnascaleModel

TABLE = "ggram_table"
VOCAB_FILE = "ggram_vocab.tsv.gz"  # the vocabulary file itself, for fine-tuning from the export (dnascale.finetune)


class DnascaleDnazenConfig(DnascaleConfig):
    model_type = "dnascale-dnazen"
    recipe_name = "dnazen"

    ggram_max_len: int = 0  # width of the shipped G-gram table; 0 = no table (G-gram inputs must be given)

    @classmethod
    def export_extras(cls, config: Any) -> tuple[dict, dict[str, torch.Tensor]]:
        from dnascale.data.ggram import GGramVocab

        vocab = GGramVocab.load(config.ggram_vocab_path)
        table = torch.full((config.ggram_vocab_size - 1, vocab.max_len), -1, dtype=torch.int64)
        for row in range(len(vocab)):
            length = int(vocab.lengths[row])
            table[row, :length] = torch.from_numpy(vocab.tokens[row, :length])
        return {"ggram_max_len": int(vocab.max_len)}, {TABLE: table}


    @classmethod
    def export_files(cls, config: Any, out_dir: Any) -> None:
        from dnascale.data.ggram import GGramVocab

        GGramVocab.load(config.ggram_vocab_path).save(Path(out_dir) / VOCAB_FILE)

    @classmethod
    def with_export_files(cls, config: Any, export_dir: Any) -> Any:
        shipped = Path(export_dir) / VOCAB_FILE
        return dataclasses.replace(config, ggram_vocab=str(shipped)) if shipped.is_file() else config


class _GGramMatching:
    """Mixin: a `ggram_table` buffer (loaded with the weights) and the matching derived from it."""

    def _register_table(self, config: DnascaleDnazenConfig) -> None:
        self._matcher = None
        if config.ggram_max_len:
            rows = int(config.dnascale_config["ggram_vocab_size"]) - 1
            self.register_buffer(TABLE, torch.full((rows, config.ggram_max_len), -1, dtype=torch.int64))

    def _ggram_matcher(self):
        if self._matcher is None:
            from dnascale.data.ggram import GGramMatcher, GGramVocab

            table = getattr(self, TABLE).cpu().numpy()
            lengths = (table >= 0).sum(axis=1)
            live = int((lengths > 0).sum())  # ids 1..live; the rest of the table is embedding-row padding
            vocab = GGramVocab(table[:live], lengths[:live], np.zeros(live, np.int64), np.zeros(live))
            self._matcher = GGramMatcher(vocab, int(self.config.vocab_size))
        return self._matcher

    def _extras(self, input_ids: torch.Tensor, kwargs: dict) -> dict:
        extras = super()._extras(input_ids, kwargs)
        if "ggram_ids" in extras or not self.config.ggram_max_len:
            return extras
        from dnascale.data.ggram import build_rows

        # Padding and template ids are in no G-gram, so matching the padded batch matches each row alone.
        ids = input_ids.detach().cpu().numpy().astype(np.int64)
        rows = build_rows(self._ggram_matcher().find(ids), ids.shape[0], int(self.config.dnascale_config["max_ggrams"]))
        return {"ggram_ids": torch.from_numpy(rows.ggram_ids).to(input_ids.device),
                "ggram_triplets": torch.from_numpy(rows.triplets).to(input_ids.device)}


class DnascaleDnazenModel(_GGramMatching, DnascaleModel):
    config_class = DnascaleDnazenConfig

    def __init__(self, config: DnascaleDnazenConfig) -> None:
        super().__init__(config)
        self._register_table(config)


class DnascaleDnazenForMaskedLM(_GGramMatching, DnascaleForMaskedLM):
    config_class = DnascaleDnazenConfig

    def __init__(self, config: DnascaleDnazenConfig) -> None:
        super().__init__(config)
        self._register_table(config)


class DnascaleDnazenForSequenceClassification(_GGramMatching, DnascaleForSequenceClassification):
    config_class = DnascaleDnazenConfig

    def __init__(self, config: DnascaleDnazenConfig) -> None:
        super().__init__(config)
        self._register_table(config)
