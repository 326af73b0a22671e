"""`deepspeed launchers/pretrain.py --model dnazen --preset tiny` end to end: 2 gloo ranks under ZeRO-3 on the
bundled genomes (sharded on first use with the bundled BPE tokenizer), whole-G-gram masking and matching in the
loader worker, the csrc fusion; the loss falls and the collator's metrics reach metrics.jsonl."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.distributed


def test_dnazen_tiny_trains_under_zero3_and_the_loss_falls(tmp_path):
    env = dict(os.environ, DNASCALE_CACHE=str(tmp_path / "cache"), PYTHONUNBUFFERED="1", WANDB_MODE="disabled")
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port",
           str(random.randint(20000, 40000)), str(REPO / "launchers" / "pretrain.py"),
           "--ds_config", str(REPO / "ds_configs" / "zero3.json"), "--model", "dnazen", "--preset", "tiny",
           "--steps", "24", "--warmup-steps", "4", "--micro-batch-size", "8", "--eval-batches", "0",
           "--log-every", "100", "--save-every", "24", "--wandb-mode", "disabled", "--no-progress",
           "--out", str(tmp_path / "run")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400, cwd=REPO)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "dnazen-tiny" in done.stdout and "ZeRO stage 3" in done.stdout and "world 2" in done.stdout
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 25))
    losses = [r["loss"] for r in records]
    first, last = sum(losses[:3]) / 3, sum(losses[-4:]) / 4
    assert losses[0] == pytest.approx(8.32, abs=0.15)  # ~ln 4096 at initialisation
    assert last < first - 0.4, f"loss did not fall: {losses}"
    mask_rate = [r["mask_rate"] for r in records]
    assert all(abs(rate - 0.15) < 0.01 for rate in mask_rate)
    assert all(r["ggrams_per_seq"] > 1 for r in records) and all(r["truncated"] < 0.2 for r in records)
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step_0000024"
