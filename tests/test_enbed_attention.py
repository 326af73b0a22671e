"""ENBED's attention: local (sliding-window) and block-global attention against the dense reference.

Three layers of oracle, all in float64 on CPU with absolute tolerance 1e-10:
1. `explicit_dense`: the spec's equations written out here (a [Tq, Tk+G] visibility and bias built position by
   position, one softmax over local and global keys), independent of MaskSpec's own dense expansion;
2. the `reference` backend on the same MaskSpec (the project's oracle): must equal (1);
3. the `blocked` backend (pure torch, linear memory, autograd; chunked recomputation exercised too), `sdpa`
   (forward and backward) and `flex` (forward only: no CPU backward in torch 2.13) must equal (2).
Then the pieces the modules build the spec from: T5 buckets (vs transformers' T5), LongT5 fixed blocks and orphans
(vs transformers' LongT5), block sums, and the local+global module against a per-query loop of the equations.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import pytest
import torch

from dnascale.nn import attention_backends
from dnascale.nn.attention_backends import AttentionRequest, MaskSpec, core_attention, resolve_backend
from dnascale.nn.global_attention import BlockLayout, block_summaries, fixed_blocks
from dnascale.nn.local_attention import GlobalKeys, blocked_attention
from dnascale.nn.positions import alibi_slopes
from dnascale.nn.relative_bias import relative_position_bucket

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

B, H, T, D = 2, 3, 37, 4  # T a multiple of neither the window nor the block
TOL = 1e-10
LENGTHS = (T, 23)  # sequence 1 is right-padded


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _spec(causal: bool, window: int, use_global: bool, padding: bool, offsets: bool, alibi: bool, block: int = 5):
    gen = _gen(11)
    keys = torch.arange(T)[None] < torch.tensor(LENGTHS)[:, None] if padding else None
    offset_bias = torch.randn(H, 2 * window + 1, generator=gen, dtype=torch.float64) if offsets else None
    slopes = torch.tensor(alibi_slopes(H), dtype=torch.float64) if alibi else None
    global_keys = None
    if use_global:
        layout = fixed_blocks(T, block, keys, causal=causal)
        bias = torch.randn(H, 2 * layout.count + 1, generator=gen, dtype=torch.float64)
        global_keys = layout.global_keys(bias)
    return MaskSpec(key_padding=keys, query_padding=keys, causal=causal, window=window, offset_bias=offset_bias,
                    alibi_slopes=slopes, global_keys=global_keys)


def explicit_dense(mask: MaskSpec, tq: int, n_seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Visibility [B, H, Tq, Tk] and additive scores, entry by entry from the spec (section 3 of ENBED.md)."""
    g = mask.num_global
    visible = torch.zeros(B, H, tq, n_seq + g, dtype=torch.bool)
    bias = torch.zeros(B, H, tq, n_seq + g, dtype=torch.float64)
    for b, h, i in itertools.product(range(B), range(H), range(tq)):
        for j in range(n_seq):
            ok = abs(i - j) <= mask.window and (not mask.causal or j <= i)
            ok = ok and (mask.key_padding is None or bool(mask.key_padding[b, j]))
            visible[b, h, i, j] = ok
            if mask.offset_bias is not None and abs(i - j) <= mask.window:
                bias[b, h, i, j] += mask.offset_bias[h, j - i + mask.window]
            if mask.alibi_slopes is not None:
                bias[b, h, i, j] -= mask.alibi_slopes[h] * abs(i - j)
        gk = mask.global_keys
        for j in range(g):
            ok = gk.valid is None or bool(gk.valid[min(b, gk.valid.shape[0] - 1), j])
            if mask.causal:
                ok = ok and (j + 1) * gk.block - 1 <= i  # only complete blocks: no summary holds a future token
            visible[b, h, i, n_seq + j] = ok
            if gk.bias is not None:
                distance = j - int(gk.query_block[min(b, gk.query_block.shape[0] - 1), i])
                bias[b, h, i, n_seq + j] = gk.bias[h, min(max(distance + g, 0), 2 * g)]
    return visible, bias


def _qkv(n_keys: int, seed: int = 0):
    gen = _gen(seed)
    q = torch.randn(B, H, T, D, generator=gen, dtype=torch.float64)
    k = torch.randn(B, H, n_keys, D, generator=gen, dtype=torch.float64)
    v = torch.randn(B, H, n_keys, D, generator=gen, dtype=torch.float64)
    return [t.requires_grad_() for t in (q, k, v)]


