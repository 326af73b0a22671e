#!/usr/bin/env python
"""Shard-building throughput: Mbp/s per core for one FASTA (one worker = one core).

    python tools/bench/bench_shards.py /path/genome.fa.gz [--window 1024] [--tokenizer nucleotide] [--repeat 3]

Reports the best and median of --repeat builds (the same input, a fresh output each time) and, for reference in the
same run, the FASTA read alone, so the ratio (build / read) is comparable across noisy machines.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

from dnascale.data.fasta import CleaningReport, read_segments
from dnascale.data.shards import ShardConfig, build_shards


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("fasta")
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--tokenizer", default="nucleotide")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--reverse-complement", action="store_true")
    a = p.parse_args()

    read_times = []
    for _ in range(a.repeat):
        report = CleaningReport()
        start = time.perf_counter()
        for _segment in read_segments(a.fasta, report=report):
            pass
        read_times.append(time.perf_counter() - start)
    bases = report.bases_read

    build_times = []
    config = ShardConfig(window=a.window, tokenizer=a.tokenizer, reverse_complement=a.reverse_complement)
    for _ in range(a.repeat):
        with tempfile.TemporaryDirectory() as out:
            start = time.perf_counter()
            manifest = build_shards([a.fasta], out, config, progress=False)
            build_times.append(time.perf_counter() - start)
    windows = manifest["windows"]["train"] + manifest["windows"]["validation"]
    best, median = min(build_times), statistics.median(build_times)
    print(f"input {a.fasta}: {bases / 1e6:.2f} Mbp, {windows:,} windows of {a.window} bp, tokenizer {a.tokenizer}")
    print(f"fasta read only : best {bases / min(read_times) / 1e6:7.1f} Mbp/s")
    print(f"shard build     : best {bases / best / 1e6:7.1f} Mbp/s  median {bases / median / 1e6:7.1f} Mbp/s "
          f"(1 worker = 1 core; build/read time ratio {best / min(read_times):.1f})")


if __name__ == "__main__":
    main()
