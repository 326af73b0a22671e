"""DNACHUNKER's parts and model (single process, world of one): BiMamba's bidirectional formula, chunk/dechunk,
mask protection, masked residual gating, the ratio loss, padding invariance, sizes, presets and the recipe."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dnascale.errors import ConfigError
from dnascale.models import get_recipe, list_presets, load_preset
from dnascale.models.dnachunker import DNAChunkerConfig, DNAChunkerForMLM, count_parameters, flops_per_token
from dnascale.models.dnachunker.bimamba import BiMamba, BiMambaStack, MambaConfig, flip_sequences, reverse_index
from dnascale.models.dnachunker.chunking import base_level, chunk
from dnascale.models.dnachunker.dechunk import dechunk, smoothing_gate, straight_through
from dnascale.models.dnachunker.routing import Router, protected_boundaries, ratio_loss
from dnascale.models.dnachunker.scan import linear_scan_sequential
from dnascale.ops.routing_boundary import BoundaryOutput, routing_boundary_reference

MASK, SEP = 3, 1
F64 = dict(rtol=1e-9, atol=1e-9)


@pytest.fixture(scope="module", autouse=True)
def world_of_one():
    from dnascale.parallel import destroy, init_distributed

    state = init_distributed(tp=1, seed=0)
    yield state
    destroy()


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _config(**overrides) -> DNAChunkerConfig:
    fields = dict(hidden=32, max_seq_len=128, stage_layers=1, d_state=8, headdim=8, ssm_chunk_size=8,
                  trunk_layers=1, heads=4, ffn_hidden=64, routing_backend="reference", router_init="normal",
                  init_std=0.2)
    fields.update(overrides)
    return DNAChunkerConfig(**fields)


def _batch(batch=3, length=40, lengths=(40, 31, 17), mask_rate=0.15, seed=0):
    g = _gen(seed)
    ids = torch.randint(7, 11, (batch, length), generator=g)
    padding = torch.arange(length)[None] < torch.tensor(lengths)[:batch, None]
    for row, n in enumerate(lengths[:batch]):
        ids[row, n - 1] = SEP
    targets = (torch.rand(batch, length, generator=g) < mask_rate) & padding & (ids != SEP)
    labels = torch.where(targets, ids, -100)
    ids = torch.where(targets & (torch.rand(batch, length, generator=g) < 0.8), MASK, ids)
    ids = torch.where(padding, ids, 4)
    return ids, padding, labels


def _model(seed=0, dtype=torch.float64, **overrides) -> DNAChunkerForMLM:
    torch.manual_seed(seed)
    return DNAChunkerForMLM(_config(**overrides)).to(dtype)


# --- BiMamba ------------------------------------------------------------------------------------------------


def _mamba_config(mixer: str) -> MambaConfig:
    return MambaConfig(hidden=16, mixer=mixer, d_state=4, headdim=8, chunk_size=4, dt_rank=3, init_std=0.3,
                       output_init_std=0.3)


@pytest.mark.parametrize("mixer", ["mamba2", "mamba1"])
def test_bimamba_is_forward_on_x_plus_flipped_reverse_on_flipped_x(mixer):
    torch.manual_seed(0)
    module = BiMamba(_mamba_config(mixer)).double()
    x = torch.randn(2, 13, 16, generator=_gen(1), dtype=torch.float64)

    def one_direction(direction, inputs):  # an ordinary Mamba: shared in_proj -> this direction -> shared out_proj
        projected = torch.nn.functional.linear(inputs, module.in_proj_weight)
        return torch.nn.functional.linear(direction(projected), module.out_proj_weight)

    with torch.no_grad():
        for direction in (module.forward_direction, module.reverse_direction):
            direction.config = dataclasses.replace(direction.config, scan_backend="sequential")  # the oracles
        want = one_direction(module.forward_direction, x) + one_direction(module.reverse_direction, x.flip(1)).flip(1)
        for direction in (module.forward_direction, module.reverse_direction):
            direction.config = dataclasses.replace(direction.config, scan_backend="torch")
        got = module(x)
    torch.testing.assert_close(got, want, **F64)
    # The two directions really differ (separate parameters), and in/out projections are shared (one copy).
    assert not torch.equal(module.forward_direction.conv_weight, module.reverse_direction.conv_weight)
    names = [n for n, _ in module.named_parameters()]
    assert names.count("in_proj_weight") == 1 and not any(n.endswith("in_proj_weight") and "." in n for n in names)


@pytest.mark.parametrize("mixer", ["mamba2", "mamba1"])
def test_bimamba_stack_outputs_of_a_padded_row_equal_the_unpadded_row(mixer):
    torch.manual_seed(0)
    stack = BiMambaStack(_mamba_config(mixer), layers=2, final_norm=True).double()
    x = torch.randn(2, 11, 16, generator=_gen(2), dtype=torch.float64)
    padding = torch.arange(11)[None] < torch.tensor([11, 6])[:, None]
    with torch.no_grad():
        batched = stack(x, padding)
        alone = stack(x[1:, :6])
    torch.testing.assert_close(batched[1, :6], alone[0], **F64)


def test_per_sequence_flip_keeps_padding_in_place_and_is_an_involution():
    padding = torch.arange(5)[None] < torch.tensor([5, 3])[:, None]
    index = reverse_index(padding, 5)
    x = torch.arange(10.0).reshape(2, 5, 1)
    assert flip_sequences(x, index)[:, :, 0].tolist() == [[4, 3, 2, 1, 0], [7, 6, 5, 8, 9]]
    assert torch.equal(flip_sequences(flip_sequences(x, index), index), x)
    assert reverse_index(torch.ones(2, 5, dtype=torch.bool), 5) is None


# --- chunk / dechunk ------------------------------------------------------------------------------------------


def _routing_everywhere(batch, length, padding):
    force = torch.ones(batch, length, dtype=torch.bool)
    q = torch.randn(batch, length, 4, dtype=torch.float64)
    return routing_boundary_reference(q, torch.randn_like(q), force=force, padding=padding)


def test_with_boundaries_forced_everywhere_chunk_then_dechunk_is_the_identity_on_positions():
    padding = torch.arange(9)[None] < torch.tensor([9, 5])[:, None]
    x = torch.randn(2, 9, 6, generator=_gen(3), dtype=torch.float64)
    routing = _routing_everywhere(2, 9, padding)
    level = base_level(x, padding, torch.zeros(2, 9, dtype=torch.bool))
    coarse = chunk(level, x, routing)
    assert torch.equal(coarse.padding, padding)
    assert torch.equal(coarse.start[padding], level.start[padding]) and torch.equal(coarse.end, coarse.start * padding)
    torch.testing.assert_close(coarse.hidden[padding], x[padding], rtol=0, atol=0)
    restored = dechunk(coarse.hidden, routing, padding)
    torch.testing.assert_close(restored[padding], x[padding], rtol=0, atol=0)


def test_chunk_keeps_first_positions_records_spans_and_pads_per_batch():
    boundary = torch.tensor([[1, 0, 0, 1, 1, 0], [1, 0, 1, 0, 0, 0]], dtype=torch.bool)
    padding = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    routing = BoundaryOutput(boundary.double(), boundary, boundary.cumsum(1) - 1, boundary.sum(1))
    x = torch.arange(12.0).reshape(2, 6, 1)
    masked = torch.zeros(2, 6, dtype=torch.bool)
    masked[1, 3] = True
    coarse = chunk(base_level(x, padding, masked), x, routing)
    assert coarse.hidden[..., 0].tolist() == [[0, 3, 4], [6, 8, 0]]
    assert coarse.padding.tolist() == [[True, True, True], [True, True, False]]
    assert coarse.start.tolist() == [[0, 3, 4], [0, 2, 0]] and coarse.end.tolist() == [[2, 3, 5], [1, 3, 0]]
    assert coarse.masked.tolist() == [[False, False, False], [False, True, False]]
    assert coarse.centre.tolist() == [[1.0, 3.0, 4.5], [0.5, 2.5, 0.0]]


def test_dechunk_smoothing_matches_the_written_recurrences_and_ste_is_one_forward():
    g = _gen(4)
    length, width = 12, 3
    prob = torch.rand(2, length, generator=g, dtype=torch.float64).requires_grad_()
    boundary = prob.detach() >= 0.5
    boundary[:, 0] = True
    padding = torch.arange(length)[None] < torch.tensor([12, 8])[:, None]
    boundary &= padding
    chunk_index = boundary.cumsum(1) - 1
    routing = BoundaryOutput(prob, boundary, chunk_index, boundary.sum(1))
    z = torch.randn(2, int(boundary.sum(1).max()), width, generator=g, dtype=torch.float64).requires_grad_()
    got = dechunk(z, routing, padding, chunk_size=4)

    P = smoothing_gate(prob, padding)
    assert torch.all(P[:, 0] == 1) and torch.all(P[~padding] == 1)
    zt = torch.stack([z[b, chunk_index[b]] for b in range(2)])
    f = linear_scan_sequential((1 - P)[..., None], P[..., None] * zt)
    P_next = torch.cat([P[:, 1:], torch.ones(2, 1, dtype=P.dtype)], 1)
    back = linear_scan_sequential((1 - P_next)[..., None], P_next[..., None] * zt, reverse=True)
    want = (f + back) / 2
    torch.testing.assert_close(got, want, **F64)  # STE multiplies by exactly 1
    # Gradient to p through smoothing and the STE confidence (b P + (1 - b)(1 - P)).
    weight = torch.randn(got.shape, generator=g, dtype=torch.float64)
    grad_got = torch.autograd.grad((got * weight).sum(), prob)[0]
    confidence = torch.where(boundary, P, 1 - P)
    # d/dp [z^ * STE(c)] = dz^/dp * 1 + z^ * dc/dp
    grad_want = torch.autograd.grad(((want + want.detach() * confidence[..., None]) * weight).sum(), prob)[0]
    torch.testing.assert_close(grad_got, grad_want, **F64)
    c = torch.tensor([0.3, 0.9], requires_grad=True)
    out = straight_through(c)
    assert out.tolist() == [1.0, 1.0]
    out.sum().backward()
    assert c.grad.tolist() == [1.0, 1.0]


# --- mask protection, residual gating ----------------------------------------------------------------------------


@settings(max_examples=20, deadline=None)
@given(masks=st.lists(st.booleans(), min_size=2, max_size=30), seed=st.integers(0, 1000))
def test_protection_makes_every_mask_a_singleton_chunk(masks, seed):
    masked = torch.tensor([masks])
    router = Router(8, init="normal", init_std=1.0, backend="reference")
    x = torch.randn(1, len(masks), 8, generator=_gen(seed))
    with torch.no_grad():
        routing = router(x, protected_boundaries(masked))
    sizes = torch.bincount(routing.chunk_index[0], minlength=int(routing.num_chunks))
    for t in masked[0].nonzero().flatten().tolist():
        assert routing.boundary[0, t] and sizes[routing.chunk_index[0, t]] == 1


def test_masks_are_singletons_at_both_stages_of_the_model():
    model = _model(ratio_targets=(0.2, 0.2))
    ids, padding, labels = _batch(mask_rate=0.3, seed=5)
    with torch.no_grad():
        out = model(ids, padding, labels, return_routing=True)
    masked = (ids == MASK) & padding
    assert masked.sum() > 5
    for stage in out.routing:
        starts = stage.boundary_bp
        after = torch.nn.functional.pad(masked[:, :-1], (1, 0))
        assert torch.all(starts[masked]) and torch.all(starts[after & padding])


def test_masked_positions_get_no_encoder_residual():
    model = _model(seed=1)
    with torch.no_grad():
        for residual in model.residuals:
            residual.weight.normal_(0.0, 0.5, generator=_gen(6))
    captured: dict[str, list] = {"residual": [], "dechunked": [], "decoder_in": []}
    hooks = [model.dechunk_layer.register_forward_hook(lambda m, a, o: captured["dechunked"].append(o))]
    for stage in range(2):
        hooks.append(model.residuals[stage].register_forward_hook(lambda m, a, o: captured["residual"].append(o)))
        hooks.append(model.decoders[stage].register_forward_pre_hook(lambda m, a: captured["decoder_in"].append(a[0])))
    ids, padding, labels = _batch(mask_rate=0.3, seed=7)
    with torch.no_grad():
        out = model(ids, padding, labels, return_routing=True)
    for hook in hooks:
        hook.remove()
    # Decoding runs stage 2 first, then stage 1 (bp level).
    bp = captured["decoder_in"][1] - captured["dechunked"][1]
    masked = (ids == MASK) & padding
    assert torch.equal(bp[masked], torch.zeros_like(bp[masked]))
    torch.testing.assert_close(bp[~masked & padding], captured["residual"][1][~masked & padding], **F64)
    assert bp[~masked & padding].abs().sum() > 0
    # Stage 2's level: the stage-1 chunks; the masked ones are the chunks that start at a [MASK].
    chunk_level = captured["decoder_in"][0] - captured["dechunked"][0]
    first = out.routing[0]
    chunk_masked = torch.stack([masked[b, first.chunk_start[b]] for b in range(3)]) & first.chunk_padding
    assert chunk_masked.any()
    assert torch.equal(chunk_level[chunk_masked], torch.zeros_like(chunk_level[chunk_masked]))


# --- ratio loss ----------------------------------------------------------------------------------------------


def _ratio(boundary, prob, padding=None, target=0.25):
    return float(ratio_loss(torch.tensor(boundary, dtype=torch.bool), torch.tensor(prob, dtype=torch.float64),
                            None if padding is None else torch.tensor(padding, dtype=torch.bool), target))


def test_ratio_loss_matches_its_formula_on_hand_made_cases():
    # F = G = alpha: the minimum, 1.
    assert _ratio([[1, 0, 0, 0]], [[0.25] * 4]) == pytest.approx(1.0)
    # F = 1, G = 1: 1 / alpha. F = 0, G = 0: 1 / (1 - alpha).
    assert _ratio([[1, 1]], [[1.0, 1.0]]) == pytest.approx(4.0)
    assert _ratio([[0, 0]], [[0.0, 0.0]]) == pytest.approx(1 / 0.75)
    # F = 1/2, G = 0.3: F G / a + (1 - F)(1 - G) / (1 - a) = 0.6 + 0.4666..
    assert _ratio([[1, 0]], [[0.4, 0.2]]) == pytest.approx(0.5 * 0.3 / 0.25 + 0.5 * 0.7 / 0.75)
    # H-Net's form with N = 1 / alpha.
    F, G, N = 0.5, 0.3, 4.0
    assert _ratio([[1, 0]], [[0.4, 0.2]]) == pytest.approx(N / (N - 1) * ((N - 1) * F * G + (1 - F) * (1 - G)))
    # Per sequence over its real positions, then the mean over sequences.
    row_a = 1 * 0.9 / 0.25 + 0  # F = 1, G = 0.9 (one real position)
    row_b = (1 / 3) * 0.5 / 0.25 + (2 / 3) * 0.5 / 0.75  # F = 1/3, G = 0.5
    got = _ratio([[1, 1, 0], [1, 0, 0]], [[0.9, 0.7, 0.1], [0.9, 0.3, 0.3]], padding=[[1, 0, 0], [1, 1, 1]])
    assert got == pytest.approx((row_a + row_b) / 2)


def test_loss_is_mlm_plus_weighted_ratio_losses_and_metrics_are_reported():
    model = _model(ratio_loss_weight=0.5)
    ids, padding, labels = _batch(seed=8)
    out = model(ids, padding, labels)
    ratios = out.metrics["ratio_loss_s1"] + out.metrics["ratio_loss_s2"]
    # float32 cross-entropy and ratio statistics
    assert float(out.loss.detach()) == pytest.approx(out.metrics["mlm_loss"] + 0.5 * ratios, rel=1e-6)
    assert out.num_targets == int((labels != -100).sum())
    for stage in (1, 2):
        for name in ("compression", "free_compression", "boundary_prob", "chunks"):
            assert f"{name}_s{stage}" in out.metrics
        assert 0 < out.metrics[f"compression_s{stage}"] <= 1
    assert out.metrics["bp_per_trunk_token"] >= 1


# --- the model ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mixer", ["mamba2", "mamba1"])
def test_every_parameter_gets_a_gradient_and_matches_the_analytic_count(mixer):
    # ZeRO-3 needs every parameter used on every step, whatever the chunk counts.
    config = _config(mixer=mixer, stage_layers=2, trunk_layers=2, router_init="identity", init_std=0.02)
    model = DNAChunkerForMLM(config)
    ids, padding, labels = _batch(seed=9)
    model(ids, padding, labels).loss.backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None]
    assert not missing, missing
    assert sum(p.numel() for p in model.parameters()) == count_parameters(config)["total"]


def test_router_learns_from_the_mlm_loss_alone_through_the_smoothing_gate():
    model = _model(ratio_loss_weight=0.0, dtype=torch.float32)
    ids, padding, labels = _batch(seed=10)
    model(ids, padding, labels).loss.backward()
    for router in model.routers:
        assert router.q_weight.grad.abs().sum() > 0 and router.k_weight.grad.abs().sum() > 0


def test_a_padded_row_gives_the_same_logits_as_the_row_alone():
    model = _model(seed=2)
    ids, padding, labels = _batch(seed=11)
    with torch.no_grad():
        batched = model(ids, padding, labels, return_logits=True)
        alone = model(ids[2:, :17], padding[2:, :17], labels[2:, :17], return_logits=True)
    torch.testing.assert_close(batched.logits[2, :17], alone.logits[0], **F64)


def test_the_trunk_sees_chunks_at_their_centre_in_bp():
    model = _model(seed=3)
    seen = []
    model.trunk.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs["positions"]), with_kwargs=True)
    ids, padding, labels = _batch(seed=12)
    with torch.no_grad():
        out = model(ids, padding, labels, return_routing=True)
    top = out.routing[-1]
    want = (top.chunk_start + top.chunk_end).float() / 2
    assert torch.equal(seen[0][top.chunk_padding], want[top.chunk_padding])
    assert torch.all(top.chunk_end >= top.chunk_start)


def test_loss_falls_when_overfitting_one_batch():
    model = _model(seed=4, dtype=torch.float32, init_std=0.02, router_init="identity")
    ids, padding, labels = _batch(seed=13)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(12):
        optimizer.zero_grad()
        out = model(ids, padding, labels)
        out.loss.backward()
        optimizer.step()
        losses.append(out.metrics["mlm_loss"])
    assert losses[-1] < 0.8 * losses[0], losses


def test_single_stage_and_ablation_switches_build_and_run():
    for overrides in (dict(ratio_targets=(0.5,)), dict(mask_protection=False, residual_gating=False),
                      dict(ratio_over_forced=True)):
        model = _model(**overrides)
        ids, padding, labels = _batch(seed=14)
        out = model(ids, padding, labels)
        assert torch.isfinite(out.loss)


# --- config, presets, recipe --------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides,message", [
    (dict(mixer="mamba3"), "mixer='mamba3'"),
    (dict(ratio_targets=(0.3, 1.0)), r"ratio_targets\[1\]=1.0"),
    (dict(ratio_targets=()), "ratio_targets"),
    (dict(headdim=7), "headdim=7"),
    (dict(heads=3), "divisible by heads=3"),
    (dict(scan_backend="cuda"), "scan_backend='cuda'"),
    (dict(tp=3), "divisible by tp=3"),
])
def test_config_validation_names_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message):
        _config(**overrides).validate()


def test_presets_load_and_have_the_advertised_sizes():
    assert list_presets("dnachunker") == ["172m", "1b2", "tiny"]
    paper = count_parameters(load_preset("dnachunker", "172m"))
    assert paper["trunk"] == pytest.approx(147.5e6, rel=2e-3)  # reported 147.5M
    assert paper["total"] == pytest.approx(171.6e6, rel=5e-3)  # reported 171.6M
    mamba1 = count_parameters(dataclasses.replace(load_preset("dnachunker", "172m"), mixer="mamba1", d_state=None))
    assert mamba1["encoders"] / 2 == pytest.approx(5.6e6, rel=1e-2)  # "BiMamba encoder stages (~5.6M each)"
    assert count_parameters(load_preset("dnachunker", "1b2"))["total"] == pytest.approx(1.2e9, rel=0.02)
    tiny = load_preset("dnachunker", "tiny")
    assert count_parameters(tiny)["total"] == sum(p.numel() for p in DNAChunkerForMLM(tiny).parameters())


def test_flops_per_token_weights_each_level_by_its_retention():
    config = load_preset("dnachunker", "172m")
    whole = flops_per_token(dataclasses.replace(config, ratio_targets=(0.999, 0.999)), 8192)
    compressed = flops_per_token(config, 8192)
    assert compressed < whole / 5  # the trunk dominates and runs on ~1/9 of the positions
    assert compressed > 6 * count_parameters(config)["trunk"] * 0.33 * 0.33


def test_recipe_collator_masks_with_bases_only_and_feeds_the_model():
    from dnascale.data.tokenizers import load_tokenizer

    recipe = get_recipe("dnachunker")
    config = _config()
    tokenizer = load_tokenizer(recipe.tokenizer)
    assert recipe.data_window(config) == config.max_seq_len - 1
    collator = recipe.make_collator(config, tokenizer, 0)
    assert sorted(collator.replacement_ids.tolist()) == [7, 8, 9, 10]
    samples = [{"ids": tokenizer.encode("ACGTACGTTTGACCA" * 4), "epoch": 0, "index": i} for i in range(3)]
    batch = collator(samples)
    torch.manual_seed(0)
    model = recipe.build(config, None)
    out = model(batch.input_ids, batch.attention_mask, batch.labels, **batch.extras)
    assert torch.isfinite(out.loss) and out.num_targets > 0
