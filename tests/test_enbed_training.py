"""ENBED learns: the product's command trains enbed-tiny on the bundled genomes and the validation loss (MLM
cross-entropy in nats per masked base) falls below the unigram entropy of the training shards.

A short run of the real launcher (deepspeed runner, ZeRO-3, one rank, the loop's own evaluation on its fixed
validation batches). The full 200-step run and its numbers are in docs/benchmarks.md (ENBED).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STEPS = 60

pytestmark = pytest.mark.distributed


def test_enbed_tiny_validation_loss_falls_below_the_unigram_entropy(tmp_path):
    from dnascale.data.enbed_masking import corruption_floor, shard_token_counts, unigram_entropy
    from dnascale.train.data import bundled_shards

    env = dict(os.environ, DNASCALE_CACHE=str(tmp_path / "cache"), PYTHONUNBUFFERED="1", WANDB_MODE="disabled",
               OMP_NUM_THREADS="2")
    command = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "1",
               "--master_port", str(random.randint(20000, 40000)), str(REPO / "launchers" / "pretrain.py"),
               "--ds_config", str(REPO / "ds_configs" / "zero3.json"), "--model", "enbed", "--preset", "tiny",
               "--steps", str(STEPS), "--eval-every", str(STEPS), "--eval-batches", "4", "--save-every", "1000",
               "--wandb-mode", "disabled", "--no-progress", "--out", str(tmp_path / "run")]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    val_loss = records[-1]["val_loss"]

    os.environ["DNASCALE_CACHE"], saved = str(tmp_path / "cache"), os.environ.get("DNASCALE_CACHE")
    try:
        counts = shard_token_counts(bundled_shards(511, "nucleotide-byte"), "train")  # the run's shards (cached)
    finally:
        if saved is None:
            del os.environ["DNASCALE_CACHE"]
        else:
            os.environ["DNASCALE_CACHE"] = saved
    entropy = unigram_entropy(counts)
    floor = corruption_floor(counts[[68, 70, 74, 87]])
    print(f"after {STEPS} steps: val loss {val_loss:.4f} nats/masked base; unigram entropy {entropy:.4f}; "
          f"context-free floor of the 80/10/10 corruption {floor:.4f}")
    assert records[0]["loss"] > entropy  # it starts above (random init)
    assert val_loss < entropy - 0.02
