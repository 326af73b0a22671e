"""The parallel scans equal their sequential recurrences: Mamba-2 SSD (chunked matmul form), Mamba-1 selective
scan (two-level parallel scan) and the first-order linear scan under both (and the dechunk smoothing).

Exactness is checked in float64 (outputs and gradients within 1e-10); float32 within the stated tolerances. The
backend choice is one rule (dnascale.models.dnachunker.ssm); mamba-ssm's kernels are compared on CUDA only.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dnascale.errors import ConfigError
from dnascale.models.dnachunker import mamba_ssm_loader, ssm
from dnascale.models.dnachunker.scan import linear_scan, linear_scan_sequential
from dnascale.models.dnachunker.selective_scan import selective_scan_chunked, selective_scan_sequential
from dnascale.models.dnachunker.ssd import segsum, ssd_chunked, ssd_sequential

F64 = dict(rtol=1e-10, atol=1e-10)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _ssd_inputs(batch=2, length=37, heads=4, headdim=3, groups=2, state=5, dtype=torch.float64, seed=0):
    g = _gen(seed)
    x = torch.randn(batch, length, heads, headdim, generator=g, dtype=dtype)
    dt = torch.nn.functional.softplus(torch.randn(batch, length, heads, generator=g, dtype=dtype))
    A = -torch.rand(heads, generator=g, dtype=dtype) * 4 - 0.1
    B = torch.randn(batch, length, groups, state, generator=g, dtype=dtype)
    C = torch.randn(batch, length, groups, state, generator=g, dtype=dtype)
    D = torch.randn(heads, generator=g, dtype=dtype)
    return [t.requires_grad_() for t in (x, dt, A, B, C, D)]


def _grads(out, inputs, seed=9):
    weight = torch.randn(out.shape, generator=_gen(seed), dtype=out.dtype)
    return torch.autograd.grad((out * weight).sum(), inputs)


@pytest.mark.parametrize("chunk", [1, 4, 8, 16, 64])
def test_ssd_chunked_equals_sequential_recurrence_float64(chunk):
    x, dt, A, B, C, D = inputs = _ssd_inputs()
    initial = torch.randn(2, 4, 3, 5, generator=_gen(3), dtype=torch.float64).requires_grad_()
    got, got_state = ssd_chunked(x, dt, A, B, C, D=D, chunk_size=chunk, initial_state=initial,
                                 return_final_state=True)
    want, want_state = ssd_sequential(x, dt, A, B, C, D=D, initial_state=initial, return_final_state=True)
    torch.testing.assert_close(got, want, **F64)
    torch.testing.assert_close(got_state, want_state, **F64)
    for g_got, g_want in zip(_grads(got, inputs + [initial]), _grads(want, inputs + [initial])):
        torch.testing.assert_close(g_got, g_want, **F64)


def test_ssd_float32_within_tolerance_and_padding_steps_change_nothing():
    inputs64 = _ssd_inputs(length=50, seed=1)
    want = ssd_sequential(*inputs64[:5], D=inputs64[5])
    inputs32 = [t.detach().float() for t in inputs64]
    got = ssd_chunked(*inputs32[:5], D=inputs32[5], chunk_size=16)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want.detach(), rtol=1e-4, atol=1e-4)
    # Appending steps with dt = 0 (how the length is padded to whole chunks) leaves earlier outputs unchanged.
    x, dt, A, B, C, D = (t.detach() for t in inputs64)
    extended = [torch.cat([t, torch.randn_like(t[:, :5])], dim=1) for t in (x, dt, B, C)]
    extended[1][:, -5:] = 0.0
    y = ssd_chunked(extended[0], extended[1], A, extended[2], extended[3], D=D, chunk_size=16)
    torch.testing.assert_close(y[:, :50], want.detach(), **F64)


def test_segsum_is_the_sum_over_each_segment():
    x = torch.tensor([1.0, 2.0, 4.0, 8.0], dtype=torch.float64)
    out = segsum(x)
    assert out[3, 1] == 4.0 + 8.0 and out[2, 2] == 0.0 and out[1, 0] == 2.0
    assert torch.isinf(out[0, 1]) and out[0, 1] < 0


def _s6_inputs(batch=2, channels=6, length=29, state=4, groups=None, seed=0):
    g = _gen(seed)
    kw = dict(generator=g, dtype=torch.float64)
    u = torch.randn(batch, channels, length, **kw)
    delta = torch.randn(batch, channels, length, **kw)
    A = -torch.rand(channels, state, **kw) * 3 - 0.1
    shape = (batch, state, length) if groups is None else (batch, groups, state, length)
    B, C = torch.randn(*shape, **kw), torch.randn(*shape, **kw)
    D, z, bias = torch.randn(channels, **kw), torch.randn(batch, channels, length, **kw), torch.randn(channels, **kw)
    return [t.requires_grad_() for t in (u, delta, A, B, C, D, z, bias)]


@pytest.mark.parametrize("chunk,groups", [(1, None), (5, None), (8, 2), (64, None)])
def test_selective_scan_chunked_equals_sequential_recurrence_float64(chunk, groups):
    inputs = _s6_inputs(groups=groups)
    u, delta, A, B, C, D, z, bias = inputs
    got = selective_scan_chunked(u, delta, A, B, C, D, z, bias, True, chunk_size=chunk)
    want = selective_scan_sequential(u, delta, A, B, C, D, z, bias, True)
    torch.testing.assert_close(got, want, **F64)
    for g_got, g_want in zip(_grads(got, inputs), _grads(want, inputs)):
        torch.testing.assert_close(g_got, g_want, **F64)


def test_selective_scan_without_optional_inputs_matches_a_hand_recurrence():
    u, delta, A, B, C = (t.detach() for t in _s6_inputs(channels=2, length=6, state=3)[:5])
    delta = delta.abs()
    got = selective_scan_chunked(u, delta, A, B, C, chunk_size=4)
    h = torch.zeros(2, 2, 3, dtype=torch.float64)
    for t in range(6):
        h = torch.exp(delta[:, :, t, None] * A) * h + delta[:, :, t, None] * B[:, None, :, t] * u[:, :, t, None]
        torch.testing.assert_close(got[:, :, t], (h * C[:, None, :, t]).sum(-1), **F64)


@settings(max_examples=25, deadline=None)
@given(
    length=st.integers(1, 70), chunk=st.sampled_from([1, 2, 3, 8, 32]), reverse=st.booleans(),
    broadcast=st.booleans(), with_initial=st.booleans(), zeros=st.booleans(), seed=st.integers(0, 2**16),
)
def test_linear_scan_equals_its_recurrence_with_gradients(length, chunk, reverse, broadcast, with_initial, zeros,
                                                          seed):
    g = _gen(seed)
    a = torch.rand(2, length, 1 if broadcast else 3, generator=g, dtype=torch.float64)
    if zeros:  # hard resets (a = 0) must be exact too: no log space anywhere
        a = torch.where(torch.rand(a.shape, generator=g, dtype=torch.float64) < 0.3, torch.zeros_like(a), a)
    a.requires_grad_()
    b = torch.randn(2, length, 3, generator=g, dtype=torch.float64).requires_grad_()
    initial = torch.randn(2, 3, generator=g, dtype=torch.float64).requires_grad_() if with_initial else None
    got = linear_scan(a, b, reverse=reverse, initial=initial, chunk_size=chunk)
    want = linear_scan_sequential(a, b, reverse=reverse, initial=initial)
    torch.testing.assert_close(got, want, **F64)
    inputs = [a, b] + ([initial] if with_initial else [])
    for g_got, g_want in zip(_grads(got, inputs), _grads(want, inputs)):
        torch.testing.assert_close(g_got, g_want, **F64)


def test_linear_scan_passes_gradcheck():
    a = torch.rand(2, 9, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, 9, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: linear_scan(a, b, chunk_size=4), (a, b))


def test_backend_rule_auto_takes_torch_on_cpu_and_named_backends_are_used_or_refused():
    assert ssm.resolve_scan_backend("ssd", "auto", "cpu") == "torch"
    assert ssm.resolve_scan_backend("selective", "sequential", "cpu") == "sequential"
    with pytest.raises(ConfigError, match="mamba_ssm.*CUDA tensors only"):
        ssm.resolve_scan_backend("ssd", "mamba_ssm", "cpu")
    with pytest.raises(ConfigError, match="scan_backend='triton'"):
        ssm.resolve_scan_backend("ssd", "triton", "cpu")
    x, dt, A, B, C, D = (t.detach() for t in _ssd_inputs(length=10))
    torch.testing.assert_close(ssm.ssd_scan(x, dt, A, B, C, D=D, backend="sequential"),
                               ssm.ssd_scan(x, dt, A, B, C, D=D, chunk_size=4), **F64)


@pytest.mark.gpu
def test_mamba_ssm_kernels_match_the_torch_scans_on_cuda():
    # mamba-ssm is an optional extra: not installed is a skip that says so; installed but unusable is a failure,
    # also where it was built without its CUDA extension (the loader then takes the Triton module on its own).
    try:
        mamba_ssm_loader.load_ssd_kernel()
    except mamba_ssm_loader.MambaSSMNotInstalled:
        pytest.skip("mamba-ssm is not installed (pip install -e .[gpu])")
    except mamba_ssm_loader.MambaSSMUnavailable as err:
        pytest.fail(f"mamba-ssm is installed but its SSD kernel is unusable: {err}")
    reason = ssm.mamba_ssm_unavailable("ssd", "cuda")
    assert reason is None, f"mamba-ssm is installed but its SSD kernel is unusable: {reason}"
    inputs = [t.detach().float().cuda() for t in _ssd_inputs(length=300, heads=4, headdim=16, state=16)]
    x, dt, A, B, C, D = inputs
    got = ssm.ssd_scan(x, dt, A, B, C, D=D, chunk_size=64, backend="mamba_ssm")
    want = ssm.ssd_scan(x, dt, A, B, C, D=D, chunk_size=64, backend="torch")
    torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3)
    if ssm.mamba_ssm_unavailable("selective", "cuda") is None:
        s6 = [t.detach().float().cuda() for t in _s6_inputs(channels=8, length=100)]
        got = ssm.selective_scan(*s6[:5], D=s6[5], z=s6[6], delta_bias=s6[7], delta_softplus=True,
                                 backend="mamba_ssm")
        want = ssm.selective_scan(*s6[:5], D=s6[5], z=s6[6], delta_bias=s6[7], delta_softplus=True,
                                  backend="torch")
        torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3)
