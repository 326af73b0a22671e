"""launchers/finetune.py end to end on a 200-example slice of a real GUE task (prom_core_tata)."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TASK = str(REPO / "tests" / "data" / "gue_prom_core_tata_200")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return dict(os.environ, DNASCALE_CACHE=str(tmp_path_factory.mktemp("cache")), WANDB_MODE="disabled")


def run(args, env):
    result = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def test_finetune_from_pretrained_checkpoint_then_evaluate_only(tmp_path, env):
    run(["launchers/pretrain.py", "--steps", "4", "--save-every", "4", "--out", str(tmp_path / "pt"),
         "--wandb-mode", "disabled", "--no-progress", "--eval-batches", "0"], env)
    table = tmp_path / "table.tsv"
    common = ["--task", TASK, "--max-steps", "8", "--eval-every", "4", "--batch-size", "16", "--table", str(table)]
    run(["launchers/finetune.py", *common, "--checkpoint", str(tmp_path / "pt"), "--out", str(tmp_path / "ft"),
         "--seeds", "0", "1"], env)
    report = json.loads((tmp_path / "ft" / "results.json").read_text())
    assert report["family"] == "encoder" and len(report["seeds"]) == 2
    for key in ("mcc", "f1", "accuracy"):
        assert -1.0 <= report[key] <= 1.0
        assert report["test"][key] == pytest.approx(sum(s["test"][key] for s in report["seeds"]) / 2)
    rows = list(csv.DictReader(open(table), delimiter="\t"))
    assert len(rows) == 6 and {r["seed"] for r in rows} == {"0", "1"}

    # the selected weights were saved: evaluating them again gives the same test metrics
    run(["launchers/finetune.py", "--task", TASK, "--checkpoint", str(tmp_path / "ft" / "seed0"), "--evaluate-only",
         "--out", str(tmp_path / "eval")], env)
    again = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert again["test"] == pytest.approx(report["seeds"][0]["test"])

    # the randomly initialised baseline runs through the same path
    run(["launchers/finetune.py", *common, "--checkpoint", "none", "--model", "encoder", "--out",
         str(tmp_path / "random")], env)
    assert json.loads((tmp_path / "random" / "results.json").read_text())["checkpoint"] == "none"


def test_finetune_errors_are_one_line(tmp_path, env):
    bad_task = tmp_path / "task"
    bad_task.mkdir()
    for split in ("train", "dev", "test"):
        (bad_task / f"{split}.csv").write_text("sequence,label\nACGT,0\nACGA,1\n")
    (bad_task / "dev.csv").write_text("sequence,label\nACGU,0\n")
    result = subprocess.run([sys.executable, "launchers/finetune.py", "--task", str(bad_task), "--out",
                             str(tmp_path / "o"), "--checkpoint", "none", "--model", "encoder"],
                            env=env, capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].endswith("dev.csv:2: character 'U' at position 4 of the sequence "
                                                            "(expected A C G T N)")
    result = subprocess.run([sys.executable, "launchers/finetune.py", "--task", TASK, "--out", str(tmp_path / "o"),
                             "--checkpoint", str(tmp_path / "missing")], env=env, capture_output=True, text=True,
                            cwd=REPO)
    assert result.returncode == 2 and "missing: no such checkpoint" in result.stderr
