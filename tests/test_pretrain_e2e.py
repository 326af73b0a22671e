"""The product's main command, end to end, in real processes (deepspeed launcher, 2 gloo ranks)."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from parity import assert_parity, parity_seeds

REPO = Path(__file__).resolve().parents[1]
LAUNCHER = str(REPO / "launchers" / "pretrain.py")
ZERO3 = str(REPO / "ds_configs" / "zero3.json")
QUIET = ["--wandb-mode", "disabled", "--no-progress", "--eval-batches", "0"]

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A private shard cache shared by this module's runs (the first run also exercises the cache build)."""
    cache = tmp_path_factory.mktemp("cache")
    return dict(os.environ, DNASCALE_CACHE=str(cache), PYTHONUNBUFFERED="1", WANDB_MODE="disabled")


def deepspeed_cmd(n_ranks, *args):
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(n_ranks),
            "--master_port", str(random.randint(20000, 40000)), LAUNCHER, "--ds_config", ZERO3, *args]


def run(cmd, env, timeout=300):
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    return result


def losses(out_dir):
    records = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records]
    assert steps == sorted(set(steps)), f"each step logged once, in order: {steps}"
    return {r["step"]: r["loss"] for r in records}


def test_sigkill_after_checkpoint_then_resume_matches_uninterrupted_run(tmp_path, env):
    args = ["--steps", "8", "--save-every", "2", "--log-every", "100", *QUIET]
    reference = run(deepspeed_cmd(2, *args, "--out", str(tmp_path / "ref")), env)
    assert reference.returncode == 0, reference.stdout[-3000:] + reference.stderr[-3000:]
    expected = losses(tmp_path / "ref")
    assert sorted(expected) == list(range(1, 9))

    kill_at = random.Random(time.time_ns()).randint(3, 7)  # a step after the step-2 checkpoint, before the end
    out = tmp_path / "killed"
    proc = subprocess.Popen(deepspeed_cmd(2, *args, "--out", str(out)), env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and any(json.loads(l)["step"] >= kill_at for l in metrics.read_text().splitlines() if l):
            break
        time.sleep(0.02)
    assert proc.poll() is None, f"the run ended before step {kill_at}; cannot test the kill"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    latest = (out / "checkpoints" / "latest").read_text().strip()
    assert latest.startswith("step_") and int(latest[5:]) < 8, f"killed at step {kill_at}, latest {latest}"

    resumed = run(deepspeed_cmd(2, *args, "--out", str(out)), env)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"resumed from {latest}" in resumed.stdout
    got = losses(out)
    assert got == expected, f"killed at step {kill_at} (resumed from {latest}): per-step losses differ"


# float32 training through DeepSpeed, 3 AdamW steps: TP only reorders the sums (tests/parity.py), but Adam turns a
# last-bit difference in a near-zero gradient into a full-size update, so the bound is empirical: worst observed
# over 20 seeds (python tools/parity_sweep.py --seeds 20, 2-core CPU, 2026-12-04): 2.4e-7 absolute on losses ~2.8,
# 0.010 of this tolerance.
E2E_TP_TOL = dict(rtol=1e-5, atol=0.0)


def test_tensor_parallel_2_under_torchrun_matches_tp_1(tmp_path, env):
    # Gradient accumulation on both sides; torchrun here, the deepspeed launcher in the resume test.
    for seed in parity_seeds():
        args = ["--steps", "3", "--log-every", "100", "--micro-batch-size", "4", "--grad-accum", "2",
                "--seed", str(seed), *QUIET]
        single = run([sys.executable, LAUNCHER, "--ds_config", ZERO3, *args, "--out", str(tmp_path / f"tp1-{seed}")],
                     env)
        assert single.returncode == 0, single.stderr[-3000:]
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                    "--master_port", str(random.randint(20000, 40000)), LAUNCHER, "--ds_config", ZERO3]
        tp2 = run(torchrun + [*args, "--tp", "2", "--out", str(tmp_path / f"tp2-{seed}")], env)
        assert tp2.returncode == 0, tp2.stdout[-3000:] + tp2.stderr[-3000:]
        assert "dp 1 x tp 2" in tp2.stdout
        a, b = losses(tmp_path / f"tp1-{seed}"), losses(tmp_path / f"tp2-{seed}")
        assert sorted(a) == sorted(b) == [1, 2, 3]
        # Same full weights (CPU init depends on the seed only), same data.
        assert_parity(torch.tensor([b[step] for step in sorted(b)]), torch.tensor([a[step] for step in sorted(a)]),
                      test="pretrain_e2e_tp", what="losses of 3 AdamW steps", seed=seed, **E2E_TP_TOL)


NAN_SCRIPT = """
import sys, torch
from dnascale.errors import run_cli
from dnascale.models import registry
from dnascale.models.heads import MLMOutput
from dnascale.train.config import TrainConfig
from dnascale.train.loop import pretrain

bad_steps = {bad}
encoder = registry.get_recipe("encoder")

class Poisoned(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, 0
    def forward(self, *args, **kwargs):
        out = self.inner(*args, **kwargs)
        self.calls += 1
        loss = out.loss * float("nan") if self.calls in bad_steps else out.loss
        return MLMOutput(loss, out.num_targets, out.logits, metrics={{"forward_calls": float(self.calls)}})

registry.register(registry.ModelRecipe(
    name="poisoned", config_cls=encoder.config_cls, build=lambda c, p: Poisoned(encoder.build(c, p)),
    make_collator=encoder.make_collator, flops_per_token=encoder.flops_per_token, data_window=encoder.data_window,
    tokenizer=encoder.tokenizer))
import dnascale.train.loop as loop
loop.load_preset = lambda name, preset: registry.load_preset("encoder", preset)  # poisoned uses encoder presets
cfg = TrainConfig(model="poisoned", steps={steps}, out=sys.argv[1], eval_batches=0, wandb_mode="disabled",
                  progress=False, max_nonfinite_in_a_row=3, ds_config="{ds}")
run_cli(lambda: pretrain(cfg) and 0)
"""


