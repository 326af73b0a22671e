"""Local execution of a sweep: every unfinished run as an ordinary launcher command, sequentially or `jobs` at a
time with the CPU threads split between them, resumable.

A finished run (its metrics.jsonl reached its step count) is not rerun; an unfinished one is started again and the
launcher's `--resume auto` continues it from its last checkpoint. Each run directory holds `run.json` (the Run it
is) and `launch.log` (the command and its output), so any run can be reproduced by hand. A run directory whose
run.json describes different settings is refused rather than silently mixed: rename the size or delete it.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from dnascale.errors import ConfigError
from dnascale.scaling.sweep import REPO, RUN_INFO, Run, is_finished, local_command, quoted, run_dir

LOG = "launch.log"


@dataclass(frozen=True)
class Outcome:
    run: Run
    status: str  # "done" (ran now), "finished" (found finished, not rerun), "failed", "planned" (dry run)
    seconds: float = 0.0
    message: str = ""


# Derived from the code, not the spec: a recipe's FLOPs formula being refined must not orphan finished runs.
_DERIVED = ("flops_per_token",)


def _canonical(info: dict) -> str:
    return json.dumps(info, sort_keys=True, default=list)


def check_run_dir(run: Run, out: str | Path) -> None:
    """Refuse a directory left by a run of the same id but other settings (a spec edited under a kept id)."""
    path = run_dir(out, run) / RUN_INFO
    if not path.is_file():
        return
    saved = {k: v for k, v in json.loads(path.read_text()).items() if k not in _DERIVED}
    mine = {k: v for k, v in json.loads(_canonical(run.to_dict())).items() if k not in _DERIVED}
    if saved != mine:
        changed = sorted(k for k in set(saved) | set(mine) if saved.get(k) != mine.get(k))
        raise ConfigError(f"{path.parent}: holds run {run.run_id} with other settings ({', '.join(changed)}); "
                          f"delete the directory or give the size a new name")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(run: Run, out: str | Path, threads: int, announce: Callable[[str], None] | None = None) -> Outcome:
    """Run one launcher command to completion, its output in RUN_DIR/launch.log (`announce` sees it start)."""
    directory = run_dir(out, run)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / RUN_INFO).write_text(_canonical(run.to_dict()) + "\n")
    cmd = local_command(run, out, master_port=_free_port() if run.layout.world > 1 else None)
    per_rank = str(max(1, threads // run.layout.world))
    env = dict(os.environ, OMP_NUM_THREADS=per_rank, MKL_NUM_THREADS=per_rank, PYTHONUNBUFFERED="1")
    if announce is not None:
        announce("$ " + quoted(cmd))
    started = time.perf_counter()
    with open(directory / LOG, "a") as handle:
        handle.write("$ " + quoted(cmd) + "\n")
        handle.flush()
        code = subprocess.run(cmd, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT, env=env).returncode
    seconds = time.perf_counter() - started
    if code != 0 or not is_finished(run, out):
        lines = (directory / LOG).read_text().strip().splitlines()
        return Outcome(run, "failed", seconds, f"exit {code}: {lines[-1] if lines else ''} (log {directory / LOG})")
    return Outcome(run, "done", seconds)


def run_local(runs: list[Run], out: str | Path, *, jobs: int = 1, dry_run: bool = False, progress: bool = True,
              echo: Callable[[str], None] = print) -> list[Outcome]:
    """Run what is not finished; returns one Outcome per run (finished ones included, not rerun)."""
    for run in runs:
        check_run_dir(run, out)
    outcomes = [Outcome(r, "finished") for r in runs if is_finished(r, out)]
    # Largest planned compute first (a scheduling heuristic): with --jobs N the long runs start early.
    todo = sorted((r for r in runs if not is_finished(r, out)), key=lambda r: -r.flops_per_token * r.planned_bases)
    if dry_run:
        for run in todo:
            echo(quoted(local_command(run, out)))
        return outcomes + [Outcome(r, "planned") for r in todo]
    if not todo:
        return outcomes
    from tqdm import tqdm

    jobs = max(1, min(jobs, len(todo)))
    threads = max(1, (os.cpu_count() or 1) // jobs)
    with ThreadPoolExecutor(jobs) as pool, tqdm(total=len(todo), unit="run", desc="sweep", disable=not progress,
                                                dynamic_ncols=True) as bar:
        futures = {}
        for run in todo:
            futures[pool.submit(launch, run, out, threads, bar.write)] = run
        for future in as_completed(futures):
            outcome = future.result()
            outcomes.append(outcome)
            if outcome.status == "failed":
                bar.write(f"failed: {outcome.run.run_id}: {outcome.message}")
            bar.set_postfix_str(f"{outcome.run.run_id} {outcome.status} in {outcome.seconds:.0f}s")
            bar.update()
    return outcomes
