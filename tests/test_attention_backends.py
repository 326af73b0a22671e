"""Every attention backend against the float-math reference, forward and backward.

Tolerances: float64 on CPU, 1e-10 absolute (the backends compute the same sums in another order);
float32 flex/sdpa on CUDA 2e-5; flash in bfloat16 against the float64 reference 2e-2 relative to the
largest entry (bf16 keeps 8 mantissa bits).
Only real query rows are compared: outputs at padded query rows are unspecified by contract.
"""

from __future__ import annotations

import math

import pytest
import torch

from dnascale.errors import ConfigError
from dnascale.nn.attention_backends import (
    BACKENDS,
    AttentionRequest,
    MaskSpec,
    core_attention,
    resolve_backend,
)
from dnascale.nn.positions import alibi_slopes

# Eager FlexAttention on CPU warns that it is unfused; that is the point of testing it there.
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

B, H, T, D = 2, 3, 37, 8  # T not a multiple of any block size, on purpose
F64_TOL = 1e-10


def _qkv(dtype=torch.float64, device="cpu", requires_grad=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(B, H, T, D, generator=gen, dtype=torch.float64) for _ in range(3)]
    return [t.to(device=device, dtype=dtype).requires_grad_(requires_grad) for t in tensors]


def _key_padding(device="cpu"):
    lengths = torch.tensor([T, 21])
    return torch.arange(T)[None, :] < lengths[:, None]


