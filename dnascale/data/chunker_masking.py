"""DNACHUNKER's MLM collation: BERT's 15% / 80-10-10, with random replacements drawn from A, C, G, T only.

Everything else is MLMCollator's (template `x [SEP]`, padding, per-sample randomness from (seed, epoch, index)).
Mask protection needs no extra tensor: the model finds the [MASK] ids in `input_ids` itself. Random-replaced and
unchanged targets are deliberately indistinguishable from context (protecting them would reveal the targets).
"""

from __future__ import annotations

from typing import Any

import torch

from dnascale.data.masking import MLMCollator

BASES = "ACGT"


class ChunkerMLMCollator(MLMCollator):
    def __init__(self, tokenizer: Any, *, seed: int, max_length: int | None = None, **kwargs: Any) -> None:
        super().__init__(tokenizer, seed=seed, max_length=max_length, **kwargs)
        # The spec's recommendation (the older code drew from the whole vocabulary): N is not a base to guess.
        ids = tokenizer.encode(BASES)
        self.replacement_ids = torch.as_tensor([int(i) for i in ids], dtype=torch.long)
