"""Grid expansion: a SweepSpec -> one `Run` per family x size x token budget x layout, with a stable id, its
pretraining arguments and the command that runs it (local python / deepspeed, or sbatch).

A token budget is counted in bases of DNA, so every family reads the same amount of sequence: a run takes
steps = ceil(budget / (global batch x window)), where the window is the recipe's `data_window` (bases per training
sequence) and the global batch is micro x grad_accum x dp sequences. For the one-token-per-base families
(char, byte, DNACHUNKER's base level) bases and tokens agree up to the template tokens; DNAZEN's BPE reads the same
bases in ~5x fewer tokens.

Run ids are `<family>-<size>-b<budget>-dp<d>tp<t>pp<p>` (budget exact, e.g. b40k, b1.5M, b123457): the same spec
always yields the same ids, so a rerun finds its finished runs and a changed spec gets new directories.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dnascale.errors import ConfigError
from dnascale.scaling.spec import LayoutSpec, SlurmSpec, SweepSpec, TrainSpec

REPO = Path(__file__).resolve().parents[2]  # launcher paths are relative to the checkout
LAUNCHER = "launchers/pretrain.py"
SBATCH_SCRIPT = "launchers/slurm/pretrain.sbatch"
RUN_INFO = "run.json"  # written beside metrics.jsonl by the runner: what the run is, for resuming and collecting


@dataclass(frozen=True)
class Run:
    run_id: str
    family: str  # the family's label in the spec
    model: str  # its recipe
    size: str
    preset: str
    overrides: tuple[str, ...]  # `field=value`, exactly as passed to --override
    token_budget: int  # bases asked for
    layout: LayoutSpec
    steps: int
    window: int  # bases per training sequence (the recipe's data_window of the resolved config)
    warmup_steps: int
    flops_per_token: float  # the recipe's training FLOPs per token of the resolved config at this window
    train: TrainSpec

    @property
    def global_batch(self) -> int:
        """Sequences per optimizer step over all data-parallel ranks."""
        return self.train.micro_batch_size * self.train.grad_accum * self.layout.dp

    @property
    def planned_bases(self) -> int:
        return self.steps * self.global_batch * self.window

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def budget_label(bases: int) -> str:
    """Exact and short: 40000 -> 40k, 1500000 -> 1.5M, 2e10 -> 20B, 123457 -> 123457 (never ambiguous)."""
    for unit, suffix in ((10**12, "T"), (10**9, "B"), (10**6, "M"), (10**3, "k")):
        if bases >= unit:
            if bases % unit == 0:
                return f"{bases // unit}{suffix}"
            if (bases * 10) % unit == 0:
                return f"{bases / unit:.1f}{suffix}"
    return str(bases)


def render_override(key: str, value: Any) -> str:
    """`key=value` that the launcher's YAML parsing reads back as `value` (JSON is YAML; plain strings stay bare)."""
    import yaml

    if isinstance(value, str) and yaml.safe_load(value) == value:
        return f"{key}={value}"
    return f"{key}={json.dumps(value)}"


def resolve_config(model: str, preset: str, overrides: tuple[str, ...], tp: int, where: str):
    """The model config a run trains, resolved the way the launcher resolves it (preset, overrides, --tp wins)."""
    from dnascale.config import apply_overrides
    from dnascale.models.registry import get_recipe, load_preset

    try:
        get_recipe(model)
        config = load_preset(model, preset)
        if overrides:
            config = apply_overrides(config, overrides, source="override")
        if hasattr(config, "tp") and config.tp != tp:
            config = dataclasses.replace(config, tp=tp)
            config.validate()
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None
    return config


def expand(spec: SweepSpec) -> list[Run]:
    """Every run of the grid, family-major (family, size, budget, layout) in spec order."""
    from dnascale.models.registry import get_recipe

    runs: list[Run] = []
    name = Path(spec.source).name
    for f, family in enumerate(spec.families):
        for s, size in enumerate(family.sizes):
            preset = size.preset or family.preset
            overrides = tuple(render_override(k, v) for k, v in size.overrides.items())
            for layout in spec.layouts:
                where = f"{name}: families[{f}] ({family.name}) sizes[{s}] ({size.name}) at {layout.name}"
                config = resolve_config(family.model, preset, overrides, layout.tp, where)
                recipe = get_recipe(family.model)
                window = recipe.data_window(config)
                flops = float(recipe.flops_per_token(config, window))
                per_step = spec.train.micro_batch_size * spec.train.grad_accum * layout.dp * window
                for budget in spec.token_budgets:
                    steps = max(1, math.ceil(budget / per_step))
                    runs.append(Run(
                        run_id=f"{family.name}-{size.name}-b{budget_label(budget)}-{layout.name}",
                        family=family.name, model=family.model, size=size.name, preset=preset,
                        overrides=overrides, token_budget=budget, layout=layout, steps=steps, window=window,
                        warmup_steps=round(spec.train.warmup_fraction * steps), flops_per_token=flops,
                        train=spec.train,
                    ))
    return runs


