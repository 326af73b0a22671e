"""Pipeline parallelism (`--pp N`, N > 1): the recipe's layer split on DeepSpeed's PipelineModule, ZeRO-1.

What differs from the data x tensor parallel path, and only here:
- The model is the recipe's `pipeline_split` (dnascale.models.pipeline_split), cut into N stages by DeepSpeed
  (partition_method="parameters"). DeepSpeed's PipelineEngine runs forward, backward and the optimizer step of a
  whole step in `train_batch`, on its 1F1B schedule over the step's micro-batches.
- ZeRO stage 0 or 1 only: DeepSpeed's pipeline engine refuses ZeRO-2/3 (gradients are reduced by its schedule,
  not by ZeRO's backward hooks). `check_config` says so in one line before anything starts.
- Initial weights: every stage builds its layers from the generator state the unsplit model's constructor reaches
  them in (`replay_init`), so a run starts from the same weights whatever --pp is (and as a --pp 1 run).
- Data: every rank of a pipeline draws the step's micro-batches from its own loader (same data-parallel rank,
  same seed, so the same batches); DeepSpeed feeds the inputs to the first stage and the labels to the last.
  Every rank's loader therefore sits at the same position, and each checkpoints its own like at --pp 1.
- Logging: the loss (x targets) is recorded where it is computed, in the last stage's loss function; one sum over
  all ranks just before the optimizer step (where every stage meets) gives the step's loss, targets, tokens and
  non-finite flag, and cancels the update everywhere when a loss was not finite.
"""

from __future__ import annotations

import contextlib
import functools
import io
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from dnascale.data.batch import Batch
from dnascale.errors import ConfigError
from dnascale.models.pipeline_split import PipelineSplit
from dnascale.models.registry import ModelRecipe, get_recipe, list_recipes
from dnascale.parallel import ParallelState
from dnascale.train.config import OptimConfig, TrainConfig
from dnascale.train.engine import build_engine, read_ds_config, zero_stage
from dnascale.train.metrics import StepStats, sum_over_ranks

PIPELINE_DS_CONFIG = "ds_configs/zero1_pipeline.json"
PARTITION_METHOD = "parameters"  # DeepSpeed balances trainable parameters per stage (blocks dominate)


def pipelined_recipes() -> list[str]:
    return [name for name in list_recipes() if get_recipe(name).pipeline_split is not None]


def check_config(cfg: TrainConfig, recipe: ModelRecipe) -> None:
    """One-line errors for what cannot run pipelined; called before any process group exists."""
    if cfg.pp == 1:
        return
    if recipe.pipeline_split is None:
        raise ConfigError(f"--pp > 1 is supported for: {', '.join(pipelined_recipes())} (not {cfg.model!r}); "
                          f"train {cfg.model!r} with --pp 1")
    stage = zero_stage(read_ds_config(cfg.ds_config))
    if stage >= 2:
        raise ConfigError(f"{cfg.ds_config}: ZeRO stage {stage} cannot run with --pp {cfg.pp} (DeepSpeed's pipeline "
                          f"engine takes ZeRO stage 0 or 1); use --ds_config {PIPELINE_DS_CONFIG}")
    if cfg.init_from is not None:
        raise ConfigError("--init-from cannot be combined with --pp > 1 yet; start the pipelined run from scratch "
                          "or with --pp 1")


# ---------------------------------------------------------------------------------------------------- init


def replay_init(layers: list, seed: int) -> list:
    """The layer specs, each building its module from the CPU generator state the unsplit model's constructor
    (seeded with `seed`) reaches that layer in.

    A stage builds only its own layers, so without this its weights would depend on where the cut falls. Here one
    pass builds every layer in order and discards it (one layer in memory at a time), recording the generator state
    before each; a later use of a tied key builds from its first use's state, and its weights are overwritten by
    DeepSpeed's broadcast from the first stage anyway. Init runs on the CPU generator (our megatron layers are
    built with use_cpu_initialization), and the caller's generator state is left as it was.
    """
    from deepspeed.pipe import TiedLayerSpec

    states: list[torch.Tensor] = []
    first_use: dict[str, torch.Tensor] = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for spec in layers:
            key = spec.key if isinstance(spec, TiedLayerSpec) else None
            if key in first_use:
                states.append(first_use[key])
                continue
            state = torch.get_rng_state()
            states.append(state)
            if key is not None:
                first_use[key] = state
            spec.build()
    return [_ReplayedSpec.wrap(spec, state) for spec, state in zip(layers, states)]


