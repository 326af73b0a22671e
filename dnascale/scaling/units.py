"""Putting losses of different tokenisations on one scale: nats per MLM target -> bits per base.

Every family reports its MLM loss as mean cross-entropy (nats) per *target token*. A target token covers one base
for the char (encoder), byte (ENBED) and base-level (DNACHUNKER) tokenisations, but ~5 bases for DNAZEN's BPE, so
its per-token loss is over a much larger unit. Dividing by ln 2 and by the bases a token covers gives bits per
base, the unit in which the families can be set side by side:

    bits_per_base = loss_nats / ln(2) / bases_per_token

The loss is a mean over the *targets* the family's masking picked, so the exact divisor is the mean number of
bases a target token covers. For the one-token-per-base tokenisations that is 1 by construction. For a BPE
tokenizer it is measured (`bases_per_target`): the family's own collator masks the validation windows of the
shards it trained on (deterministically, seed 0) and the bases of the masked tokens' strings are averaged. It can
differ from the corpus average bases per token (the manifest's windows x bases / tokens, also reported) because
DNAZEN masks whole G-grams, not tokens at random.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from dnascale.errors import DataError


@dataclass(frozen=True)
class Tokenisation:
    tokenizer: str
    bases_per_token: float
    source: str  # how bases_per_token was obtained, for the table and the docs


def tokenisation_of(data_dir: str | Path) -> Tokenisation:
    """Bases per token of the shards a run trained on."""
    from dnascale.data.shards import load_manifest
    from dnascale.data.tokenizers import load_tokenizer

    manifest = load_manifest(Path(data_dir))
    spec = manifest["tokenizer"]
    if getattr(load_tokenizer(spec["spec"]), "one_token_per_base", False):
        return Tokenisation(spec["name"], 1.0, "one token per base")
    train, window = manifest["splits"]["train"], manifest["config"]["window"]
    if not train.get("tokens"):
        raise DataError(f"{data_dir}: manifest has no token count for the train split; cannot convert to bases")
    ratio = train["samples"] * window / train["tokens"]
    return Tokenisation(spec["name"], ratio, f"manifest: {train['samples']} windows x {window} bases / "
                                              f"{train['tokens']} tokens")


def bases_per_target(data_dir: str | Path, collator, tokenizer, max_batches: int = 32, batch_size: int = 8) -> float:
    """Mean bases per MLM target token over (up to) the first `max_batches` validation batches, as the collator
    masks them. 1.0 without measuring for tokenizers with one token per base."""
    if getattr(tokenizer, "one_token_per_base", False):
        return 1.0
    from dnascale.data.loader import ResumableLoader, ShardDataset

    lengths = {i: len(text) for i, text in tokenizer.tokens.items()}
    dataset = ShardDataset(Path(data_dir), "validation", rank=0, world_size=1, seed=0, shuffle=False,
                           infinite=False)
    loader = ResumableLoader(dataset, batch_size=batch_size, collate_fn=collator, num_workers=0)
    bases = targets = 0
    for _, batch in zip(range(max_batches), loader):
        picked = batch.labels[batch.labels != -100].tolist()
        bases += sum(lengths[i] for i in picked)
        targets += len(picked)
    if not targets:
        raise DataError(f"{data_dir}: no MLM targets in the validation split to measure bases per target")
    return bases / targets


def bits_per_base(loss_nats: float, bases_per_target: float) -> float:
    return loss_nats / math.log(2) / bases_per_target
