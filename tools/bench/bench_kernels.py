"""Forward+backward time of the csrc kernels against their pure-torch twins, as ratios measured in one run.

    python tools/bench/bench_kernels.py [--device cpu|cuda] [--dtype float32] [--reps 7] [--threads N] [--quick]
                                  [--peak-gbps X]

Cases (shapes from the specs):
- G-gram fusion at DNAZEN base shapes: batch 32, 128 tokens, 64 G-grams, hidden 768; each G-gram occurs once or
  twice as a 2-5 token span (a few thousand matches per batch). Backends: the extension, the sparse torch
  reference (index_select + index_add), the dense formulation h + bmm(M, g) in float32 with M prebuilt (as
  DNAZEN's collator hands it over, so its construction is not timed), and DNAZEN's own code path (that bmm
  followed by a per-sample Python loop of slices, a cat and an add on unpadded states).
- Routing boundary at DNACHUNKER shapes: batch 8, 4096 bp, hidden 256 and 640, with mask protection forcing ~20% of
  positions. Backends: the extension and the eager reference (H-Net-style torch).

Each timing is the median of --reps repetitions of forward + backward (after --warmup), inputs and output
gradients prebuilt, the backends taking turns within each repetition (shared machines are noisy: compare ratios).
On CUDA it also times each kernel alone and reports the bandwidth of its compulsory traffic
(every input read once, every output written once) and, with --peak-gbps or a known device, the fraction of peak.
The last line printed is one JSON object; its headline keys are `ggram_fusion_speedup_vs_dense` and
`boundary_speedup_vs_eager` (the smaller of the two hidden sizes).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch

from dnascale.ops.extensions import available_backends
from dnascale.ops.ggram_fusion import GGramMatching, ggram_fusion, ggram_fusion_dense
from dnascale.ops.routing_boundary import routing_boundary

# Peak HBM bandwidth in GB/s by device-name fragment (vendor datasheets), for the fraction-of-peak figures.
PEAK_GBPS = {"H200": 4800.0, "H100 SXM": 3350.0, "H100 80GB HBM3": 3350.0, "H100 PCIe": 2000.0, "H100": 3350.0,
             "A100-SXM4-80GB": 2039.0, "A100": 1555.0}


def make_matching(batch: int, tokens: int, ggrams: int, generator: torch.Generator) -> GGramMatching:
    """Every G-gram row j of every sequence occurs once or twice, as a span of 2-5 tokens inside [1, N-1)."""
    triplets = []
    for b in range(batch):
        for j in range(ggrams):
            length = int(torch.randint(2, 6, (1,), generator=generator))
            for _ in range(int(torch.randint(1, 3, (1,), generator=generator))):
                start = int(torch.randint(1, tokens - 1 - length, (1,), generator=generator))
                triplets += [(b, n, j) for n in range(start, start + length)]
    return GGramMatching.from_triplets(torch.tensor(triplets), batch, tokens, ggrams)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def median_seconds(step, device: str, reps: int, warmup: int) -> float:
    return interleaved_medians({"step": step}, device, reps, warmup)["step"]


def interleaved_medians(steps: dict, device: str, reps: int, warmup: int) -> dict[str, float]:
    """Median seconds per step, the steps taking turns within each repetition, so that load from other processes
    on a shared machine falls on every backend alike and the ratios stay meaningful."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    _sync(device)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(reps):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def fwd_bwd(fn, inputs: list[torch.Tensor], grad: torch.Tensor):
    """Forward, then the gradients w.r.t. `inputs` (autograd.grad: as for a non-leaf inside a model, no .grad
    accumulation copies, which would time the same extra copy for every backend)."""

    def step():
        out = fn()
        torch.autograd.grad(out, inputs, grad)

    return step


def dnazen_code_fusion(h_packed: torch.Tensor, g: torch.Tensor, matrix: torch.Tensor, cu_seqlens: torch.Tensor):
    """The fusion as DNAZEN's release code performs it (zen_modeling/zen_layers.py, ZenEncoder.forward), restated:
    a float32 bmm over the collator's integer [B, N, M] matrix, then a per-sample Python loop that slices each
    sequence's real tokens out of the padded product, a cat, and an add onto the unpadded [nnz, D] states."""
    fused = torch.bmm(matrix.float(), g.float())
    pieces = []
    for i in range(fused.shape[0]):
        count = int((cu_seqlens[i + 1] - cu_seqlens[i]).item())
        pieces.append(fused[i, :count, :])
    return h_packed + torch.cat(pieces, dim=0).to(h_packed.dtype)


