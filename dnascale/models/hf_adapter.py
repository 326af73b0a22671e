"""The declarative HF state-dict adapter a recipe carries in its `hf_adapter` slot (torchtitan's StateDictAdapter).

It is data, not code paths: a prefix key map between dnascale parameter names and the names in the exported
`model.safetensors`, the names to drop, the Auto classes the family supports and the extra forward inputs its
encode() takes. dnascale/hf reads it to export, import and build the HF classes. No transformers import here:
the registry (below hf/ in the dependency order) holds these objects.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping

import torch


@dataclass(frozen=True)
class HFAdapter:
    model_type: str  # config.json's model_type, e.g. "dnascale-encoder"
    class_prefix: str  # HF class names: <prefix>Config, <prefix>Model, <prefix>ForMaskedLM, ...
    masked_lm: bool = True  # has an MLM head over the input positions: AutoModelForMaskedLM and fill-mask
    # (dnascale name prefix, HF name prefix) pairs, first match wins; inverted for the way back. The HF classes
    # hold the dnascale module as `.dnascale`, hence the default.
    key_map: tuple[tuple[str, str], ...] = (("", "dnascale."),)
    # dnascale names never exported: megatron's per-layer `_extra_state` holds no weights.
    drop: tuple[str, ...] = (r".*\._extra_state",)
    # (regex over parameter names, TP partition dim or None) overriding megatron's marks (dnascale.convert.tp_layout).
    tp_overrides: tuple[tuple[str, int | None], ...] = ()
    # keyword tensors the family's encode()/forward() take beyond input_ids and attention_mask
    extra_inputs: tuple[str, ...] = ()

    def _rename(self, name: str, pairs: tuple[tuple[str, str], ...]) -> str:
        for old, new in pairs:
            if name.startswith(old):
                return new + name[len(old):]
        raise KeyError(f"{name}: no key-map entry for it in the {self.model_type} adapter")

    def to_hf(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        kept = {k: v for k, v in state.items() if not any(re.fullmatch(p, k) for p in self.drop)}
        return {self._rename(k, self.key_map): v for k, v in kept.items()}

    def from_hf(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """HF names -> dnascale names; names outside the key map (a classifier head) are left out."""
        inverse = tuple((new, old) for old, new in self.key_map)
        out = {}
        for name, tensor in state.items():
            if any(name.startswith(new) for new, _ in inverse):
                out[self._rename(name, inverse)] = tensor
        return out
