"""G-gram fusion op: the matching's CSRs, the sparse reference against the dense DNAZEN formulation, the CPU
extension against the reference (float64 exact, stated tolerances otherwise), gradchecks and edge cases;
`gpu` tests for the CUDA kernels (deterministic gather and atomic scatter)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dnascale.ops import extensions
from dnascale.ops.ggram_fusion import (
    GGramMatching,
    ggram_fusion,
    ggram_fusion_dense,
    ggram_fusion_reference,
)

TOL = {torch.float64: 1e-12, torch.float32: 1e-5}


@pytest.fixture(scope="module")
def cpu_kernel():
    """The CPU extension, built on first use; skipped only where this machine has no compiler."""
    missing = extensions._compiler_missing("cpu")
    if missing:
        pytest.skip(f"no toolchain to build the CPU kernel: {missing}")
    reason = extensions.extension_unavailable("ggram_fusion", "cpu")
    assert reason is None, f"the ggram_fusion CPU kernel failed to build: {reason}"
    return "cpu"


def random_case(batch, tokens, ggrams, dim, matches, dtype=torch.float64, device="cpu", seed=0, padded=False):
    gen = torch.Generator().manual_seed(seed)
    triplets = torch.stack(
        [
            torch.randint(0, batch, (matches,), generator=gen),
            torch.randint(0, max(tokens, 1), (matches,), generator=gen),
            torch.randint(0, max(ggrams, 1), (matches,), generator=gen),
        ],
        dim=1,
    )[: matches if tokens and ggrams else 0]
    token_valid = ggram_valid = None
    if padded:  # the last third of the tokens and G-gram rows of every sequence are padding
        token_valid = torch.arange(tokens)[None, :].expand(batch, -1) < tokens - tokens // 3
        ggram_valid = torch.arange(ggrams)[None, :].expand(batch, -1) < ggrams - ggrams // 3
    matching = GGramMatching.from_triplets(triplets, batch, tokens, ggrams, token_valid=token_valid,
                                           ggram_valid=ggram_valid).to(device)
    h = torch.randn(batch, tokens, dim, generator=gen, dtype=torch.float64).to(device, dtype)
    g = torch.randn(batch, ggrams, dim, generator=gen, dtype=torch.float64).to(device, dtype)
    return h, g, matching


def fwd_bwd(fn, h, g, grad):
    h, g = h.detach().requires_grad_(), g.detach().requires_grad_()
    out = fn(h, g)
    return (out, *torch.autograd.grad(out, (h, g), grad))


# ---------------------------------------------------------------- the matching


def test_matching_csrs_on_a_hand_example():
    # sequence 0: token 1 in G-grams 0 and 2, token 2 in G-gram 0; sequence 1: token 0 in G-gram 1 (listed twice)
    triplets = torch.tensor([[0, 1, 2], [0, 2, 0], [0, 1, 0], [1, 0, 1], [1, 0, 1]])
    m = GGramMatching.from_triplets(triplets, batch=2, tokens=3, ggrams=3)
    assert m.num_matches == 4  # the duplicate collapsed
    assert m.token_ptr.tolist() == [0, 0, 2, 3, 4, 4, 4]
    assert m.token_row.tolist() == [1, 1, 2, 3]
    assert m.token_ggram.tolist() == [0, 2, 0, 4]  # ascending within a token row; rows of g are b * M + j
    assert m.ggram_ptr.tolist() == [0, 2, 2, 3, 3, 4, 4]
    assert m.ggram_token.tolist() == [1, 2, 1, 3]  # ascending within a G-gram row
    dense = m.dense()
    assert dense.shape == (2, 3, 3) and dense.sum() == 4 and dense[0, 1, 2] == 1 and dense[1, 0, 1] == 1
    again = GGramMatching.from_dense(dense)
    assert all(torch.equal(a, b) for a, b in zip(again[3:], m[3:]))


def test_matching_validation_and_padding():
    with pytest.raises(ValueError, match="token index out of range"):
        GGramMatching.from_triplets(torch.tensor([[0, 5, 0]]), 1, 5, 2)
    with pytest.raises(ValueError, match="G-gram index out of range"):
        GGramMatching.from_triplets(torch.tensor([[0, 1, -1]]), 1, 5, 2)
    with pytest.raises(ValueError, match=r"\[K, 3\]"):
        GGramMatching.from_triplets(torch.zeros(4, 2, dtype=torch.long), 1, 5, 2)
    triplets = torch.tensor([[0, 0, 0], [0, 1, 1], [0, 4, 0]])
    m = GGramMatching.from_triplets(triplets, 1, 5, 2, token_valid=torch.tensor([[1, 1, 1, 0, 0]]).bool(),
                                    ggram_valid=torch.tensor([[True, False]]))
    assert m.num_matches == 1 and m.token_row.tolist() == [0] and m.token_ggram.tolist() == [0]
    empty = GGramMatching.from_triplets(torch.zeros(0, 3, dtype=torch.long), 2, 4, 3)
    assert empty.num_matches == 0 and empty.token_ptr.tolist() == [0] * 9


def test_matching_memory_is_linear_in_matches():
    m = random_case(32, 128, 64, 1, matches=5000)[2]
    held = sum(t.numel() for t in m[3:])
    assert held == (32 * 128 + 1) + (32 * 64 + 1) + 3 * m.num_matches  # not 32 * 128 * 64


# ---------------------------------------------------------------- the references


def test_reference_equals_dense_formulation():
    h, g, m = random_case(3, 20, 7, 9, matches=60, seed=1)
    grad = torch.randn_like(h)
    out, dh, dg = fwd_bwd(lambda a, b: ggram_fusion_reference(a, b, m), h, g, grad)
    dense_out, dense_dh, dense_dg = fwd_bwd(lambda a, b: ggram_fusion_dense(a, b, m), h, g, grad)
    torch.testing.assert_close(out, dense_out, atol=1e-12, rtol=0)
    torch.testing.assert_close(dh, grad, atol=0, rtol=0)
    torch.testing.assert_close(dense_dh, grad, atol=0, rtol=0)
    torch.testing.assert_close(dg, dense_dg, atol=1e-12, rtol=0)
    # and both are v* = v + sum_j m_ij mu_j, written out
    manual = h.clone()
    for b, n, j in zip(m.token_row // 20, m.token_row % 20, m.token_ggram % 7):
        manual[b, n] += g[b, j]
    torch.testing.assert_close(out, manual, atol=1e-12, rtol=0)


def test_gradcheck_reference():
    h, g, m = random_case(2, 6, 4, 3, matches=14, seed=2)
    assert torch.autograd.gradcheck(lambda a, b: ggram_fusion_reference(a, b, m),
                                    (h.requires_grad_(), g.requires_grad_()))


# ---------------------------------------------------------------- CPU extension against the reference


def test_gradcheck_cpu_extension(cpu_kernel):
    h, g, m = random_case(2, 6, 4, 3, matches=14, seed=2)
    assert torch.autograd.gradcheck(lambda a, b: ggram_fusion(a, b, m, backend=cpu_kernel),
                                    (h.requires_grad_(), g.requires_grad_()))


def check_against_reference(h, g, m, backend):
    dtype = h.dtype
    grad = torch.randn(h.shape, dtype=torch.float64).to(h.device, dtype)
    out, dh, dg = fwd_bwd(lambda a, b: ggram_fusion(a, b, m, backend=backend), h, g, grad)
    ref, _, rdg = fwd_bwd(lambda a, b: ggram_fusion_reference(a, b, m), h.double(), g.double(), grad.double())
    assert out.dtype == dtype and dg.dtype == dtype and out.shape == h.shape and dg.shape == g.shape
    assert torch.equal(dh, grad)  # the token gradient is the output gradient, untouched
    if dtype in TOL:
        torch.testing.assert_close(out.double(), ref, atol=TOL[dtype], rtol=TOL[dtype])
        torch.testing.assert_close(dg.double(), rdg, atol=TOL[dtype], rtol=TOL[dtype])
    else:  # half/bfloat16: accumulated in float32, then one rounding: within one ulp of the float64 result
        ulp = torch.finfo(dtype).eps
        torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=ulp)
        torch.testing.assert_close(dg.double(), rdg, atol=1e-5, rtol=ulp)


@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 3),
    tokens=st.integers(1, 24),
    ggrams=st.integers(0, 9),
    dim=st.integers(1, 80),
    matches=st.integers(0, 120),
    dtype=st.sampled_from([torch.float64, torch.float32, torch.bfloat16, torch.float16]),
    padded=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_cpu_extension_matches_reference(cpu_kernel, batch, tokens, ggrams, dim, matches, dtype, padded, seed):
    h, g, m = random_case(batch, tokens, ggrams, dim, matches, dtype, seed=seed, padded=padded)
    check_against_reference(h, g, m, cpu_kernel)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_no_matches(backend, request):
    if backend == "cpu":
        request.getfixturevalue("cpu_kernel")
    h, g, m = random_case(2, 5, 3, 4, matches=0)
    grad = torch.randn_like(h)
    out, dh, dg = fwd_bwd(lambda a, b: ggram_fusion(a, b, m, backend=backend), h, g, grad)
    assert torch.equal(out, h) and torch.equal(dh, grad) and not dg.any()


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_one_token_in_fifty_ggrams(backend, request):
    if backend == "cpu":
        request.getfixturevalue("cpu_kernel")
    batch, tokens, ggrams, dim = 2, 8, 50, 33
    triplets = torch.tensor([[1, 3, j] for j in range(ggrams)] + [[0, 0, 7], [1, 4, 49]])
    m = GGramMatching.from_triplets(triplets, batch, tokens, ggrams)
    h = torch.randn(batch, tokens, dim, dtype=torch.float64)
    g = torch.randn(batch, ggrams, dim, dtype=torch.float64)
    grad = torch.randn_like(h)
    out, _, dg = fwd_bwd(lambda a, b: ggram_fusion(a, b, m, backend=backend), h, g, grad)
    torch.testing.assert_close(out[1, 3], h[1, 3] + g[1].sum(0), atol=1e-12, rtol=0)
    torch.testing.assert_close(out[0, 0], h[0, 0] + g[0, 7], atol=1e-12, rtol=0)
    torch.testing.assert_close(dg[1, 49], grad[1, 3] + grad[1, 4], atol=1e-12, rtol=0)
    torch.testing.assert_close(dg[1, :49], grad[1, 3].expand(49, -1), atol=1e-12, rtol=0)
    assert not dg[0, :7].any() and not dg[0, 8:].any()


def test_padding_rows_are_untouched(cpu_kernel):
    h, g, m = random_case(2, 9, 6, 16, matches=80, seed=5, padded=True)
    g_garbage = g.clone()
    g_garbage[:, 4:] = float("nan")  # padded G-gram rows may hold anything: they are never read
    grad = torch.randn_like(h)
    out, _, dg = fwd_bwd(lambda a, b: ggram_fusion(a, b, m, backend=cpu_kernel), h, g_garbage, grad)
    assert torch.isfinite(out).all()
    assert torch.equal(out[:, 6:], h[:, 6:])  # padded tokens: no G-gram added
    assert not dg[:, 4:].any()  # padded G-grams get no gradient
    torch.testing.assert_close(out, ggram_fusion_reference(h, g, m), atol=1e-12, rtol=0)


def test_cpu_extension_is_deterministic_and_handles_strided_inputs(cpu_kernel):
    h, g, m = random_case(3, 40, 12, 100, matches=400, dtype=torch.float32, seed=6)
    h_strided = torch.randn(3, 40, 200)[..., ::2]
    h_strided.copy_(h)
    first = ggram_fusion(h, g, m, backend=cpu_kernel)
    assert torch.equal(first, ggram_fusion(h_strided, g, m, backend=cpu_kernel))
    grad = torch.randn_like(h)
    dg1 = fwd_bwd(lambda a, b: ggram_fusion(a, b, m, backend=cpu_kernel), h, g, grad)[2]
    dg2 = fwd_bwd(lambda a, b: ggram_fusion(a, b, m, backend=cpu_kernel), h, g, grad)[2]
    assert torch.equal(dg1, dg2)


def test_shape_and_device_checks():
    h, g, m = random_case(2, 5, 3, 4, matches=6)
    with pytest.raises(ValueError, match="built for"):
        ggram_fusion(h[:, :4], g, m)
    with pytest.raises(ValueError, match="share a floating dtype"):
        ggram_fusion(h, g.float(), m)


def test_benchmark_script_smoke(cpu_kernel, repo_root):
    """tools/bench/bench_kernels.py runs end to end (tiny shapes) and ends with the JSON line the docs quote."""
    # Build both kernels here, so the subprocess only loads them: a compile inside it is what its timeout would cut.
    assert extensions.extension_unavailable("routing_boundary", "cpu") is None
    result = subprocess.run(
        [sys.executable, str(repo_root / "tools" / "bench" / "bench_kernels.py"), "--quick", "--reps", "1", "--warmup", "1"],
        capture_output=True, text=True, timeout=300, cwd=repo_root,
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    # A smoke test of the script, not of speed (tiny shapes, one repetition, a loaded machine): the ratios exist.
    for key in ("ggram_fusion_speedup_vs_dense", "boundary_speedup_vs_eager", "ggram_fusion_speedup_vs_dnazen_code"):
        assert isinstance(summary[key], float) and summary[key] >= 0


def test_build_lock_clears_a_baton_left_by_a_killed_build(tmp_path):
    """torch's lock file outlives a SIGKILLed builder; under our flock it is a leftover and must not block."""
    (tmp_path / "lock").write_text("")
    with extensions._exclusive_build(tmp_path):
        assert not (tmp_path / "lock").exists()
    script = ("import fcntl, sys; f = open(sys.argv[1], 'a');"
              "sys.exit(0 if fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB) is None else 1)")
    with extensions._exclusive_build(tmp_path):  # held: another process cannot take it
        held = subprocess.run([sys.executable, "-c", script, str(tmp_path / ".build.lock")], capture_output=True)
        assert held.returncode != 0 and b"BlockingIOError" in held.stderr
    free = subprocess.run([sys.executable, "-c", script, str(tmp_path / ".build.lock")], capture_output=True)
    assert free.returncode == 0, free.stderr


