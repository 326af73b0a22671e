"""Throughput, model FLOPs utilisation and memory.

MFU = achieved model FLOPs per second / peak dense FLOPs of the devices used. Model FLOPs per token come from the
recipe (forward + backward, no recomputation counted: this is MFU, not HFU). Peak numbers are dense (no 2:4
sparsity) tensor-core figures from the vendors' datasheets for the SXM parts.
"""

from __future__ import annotations

import resource
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

# Dense peak FLOP/s per device by dtype (NVIDIA datasheets, SXM form factor).
PEAK_FLOPS: dict[str, dict[str, float]] = {
    "H100": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12, "tf32": 494.5e12},
    "H200": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12, "tf32": 494.5e12},
    "H800": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12, "tf32": 494.5e12},
    "A100": {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12, "tf32": 156e12},
}


def device_peak_flops(dtype: str = "bf16", device_name: str | None = None) -> float | None:
    """Peak FLOP/s of this process's CUDA device for `dtype`, or None when unknown (CPU, other GPUs)."""
    if device_name is None:
        if not torch.cuda.is_available():
            return None
        device_name = torch.cuda.get_device_name()
    for key, peaks in PEAK_FLOPS.items():
        if key in device_name.upper():
            return peaks.get(dtype)
    return None


def mfu(tokens_per_s: float, flops_per_token: float, n_devices: int, peak_per_device: float | None) -> float | None:
    if not peak_per_device or n_devices <= 0:
        return None
    return tokens_per_s * flops_per_token / (peak_per_device * n_devices)


def peak_memory_gib() -> float:
    """Peak accelerator memory if on GPU, else this process's peak resident set size."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**30 if sys.platform == "darwin" else rss / 2**20  # Linux reports KiB


@dataclass
class StepTimer:
    """Wall time per optimizer step, excluding the steps that include one-time work (first step, evals, saves)."""

    started: float = field(default_factory=time.perf_counter)

    def lap(self) -> float:
        now = time.perf_counter()
        elapsed, self.started = now - self.started, now
        return elapsed


@dataclass
class StepStats:
    """One optimizer step, summed over micro-batches and data-parallel ranks (each token counted once)."""

    loss_sum: float  # loss x targets, so the mean is per target whatever the batch composition
    targets: float
    tokens: float
    nonfinite: bool
    metrics: dict[str, float]  # the model's own scalars, averaged over micro-batches and data-parallel ranks


def sum_over_ranks(values: list[float]) -> list[float]:
    """Element-wise sum over every rank (float64, one collective); the values themselves in a world of one."""
    tensor = torch.tensor(values, dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()