def _cases(device="cpu") -> dict[str, MaskSpec]:
    keys = _key_padding().to(device)
    slopes = torch.tensor(alibi_slopes(H), dtype=torch.float64, device=device)
    bias = torch.randn(1, H, T, T, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(device)
    return {
        "none": MaskSpec(),
        "padding": MaskSpec(key_padding=keys, query_padding=keys),
        "causal": MaskSpec(causal=True),
        "window": MaskSpec(window=5),
        "causal_window": MaskSpec(causal=True, window=4),
        "padding_window": MaskSpec(key_padding=keys, query_padding=keys, window=6),
        "alibi": MaskSpec(alibi_slopes=slopes),
        "padding_alibi": MaskSpec(key_padding=keys, query_padding=keys, alibi_slopes=slopes),
        "bias": MaskSpec(bias=bias),
    }


def _real_rows(mask: MaskSpec) -> torch.Tensor:
    """[B, 1, T, 1] weight: 1 on real query rows, 0 on padded ones."""
    if mask.query_padding is None:
        return torch.ones(B, 1, T, 1, dtype=torch.float64)
    return mask.query_padding[:, None, :, None].to(torch.float64).cpu()


def _loss(out: torch.Tensor, mask: MaskSpec) -> torch.Tensor:
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    return (out.to(torch.float64).cpu() * weights * _real_rows(mask)).sum()


def _forward_backward(backend: str, mask: MaskSpec, dtype=torch.float64, device="cpu", grad=True):
    q, k, v = _qkv(dtype, device, requires_grad=grad)
    out = core_attention(q, k, v, mask, backend=backend)
    if not grad:
        return out, None
    _loss(out, mask).backward()
    return out, [t.grad for t in (q, k, v)]


def _assert_close(actual, expected, mask, tol, relative=False):
    """max |actual - expected| over real query rows <= tol (times max |expected| when relative)."""
    rows = _real_rows(mask).bool().expand(B, H, T, D)
    actual, expected = actual.detach().to(torch.float64).cpu()[rows], expected.detach().to(torch.float64).cpu()[rows]
    scale = expected.abs().max().item() if relative else 1.0
    assert (actual - expected).abs().max().item() <= tol * scale


def test_reference_matches_a_per_query_loop():
    """The oracle itself, against the definition written out one query at a time."""
    q, k, v = _qkv(requires_grad=False)
    keys = _key_padding()
    slopes = torch.tensor(alibi_slopes(H), dtype=torch.float64)
    mask = MaskSpec(key_padding=keys, causal=False, window=6, alibi_slopes=slopes)
    out = core_attention(q, k, v, mask, backend="reference")
    for b in range(B):
        for h in range(H):
            for i in range(T):
                visible = [j for j in range(T) if keys[b, j] and abs(i - j) <= 6]
                if not visible:
                    assert torch.all(out[b, h, i] == 0)
                    continue
                scores = torch.stack(
                    [q[b, h, i] @ k[b, h, j] / math.sqrt(D) - slopes[h] * abs(i - j) for j in visible]
                )
                expected = torch.softmax(scores, 0) @ v[b, h, visible]
                assert torch.allclose(out[b, h, i], expected, atol=1e-12)


@pytest.mark.parametrize("case", list(_cases()))
def test_sdpa_matches_reference_forward_and_backward(case):
    mask = _cases()[case]
    ref_out, ref_grads = _forward_backward("reference", mask)
    out, grads = _forward_backward("sdpa", mask)
    _assert_close(out, ref_out, mask, F64_TOL)
    for grad, ref_grad in zip(grads, ref_grads):
        _assert_close(grad, ref_grad, MaskSpec(), F64_TOL)


@pytest.mark.parametrize("case", list(_cases()))
def test_flex_matches_reference_forward_on_cpu(case):
    # torch's FlexAttention has no backward on CPU; its backward is checked on CUDA below.
    mask = _cases()[case]
    ref_out, _ = _forward_backward("reference", mask, grad=False)
    out, _ = _forward_backward("flex", mask, grad=False)
    _assert_close(out, ref_out, mask, F64_TOL)


def test_rows_that_see_no_key_are_zero():
    keys = _key_padding()
    keys[1] = False  # sequence 1: nothing visible at all
    mask = MaskSpec(key_padding=keys)
    for backend in ("reference", "sdpa"):
        out, grads = _forward_backward(backend, mask)
        assert torch.all(out[1] == 0) and all(torch.isfinite(g).all() for g in grads)
    out, _ = _forward_backward("flex", mask, grad=False)
    assert torch.all(out[1] == 0)


def test_auto_picks_sdpa_on_cpu_and_flex_refuses_training_there():
    q, k, v = _qkv()
    request = AttentionRequest.of(q, k, v, MaskSpec(window=3), 0.0)
    assert resolve_backend("auto", request).name == "sdpa"
    with pytest.raises(ConfigError, match="no backward pass on CPU"):
        core_attention(q, k, v, MaskSpec(window=3), backend="flex")
    with torch.no_grad():
        core_attention(q, k, v, MaskSpec(window=3), backend="flex")


def test_unknown_backend_names_the_choices():
    q, k, v = _qkv(requires_grad=False)
    with pytest.raises(ConfigError, match="choose one of .*'reference'.*'sdpa'.*'flex'.*'flash'"):
        core_attention(q, k, v, backend="magic")


@pytest.mark.skipif(BACKENDS["flash"].unavailable() is None, reason="flash-attn is usable here")
def test_flash_without_flash_attn_is_a_config_error():
    q, k, v = _qkv(requires_grad=False)
    with pytest.raises(ConfigError, match="flash-attn not installed|needs CUDA"):
        core_attention(q, k, v, backend="flash")


def test_alibi_slopes_follow_the_paper():
    assert alibi_slopes(8) == pytest.approx([2.0 ** -(i + 1) for i in range(8)], rel=1e-15)
    # 12 heads: the 8-head sequence, then every other slope of the 16-head sequence (2^-0.5, 2^-1.5, ...).
    expected = [2.0 ** -(i + 1) for i in range(8)] + [2.0 ** -(i + 0.5) for i in range(4)]
    assert alibi_slopes(12) == pytest.approx(expected, rel=1e-15)


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["padding", "causal", "window", "padding_window", "alibi", "bias"])
@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_cuda_backends_match_reference_forward_and_backward(backend, case):
    mask_cpu = _cases()[case]
    ref_out, ref_grads = _forward_backward("reference", mask_cpu)
    mask = _cases("cuda")[case]
    out, grads = _forward_backward(backend, mask, dtype=torch.float32, device="cuda")
    _assert_close(out, ref_out, mask_cpu, 2e-5)
    for grad, ref_grad in zip(grads, ref_grads):
        _assert_close(grad, ref_grad, MaskSpec(), 2e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["none", "padding", "causal", "window", "padding_window", "alibi", "padding_alibi"])
def test_flash_matches_reference_forward_and_backward(case):
    pytest.importorskip("flash_attn")
    mask_cpu = _cases()[case]
    ref_out, ref_grads = _forward_backward("reference", mask_cpu)
    mask = _cases("cuda")[case]
    out, grads = _forward_backward("flash", mask, dtype=torch.bfloat16, device="cuda")
    _assert_close(out, ref_out, mask_cpu, 2e-2, relative=True)
    for grad, ref_grad in zip(grads, ref_grads):
        _assert_close(grad, ref_grad, MaskSpec(), 2e-2, relative=True)