# ---------------------------------------------------------------- CUDA kernels (skipped without a GPU)


@pytest.fixture(scope="module")
def cuda_kernel():
    reason = extensions.extension_unavailable("ggram_fusion", "cuda")
    assert reason is None, f"the ggram_fusion CUDA kernel failed to build: {reason}"
    return "cuda"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(2, 5, 3, 4, 6), (3, 40, 12, 100, 400), (4, 128, 64, 768, 2000),
                                   (2, 17, 50, 33, 300), (2, 9, 0, 8, 0)])
def test_cuda_kernel_matches_reference(cuda_kernel, dtype, shape):
    batch, tokens, ggrams, dim, matches = shape
    h, g, m = random_case(batch, tokens, ggrams, dim, matches, dtype, device="cuda", seed=tokens, padded=True)
    check_against_reference(h, g, m, cuda_kernel)


@pytest.mark.gpu
def test_cuda_gradcheck(cuda_kernel):
    h, g, m = random_case(2, 6, 4, 3, matches=14, device="cuda", seed=2)
    assert torch.autograd.gradcheck(lambda a, b: ggram_fusion(a, b, m, backend=cuda_kernel),
                                    (h.requires_grad_(), g.requires_grad_()))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_deterministic_and_atomic_backward(cuda_kernel, dtype):
    h, g, m = random_case(4, 128, 64, 768, matches=3000, dtype=dtype, device="cuda", seed=9)
    grad = torch.randn_like(h)
    runs = [fwd_bwd(lambda a, b: ggram_fusion(a, b, m, backend=cuda_kernel), h, g, grad)[2] for _ in range(3)]
    assert all(torch.equal(runs[0], other) for other in runs[1:])  # gather backward: bitwise reproducible
    atomic = fwd_bwd(lambda a, b: ggram_fusion(a, b, m, backend=cuda_kernel, deterministic=False), h, g, grad)[2]
    torch.testing.assert_close(atomic.float(), runs[0].float(), atol=1e-2 if dtype == torch.bfloat16 else 1e-5,
                               rtol=1e-2 if dtype == torch.bfloat16 else 1e-5)
