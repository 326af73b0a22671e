#!/usr/bin/env python
"""The documented benchmark recipe: pretrain each family's small preset on the bundled genomes, fine-tune the
pretrained and a randomly initialised copy on GUE tasks over several seeds, and report the table beside DNABERT-2.

    python tools/finetune_recipe.py --models encoder enbed dnazen dnachunker --tasks ../shared/data/gue/* \
        --genomes ../shared/data/genomes/*.gz --seeds 0 1 2 --jobs 2 --out runs/recipe

Every step is an ordinary launcher command, printed before it runs and logged beside its output, so any cell can be
reproduced by hand. The recipe is resumable: a pretraining run continues from its checkpoint (--resume auto) and a
fine-tuning cell whose results.json exists is read, not rerun. `--pretrained FAMILY=RUN` reuses an existing
pretraining run. Outputs: OUT/table.md (mean +- sd over seeds), OUT/results.tsv (one row per seed and metric),
OUT/gue_mcc.png. Small CPU models land far below DNABERT-2; the point is an honest pipeline whose numbers move with
pretraining.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DNABERT2_MCC = {"prom_core_tata": 74.17, "prom_300_tata": 71.59, "mouse_3": 66.47, "mouse_2": 79.32, "tf_2": 66.52}
INITS = ("pretrained", "random")


@dataclass(frozen=True)
class Cell:
    """One fine-tuning run: a family, a task, pretrained or random initialisation, one seed."""

    model: str
    task: Path
    init: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.model}-{self.task.name}-{self.init}-seed{self.seed}"


def quoted(cmd: list[str]) -> str:
    return " ".join(shlex.quote(c) for c in cmd)


def run_logged(cmd: list[str], log: Path, threads: int) -> None:
    """Run a launcher command with its output in `log`; a failure names the command and the log."""
    log.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    with open(log, "w") as handle:
        handle.write("$ " + quoted(cmd) + "\n")
        handle.flush()
        result = subprocess.run(cmd, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT, env=env)
    if result.returncode != 0:
        tail = log.read_text().strip().splitlines()[-1:] or [""]
        raise SystemExit(f"failed ({result.returncode}): {quoted(cmd)} (log {log}: {tail[0]})")


def finished_step(run_dir: Path) -> int:
    """The step of the run's newest complete checkpoint (0 if none)."""
    from dnascale.train import checkpoint

    latest = run_dir / "checkpoints" / checkpoint.LATEST
    if not latest.is_file():
        return 0
    marker = run_dir / "checkpoints" / latest.read_text().strip() / checkpoint.COMPLETE
    return int(json.loads(marker.read_text())["step"]) if marker.is_file() else 0


def shards_for(model: str, a, out: Path) -> Path:
    """WebDataset shards of --genomes in the family's tokenizer and window (built once, reused by later runs)."""
    from dnascale.models.registry import get_recipe, load_preset

    recipe = get_recipe(model)
    window = recipe.data_window(load_preset(model, a.preset))
    name = f"{Path(recipe.tokenizer).name}-w{window}"
    target = out / "shards" / name
    if not (target / "manifest.json").is_file():  # the manifest is written last: a killed build is redone
        cmd = [sys.executable, "tools/build_shards.py", *a.genomes, "--out", str(target), "--tokenizer",
               recipe.tokenizer, "--window", str(window), "--val-fraction", "0.02", "--overwrite"]
        print("$ " + quoted(cmd), flush=True)
        run_logged(cmd, out / "logs" / f"shards-{name}.log", os.cpu_count() or 1)
    return target


def pretrain(model: str, a, out: Path) -> Path:
    run_dir = out / f"{model}-{a.preset}-pretrain"
    if finished_step(run_dir) >= a.pretrain_steps:
        return run_dir
    cmd = [sys.executable, "launchers/pretrain.py", "--model", model, "--preset", a.preset,
           "--steps", str(a.pretrain_steps), "--out", str(run_dir), "--wandb-mode", "disabled",
           "--no-progress", "--log-every", "50", "--save-every", str(a.pretrain_steps)]
    if a.genomes:
        cmd += ["--data", str(shards_for(model, a, out))]
    print("$ " + quoted(cmd), flush=True)
    run_logged(cmd, out / "logs" / f"{model}-{a.preset}-pretrain.log", os.cpu_count() or 1)
    return run_dir


def finetune_command(cell: Cell, checkpoint: str, a, out: Path) -> list[str]:
    return [sys.executable, "launchers/finetune.py", "--task", str(cell.task), "--checkpoint", checkpoint,
            "--model", cell.model, "--preset", a.preset, "--out", str(out / "finetune" / cell.name),
            "--epochs", str(a.epochs), "--max-steps", str(a.max_steps), "--seeds", str(cell.seed),
            "--table", str(out / "results.tsv")]


def read_mcc(out: Path, cell: Cell) -> float | None:
    path = out / "finetune" / cell.name / "results.json"
    return json.loads(path.read_text())["mcc"] * 100 if path.is_file() else None


