"""Throughput at an assumed model FLOPs utilisation:

    tokens/s = MFU * GPUs * peak FLOP/s per GPU / (training FLOPs per token)

with the recipe's FLOPs per token (forward + backward, no recomputation: the MFU convention of
dnascale.train.metrics) at the layout's sequence length and the dense bf16 peak of the GPU from PEAK_FLOPS.
MFU is an assumption, not a prediction: this turns it into wall-clock (days per 100B tokens).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dnascale.errors import ConfigError
from dnascale.models.registry import get_recipe
from dnascale.scaling.layout import Layout
from dnascale.train.metrics import PEAK_FLOPS

TOKENS_PER_REPORT = 100e9  # "days per 100B tokens"
SECONDS_PER_DAY = 86400.0


@dataclass(frozen=True)
class ThroughputEstimate:
    flops_per_token: float
    mfu: float
    peak_flops_per_gpu: float
    gpus: int
    tokens_per_s: float  # whole cluster
    step_seconds: float  # one optimizer step of the layout's global batch

    @property
    def tokens_per_s_per_gpu(self) -> float:
        return self.tokens_per_s / self.gpus

    @property
    def days_per_100b_tokens(self) -> float:
        return TOKENS_PER_REPORT / self.tokens_per_s / SECONDS_PER_DAY


def peak_flops(gpu: str, dtype: str) -> float:
    if gpu not in PEAK_FLOPS:
        raise ConfigError(f"unknown GPU {gpu!r}; known: {sorted(PEAK_FLOPS)}")
    return PEAK_FLOPS[gpu][dtype]


def estimate_throughput(recipe_name: str, config: Any, layout: Layout, mfu: float, gpu: str = "H800"
                        ) -> ThroughputEstimate:
    if not 0.0 < mfu <= 1.0:
        raise ConfigError(f"mfu={mfu}: must be in (0, 1]")
    seq_len = layout.seq_len if layout.seq_len is not None else config.max_seq_len
    flops = get_recipe(recipe_name).flops_per_token(config, seq_len)
    peak = peak_flops(gpu, layout.dtype)
    tokens_per_s = mfu * layout.world * peak / flops
    step_tokens = layout.global_batch * seq_len
    return ThroughputEstimate(flops_per_token=flops, mfu=mfu, peak_flops_per_gpu=peak, gpus=layout.world,
                              tokens_per_s=tokens_per_s, step_seconds=step_tokens / tokens_per_s)
