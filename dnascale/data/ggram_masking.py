"""DNAZEN collation: whole-G-gram MLM masking, then G-gram matching of the corrupted input (runs in the loader
workers).

Per batch (every step vectorised over the batch; only the random draws loop over samples):

1. template ([CLS] x [SEP]) and pad; a sample longer than `max_length` tokens is cut to fit (BPE windows are cut
   in bases, so their token count varies; extras["truncated"] flags the cut samples);
2. find the vocabulary G-grams of the *original* ids and group overlapping occurrences into masking units (a unit
   is a maximal chain of overlapping occurrences; every other candidate token is a unit of its own). Masking a unit
   masks every G-gram touching it, which is the spec's fixpoint of "a G-gram that touches a selected position is
   selected whole" (spec §3, WGM step 2, looped to a fixpoint);
3. choose units (policy `mode`):
   - "budget" (default): whole-word-masking style. Units are visited in a random order and taken while they fit a
     budget of round(rate x candidates) tokens (then leftover budget goes to single tokens), so the realised rate
     stays at `rate` (15%) whatever the G-gram density: the issue's "overall rate stays near 15%";
   - "expand": the release code's rule: each candidate token is selected with probability `rate`, then every unit
     touching a selection is selected whole; the realised rate exceeds `rate` where G-grams are dense.
   Every sample gets at least one target;
4. corrupt every selected token independently: [MASK] 80%, a random content id 10%, unchanged 10% (labels: the
   original ids at the selected positions, -100 elsewhere);
5. match G-grams on the corrupted ids (so no G-gram overlapping a [MASK] reaches the model, spec §1) and drop
   every occurrence that covers a target (the release deletes those rows: a G-gram over a random or kept target
   must not leak it); merge, order and cap the rows (`dnascale.data.ggram.build_rows`, <= `max_ggrams`).

Batch.extras (tensors only; the training loop moves them to the device and passes them to the model by name):
    ggram_ids       [B, M] long, vocabulary ids 1.. (0 = padding), M = the batch's widest row count (>= 1)
    ggram_triplets  [K, 3] long, (batch, token position, G-gram row): the matching matrix M[b, t, j] = 1
    masked_fraction [B] float, targets / candidate tokens of each sample (the realised masking rate)
    truncated       [B] bool, the sample was cut to max_length tokens

Randomness is a pure function of (seed, epoch, index) of each sample (numpy PCG64 seeded by a keyed hash, the
same contract as dnascale.data.masking), so resumed runs mask identically.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from dnascale.data.batch import Batch
from dnascale.data.ggram import GGramMatcher, GGramVocab, Occurrences, build_rows
from dnascale.data.masking import IGNORE_INDEX, Corruption
from dnascale.errors import ConfigError

MASKING_MODES = ("budget", "expand")

__all__ = ["MASKING_MODES", "WholeGGramMasking", "GGramMLMCollator", "sample_rng", "masking_units"]


@dataclass(frozen=True)
class WholeGGramMasking:
    """Which tokens become MLM targets: whole G-gram units at an overall `rate` (see the module docstring)."""

    rate: float = 0.15
    mode: str = "budget"  # "budget" | "expand"

    def __post_init__(self) -> None:
        if not 0.0 < self.rate < 1.0:
            raise ConfigError(f"mask rate {self.rate}: must be in (0, 1)")
        if self.mode not in MASKING_MODES:
            raise ConfigError(f"masking mode {self.mode!r}: choose one of {list(MASKING_MODES)}")


def sample_rng(seed: int, epoch: int, index: int, stream: str = "dnazen") -> np.random.Generator:
    """A numpy generator seeded from a sample's identity (keyed hash, stable across processes)."""
    digest = hashlib.blake2b(f"{stream}:{seed}:{epoch}:{index}".encode(), digest_size=8).digest()
    return np.random.Generator(np.random.PCG64(int.from_bytes(digest, "little")))


