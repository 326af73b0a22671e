"""The DNAZEN model (dnascale.models.dnazen): fused (csrc scatter-add) == dense matching-matrix formulation ==
sparse reference, the forward equations, the recipe and presets (single process, world of 1)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from dnascale.errors import ConfigError
from dnascale.models import get_recipe, list_presets, load_preset
from dnascale.models.dnazen import DnazenConfig, DnazenForMLM, count_parameters, flops_per_token, make_collator
from dnascale.ops.extensions import extension_unavailable
from dnascale.ops.ggram_fusion import GGramMatching

VOCAB, GVOCAB, B, T, M = 40, 30, 3, 24, 6


@pytest.fixture(scope="module", autouse=True)
def world_of_one():
    from dnascale.parallel import destroy, init_distributed

    state = init_distributed(tp=1, seed=0)
    yield state
    destroy()


def _config(**overrides) -> DnazenConfig:
    fields = dict(vocab_size=VOCAB, ggram_vocab_size=GVOCAB, hidden=32, layers=3, heads=4, ffn_hidden=48,
                  ggram_layers=2, ggram_heads=2, ggram_ffn_hidden=40, max_seq_len=64, dropout=0.0,
                  vocab_pad_multiple=8, init_std=0.2)
    fields.update(overrides)
    return DnazenConfig(**fields)


def _inputs(seed=0):
    """A batch with padding, a sample without G-grams, overlapping G-grams, a token in two rows of one G-gram."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (B, T), generator=gen)
    mask = torch.arange(T)[None, :] < torch.tensor([T, 17, 9])[:, None]
    labels = torch.where(torch.rand(B, T, generator=gen) < 0.3, ids, -100)
    labels[~mask] = -100
    labels[0, 1] = ids[0, 1]
    ggram_ids = torch.tensor([[3, 7, 12, 29, 0, 0], [5, 9, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]])
    spans = {(0, 0): [(1, 3), (10, 2)], (0, 1): [(2, 4)], (0, 2): [(20, 3)], (0, 3): [(4, 5)],
             (1, 0): [(1, 2), (5, 2), (6, 2)], (1, 1): [(14, 3)]}
    triplets = [(b, t + k, j) for (b, j), occ in spans.items() for t, n in occ for k in range(n)]
    return ids, mask, labels, ggram_ids, torch.tensor(triplets)


def _run(model, inputs, dtype=torch.float32):
    ids, mask, labels, ggram_ids, triplets = inputs
    model.zero_grad(set_to_none=True)
    out = model(ids, mask, labels, ggram_ids=ggram_ids, ggram_triplets=triplets, return_logits=True)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


@pytest.mark.parametrize("dtype,tol", [(torch.float64, dict(rtol=1e-10, atol=1e-12)),
                                       (torch.float32, dict(rtol=1e-5, atol=1e-5))])
def test_fused_kernel_equals_dense_matching_matrix_and_reference(dtype, tol):
    torch.manual_seed(0)
    model = DnazenForMLM(_config(fusion_backend="dense")).to(dtype)
    inputs = _inputs()
    results = {}
    backends = ["dense", "reference"] + (["cpu"] if extension_unavailable("ggram_fusion", "cpu") is None else [])
    for backend in backends:
        model.config.fusion_backend = backend
        results[backend] = _run(model, inputs)
    assert "cpu" in results, f"the csrc CPU kernel did not load: {extension_unavailable('ggram_fusion', 'cpu')}"
    want_out, want_grads = results["dense"]
    for backend in backends[1:]:
        out, grads = results[backend]
        torch.testing.assert_close(out.logits, want_out.logits, **tol)
        torch.testing.assert_close(out.loss, want_out.loss, **tol)
        assert grads.keys() == want_grads.keys()
        for name in grads:
            torch.testing.assert_close(grads[name], want_grads[name], **tol, msg=lambda m: f"{backend} {name}: {m}")
    # The G-gram side really is trained through the fusion (embedding rows of used G-grams get gradients).
    ggram_grad = want_grads["ggram_embeddings.word.word.weight"]
    assert ggram_grad[3].abs().sum() > 0 and ggram_grad[0].abs().sum() == 0 and ggram_grad[1].abs().sum() == 0


def test_forward_follows_the_spec_equations():
    """h(l) = E4BULayer_l(h(l-1)) + M mu(l) for l <= L_g, mu(l) = GLayer_l(mu(l-1)); later layers see no G-grams."""
    torch.manual_seed(1)
    config = _config(layers=4, ggram_layers=2)
    model = DnazenForMLM(config).double().eval()
    ids, mask, _, ggram_ids, triplets = _inputs(1)
    matrix = GGramMatching.from_triplets(triplets, B, T, M).dense(torch.float64)
    with torch.no_grad():
        h = model.embeddings(ids)
        mu = model.ggram_embeddings(ggram_ids)
        for layer in range(config.layers):
            h = model.layers[layer](h, mask)
            if layer < config.ggram_layers:
                mu = model.ggram_layers[layer](mu, ggram_ids != 0)
                h = h + torch.bmm(matrix, mu)
        got = model.encode(ids, mask, ggram_ids, triplets)
        plain = model.encode(ids, mask)
    torch.testing.assert_close(got[mask], h[mask], rtol=1e-10, atol=1e-12)
    # The sample without G-grams is the plain E4BU encoder; the others are changed by their G-grams.
    torch.testing.assert_close(got[2][mask[2]], plain[2][mask[2]], rtol=1e-10, atol=1e-12)
    assert not torch.allclose(got[0][mask[0]], plain[0][mask[0]])


