"""Throughput of the resumable shard loader over a shard directory: samples/s, tokens/s and Mbp/s.

    python tools/bench/bench_loader.py DIR [--split train] [--batch-size 64] [--workers 4] [--seconds 30]

The collate pads ids into a LongTensor, as a real collator would, and counts bases from meta (end - start, or the
number of ids when meta has no coordinates). The first batch (worker start-up + first shard read) is timed apart.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from dnascale.data.loader import ResumableLoader, ShardDataset
from dnascale.errors import run_cli


def _bases(sample: dict) -> int:
    meta = sample["meta"]
    if isinstance(meta.get("start"), int) and isinstance(meta.get("end"), int):
        return meta["end"] - meta["start"]
    return len(sample["ids"])


def pad_collate(samples: list[dict]) -> dict:
    """Runs in the workers: pad to the longest sample and count what the batch holds."""
    length = max(len(s["ids"]) for s in samples)
    ids = torch.zeros(len(samples), length, dtype=torch.long)
    for row, sample in enumerate(samples):
        ids[row, : len(sample["ids"])] = sample["ids"]
    return {"ids": ids, "tokens": sum(len(s["ids"]) for s in samples), "bases": sum(_bases(s) for s in samples)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path, help="shard directory (with manifest.json)")
    parser.add_argument("--split", default="train")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=30.0, help="measure for this long after the first batch")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-shuffle", action="store_true")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    return parser.parse_args(argv)


def bench(args: argparse.Namespace) -> dict:
    dataset = ShardDataset(
        args.directory, args.split, rank=0, world_size=1, seed=args.seed, shuffle=not args.no_shuffle, infinite=True
    )
    loader = ResumableLoader(dataset, args.batch_size, pad_collate, num_workers=args.workers)
    start = time.perf_counter()
    stream = iter(loader)
    next(stream)
    first_batch_s = time.perf_counter() - start
    samples = tokens = bases = batches = 0
    begin = time.perf_counter()
    while (elapsed := time.perf_counter() - begin) < args.seconds:
        batch = next(stream)
        samples += len(batch["ids"])
        tokens += batch["tokens"]
        bases += batch["bases"]
        batches += 1
    stream.close()
    elapsed = max(elapsed, 1e-9)
    return {
        "directory": str(args.directory),
        "split": args.split,
        "batch_size": args.batch_size,
        "workers": args.workers,
        "dataset_samples": dataset.num_samples,
        "first_batch_s": round(first_batch_s, 3),
        "seconds": round(elapsed, 3),
        "batches": batches,
        "samples_per_s": samples / elapsed,
        "tokens_per_s": tokens / elapsed,
        "mbp_per_s": bases / elapsed / 1e6,
        "epochs_seen": loader.state_dict()["workers"][0]["epoch"],
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = bench(args)
    if args.json:
        print(json.dumps(result))
        return 0
    print(
        f"{result['directory']} [{result['split']}] batch {result['batch_size']}, {result['workers']} workers, "
        f"{result['batches']} batches in {result['seconds']:.1f} s (first batch {result['first_batch_s']:.2f} s)"
    )
    print(
        f"{result['samples_per_s']:,.0f} samples/s  {result['tokens_per_s'] / 1e6:,.2f} Mtok/s  "
        f"{result['mbp_per_s']:,.2f} Mbp/s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
