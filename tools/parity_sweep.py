#!/usr/bin/env python
"""Run the distributed parity tests over many seeds and report the worst error of each against its tolerance.

    python tools/parity_sweep.py --seeds 20                     # every parity test, seeds 0..19
    python tools/parity_sweep.py --seeds 20 --tests tests/test_dnazen_parallel.py

Each test repeats its comparisons for every seed inside one launch (tests/parity.py: DNASCALE_PARITY_SEEDS) and
logs one JSON line per compared tensor (DNASCALE_PARITY_LOG). The table shows, per test, the largest absolute
error, the largest error as a share of what the tolerance allows (1.0 = at the tolerance), and where it was.
A failing test fails this command too; its last lines are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

PARITY_TESTS = (
    "tests/test_parallel_nn.py::test_tensor_parallel_matches_single_rank_and_parallel_state_is_consistent",
    "tests/test_parallel_nn.py::test_zero3_with_tensor_parallel_trains_like_plain_data_parallel",
    "tests/test_enbed_parallel.py::test_enbed_tensor_parallel_matches_single_rank",
    "tests/test_enbed_parallel.py::test_enbed_zero3_with_tensor_parallel_trains_like_plain_data_parallel",
    "tests/test_dnazen_parallel.py::test_dnazen_tensor_parallel_2_matches_1",
    "tests/test_dnachunker_parallel.py::test_tensor_parallel_2_equals_1",
    "tests/test_pretrain_e2e.py::test_tensor_parallel_2_under_torchrun_matches_tp_1",
)


def read_log(prefix: Path) -> list[dict]:
    records = []
    for path in sorted(prefix.parent.glob(prefix.name + ".rank*")):
        records += [json.loads(line) for line in path.read_text().splitlines() if line]
    return records


def worst_per_test(records: list[dict]) -> dict[str, dict]:
    by_test: dict[str, list[dict]] = defaultdict(list)
    for record in records:
        by_test[record["test"]].append(record)
    summary = {}
    for test, rows in sorted(by_test.items()):
        worst = max(rows, key=lambda r: r["worst_share_of_tolerance"])
        summary[test] = {"comparisons": len(rows), "seeds": len({r["seed"] for r in rows}),
                         "max_abs": max(r["max_abs"] for r in rows),
                         "worst_share_of_tolerance": worst["worst_share_of_tolerance"], "where": worst["what"],
                         "dtype": worst["dtype"], "rtol": worst["rtol"], "atol": worst["atol"]}
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=20)
    p.add_argument("--tests", nargs="+", default=list(PARITY_TESTS), help="pytest node ids (default: all parity tests)")
    p.add_argument("--json", type=Path, default=None, help="also write the summary here")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        prefix = Path(tmp) / "parity.jsonl"
        env = dict(os.environ, DNASCALE_PARITY_SEEDS=str(args.seeds), DNASCALE_PARITY_LOG=str(prefix))
        result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args.tests],
                                cwd=REPO, env=env, capture_output=True, text=True)
        summary = worst_per_test(read_log(prefix))
    print(f"{'test':<22} {'seeds':>5} {'compared':>8} {'dtype':>8} {'max abs err':>12} {'rtol/atol':>15} "
          f"{'share of tol':>12}  worst at")
    for test, row in summary.items():
        print(f"{test:<22} {row['seeds']:>5} {row['comparisons']:>8} {row['dtype']:>8} {row['max_abs']:>12.3g} "
              f"{row['rtol']:>7.0e}/{row['atol']:<7.0e} {row['worst_share_of_tolerance']:>12.3g}  {row['where']}")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    if result.returncode != 0:
        print("\n".join(result.stdout.splitlines()[-40:]), file=sys.stderr)
        print(f"parity sweep FAILED: pytest exit {result.returncode}", file=sys.stderr)
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
