"""The pretraining loop. It knows the recipe, never the model family: build, stream, step, log, checkpoint."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist

from dnascale.config import apply_overrides
from dnascale.data.batch import Batch
from dnascale.data.loader import ResumableLoader, ShardDataset
from dnascale.data.streams import STREAMS_FORMAT, StreamSetLoader, deal, join, streams_of
from dnascale.data.shards import load_manifest
from dnascale.data.tokenizers import load_tokenizer
from dnascale.errors import CheckpointError, ConfigError, DataError, DnascaleError
from dnascale.models.registry import get_recipe, load_preset
from dnascale.parallel import DeepSpeedMPU, init_distributed, rng_state, seed_everything, set_rng_state, zero3_init
from dnascale.train import checkpoint, pipeline, reshard
from dnascale.train.config import TrainConfig
from dnascale.train.data import resolve_data
from dnascale.train.engine import build_engine, resolve_ds_config, zero_stage
from dnascale.train.logging import RunLogger
from dnascale.train.metrics import StepStats, StepTimer, device_peak_flops, mfu, peak_memory_gib, sum_over_ranks


class TrainingDiverged(DnascaleError):
    """Too many non-finite losses in a row: the run is aborted instead of training on garbage."""


@dataclass
class TrainResult:
    last_step: int
    last_loss: float | None
    out_dir: Path
    skipped_steps: int


def _forward(engine, batch: Batch):
    return engine(batch.input_ids, batch.attention_mask, batch.labels, **batch.extras)


def _validation_batches(data_dir: Path, collator, cfg: TrainConfig, micro: int, dp_rank: int,
                        dp_size: int) -> list[Batch] | None:
    """`eval_batches` fixed validation batches (the same ones at every evaluation), or None without a split."""
    try:
        dataset = ShardDataset(data_dir, "validation", rank=dp_rank, world_size=dp_size, seed=cfg.seed,
                               shuffle=False, infinite=True)
        loader = ResumableLoader(dataset, batch_size=micro, collate_fn=collator, num_workers=0)
    except DataError:
        return None  # no (or too small a) validation split; the run goes on without eval
    return [batch for _, batch in zip(range(cfg.eval_batches), loader)]


def _evaluate(engine, batches: list[Batch]) -> float | None:
    """Mean validation loss per target over `batches` and every data-parallel rank."""
    engine.eval()
    loss_sum = targets = 0.0
    with torch.no_grad():
        for batch in batches:
            out = _forward(engine, batch.to(engine.device))
            loss_sum += float(out.loss) * out.num_targets
            targets += out.num_targets
    engine.train()
    loss_sum, targets = sum_over_ranks([loss_sum, targets])
    return loss_sum / targets if targets else None


def _model_config(cfg: TrainConfig):
    model_cfg = load_preset(cfg.model, cfg.preset)
    if cfg.model_overrides:
        model_cfg = apply_overrides(model_cfg, cfg.model_overrides, source=f"{cfg.model}-{cfg.preset} override")
    if hasattr(model_cfg, "tp") and model_cfg.tp != cfg.tp:  # --tp wins over the preset's
        model_cfg = dataclasses.replace(model_cfg, tp=cfg.tp)
        model_cfg.validate()
    return model_cfg


def _check_data_fits(manifest: dict, tokenizer, model_cfg, window: int, data_dir: Path) -> None:
    if tokenizer.vocab_size > model_cfg.vocab_size:
        raise ConfigError(
            f"{data_dir}: tokenizer {tokenizer.name} has {tokenizer.vocab_size} ids but model vocab_size is "
            f"{model_cfg.vocab_size}"
        )
    data_window = manifest["config"]["window"]
    if getattr(tokenizer, "one_token_per_base", False) and data_window > window:
        raise ConfigError(
            f"{data_dir}: shards hold {data_window}-base windows but this model takes at most {window} "
            f"(max_seq_len {model_cfg.max_seq_len} with the tokenizer template); rebuild with --window {window}"
        )


def _train_step(engine, stream: Iterator[Batch], grad_accum: int, guarded_optimizer, tp_size: int) -> StepStats:
    loss_sum = targets = tokens = bad = 0.0
    metric_sums: dict[str, float] = {}
    for micro in range(grad_accum):
        batch = next(stream).to(engine.device)
        out = _forward(engine, batch)
        loss = out.loss.detach()
        finite = bool(torch.isfinite(loss))
        bad += 0.0 if finite else 1.0
        engine.backward(out.loss)  # a non-finite backward is harmless: the update below is cancelled
        if micro < grad_accum - 1:
            # DeepSpeed counts micro-batches in step() calls and updates only on the last of `grad_accum`:
            # calling it once per optimizer step would update every grad_accum-th step, on grad_accum^2 batches.
            engine.step()
        loss_sum += float(loss) * out.num_targets if finite else 0.0
        targets += out.num_targets
        tokens += batch.num_tokens
        for name, value in (getattr(out, "metrics", None) or {}).items():
            metric_sums[name] = metric_sums.get(name, 0.0) + float(value)
    # One collective per step; every rank must agree whether to update, or their weights would diverge.
    names = sorted(metric_sums)
    reduced = sum_over_ranks([loss_sum, targets, tokens, bad] + [metric_sums[n] for n in names])
    loss_sum, targets, tokens, bad = reduced[:4]
    world = dist.get_world_size() if dist.is_initialized() else 1
    metrics = {name: value / (grad_accum * world) for name, value in zip(names, reduced[4:])}
    guarded_optimizer.skipping = bad > 0
    try:
        engine.step()
    finally:
        guarded_optimizer.skipping = False
    # Every TP rank of a data-parallel group saw the same batch: count it once.
    return StepStats(loss_sum / tp_size, targets / tp_size, tokens / tp_size, bad > 0, metrics)


@dataclass
class _DataParallelRun:
    """The whole model on every rank (data x tensor parallel, any ZeRO stage): what the loop drives at --pp 1.
    dnascale.train.pipeline.PipelineRun has the same face for --pp > 1."""

    module: torch.nn.Module
    engine: Any
    guarded_optimizer: Any  # dnascale.train.engine.GuardedAdamW
    scheduler: Any
    tp_size: int

    def train_step(self, stream: Iterator[Batch], grad_accum: int) -> StepStats:
        return _train_step(self.engine, stream, grad_accum, self.guarded_optimizer, self.tp_size)

    def evaluate(self, batches: list[Batch]) -> float | None:
        return _evaluate(self.engine, batches)

    def describe(self) -> str:
        return ""

    def model_info(self) -> dict:
        return {}


def _build_data_parallel(recipe, model_cfg, parallel, ds_config: dict, cfg: TrainConfig) -> _DataParallelRun:
    if zero_stage(ds_config) == 3:
        with zero3_init(ds_config):  # parameters are created already partitioned: a 1.2B model never exists whole
            model = recipe.build(model_cfg, parallel)
    else:
        model = recipe.build(model_cfg, parallel)
    if cfg.init_from is not None:  # before the engine copies weights into its optimizer state
        from dnascale.convert.init_weights import load_init_weights

        load_init_weights(model, cfg.init_from, cfg.model)
    engine, guarded_optimizer, scheduler = build_engine(model, ds_config, cfg.optim, cfg.steps, DeepSpeedMPU())
    return _DataParallelRun(model, engine, guarded_optimizer, scheduler, parallel.tp_size)


def _resume_target(cfg: TrainConfig, ckpt_dir: Path) -> tuple[Path, str] | None:
    """(checkpoint directory, tag) to resume from, or None for a fresh start."""
    if cfg.resume == "none":
        return None
    if cfg.resume == "auto":
        tag = checkpoint.find_resume_tag(ckpt_dir)
        return (ckpt_dir, tag) if tag is not None else None
    path = Path(cfg.resume)  # an explicit tag directory, possibly another run's; new checkpoints stay in --out
    return path.parent, path.name


def _load_resharded(engine, scheduler, resume_dir: Path, tag: str, saved: checkpoint.Topology,
                    topology: checkpoint.Topology, parallel, plan, cfg: TrainConfig, ds_config: dict, out_dir: Path):
    """Resume a checkpoint written at another DP/TP size: (this rank's client state, its data streams or None)."""
    tag_dir = resume_dir / tag
    reshard.Reshard(saved, topology).check(tag_dir, ds_config.get("zero_optimization", {}).get("stage", 0))
    marker = checkpoint.verify(resume_dir, tag, saved)
    saved_recipe = checkpoint.read_model_info(tag_dir).get("recipe")
    if saved_recipe != cfg.model:
        raise CheckpointError(f"{tag_dir}: a {saved_recipe!r} checkpoint, but this run trains {cfg.model!r}")
    clients = reshard.read_clients(tag_dir)
    by_dp: dict[int, dict] = {}
    for client in clients.values():
        if "grad_accum" not in client or "dp_rank" not in client:
            raise CheckpointError(f"{tag_dir}: written before resharding was supported (no grad_accum/dp_rank in "
                                  f"its client files); resume it at dp={saved.dp} tp={saved.tp}")
        if client.get("step") != marker["step"]:
            raise CheckpointError(
                f"{tag_dir}: client files at step {client.get('step')}, COMPLETE says {marker['step']}")
        by_dp.setdefault(int(client["dp_rank"]), client)  # every TP rank of a DP rank holds the same data position
    if sorted(by_dp) != list(range(saved.dp)):
        raise CheckpointError(
            f"{tag_dir}: client files cover data-parallel ranks {sorted(by_dp)}, expected 0..{saved.dp - 1}")
    source = str(tag_dir)
    everything = join([streams_of(by_dp[d]["loader"], by_dp[d]["grad_accum"]) for d in range(saved.dp)], source)
    try:
        mine = deal(everything, parallel.dp_rank, parallel.dp_size, plan.micro_batch_size, plan.grad_accum, source)
    except DataError as err:
        raise CheckpointError(str(err)) from None
    step = int(marker["step"])
    reshard.load(engine, scheduler, resume_dir, tag, out_dir / f"reshard-{tag}", parallel.tp_rank, parallel.tp_size,
                 step, parallel.rank)
    # The same rank's RNG when it existed (exact for dropout-free models; dropout masks differ after a reshard).
    client = dict(clients.get(parallel.rank, clients[min(clients)]))
    client["loader"] = {"format": STREAMS_FORMAT, "cursor": [0, 0]}  # checkpoints fall on step boundaries
    only = mine.streams[0]
    plain = (len(mine.streams) == 1 and mine.per_stream == plan.grad_accum and only["rank"] == parallel.dp_rank
             and only["world_size"] == parallel.dp_size and only["num_workers"] == cfg.num_workers)
    if plain:  # the original layout's own stream for this rank (e.g. a TP-only change): stay a plain loader
        client["loader"] = only
        return client, None
    return client, mine


def pretrain(cfg: TrainConfig) -> TrainResult:
    cfg.validate()
    recipe = get_recipe(cfg.model)  # fail on an unknown model before starting any process group work
    model_cfg = _model_config(cfg)
    pipeline.check_config(cfg, recipe)
    parallel = init_distributed(tp=cfg.tp, pp=cfg.pp, seed=cfg.seed)
    rank, dp_rank, dp_size = parallel.rank, parallel.dp_rank, parallel.dp_size
    is_main = rank == 0
    out_dir = Path(cfg.out)
    ckpt_dir = out_dir / "checkpoints"
    topology = checkpoint.Topology(parallel.world_size, parallel.tp_size, parallel.pp_size, dp_size)

    window = recipe.data_window(model_cfg)
    data_dir = resolve_data(cfg.data, window, recipe.tokenizer, rank)
    manifest = load_manifest(data_dir)
    tokenizer = load_tokenizer(manifest["tokenizer"]["spec"])
    _check_data_fits(manifest, tokenizer, model_cfg, window, data_dir)
    ds_config, plan = resolve_ds_config(
        cfg.ds_config, micro_batch_size=cfg.micro_batch_size, grad_accum=cfg.grad_accum, dp_size=dp_size
    )

    seed_everything(cfg.seed)
    if parallel.pp_size > 1:  # the recipe's layer split on DeepSpeed's pipeline engine (docs: "Pipeline parallelism")
        run = pipeline.build(recipe, model_cfg, parallel, ds_config, cfg.optim, cfg.steps, cfg.seed)
    else:
        run = _build_data_parallel(recipe, model_cfg, parallel, ds_config, cfg)
    engine, scheduler = run.engine, run.scheduler
    collator = recipe.make_collator(model_cfg, tokenizer, cfg.seed)
    dataset = ShardDataset(data_dir, "train", rank=dp_rank, world_size=dp_size, seed=cfg.seed)
    loader: ResumableLoader | StreamSetLoader = ResumableLoader(
        dataset, batch_size=plan.micro_batch_size, collate_fn=collator, num_workers=cfg.num_workers)

    start_step, nonfinite_total, tag = 0, 0, None
    resume_from = _resume_target(cfg, ckpt_dir)
    if resume_from is not None:
        resume_dir, tag = resume_from
        saved = checkpoint.saved_topology(resume_dir, tag)
        if saved is not None and saved != topology:  # another DP and/or TP size: reshard (docs: "Resharding")
            client, streams = _load_resharded(engine, scheduler, resume_dir, tag, saved, topology, parallel,
                                              plan, cfg, ds_config, out_dir)
        else:
            client = checkpoint.load(engine, resume_dir, tag, topology, rank, recipe=cfg.model)
            streams = None
            if client["loader"].get("format") == STREAMS_FORMAT:  # this run was resharded before
                streams = streams_of(client["loader"], plan.grad_accum)
        start_step = int(client["step"])
        nonfinite_total = int(client.get("nonfinite_total", 0))
        if streams is None:
            loader.load_state_dict(client["loader"])
        else:
            loader = StreamSetLoader(data_dir, streams, collator)
            loader.load_cursor(client["loader"])
        set_rng_state(client["rng"])

    logger = RunLogger(out_dir, enabled=is_main, wandb_mode=cfg.wandb_mode, project=cfg.wandb_project,
                       config={"train": dataclasses.asdict(cfg), "model": dataclasses.asdict(model_cfg)},
                       resume_step=start_step if tag is not None else None)
    if start_step >= cfg.steps:
        if is_main:
            print(f"run in {out_dir} is already at step {start_step} >= --steps {cfg.steps}; nothing to do")
        logger.finish()
        return TrainResult(start_step, None, out_dir, nonfinite_total)

    model_info = {"recipe": cfg.model, "preset": cfg.preset, "config": dataclasses.asdict(model_cfg),
                  "tokenizer": manifest["tokenizer"], **run.model_info()}
    flops_per_token = recipe.flops_per_token(model_cfg, window)
    dtype = "bf16" if ds_config.get("bf16", {}).get("enabled") else "fp32"
    peak = device_peak_flops(dtype)
    if is_main:
        n_params = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in run.module.parameters())
        where = "this TP rank" if parallel.pp_size == 1 else "this pipeline stage"
        print(f"dnascale: {cfg.model}-{cfg.preset} ({n_params / 1e6:.2f}M params on {where}), "
              f"world {parallel.world_size} (dp {dp_size} x tp {parallel.tp_size} x pp {parallel.pp_size}), ZeRO "
              f"stage {zero_stage(ds_config)}, {dtype}, global batch {plan.global_batch_size} x {window} bp, "
              f"data {data_dir}" + (f", {run.describe()}" if run.describe() else "")
              + (f", resumed from {tag}" if tag else ""))

    from tqdm import tqdm

    bar = tqdm(total=cfg.steps, initial=start_step, disable=not (is_main and cfg.progress), unit="step",
               dynamic_ncols=True)
    stream: Iterator[Batch] = iter(loader)
    timer = StepTimer()
    nonfinite_in_a_row = 0
    last_loss = None
    for step in range(start_step + 1, cfg.steps + 1):
        lr = scheduler.get_last_lr()[0]  # the LR this step is taken with (engine.step advances the schedule)
        stats = run.train_step(stream, plan.grad_accum)
        step_time = timer.lap()
        if stats.nonfinite:
            nonfinite_total += 1
            nonfinite_in_a_row += 1
            if nonfinite_in_a_row >= cfg.max_nonfinite_in_a_row:
                raise TrainingDiverged(
                    f"step {step}: {nonfinite_in_a_row} non-finite losses in a row "
                    f"({nonfinite_total} in total); lower the LR or check the data"
                )
        else:
            nonfinite_in_a_row = 0
        loss = stats.loss_sum / stats.targets if stats.targets and not stats.nonfinite else math.nan
        last_loss = loss
        tokens_per_s = stats.tokens / step_time if step_time > 0 else 0.0
        record = {
            "step": step,
            "loss": loss,
            "lr": lr,
            "tokens_per_s": tokens_per_s,
            "step_time_s": step_time,
            "skipped_nonfinite": nonfinite_total,
            "peak_mem_gib": peak_memory_gib(),
            **stats.metrics,
        }
        utilisation = mfu(tokens_per_s, flops_per_token, parallel.world_size, peak)
        if utilisation is not None:
            record["mfu"] = utilisation
        if cfg.eval_batches and (step % cfg.eval_every == 0 or step == cfg.steps):
            batches = _validation_batches(data_dir, collator, cfg, plan.micro_batch_size, dp_rank, dp_size)
            val_loss = run.evaluate(batches) if batches is not None else None
            if val_loss is not None:
                record["val_loss"] = val_loss
        logger.log(record)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:,.0f}")
        if is_main and (step % cfg.log_every == 0 or step == cfg.steps):
            extra = f"  val_loss {record['val_loss']:.4f}" if "val_loss" in record else ""
            extra += f"  mfu {record['mfu']:.1%}" if "mfu" in record else ""
            bar.write(f"step {step:>6}  loss {loss:.4f}  {tokens_per_s:,.0f} tok/s  {step_time * 1e3:.0f} ms/step{extra}")
        if step % cfg.save_every == 0 or step == cfg.steps:
            client = {"step": step, "loader": loader.state_dict(), "rng": rng_state(),
                      "nonfinite_total": nonfinite_total, "dp_rank": dp_rank, "grad_accum": plan.grad_accum}
            checkpoint.save(engine, ckpt_dir, step, client, topology, rank, model_info, keep=cfg.keep_checkpoints)
            timer.lap()  # the save is not part of the next step's time
    bar.close()
    logger.finish()
    if is_main:
        print(f"done: step {cfg.steps}, loss {last_loss:.4f}, checkpoints in {ckpt_dir}, metrics in {logger.metrics_path}")
    return TrainResult(cfg.steps, last_loss, out_dir, nonfinite_total)
