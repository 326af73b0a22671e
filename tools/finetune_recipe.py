#!/usr/bin/env python
"""The documented benchmark recipe: pretrain a family's small preset on the bundled genomes, then fine-tune the
pretrained and a randomly initialised copy on GUE tasks, and print a markdown table beside DNABERT-2's MCC.

    python tools/finetune_recipe.py --models encoder --tasks ../shared/data/gue/* --pretrain-steps 1000 \
        --out runs/recipe

Every step is an ordinary launcher command (printed before it runs), so any row can be reproduced by hand.
Small CPU models land far below DNABERT-2; the point is an honest pipeline whose numbers move with pretraining.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DNABERT2_MCC = {"prom_core_tata": 74.17, "prom_300_tata": 71.59, "mouse_3": 66.47, "mouse_2": 79.32, "tf_2": 66.52}


def sh(cmd: list[str]) -> None:
    print("$ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    result = subprocess.run(cmd, cwd=REPO)
    if result.returncode != 0:
        raise SystemExit(f"failed ({result.returncode}): {' '.join(cmd)}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["encoder"])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--tasks", nargs="+", required=True, help="GUE task directories")
    p.add_argument("--pretrain-steps", type=int, default=1000)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--out", default="runs/recipe")
    a = p.parse_args()
    out = Path(a.out)
    rows = []
    for model in a.models:
        pretrain_dir = out / f"{model}-{a.preset}-pretrain"
        sh([sys.executable, "launchers/pretrain.py", "--model", model, "--preset", a.preset,
            "--steps", str(a.pretrain_steps), "--out", str(pretrain_dir), "--wandb-mode", "disabled",
            "--no-progress", "--log-every", "100", "--save-every", str(a.pretrain_steps)])
        for task in a.tasks:
            name = Path(task).name
            result = {}
            for init, checkpoint in (("pretrained", str(pretrain_dir)), ("random", "none")):
                ft_dir = out / f"{model}-{a.preset}-{name}-{init}"
                sh([sys.executable, "launchers/finetune.py", "--task", task, "--checkpoint", checkpoint,
                    "--model", model, "--preset", a.preset, "--out", str(ft_dir), "--epochs", str(a.epochs),
                    "--seeds", *map(str, a.seeds), "--table", str(out / "results.tsv")])
                result[init] = json.loads((ft_dir / "results.json").read_text())["mcc"] * 100
            rows.append((name, f"{model}-{a.preset}", result["pretrained"], result["random"],
                         DNABERT2_MCC.get(name)))
    print("\n| task | model | MCC pretrained | MCC random init | DNABERT-2 (published) |\n|---|---|---|---|---|")
    for name, model, pretrained, random_init, published in rows:
        print(f"| {name} | {model} | {pretrained:.2f} | {random_init:.2f} | {published if published else '-'} |")


if __name__ == "__main__":
    main()
