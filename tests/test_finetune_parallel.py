"""Data-parallel fine-tuning under DeepSpeed ZeRO-3: 2 ranks (deepspeed launcher, gloo) must train exactly like one.

`--batch-size` is the global batch: each rank takes its part of every batch, and the per-rank loss is weighted so
the mean over ranks is the mean over the batch. 19 training rows in batches of 8 end with a 3-row batch split 2 / 1,
which only the weighting makes equal to DP=1. Ranks that each trained on the whole batch would match DP=1 too, so
the per-rank row counts are checked as well.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.distributed
REPO = Path(__file__).resolve().parents[1]
TASK = str(REPO / "tests" / "data" / "gue_prom_core_tata_200")
ARGS = ["launchers/finetune.py", "--ds_config", "ds_configs/zero3.json", "--task", TASK, "--checkpoint", "none",
        "--preset", "tiny", "--batch-size", "8", "--max-train-examples", "19", "--epochs", "1", "--eval-every", "3",
        "--classifier-dropout", "0", "--lr", "1e-3", "--warmup-steps", "0", "--table", ""]


def _env(tmp_path: Path) -> dict[str, str]:
    inherited = {k: v for k, v in os.environ.items()
                 if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    return dict(inherited, DNASCALE_CACHE=str(tmp_path / "cache"), WANDB_MODE="disabled", OMP_NUM_THREADS="1")


def _run(command: list[str], env: dict[str, str]) -> None:
    result = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.mark.parametrize("family", ["encoder", "dnazen", "dnachunker"])
def test_two_ranks_under_zero3_train_like_one(family, tmp_path):
    env = _env(tmp_path)
    _run([sys.executable, *ARGS, "--model", family, "--out", str(tmp_path / "dp1")], env)
    port = random.randint(20000, 39000)
    _run([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(port),
          *ARGS, "--model", family, "--out", str(tmp_path / "dp2")], env)

    reports = {kind: json.loads((tmp_path / kind / "results.json").read_text()) for kind in ("dp1", "dp2")}
    (one,), (two,) = reports["dp1"]["seeds"], reports["dp2"]["seeds"]
    assert one["steps"] == two["steps"] == 3
    assert one["train_rows_per_rank"] == [19]
    assert two["train_rows_per_rank"] == [4 + 4 + 2, 4 + 4 + 1]  # split, not repeated
    weights = {kind: load_file(str(tmp_path / kind / "seed0" / "model.safetensors")) for kind in ("dp1", "dp2")}
    assert sorted(weights["dp1"]) == sorted(weights["dp2"])
    # Adam normalises each update, so reduction-order noise in a gradient that is nearly zero can move that one
    # weight by up to lr per step; the bulk must agree to float noise. A wrongly weighted last batch moves a
    # large fraction of the weights by ~lr (checked by hand with the weighting removed).
    differences = torch.cat([(weights["dp2"][name] - tensor).abs().flatten()
                             for name, tensor in weights["dp1"].items()])
    assert differences.max() <= 3 * 1e-3
    assert (differences > 1e-5).float().mean() < 1e-3, f"{(differences > 1e-5).float().mean():.4f} of weights differ"
    assert two["test"] == pytest.approx(one["test"], abs=0.02)


def test_global_batch_must_divide_by_the_data_parallel_size(tmp_path):
    port = random.randint(20000, 39000)
    result = subprocess.run(
        [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(port),
         *ARGS, "--model", "encoder", "--batch-size", "7", "--out", str(tmp_path / "odd")],
        env=_env(tmp_path), cwd=REPO, capture_output=True, text=True, timeout=400)
    assert result.returncode != 0
    assert "--batch-size 7 is the global batch and must divide by the data-parallel size 2" in result.stderr


@pytest.mark.parametrize("rows", [17, 19, 16])
def test_batches_split_every_global_batch_across_ranks_once(rows):
    from dnascale.data.tokenizers import load_tokenizer
    from dnascale.finetune.inputs import EncodedSplit
    from dnascale.finetune.tasks import load_task

    split = EncodedSplit(load_task(TASK)["train"], "train", load_tokenizer("nucleotide-char"), 512, None, rows)
    whole = list(split.batches(8, torch.Generator().manual_seed(3)))
    parts = [list(split.batches(8, torch.Generator().manual_seed(3), rank, 2)) for rank in range(2)]
    assert len(parts[0]) == len(parts[1]) == len(whole)  # every rank runs every step (ZeRO-3 needs it)
    for step, batch in enumerate(whole):
        shares = [part[step] for part in parts]
        real = [s for s in shares if s.loss_weight > 0]
        # The ranks' real rows are the global batch, in order, each once; DeepSpeed's mean over ranks of
        # weight x (mean loss of the part) counts every row of the batch with 1 / its size.
        assert torch.equal(torch.cat([s.labels for s in real]), batch.labels)
        for share in real:
            assert share.loss_weight / (2 * len(share.labels)) == pytest.approx(1 / len(batch.labels))
    last = [part[-1] for part in parts]
    if rows == 17:  # a 1-row last batch: rank 1 runs that row at weight 0
        assert [s.loss_weight for s in last] == [2.0, 0.0] and torch.equal(last[1].labels, last[0].labels)