def test_blocks_are_post_norm_alibi_geglu_and_the_ggram_encoder_has_no_positions():
    model = DnazenForMLM(_config())
    token, ggram = model.layers[0], model.ggram_layers[0]
    assert not token.pre_norm and not ggram.pre_norm
    assert type(token.attention.positions).__name__ == "AlibiPositions"
    assert type(ggram.attention.positions).__name__ == "AttentionPositions"  # the no-op hook
    assert token.mlp.fc_gate is not None and ggram.mlp.fc_gate is None
    assert model.embeddings.norm.eps == 1e-12
    # ALiBi slopes of 12 heads as DNABERT-2: 2^-1..2^-8, then 2^-0.5, 2^-1.5, 2^-2.5, 2^-3.5.
    from dnascale.nn.positions import alibi_slopes

    want = [2.0 ** -k for k in range(1, 9)] + [2.0 ** -(k + 0.5) for k in range(4)]
    assert alibi_slopes(12) == pytest.approx(want)


def test_training_on_a_collated_batch_lowers_the_loss():
    from dnascale.data.tokenizers import load_tokenizer
    from dnascale.models.dnazen import DNAZEN_TOKENIZER

    tokenizer = load_tokenizer(DNAZEN_TOKENIZER)
    config = dataclasses.replace(load_preset("dnazen", "tiny"), layers=2, ggram_layers=1)
    collator = make_collator(config, tokenizer, seed=0)
    rng = np.random.default_rng(0)
    samples = [{"ids": torch.from_numpy(rng.integers(5, 4096, size=60)), "epoch": 0, "index": i} for i in range(4)]
    batch = collator(samples)
    torch.manual_seed(0)
    model = DnazenForMLM(config)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(10):
        out = model(batch.input_ids, batch.attention_mask, batch.labels, **batch.extras)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert out.num_targets == int((batch.labels != -100).sum())
    assert set(out.metrics) == {"ggrams_per_seq", "mask_rate", "truncated"}


def test_recipe_presets_sizes_and_flops():
    recipe = get_recipe("dnazen")
    assert list_presets("dnazen") == ["1b2", "base", "tiny"]
    sizes = {p: count_parameters(load_preset("dnazen", p)) for p in ("tiny", "base", "1b2")}
    base = sizes["base"]
    # README: 285M; the spec's breakdown: E4BU ~117M, G-layers 42.5M, G-embedding 125.0M.
    assert 284e6 < base["total"] < 286e6
    assert 116e6 < base["token_embedding"] + base["token_layers"] + base["head"] < 118e6
    assert round(base["ggram_layers"] / 1e6, 1) == 42.5 and round(base["ggram_embedding"] / 1e6) == 125
    assert 1.19e9 < sizes["1b2"]["total"] < 1.22e9
    tiny = load_preset("dnazen", "tiny")
    model = recipe.build(tiny, None)
    assert sum(p.numel() for p in model.parameters()) == sizes["tiny"]["total"]
    assert recipe.data_window(tiny) == 512 and recipe.tokenizer.endswith("assets/dnazen/tokenizer")
    assert flops_per_token(load_preset("dnazen", "base"), 2000) > 6 * base["token_layers"]


@pytest.mark.parametrize("field,value,match", [
    ("ggram_layers", 13, r"ggram_layers=13: must be in \[0, layers=12\]"),
    ("fusion_backend", "bmm", "fusion_backend='bmm': choose one of"),
    ("masking", "span", "masking='span'"),
    ("ggram_heads", 5, "hidden=768 must be divisible by ggram_heads=5"),
    ("mask_rate", 0.0, "mask_rate=0.0"),
])
def test_config_validation_names_the_field(field, value, match):
    with pytest.raises(ConfigError, match=match):
        dataclasses.replace(DnazenConfig(), **{field: value}).validate()


def test_collator_refuses_a_vocabulary_larger_than_the_table():
    from dnascale.data.tokenizers import load_tokenizer
    from dnascale.models.dnazen import DNAZEN_TOKENIZER

    config = dataclasses.replace(load_preset("dnazen", "tiny"), ggram_vocab_size=100)
    with pytest.raises(ConfigError, match="ggram_vocab_size=100 rows"):
        make_collator(config, load_tokenizer(DNAZEN_TOKENIZER), seed=0)
