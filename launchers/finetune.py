#!/usr/bin/env python
"""Fine-tune a DNA language model on a sequence-classification task (GUE csv layout) and evaluate it.

    python launchers/finetune.py --task ../shared/data/gue/prom_core_tata --checkpoint runs/pretrain --out runs/ft
    python launchers/finetune.py --task TASK --checkpoint none --model encoder --preset tiny --out runs/ft-random
    python launchers/finetune.py --task TASK --checkpoint runs/dnazen-pretrain --model dnazen --out runs/ft-dnazen
    python launchers/finetune.py --task TASK --checkpoint runs/pretrain-hf --out runs/ft-hf   # tools/convert_to_hf.py's
    python launchers/finetune.py --task TASK --checkpoint runs/ft/seed0 --evaluate-only --out runs/ft-eval
    deepspeed --num_gpus 2 launchers/finetune.py --ds_config ds_configs/zero3.json ...

Writes OUT/results.json (test mcc, f1, accuracy: mean over seeds, plus each seed) and appends rows to --table.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
# DeepSpeed calls torch.distributed collectives torch 2.13 marks deprecated; megatron-core announces at import that
# the optional CUDA fusions are absent. Neither is actionable for a user.
warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")

from dnascale.errors import run_cli  # noqa: E402
from dnascale.finetune.run import FinetuneConfig  # noqa: E402


def parse_args(argv=None) -> FinetuneConfig:
    d = FinetuneConfig(task="", out="")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", required=True, help="directory with train.csv, dev.csv, test.csv (sequence,label)")
    p.add_argument("--checkpoint", default=d.checkpoint,
                   help="pretraining run dir / checkpoint tag dir, an HF export (tools/convert_to_hf.py), a "
                        "fine-tuned seed dir (--evaluate-only), or none")
    p.add_argument("--out", required=True)
    p.add_argument("--model", default=None,
                   help="recipe (encoder, enbed, dnazen, dnachunker): required with --checkpoint none; with a "
                        "checkpoint it must match the checkpoint's family")
    p.add_argument("--preset", default=d.preset, help="preset for --checkpoint none (a checkpoint carries its own)")
    p.add_argument("--ds_config", "--ds-config", dest="ds_config", default=d.ds_config)
    p.add_argument("--seeds", type=int, nargs="+", default=list(d.seeds))
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--max-steps", type=int, default=None,
                   help="stop after this many steps even if --epochs are not done")
    p.add_argument("--batch-size", type=int, default=d.batch_size,
                   help="global batch (rows per optimizer step), split across data-parallel ranks")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    p.add_argument("--eval-every", type=int, default=None, help="steps between dev evaluations (default: each epoch)")
    p.add_argument("--patience", type=int, default=d.patience, help="early stop after this many evals without gain")
    p.add_argument("--max-train-examples", type=int, default=None)
    p.add_argument("--classifier-dropout", type=float, default=d.classifier_dropout)
    p.add_argument("--evaluate-only", action="store_true")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no step bar")
    p.add_argument("--table", default=d.table, help="results table (TSV) to append to; '' to skip")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    return FinetuneConfig(
        task=a.task, out=a.out, checkpoint=a.checkpoint, model=a.model, preset=a.preset, ds_config=a.ds_config,
        seeds=tuple(a.seeds), epochs=a.epochs, max_steps=a.max_steps, batch_size=a.batch_size, lr=a.lr,
        warmup_steps=a.warmup_steps, eval_every=a.eval_every, patience=a.patience,
        max_train_examples=a.max_train_examples, classifier_dropout=a.classifier_dropout,
        evaluate_only=a.evaluate_only, progress=a.progress, table=a.table or None,
    )


def main(argv=None) -> int:
    from dnascale.finetune.run import finetune

    report = finetune(parse_args(argv))
    if "mcc" in report:
        print(f"{report['task']}: test mcc {report['mcc']:.4f}  f1 {report['f1']:.4f}  accuracy {report['accuracy']:.4f}"
              f" (mean of {len(report['seeds'])} seed(s))")
    else:
        print(f"{report['task']}: " + "  ".join(f"{s} mcc {m['mcc']:.4f}" for s, m in report.items() if isinstance(m, dict)))
    return 0


if __name__ == "__main__":
    run_cli(main)