def run_dir(out: str | Path, run: Run) -> Path:
    return Path(out) / "runs" / run.run_id


def pretrain_args(run: Run, out: str | Path) -> list[str]:
    """launchers/pretrain.py arguments of this run (the same locally and under sbatch)."""
    t = run.train
    args = ["--model", run.model, "--preset", run.preset]
    for item in run.overrides:
        args += ["--override", item]
    args += ["--ds_config", t.ds_config, "--steps", str(run.steps), "--micro-batch-size", str(t.micro_batch_size),
             "--grad-accum", str(t.grad_accum), "--warmup-steps", str(run.warmup_steps), "--seed", str(t.seed),
             "--tp", str(run.layout.tp)]
    if run.layout.pp > 1:  # only then: a launcher without --pp still runs every pp=1 sweep
        args += ["--pp", str(run.layout.pp)]
    if t.lr is not None:
        args += ["--lr", str(t.lr)]
    if t.data is not None:
        args += ["--data", t.data]
    # Eval at the end only (the loop always evaluates the last step); one checkpoint unless asked for more.
    args += ["--eval-every", str(run.steps), "--eval-batches", str(t.eval_batches),
             "--save-every", str(t.save_every or run.steps), "--keep-checkpoints", "1",
             "--num-workers", str(t.num_workers), "--log-every", str(max(1, run.steps // 5)),
             "--wandb-mode", "disabled", "--no-progress", "--out", str(run_dir(out, run))]
    return args + list(t.extra_args)


def local_command(run: Run, out: str | Path, master_port: int | None = None) -> list[str]:
    """One process when the layout has one rank; `deepspeed --num_gpus K` (K = dp*tp*pp) otherwise."""
    if run.layout.world == 1:
        return [sys.executable, LAUNCHER, *pretrain_args(run, out)]
    port = ["--master_port", str(master_port)] if master_port is not None else []
    return ["deepspeed", "--num_gpus", str(run.layout.world), *port, LAUNCHER, *pretrain_args(run, out)]


def nodes_for(run: Run, slurm: SlurmSpec) -> int:
    return math.ceil(run.layout.world / slurm.gpus_per_node)


def sbatch_command(run: Run, out: str | Path, slurm: SlurmSpec) -> list[str]:
    """`sbatch --nodes N ... launchers/slurm/pretrain.sbatch <pretrain args>` (the script starts the ranks)."""
    gpus = min(run.layout.world, slurm.gpus_per_node)
    return ["sbatch", "--nodes", str(nodes_for(run, slurm)), "--gpus-per-node", str(gpus),
            "--job-name", f"dnascale-{run.run_id}", *slurm.sbatch_args, SBATCH_SCRIPT, *pretrain_args(run, out)]


def sbatch_script(run: Run, out: str | Path, slurm: SlurmSpec, sweep: str) -> str:
    """A submit script per run: cd to the checkout (DNASCALE_ROOT, default where it was generated) and sbatch."""
    return "\n".join([
        "#!/usr/bin/env bash",
        f"# sweep {sweep}, run {run.run_id}: {run.token_budget} bases asked, {run.steps} steps x "
        f"{run.global_batch} sequences x {run.window} bases = {run.planned_bases}, "
        f"{run.layout.world} rank{'s' if run.layout.world > 1 else ''}",
        "set -euo pipefail",
        f'cd "${{DNASCALE_ROOT:-{REPO}}}"',
        quoted(sbatch_command(run, out, slurm)),
        "",
    ])


def quoted(cmd: list[str]) -> str:
    return " ".join(shlex.quote(c) for c in cmd)


def last_step(metrics: Path) -> int:
    """The highest step in a metrics.jsonl (0 if none); a line cut by a kill is ignored."""
    if not metrics.is_file():
        return 0
    step = 0
    for line in metrics.read_text().splitlines():
        try:
            step = max(step, int(json.loads(line).get("step", 0)))
        except (json.JSONDecodeError, AttributeError, TypeError, ValueError):
            continue
    return step


def is_finished(run: Run, out: str | Path) -> bool:
    """Finished = its metrics.jsonl reached the run's step count (the launcher logs every step)."""
    return last_step(run_dir(out, run) / "metrics.jsonl") >= run.steps


def write_sbatch_scripts(runs: list[Run], out: str | Path, spec: SweepSpec, dest: str | Path) -> list[Path]:
    """One submit script per unfinished run in `dest`, plus `submit_all.sh` that submits them in order."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    scripts = []
    for run in runs:
        if is_finished(run, out):
            continue
        path = dest / f"{run.run_id}.sh"
        path.write_text(sbatch_script(run, out, spec.slurm, spec.name))
        path.chmod(0o755)
        scripts.append(path)
    submit = dest / "submit_all.sh"
    submit.write_text("#!/usr/bin/env bash\nset -euo pipefail\n"
                      + "".join(f'bash "$(dirname "$0")/{p.name}"\n' for p in scripts))
    submit.chmod(0o755)
    return scripts
