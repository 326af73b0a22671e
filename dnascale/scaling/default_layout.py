"""A sensible default layout for a preset on N nodes: the one the prediction table (docs/scaling.md, "Predicted")
reports.

Policy, in order:
1. ZeRO-3 from the given ds_config (ds_configs/zero3.json: its bucket sizes), bf16, no offload, no PP.
2. The global batch is held at `step_tokens` tokens per optimizer step at every node count (default 2^20, the
   DNACHUNKER paper's 128 x 8192 bp), so node counts compare at equal optimisation work per step.
3. TP = 1 if it fits, else 2 (TP costs activation all-reduces every layer; ZeRO-3 already divides the state).
4. Activation checkpointing as the preset sets it; switched on only if nothing fits without it.
5. The largest power-of-two micro-batch that fits in `fit_fraction` of the GPU's memory and does not exceed the
   global batch's share per GPU; gradient accumulation makes up the rest of the global batch.
A layout "fits" when its predicted peak is at most `fit_fraction` of the device memory: the rest is left to the
CUDA context, NCCL's buffers and the caching allocator's fragmentation, none of which the model counts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dnascale.errors import ConfigError
from dnascale.scaling.families import model_shape
from dnascale.scaling.layout import Layout, layout_from_ds_config
from dnascale.scaling.memory import MemoryEstimate, census_for, estimate_memory

# HBM per GPU, bytes (NVIDIA datasheets: "80GB" parts; the driver reports slightly more, ~79.2 GiB).
DEVICE_MEMORY: dict[str, float] = {"H800": 80e9, "H100": 80e9, "A100": 80e9, "H200": 141e9}
DEFAULT_STEP_TOKENS = 2**20
DEFAULT_FIT_FRACTION = 0.9


@dataclass(frozen=True)
class Choice:
    layout: Layout
    memory: MemoryEstimate
    reason: str


def choose_layout(recipe_name: str, config: Any, nodes: int, ds_config: str | Path, gpus_per_node: int = 8,
                  gpu: str = "H800", step_tokens: int = DEFAULT_STEP_TOKENS,
                  fit_fraction: float = DEFAULT_FIT_FRACTION) -> Choice:
    if gpu not in DEVICE_MEMORY:
        raise ConfigError(f"unknown GPU {gpu!r}; known: {sorted(DEVICE_MEMORY)}")
    budget = fit_fraction * DEVICE_MEMORY[gpu]
    seq_len = config.max_seq_len
    base = layout_from_ds_config(ds_config, nodes=nodes, gpus_per_node=gpus_per_node, seq_len=seq_len,
                                 dtype="bf16", device="cuda", pp=1, micro_batch=1, grad_accum=1)
    shape = model_shape(recipe_name, config, base)
    census = census_for(recipe_name, config, shape)  # the same parameters whatever the layout
    checkpointing_options = [bool(config.activation_checkpointing)]
    if not config.activation_checkpointing:
        checkpointing_options.append(True)
    for checkpointing in checkpointing_options:
        for tp in (1, 2):
            if base.world % tp:
                continue
            dp = base.world // tp
            per_gpu = max(1, step_tokens // (seq_len * dp))  # sequences per GPU per step
            micro = 1
            while micro * 2 <= per_gpu:
                micro *= 2
            while micro >= 1:
                layout = dataclasses.replace(base, tp=tp, micro_batch=micro, grad_accum=max(1, per_gpu // micro),
                                             activation_checkpointing=checkpointing)
                memory = estimate_memory(recipe_name, config, layout, census)
                if memory.total <= budget:
                    reason = (f"largest power-of-two micro-batch within {fit_fraction:.0%} of {gpu} memory and "
                              f"the {step_tokens:,}-token step")
                    return Choice(layout, memory, reason)
                micro //= 2
    raise ConfigError(f"{recipe_name}: no layout with tp <= 2 fits {nodes} nodes of {gpu} under ZeRO-3")
