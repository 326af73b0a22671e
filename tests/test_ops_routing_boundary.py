"""Routing boundary op: the reference's contract, the CPU extension against it (float64 exact, stated tolerances
otherwise), gradchecks, edge cases, the dispatch rule and its fallback; `gpu` tests for the CUDA kernels."""

from __future__ import annotations

import logging
import math
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from dnascale.errors import ConfigError
from dnascale.ops import extensions
from dnascale.ops.routing_boundary import EPS, BoundaryOutput, routing_boundary, routing_boundary_reference

# Tolerances (absolute, on prob; relative-to-scale on gradients) of an extension against the float64 reference.
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-5, torch.float16: 1e-5}
GRAD_TOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-3}


@pytest.fixture(scope="module")
def cpu_kernel():
    """The CPU extension, built on first use. Skips only where this machine has no compiler; a build failure with
    a compiler present is a test failure."""
    missing = extensions._compiler_missing("cpu")
    if missing:
        pytest.skip(f"no toolchain to build the CPU kernel: {missing}")
    reason = extensions.extension_unavailable("routing_boundary", "cpu")
    assert reason is None, f"the routing_boundary CPU kernel failed to build: {reason}"
    return "cpu"


def make_inputs(batch, length, dim, dtype=torch.float64, device="cpu", seed=0, p_force=0.2, pad="mixed"):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, length, dim, generator=gen, dtype=torch.float64)
    k = torch.randn(batch, length, dim, generator=gen, dtype=torch.float64)
    force = torch.rand(batch, length, generator=gen) < p_force
    padding = None
    if pad == "mixed" and length > 1:  # right padding, left padding, a hole
        padding = torch.ones(batch, length, dtype=torch.bool)
        padding[0, -(length // 3):] = False
        if batch > 1:
            padding[1, : length // 4] = False
        if batch > 2:
            padding[2, length // 2] = False
    to = dict(device=device)
    return (q.to(dtype=dtype, **to), k.to(dtype=dtype, **to), force.to(**to),
            None if padding is None else padding.to(**to))


def assert_outputs_close(out: BoundaryOutput, ref: BoundaryOutput, tol: float) -> None:
    assert out.prob.shape == ref.prob.shape
    torch.testing.assert_close(out.prob.double().cpu(), ref.prob.double().cpu(), atol=tol, rtol=0)
    decided = (ref.prob.double().cpu() - 0.5).abs() > 10 * tol  # near-ties may round either way
    assert torch.equal(out.boundary.cpu()[decided], ref.boundary.cpu()[decided])
    if bool(decided.all()):
        assert torch.equal(out.chunk_index.cpu(), ref.chunk_index.cpu())
        assert torch.equal(out.num_chunks.cpu(), ref.num_chunks.cpu())
    assert out.boundary.dtype == torch.bool and out.chunk_index.dtype == torch.long
    assert out.num_chunks.dtype == torch.long and out.num_chunks.shape == out.prob.shape[:1]


# ---------------------------------------------------------------- the reference's contract (no compiler needed)


def test_reference_formula_on_a_hand_example():
    q = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, 0.0]]], dtype=torch.float64)
    k = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.0, 1.0], [1.0, 1.0]]], dtype=torch.float64)
    out = routing_boundary_reference(q, k)
    # t=0 start; t=1 cos(q1,k0)=1 -> 0; t=2 cos(q2,k1)=1 -> 0; t=3 cos(q3,k2)=0 -> 0.5; t=4 zero q -> cos 0 -> 0.5
    torch.testing.assert_close(out.prob, torch.tensor([[1.0, 0.0, 0.0, 0.5, 0.5]], dtype=torch.float64))
    assert out.boundary.tolist() == [[True, False, False, True, True]]
    assert out.chunk_index.tolist() == [[0, 0, 0, 1, 2]] and out.num_chunks.tolist() == [3]


def test_reference_padding_force_and_starts():
    q, k, _, _ = make_inputs(1, 8, 4, pad=None)
    padding = torch.tensor([[False, False, True, True, True, True, False, False]])
    force = torch.tensor([[True, False, False, False, True, False, True, False]])  # forced pad stays pad
    out = routing_boundary_reference(q, k, force, padding)
    assert out.prob[0, :2].tolist() == [0.0, 0.0] and out.prob[0, 6:].tolist() == [0.0, 0.0]
    assert out.prob[0, 2] == 1.0 and out.boundary[0, 2]  # first real position after left padding starts a chunk
    assert out.prob[0, 4] == 1.0 and out.boundary[0, 4]  # forced
    assert not out.boundary[0, :2].any() and not out.boundary[0, 6:].any()
    assert out.chunk_index[0, :2].tolist() == [-1, -1]  # before the first chunk
    assert out.chunk_index[0, 7] == out.num_chunks[0] - 1  # trailing padding keeps the last chunk's index