def _rows(mask: MaskSpec) -> torch.Tensor:
    """[B, 1, T, 1]: 1 on real query rows (outputs at padded rows are unspecified by contract)."""
    if mask.query_padding is None:
        return torch.ones(B, 1, T, 1, dtype=torch.float64)
    return mask.query_padding[:, None, :, None].to(torch.float64)


def _run(backend, mask: MaskSpec, grad: bool = True, **kwargs):
    """Output and gradients w.r.t. q, k, v and every bias table of the spec."""
    q, k, v = _qkv(T + mask.num_global)
    tables = [t for t in (mask.offset_bias, mask.global_keys.bias if mask.global_keys else None) if t is not None]
    for table in tables:
        table.requires_grad_(grad).grad = None
    if not grad:
        with torch.no_grad():
            return (backend(q, k, v, mask, **kwargs) if callable(backend) else
                    core_attention(q, k, v, mask, backend=backend, scale=0.5)), []
    out = backend(q, k, v, mask, **kwargs) if callable(backend) else core_attention(q, k, v, mask, backend=backend,
                                                                                   scale=0.5)
    weights = torch.randn(out.shape, generator=_gen(7), dtype=torch.float64)
    (out * weights * _rows(mask)).sum().backward()
    return out * _rows(mask), [t.grad.clone() for t in (q, k, v, *tables)]


def _assert_same(a, b):
    (out_a, grads_a), (out_b, grads_b) = a, b
    assert (out_a - out_b).abs().max().item() <= TOL
    assert len(grads_a) == len(grads_b)
    for ga, gb in zip(grads_a, grads_b):
        assert (ga - gb).abs().max().item() <= TOL


CASES = {
    "encoder_local": dict(causal=False, window=6, use_global=False, padding=True, offsets=True, alibi=False),
    "encoder_local_radius1": dict(causal=False, window=1, use_global=False, padding=False, offsets=True, alibi=False),
    "encoder_tglobal": dict(causal=False, window=6, use_global=True, padding=True, offsets=True, alibi=False),
    "decoder_local_global": dict(causal=True, window=6, use_global=True, padding=True, offsets=True, alibi=False),
    "decoder_unpadded": dict(causal=True, window=9, use_global=True, padding=False, offsets=True, alibi=False),
    "alibi_window": dict(causal=False, window=4, use_global=False, padding=True, offsets=False, alibi=True),
    "global_no_offsets": dict(causal=True, window=5, use_global=True, padding=False, offsets=False, alibi=True),
}


def _scaled_reference(q, k, v, mask):
    return core_attention(q, k, v, mask, backend="reference", scale=0.5)


@pytest.mark.parametrize("case", list(CASES))
def test_reference_equals_the_spec_written_out(case):
    mask = _spec(**CASES[case])

    def dense(q, k, v, _mask):
        visible, bias = explicit_dense(mask, T, T)  # built from the (grad-tracked) bias tables
        scores = (q @ k.transpose(-1, -2)) * 0.5 + bias
        scores = scores.masked_fill(~visible, float("-inf"))
        sees = visible.any(-1, keepdim=True)
        probs = torch.softmax(scores.masked_fill(~sees, 0.0), dim=-1) * sees
        return probs @ v

    _assert_same(_run(dense, mask), _run(_scaled_reference, mask))


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("chunked", [False, True], ids=["one_chunk", "chunked_recompute"])
def test_blocked_equals_reference_forward_and_backward(case, chunked):
    mask = _spec(**CASES[case])
    # 200 scores per chunk forces several chunks, each under activation checkpointing.
    kwargs = dict(scale=0.5, chunk_elements=200 if chunked else 1 << 22)
    _assert_same(_run(blocked_attention, mask, **kwargs), _run(_scaled_reference, mask))


@pytest.mark.parametrize("block", [7, 12])
def test_blocked_with_blocks_longer_than_the_window(block):
    mask = _spec(**CASES["decoder_local_global"])
    _assert_same(_run(blocked_attention, mask, scale=0.5, block=block), _run(_scaled_reference, mask))


@pytest.mark.parametrize("case", ["encoder_local", "encoder_tglobal", "decoder_local_global"])
def test_sdpa_equals_reference_forward_and_backward(case):
    mask = _spec(**CASES[case])
    _assert_same(_run("sdpa", mask), _run("reference", mask))


