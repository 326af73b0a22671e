#!/usr/bin/env python
"""Fit loss against compute per family, L(C) = a * C^(-b) (+ E), with bootstrap CIs; compare at matched FLOPs.

    python tools/scaling/fit.py docs/scaling                       # reads results.tsv, writes fits.json
    python tools/scaling/fit.py docs/scaling --form offset --bootstrap 1000 --seed 0 --at-flops 1e14

The loss is bits per base of the MLM training loss (docs/scaling.md, "What is compared"). fits.json holds per
family a, b, E with their CIs, the compute-optimal frontier and a CI band; and each family's fitted loss at one
common compute budget (by default the middle of the range all families cover).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from dnascale.errors import ConfigError, run_cli  # noqa: E402


def main(argv=None) -> int:
    from dnascale.scaling.collect import read_tsv
    from dnascale.scaling.fit import FORMS, fit_rows

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results_dir", help="a directory with results.tsv (tools/scaling/collect.py --out)")
    p.add_argument("--form", choices=FORMS, default="power", help="power: a C^-b; offset: a C^-b + E")
    p.add_argument("--bootstrap", type=int, default=1000, help="resamples of the runs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--level", type=float, default=0.95, help="confidence level of the intervals")
    p.add_argument("--at-flops", type=float, default=None, help="matched compute budget (default: common range)")
    a = p.parse_args(argv)
    if a.bootstrap < 1 or not 0 < a.level < 1:
        raise ConfigError("--bootstrap must be >= 1 and --level in (0, 1)")
    directory = Path(a.results_dir)
    fits = fit_rows(read_tsv(directory / "results.tsv"), a.form, a.bootstrap, a.seed, a.at_flops, a.level)
    (directory / "fits.json").write_text(json.dumps(fits, indent=1) + "\n")
    level = int(100 * a.level)
    print(f"{fits['formula']}, C in FLOPs, L in bits/base; {level}% bootstrap CIs ({a.bootstrap} resamples)")
    def ci(interval, fmt):
        return f" [{interval[0]:{fmt}}, {interval[1]:{fmt}}]" if interval else " (no CI)"

    for name, f in fits["families"].items():
        extra = f", E = {f['E']:.4f}{ci(f['E_ci'], '.4f')}" if f["form"] == "offset" else ""
        print(f"  {name:<12} b = {f['b']:.4f}{ci(f['b_ci'], '.4f')}  a = {f['a']:.4g}{ci(f['a_ci'], '.4g')}{extra}"
              f"  ({f['runs']} runs, {f['sizes']} sizes, bootstrap {f['bootstrap_ok']} fitted / "
              f"{f['bootstrap_skipped']} skipped, rms log residual {f['rms_log_residual']:.4f})")
    for name, why in fits["not_fitted"].items():
        print(f"  {name:<12} not fitted: {why}")
    m = fits["matched_flops"]
    print(f"matched compute {m['flops']:.4g} FLOPs ({m['chosen']}):")
    for name, e in m["families"].items():
        print(f"  {name:<12} {e['loss']:.4f} bits/base{ci(e['ci'], '.4f')}"
              + ("" if e["interpolated"] else "  (extrapolated)"))
    print(f"wrote {directory / 'fits.json'}")
    return 0


if __name__ == "__main__":
    run_cli(main)
