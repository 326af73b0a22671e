#!/usr/bin/env python
"""Collect a sweep: one row per finished run (family, size, params, tokens, FLOPs, losses, bits/base, throughput).

    python tools/scaling/collect.py runs/scaling/cpu_mini --out docs/scaling

Writes OUT/results.tsv (what fit.py and plot.py read), OUT/table.md and OUT/throughput.md (tokens/s per device
against devices and layout). OUT defaults to the sweep directory. Unfinished runs are listed and left out.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from dnascale.errors import DataError, run_cli  # noqa: E402


def main(argv=None) -> int:
    import warnings

    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
    from dnascale.scaling.collect import collect, write_tsv
    from dnascale.scaling.tables import results_table, throughput_table

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("sweep_dir", help="the --out of tools/scaling/sweep.py")
    p.add_argument("--out", default=None, help="where results.tsv, table.md, throughput.md go (default: sweep_dir)")
    p.add_argument("--last-k", type=int, default=10, help="training losses averaged: the last k steps (<= steps/4)")
    a = p.parse_args(argv)
    collected = collect(a.sweep_dir, a.last_k)
    if not collected.rows:
        raise DataError(f"{a.sweep_dir}: no finished runs to collect (unfinished: {len(collected.unfinished)})")
    out = Path(a.out or a.sweep_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_tsv(collected.rows, out / "results.tsv")
    table = results_table(collected.rows)
    (out / "table.md").write_text(table)
    (out / "throughput.md").write_text(throughput_table(collected.rows))
    print(table)
    if collected.unfinished:
        print(f"left out {len(collected.unfinished)} unfinished: {', '.join(collected.unfinished)}")
    print(f"{len(collected.rows)} rows: {out / 'results.tsv'}, {out / 'table.md'}, {out / 'throughput.md'}")
    return 0


if __name__ == "__main__":
    run_cli(main)
