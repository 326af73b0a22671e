"""Fine-tune a pretrained (or randomly initialised) backbone on a classification task and evaluate it.

Model selection follows the DNABERT-2/DNAZEN protocol: evaluate on dev periodically, keep the weights of the best
dev MCC (early stopping after `patience` evaluations without improvement), report test metrics of those weights.
Several seeds run one after another; results.json holds each seed and their mean and standard deviation.

Every registered family takes the same path: the recipe (from the checkpoint's dnascale_model.json, an HF export's
config.json, or --model) builds the pretraining model, its weights load, the parts encode() does not use are
dropped, the task is read in the family's tokenizer with its encode() extras (dnascale.finetune.inputs), and the
shared SequenceClassifier mean-pools encode()'s states.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from dnascale.config import from_dict
from dnascale.data.tokenizers import load_tokenizer
from dnascale.errors import CheckpointError, ConfigError
from dnascale.finetune.classifier import SequenceClassifier, drop_unused
from dnascale.finetune.inputs import EncodedSplit, encode_task_splits
from dnascale.finetune.metrics import classification_metrics
from dnascale.finetune.tasks import Task, load_task
from dnascale.models.registry import get_recipe, load_preset
from dnascale.parallel import DeepSpeedMPU, init_distributed, seed_everything
from dnascale.train import checkpoint
from dnascale.train.config import OptimConfig
from dnascale.train.engine import build_engine, resolve_ds_config


@dataclass
class FinetuneConfig:
    task: str
    out: str
    checkpoint: str = "none"  # a pretraining run dir, its checkpoints dir, a tag dir, an HF export, a fine-tuned
    # dir, or "none"
    model: str | None = None  # with checkpoint "none": the recipe to initialise randomly; else must match it
    preset: str = "tiny"
    ds_config: str = "ds_configs/zero2.json"
    seeds: tuple[int, ...] = (0,)
    epochs: int = 3
    max_steps: int | None = None  # a cap: training stops at --epochs or here, whichever comes first
    batch_size: int = 32  # global: rows per optimizer step, split across data-parallel ranks
    lr: float = 1e-4
    warmup_steps: int = 50
    eval_every: int | None = None  # steps; None = once per epoch
    patience: int = 3
    max_train_examples: int | None = None
    classifier_dropout: float = 0.1
    evaluate_only: bool = False
    progress: bool = True  # a step bar on rank 0 (tqdm) with the latest dev MCC
    table: str | None = "runs/finetune_results.tsv"
    optim: OptimConfig = field(default_factory=OptimConfig)


@dataclass
class Backbone:
    recipe: str
    preset: str
    config: object
    tokenizer_spec: str
    state_dict: dict | None  # None = random initialisation


# ------------------------------------------------------------------------------------------------ what to load


def _find_tag_dir(path: Path) -> Path:
    for candidate in (path, path / "checkpoints"):
        latest = candidate / checkpoint.LATEST
        if latest.is_file():
            return candidate / latest.read_text().strip()
    return path


def _is_hf_export(path: Path) -> bool:
    """A directory written by tools/convert_to_hf.py: config.json, and none of a native checkpoint's markers."""
    return (path / "config.json").is_file() and not (path / checkpoint.MODEL_INFO).is_file() \
        and _find_tag_dir(path) == path


