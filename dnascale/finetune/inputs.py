"""Classification inputs per model family: a task split tokenized once, then padded batches for `encode`.

Every family gets `input_ids` in its own tokenizer's layout (the recipe's, or the one a checkpoint names) wrapped
in that tokenizer's template, and `attention_mask`. Families whose `encode` needs more take it from `extras`,
built here from the unmasked ids (fine-tuning has no MLM corruption):

    dnazen      ggram_ids [B, M] and ggram_triplets [K, 3]: the bundled (or configured) G-gram vocabulary matched
                on the BPE ids, at most `max_ggrams` rows per sequence, exactly as pretraining matched them except
                that nothing is masked, so no occurrence is dropped.

The table lives here rather than in the model recipe because the registry has no hook for it yet; a family
missing from it needs no extras.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from dnascale.errors import ConfigError
from dnascale.finetune.tasks import TaskSplit

# (config, tokenizer) -> function of padded ids [B, T] (numpy int64) -> extra keyword tensors for encode().
ExtrasBuilder = Callable[[np.ndarray], dict[str, torch.Tensor]]


@dataclass
class ClassificationBatch:
    input_ids: torch.Tensor  # [B, T] long, template included, right-padded with the tokenizer's pad id
    attention_mask: torch.Tensor  # [B, T] bool, True on real tokens
    labels: torch.Tensor  # [B] long
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # family-specific encode() arguments
    loss_weight: float = 1.0  # scales this rank's mean loss so the mean over data-parallel ranks is the global mean

    def to(self, device) -> "ClassificationBatch":
        return ClassificationBatch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device),
                                   {k: v.to(device) for k, v in self.extras.items()}, self.loss_weight)


def _dnazen_extras(config: Any, tokenizer: Any) -> ExtrasBuilder:
    from dnascale.data.ggram import GGramMatcher, GGramVocab, build_rows

    vocab = GGramVocab.load(config.ggram_vocab_path)
    if vocab.tokenizer_name is not None and vocab.tokenizer_name != tokenizer.name:
        raise ConfigError(f"{config.ggram_vocab_path}: G-gram vocabulary built on {vocab.tokenizer_name} ids, but the "
                          f"model's tokenizer is {tokenizer.name}")
    if vocab.num_embeddings > config.ggram_vocab_size:
        raise ConfigError(f"{config.ggram_vocab_path}: {len(vocab)} G-grams do not fit ggram_vocab_size="
                          f"{config.ggram_vocab_size} (need >= {vocab.num_embeddings})")
    matcher = GGramMatcher(vocab, tokenizer.vocab_size)

    def extras(ids: np.ndarray) -> dict[str, torch.Tensor]:
        # Padding and template ids are not in any G-gram, so matching the padded batch matches each row alone.
        rows = build_rows(matcher.find(ids), ids.shape[0], config.max_ggrams)
        return {"ggram_ids": torch.from_numpy(rows.ggram_ids), "ggram_triplets": torch.from_numpy(rows.triplets)}

    return extras


EXTRAS: dict[str, Callable[[Any, Any], ExtrasBuilder]] = {"dnazen": _dnazen_extras}


class EncodedSplit:
    """A task split tokenized once, batched with padding to the longest sequence in the batch."""

    def __init__(self, split: TaskSplit, name: str, tokenizer: Any, max_len: int, extras: ExtrasBuilder | None,
                 limit: int | None = None):
        sequences = split.sequences[:limit] if limit else split.sequences
        self.labels = torch.as_tensor(split.labels[: len(sequences)])
        self.rows = []
        for row, sequence in enumerate(sequences, start=2):
            ids = np.asarray(tokenizer.add_special(tokenizer.encode(sequence)), dtype=np.int64)
            if len(ids) > max_len:
                raise ConfigError(f"{name}.csv:{row}: sequence of {len(ids)} tokens exceeds the model's max_seq_len "
                                  f"{max_len}")
            self.rows.append(ids)
        self.pad_id = int(tokenizer.pad_id)
        self.extras = extras

    def __len__(self) -> int:
        return len(self.rows)

    def batches(self, batch_size: int, generator: torch.Generator | None = None, rank: int = 0, world: int = 1):
        """Padded batches of `batch_size` rows (shuffled by `generator`, else in file order).

        With `world` > 1 each global batch is cut into `world` near-equal parts and this is part `rank`, weighted
        (`loss_weight` = its share of the rows x world) so that DeepSpeed's mean over ranks of the per-rank mean loss
        is the mean over the global batch, also for a short last batch. A part left empty (a last batch with fewer
        rows than ranks) is the batch's first row at weight 0: under ZeRO-3 every rank must run the same forward and
        backward passes, since each one gathers parameters collectively.
        """
        order = torch.randperm(len(self.rows), generator=generator) if generator is not None \
            else torch.arange(len(self.rows))
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            part = batch.tensor_split(world)[rank]
            weight = len(part) * world / len(batch)
            if len(part) == 0:
                part, weight = batch[:1], 0.0
            yield self._collate(part, weight)

    def _collate(self, idx: torch.Tensor, loss_weight: float) -> ClassificationBatch:
        rows = [self.rows[i] for i in idx]
        ids = np.full((len(rows), max(len(r) for r in rows)), self.pad_id, dtype=np.int64)
        mask = np.zeros(ids.shape, dtype=bool)
        for i, row in enumerate(rows):
            ids[i, : len(row)], mask[i, : len(row)] = row, True
        extras = self.extras(ids) if self.extras is not None else {}
        return ClassificationBatch(torch.from_numpy(ids), torch.from_numpy(mask), self.labels[idx], extras,
                                   loss_weight)


def encode_task_splits(task, recipe: str, config: Any, tokenizer: Any, train_limit: int | None = None
                       ) -> dict[str, EncodedSplit]:
    """train/dev/test of `task` in the layout of `recipe` (its tokenizer, template and encode() extras)."""
    builder = EXTRAS.get(recipe)
    extras = builder(config, tokenizer) if builder is not None else None
    max_len = int(config.max_seq_len)
    return {split: EncodedSplit(task[split], str(task.directory / split), tokenizer, max_len, extras,
                                train_limit if split == "train" else None)
            for split in ("train", "dev", "test")}