def summarise(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def write_table(out: Path, cells: list[Cell], models: list[str], tasks: list[Path]) -> str:
    mcc = {cell: read_mcc(out, cell) for cell in cells}
    lines = ["| task | family | MCC pretrained | MCC random init | difference | seeds | DNABERT-2 (published) |",
             "|---|---|---|---|---|---|---|"]
    for task in tasks:
        for model in models:
            by_init = {init: [v for c, v in mcc.items() if v is not None and (c.model, c.task, c.init) ==
                              (model, task, init)] for init in INITS}
            pre, rnd = by_init["pretrained"], by_init["random"]
            diff = f"{statistics.mean(pre) - statistics.mean(rnd):+.2f}" if pre and rnd else "-"
            lines.append(f"| {task.name} | {model} | {summarise(pre)} | {summarise(rnd)} | {diff} | "
                         f"{min(len(pre), len(rnd))} | {DNABERT2_MCC.get(task.name, '-')} |")
    table = "\n".join(lines) + "\n"
    (out / "table.md").write_text(table)
    plot(out / "gue_mcc.png", mcc, models, tasks)
    return table


def plot(path: Path, mcc: dict[Cell, float | None], models: list[str], tasks: list[Path]) -> None:
    """Grouped bars: per task, each family's pretrained (solid) and random-init (hatched) mean MCC, seeds as dots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2.2 * len(tasks) + 2, 4.2))
    width = 0.8 / (2 * len(models))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for t, task in enumerate(tasks):
        for m, model in enumerate(models):
            for i, init in enumerate(INITS):
                values = [v for c, v in mcc.items()
                          if v is not None and (c.model, c.task, c.init) == (model, task, init)]
                if not values:
                    continue
                x = t - 0.4 + width * (2 * m + i + 0.5)
                ax.bar(x, statistics.mean(values), width, color=colors[m % len(colors)],
                       hatch="//" if init == "random" else None, alpha=0.6 if init == "random" else 1.0,
                       label=f"{model} {init}" if t == 0 else None, edgecolor="black", linewidth=0.4)
                ax.plot([x] * len(values), values, "k.", markersize=3)
        if task.name in DNABERT2_MCC:
            ax.hlines(DNABERT2_MCC[task.name], t - 0.45, t + 0.45, colors="gray", linestyles="--",
                      label="DNABERT-2 (published)" if t == 0 else None)
    ax.axhline(0, color="black", linewidth=0.5)
    ax.set_xticks(range(len(tasks)), [task.name for task in tasks])
    ax.set_ylabel("test MCC x 100")
    ax.set_title("GUE fine-tuning: tiny presets, pretrained vs random initialisation")
    ax.legend(fontsize=7, ncol=2, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_pretrained(items: list[str]) -> dict[str, str]:
    runs = {}
    for item in items:
        model, sep, run = item.partition("=")
        if not sep or not run:
            raise SystemExit(f"--pretrained {item!r}: expected FAMILY=RUN_DIR")
        if not Path(run).is_dir():
            raise SystemExit(f"--pretrained {item!r}: {run} is not a directory")
        runs[model] = run
    return runs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["encoder"])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--tasks", nargs="+", required=True, help="GUE task directories")
    p.add_argument("--genomes", nargs="*", default=[], metavar="FASTA",
                   help="pretrain on these genomes (one species per file, e.g. ../shared/data/genomes/*.gz); "
                        "default: the launcher's bundled corpus")
    p.add_argument("--pretrain-steps", type=int, default=600)
    p.add_argument("--pretrained", nargs="*", default=[], metavar="FAMILY=RUN",
                   help="reuse an existing pretraining run for FAMILY instead of pretraining")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--max-steps", type=int, default=600, help="cap per fine-tuning run (large tasks stop early)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--jobs", type=int, default=1, help="fine-tuning runs at once (threads are split between them)")
    p.add_argument("--table-only", action="store_true", help="write the table and plot from finished cells")
    p.add_argument("--out", default="runs/recipe")
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    tasks = [Path(t) for t in a.tasks]
    for task in tasks:
        if not (task / "train.csv").is_file():
            raise SystemExit(f"--tasks {task}: not a task directory (expected train.csv, dev.csv, test.csv)")
    runs = parse_pretrained(a.pretrained)
    for genome in a.genomes:
        if not Path(genome).is_file():
            raise SystemExit(f"--genomes {genome}: no such file")
    # Seed-major order: the first seed of every cell lands before any second seed, so a cut-short recipe still
    # fills the whole table.
    cells = [Cell(model, task, init, seed) for seed in a.seeds for task in tasks for model in a.models
             for init in INITS]
    if not a.table_only:
        for model in a.models:
            if model not in runs:
                runs[model] = str(pretrain(model, a, out))
        todo = [c for c in cells if read_mcc(out, c) is None]
        jobs = max(1, min(a.jobs, len(todo) or 1))
        threads = max(1, (os.cpu_count() or 1) // jobs)
        with ThreadPoolExecutor(jobs) as pool:
            futures = {}
            for cell in todo:
                cmd = finetune_command(cell, runs[cell.model] if cell.init == "pretrained" else "none", a, out)
                tqdm.write("$ " + quoted(cmd))
                futures[pool.submit(run_logged, cmd, out / "logs" / f"{cell.name}.log", threads)] = cell
            with tqdm(total=len(todo), desc="fine-tuning cells", unit="run") as bar:
                for future in as_completed(futures):
                    future.result()
                    bar.set_postfix_str(f"{futures[future].name}: MCC {read_mcc(out, futures[future]):.2f}")
                    bar.update()
    print(write_table(out, cells, a.models, tasks))
    print(f"table: {out / 'table.md'}  plot: {out / 'gue_mcc.png'}  rows: {out / 'results.tsv'}")


if __name__ == "__main__":
    main()
