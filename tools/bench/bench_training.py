#!/usr/bin/env python
"""Training throughput of presets under several ZeRO stages, measured back to back in one invocation.

    python tools/bench/bench_training.py --presets tiny base --stages 3 2 0 --steps 6 [--micro-batch-size 1]
        [--ranks 1] [--override max_seq_len=512] [--plot docs/img/train_throughput.png]

Each (preset, stage) runs `launchers/pretrain.py` in its own process on the bundled genomes; tokens/s is the median
over the steps after the first `--warmup` (which include one-time work). Ratios between rows of one run are what
holds on a noisy machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CONFIG_FOR_STAGE = {3: "zero3.json", 2: "zero2.json", 0: "stage0.json"}


def run_one(preset: str, stage: int, args: argparse.Namespace, workdir: Path) -> dict:
    config_path = REPO / "ds_configs" / CONFIG_FOR_STAGE[stage]
    out = workdir / f"run-{preset}-{stage}"
    launcher = [str(REPO / "launchers" / "pretrain.py"), "--ds_config", str(config_path), "--model", args.model,
                "--preset", preset, "--steps", str(args.steps), "--out", str(out), "--wandb-mode", "disabled",
                "--no-progress", "--eval-batches", "0", "--micro-batch-size", str(args.micro_batch_size), "--save-every", str(10**9), "--log-every", str(10**9)]
    for item in args.override:
        launcher += ["--override", item]
    if args.ranks > 1:
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(args.ranks), *launcher]
    else:
        cmd = [sys.executable, *launcher]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if result.returncode != 0:
        raise SystemExit(f"{preset} stage {stage} failed:\n{result.stderr[-3000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    timed = records[args.warmup:] or records
    return {
        "preset": preset,
        "stage": stage,
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in timed),
        "step_time_s": statistics.median(r["step_time_s"] for r in timed),
        "peak_mem_gib": max(r["peak_mem_gib"] for r in records),
        "mfu": statistics.median(r["mfu"] for r in timed) if "mfu" in timed[0] else None,
        "steps_timed": len(timed),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="encoder")
    p.add_argument("--presets", nargs="+", default=["tiny", "base"])
    p.add_argument("--stages", nargs="+", type=int, default=[3, 2, 0], choices=sorted(CONFIG_FOR_STAGE))
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--ranks", type=int, default=1)
    p.add_argument("--override", action="append", default=[])
    p.add_argument("--json", help="also write the rows to this file")
    p.add_argument("--plot", help="write a bar chart (PNG) of tokens/s")
    args = p.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.presets:
            for stage in args.stages:
                row = run_one(preset, stage, args, Path(tmp))
                rows.append(row)
                mfu = f"  mfu {row['mfu']:.1%}" if row["mfu"] is not None else ""
                print(f"{args.model}-{preset:<6} ZeRO-{stage}: {row['tokens_per_s']:>10,.0f} tok/s  "
                      f"{row['step_time_s']:.3f} s/step  peak {row['peak_mem_gib']:.2f} GiB{mfu}", flush=True)
    for preset in args.presets:
        base = next(r for r in rows if r["preset"] == preset and r["stage"] == args.stages[0])
        ratios = ", ".join(f"ZeRO-{r['stage']} {r['tokens_per_s'] / base['tokens_per_s']:.2f}x"
                           for r in rows if r["preset"] == preset)
        print(f"{preset}: relative to ZeRO-{args.stages[0]}: {ratios}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(args.presets), figsize=(4 * len(args.presets), 3.2), squeeze=False)
        for ax, preset in zip(axes[0], args.presets):
            mine = [r for r in rows if r["preset"] == preset]
            ax.bar([f"ZeRO-{r['stage']}" for r in mine], [r["tokens_per_s"] for r in mine], color="#4c72b0")
            ax.set_title(f"{args.model}-{preset}")
            ax.set_ylabel("tokens/s")
        fig.tight_layout()
        os.makedirs(os.path.dirname(args.plot) or ".", exist_ok=True)
        fig.savefig(args.plot, dpi=120)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
