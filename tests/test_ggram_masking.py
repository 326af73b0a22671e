"""Whole-G-gram masking and the G-gram matching of the corrupted input (dnascale.data.ggram_masking), on real
BPE windows of the bundled genomes with the bundled tokenizer and G-gram vocabulary."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from dnascale.data.fasta import CleaningPolicy, read_segments
from dnascale.data.ggram import GGramVocab, match_reference
from dnascale.data.ggram_masking import GGramMLMCollator, WholeGGramMasking
from dnascale.data.masking import IGNORE_INDEX
from dnascale.data.tokenizers import load_tokenizer
from dnascale.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "dnascale" / "assets" / "dnazen"


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(str(ASSETS / "tokenizer"))


@pytest.fixture(scope="module")
def vocab():
    return GGramVocab.load(ASSETS / "ggram_vocab.tsv.gz")


@pytest.fixture(scope="module")
def samples(tokenizer):
    """256 windows of 1,000 bases of E. coli, as the loader yields them (ids without specials)."""
    seq = next(iter(read_segments(REPO / "dnascale" / "genomes" / "ecoli_k12_mg1655.fna.gz", CleaningPolicy()))).seq
    out = []
    for i in range(256):
        ids = tokenizer.encode(seq[i * 1000 : (i + 1) * 1000]).astype(np.int64)
        out.append({"ids": torch.from_numpy(ids), "epoch": 0, "index": i})
    return out


def _rows(batch, b):
    length = int(batch.attention_mask[b].sum())
    return batch.input_ids[b, :length].numpy(), batch.labels[b, :length].numpy()


def _original(tokenizer, sample):
    return tokenizer.add_special(sample["ids"].numpy()).astype(np.int64)


@pytest.mark.parametrize("mode", ["budget", "expand"])
def test_whole_ggrams_are_masked_and_no_supplied_ggram_touches_a_target(tokenizer, vocab, samples, mode):
    collator = GGramMLMCollator(tokenizer, vocab, seed=5, policy=WholeGGramMasking(mode=mode), max_length=512)
    specials = set(tokenizer.special_ids)
    covered_targets = 0
    for start in range(0, 64, 16):
        batch = collator(samples[start : start + 16])
        ids_g, triplets = batch.extras["ggram_ids"].numpy(), batch.extras["ggram_triplets"].numpy()
        assert batch.input_ids.shape[1] <= 512 and ids_g.shape[1] <= 30
        for b in range(16):
            original = _original(tokenizer, samples[start + b])
            corrupted, labels = _rows(batch, b)
            target = labels != IGNORE_INDEX
            assert np.array_equal(labels[target], original[target])  # labels are the original ids
            assert not any(int(t) in specials for t in original[target])  # specials are never targets
            assert not any(int(t) in specials - {tokenizer.mask_id} for t in corrupted[target])
            assert np.array_equal(corrupted[~target], original[~target])
            # Whole-G-gram rule: every G-gram of the original is either fully a target or not at all.
            for t, n, _ in match_reference(vocab, original):
                hit = target[t : t + n]
                assert hit.all() or not hit.any(), f"G-gram at {t}..{t + n} partly masked"
                covered_targets += int(hit.all())
            # The G-grams given to the model are exactly the corrupted input's occurrences that avoid targets,
            # one row per G-gram, ordered by first position, at most 30 (all fit here).
            found = [(t, n, g) for t, n, g in match_reference(vocab, corrupted) if not target[t : t + n].any()]
            first = {}
            for t, n, g in found:
                first.setdefault(g, (t, n, g))
            order = sorted(first.values())[:30]
            assert ids_g[b][ids_g[b] != 0].tolist() == [g for _, _, g in order]
            row_of = {g: j for j, (_, _, g) in enumerate(order)}
            want = {(p, row_of[g]) for t, n, g in found if g in row_of for p in range(t, t + n)}
            got = {(int(t), int(j)) for bb, t, j in triplets if bb == b}
            assert got == want
    assert covered_targets > 10  # whole G-grams were in fact masked


def test_realised_rate_stays_near_15_percent_and_is_reported(tokenizer, vocab, samples):
    budget = GGramMLMCollator(tokenizer, vocab, seed=0, max_length=512)
    expand = GGramMLMCollator(tokenizer, vocab, seed=0, policy=WholeGGramMasking(mode="expand"), max_length=512)
    rates = {"budget": [], "expand": []}
    for start in range(0, 256, 32):
        for name, collator in (("budget", budget), ("expand", expand)):
            batch = collator(samples[start : start + 32])
            targets = (batch.labels != IGNORE_INDEX).sum(dim=1).float()
            candidates = (batch.attention_mask.sum(dim=1) - 2).float()  # minus [CLS], [SEP]
            torch.testing.assert_close(batch.extras["masked_fraction"], targets / candidates)
            rates[name].append(float(batch.extras["masked_fraction"].mean()))
    assert abs(np.mean(rates["budget"]) - 0.15) < 0.003  # the budget holds every sample at round(15%)
    assert 0.14 < np.mean(rates["expand"]) < 0.20  # Bernoulli 15%, grown by whole-G-gram expansion


def test_masking_depends_only_on_seed_epoch_and_index(tokenizer, vocab, samples):
    collator = GGramMLMCollator(tokenizer, vocab, seed=3, max_length=512)
    alone = collator([samples[7]])
    # The same sample in another batch, next to longer and shorter samples, in another position.
    mixed = collator([samples[100], {**samples[7], "ids": samples[7]["ids"]}, samples[3]])
    for a, b in zip(_rows(alone, 0), _rows(mixed, 1)):
        np.testing.assert_array_equal(a, b)
    assert alone.extras["ggram_ids"][0][alone.extras["ggram_ids"][0] != 0].tolist() == \
        mixed.extras["ggram_ids"][1][mixed.extras["ggram_ids"][1] != 0].tolist()
    other_epoch = collator([{**samples[7], "epoch": 1}])
    assert not torch.equal(other_epoch.labels, alone.labels)
    other_seed = GGramMLMCollator(tokenizer, vocab, seed=4, max_length=512)([samples[7]])
    assert not torch.equal(other_seed.labels, alone.labels)


def test_cap_truncation_and_padding(tokenizer, vocab, samples):
    collator = GGramMLMCollator(tokenizer, vocab, seed=0, max_length=64, max_ggrams=2)
    short = dict(samples[0], ids=samples[0]["ids"][:10])
    batch = collator([samples[1], short])
    assert batch.input_ids.shape[1] == 64 and batch.extras["truncated"].tolist() == [True, False]
    assert batch.input_ids[0, 0] == tokenizer.cls_id and batch.input_ids[0, 63] == tokenizer.sep_id
    assert batch.attention_mask[1].sum() == 12 and (batch.input_ids[1, 12:] == tokenizer.pad_id).all()
    assert batch.extras["ggram_ids"].shape[1] <= 2
    assert batch.extras["ggram_triplets"].dtype == torch.long and batch.extras["ggram_ids"].dtype == torch.long
    # Even a sample without any G-gram gets at least one target, and the id matrix keeps one padding column.
    one = collator([dict(samples[0], ids=samples[0]["ids"][:1])])
    assert (one.labels != IGNORE_INDEX).sum() == 1 and one.extras["ggram_ids"].shape == (1, 1)


def test_vocabulary_of_another_tokenizer_is_refused(tokenizer, vocab):
    other = GGramVocab(vocab.tokens, vocab.lengths, vocab.counts, vocab.pmi,
                       {**vocab.metadata, "tokenizer": "bpe-4096-00000000"})
    with pytest.raises(ConfigError, match="built on bpe-4096-00000000 ids"):
        GGramMLMCollator(tokenizer, other, seed=0)
    with pytest.raises(ConfigError, match="masking mode"):
        WholeGGramMasking(mode="span")
    assert dataclasses.asdict(WholeGGramMasking()) == {"rate": 0.15, "mode": "budget"}
