"""Universal resume: a ZeRO-3 checkpoint continued at another data-parallel / tensor-parallel size, Adam included.

Each resumed run must log the same per-step losses (and LRs) as the uninterrupted run from the checkpoint on:
the first resumed step checks weights and data, the next ones the resharded Adam moments and step count.
"""

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dnascale.data.streams import StreamSet, deal
from dnascale.errors import DataError

REPO = Path(__file__).resolve().parents[1]
LAUNCHER = str(REPO / "launchers" / "pretrain.py")
ZERO3 = str(REPO / "ds_configs" / "zero3.json")
COMMON = ["--ds_config", ZERO3, "--wandb-mode", "disabled", "--no-progress", "--eval-batches", "0",
          "--log-every", "100", "--steps", "6", "--save-every", "2", "--micro-batch-size", "4"]


def _port() -> str:
    return str(random.randint(20000, 40000))


def torchrun_2(*args):  # 2 gloo ranks (tests/test_pretrain_e2e.py covers the deepspeed launcher)
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", _port(),
            LAUNCHER, *COMMON, *args]


def single(*args):
    return [sys.executable, LAUNCHER, *COMMON, *args]


def run(cmd, env):
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    return result


def ok(result):
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def records(out_dir):
    return {r["step"]: r for r in map(json.loads, (Path(out_dir) / "metrics.jsonl").read_text().splitlines())}


def from_checkpoint(source_run: Path, step: int, dest: Path) -> Path:
    """A fresh --out holding only `source_run`'s checkpoint at `step`, as `latest`."""
    tag = f"step_{step:07d}"
    (dest / "checkpoints").mkdir(parents=True)
    shutil.copytree(source_run / "checkpoints" / tag, dest / "checkpoints" / tag)
    (dest / "checkpoints" / "latest").write_text(tag)
    return dest


def assert_same_steps(reference, resumed, steps):
    assert sorted(resumed) == steps, f"the resumed run logged steps {sorted(resumed)}"
    for step in steps:
        assert resumed[step]["lr"] == pytest.approx(reference[step]["lr"], rel=1e-12), step
        assert abs(resumed[step]["loss"] - reference[step]["loss"]) < 1e-4, (step, resumed[step], reference[step])


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return dict(os.environ, DNASCALE_CACHE=str(cache), PYTHONUNBUFFERED="1", WANDB_MODE="disabled")


@pytest.fixture(scope="module")
def dp2_run(tmp_path_factory, env):
    out = tmp_path_factory.mktemp("dp2")
    ok(run(torchrun_2("--out", str(out)), env))  # DP2 x ZeRO-3, grad_accum 1: global batch 8
    return out


@pytest.mark.distributed
def test_dp2_to_dp1_and_back_to_dp2_continue_the_uninterrupted_run(dp2_run, env, tmp_path):
    reference = records(dp2_run)
    # DP1 keeps the global batch with grad_accum 2: old rank 0's micro-batch, then old rank 1's.
    dp1 = from_checkpoint(dp2_run, 2, tmp_path / "dp1")
    result = ok(run(single("--grad-accum", "2", "--out", str(dp1)), env))
    assert "world 1 (dp 1 x tp 1 x pp 1)" in result.stdout and "resumed from step_0000002" in result.stdout
    assert_same_steps(reference, records(dp1), [3, 4, 5, 6])
    assert not list(dp1.glob("reshard-*")), "the resharding work directory is removed after the load"
    # The DP1 run's checkpoints hold the original two streams: DP1 resumes them as they are ...
    again = from_checkpoint(dp1, 4, tmp_path / "again")
    ok(run(single("--grad-accum", "2", "--out", str(again)), env))
    assert_same_steps(reference, records(again), [5, 6])
    # ... and DP2 takes them back exactly.
    back = from_checkpoint(dp1, 4, tmp_path / "back")
    ok(run(torchrun_2("--out", str(back)), env))
    assert_same_steps(reference, records(back), [5, 6])


@pytest.mark.distributed
def test_tp2_to_tp1_continues_the_uninterrupted_run(env, tmp_path):
    tp2 = tmp_path / "tp2"
    result = ok(run(torchrun_2("--tp", "2", "--grad-accum", "2", "--out", str(tp2)), env))
    assert "dp 1 x tp 2" in result.stdout
    tp1 = from_checkpoint(tp2, 2, tmp_path / "tp1")
    ok(run(single("--grad-accum", "2", "--out", str(tp1)), env))
    assert_same_steps(records(tp2), records(tp1), [3, 4, 5, 6])


@pytest.mark.distributed
def test_a_resume_that_would_change_the_global_batch_is_a_one_line_error(dp2_run, env, tmp_path):
    out = from_checkpoint(dp2_run, 2, tmp_path / "bad")
    result = run(single("--grad-accum", "1", "--out", str(out)), env)  # global batch 4, the run had 8
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    last = [l for l in result.stderr.strip().splitlines() if not l.startswith("[20")][-1]
    assert last.startswith("error: ") and "step_0000002" in last
    assert "global batch 8" in last and "this run has 4; use --grad-accum 2 at dp=1" in last, last


def _streams(n, per_stream=1, micro=4):
    state = {"batch_size": micro}
    return StreamSet(tuple(dict(state, rank=i) for i in range(n)), per_stream)


def test_streams_are_dealt_in_contiguous_groups_in_rank_order():
    streams = _streams(4)
    assert [s["rank"] for s in deal(streams, 0, 2, 4, 2, "ckpt").streams] == [0, 1]
    assert [s["rank"] for s in deal(streams, 1, 2, 4, 2, "ckpt").streams] == [2, 3]
    assert [s["rank"] for s in deal(streams, 0, 1, 4, 4, "ckpt").streams] == [0, 1, 2, 3]


@pytest.mark.parametrize("dp, micro, accum, message", [
    (2, 4, 1, "ckpt: its 1 data streams do not split over dp=2 ranks"),
    (1, 2, 4, "ckpt: written with micro-batch size 4, this run has 2"),
    (1, 4, 1, "ckpt: global batch 8 (micro 4 x 2 x 1 streams), this run has 4; use --grad-accum 2 at dp=1"),
])
def test_impossible_reshards_are_one_line_errors(dp, micro, accum, message):
    with pytest.raises(DataError) as err:
        deal(_streams(1, per_stream=2), 0, dp, micro, accum, "ckpt")
    assert str(err.value).startswith(message) and "\n" not in str(err.value)