def test_reference_matches_torch_cosine_similarity_away_from_eps():
    q, k, _, _ = make_inputs(2, 9, 5, pad=None)
    out = routing_boundary_reference(q, k)
    cos = torch.nn.functional.cosine_similarity(q[:, 1:], k[:, :-1], dim=-1)
    torch.testing.assert_close(out.prob[:, 1:], ((1 - cos) / 2).clamp(0, 1))


def test_gradcheck_reference():
    q, k, force, padding = make_inputs(3, 7, 4)
    q.requires_grad_()
    k.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: routing_boundary_reference(a, b, force, padding).prob, (q, k))


# ---------------------------------------------------------------- CPU extension against the reference


def test_gradcheck_cpu_extension(cpu_kernel):
    q, k, force, padding = make_inputs(3, 7, 5, seed=3)
    q.requires_grad_()
    k.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda a, b: routing_boundary(a, b, force, padding, backend=cpu_kernel).prob, (q, k)
    )


def _grads(fn, q, k, grad_prob):
    q, k = q.detach().requires_grad_(), k.detach().requires_grad_()
    out = fn(q, k)
    return (out, *torch.autograd.grad(out.prob, (q, k), grad_prob))


@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 3),
    length=st.integers(1, 40),
    dim=st.integers(1, 70),
    dtype=st.sampled_from([torch.float64, torch.float32, torch.bfloat16, torch.float16]),
    p_force=st.sampled_from([0.0, 0.1, 0.5]),
    pad=st.sampled_from([None, "mixed"]),
    seed=st.integers(0, 10_000),
)
@example(batch=1, length=29, dim=1, dtype=torch.float32, p_force=0.1, pad="mixed", seed=1)  # D = 1: cancellation
def test_cpu_extension_matches_reference(cpu_kernel, batch, length, dim, dtype, p_force, pad, seed):
    q, k, force, padding = make_inputs(batch, length, dim, dtype, seed=seed, p_force=p_force, pad=pad)
    force = force if p_force > 0 else None
    grad_prob = torch.randn(batch, length, dtype=torch.promote_types(dtype, torch.float32))
    out, dq, dk = _grads(lambda a, b: routing_boundary(a, b, force, padding, backend=cpu_kernel), q, k, grad_prob)
    # The oracle: the reference on the same (rounded) inputs, in float64.
    ref, rq, rk = _grads(lambda a, b: routing_boundary_reference(a, b, force, padding), q.double(), k.double(),
                         grad_prob.double())
    assert_outputs_close(out, ref, TOL[dtype])
    assert out.prob.dtype == torch.promote_types(dtype, torch.float32)
    assert dq.dtype == dtype and dk.dtype == dtype
    # d prob_t / d q_t is a difference of two terms of size |grad_prob_t| / |q_t| that cancel exactly when D = 1
    # (the cosine of 1-d vectors is +-1): rounding is relative to those terms, not to their (possibly 0) sum.
    g = grad_prob.double().abs()
    q_terms = torch.zeros_like(g)
    q_terms[:, 1:] = g[:, 1:] / q[:, 1:].double().norm(dim=-1).clamp_min(1e-30)
    k_terms = torch.zeros_like(g)
    k_terms[:, :-1] = g[:, 1:] / k[:, :-1].double().norm(dim=-1).clamp_min(1e-30)
    for got, want, terms in ((dq, rq, q_terms), (dk, rk, k_terms)):
        bound = GRAD_TOL[dtype] * (1.0 + want.abs() + terms.unsqueeze(-1))
        excess = ((got.double() - want).abs() - bound).max() if want.numel() else torch.tensor(-1.0)
        assert excess <= 0, f"gradient off by {float(excess):.3g} beyond the bound"


