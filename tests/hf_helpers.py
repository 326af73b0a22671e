"""Shared by tests/test_hf_*.py: 2-rank pretraining checkpoints, family inputs, reference logits, CLI errors.

Each family's test module makes two real checkpoints with launchers/pretrain.py (one optimizer step, tiny preset):
TP=2 under torchrun and DP=2 ZeRO-3 under the deepspeed launcher (one after the other: the first builds the
shard cache the second reuses).
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
LAUNCHER = str(REPO / "launchers" / "pretrain.py")
ZERO3 = str(REPO / "ds_configs" / "zero3.json")
QUIET = ["--wandb-mode", "disabled", "--no-progress", "--eval-batches", "0", "--log-every", "100",
         "--steps", "1", "--micro-batch-size", "2"]


def _genome_slices() -> list[str]:
    """Two real S. cerevisiae stretches (real DNA matches DNAZEN's G-grams; random letters rarely do)."""
    import gzip

    with gzip.open(REPO / "dnascale" / "genomes" / "scerevisiae_r64_chrI.fna.gz", "rt") as handle:
        bases = "".join(line.strip() for line in handle if not line.startswith(">"))
    return [bases[20_000:20_250], bases[40_000:40_090]]


SEQUENCES = _genome_slices()


def make_checkpoints(tmp_path_factory, recipe: str) -> dict[str, Path]:
    """{"tp2": run dir (dp 1 x tp 2), "dp2": run dir (dp 2 x tp 1, ZeRO-3)}, both after one step."""
    root = tmp_path_factory.mktemp(f"{recipe}-runs")
    # A world of one started in this process (by an HF model) leaves RANK/MASTER_* set; the launchers set their own.
    inherited = {k: v for k, v in os.environ.items()
                 if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env = dict(inherited, DNASCALE_CACHE=str(root / "cache"), PYTHONUNBUFFERED="1", WANDB_MODE="disabled",
               OMP_NUM_THREADS="1")
    port = random.randint(20000, 39000)
    common = [LAUNCHER, "--ds_config", ZERO3, "--model", recipe, *QUIET]
    commands = {
        "tp2": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
                *common, "--tp", "2", "--out", str(root / "tp2")],
        "dp2": [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port",
                str(port + 1), *common, "--out", str(root / "dp2")],
    }
    first = subprocess.run(commands["tp2"], env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    second = subprocess.run(commands["dp2"], env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    return {"tp2": root / "tp2", "dp2": root / "dp2"}


def family_inputs(recipe: str, config, hf_dir: Path) -> dict[str, torch.Tensor]:
    """A padded batch of two sequences tokenized by the exported HF tokenizer, plus the family's extras."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(hf_dir))
    batch = tokenizer(SEQUENCES, return_tensors="pt", padding=True)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"].bool()}
    if recipe == "enbed":  # teacher-forced decoder over the same bases (the targets of a copy task)
        inputs["labels"] = batch["input_ids"].masked_fill(~inputs["attention_mask"], -100)
    if recipe == "dnazen":
        from dnascale.data.ggram import GGramMatcher, GGramVocab, build_rows

        matcher = GGramMatcher(GGramVocab.load(config.ggram_vocab_path), config.vocab_size)
        ids = inputs["input_ids"].numpy().astype(np.int64)
        rows = build_rows(matcher.find(ids), ids.shape[0], config.max_ggrams)
        inputs["ggram_ids"] = torch.from_numpy(rows.ggram_ids)
        inputs["ggram_triplets"] = torch.from_numpy(rows.triplets)
        assert int((inputs["ggram_ids"] != 0).sum()) > 0, "the test batch should match some G-grams"
    return inputs


@torch.no_grad()
def dnascale_logits(model, inputs: dict) -> torch.Tensor:
    model.eval()
    return model(**inputs, return_logits=True).logits


def tp2_reference_worker(rank: int, tag_dir: str, init_dir: str, inputs_path: str, out_path: str) -> None:
    """Under 2 gloo ranks at TP=2: the family's logits with (a) each TP rank's own weights as DeepSpeed's
    zero_to_fp32 rebuilds them (no merge of ours involved) and (b) the weights convert_from_hf wrote for tp=2."""
    import warnings

    warnings.filterwarnings("ignore")
    from dnascale.convert.consolidate import zero_files_by_tp_rank, _zero_to_fp32_one_tp_rank, read_recipe_config
    from dnascale.convert.init_weights import load_init_weights
    from dnascale.parallel import init_distributed
    from dnascale.train.checkpoint import read_model_info

    parallel = init_distributed(tp=2, seed=0)
    recipe, config = read_recipe_config(read_model_info(tag_dir), tag_dir)
    model = recipe.build(config, parallel)
    own = _zero_to_fp32_one_tp_rank(zero_files_by_tp_rank(Path(tag_dir))[parallel.tp_rank])
    missing, _ = model.load_state_dict(own, strict=False)
    assert not [k for k in missing if not k.endswith("_extra_state")], missing
    inputs = torch.load(inputs_path, weights_only=True)
    from_checkpoint = dnascale_logits(model, inputs)
    for param in model.parameters():  # so (b) cannot pass by leaving (a)'s weights in place
        torch.nn.init.zeros_(param)
    load_init_weights(model, init_dir, recipe.name)
    from_init_dir = dnascale_logits(model, inputs)
    if rank == 0:
        torch.save({"checkpoint": from_checkpoint, "init_dir": from_init_dir}, out_path)


def cli_error(main, argv: list[str], capsys) -> str:
    """Run a tool's main() as its command line would; return its one-line error."""
    from dnascale.errors import run_cli

    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: main(argv))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.strip().splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


def same_directories(a: Path, b: Path) -> None:
    names_a = sorted(p.name for p in a.iterdir())
    assert names_a == sorted(p.name for p in b.iterdir())
    for name in names_a:
        assert (a / name).read_bytes() == (b / name).read_bytes(), f"{name} differs after the round trip"
