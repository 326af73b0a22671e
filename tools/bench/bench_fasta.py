#!/usr/bin/env python
"""Throughput of the streaming FASTA reader.

    python tools/bench/bench_fasta.py PATH [--softmask] [--repeat N]

Times `dnascale.data.fasta.read_segments` over PATH (decompression, cleaning and segment building included) and
prints bases read and Mbp/s (best of --repeat runs), then the cleaning report.
"""

from __future__ import annotations

import argparse
import time

from dnascale.data.fasta import CleaningPolicy, CleaningReport, read_segments
from dnascale.errors import run_cli


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("path", help="FASTA or gzipped FASTA file")
    p.add_argument("--softmask", action="store_true", help="also build the per-base soft-mask track")
    p.add_argument("--repeat", type=int, default=3, help="runs to time; the best is reported (default 3)")
    args = p.parse_args()
    policy = CleaningPolicy(keep_softmask=args.softmask)
    best, report = float("inf"), CleaningReport()
    for _ in range(max(1, args.repeat)):
        report = CleaningReport()
        start = time.perf_counter()
        for _segment in read_segments(args.path, policy, report):
            pass
        best = min(best, time.perf_counter() - start)
    report.check()
    print(f"{args.path}: {report.bases_read:,} bases read in {best:.3f} s = {report.bases_read / best / 1e6:.1f} Mbp/s")
    print(report.summary())
    return 0


if __name__ == "__main__":
    run_cli(main)
