"""The pretraining run's config: what to train, on what, for how long, and where to write it."""

from __future__ import annotations

from dataclasses import dataclass, field

from dnascale.errors import ConfigError

RESUME_CHOICES = ("auto", "none")
WANDB_MODES = ("disabled", "offline", "online")


@dataclass
class OptimConfig:
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 20
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-8

    def validate(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"lr: expected > 0, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"min_lr_ratio: expected in [0, 1], got {self.min_lr_ratio}")
        if self.warmup_steps < 0:
            raise ConfigError(f"warmup_steps: expected >= 0, got {self.warmup_steps}")


@dataclass
class TrainConfig:
    model: str = "encoder"
    preset: str = "tiny"
    model_overrides: tuple[str, ...] = ()  # field=value on the model config
    data: str | None = None  # a shard directory; None = the bundled genomes, sharded into the cache on first use
    ds_config: str = "ds_configs/zero3.json"
    steps: int = 200
    micro_batch_size: int | None = None  # None = the ds_config's train_micro_batch_size_per_gpu, else 8
    grad_accum: int | None = None  # None = the ds_config's gradient_accumulation_steps, else 1
    optim: OptimConfig = field(default_factory=OptimConfig)
    seed: int = 0
    tp: int = 1
    pp: int = 1  # pipeline stages (> 1: the recipe's pipeline split under ZeRO-1, dnascale.train.pipeline)
    out: str = "runs/pretrain"
    resume: str = "auto"  # auto: continue from out/checkpoints/latest if there is one; none: start fresh; or a path
    init_from: str | None = None  # initial weights: a tools/convert_from_hf.py directory (a resumed checkpoint wins)
    save_every: int = 100
    keep_checkpoints: int = 3  # older complete checkpoints are deleted once a newer one is complete
    eval_every: int = 100
    eval_batches: int = 4
    log_every: int = 1
    num_workers: int = 1
    max_nonfinite_in_a_row: int = 5
    wandb_mode: str = "offline"
    wandb_project: str = "dnascale"
    progress: bool = True

    def validate(self) -> None:
        positive = {"steps": self.steps, "save_every": self.save_every, "eval_every": self.eval_every,
                    "log_every": self.log_every, "tp": self.tp, "keep_checkpoints": self.keep_checkpoints, "pp": self.pp,
                    "max_nonfinite_in_a_row": self.max_nonfinite_in_a_row}
        for name, value in positive.items():
            if value <= 0:
                raise ConfigError(f"{name}: expected a positive integer, got {value}")
        for name in ("micro_batch_size", "grad_accum"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"{name}: expected a positive integer, got {value}")
        if self.num_workers < 0 or self.eval_batches < 0:
            raise ConfigError("num_workers and eval_batches must be >= 0")
        if self.wandb_mode not in WANDB_MODES:
            raise ConfigError(f"wandb_mode: expected one of {', '.join(WANDB_MODES)}, got {self.wandb_mode!r}")
        self.optim.validate()
