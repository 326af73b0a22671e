"""The encoder MLM model, its config validation, the recipe registry and presets (single process, world of 1)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from dnascale.errors import ConfigError
from dnascale.models import get_recipe, list_presets, list_recipes, load_preset
from dnascale.models.encoder import EncoderConfig, EncoderForMLM, count_parameters, flops_per_token
from dnascale.nn.attention_backends import BACKENDS

VOCAB = 12


@pytest.fixture(scope="module", autouse=True)
def world_of_one():
    from dnascale.parallel import destroy, init_distributed

    state = init_distributed(tp=1, seed=0)
    yield state
    destroy()


def _config(**overrides) -> EncoderConfig:
    fields = dict(vocab_size=VOCAB, hidden=32, layers=2, heads=4, ffn_hidden=64, max_seq_len=64, dropout=0.0,
                  vocab_pad_multiple=8)
    fields.update(overrides)
    return EncoderConfig(**fields)


def _batch(batch=3, length=20, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, length), generator=gen)
    mask = torch.arange(length)[None, :] < torch.tensor([length, 15, 9])[:batch, None]
    labels = torch.where(torch.rand(batch, length, generator=gen) < 0.3, ids, -100)
    labels[~mask] = -100
    return ids, mask, labels


def test_forward_shapes_and_output_type():
    torch.manual_seed(0)
    model = EncoderForMLM(_config())
    ids, mask, labels = _batch()
    out = model(ids, mask, labels)
    assert out.loss.shape == () and out.logits is None
    assert out.num_targets == int((labels != -100).sum()) > 0
    with_logits = model(ids, mask, labels, return_logits=True)
    assert with_logits.logits.shape == (3, 20, VOCAB)  # padding vocabulary rows are dropped
    torch.testing.assert_close(with_logits.loss, out.loss)
    assert model.encode(ids, mask).shape == (3, 20, 32)


def test_loss_is_cross_entropy_over_labelled_positions_only():
    torch.manual_seed(0)
    model = EncoderForMLM(_config())
    ids, mask, labels = _batch()
    out = model(ids, mask, labels, return_logits=True)
    targets = labels != -100
    expected = F.cross_entropy(out.logits[targets], labels[targets])
    torch.testing.assert_close(out.loss, expected, rtol=1e-6, atol=1e-6)
    # Same targets, different ignore pattern elsewhere: the loss must not move.
    relabelled = labels.clone()
    relabelled[~targets] = -100
    torch.testing.assert_close(model(ids, mask, relabelled).loss, out.loss)


def test_no_targets_gives_zero_loss_that_still_backpropagates():
    torch.manual_seed(0)
    model = EncoderForMLM(_config())
    ids, mask, _ = _batch()
    out = model(ids, mask, torch.full_like(ids, -100))
    assert out.num_targets == 0 and out.loss.item() == 0.0
    out.loss.backward()


def test_padded_tokens_do_not_influence_real_positions():
    torch.manual_seed(0)
    model = EncoderForMLM(_config(position="alibi")).eval()
    ids, mask, _ = _batch()
    scrambled = torch.where(mask, ids, (ids + 5) % VOCAB)
    torch.testing.assert_close(model.encode(ids, mask)[mask], model.encode(scrambled, mask)[mask])


@pytest.mark.parametrize(
    "variant",
    [
        dict(position="learned"),
        dict(position="none", norm="rmsnorm", activation="swiglu", bias=False),
        dict(position="alibi", norm_placement="post", activation="geglu_tanh", qk_norm="layernorm"),
        dict(position="rope", attention_backend="reference", qk_norm="rmsnorm"),
    ],
)
def test_variants_build_run_and_match_their_analytic_parameter_count(variant):
    config = _config(**variant)
    model = EncoderForMLM(config)
    assert sum(p.numel() for p in model.parameters()) == count_parameters(config)["total"]
    ids, mask, labels = _batch()
    out = model(ids, mask, labels)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_loss_decreases_when_overfitting_a_repeated_batch():
    torch.manual_seed(0)
    model = EncoderForMLM(_config(hidden=64, ffn_hidden=128)).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    ids, mask, labels = _batch(length=24)
    losses = []
    for _ in range(30):
        optimizer.zero_grad()
        loss = model(ids, mask, labels).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_activation_checkpointing_replays_dropout_exactly():
    from dnascale.parallel import seed_everything

    def grads(checkpointing: bool, state=None):
        torch.manual_seed(0)
        model = EncoderForMLM(_config(dropout=0.2, attention_dropout=0.2, activation_checkpointing=checkpointing))
        if state is not None:
            model.load_state_dict(state)
        model.train()
        seed_everything(11)
        model(*_batch()).loss.backward()
        return model.state_dict(), {n: p.grad.clone() for n, p in model.named_parameters()}

    state, plain = grads(False)
    _, recomputed = grads(True, state)
    for name, grad in plain.items():
        torch.testing.assert_close(recomputed[name], grad, rtol=0, atol=0, msg=name)


def test_rng_state_round_trip_covers_the_tracker_streams():
    from dnascale.parallel import model_parallel_rng, rng_state, set_rng_state

    saved = rng_state()
    with model_parallel_rng():
        first_tp = torch.rand(3)
    first_default = torch.rand(3)
    set_rng_state(saved)
    with model_parallel_rng():
        assert torch.equal(torch.rand(3), first_tp)
    assert torch.equal(torch.rand(3), first_default)


# ------------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(hidden=30, heads=4), r"hidden=30 must be divisible by heads=4"),
        (dict(heads=4, tp=3), r"heads=4 must be divisible by tp=3"),
        (dict(position="sinusoid"), r"position='sinusoid': choose one of \['rope', 'alibi', 'learned', 'none'\]"),
        (dict(norm="batchnorm"), r"norm='batchnorm': choose one of \['layernorm', 'rmsnorm'\]"),
        (dict(activation="tanh"), r"activation='tanh': choose one of"),
        (dict(attention_backend="xformers"), r"attention_backend='xformers': choose one of \['auto', 'reference'"),
        (dict(dropout=1.5), r"dropout=1.5: must be in \[0, 1\)"),
        (dict(layers=0), r"layers=0: must be >= 1"),
        (dict(hidden=36, heads=12, position="rope"), r"even head dimension"),
    ],
)
def test_config_validation_names_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message):
        _config(**overrides).validate()


def test_model_tp_must_match_the_process_grid():
    with pytest.raises(ConfigError, match="tensor-parallel size of 1"):
        EncoderForMLM(_config(tp=2))


@pytest.mark.skipif(BACKENDS["flash"].unavailable() is None, reason="flash-attn is usable here")
def test_selecting_flash_without_flash_attn_fails_at_build_time():
    with pytest.raises(ConfigError, match="flash-attn not installed|needs CUDA"):
        EncoderForMLM(_config(attention_backend="flash"))


# ------------------------------------------------------------------------------------------- registry


def test_registry_knows_the_encoder_and_names_known_models_on_a_miss():
    assert "encoder" in list_recipes()
    recipe = get_recipe("encoder")
    assert recipe.config_cls is EncoderConfig and recipe.tokenizer == "nucleotide-char"
    with pytest.raises(ConfigError, match=r"unknown model 'bert'; known models: \[.*'encoder'.*\]"):
        get_recipe("bert")


def test_recipe_builds_a_model_and_checks_tp(world_of_one):
    recipe = get_recipe("encoder")
    assert isinstance(recipe.build(_config(), world_of_one), EncoderForMLM)
    with pytest.raises(ConfigError, match="started with tp=1"):
        recipe.build(dataclasses.replace(_config(), tp=2), world_of_one)


def test_presets_load_and_have_the_advertised_sizes():
    assert {"tiny", "base", "1b2"} <= set(list_presets("encoder"))
    sizes = {name: count_parameters(load_preset("encoder", name))["total"] for name in ("tiny", "base", "1b2")}
    assert sizes["tiny"] < 1_000_000
    assert 80e6 < sizes["base"] < 120e6
    assert 1.1e9 < sizes["1b2"] < 1.3e9
    tiny = load_preset("encoder", "tiny")
    assert sum(p.numel() for p in EncoderForMLM(tiny).parameters()) == sizes["tiny"]


def test_preset_errors_name_the_problem(tmp_path):
    available = r"available: \['1b2', 'base', 'tiny'\]"
    with pytest.raises(ConfigError, match=rf"unknown preset 'huge' for model 'encoder'; {available}"):
        load_preset("encoder", "huge")
    (tmp_path / "encoder-typo.yaml").write_text("model:\n  hidden: 64\n  hiden_size: 64\n")
    with pytest.raises(ConfigError, match=r"encoder-typo.yaml: unknown field 'hiden_size' for EncoderConfig"):
        load_preset("encoder", "typo", presets_dir=tmp_path)
    (tmp_path / "encoder-flat.yaml").write_text("hidden: 64\n")
    with pytest.raises(ConfigError, match="top-level 'model:' mapping"):
        load_preset("encoder", "flat", presets_dir=tmp_path)
    (tmp_path / "encoder-odd.yaml").write_text("model:\n  hidden: 60\n  heads: 8\n")
    with pytest.raises(ConfigError, match="hidden=60 must be divisible by heads=8"):
        load_preset("encoder", "odd", presets_dir=tmp_path)
    (tmp_path / "encoder-typed.yaml").write_text("model:\n  hidden: '128'\n")
    with pytest.raises(ConfigError, match=r"encoder-typed.yaml: hidden: expected int, got '128'"):
        load_preset("encoder", "typed", presets_dir=tmp_path)


def test_flops_per_token_matches_a_hand_count():
    config = EncoderConfig(vocab_size=4, hidden=8, layers=1, heads=2, ffn_hidden=16, max_seq_len=16,
                           vocab_pad_multiple=8)
    # One block: 2 LayerNorms 2*(8+8) = 32; QKV 3*8*8 + 24 = 216; out 8*8 + 8 = 72; fc_in 8*16 + 16 = 144;
    # fc_out 16*8 + 8 = 136  -> 600. Final norm 16. Head: dense 64 + 8, norm 16, decoder bias 8 -> 96.
    non_embedding = 600 + 16 + 96
    assert count_parameters(config) == {"embedding": 8 * 8, "non_embedding": non_embedding, "total": 64 + 712}
    assert sum(p.numel() for p in EncoderForMLM(config).parameters()) == 64 + 712
    seq_len = 10
    # 6 FLOPs per weight per token (fwd + bwd) + attention: 12 * layers * hidden * seq_len.
    assert flops_per_token(config, seq_len) == 6 * 712 + 12 * 1 * 8 * 10 == 5232
    assert get_recipe("encoder").flops_per_token(config, seq_len) == 5232


def test_recipe_collator_and_data_window_feed_the_model():
    from dnascale.data.tokenizers import load_tokenizer

    recipe = get_recipe("encoder")
    config = _config(vocab_size=16, max_seq_len=48)
    tokenizer = load_tokenizer(recipe.tokenizer)
    window = recipe.data_window(config)
    assert window == 47  # the nucleotide-char template appends one [SEP]
    collate = recipe.make_collator(config, tokenizer, 0)
    bases = "ACGTTGCAAN" * 5
    batch = collate([{"ids": tokenizer.encode(bases[:window]), "epoch": 0, "index": i} for i in range(3)])
    assert batch.input_ids.shape[1] <= config.max_seq_len
    out = EncoderForMLM(config)(batch.input_ids, batch.attention_mask, batch.labels, **batch.extras)
    assert out.num_targets > 0 and torch.isfinite(out.loss)