def _load_hf_backbone(path: Path, model: str | None) -> Backbone:
    """The backbone of an HF export, read by the same code as tools/convert_from_hf.py (dnascale.hf.load)."""
    from dnascale.data.tokenizers import CONFIG_FILE
    from dnascale.hf.auto import family_classes, model_type_to_recipe
    from dnascale.hf.export import check_tokenizer
    from dnascale.hf.load import read_hf

    # --model is checked on config.json alone, before the weights are read (they may be many GiB).
    try:
        model_type = json.loads((path / "config.json").read_text()).get("model_type")
    except json.JSONDecodeError:
        model_type = None  # read_hf names the file
    family = model_type_to_recipe().get(model_type)
    if model is not None and family is not None and model != family:
        raise CheckpointError(f"{path}: an HF export of a {family!r} model, but --model {model!r} was given (leave "
                              f"--model out or name {family!r})")
    hf = read_hf(path)  # a foreign model_type, missing or mismatched weights: one-line errors naming file and field
    # The export carries its own tokenizer (dnascale_tokenizer.json); the spec recorded at training time may name a
    # directory on the machine that trained it, so the copy beside the weights is preferred.
    tokenizer_info = dict(hf.tokenizer, spec=str(path)) if (path / CONFIG_FILE).is_file() else hf.tokenizer
    check_tokenizer(tokenizer_info, hf.config, str(path / "config.json"))
    config = family_classes(hf.recipe.name)["AutoConfig"].with_export_files(hf.config, path)  # e.g. G-gram vocab
    return Backbone(hf.recipe.name, hf.preset or "?", config, tokenizer_info["spec"], hf.state_dict)


def load_backbone(cfg: FinetuneConfig) -> Backbone:
    """The backbone's recipe, config, tokenizer and weights, from a pretraining checkpoint, an HF export or none."""
    if cfg.checkpoint == "none":
        if cfg.model is None:
            raise ConfigError("--model is required with --checkpoint none (random initialisation)")
        recipe = get_recipe(cfg.model)
        return Backbone(cfg.model, cfg.preset, load_preset(cfg.model, cfg.preset), recipe.tokenizer, None)
    path = Path(cfg.checkpoint)
    if not path.exists():
        raise CheckpointError(f"{cfg.checkpoint}: no such checkpoint")
    if _is_hf_export(path):
        return _load_hf_backbone(path, cfg.model)
    from dnascale.convert.consolidate import consolidate, resolve_tag_dir

    tag_dir = resolve_tag_dir(path)
    recorded = checkpoint.read_model_info(tag_dir)["recipe"] if (tag_dir / checkpoint.MODEL_INFO).is_file() else None
    if cfg.model is not None and recorded is not None and cfg.model != recorded:  # checked before reading weights
        raise CheckpointError(f"{tag_dir}: a {recorded!r} checkpoint, but --model {cfg.model!r} was given "
                              f"(leave --model out or name {recorded!r})")
    # The converter's reader: any ZeRO stage, DP and TP size (TP shards merged by the recipe's layout), or an
    # init dir from tools/convert_from_hf.py; a partial checkpoint is a one-line error.
    ckpt = consolidate(tag_dir, progress=False)
    return Backbone(ckpt.recipe.name, ckpt.preset or "?", ckpt.config, ckpt.tokenizer["spec"], ckpt.state_dict)


# ------------------------------------------------------------------------------------------------ one seed


def _hidden_size(config) -> int:
    for name in ("hidden", "d_model", "hidden_size"):
        if hasattr(config, name):
            return int(getattr(config, name))
    raise ConfigError(f"{type(config).__name__} has no hidden size field for the classification head")


def build_classifier(backbone: Backbone, num_labels: int, parallel, dropout: float = 0.1) -> SequenceClassifier:
    recipe = get_recipe(backbone.recipe)
    model = recipe.build(backbone.config, parallel)
    if backbone.state_dict is not None:
        missing, unexpected = model.load_state_dict(backbone.state_dict, strict=False)
        if missing:
            raise CheckpointError(f"checkpoint lacks {len(missing)} backbone weights, e.g. {missing[0]}")
    return SequenceClassifier(drop_unused(model, backbone.recipe), _hidden_size(backbone.config), num_labels, dropout)


def _forward(engine, batch):
    batch = batch.to(engine.device)
    return engine(batch.input_ids, batch.attention_mask, batch.labels, **batch.extras)


@torch.no_grad()
def evaluate(engine, data: EncodedSplit, batch_size: int) -> dict[str, float]:
    engine.eval()
    predictions = []
    for batch in data.batches(batch_size):
        predictions.append(_forward(engine, batch).logits.argmax(-1).cpu())
    engine.train()
    return classification_metrics(data.labels.numpy(), torch.cat(predictions).numpy())