class _ReplayedSpec:
    """Mixin over a LayerSpec / TiedLayerSpec: build() starts from a recorded CPU generator state."""

    rng_state: torch.Tensor

    @staticmethod
    def wrap(spec, state: torch.Tensor):
        """A copy of `spec` (still a LayerSpec / TiedLayerSpec for DeepSpeed's isinstance checks) replaying `state`."""
        clone = object.__new__(_replayed_class(type(spec)))
        clone.__dict__.update(spec.__dict__)
        clone.rng_state = state
        return clone

    def build(self, log: bool = False):
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(self.rng_state)
            return super().build(log)


@functools.cache
def _replayed_class(spec_class: type) -> type:
    return type(f"Replayed{spec_class.__name__}", (_ReplayedSpec, spec_class), {})


# ---------------------------------------------------------------------------------------------------- steps


@dataclass
class _RecordingLoss:
    """The split's loss as DeepSpeed's `loss_fn` (it returns the loss tensor), keeping loss x targets for the log.
    It only ever runs on the last stage."""

    loss_fn: Any
    loss_sum: float = 0.0
    targets: int = 0
    nonfinite: int = 0

    @property
    def __name__(self) -> str:  # DeepSpeed prints the loss function's name in its partition table
        return getattr(self.loss_fn, "__name__", type(self.loss_fn).__name__)

    def reset(self) -> None:
        self.loss_sum, self.targets, self.nonfinite = 0.0, 0, 0

    def __call__(self, outputs, labels: torch.Tensor) -> torch.Tensor:
        out = self.loss_fn(outputs, labels)
        loss = out.loss.detach()
        if bool(torch.isfinite(loss)):
            self.loss_sum += float(loss) * out.num_targets
        else:
            self.nonfinite += 1
        self.targets += out.num_targets
        return out.loss


@dataclass
class PipelineRun:
    """A pipelined model and its engine, with the loop's step and evaluation for it."""

    split: PipelineSplit
    module: Any  # deepspeed.pipe.PipelineModule: this stage's layers
    engine: Any  # deepspeed PipelineEngine
    guarded_optimizer: Any  # dnascale.train.engine.GuardedAdamW
    scheduler: Any
    loss: _RecordingLoss
    parallel: ParallelState
    _tokens: float = 0.0
    _stats: StepStats | None = field(default=None, repr=False)

    @property
    def is_last_stage(self) -> bool:
        return self.parallel.pp_rank == self.parallel.pp_size - 1

    def _data(self, batches: list[Batch]) -> Iterator:
        return iter([self.split.pipe_inputs(batch) for batch in batches])

    def train_step(self, stream: Iterator[Batch], grad_accum: int) -> StepStats:
        """One optimizer step over `grad_accum` micro-batches (drawn on every rank, see the module docstring)."""
        batches = [next(stream) for _ in range(grad_accum)]
        self.loss.reset()
        self._tokens = float(sum(batch.num_tokens for batch in batches))
        self._stats = None
        self.engine.train_batch(self._data(batches))
        assert self._stats is not None, "DeepSpeed's pipeline schedule ran no optimizer step"
        return self._stats

    def _guarded_model_step(self, original, *args, **kwargs):
        # Every stage runs the schedule's one OptimizerStep per train_batch, after the backward passes: the only
        # point where all ranks meet with the step's losses known and the update not yet applied.
        mine = [self.loss.loss_sum, self.loss.targets, self._tokens, self.loss.nonfinite] if self.is_last_stage \
            else [0.0, 0.0, 0.0, 0.0]
        loss_sum, targets, tokens, bad = sum_over_ranks(mine)
        tp = self.parallel.tp_size  # every TP rank of a last stage saw the same micro-batches: count them once
        self._stats = StepStats(loss_sum / tp, targets / tp, tokens / tp, bad > 0, {})
        self.guarded_optimizer.skipping = bad > 0
        try:
            return original(*args, **kwargs)
        finally:
            self.guarded_optimizer.skipping = False

    def evaluate(self, batches: list[Batch]) -> float | None:
        """Mean loss per target over `batches` (every rank passes the same ones for its data-parallel rank)."""
        self.loss.reset()
        self.engine.eval_batch(self._data(batches), compute_loss=True, reduce_output=None, bcast_loss=False,
                               num_micro_batches=len(batches))
        self.module.train()
        mine = [self.loss.loss_sum, self.loss.targets] if self.is_last_stage else [0.0, 0.0]
        loss_sum, targets = sum_over_ranks(mine)
        return loss_sum / targets if targets else None

    def describe(self) -> str:
        parts = [int(p) for p in self.module.parts]
        return "pipeline stages " + ", ".join(
            f"{stage}: layers {parts[stage]}-{parts[stage + 1] - 1}" for stage in range(len(parts) - 1)
        ) + f" of {parts[-1]}"

    def model_info(self) -> dict:
        """What a converter needs to map the per-layer checkpoint files back to the unsplit model."""
        return {"pipeline": {"stages": self.parallel.pp_size, "parts": [int(p) for p in self.module.parts],
                             "layers": [_spec_name(spec) for spec in self.module._layer_specs]}}


