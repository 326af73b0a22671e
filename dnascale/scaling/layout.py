"""A training layout: how many GPUs, how the model is split over them, and what each rank keeps.

`Layout` is the input of the memory, communication and throughput models. The data-parallel size is derived
(world / (tp * pp)); `ZeroBuffers` holds the DeepSpeed ZeRO knobs that size its communication buffers, read from a
ds_config where one is given and otherwise DeepSpeed's own defaults (read from DeepSpeed, not copied here).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dnascale.errors import ConfigError

DTYPES: tuple[str, ...] = ("bf16", "fp32")  # bf16: bf16 weights/grads/activations + fp32 master and Adam state
DEVICES: tuple[str, ...] = ("cuda", "cpu")
ATTENTION_KINDS: tuple[str, ...] = ("flash", "materialised")

# ds_config key (inside zero_optimization) -> ZeroBuffers field and DeepSpeed's own config attribute.
_ZERO_KEYS: dict[str, tuple[str, str]] = {
    "reduce_bucket_size": ("reduce_bucket_size", "reduce_bucket_size"),
    "allgather_bucket_size": ("allgather_bucket_size", "allgather_bucket_size"),
    "stage3_prefetch_bucket_size": ("prefetch_bucket_size", "prefetch_bucket_size"),
    "stage3_max_live_parameters": ("max_live_parameters", "max_live_parameters"),
    "stage3_param_persistence_threshold": ("param_persistence_threshold", "param_persistence_threshold"),
    "sub_group_size": ("sub_group_size", "sub_group_size"),
}


def _deepspeed_defaults() -> dict[str, int]:
    """DeepSpeed's defaults for the ZeRO buffer sizes (elements), from its config model."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    defaults = DeepSpeedZeroConfig()
    return {ours: int(getattr(defaults, theirs)) for ours, theirs in _ZERO_KEYS.values()}


@dataclass(frozen=True)
class ZeroBuffers:
    """ZeRO buffer sizes in elements (DeepSpeed's units). None = DeepSpeed's default (see `resolved`)."""

    reduce_bucket_size: int | None = None  # gradient reduce(-scatter) bucket
    allgather_bucket_size: int | None = None  # ZeRO-1/2: bucket of the post-step parameter all-gather
    prefetch_bucket_size: int | None = None  # ZeRO-3: parameters fetched ahead of use
    max_live_parameters: int | None = None  # ZeRO-3: gathered parameters resident at once, at most
    param_persistence_threshold: int | None = None  # ZeRO-3: parameters this small stay unpartitioned
    sub_group_size: int | None = None  # ZeRO-3: elements the optimizer steps at once

    def resolved(self) -> "ZeroBuffers":
        missing = [f.name for f in dataclasses.fields(self) if getattr(self, f.name) is None]
        if not missing:
            return self
        defaults = _deepspeed_defaults()
        return dataclasses.replace(self, **{name: defaults[name] for name in missing})


@dataclass(frozen=True)
class Layout:
    nodes: int = 1
    gpus_per_node: int = 8
    tp: int = 1
    pp: int = 1
    zero_stage: int = 3
    offload_optimizer: bool = False  # ZeRO offload of the optimizer state (fp32 master, Adam) to CPU memory
    offload_params: bool = False  # ZeRO-3 offload of the parameter partitions to CPU memory
    micro_batch: int = 1  # sequences per GPU per forward
    grad_accum: int = 1  # micro-batches per optimizer step
    seq_len: int | None = None  # positions per sequence; None: the preset's max_seq_len
    activation_checkpointing: bool | None = None  # None: what the preset says
    dtype: str = "bf16"
    device: str = "cuda"  # where activations live: decides how a dropout mask is stored
    attention: str = "flash"  # "flash": fused kernels keep no score matrix; "materialised": softmax kept
    zero: ZeroBuffers = field(default_factory=ZeroBuffers)

    def __post_init__(self) -> None:
        for name in ("nodes", "gpus_per_node", "tp", "pp", "micro_batch", "grad_accum"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)}: must be >= 1")
        if self.seq_len is not None and self.seq_len < 1:
            raise ConfigError(f"seq_len={self.seq_len}: must be >= 1")
        if self.world % (self.tp * self.pp):
            raise ConfigError(f"{self.world} GPUs ({self.nodes} nodes x {self.gpus_per_node}) are not divisible "
                              f"by tp {self.tp} x pp {self.pp}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"zero_stage={self.zero_stage}: choose one of [0, 1, 2, 3]")
        if self.pp > 1 and self.zero_stage > 1:
            # DeepSpeed's pipeline engine refuses ZeRO-2/3 (docs/architecture.md); PP goes with ZeRO-0/1.
            raise ConfigError(f"pp={self.pp} needs zero_stage 0 or 1 (DeepSpeed's pipeline engine refuses "
                              f"ZeRO-{self.zero_stage})")
        if self.offload_params and self.zero_stage != 3:
            raise ConfigError("offload_params needs zero_stage 3 (only ZeRO-3 partitions parameters)")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ConfigError("offload_optimizer needs zero_stage >= 1 (ZeRO-Offload moves the ZeRO partitions)")
        for name, allowed in (("dtype", DTYPES), ("device", DEVICES), ("attention", ATTENTION_KINDS)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name}={getattr(self, name)!r}: choose one of {list(allowed)}")

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def dp(self) -> int:
        return self.world // (self.tp * self.pp)

    @property
    def value_bytes(self) -> int:
        """Bytes of a weight, gradient or activation element."""
        return (torch.bfloat16 if self.dtype == "bf16" else torch.float32).itemsize

    @property
    def mask_bytes(self) -> int:
        """Bytes per element of a dropout mask: CUDA's native_dropout keeps a bool mask; on CPU torch keeps the
        scaled noise tensor, in the activations' dtype."""
        return torch.bool.itemsize if self.device == "cuda" else self.value_bytes

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.dp


def _enabled(section) -> bool:
    return isinstance(section, dict) and section.get("enabled") not in (False, None, "false")


def layout_from_ds_config(path: str | Path, **overrides) -> Layout:
    """A Layout whose ZeRO stage, offload, precision and buffer sizes come from a ds_config file; `overrides` set
    the other fields (and win over the file). bf16 "auto" is taken as bf16: the model predicts GPU runs."""
    source = Path(path)
    if not source.is_file():
        raise ConfigError(f"{path}: no such ds_config file")
    try:
        config = json.loads(source.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: invalid JSON ({err.msg} at line {err.lineno})") from None
    zero = config.get("zero_optimization", {}) or {}
    buffers = ZeroBuffers(**{ours: int(zero[key]) for key, (ours, _) in _ZERO_KEYS.items() if key in zero})

    def offloaded(key: str) -> bool:
        return (zero.get(key) or {}).get("device", "none") not in ("none", None)

    fields = dict(
        zero_stage=int(zero.get("stage", 0)),
        offload_optimizer=offloaded("offload_optimizer"),
        offload_params=offloaded("offload_param"),
        dtype="bf16" if _enabled(config.get("bf16")) or _enabled(config.get("fp16")) else "fp32",
        zero=buffers,
    )
    if "train_micro_batch_size_per_gpu" in config:
        fields["micro_batch"] = int(config["train_micro_batch_size_per_gpu"])
    if "gradient_accumulation_steps" in config:
        fields["grad_accum"] = int(config["gradient_accumulation_steps"])
    fields.update({key: value for key, value in overrides.items() if value is not None})
    return Layout(**fields)
