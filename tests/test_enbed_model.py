"""ENBED's model, objective, collator, classification head, presets, recipe and parameter-count tool
(single process, world of 1)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dnascale.data.enbed_masking import EnbedCollator, corruption_floor, unigram_entropy
from dnascale.data.tokenizers import load_tokenizer
from dnascale.errors import ConfigError
from dnascale.models import get_recipe, list_presets, load_preset
from dnascale.models.enbed import (
    EnbedConfig,
    EnbedForPretraining,
    count_parameters,
    flops_per_token,
    shift_right,
)

BASES = torch.tensor([68, 70, 74, 87])  # A C G T in the byte layout
MASK_ID, EOS, PAD = 383, 1, 0


@pytest.fixture(scope="module", autouse=True)
def world_of_one():
    from dnascale.parallel import destroy, init_distributed

    state = init_distributed(tp=1, seed=0)
    yield state
    destroy()


def _config(**overrides) -> EnbedConfig:
    fields = dict(hidden=32, ffn_hidden=64, heads=4, head_dim=8, encoder_layers=4, decoder_layers=2,
                  encoder_window=16, encoder_early_window=8, encoder_early_layers=3, decoder_window=16,
                  cross_window=16, global_block=4, max_seq_len=256, dropout=0.0, relative_max_distance=32)
    fields.update(overrides)
    return EnbedConfig(**fields)


def _batch(batch=3, length=40, seed=0, lengths=(40, 33, 17)):
    gen = torch.Generator().manual_seed(seed)
    labels = BASES[torch.randint(0, 4, (batch, length), generator=gen)]
    mask = torch.arange(length)[None] < torch.tensor(lengths[:batch])[:, None]
    for row, n in enumerate(lengths[:batch]):
        labels[row, n - 1] = EOS
        labels[row, n:] = -100
    selected = (torch.rand(batch, length, generator=gen) < 0.2) & mask & (labels != EOS)
    inputs = torch.where(mask, labels.masked_fill(selected, MASK_ID), torch.full_like(labels, PAD))
    return inputs, mask, labels, selected


def test_forward_shapes_loss_definition_and_copy_weight():
    torch.manual_seed(0)
    inputs, mask, labels, selected = _batch()
    model = EnbedForPretraining(_config())
    out = model(inputs, mask, labels, mlm_mask=selected, return_logits=True)
    assert out.logits.shape == (3, 40, 384) and out.num_targets == int(selected.sum())
    per_position = F.cross_entropy(out.logits.reshape(-1, 384), labels.reshape(-1), reduction="none",
                                   ignore_index=-100).view(3, 40)
    torch.testing.assert_close(out.loss, per_position[selected].mean())  # copy_weight 0: nats per masked base
    torch.testing.assert_close(out.mlm_loss, per_position[selected].mean())
    assert out.copy_loss is None

    weighted = EnbedForPretraining(_config(copy_weight=0.2))
    weighted.load_state_dict(model.state_dict())
    out = weighted(inputs, mask, labels, mlm_mask=selected)
    others = (labels != -100) & ~selected
    expected = (per_position[selected].sum() + 0.2 * per_position[others].sum()) / selected.sum()
    torch.testing.assert_close(out.loss, expected)
    torch.testing.assert_close(out.copy_loss, per_position[others].mean())
    # Without an mlm_mask every target counts once (e.g. sequence-to-sequence fine-tuning).
    plain = model(inputs, mask, labels)
    assert plain.num_targets == int((labels != -100).sum())
    torch.testing.assert_close(plain.loss, per_position[labels != -100].mean())


def test_teacher_forcing_is_causal_and_encoder_attention_is_local():
    torch.manual_seed(1)
    config = _config(encoder_global=False)
    model = EnbedForPretraining(config).eval()
    inputs, mask, labels, selected = _batch(batch=1, length=120, lengths=(120,))
    base = model(inputs, mask, labels, return_logits=True).logits
    # A change to target t reaches the decoder only through its input at t + 1: logits <= t are unchanged.
    changed = labels.clone()
    changed[0, 60] = 68 if int(labels[0, 60]) != 68 else 70
    logits = model(inputs, mask, changed, return_logits=True).logits
    torch.testing.assert_close(logits[:, :61], base[:, :61], rtol=0, atol=1e-6)
    assert not torch.allclose(logits[:, 61:], base[:, 61:])
    # The encoder's receptive field is the sum of its radii (3 x 8 + 16 = 40): position 119 cannot reach 0..78.
    states = model.encode(inputs, mask)
    far = inputs.clone()
    far[0, 119] = EOS if int(inputs[0, 119]) != EOS else 68
    moved = model.encode(far, mask)
    torch.testing.assert_close(moved[:, :79], states[:, :79], rtol=0, atol=1e-6)
    assert not torch.allclose(moved[:, 79:], states[:, 79:])


@pytest.mark.parametrize("overrides", [
    dict(), dict(encoder_global=True), dict(cross_attention="full"), dict(relative_bias=False),
    dict(decoder_global=False, activation="swiglu"),
])
def test_parameter_count_formula_matches_the_module(overrides):
    config = _config(**overrides)
    model = EnbedForPretraining(config)
    assert count_parameters(config)["total"] == sum(p.numel() for p in model.parameters())
    inputs, mask, labels, selected = _batch()
    out = model(inputs, mask, labels, mlm_mask=selected)
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_backends_agree_and_activation_checkpointing_changes_nothing():
    torch.manual_seed(2)
    inputs, mask, labels, selected = _batch()
    results = {}
    for name, overrides in {"auto": {}, "reference": dict(attention_backend="reference",
                                                          cross_attention_backend="reference"),
                            "sdpa": dict(attention_backend="sdpa"),
                            "checkpointed": dict(activation_checkpointing=True, dropout=0.1)}.items():
        torch.manual_seed(2)
        model = EnbedForPretraining(_config(**overrides)).train()
        torch.manual_seed(5)
        out = model(inputs, mask, labels, mlm_mask=selected)
        out.loss.backward()
        results[name] = (out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    for name in ("reference", "sdpa"):
        torch.testing.assert_close(results[name][0], results["auto"][0], rtol=1e-5, atol=1e-5)
        for key, grad in results[name][1].items():
            torch.testing.assert_close(grad, results["auto"][1][key], rtol=1e-4, atol=1e-5)
    # Dropout on: the recomputation must replay the same masks (compare with the same config unchecked).
    torch.manual_seed(2)
    model = EnbedForPretraining(_config(dropout=0.1)).train()
    torch.manual_seed(5)
    out = model(inputs, mask, labels, mlm_mask=selected)
    out.loss.backward()
    torch.testing.assert_close(out.loss.detach(), results["checkpointed"][0])
    for key, param in model.named_parameters():
        torch.testing.assert_close(param.grad, results["checkpointed"][1][key], rtol=1e-5, atol=1e-6)


def test_shift_right_is_t5s():
    labels = torch.tensor([[68, 70, 1, -100], [74, 87, 81, 1]])
    assert shift_right(labels).tolist() == [[0, 68, 70, 1], [0, 74, 87, 81]]


def test_config_validation_names_the_field():
    bad = {
        "cross_attention": (dict(cross_attention="dense"), "cross_attention='dense'"),
        "global_block": (dict(global_block=32, decoder_window=16), "global_block=32 must be <= decoder_window"),
        "heads_tp": (dict(tp=3), "heads=4 must be divisible by tp=3"),
        "fractions": (dict(mask_token_fraction=0.8, random_token_fraction=0.3), "must be <= 1"),
        "backend": (dict(attention_backend="magic"), "attention_backend='magic'"),
        "window": (dict(encoder_window=0), "encoder_window=0"),
        "rate": (dict(mask_rate=0.0), "mask_rate"),
    }
    for name, (overrides, message) in bad.items():
        with pytest.raises(ConfigError, match=message):
            _config(**overrides).validate()
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        EnbedForPretraining(_config(max_seq_len=16))(*_batch()[:3])


def test_collator_target_form_and_determinism():
    tokenizer = load_tokenizer("nucleotide-byte")
    rng = np.random.default_rng(0)
    samples = [{"ids": tokenizer.encode("".join(rng.choice(list("ACGT"), n))), "epoch": 0, "index": i}
               for i, n in enumerate((400, 250))]
    collator = EnbedCollator(tokenizer, seed=3, max_length=512)
    batch = collator(samples)
    assert batch.input_ids.shape == (2, 408)  # 401 tokens (</s> included), padded to a multiple of 8
    for row, n in enumerate((400, 250)):
        original = torch.as_tensor(samples[row]["ids"].astype(np.int64))
        assert batch.labels[row, :n].tolist() == original.tolist()  # the decoder reconstructs everything
        assert batch.labels[row, n] == EOS and (batch.labels[row, n + 1 :] == -100).all()
        assert batch.attention_mask[row].sum() == n + 1 and batch.input_ids[row, n] == EOS
        assert (batch.input_ids[row, n + 1 :] == PAD).all()
        selected = batch.extras["mlm_mask"][row]
        assert not selected[n:].any()  # never </s> or padding
        changed = batch.input_ids[row, :n] != original
        assert not (changed & ~selected[:n]).any()  # only selected positions are corrupted
        masked = batch.input_ids[row, :n] == MASK_ID
        assert set(batch.input_ids[row, :n][selected[:n] & ~masked].tolist()) <= set(BASES.tolist())
    total = batch.extras["mlm_mask"].sum().item()
    assert 0.10 * 650 < total < 0.20 * 650
    again = collator(list(reversed(samples)))  # per-sample randomness: order and batch do not matter
    assert torch.equal(again.input_ids[1, :401], batch.input_ids[0, :401])
    other_epoch = collator([dict(samples[0], epoch=1)])
    assert not torch.equal(other_epoch.input_ids[0, :401], batch.input_ids[0, :401])


def test_unigram_entropy_and_corruption_floor():
    assert unigram_entropy([1, 1, 1, 1]) == pytest.approx(np.log(4))
    assert unigram_entropy([5, 0, 0]) == 0.0
    # Mask-only corruption gives nothing away: the floor is the unigram entropy.
    assert corruption_floor([1, 1, 1, 1], 1.0, 0.0) == pytest.approx(np.log(4))
    # BERT's 80/10/10 on uniform bases: 0.8 ln 4 + 0.2 H(seen base is original w.p. 0.625).
    expected = 0.8 * np.log(4) + 0.2 * -(0.625 * np.log(0.625) + 3 * 0.125 * np.log(0.125))
    assert corruption_floor([1, 1, 1, 1], 0.8, 0.1) == pytest.approx(expected)


def test_sequence_classification_uses_the_shared_classifier_over_encode():
    """ENBED classifies through dnascale.finetune's SequenceClassifier: encoder states, mean-pooled; the decoder and
    LM head (unused by encode) are dropped."""
    from dnascale.finetune.classifier import SequenceClassifier, drop_unused

    torch.manual_seed(3)
    config = _config()
    pretrained = EnbedForPretraining(config).eval()
    inputs, mask, _, _ = _batch()
    expected = pretrained.encode(inputs, mask)
    model = SequenceClassifier(drop_unused(pretrained, "enbed"), config.hidden, num_labels=3).eval()
    assert not any(n.startswith(("backbone.decoder.", "backbone.lm_head.")) for n, _ in model.named_parameters())
    torch.testing.assert_close(model.backbone.encode(inputs, mask), expected)
    out = model(inputs, mask, torch.tensor([0, 2, 1]))
    assert out.logits.shape == (3, 3) and out.loss.ndim == 0
    # Padding does not change the pooled prediction of a sequence.
    short = model(inputs[2:, :17], mask[2:, :17])
    torch.testing.assert_close(short.logits, out.logits[2:], rtol=1e-5, atol=1e-5)


def test_presets_recipe_and_flops():
    assert list_presets("enbed") == ["1b2", "base", "large", "tiny"]
    recipe = get_recipe("enbed")
    assert recipe.tokenizer == "nucleotide-byte"
    counts = {}
    for preset in list_presets("enbed"):
        config = load_preset("enbed", preset)
        counts[preset] = count_parameters(config)["total"]
        assert config.encoder_windows()[:4] == [64, 64, 64, 128]
        assert flops_per_token(config, 4096) > 6 * count_parameters(config)["non_embedding"] * 0.9
    tiny, base, large = (load_preset("enbed", p) for p in ("tiny", "base", "large"))
    assert (base.encoder_layers, base.decoder_layers, large.encoder_layers, large.decoder_layers) == (8, 4, 24, 12)
    assert abs(counts["1b2"] - 1.2e9) / 1.2e9 < 0.05
    assert counts["tiny"] < counts["base"] < counts["large"] < counts["1b2"]
    assert recipe.data_window(tiny) == 511 and recipe.data_window(base) == 16383
    assert isinstance(recipe.build(tiny, None), EnbedForPretraining)
    collator = recipe.make_collator(tiny, load_tokenizer("nucleotide-byte"), 0)
    assert isinstance(collator, EnbedCollator)
    # Full cross-attention grows with the length per token; the aligned one does not (beyond T/k summaries).
    full = dataclasses.replace(base, cross_attention="full")
    assert flops_per_token(full, 16384) > 1.5 * flops_per_token(base, 16384)
    assert flops_per_token(base, 16384) < 1.2 * flops_per_token(base, 1024)


def test_param_counts_tool_prints_every_preset_of_every_recipe(repo_root):
    result = subprocess.run([sys.executable, str(repo_root / "tools" / "param_counts.py")], capture_output=True,
                            text=True, timeout=300, cwd=repo_root)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout
    for preset in ("tiny", "base", "large", "1b2"):
        assert f"enbed-{preset}" in lines
    assert "encoder-tiny" in lines
    assert "1,197,5" in lines  # enbed-1b2: 1,197,5xx,xxx parameters