def _spec_name(spec) -> str:
    name = spec.typename.__name__
    forward_fn = getattr(spec, "forward_fn", None)
    return f"{name}.{forward_fn.__name__}" if forward_fn is not None else name


def build(recipe: ModelRecipe, model_cfg, parallel: ParallelState, ds_config: dict, optim: OptimConfig,
          total_steps: int, seed: int) -> PipelineRun:
    from deepspeed.pipe import PipelineModule
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    split = recipe.pipeline_split(model_cfg)
    if len(split.layers) < parallel.pp_size:  # DeepSpeed would leave stages without a layer
        raise ConfigError(f"--pp {parallel.pp_size}: this {recipe.name} model splits into only {len(split.layers)} "
                          f"pipeline layers; use a smaller --pp or more layers")
    # DeepSpeed's grid orders ranks pipe-major, tensor-minor, as megatron's parallel_state does ("tp-dp-pp").
    topology = PipeModelDataParallelTopology(num_pp=parallel.pp_size, num_mp=parallel.tp_size,
                                             num_dp=parallel.dp_size)
    loss = _RecordingLoss(split.loss_fn)
    # DeepSpeed prints its partition table on rank 0; the run's banner says where the cuts fell instead.
    with contextlib.redirect_stdout(io.StringIO()):
        # dynamic_shape: batches are padded to their longest sample, so activation shapes may change per batch.
        module = PipelineModule(replay_init(split.layers, seed), topology=topology, loss_fn=loss,
                                partition_method=PARTITION_METHOD, dynamic_shape=True)
    grid = module.mpu()
    where = (grid.get_stage_id(), grid.get_data_parallel_rank(), grid.get_slice_parallel_rank())
    if where != (parallel.pp_rank, parallel.dp_rank, parallel.tp_rank):
        raise RuntimeError(f"DeepSpeed's pipeline grid puts rank {parallel.rank} at (pp, dp, tp) = {where}, "
                           f"megatron at {(parallel.pp_rank, parallel.dp_rank, parallel.tp_rank)}")
    # mpu=None: the PipelineEngine takes its groups from the module's grid (and refuses an mpu).
    engine, guarded_optimizer, scheduler = build_engine(module, ds_config, optim, total_steps, mpu=None)
    run = PipelineRun(split, module, engine, guarded_optimizer, scheduler, loss, parallel)
    original = engine._take_model_step
    engine._take_model_step = lambda *args, **kwargs: run._guarded_model_step(original, *args, **kwargs)
    return run
