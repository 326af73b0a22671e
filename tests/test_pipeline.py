"""Pipeline parallelism (--pp): the encoder's layer split, and the launcher under 2 gloo ranks.

The split's own checks run in this process (a world of one). The launcher runs: one --pp 1 run in this process,
three --pp 2 runs as real 2-rank launches (the deepspeed launcher for the reference and the killed run, torchrun
for the resumed one), all on a small S. cerevisiae shard set with 127-base windows.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from finetune_helpers import child_env, load_script

REPO = Path(__file__).resolve().parents[1]
LAUNCHER = str(REPO / "launchers" / "pretrain.py")
PIPELINE = str(REPO / "ds_configs" / "zero1_pipeline.json")
ZERO3 = str(REPO / "ds_configs" / "zero3.json")
MAX_SEQ_LEN = 128  # 127-base windows + [SEP]
STEPS, SAVE_EVERY = 6, 2
# Two micro-batches per step, so DeepSpeed's pipeline schedule really interleaves stages; an eval mid-run and at
# the end (eval_batch through the pipe); checkpoints at 2, 4, 6.
ARGS = ["--ds_config", PIPELINE, "--override", f"max_seq_len={MAX_SEQ_LEN}", "--steps", str(STEPS),
        "--save-every", str(SAVE_EVERY), "--micro-batch-size", "4", "--grad-accum", "2", "--eval-every", "3",
        "--eval-batches", "2", "--num-workers", "0", "--log-every", "100", "--wandb-mode", "disabled",
        "--no-progress"]


def _config(**overrides):
    from dnascale.models.registry import load_preset

    return dataclasses.replace(load_preset("encoder", "tiny"), **overrides)


# ---------------------------------------------------------------------------------------------------- the split


def test_split_builds_the_unsplit_models_weights_and_loss(parallel):
    """Replayed init gives EncoderForMLM's weights tensor for tensor (whatever order the stages build in), the key
    map covers its state dict exactly, and the layers run in sequence give its loss (float64: equal to rounding)."""
    from dnascale.models.encoder_pipeline import decode
    from dnascale.models.registry import get_recipe
    from dnascale.parallel import seed_everything
    from dnascale.train.pipeline import replay_init

    recipe = get_recipe("encoder")
    config = _config(position="learned", layers=3, max_seq_len=32, hidden=32, heads=4, ffn_hidden=64)
    torch.set_default_dtype(torch.float64)
    try:
        seed_everything(7)
        model = recipe.build(config, parallel).eval()
        split = recipe.pipeline_split(config)
        outer = torch.get_rng_state()
        specs = replay_init(split.layers, seed=7)
        assert torch.equal(outer, torch.get_rng_state()), "replay_init leaves the caller's generator alone"
        modules = {i: specs[i].build() for i in reversed(range(len(specs)))}  # the last stage builds first
    finally:
        torch.set_default_dtype(torch.float32)

    expected = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    got = {}
    for index, module in modules.items():
        if getattr(specs[index], "forward_fn", None) is None:  # the tied decode reuses layer 0's table
            got.update({split.model_key(index, k): v for k, v in module.state_dict().items()
                        if isinstance(v, torch.Tensor)})
    assert sorted(got) == sorted(expected)
    for key, value in expected.items():
        assert torch.equal(got[key], value), key

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(4, config.vocab_size, (3, 24), generator=gen)
    mask = torch.arange(24)[None, :] < torch.tensor([24, 17, 9])[:, None]
    labels = torch.where((torch.rand(3, 24, generator=gen) < 0.3) & mask, ids, torch.full_like(ids, -100))
    x = (ids, mask.to(torch.long))
    with torch.no_grad():
        for index in range(len(specs)):
            x = decode(modules[0], x) if getattr(specs[index], "forward_fn", None) else modules[index].eval()(x)
        out = split.loss_fn(x, labels)
        reference = model(ids, mask, labels)
    assert out.num_targets == reference.num_targets
    assert float(out.loss) == pytest.approx(float(reference.loss), rel=1e-12)


def test_unsupported_pipeline_settings_are_one_line_errors(tmp_path, parallel, capsys):
    launcher = load_script("launchers/pretrain.py", "pretrain_launcher_pp")
    from dnascale.errors import run_cli

    def error(*args) -> str:
        with pytest.raises(SystemExit) as exit_info:
            run_cli(lambda: launcher.main([*args, "--out", str(tmp_path), "--wandb-mode", "disabled"]))
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err
        lines = err.strip().splitlines()
        assert len(lines) == 1, lines
        return lines[0]

    assert error("--ds_config", ZERO3, "--pp", "2") == (
        f"error: {ZERO3}: ZeRO stage 3 cannot run with --pp 2 (DeepSpeed's pipeline engine takes ZeRO stage 0 or "
        f"1); use --ds_config ds_configs/zero1_pipeline.json")
    assert error("--ds_config", PIPELINE, "--pp", "2", "--model", "dnazen").startswith(
        "error: --pp > 1 is supported for: encoder (not 'dnazen')")


# ---------------------------------------------------------------------------------------------------- launches


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from dnascale.data.shards import ShardConfig, build_shards

    out = tmp_path_factory.mktemp("pp") / "shards"
    build_shards([REPO / "dnascale/genomes/scerevisiae_r64_chrI.fna.gz"], out,
                 ShardConfig(window=MAX_SEQ_LEN - 1, tokenizer="nucleotide-char", val_fraction=0.05), progress=False)
    return out


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return dict(child_env(tmp_path_factory.mktemp("cache")), PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")


def _deepspeed(*args):
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port",
            str(random.randint(20000, 40000)), LAUNCHER, *args]


def _torchrun(*args):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
            str(random.randint(20000, 40000)), LAUNCHER, *args]


def _records(out: Path) -> dict[int, dict]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records]
    assert steps == sorted(set(steps)), f"each step logged once, in order: {steps}"
    return {r["step"]: r for r in records}


def _ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def pp2_run(tmp_path_factory, shards, env):
    """The uninterrupted --pp 2 run, with the documented command (deepspeed launcher)."""
    out = tmp_path_factory.mktemp("pp") / "pp2"
    result = _ok(subprocess.run(_deepspeed(*ARGS, "--data", str(shards), "--pp", "2", "--out", str(out)), env=env,
                                capture_output=True, text=True, timeout=300, cwd=REPO))
    return out, result.stdout


def _layer_weights(tag_dir: Path) -> dict[str, torch.Tensor]:
    from dnascale.models.encoder_pipeline import model_key

    key = model_key(_config(max_seq_len=MAX_SEQ_LEN))
    weights = {}
    for path in sorted(tag_dir.glob("layer_*-model_states.pt")):
        index = int(path.name.split("-")[0].removeprefix("layer_"))
        for name, value in torch.load(path, weights_only=True).items():
            if isinstance(value, torch.Tensor):
                weights[key(index, name)] = value
    return weights


@pytest.mark.distributed
def test_pp2_matches_pp1(tmp_path, parallel, shards, pp2_run):
    out2, stdout = pp2_run
    assert "(dp 1 x tp 1 x pp 2)" in stdout and "pipeline stages 0: layers 0-" in stdout
    launcher = load_script("launchers/pretrain.py", "pretrain_launcher_pp1")
    out1 = tmp_path / "pp1"
    assert launcher.main([*ARGS, "--data", str(shards), "--out", str(out1)]) == 0  # this process: --pp 1
    one, two = _records(out1), _records(out2)
    assert sorted(one) == sorted(two) == list(range(1, STEPS + 1))
    # Same initial weights (replayed init), data, masking and global batch, in float32: the pipeline only changes
    # summation orders (head GEMM over all positions instead of the targets, the tied table's two gradient terms
    # summed by an all-reduce, the grad-norm partial sums). Measured worst |loss difference| over the 6 steps:
    # 1.28e-07 (relative 6.3e-08) on losses of 2.0-2.9, val_loss 1.23e-07; rel=1e-5 leaves >100x room for other
    # BLAS builds and thread counts.
    for step in one:
        assert two[step]["loss"] == pytest.approx(one[step]["loss"], rel=1e-5), step
        tokens = [r[step]["tokens_per_s"] * r[step]["step_time_s"] for r in (one, two)]
        assert tokens[1] == pytest.approx(tokens[0], rel=1e-9), "tokens per step counted once per pipeline"
    for step in (3, 6):
        assert two[step]["val_loss"] == pytest.approx(one[step]["val_loss"], rel=1e-5), step

    # The final weights, read back from the per-layer files through the split's key map (measured worst
    # |difference| after 6 steps: 6.2e-08; Adam's normalised updates keep it at float32 rounding level).
    tag = "step_0000006"
    whole = torch.load(out1 / "checkpoints" / tag / "mp_rank_00_model_states.pt", weights_only=True)["module"]
    layered = _layer_weights(out2 / "checkpoints" / tag)
    expected = {k: v for k, v in whole.items() if isinstance(v, torch.Tensor)}
    assert sorted(layered) == sorted(expected)
    for key, value in expected.items():
        torch.testing.assert_close(layered[key], value, rtol=1e-4, atol=1e-6, msg=key)

    # The converter reads the --pp 1 run's ZeRO-1 checkpoint (module states in mp_rank_00_model_states.pt, not in
    # per-DP-rank files as under ZeRO-3): its fp32 weights are the module's, exactly (fp32 training).
    from dnascale.convert.consolidate import consolidate

    consolidated = consolidate(out1, progress=False)
    assert consolidated.step == STEPS and sorted(consolidated.state_dict) == sorted(expected)
    for key, value in expected.items():
        torch.testing.assert_close(consolidated.state_dict[key], value, rtol=0, atol=0, msg=key)


@pytest.mark.distributed
def test_pp2_killed_after_a_checkpoint_resumes_exactly(tmp_path, shards, env, pp2_run):
    reference, _ = pp2_run
    out = tmp_path / "killed"
    args = [*ARGS, "--data", str(shards), "--pp", "2", "--out", str(out)]
    # The deepspeed launcher keeps its ranks in its process group, so killing the group kills them all (torchrun
    # starts each rank in a session of its own).
    proc = subprocess.Popen(_deepspeed(*args), env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    latest = out / "checkpoints" / "latest"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not latest.exists():
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before its first checkpoint was complete; cannot test the kill"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    tag = latest.read_text().strip()
    assert int(tag.removeprefix("step_")) < STEPS, f"killed too late: {tag}"

    resumed = _ok(subprocess.run(_torchrun(*args), env=env, capture_output=True, text=True, timeout=300, cwd=REPO))
    assert f"resumed from {tag}" in resumed.stdout
    got, expected = _records(out), _records(reference)
    assert {s: r["loss"] for s, r in got.items()} == {s: r["loss"] for s, r in expected.items()}
    assert {s: r.get("val_loss") for s, r in got.items()} == {s: r.get("val_loss") for s, r in expected.items()}
    final = f"step_{STEPS:07d}"
    mine, theirs = _layer_weights(out / "checkpoints" / final), _layer_weights(reference / "checkpoints" / final)
    assert sorted(mine) == sorted(theirs)
    for key in theirs:
        assert torch.equal(mine[key], theirs[key]), key