def test_cpu_extension_float64_exact_on_a_larger_case(cpu_kernel):
    q, k, force, padding = make_inputs(3, 300, 96, seed=7)
    grad_prob = torch.randn(3, 300, dtype=torch.float64)
    out, dq, dk = _grads(lambda a, b: routing_boundary(a, b, force, padding, backend=cpu_kernel), q, k, grad_prob)
    ref, rq, rk = _grads(lambda a, b: routing_boundary_reference(a, b, force, padding), q, k, grad_prob)
    assert_outputs_close(out, ref, 1e-12)
    torch.testing.assert_close(dq, rq, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(dk, rk, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_single_position(backend, request):
    if backend == "cpu":
        request.getfixturevalue("cpu_kernel")
    q, k, _, _ = make_inputs(2, 1, 3, pad=None)
    q.requires_grad_()
    out = routing_boundary(q, k, backend=backend)
    assert out.prob.tolist() == [[1.0], [1.0]] and out.boundary.all()
    assert out.chunk_index.tolist() == [[0], [0]] and out.num_chunks.tolist() == [1, 1]
    (dq,) = torch.autograd.grad(out.prob.sum(), q)
    assert torch.equal(dq, torch.zeros_like(dq))


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_everything_forced(backend, request):
    if backend == "cpu":
        request.getfixturevalue("cpu_kernel")
    q, k, _, _ = make_inputs(2, 6, 3, pad=None)
    q.requires_grad_()
    k.requires_grad_()
    out = routing_boundary(q, k, torch.ones(2, 6, dtype=torch.bool), backend=backend)
    assert torch.equal(out.prob, torch.ones(2, 6, dtype=torch.float64)) and out.boundary.all()
    assert out.chunk_index.tolist() == [list(range(6))] * 2 and out.num_chunks.tolist() == [6, 6]
    dq, dk = torch.autograd.grad(out.prob.sum(), (q, k))
    assert not dq.any() and not dk.any()


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_zero_vectors_are_safe(backend, request):
    if backend == "cpu":
        request.getfixturevalue("cpu_kernel")
    q, k, _, _ = make_inputs(2, 6, 4, pad=None)
    q[0, 2] = 0.0  # zero query
    k[0, 3] = 0.0  # zero key (scores position 4)
    q[1] = 0.0
    k[1] = 0.0  # everything zero
    q[0, 5] = 1e-8 * q[0, 5] / q[0, 5].norm()  # tiny: |q||k| below eps, the eps branch with a nonzero dot
    q.requires_grad_()
    k.requires_grad_()
    out = routing_boundary(q, k, backend=backend)
    assert torch.isfinite(out.prob).all()
    assert out.prob[0, 2] == 0.5 and out.prob[0, 4] == 0.5 and (out.prob[1, 1:] == 0.5).all()
    dq, dk = torch.autograd.grad(out.prob.sum(), (q, k))
    assert torch.isfinite(dq).all() and torch.isfinite(dk).all()
    ref = routing_boundary_reference(q, k)
    rq, rk = torch.autograd.grad(ref.prob.sum(), (q, k))
    torch.testing.assert_close(out.prob, ref.prob, atol=1e-12, rtol=0)
    torch.testing.assert_close(dq, rq, atol=1e-9, rtol=1e-10)
    torch.testing.assert_close(dk, rk, atol=1e-9, rtol=1e-10)
    # The eps branch: cos = dot / eps, and d cos / dq = k / eps.
    expected = float((q[0, 5] * k[0, 4]).sum().detach() / EPS)
    assert math.isclose(float(1 - 2 * out.prob[0, 5].detach()), max(-1.0, min(1.0, expected)), rel_tol=1e-9)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_empty_sequences(backend, request):
    if backend == "cpu":
        request.getfixturevalue("cpu_kernel")
    q = torch.zeros(3, 0, 4)
    out = routing_boundary(q, q.clone(), backend=backend)
    assert out.prob.shape == (3, 0) and out.num_chunks.tolist() == [0, 0, 0]


def test_cpu_extension_takes_non_contiguous_inputs(cpu_kernel):
    base = torch.randn(2, 8, 10, dtype=torch.float64)
    q, k = base[..., :5], base[..., 5:]  # strided views
    out = routing_boundary(q, k, backend=cpu_kernel)
    assert_outputs_close(out, routing_boundary_reference(q.contiguous(), k.contiguous()), 1e-12)


# ---------------------------------------------------------------- dispatch and fallback


def test_dispatch_rule(cpu_kernel, monkeypatch):
    monkeypatch.delenv(extensions.ENV_BACKEND, raising=False)
    assert extensions.resolve_backend("routing_boundary", "auto", "cpu") == "cpu"
    assert extensions.resolve_backend("routing_boundary", "reference", "cpu") == "reference"
    monkeypatch.setenv(extensions.ENV_BACKEND, "reference")
    assert extensions.resolve_backend("routing_boundary", "auto", "cpu") == "reference"
    assert extensions.resolve_backend("routing_boundary", "cpu", "cpu") == "cpu"  # explicit names are honoured
    monkeypatch.setenv(extensions.ENV_BACKEND, "fastest")
    with pytest.raises(ConfigError, match="DNASCALE_OPS_BACKEND"):
        extensions.resolve_backend("routing_boundary", "auto", "cpu")
    with pytest.raises(ConfigError, match="unknown"):
        extensions.resolve_backend("routing_boundary", "triton", "cpu")
    with pytest.raises(ConfigError, match="cannot run on cpu"):
        extensions.resolve_backend("routing_boundary", "cuda", "cpu")


def test_falls_back_to_the_reference_with_one_warning(monkeypatch, caplog):
    monkeypatch.delenv(extensions.ENV_BACKEND, raising=False)
    monkeypatch.setattr(extensions, "_status", {})
    monkeypatch.setattr(extensions, "_warned", set())
    monkeypatch.setattr(extensions, "_compiler_missing", lambda device: "no C++ compiler (test)")
    q, k, force, padding = make_inputs(2, 5, 3)
    with caplog.at_level(logging.WARNING, logger="dnascale.ops"):
        first = routing_boundary(q, k, force, padding)
        routing_boundary(q, k, force, padding)
        extensions.extension_unavailable("ggram_fusion", "cpu")
    assert_outputs_close(first, routing_boundary_reference(q, k, force, padding), 0.0)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "no C++ compiler" in warnings[0].getMessage()
    with pytest.raises(ConfigError, match="no C\\+\\+ compiler"):
        routing_boundary(q, k, backend="cpu")


def test_package_works_without_a_compiler(tmp_path):
    """A fresh process with no compiler on PATH and an empty build cache: import, compute through the reference."""
    env = dict(os.environ, CXX=str(tmp_path / "no-such-compiler"), DNASCALE_EXTENSIONS_DIR=str(tmp_path / "cache"))
    env.pop(extensions.ENV_BACKEND, None)
    code = (
        "import torch\n"
        "from dnascale.ops.routing_boundary import routing_boundary\n"
        "from dnascale.ops.ggram_fusion import GGramMatching, ggram_fusion\n"
        "q = torch.randn(2, 5, 3, requires_grad=True)\n"
        "out = routing_boundary(q, torch.randn(2, 5, 3))\n"
        "out.prob.sum().backward()\n"
        "m = GGramMatching.from_triplets(torch.tensor([[0, 1, 0], [1, 2, 1]]), 2, 5, 2)\n"
        "print(out.num_chunks.shape, ggram_fusion(torch.randn(2, 5, 3), torch.randn(2, 2, 3), m).shape)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "no C++ compiler" in result.stderr and result.stderr.count("falling back") == 1
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.so"))


# ---------------------------------------------------------------- CUDA kernels (skipped without a GPU)


@pytest.fixture(scope="module")
def cuda_kernel():
    reason = extensions.extension_unavailable("routing_boundary", "cuda")
    assert reason is None, f"the routing_boundary CUDA kernel failed to build: {reason}"
    return "cuda"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(2, 1, 8), (3, 37, 5), (4, 300, 256), (2, 129, 640), (2, 64, 100)])
def test_cuda_kernel_matches_reference(cuda_kernel, dtype, shape):
    batch, length, dim = shape
    q, k, force, padding = make_inputs(batch, length, dim, dtype, device="cuda", seed=length)
    grad_prob = torch.randn(batch, length, dtype=torch.promote_types(dtype, torch.float32), device="cuda")
    out, dq, dk = _grads(lambda a, b: routing_boundary(a, b, force, padding, backend=cuda_kernel), q, k, grad_prob)
    ref, rq, rk = _grads(lambda a, b: routing_boundary_reference(a, b, force, padding), q.double(), k.double(),
                         grad_prob.double())
    assert_outputs_close(out, ref, TOL[dtype])
    for got, want in ((dq, rq), (dk, rk)):
        scale = max(1.0, float(want.abs().max()))
        torch.testing.assert_close(got.double(), want, atol=GRAD_TOL[dtype] * scale, rtol=GRAD_TOL[dtype])


@pytest.mark.gpu
def test_cuda_kernel_edge_cases(cuda_kernel):
    q, k, _, _ = make_inputs(2, 6, 4, device="cuda", pad=None)
    q[1] = 0.0
    k[1] = 0.0
    out = routing_boundary(q, k, torch.zeros(2, 6, dtype=torch.bool, device="cuda"), backend=cuda_kernel)
    assert_outputs_close(out, routing_boundary_reference(q, k), 1e-12)
    forced = routing_boundary(q, k, torch.ones(2, 6, dtype=torch.bool, device="cuda"), backend=cuda_kernel)
    assert forced.boundary.all() and forced.num_chunks.tolist() == [6, 6]
    empty = routing_boundary(q[:, :0], k[:, :0], backend=cuda_kernel)
    assert empty.num_chunks.tolist() == [0, 0]


@pytest.mark.gpu
def test_cuda_gradcheck(cuda_kernel):
    q, k, force, padding = make_inputs(3, 7, 5, device="cuda", seed=3)
    q.requires_grad_()
    k.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda a, b: routing_boundary(a, b, force, padding, backend=cuda_kernel).prob, (q, k)
    )
