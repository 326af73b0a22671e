"""ENBED's pretraining batches: MLM corruption of the encoder input, the original sequence as decoder target.

For each window x (bases as `nucleotide-byte` ids) the collator emits
- `input_ids`: x with BERT-style corruption + </s>: `mask_rate` of the bases are selected; of those,
  `mask_token_fraction` become the mask sentinel (383), `random_token_fraction` a random base, the rest stay;
- `labels`: the original x + </s> at every real position (-100 on padding): the decoder, teacher-forced on
  labels shifted right behind the start id 0, reconstructs the whole sequence;
- `extras["mlm_mask"]`: the selected positions, which the model's loss weights 1 (others `copy_weight`).
Padding uses <pad> (0), to a multiple of 8. Randomness is a pure function of (seed, epoch, index) per sample, as
in every dnascale collator (`masking.sample_generator`), so resumed runs corrupt identically.

`unigram_entropy` / `shard_unigram_entropy` give the baseline the MLM loss is compared with: the entropy in nats
of the base frequencies of a shard split (what a model that knew only the composition would score per base).
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np
import torch

from dnascale.data.batch import Batch
from dnascale.data.masking import IGNORE_INDEX, Corruption, MLMCollator, TokenMasking, sample_generator


class EnbedCollator(MLMCollator):
    def __init__(
        self,
        tokenizer: Any,
        *,
        seed: int,
        mask_rate: float = 0.15,
        mask_token_fraction: float = 0.8,
        random_token_fraction: float = 0.1,
        max_length: int | None = None,
        pad_to_multiple_of: int = 8,
    ):
        super().__init__(
            tokenizer, seed=seed, policy=TokenMasking(mask_rate),
            corruption=Corruption(mask=mask_token_fraction, random=random_token_fraction),
            max_length=max_length, pad_to_multiple_of=pad_to_multiple_of,
        )
        # Random replacements are real bases only: N (81) is a base id of the tokenizer but not a substitution.
        bases = [int(i) for i in tokenizer.encode("ACGT")]
        self.replacement_ids = torch.tensor(bases, dtype=torch.long)

    def __call__(self, samples: Sequence[dict]) -> Batch:
        rows = [self._template(s["ids"]) for s in samples]
        length = max(len(r) for r in rows)
        if self.pad_to_multiple_of > 1:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        if self.max_length is not None:
            length = min(length, self.max_length)
        pad = self.tokenizer.pad_id
        input_ids = torch.full((len(rows), length), pad, dtype=torch.long)
        labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.bool)
        mlm_mask = torch.zeros((len(rows), length), dtype=torch.bool)
        for row, (ids, sample) in enumerate(zip(rows, samples)):
            generator = sample_generator(self.seed, int(sample["epoch"]), int(sample["index"]))
            corrupted, selected = self.mask_one(ids, generator)
            n = len(ids)
            input_ids[row, :n] = corrupted
            labels[row, :n] = ids
            attention_mask[row, :n] = True
            mlm_mask[row, :n] = selected != IGNORE_INDEX
        return Batch(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                     extras={"mlm_mask": mlm_mask})


def unigram_entropy(counts: Sequence[int] | np.ndarray) -> float:
    """Entropy in nats of the distribution given by `counts` (zeros ignored)."""
    counts = np.asarray(counts, dtype=np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def shard_token_counts(directory: str | os.PathLike, split: str = "train") -> np.ndarray:
    """Occurrences of every token id in one split of a shard directory (specials are not stored in shards)."""
    from dnascale.data.loader import ShardDataset
    from dnascale.data.shards import load_manifest

    vocab = int(load_manifest(directory)["tokenizer"]["vocab_size"])
    dataset = ShardDataset(directory, split, rank=0, world_size=1, shuffle=False, infinite=False)
    counts = np.zeros(vocab, dtype=np.int64)
    for sample in dataset:
        counts += np.bincount(np.asarray(sample["ids"], dtype=np.int64), minlength=vocab)
    return counts


def shard_unigram_entropy(directory: str | os.PathLike, split: str = "train") -> float:
    """Unigram entropy (nats per base) of one split of a shard directory."""
    return unigram_entropy(shard_token_counts(directory, split))


def corruption_floor(counts: Sequence[int] | np.ndarray, mask_token_fraction: float = 0.8,
                     random_token_fraction: float = 0.1) -> float:
    """`counts`: occurrences of A, C, G, T. Expected MLM loss (nats per selected base) of a predictor that knows only the base frequencies p and the
    corruption rule, and reads the corrupted input at the position itself (no context): what the unchanged and
    random-replacement fractions give away for free. A model below this has learned sequence context."""
    counts = np.asarray(counts, dtype=np.float64)
    p = counts[counts > 0] / counts.sum()
    n = len(p)
    keep = 1.0 - mask_token_fraction - random_token_fraction
    loss = mask_token_fraction * unigram_entropy(counts)
    # Seen base c (not the mask): the original was c with weight p_c (keep + random / 4), b != c with p_b random / 4.
    for c in range(n):
        seen_given = np.full(n, p * random_token_fraction / 4.0)  # P(original = b, seen = c), b != c
        seen_given[c] = p[c] * (keep + random_token_fraction / 4.0)
        if seen_given.sum() == 0:  # nothing but the mask is ever seen at selected positions
            continue
        posterior = seen_given / seen_given.sum()
        present = seen_given > 0
        loss += float(-(seen_given[present] * np.log(posterior[present])).sum())
    return loss
