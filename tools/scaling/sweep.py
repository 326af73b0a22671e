#!/usr/bin/env python
"""Run a scaling sweep: expand a spec (families x sizes x token budgets x layouts) into pretraining runs.

    python tools/scaling/sweep.py tools/scaling/specs/cpu_mini.yaml --out runs/scaling/cpu_mini --jobs 2
    python tools/scaling/sweep.py SPEC --out OUT --dry-run              # print the launcher commands only
    python tools/scaling/sweep.py SPEC --out OUT --slurm                # OUT/sbatch/<run>.sh + submit_all.sh
    python tools/scaling/sweep.py SPEC --out OUT --slurm --dry-run      # print the sbatch lines only

Each run goes to OUT/runs/<run_id>/ (run.json, launch.log, metrics.jsonl, checkpoints/). Resumable: a run whose
metrics.jsonl reached its step count is not rerun; an unfinished one continues from its checkpoint. Then:
tools/scaling/collect.py OUT, fit.py, plot.py.
"""

from __future__ import annotations

import argparse
import fnmatch
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from dnascale.errors import ConfigError, run_cli  # noqa: E402


def main(argv=None) -> int:
    import warnings

    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
    from dnascale.scaling import sweep
    from dnascale.scaling.runner import run_local
    from dnascale.scaling.spec import load_spec

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("spec", help="sweep spec (YAML), e.g. tools/scaling/specs/cpu_mini.yaml")
    p.add_argument("--out", required=True, help="sweep directory (runs/, sbatch/)")
    p.add_argument("--jobs", type=int, default=1, help="local runs at once; the CPU threads are split between them")
    p.add_argument("--only", action="append", default=[], metavar="GLOB", help="run ids matching (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="print the commands of the unfinished runs, run nothing")
    p.add_argument("--slurm", action="store_true", help="write sbatch submit scripts instead of running locally")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    if a.jobs < 1:
        raise ConfigError(f"--jobs {a.jobs}: must be >= 1")
    spec = load_spec(a.spec)
    runs = sweep.expand(spec)
    if a.only:
        runs = [r for r in runs if any(fnmatch.fnmatch(r.run_id, g) for g in a.only)]
        if not runs:
            raise ConfigError(f"--only {' '.join(a.only)}: matches none of the sweep's run ids")
    finished = sum(sweep.is_finished(r, a.out) for r in runs)
    print(f"sweep {spec.name}: {len(runs)} runs, {finished} finished, into {a.out}", flush=True)

    if a.slurm:
        if a.dry_run:
            for run in runs:
                if not sweep.is_finished(run, a.out):
                    print(sweep.quoted(sweep.sbatch_command(run, a.out, spec.slurm)))
            return 0
        scripts = sweep.write_sbatch_scripts(runs, a.out, spec, Path(a.out) / "sbatch")
        print(f"{len(scripts)} sbatch scripts in {Path(a.out) / 'sbatch'}; submit with "
              f"bash {Path(a.out) / 'sbatch' / 'submit_all.sh'}")
        return 0

    started = time.perf_counter()
    outcomes = run_local(runs, a.out, jobs=a.jobs, dry_run=a.dry_run, progress=not a.no_progress)
    if a.dry_run:
        return 0
    failed = [o for o in outcomes if o.status == "failed"]
    ran = sum(o.status == "done" for o in outcomes)
    print(f"sweep {spec.name}: ran {ran}, already finished {len(outcomes) - ran - len(failed)}, failed "
          f"{len(failed)}, in {time.perf_counter() - started:.0f} s")
    for outcome in failed:
        print(f"failed: {outcome.run.run_id}: {outcome.message}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    run_cli(main)
