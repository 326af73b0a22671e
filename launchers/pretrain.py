#!/usr/bin/env python
"""Pretrain a DNA language model.

    deepspeed launchers/pretrain.py --ds_config ds_configs/zero3.json          # tiny encoder on the bundled genomes
    deepspeed --num_gpus 2 launchers/pretrain.py --ds_config ds_configs/zero3.json --model encoder --preset base
    deepspeed --num_gpus 2 launchers/pretrain.py --ds_config ds_configs/zero1_pipeline.json --pp 2   # 2 stages
    torchrun --nproc_per_node 2 launchers/pretrain.py ...                       # also fine; or plain `python`

Checkpoints, metrics.jsonl and the wandb run go to --out; --resume auto (the default) continues from the newest
complete checkpoint there.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from dnascale.errors import run_cli  # noqa: E402
from dnascale.train.config import OptimConfig, TrainConfig, WANDB_MODES  # noqa: E402


def parse_args(argv=None) -> TrainConfig:
    defaults, optim = TrainConfig(), OptimConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ds_config", "--ds-config", dest="ds_config", default=defaults.ds_config)
    p.add_argument("--model", default=defaults.model, help="a registered recipe (see dnascale.models.registry)")
    p.add_argument("--preset", default=defaults.preset, help="tiny, base, 1b2, ... (dnascale/presets)")
    p.add_argument("--override", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a model config field, e.g. --override layers=4 (repeatable)")
    p.add_argument("--data", default=None, help="shard directory (default: bundled genomes, sharded on first use)")
    p.add_argument("--steps", type=int, default=defaults.steps)
    p.add_argument("--micro-batch-size", type=int, default=None, help="per rank (default: the ds_config's, else 8)")
    p.add_argument("--grad-accum", type=int, default=None, help="(default: the ds_config's, else 1)")
    p.add_argument("--lr", type=float, default=optim.lr)
    p.add_argument("--min-lr-ratio", type=float, default=optim.min_lr_ratio)
    p.add_argument("--warmup-steps", type=int, default=optim.warmup_steps)
    p.add_argument("--weight-decay", type=float, default=optim.weight_decay)
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--tp", type=int, default=defaults.tp, help="tensor-parallel size")
    p.add_argument("--pp", type=int, default=defaults.pp,
                   help="pipeline-parallel stages (> 1 needs a ZeRO-0/1 ds_config, e.g. ds_configs/zero1_pipeline.json)")
    p.add_argument("--out", default=defaults.out)
    p.add_argument("--resume", default=defaults.resume, help="auto | none | path to a checkpoint tag directory")
    p.add_argument("--init-from", default=None, metavar="DIR",
                   help="start from these weights (tools/convert_from_hf.py output, written for this --tp)")
    p.add_argument("--save-every", type=int, default=defaults.save_every)
    p.add_argument("--keep-checkpoints", type=int, default=defaults.keep_checkpoints)
    p.add_argument("--eval-every", type=int, default=defaults.eval_every)
    p.add_argument("--eval-batches", type=int, default=defaults.eval_batches)
    p.add_argument("--log-every", type=int, default=10, help="console line every N steps (metrics.jsonl: every step)")
    p.add_argument("--num-workers", type=int, default=defaults.num_workers, help="data loader workers per rank")
    p.add_argument("--max-nonfinite", type=int, default=defaults.max_nonfinite_in_a_row,
                   help="abort after this many non-finite losses in a row")
    p.add_argument("--wandb-mode", choices=WANDB_MODES, default=defaults.wandb_mode)
    p.add_argument("--wandb-project", default=defaults.wandb_project)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # set by deepspeed
    a = p.parse_args(argv)
    return TrainConfig(
        model=a.model, preset=a.preset, model_overrides=tuple(a.override), data=a.data, ds_config=a.ds_config,
        steps=a.steps, micro_batch_size=a.micro_batch_size, grad_accum=a.grad_accum,
        optim=OptimConfig(lr=a.lr, min_lr_ratio=a.min_lr_ratio, warmup_steps=a.warmup_steps,
                          weight_decay=a.weight_decay),
        seed=a.seed, tp=a.tp, pp=a.pp, out=a.out, resume=a.resume, init_from=a.init_from, save_every=a.save_every, keep_checkpoints=a.keep_checkpoints, eval_every=a.eval_every,
        eval_batches=a.eval_batches, log_every=a.log_every, num_workers=a.num_workers,
        max_nonfinite_in_a_row=a.max_nonfinite, wandb_mode=a.wandb_mode, wandb_project=a.wandb_project,
        progress=not a.no_progress,
    )


def main(argv=None) -> int:
    import warnings

    # DeepSpeed still calls torch.distributed collectives that torch 2.13 marks deprecated, once per step.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    # megatron-core announces at import that the optional CUDA fusions (Transformer Engine, Apex) are absent.
    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
    # --pp on gloo: DeepSpeed sends activations with an in-place broadcast, which autograd records on the sending
    # stage; its backward passes the next stage's gradient through unchanged (tests/test_pipeline.py checks).
    warnings.filterwarnings("ignore", message=r"c10d::broadcast_: an autograd kernel was not registered")
    from dnascale.train.loop import pretrain

    pretrain(parse_args(argv))
    return 0


if __name__ == "__main__":
    run_cli(main)