def bench_ggram(args, device: str, dtype: torch.dtype) -> dict:
    batch, tokens, ggrams, dim = (4, 32, 16, 64) if args.quick else (32, 128, 64, 768)
    gen = torch.Generator().manual_seed(0)
    matching = make_matching(batch, tokens, ggrams, gen).to(device)
    h = torch.randn(batch, tokens, dim, generator=gen).to(device, dtype).requires_grad_()
    g = torch.randn(batch, ggrams, dim, generator=gen).to(device, dtype).requires_grad_()
    grad = torch.randn(batch, tokens, dim, generator=gen).to(device, dtype)
    dense_m = matching.dense(torch.float32)  # prebuilt, as the DNAZEN collator hands it over
    long_m = matching.dense(torch.long)  # the collator's dtype in DNAZEN's code
    h_packed = h.detach().reshape(batch * tokens, dim).requires_grad_()  # no padding: nnz = B * N
    grad_packed = grad.reshape(batch * tokens, dim)
    cu_seqlens = torch.arange(0, batch + 1, device=device, dtype=torch.int32) * tokens
    cases = {
        "extension": (lambda: ggram_fusion(h, g, matching, backend=device), [h, g], grad),
        "reference": (lambda: ggram_fusion(h, g, matching, backend="reference"), [h, g], grad),
        "dense_bmm": (lambda: ggram_fusion_dense(h, g, dense_m), [h, g], grad),
        "dnazen_code": (lambda: dnazen_code_fusion(h_packed, g, long_m, cu_seqlens), [h_packed, g], grad_packed),
    }
    steps = {name: fwd_bwd(fn, inputs, out_grad) for name, (fn, inputs, out_grad) in cases.items()}
    timings = interleaved_medians(steps, device, args.reps, args.warmup)
    csr_bytes = sum(t.numel() * t.element_size() for t in matching[3:])
    result = {
        "shape": {"batch": batch, "tokens": tokens, "ggrams": ggrams, "hidden": dim, "matches": matching.num_matches},
        "ms": {name: round(seconds * 1e3, 3) for name, seconds in timings.items()},
        "speedup_vs_dense": timings["dense_bmm"] / timings["extension"],
        "speedup_vs_dnazen_code": timings["dnazen_code"] / timings["extension"],
        "speedup_vs_reference": timings["reference"] / timings["extension"],
        "matching_bytes": {"csr": csr_bytes, "dense_matrix_fp32": dense_m.numel() * 4},
    }
    if device == "cuda":
        result["kernels"] = ggram_kernel_bandwidth(args, h.detach(), g.detach(), grad, matching)
    return result


def bench_boundary(args, device: str, dtype: torch.dtype, dim: int) -> dict:
    batch, length = (2, 256) if args.quick else (8, 4096)
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(batch, length, dim, generator=gen).to(device, dtype).requires_grad_()
    k = torch.randn(batch, length, dim, generator=gen).to(device, dtype).requires_grad_()
    masked = torch.rand(batch, length, generator=gen) < 0.12  # [MASK] positions (15% x 80%)
    force = (masked | torch.nn.functional.pad(masked[:, :-1], (1, 0))).to(device)  # b_t = b_{t+1} = 1
    grad = torch.randn(batch, length, generator=gen).to(device, torch.promote_types(dtype, torch.float32))
    steps = {
        name: fwd_bwd(lambda backend=backend: routing_boundary(q, k, force, backend=backend).prob, [q, k], grad)
        for name, backend in (("extension", device), ("reference", "reference"))
    }
    timings = interleaved_medians(steps, device, args.reps, args.warmup)
    result = {
        "shape": {"batch": batch, "length": length, "hidden": dim},
        "ms": {name: round(seconds * 1e3, 3) for name, seconds in timings.items()},
        "speedup_vs_eager": timings["reference"] / timings["extension"],
    }
    if device == "cuda":
        result["kernels"] = boundary_kernel_bandwidth(args, q.detach(), k.detach(), force, grad)
    return result


def _bandwidth(args, seconds: float, nbytes: int) -> dict:
    gbps = nbytes / seconds / 1e9
    out = {"us": round(seconds * 1e6, 1), "gb_per_s": round(gbps, 1)}
    if args.peak_gbps:
        out["fraction_of_peak"] = round(gbps / args.peak_gbps, 3)
    return out