def test_nonfinite_loss_skips_the_step_and_repeated_ones_abort(tmp_path, env):
    script = NAN_SCRIPT.format(bad={3, 4}, steps=6, ds=ZERO3)
    result = run([sys.executable, "-c", script, str(tmp_path / "a")], env)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(l) for l in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_nonfinite"] for r in records] == [0, 0, 1, 2, 2, 2]
    assert [r["forward_calls"] for r in records] == [1, 2, 3, 4, 5, 6], "model metrics are logged per step"
    assert all(r["loss"] == r["loss"] for i, r in enumerate(records) if i not in (2, 3)), "finite elsewhere"

    script = NAN_SCRIPT.format(bad=set(range(1, 100)), steps=6, ds=ZERO3)
    result = run([sys.executable, "-c", script, str(tmp_path / "b")], env)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "error: step 3: 3 non-finite losses in a row (3 in total); lower the LR or check the data")


def one_line_error(result):
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    lines = [l for l in result.stderr.strip().splitlines() if not l.startswith("[20")]  # deepspeed log lines
    assert "Traceback" not in result.stderr
    return lines[-1]


def test_user_mistakes_get_one_line_errors(tmp_path, env):
    base = [sys.executable, LAUNCHER, "--ds_config", ZERO3, *QUIET, "--steps", "2"]
    out = ["--out", str(tmp_path / "run")]
    assert one_line_error(run(base + out + ["--model", "gpt5"], env)).startswith("error: unknown model 'gpt5'")
    assert one_line_error(run(base + out + ["--preset", "huge"], env)).startswith("error: unknown preset 'huge'")
    assert "unknown field 'hiddn'" in one_line_error(run(base + out + ["--override", "hiddn=3"], env))
    pinned = tmp_path / "pinned.json"
    pinned.write_text(json.dumps(dict(json.loads(Path(ZERO3).read_text()), train_micro_batch_size_per_gpu=8)))
    message = one_line_error(run(base + out + ["--ds_config", str(pinned), "--micro-batch-size", "4"], env))
    assert "train_micro_batch_size_per_gpu is 8 but the command line asks for 4" in message
    message = one_line_error(run(base + out + ["--data", str(tmp_path / "nowhere")], env))
    assert "nowhere: data path does not exist" in message
    from dnascale.data.shards import ShardConfig, build_shards

    build_shards([REPO / "dnascale/genomes/scerevisiae_r64_chrI.fna.gz"], tmp_path / "wide", ShardConfig(window=1000),
                 progress=False)
    message = one_line_error(run(base + out + ["--data", str(tmp_path / "wide")], env))
    assert "shards hold 1000-base windows but this model takes at most 511" in message

    assert run(base + out, env).returncode == 0  # a good run with checkpoints at step 2
    tag_dir = tmp_path / "run" / "checkpoints" / "step_0000002"
    corrupt = tmp_path / "corrupt"
    shutil.copytree(tmp_path / "run", corrupt)
    victim = next((corrupt / "checkpoints" / "step_0000002").glob("*optim_states.pt"))
    victim.write_bytes(victim.read_bytes()[:100])
    message = one_line_error(run(base + ["--steps", "4", "--out", str(corrupt)], env))
    assert "optim_states.pt: size 100 bytes, expected" in message and "corrupt" in message

    info = json.loads((tag_dir / "dnascale_model.json").read_text())
    assert info["recipe"] == "encoder" and info["config"]["hidden"] == 128 and info["tokenizer"]["name"]
    other = tmp_path / "other_family"
    shutil.copytree(tmp_path / "run", other)
    other_tag = other / "checkpoints" / "step_0000002"
    (other_tag / "dnascale_model.json").write_text(json.dumps(dict(info, recipe="enbed")))
    marker = json.loads((other_tag / "COMPLETE").read_text())  # consistent, as a real enbed checkpoint's would be
    marker["files"]["dnascale_model.json"] = (other_tag / "dnascale_model.json").stat().st_size
    (other_tag / "COMPLETE").write_text(json.dumps(marker))
    message = one_line_error(run(base + ["--steps", "4", "--out", str(other)], env))
    assert "a 'enbed' checkpoint, but this run trains 'encoder'" in message

    (tag_dir / "COMPLETE").unlink()
    message = one_line_error(run(base + ["--steps", "4"] + out, env))
    assert message.endswith("step_0000002: partial checkpoint (no COMPLETE marker); it was not finished")


def test_wandb_offline_run_and_finished_run_is_a_no_op(tmp_path, env):
    cmd = [sys.executable, LAUNCHER, "--ds_config", ZERO3, "--no-progress", "--steps", "2", "--eval-every", "2",
           "--wandb-mode", "offline", "--out", str(tmp_path)]
    result = run(cmd, dict(env, WANDB_MODE="offline"))
    assert result.returncode == 0, result.stderr[-3000:]
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"step", "loss", "tokens_per_s", "val_loss", "lr", "step_time_s"} <= set(record)
    again = run(cmd, dict(env, WANDB_MODE="offline"))
    assert again.returncode == 0 and "already at step 2" in again.stdout
