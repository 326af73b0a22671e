"""MLM collation: template, padding, target selection (a per-family policy) and 80/10/10 corruption.

Randomness is a pure function of (seed, epoch, index) of each sample, never of a generator carried across
batches. So a resumed run masks every sample exactly as the uninterrupted run would, whatever worker or rank
the sample lands on, and the collator needs no state in the checkpoint.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Protocol, Sequence

import numpy as np
import torch

from dnascale.data.batch import Batch

IGNORE_INDEX = -100


def sample_generator(seed: int, epoch: int, index: int, stream: str = "mlm") -> torch.Generator:
    """A torch.Generator seeded from a sample's identity (keyed hash, stable across processes)."""
    digest = hashlib.blake2b(f"{stream}:{seed}:{epoch}:{index}".encode(), digest_size=8).digest()
    generator = torch.Generator()
    generator.manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))
    return generator


class MaskingPolicy(Protocol):
    """Chooses MLM target positions among `candidates` (real, non-special tokens) of one sample."""

    def select(self, ids: torch.Tensor, candidates: torch.Tensor, generator: torch.Generator) -> torch.Tensor: ...


@dataclass(frozen=True)
class TokenMasking:
    """Each candidate token is a target with probability `rate` (BERT); at least one target per sample."""

    rate: float = 0.15

    def select(self, ids: torch.Tensor, candidates: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        draws = torch.rand(ids.shape, generator=generator)
        selected = (draws < self.rate) & candidates
        if not selected.any() and candidates.any():
            # A sample without targets contributes nothing but still costs compute; a short sample gets one.
            positions = candidates.nonzero().flatten()
            pick = positions[torch.randint(len(positions), (1,), generator=generator)]
            selected[pick] = True
        return selected


@dataclass(frozen=True)
class Corruption:
    """What happens to a selected position: [MASK] / random token / unchanged (BERT's 80/10/10)."""

    mask: float = 0.8
    random: float = 0.1

    def __post_init__(self) -> None:
        if self.mask < 0 or self.random < 0 or self.mask + self.random > 1:
            raise ValueError(f"corruption fractions must be >= 0 and sum to <= 1, got {self}")


class MLMCollator:
    """Turns loader samples (token ids without specials) into a masked `Batch`."""

    def __init__(
        self,
        tokenizer: Any,
        *,
        seed: int,
        policy: MaskingPolicy = TokenMasking(),
        corruption: Corruption = Corruption(),
        max_length: int | None = None,
        pad_to_multiple_of: int = 8,
    ):
        self.tokenizer = tokenizer
        self.seed = seed
        self.policy = policy
        self.corruption = corruption
        self.max_length = max_length
        self.pad_to_multiple_of = pad_to_multiple_of
        special = sorted(int(i) for i in tokenizer.special_ids)
        self.special_ids = torch.tensor(special, dtype=torch.long)
        content = getattr(tokenizer, "content_ids", None)
        if content is None:
            content = [i for i in range(tokenizer.vocab_size) if i not in set(special)]
        # Random replacements come from real content tokens only (never specials or unused padding rows).
        self.replacement_ids = torch.as_tensor(np.asarray(content), dtype=torch.long)

    def _template(self, ids: Any) -> torch.Tensor:
        ids = np.asarray(ids)
        with_specials = self.tokenizer.add_special(ids)
        tensor = torch.as_tensor(np.asarray(with_specials, dtype=np.int64))
        if self.max_length is not None and len(tensor) > self.max_length:
            raise ValueError(
                f"sample of {len(tensor)} tokens (with specials) exceeds max_length {self.max_length}; "
                "build shards with a smaller --window"
            )
        return tensor

    def mask_one(self, ids: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        candidates = ~torch.isin(ids, self.special_ids)
        selected = self.policy.select(ids, candidates, generator)
        labels = torch.where(selected, ids, torch.full_like(ids, IGNORE_INDEX))
        roll = torch.rand(ids.shape, generator=generator)
        to_mask = selected & (roll < self.corruption.mask)
        to_random = selected & (roll >= self.corruption.mask) & (roll < self.corruption.mask + self.corruption.random)
        random_ids = self.replacement_ids[
            torch.randint(len(self.replacement_ids), ids.shape, generator=generator)
        ]
        corrupted = torch.where(to_mask, torch.full_like(ids, self.tokenizer.mask_id), ids)
        corrupted = torch.where(to_random, random_ids, corrupted)
        return corrupted, labels

    def __call__(self, samples: Sequence[dict]) -> Batch:
        rows = [self._template(s["ids"]) for s in samples]
        length = max(len(r) for r in rows)
        if self.pad_to_multiple_of > 1:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        if self.max_length is not None:
            length = min(length, self.max_length)
        input_ids = torch.full((len(rows), length), self.tokenizer.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.bool)
        for row, (ids, sample) in enumerate(zip(rows, samples)):
            generator = sample_generator(self.seed, int(sample["epoch"]), int(sample["index"]))
            corrupted, target = self.mask_one(ids, generator)
            input_ids[row, : len(ids)] = corrupted
            labels[row, : len(ids)] = target
            attention_mask[row, : len(ids)] = True
        return Batch(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
