#!/usr/bin/env python
"""Plot a collected, fitted sweep: loss vs FLOPs with fits and CI bands, the matched-FLOPs comparison, throughput.

    python tools/scaling/plot.py docs/scaling     # reads results.tsv + fits.json, writes the three PNGs there
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from dnascale.errors import DataError, run_cli  # noqa: E402


def main(argv=None) -> int:
    from dnascale.scaling import plots
    from dnascale.scaling.collect import read_tsv

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results_dir", help="a directory with results.tsv and fits.json")
    a = p.parse_args(argv)
    directory = Path(a.results_dir)
    rows = read_tsv(directory / "results.tsv")
    fits_path = directory / "fits.json"
    if not fits_path.is_file():
        raise DataError(f"{fits_path}: no such file (write it with tools/scaling/fit.py {directory})")
    fits = json.loads(fits_path.read_text())
    written = [directory / "loss_vs_flops.png", directory / "matched_flops.png", directory / "throughput.png"]
    plots.loss_vs_flops(rows, fits, written[0])
    plots.matched_flops(fits, written[1])
    plots.throughput(rows, written[2])
    print("wrote " + ", ".join(str(w) for w in written))
    return 0


if __name__ == "__main__":
    run_cli(main)
