"""HF weights -> tools/convert_from_hf.py -> `launchers/pretrain.py --init-from` at TP=2 and at DP=2 under ZeRO-3.

A run with a vanishing learning rate (1e-30: every update is far below one ulp of the weights) must checkpoint
exactly the weights it was initialised from, so the consolidated checkpoint equals the HF export bit for bit.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys

import pytest
import torch

from hf_helpers import LAUNCHER, QUIET, REPO, ZERO3

pytestmark = pytest.mark.distributed
RECIPE = "encoder"
FROZEN = ["--lr", "1e-30", "--weight-decay", "0", "--warmup-steps", "0"]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """An encoder-tiny export with random weights (no zeros: a zero would move by the 1e-30 update)."""
    from dnascale.convert.consolidate import ConsolidatedCheckpoint
    from dnascale.convert.tp_layout import TPLayout
    from dnascale.hf.export import ExportOptions, export_hf
    from dnascale.models.registry import get_recipe, load_preset

    recipe, config = get_recipe(RECIPE), load_preset(RECIPE, "tiny")
    generator = torch.Generator().manual_seed(1234)
    layout = TPLayout.of_recipe(recipe, config)
    state = {name: 0.05 + 0.02 * torch.randn(shape, generator=generator) for name, shape in layout.shapes.items()}
    consolidated = ConsolidatedCheckpoint(
        tag_dir=tmp_path_factory.mktemp("made"), recipe=recipe, preset="tiny", config=config,
        tokenizer={"name": "nucleotide-char", "spec": "nucleotide-char", "vocab_size": 16}, state_dict=state, step=0,
        source_topology={"world_size": 1, "tp": 1, "pp": 1, "dp": 1})
    return export_hf(consolidated, tmp_path_factory.mktemp("hf"), ExportOptions(progress=False)), state


def _env(tmp_path):
    inherited = {k: v for k, v in os.environ.items()
                 if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    return dict(inherited, DNASCALE_CACHE=str(tmp_path / "cache"), WANDB_MODE="disabled", OMP_NUM_THREADS="1")


def _from_hf(hf, out, tp):
    from dnascale.hf.load import read_hf, write_init_dir

    return write_init_dir(read_hf(hf), out, tp=tp, progress=False)


def test_init_from_at_tp2_and_at_dp2_zero3_starts_from_the_hf_weights(hf_dir, tmp_path):
    from dnascale.convert.consolidate import consolidate

    hf, state = hf_dir
    env = _env(tmp_path)
    port = random.randint(20000, 39000)
    runs = {
        "tp2": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
                LAUNCHER, "--ds_config", ZERO3, *QUIET, *FROZEN, "--tp", "2",
                "--init-from", str(_from_hf(hf, tmp_path / "init-tp2", 2)), "--out", str(tmp_path / "tp2")],
        "dp2": [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(port + 1),
                LAUNCHER, "--ds_config", ZERO3, *QUIET, *FROZEN,
                "--init-from", str(_from_hf(hf, tmp_path / "init-tp1", 1)), "--out", str(tmp_path / "dp2")],
    }
    for kind, command in runs.items():
        result = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        trained = consolidate(tmp_path / kind, progress=False)
        assert trained.source_topology["tp"] == (2 if kind == "tp2" else 1)
        assert sorted(trained.state_dict) == sorted(state)
        for name, tensor in state.items():
            assert torch.equal(trained.state_dict[name], tensor), f"{kind}: {name} is not the HF weight"


def test_init_from_written_for_another_tp_size_is_a_one_line_error(hf_dir, tmp_path):
    hf, _ = hf_dir
    init = _from_hf(hf, tmp_path / "init-tp2", 2)
    result = subprocess.run([sys.executable, LAUNCHER, "--ds_config", ZERO3, *QUIET, "--init-from", str(init),
                             "--out", str(tmp_path / "run")], env=_env(tmp_path), cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "written for tp=2, this run has tp=1" in last
