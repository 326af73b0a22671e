"""DeepSpeed engine construction: the ds_config checked against the CLI, our optimizer and LR schedule.

dnascale owns the optimizer and the schedule (AdamW, linear warmup then cosine) so they behave the same under
every ZeRO stage and on CPU; the ds_config owns batch sizes, precision, ZeRO and clipping. A ds_config that
sets its own optimizer/scheduler, or batch sizes that contradict the command line, is refused with the field.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from dnascale.errors import ConfigError
from dnascale.train.config import OptimConfig


DEFAULT_MICRO_BATCH_SIZE = 8


@dataclass(frozen=True)
class BatchPlan:
    micro_batch_size: int
    grad_accum: int
    dp_size: int

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.grad_accum * self.dp_size


def _check_same(source: str, key: str, in_config, from_cli) -> None:
    if in_config is not None and from_cli is not None and in_config != from_cli:
        raise ConfigError(f"{source}: {key} is {in_config} but the command line asks for {from_cli}; make them agree")


def read_ds_config(path: str) -> dict:
    """The ds_config file as a dict (one-line errors for a missing file or bad JSON)."""
    source = Path(path)
    if not source.is_file():
        raise ConfigError(f"{path}: no such ds_config file")
    try:
        return json.loads(source.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: invalid JSON ({err.msg} at line {err.lineno})") from None


def zero_stage(ds_config: dict) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def resolve_ds_config(
    path: str, *, micro_batch_size: int | None, grad_accum: int | None, dp_size: int
) -> tuple[dict, BatchPlan]:
    """Load a ds_config, reconcile its batch sizes with the CLI and resolve "auto" precision."""
    config = read_ds_config(path)
    for owned in ("optimizer", "scheduler"):
        if owned in config:
            raise ConfigError(
                f"{path}: '{owned}' is set by dnascale's own flags (--lr, --warmup-steps, ...); remove it from the ds_config"
            )
    _check_same(path, "train_micro_batch_size_per_gpu", config.get("train_micro_batch_size_per_gpu"), micro_batch_size)
    _check_same(path, "gradient_accumulation_steps", config.get("gradient_accumulation_steps"), grad_accum)
    # The shipped ds_configs leave batch sizes to the command line; a user's config may pin them instead.
    micro = micro_batch_size or config.get("train_micro_batch_size_per_gpu") or DEFAULT_MICRO_BATCH_SIZE
    accum = grad_accum or config.get("gradient_accumulation_steps") or 1
    plan = BatchPlan(int(micro), int(accum), dp_size)
    if "train_batch_size" in config and config["train_batch_size"] != plan.global_batch_size:
        raise ConfigError(
            f"{path}: train_batch_size {config['train_batch_size']} != micro {plan.micro_batch_size} x "
            f"accumulation {plan.grad_accum} x data-parallel {dp_size} = {plan.global_batch_size}"
        )
    config["train_micro_batch_size_per_gpu"] = plan.micro_batch_size
    config["gradient_accumulation_steps"] = plan.grad_accum
    config["train_batch_size"] = plan.global_batch_size
    # Our optimizer is torch's AdamW with a skip guard; DeepSpeed only whitelists exact classes.
    config["zero_allow_untested_optimizer"] = True
    for precision in ("bf16", "fp16"):
        section = config.get(precision)
        if isinstance(section, dict) and section.get("enabled") == "auto":
            # bf16 where the hardware has it; fp16 is never chosen automatically; CPU trains in fp32.
            section["enabled"] = precision == "bf16" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return config, plan


class GuardedAdamW(torch.optim.AdamW):
    """AdamW that does nothing while `skipping` is set, so a non-finite loss leaves weights and moments untouched.

    DeepSpeed (every ZeRO stage) calls this optimizer's step(), ZeRO-3 once per parameter sub-group; a flag the
    loop sets around engine.step() therefore cancels the whole update the same way under all of them.
    """

    skipping: bool = False

    def step(self, closure=None):
        if self.skipping:
            return None
        return super().step(closure)


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases, norms and embeddings-free 1-D params (the usual AdamW practice)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or name.endswith(".bias") else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def warmup_cosine(optim: OptimConfig, total_steps: int):
    """LR multiplier per optimizer step: linear warmup to 1, then cosine to min_lr_ratio at total_steps."""

    def factor(step: int) -> float:
        if optim.warmup_steps and step < optim.warmup_steps:
            return (step + 1) / optim.warmup_steps
        span = max(1, total_steps - optim.warmup_steps)
        progress = min(1.0, (step - optim.warmup_steps) / span)
        return optim.min_lr_ratio + (1 - optim.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def build_engine(model: torch.nn.Module, ds_config: dict, optim: OptimConfig, total_steps: int, mpu):
    import deepspeed

    optimizer = GuardedAdamW(
        parameter_groups(model, optim.weight_decay),
        lr=optim.lr,
        betas=(optim.beta1, optim.beta2),
        eps=optim.eps,
    )
    # A factory, not a scheduler: ZeRO regroups the optimizer's parameter groups, and DeepSpeed calls this on the
    # optimizer it ends up stepping, so the schedule sees the groups that actually exist.
    def make_scheduler(wrapped):
        return torch.optim.lr_scheduler.LambdaLR(wrapped, warmup_cosine(optim, total_steps))

    engine, _, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=make_scheduler, config=ds_config, mpu=mpu
    )
    # The guarded AdamW itself (DeepSpeed returns its ZeRO wrapper) is what a skipped step must reach.
    return engine, optimizer, scheduler