@pytest.mark.parametrize("case", list(CASES))
def test_flex_equals_reference_forward_on_cpu(case):
    mask = _spec(**CASES[case])
    _assert_same(_run("flex", mask, grad=False), _run("reference", mask, grad=False))


def test_flex_builds_one_block_mask_per_mask_not_per_layer(monkeypatch):
    # Layers share the padding and the global blocks but each has its own bias tables (in the score_mod): the
    # block mask is built by the first layer and reused; the next batch's padding builds a new one.
    built = []
    real = attention_backends._create_block_mask
    monkeypatch.setattr(attention_backends, "_create_block_mask", lambda *a, **kw: built.append(1) or real(*a, **kw))
    attention_backends._BLOCK_MASKS.clear()
    first = _spec(**CASES["decoder_local_global"])
    gen = _gen(5)
    second = dataclasses.replace(
        first, offset_bias=torch.randn(first.offset_bias.shape, generator=gen, dtype=torch.float64),
        global_keys=dataclasses.replace(first.global_keys, bias=torch.randn(first.global_keys.bias.shape,
                                                                            generator=gen, dtype=torch.float64)))
    for mask in (first, second, first):
        _assert_same(_run("flex", mask, grad=False), _run("reference", mask, grad=False))
    assert len(built) == 1
    next_batch = _spec(**dict(CASES["decoder_local_global"], padding=True))
    next_batch.key_padding[0, 30:] = False  # other padding: a reused mask would let queries see these keys
    next_batch.global_keys.valid[0, 6:] = False
    _assert_same(_run("flex", next_batch, grad=False), _run("reference", next_batch, grad=False))
    assert len(built) == 2


def test_auto_routes_enbed_attention_to_blocked_on_cpu_and_flash_refuses_it():
    from dnascale.nn.attention_backends import BACKENDS

    mask = _spec(**CASES["decoder_local_global"])
    q, k, v = _qkv(T + mask.num_global)
    request = AttentionRequest.of(q, k, v, mask, 0.0)
    assert request.same_length and {"offset_bias", "global"} <= request.features
    assert resolve_backend("auto", request).name == "blocked"
    # A plain window keeps its previous choice; blocked serves it only when named.
    plain = AttentionRequest.of(q, k[:, :, :T], v[:, :, :T], MaskSpec(window=3), 0.0)
    assert resolve_backend("auto", plain).name == "sdpa"
    assert resolve_backend("blocked", plain).name == "blocked"
    assert "relative-position table" in BACKENDS["flash"].unsupported(
        AttentionRequest("cuda", torch.bfloat16, True, request.features, False, True, 16))
    with pytest.raises(Exception, match="needs a local window"):
        core_attention(q, k[:, :, :T], v[:, :, :T], MaskSpec(), backend="blocked")
    with pytest.raises(ValueError, match="offset_bias needs a window"):
        MaskSpec(offset_bias=torch.zeros(H, 3))


def test_rows_that_see_nothing_are_zero_and_gradients_finite():
    keys = torch.zeros(B, T, dtype=torch.bool)
    keys[0] = True
    mask = MaskSpec(key_padding=keys, window=3, offset_bias=torch.zeros(H, 7, dtype=torch.float64))
    out, grads = _run(blocked_attention, mask, scale=0.5)
    assert torch.all(out[1] == 0) and all(torch.isfinite(g).all() for g in grads)


def test_relative_buckets_match_t5():
    from transformers.models.t5.modeling_t5 import T5Attention

    relative = torch.arange(-600, 601)[None, :] - torch.zeros(3, 1, dtype=torch.long)
    for bidirectional in (True, False):
        expected = T5Attention._relative_position_bucket(relative, bidirectional, 32, 128)
        assert torch.equal(relative_position_bucket(relative, bidirectional, 32, 128), expected)


@pytest.mark.parametrize("length,block", [(37, 5), (40, 8), (3, 5)])
def test_fixed_blocks_match_longt5(length, block):
    from transformers.models.longt5.modeling_longt5 import _make_global_fixed_block_ids

    padding = torch.arange(length)[None] < torch.tensor([length, max(length - 14, 0)])[:, None]
    block_ids, segment_ids = _make_global_fixed_block_ids(padding.long(), block)
    layout = fixed_blocks(length, block, padding, causal=False)
    assert layout.count == length // block
    assert torch.equal(layout.member, block_ids.long())  # orphans join the last full block, padding is -1
    assert torch.equal(layout.valid, segment_ids.bool())


