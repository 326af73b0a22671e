#!/usr/bin/env python
"""Inference throughput of tools/infer.py per family (bases of genome per second), on CPU or GPU.

    python tools/bench/infer.py --fasta dnascale/genomes/scerevisiae_r64_chrI.fna.gz --bases 20000 \\
        --families encoder enbed dnazen dnachunker --threads 1 --checkpoint dnachunker=/tmp/chunker

For each family (its tiny preset with random weights, unless --checkpoint FAMILY=PATH names trained ones) the
first --bases of the FASTA's first record go through the real driver (dnascale.infer.run.infer: tiling at the
model's training window and half-window stride, batching, stitching, zarr writing) once per mode:
    embeddings   one unmasked pass per window (+ boundaries for DNACHUNKER: the same pass)
    mlm_score    the k masked passes per window (k = round(1 / mask rate) = 7)
A first, untimed run over one window loads the model and warms up kernels; model loading is not timed.
Reported: bases per wall-clock second and bases per CPU-second of this process (with --threads 1 the latter is
what one dedicated core delivers; the wall clock on a shared machine also measures the neighbours), and the
1-minute load average. Prints a markdown table and, with --json, writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

MODES = {"embeddings": ("embeddings",), "mlm_score": ("mlm_score",)}


def _random_init_dir(family: str, out: Path) -> Path:
    import torch

    from dnascale.data.tokenizers import load_tokenizer
    from dnascale.hf.load import HFCheckpoint, write_init_dir
    from dnascale.models.registry import get_recipe, load_preset

    recipe = get_recipe(family)
    config = load_preset(family, "tiny")
    torch.manual_seed(0)
    model = recipe.build(config, None)
    tokenizer = load_tokenizer(recipe.tokenizer)
    info = {"name": tokenizer.name, "spec": recipe.tokenizer, "vocab_size": tokenizer.vocab_size}
    state = {k: v.detach() for k, v in model.state_dict().items() if v is not None}
    return write_init_dir(HFCheckpoint(out, recipe, "tiny", config, info, state), out, tp=1, progress=False)


def _first_record(fasta: str, bases: int) -> tuple[str, str]:
    from dnascale.data.fasta import read_segments
    from dnascale.infer.run import POLICY

    segment = next(iter(read_segments(fasta, POLICY)))
    return segment.record, segment.seq[:bases].decode()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fasta", default=str(REPO / "dnascale" / "genomes" / "scerevisiae_r64_chrI.fna.gz"))
    p.add_argument("--bases", type=int, default=20_000)
    p.add_argument("--families", nargs="+", default=["encoder", "enbed", "dnazen", "dnachunker"])
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--checkpoint", action="append", default=[], metavar="FAMILY=PATH")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)
    import warnings

    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
    import torch

    from dnascale.infer.backbone import load_model, resolve_device
    from dnascale.infer.run import InferConfig, infer
    from dnascale.parallel import init_distributed

    if a.threads:
        torch.set_num_threads(a.threads)
    init_distributed(tp=1, seed=0)
    given = dict(item.split("=", 1) for item in a.checkpoint)
    work = Path(tempfile.mkdtemp(prefix="bench_infer_"))
    rows = []
    try:
        record, seq = _first_record(a.fasta, a.bases)
        length = len(seq)
        (work / "slice.fa").write_text(f">{record}\n{seq}\n")
        for family in a.families:
            checkpoint = given.get(family) or str(_random_init_dir(family, work / f"{family}-init"))
            model = load_model(checkpoint, resolve_device(a.device))
            window = model.runner.max_window
            warm = work / "warm.fa"
            warm.write_text(f">{record}\n{seq[:window]}\n")
            for mode in a.modes:
                what = MODES[mode] + (("boundaries",) if mode == "embeddings" and model.runner.has_boundaries else ())
                common = dict(what=what, batch_size=a.batch_size, dtype=a.dtype, device=a.device, progress=False)
                infer(InferConfig(checkpoint, str(warm), str(work / "warm.zarr"), **common), model=model)
                shutil.rmtree(work / "warm.zarr")
                wall, cpu = time.perf_counter(), time.process_time()
                infer(InferConfig(checkpoint, str(work / "slice.fa"), str(work / f"{family}-{mode}.zarr"), **common),
                      model=model)
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                row = {"family": family, "mode": "+".join(what), "checkpoint": "random" if family not in given
                       else given[family], "window": window, "bases": length, "batch_size": a.batch_size,
                       "threads": torch.get_num_threads(), "device": a.device, "wall_s": round(wall, 2),
                       "bases_per_s": round(length / wall), "bases_per_cpu_s": round(length / cpu),
                       "load_1min": round(os.getloadavg()[0], 1)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("\n| family | output | weights | window | bp/s (wall) | bp per CPU-second | load |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['family']} | {r['mode']} | {r['checkpoint']} | {r['window']} | {r['bases_per_s']:,} | "
              f"{r['bases_per_cpu_s']:,} | {r['load_1min']} |")
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