def run_seed(cfg: FinetuneConfig, task: Task, backbone: Backbone, seed: int, parallel, out_dir: Path) -> dict:
    splits = encode_task_splits(task, backbone.recipe, backbone.config, load_tokenizer(backbone.tokenizer_spec),
                                cfg.max_train_examples)
    train, dev, test = splits["train"], splits["dev"], splits["test"]
    seed_everything(seed)
    model = build_classifier(backbone, task.num_labels, parallel, cfg.classifier_dropout)
    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch if cfg.max_steps is None else min(cfg.max_steps, cfg.epochs * steps_per_epoch)
    ds_config, _ = resolve_ds_config(cfg.ds_config, micro_batch_size=cfg.batch_size // parallel.dp_size,
                                     grad_accum=1, dp_size=parallel.dp_size)
    optim = dataclasses.replace(cfg.optim, lr=cfg.lr, warmup_steps=min(cfg.warmup_steps, total // 10))
    engine, _, _ = build_engine(model, ds_config, optim, total, DeepSpeedMPU())
    eval_every = cfg.eval_every or steps_per_epoch
    generator = torch.Generator().manual_seed(seed)
    best = {"dev": {"mcc": -math.inf}, "step": 0}
    evaluations_without_gain, step, rows_here = 0, 0, 0
    bar = tqdm(total=total, desc=f"{task.name} seed {seed}", unit="step",
               disable=not (cfg.progress and engine.global_rank == 0))
    while step < total and evaluations_without_gain < cfg.patience:
        # Every rank draws the same permutation and trains on its part of each global batch; dev and test are
        # evaluated whole on every rank (forward only, and the same passes on all ranks, as ZeRO-3 requires).
        for batch in train.batches(cfg.batch_size, generator, parallel.dp_rank, parallel.dp_size):
            out = _forward(engine, batch)
            engine.backward(out.loss * batch.loss_weight)
            rows_here += len(batch.labels) if batch.loss_weight else 0
            engine.step()
            step += 1
            bar.update()
            if step % eval_every == 0 or step == total:
                dev_metrics = evaluate(engine, dev, cfg.batch_size)
                bar.set_postfix(dev_mcc=f"{dev_metrics['mcc']:.3f}",
                                best=f"{max(best['dev']['mcc'], dev_metrics['mcc']):.3f}")
                if dev_metrics["mcc"] > best["dev"]["mcc"]:
                    best = {"dev": dev_metrics, "step": step, "test": evaluate(engine, test, cfg.batch_size)}
                    evaluations_without_gain = 0
                    _save_weights(engine, out_dir / f"seed{seed}", backbone, task.num_labels)
                else:
                    evaluations_without_gain += 1
            if step >= total or evaluations_without_gain >= cfg.patience:
                break
    bar.close()
    return {"seed": seed, "best_step": best["step"], "steps": step, "train_rows_per_rank": _gather_counts(rows_here),
            "dev": best["dev"], "test": best["test"]}


def _gather_counts(count: int) -> list[int]:
    """`count` of every data-parallel rank (reported so a run shows its data was split, not repeated)."""
    import torch.distributed as dist

    group = DeepSpeedMPU().get_data_parallel_group()
    counts = [None] * dist.get_world_size(group)
    dist.all_gather_object(counts, count, group=group)
    return counts


def _save_weights(engine, directory: Path, backbone: Backbone, num_labels: int) -> None:
    """The selected classifier as safetensors plus what is needed to rebuild it (for --evaluate-only)."""
    import deepspeed

    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=hasattr(params[0], "ds_id")):
        state = {k: v.detach().cpu().clone().contiguous() for k, v in engine.module.state_dict().items()
                 if v is not None}
    if engine.global_rank == 0:
        directory.mkdir(parents=True, exist_ok=True)
        save_file(state, str(directory / "model.safetensors"))
        info = {"recipe": backbone.recipe, "preset": backbone.preset, "config": dataclasses.asdict(backbone.config),
                "tokenizer": {"spec": backbone.tokenizer_spec}, "num_labels": num_labels}
        (directory / "classifier.json").write_text(json.dumps(info, indent=1, default=str))


def evaluate_only(cfg: FinetuneConfig, task: Task, parallel) -> dict:
    directory = Path(cfg.checkpoint)
    info_path = directory / "classifier.json"
    if not info_path.is_file():
        raise CheckpointError(f"{directory}: not a fine-tuned classifier (no classifier.json); --evaluate-only needs "
                              "the seed directory a fine-tuning run wrote")
    info = json.loads(info_path.read_text())
    if cfg.model is not None and cfg.model != info["recipe"]:
        raise CheckpointError(f"{directory}: a {info['recipe']!r} classifier, but --model {cfg.model!r} was given")
    if info["num_labels"] != task.num_labels:
        raise ConfigError(f"{directory}: classifier has {info['num_labels']} labels, task {task.name} has "
                          f"{task.num_labels}")
    recipe = get_recipe(info["recipe"])
    config = from_dict(recipe.config_cls, info["config"], str(info_path))
    backbone = Backbone(info["recipe"], info["preset"], config, info["tokenizer"]["spec"], None)
    model = build_classifier(backbone, task.num_labels, parallel)
    model.load_state_dict(load_file(str(directory / "model.safetensors")))
    ds_config, _ = resolve_ds_config(cfg.ds_config, micro_batch_size=cfg.batch_size, grad_accum=1,
                                     dp_size=parallel.dp_size)
    engine, _, _ = build_engine(model, ds_config, cfg.optim, 1, DeepSpeedMPU())
    splits = encode_task_splits(task, backbone.recipe, config, load_tokenizer(backbone.tokenizer_spec))
    return {split: evaluate(engine, splits[split], cfg.batch_size) for split in ("dev", "test")}


# ------------------------------------------------------------------------------------------------ driver


def _summary(results: list[dict]) -> dict:
    keys = ("mcc", "f1", "accuracy")
    values = {k: [r["test"][k] for r in results] for k in keys}
    return {"test": {k: float(np.mean(v)) for k, v in values.items()},
            "test_std": {k: float(np.std(v)) for k, v in values.items()}}


def _append_table(path: Path, task: Task, backbone: Backbone, checkpoint_name: str, results: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with open(path, "a", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t")
        if new:
            writer.writerow(["task", "family", "preset", "checkpoint", "seed", "metric", "value"])
        for result in results:
            for metric in ("mcc", "f1", "accuracy"):
                writer.writerow([task.name, backbone.recipe, backbone.preset, checkpoint_name, result["seed"],
                                 f"test_{metric}", f"{result['test'][metric]:.4f}"])


def finetune(cfg: FinetuneConfig) -> dict:
    task = load_task(cfg.task)  # bad task data fails before any process group or model work
    parallel = init_distributed(seed=cfg.seeds[0])
    out_dir = Path(cfg.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.evaluate_only:
        report = {"task": task.name, "checkpoint": cfg.checkpoint, "evaluate_only": True,
                  **evaluate_only(cfg, task, parallel)}
    else:
        if cfg.batch_size % parallel.dp_size:
            raise ConfigError(f"--batch-size {cfg.batch_size} is the global batch and must divide by the "
                              f"data-parallel size {parallel.dp_size}")
        backbone = load_backbone(cfg)
        results = [run_seed(cfg, task, backbone, seed, parallel, out_dir) for seed in cfg.seeds]
        report = {"task": task.name, "family": backbone.recipe, "preset": backbone.preset,
                  "checkpoint": cfg.checkpoint, "seeds": results, **_summary(results)}
        report.update(report["test"])  # mcc, f1, accuracy on test at the top level (mean over seeds)
        if parallel.rank == 0 and cfg.table:
            _append_table(Path(cfg.table), task, backbone, cfg.checkpoint, results)
    if parallel.rank == 0:
        (out_dir / "results.json").write_text(json.dumps(report, indent=1, default=str))
    return report