def masking_units(occ: Occurrences, candidates: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Masking units of a [B, T] batch: (row b, flat start, size) per unit, sorted by flat position.

    A unit is a maximal chain of overlapping G-gram occurrences, or a single candidate token covered by none.
    """
    batch, length = candidates.shape
    flat_start = occ.batch * length + occ.start
    flat_end = flat_start + occ.length
    order = np.argsort(flat_start, kind="stable")
    flat_start, flat_end = flat_start[order], flat_end[order]
    if len(flat_start):
        reach = np.maximum.accumulate(flat_end)
        new = np.ones(len(flat_start), dtype=bool)
        new[1:] = flat_start[1:] >= reach[:-1]  # does not overlap anything before it: a new chain
        chain_start = flat_start[new]
        chain_end = np.maximum.reduceat(flat_end, np.flatnonzero(new))
    else:
        chain_start = chain_end = np.zeros(0, dtype=np.int64)
    edges = np.bincount(chain_start, minlength=batch * length + 1) - np.bincount(chain_end, minlength=batch * length + 1)
    covered = np.cumsum(edges[:-1]) > 0
    singles = np.flatnonzero(candidates.reshape(-1) & ~covered)
    starts = np.concatenate([chain_start, singles])
    sizes = np.concatenate([chain_end - chain_start, np.ones(len(singles), dtype=np.int64)])
    order = np.argsort(starts, kind="stable")
    starts, sizes = starts[order], sizes[order]
    return starts // length, starts, sizes


class GGramMLMCollator:
    """Loader samples (BPE ids without specials) -> a whole-G-gram-masked `Batch` with the G-gram matching."""

    def __init__(
        self,
        tokenizer: Any,
        vocab: GGramVocab | str | os.PathLike[str],
        *,
        seed: int,
        policy: WholeGGramMasking = WholeGGramMasking(),
        corruption: Corruption = Corruption(),
        max_length: int | None = 512,
        max_ggrams: int | None = 30,
        pad_to_multiple_of: int = 8,
    ):
        self.vocab = vocab if isinstance(vocab, GGramVocab) else GGramVocab.load(vocab)
        name = self.vocab.tokenizer_name
        if name is not None and name != tokenizer.name:
            raise ConfigError(f"G-gram vocabulary was built on {name} ids but the data uses {tokenizer.name}; "
                              "rebuild it with tools/build_ggram_vocab.py on this tokenizer's shards")
        if max_length is not None and max_length < 3:
            raise ConfigError(f"max_length={max_length}: needs room for [CLS], one token and [SEP]")
        self.tokenizer = tokenizer
        self.matcher = GGramMatcher(self.vocab, tokenizer.vocab_size)
        self.seed = seed
        self.policy = policy
        self.corruption = corruption
        self.max_length = max_length
        self.max_ggrams = max_ggrams
        self.pad_to_multiple_of = pad_to_multiple_of
        self.special_ids = np.asarray(sorted(int(i) for i in tokenizer.special_ids), dtype=np.int64)
        self.replacement_ids = np.asarray(tokenizer.content_ids, dtype=np.int64)  # never specials (spec §6)
        self.prefix = np.asarray(tokenizer.template.prefix, dtype=np.int64)
        self.suffix = np.asarray(tokenizer.template.suffix, dtype=np.int64)

    # ---- steps ---------------------------------------------------------------------------------------------
    def _rows(self, samples: Sequence[dict]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Templated, padded ids [B, T], real lengths [B], and which samples were cut to max_length [B]."""
        room = None if self.max_length is None else self.max_length - len(self.prefix) - len(self.suffix)
        bodies = [np.asarray(s["ids"], dtype=np.int64) for s in samples]
        truncated = np.asarray([room is not None and len(b) > room for b in bodies], dtype=bool)
        rows = [np.concatenate([self.prefix, b[:room] if room is not None else b, self.suffix]) for b in bodies]
        lengths = np.asarray([len(r) for r in rows], dtype=np.int64)
        width = int(lengths.max())
        if self.pad_to_multiple_of > 1:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        if self.max_length is not None:
            width = min(width, self.max_length)
        ids = np.full((len(rows), width), self.tokenizer.pad_id, dtype=np.int64)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = row
        return ids, lengths, truncated

    def _select(
        self, ids: np.ndarray, lengths: np.ndarray, candidates: np.ndarray, rngs: list[np.random.Generator]
    ) -> np.ndarray:
        """Target mask [B, T] by whole-G-gram units (module docstring, step 3)."""
        batch, length = ids.shape
        unit_b, unit_start, unit_size = masking_units(self.matcher.find(ids), candidates)
        per_sample = np.bincount(unit_b, minlength=batch)
        offsets = np.concatenate([[0], np.cumsum(per_sample)])
        n_cand = candidates.sum(axis=1)
        if self.policy.mode == "budget":
            budget = np.where(n_cand > 0, np.maximum(1, np.rint(self.policy.rate * n_cand)), 0).astype(np.int64)
            # Units are grouped by sample (sorted by flat position); each sample draws one priority per unit.
            priority = np.concatenate([np.zeros(0)] + [rng.random(int(n)) for rng, n in zip(rngs, per_sample)])
            order = np.lexsort((priority, unit_b))  # by sample, then priority
            b_o, size_o = unit_b[order], unit_size[order]
            size_before = np.concatenate([[0], np.cumsum(np.bincount(unit_b, weights=unit_size, minlength=batch))])
            within = np.cumsum(size_o) - size_before[b_o]
            take = within <= budget[b_o]  # a prefix of each sample's order (within only grows)
            left = budget - np.bincount(b_o[take], weights=size_o[take], minlength=batch).astype(np.int64)
            # Whatever budget the first unit too large left over goes to single tokens, in priority order.
            single = ~take & (size_o == 1)
            rank = np.cumsum(single)
            rank_before = np.concatenate([[0], rank])[offsets[:-1]]
            fill = single & (rank - rank_before[b_o] <= left[b_o])
            chosen = np.zeros(len(order), dtype=bool)
            chosen[order[take | fill]] = True
        else:
            picked = np.zeros((batch, length), dtype=bool)
            for b, rng in enumerate(rngs):
                picked[b, : lengths[b]] = rng.random(int(lengths[b])) < self.policy.rate
            picked &= candidates
            chosen = _span_any(picked.reshape(-1), unit_start, unit_size)
        flat = np.zeros(batch * length, dtype=bool)
        flat[_expand(unit_start[chosen], unit_size[chosen])] = True
        # At least one target per sample that has candidates: a random unit of it.
        counts = flat.reshape(batch, length).sum(axis=1)
        for b in np.flatnonzero((counts == 0) & (n_cand > 0)):
            u = offsets[b] + int(rngs[b].integers(per_sample[b]))
            flat[unit_start[u] : unit_start[u] + unit_size[u]] = True
        return flat.reshape(batch, length)

    def _corrupt(
        self, ids: np.ndarray, lengths: np.ndarray, targets: np.ndarray, rngs: list[np.random.Generator]
    ) -> np.ndarray:
        """80/10/10 per target; draws cover each sample's own length, so padding never shifts its stream."""
        roll = np.ones(ids.shape)
        pick = np.zeros(ids.shape, dtype=np.int64)
        for b, rng in enumerate(rngs):
            n = int(lengths[b])
            roll[b, :n] = rng.random(n)
            pick[b, :n] = rng.integers(len(self.replacement_ids), size=n)
        mask_p, random_p = self.corruption.mask, self.corruption.random
        corrupted = np.where(targets & (roll < mask_p), self.tokenizer.mask_id, ids)
        to_random = targets & (roll >= mask_p) & (roll < mask_p + random_p)
        return np.where(to_random, self.replacement_ids[pick], corrupted)

    def __call__(self, samples: Sequence[dict]) -> Batch:
        ids, lengths, truncated = self._rows(samples)
        batch, length = ids.shape
        real = np.arange(length)[None, :] < lengths[:, None]
        candidates = real & ~np.isin(ids, self.special_ids)
        rngs = [sample_rng(self.seed, int(s["epoch"]), int(s["index"])) for s in samples]
        targets = self._select(ids, lengths, candidates, rngs)
        corrupted = self._corrupt(ids, lengths, targets, rngs)
        # Match on the corrupted input; an occurrence covering any target is not given to the model.
        occ = self.matcher.find(corrupted)
        flat_targets = np.concatenate([[0], np.cumsum(targets.reshape(-1))])
        flat_start = occ.batch * length + occ.start
        clean = flat_targets[flat_start + occ.length] == flat_targets[flat_start]
        matching = build_rows(occ.select(clean), batch, self.max_ggrams)
        labels = np.where(targets, ids, IGNORE_INDEX)
        n_cand = candidates.sum(axis=1)
        fraction = targets.sum(axis=1) / np.maximum(n_cand, 1)
        extras = {
            "ggram_ids": torch.from_numpy(matching.ggram_ids),
            "ggram_triplets": torch.from_numpy(matching.triplets),
            "masked_fraction": torch.from_numpy(fraction.astype(np.float32)),
            "truncated": torch.from_numpy(truncated),
        }
        return Batch(
            input_ids=torch.from_numpy(corrupted),
            attention_mask=torch.from_numpy(real),
            labels=torch.from_numpy(labels),
            extras=extras,
        )


def _expand(starts: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Positions start..start+size-1 of every span, concatenated."""
    sizes = np.asarray(sizes, dtype=np.int64)
    offsets = np.arange(int(sizes.sum())) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    return np.repeat(np.asarray(starts, dtype=np.int64), sizes) + offsets


def _span_any(flags: np.ndarray, starts: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """For each span [start, start+size), whether any flag inside is set."""
    prefix = np.concatenate([[0], np.cumsum(flags, dtype=np.int64)])
    return prefix[starts + sizes] > prefix[starts]