def ggram_kernel_bandwidth(args, h, g, grad, matching) -> dict:
    batch, tokens, dim = h.shape
    rows, cols = batch * tokens, g.shape[0] * g.shape[1]
    flat_h, flat_g, flat_grad = h.reshape(rows, dim), g.reshape(cols, dim), grad.reshape(rows, dim)
    size, index = h.element_size(), 8
    ops = torch.ops.dnascale
    fwd = median_seconds(lambda: ops.ggram_fusion_fwd(flat_h, flat_g, matching.token_ptr, matching.token_ggram),
                         "cuda", args.reps * 5, args.warmup)
    bwd = median_seconds(lambda: ops.ggram_fusion_grad_g(flat_grad, matching.ggram_ptr, matching.ggram_token, cols),
                         "cuda", args.reps * 5, args.warmup)
    atomic = median_seconds(
        lambda: ops.ggram_fusion_grad_g_atomic(flat_grad, matching.token_ptr, matching.token_ggram, cols),
        "cuda", args.reps * 5, args.warmup)
    csr = (rows + cols + 2 + 2 * matching.num_matches) * index
    return {
        "fwd": _bandwidth(args, fwd, (2 * rows + cols) * dim * size + csr // 2),
        "grad_g_deterministic": _bandwidth(args, bwd, (rows + cols) * dim * size + csr // 2),
        "grad_g_atomic": _bandwidth(args, atomic, (rows + cols) * dim * size + csr // 2),
    }


def boundary_kernel_bandwidth(args, q, k, force, grad) -> dict:
    ops = torch.ops.dnascale
    eps = 1e-6
    size, cells = q.element_size(), q.shape[0] * q.shape[1]
    fwd = median_seconds(lambda: ops.routing_boundary_fwd(q, k, force, None, eps), "cuda", args.reps * 5, args.warmup)
    bwd = median_seconds(lambda: ops.routing_boundary_bwd(grad, q, k, force, None, eps), "cuda", args.reps * 5,
                         args.warmup)
    return {
        # fwd: read q, k, force; write prob (fp32), boundary, chunk_index, num_chunks
        "fwd": _bandwidth(args, fwd, 2 * q.numel() * size + cells * (1 + 4 + 1 + 8)),
        # bwd: read q, k, grad_prob, force; write grad_q, grad_k
        "bwd": _bandwidth(args, bwd, 4 * q.numel() * size + cells * (4 + 1)),
    }


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="tiny shapes (a smoke test of this script)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--peak-gbps", type=float, default=None, help="peak memory bandwidth for fraction-of-peak")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    device, dtype = args.device, getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    for op in ("ggram_fusion", "routing_boundary"):
        reason = available_backends(op)[device]
        if reason is not None:
            raise SystemExit(f"bench_kernels.py: the {op} {device} extension is unavailable: {reason}")
    name = platform.processor() or platform.machine()
    if device == "cuda":
        name = torch.cuda.get_device_name()
        if args.peak_gbps is None:
            args.peak_gbps = next((v for k, v in PEAK_GBPS.items() if k in name), None)
    print(f"device {device} ({name}), dtype {args.dtype}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, median of {args.reps}")

    ggram = bench_ggram(args, device, dtype)
    print(f"ggram fusion {ggram['shape']}: {ggram['ms']} ms fwd+bwd; extension is "
          f"{ggram['speedup_vs_dense']:.2f}x dense bmm, {ggram['speedup_vs_dnazen_code']:.2f}x DNAZEN's code path, "
          f"{ggram['speedup_vs_reference']:.2f}x sparse torch; "
          f"matching {ggram['matching_bytes']} bytes")
    boundary = {}
    for dim in (256, 640):
        boundary[dim] = bench_boundary(args, device, dtype, dim)
        print(f"routing boundary {boundary[dim]['shape']}: {boundary[dim]['ms']} ms fwd+bwd; extension is "
              f"{boundary[dim]['speedup_vs_eager']:.2f}x eager torch")
    for label, kernels in [("ggram", ggram.get("kernels"))] + [(f"boundary d{d}", b.get("kernels"))
                                                               for d, b in boundary.items()]:
        if kernels:
            print(f"{label} kernels alone: {kernels}")

    summary = {
        "device": device,
        "device_name": name,
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "ggram_fusion_speedup_vs_dense": round(ggram["speedup_vs_dense"], 2),
        "ggram_fusion_speedup_vs_dnazen_code": round(ggram["speedup_vs_dnazen_code"], 2),
        "ggram_fusion_speedup_vs_reference": round(ggram["speedup_vs_reference"], 2),
        "boundary_speedup_vs_eager": round(min(b["speedup_vs_eager"] for b in boundary.values()), 2),
        "boundary_speedup_vs_eager_by_hidden": {str(d): round(b["speedup_vs_eager"], 2) for d, b in boundary.items()},
        "ms": {"ggram": ggram["ms"], **{f"boundary_d{d}": b["ms"] for d, b in boundary.items()}},
        "matching_bytes": ggram["matching_bytes"],
        "quick": args.quick,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }
    if device == "cuda":
        per_boundary = {f"boundary_d{d}": b["kernels"] for d, b in boundary.items()}
        summary["kernels"] = {"ggram": ggram["kernels"], **per_boundary}
        summary["peak_gbps"] = args.peak_gbps
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