def test_causal_blocks_hold_only_complete_real_blocks():
    padding = torch.arange(T)[None] < torch.tensor(LENGTHS)[:, None]
    layout = fixed_blocks(T, 5, padding, causal=True)
    assert layout.count == 7
    assert layout.member[0].tolist() == [i // 5 for i in range(35)] + [-1, -1]  # the incomplete tail: no block
    assert layout.member[1].tolist() == [i // 5 if i < 23 else -1 for i in range(T)]
    assert layout.valid.tolist() == [[True] * 7, [True] * 4 + [False] * 3]  # 23 real: blocks 0-3 are complete
    x = torch.randn(B, T, 6, dtype=torch.float64)
    sums = block_summaries(x, layout)
    torch.testing.assert_close(sums[0, 2], x[0, 10:15].sum(0))
    torch.testing.assert_close(sums[1, 4], x[1, 20:23].sum(0))  # a partial block sums its real tokens only


def test_local_global_module_follows_the_equations():
    """LocalGlobalSelfAttention (causal, TP=1) against a per-query loop of section 3's equations."""
    from dnascale.nn.global_attention import LocalGlobalAttentionConfig, LocalGlobalSelfAttention
    from dnascale.nn.tp import megatron_config, normal_init
    from dnascale.parallel import destroy, init_distributed

    init_distributed(tp=1, seed=0)
    try:
        torch.manual_seed(0)
        hidden, heads, head_dim, window, block, length = 12, 2, 3, 6, 4, 19
        config = LocalGlobalAttentionConfig(hidden, heads, head_dim, window, causal=True, global_block=block)
        module = LocalGlobalSelfAttention(config, megatron_config(1), normal_init(0.3), normal_init(0.3)).double()
        with torch.no_grad():
            module.global_norm.weight.uniform_(0.5, 1.5)
        x = torch.randn(1, length, hidden, dtype=torch.float64)
        layout = fixed_blocks(length, block, None, causal=True)
        offset_bias = torch.randn(heads, 2 * window + 1, dtype=torch.float64)
        global_bias = torch.randn(heads, 2 * layout.count + 1, dtype=torch.float64)
        got = module(x, None, offset_bias, layout, global_bias)[0]

        w = module.qkv.weight.view(heads, 3, head_dim, hidden)
        wo = module.out.weight
        summaries = [x[0, j * block : (j + 1) * block].sum(0) for j in range(layout.count)]
        rms = [s / torch.sqrt(s.pow(2).mean() + config.norm_eps) * module.global_norm.weight for s in summaries]
        expected = torch.zeros(length, hidden, dtype=torch.float64)
        for i in range(length):
            heads_out = []
            for h in range(heads):
                q = w[h, 0] @ x[0, i]
                keys, values, scores = [], [], []
                for j in range(max(0, i - window), i + 1):
                    keys.append(w[h, 1] @ x[0, j])
                    values.append(w[h, 2] @ x[0, j])
                    scores.append(q @ keys[-1] + offset_bias[h, j - i + window])
                for j in range(layout.count):
                    if (j + 1) * block - 1 <= i:  # complete blocks only
                        values.append(w[h, 2] @ rms[j])
                        scores.append(q @ (w[h, 1] @ rms[j]) + global_bias[h, j - i // block + layout.count])
                probs = torch.softmax(torch.stack(scores), 0)  # one softmax over local and global keys
                heads_out.append(probs @ torch.stack(values))
            expected[i] = wo @ torch.cat(heads_out)
        assert (got - expected).abs().max().item() <= 1e-10
        assert math.isfinite(got.sum().item())
    finally:
        destroy()


def test_block_layout_needs_its_direction():
    layout = BlockLayout(4, 2, True, torch.zeros(1, 8, dtype=torch.long), torch.zeros(1, 8, dtype=torch.long),
                         torch.ones(1, 2, dtype=torch.bool))
    assert layout.global_keys(None) == GlobalKeys(2, 4, layout.query_block, layout.valid, None)
    assert BlockLayout(4, 0, True, layout.member, layout.query_block, layout.valid[:, :0]).global_keys(None) is None
