import numpy as np
import pytest
import torch

from dnascale.data.masking import IGNORE_INDEX, Corruption, MLMCollator, TokenMasking, sample_generator


class CharTokenizer:
    """The char layout's ids (CLS 0, SEP 1, MASK 3, PAD 4; A C G T N = 7..11), without importing the real one."""

    pad_id, cls_id, sep_id, mask_id, unk_id = 4, 0, 1, 3, 6
    special_ids = frozenset({0, 1, 2, 3, 4, 5, 6})
    vocab_size = 16
    content_ids = [7, 8, 9, 10, 11]

    def add_special(self, ids):
        return np.concatenate([[self.cls_id], np.asarray(ids), [self.sep_id]])


def samples(n, length, epoch=0):
    rng = np.random.default_rng(0)
    return [{"ids": rng.integers(7, 12, size=length).astype(np.uint8), "epoch": epoch, "index": i} for i in range(n)]


def test_template_padding_and_labels_only_at_targets():
    collate = MLMCollator(CharTokenizer(), seed=1)
    batch = collate(samples(4, 37))
    assert batch.input_ids.shape == (4, 40)  # 37 + CLS + SEP = 39, padded to a multiple of 8
    assert batch.attention_mask[:, :39].all() and not batch.attention_mask[:, 39:].any()
    assert (batch.input_ids[:, 39:] == CharTokenizer.pad_id).all()
    assert (batch.input_ids[:, 0] == CharTokenizer.cls_id).all() and (batch.input_ids[:, 38] == CharTokenizer.sep_id).all()
    targets = batch.labels != IGNORE_INDEX
    assert not targets[:, 0].any() and not targets[:, 38:].any(), "specials and padding are never targets"
    assert targets.sum(1).min() >= 1


def test_selection_rate_and_80_10_10_split_statistics():
    collate = MLMCollator(CharTokenizer(), seed=2)
    batch = collate(samples(64, 1000))
    targets = batch.labels != IGNORE_INDEX
    candidates = 64 * 1000
    rate = targets.sum().item() / candidates
    assert abs(rate - 0.15) < 0.01
    masked = (batch.input_ids == CharTokenizer.mask_id) & targets
    kept = (batch.input_ids == batch.labels) & targets
    changed = targets & ~masked & ~kept
    n = targets.sum().item()
    assert abs(masked.sum().item() / n - 0.8) < 0.02
    # random replacements that happen to draw the original base count as kept: expected 0.1 * 4/5 changed
    assert abs(changed.sum().item() / n - 0.08) < 0.015
    assert abs(kept.sum().item() / n - 0.12) < 0.015
    assert set(batch.input_ids[changed].unique().tolist()) <= set(CharTokenizer.content_ids)


def test_masking_is_a_pure_function_of_seed_epoch_index():
    collate = MLMCollator(CharTokenizer(), seed=3)
    data = samples(6, 100)
    whole = collate(data)
    # the same samples in another batch composition (as after a resume on another worker) mask identically
    parts = [collate(data[:2]), collate(data[2:])]
    assert torch.equal(torch.cat([p.input_ids for p in parts]), whole.input_ids)
    assert torch.equal(torch.cat([p.labels for p in parts]), whole.labels)
    other_epoch = collate([dict(s, epoch=1) for s in data])
    assert not torch.equal(other_epoch.labels, whole.labels)
    assert not torch.equal(MLMCollator(CharTokenizer(), seed=4)(data).labels, whole.labels)


def test_short_sample_still_gets_a_target_and_overlong_sample_is_refused():
    collate = MLMCollator(CharTokenizer(), seed=0, policy=TokenMasking(rate=0.0))
    batch = collate(samples(3, 2))
    assert ((batch.labels != IGNORE_INDEX).sum(1) == 1).all()
    with pytest.raises(ValueError, match="exceeds max_length 16"):
        MLMCollator(CharTokenizer(), seed=0, max_length=16)(samples(1, 20))


def test_corruption_fractions_validated_and_generator_stable():
    with pytest.raises(ValueError):
        Corruption(mask=0.9, random=0.2)
    a = torch.rand(5, generator=sample_generator(0, 1, 2))
    b = torch.rand(5, generator=sample_generator(0, 1, 2))
    assert torch.equal(a, b)
