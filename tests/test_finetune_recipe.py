"""tools/finetune_recipe.py end to end at toy size: pretrain, fine-tune both initialisations over two seeds in two
parallel jobs, aggregate into the table and plot; a second invocation reruns nothing."""

import csv
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TASK = REPO / "tests" / "data" / "gue_prom_core_tata_200"
GENOME = REPO / "dnascale" / "genomes" / "scerevisiae_r64_chrI.fna.gz"


def test_recipe_fills_the_table_from_its_cells_and_resumes(tmp_path):
    out = tmp_path / "recipe"
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(DNASCALE_CACHE=str(tmp_path / "cache"), WANDB_MODE="disabled")
    command = [sys.executable, "tools/finetune_recipe.py", "--models", "encoder", "--tasks", str(TASK),
               "--pretrain-steps", "2",
               "--genomes", str(GENOME), "--max-steps", "2", "--seeds", "0", "1", "--jobs", "2", "--out", str(out)]
    result = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    # Pretrained on the given genome: shards of it in the encoder's layout, named in the run's data manifest.
    (shards,) = (out / "shards").iterdir()
    manifest = json.loads((shards / "manifest.json").read_text())
    assert [source["file"] for source in manifest["sources"]] == [GENOME.name]
    assert str(shards) in (out / "logs" / "encoder-tiny-pretrain.log").read_text()

    mcc = {}
    for init in ("pretrained", "random"):
        for seed in (0, 1):
            cell = out / "finetune" / f"encoder-{TASK.name}-{init}-seed{seed}"
            report = json.loads((cell / "results.json").read_text())
            assert report["seeds"][0]["seed"] == seed and report["seeds"][0]["steps"] == 2
            assert report["checkpoint"] == (str(out / "encoder-tiny-pretrain") if init == "pretrained" else "none")
            mcc.setdefault(init, []).append(report["mcc"] * 100)
    (row,) = [line for line in (out / "table.md").read_text().splitlines() if line.startswith(f"| {TASK.name} |")]
    cells = [c.strip() for c in row.strip("|").split("|")]
    for column, init in ((2, "pretrained"), (3, "random")):
        assert cells[column] == f"{statistics.mean(mcc[init]):.2f} ± {statistics.stdev(mcc[init]):.2f}"
    assert cells[4] == f"{statistics.mean(mcc['pretrained']) - statistics.mean(mcc['random']):+.2f}"
    assert cells[5] == "2" and cells[6] == "-"  # two seeds per side; no published number for this slice
    assert (out / "gue_mcc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = list(csv.DictReader(open(out / "results.tsv"), delimiter="\t"))
    assert len(rows) == 4 * 3  # a row per cell and metric

    # Resumed: the pretraining run and every cell are read, not rerun.
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("results.json")}
    again = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "launchers/" not in again.stdout + again.stderr
    assert {p: p.stat().st_mtime_ns for p in out.rglob("results.json")} == stamps
    assert len(list(csv.DictReader(open(out / "results.tsv"), delimiter="\t"))) == 4 * 3
