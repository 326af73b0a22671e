"""The sweep spec: families x sizes x token budgets x parallel layouts, as typed dataclasses loaded from YAML.

    name: cpu_mini
    token_budgets: [40000, 120000]        # bases of DNA each run reads (-> --steps; see sweep.py)
    layouts: [{dp: 1, tp: 1, pp: 1}]
    train: {ds_config: ds_configs/stage0.json, micro_batch_size: 4, warmup_fraction: 0.1}
    families:
      - model: encoder                    # a registered recipe
        preset: tiny                      # default preset of its sizes
        sizes:
          - {name: h32, overrides: {hidden: 32, heads: 2, ffn_hidden: 128}}
          - {name: h128}                  # the preset as it is
    slurm: {gpus_per_node: 8, sbatch_args: ["--time=24:00:00"]}

Loading is one pass through dnascale.config.from_dict: an unknown field, a wrong type or a bad value raises a
one-line ConfigError naming the file and the field path (`cpu_mini.yaml: families[0]: sizes[1]: name ...`).
Whether a recipe, preset or override exists is checked when the grid is expanded (sweep.py), which resolves
every model config once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dnascale.config import from_dict, load_yaml
from dnascale.errors import ConfigError

# Names end up in run ids, directory names and SLURM job names: keep them to one safe alphabet.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._]*$")


def _check_name(kind: str, value: str) -> None:
    if not _NAME.match(value):
        raise ConfigError(f"{kind}={value!r}: use letters, digits, '.' and '_' only (it becomes part of run ids)")


@dataclass(frozen=True)
class SizeSpec:
    """One model size of a family: a preset and field overrides of its model config (e.g. hidden, layers)."""

    name: str
    preset: str | None = None  # None: the family's preset
    overrides: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        _check_name("name", self.name)
        for key in self.overrides:
            if not isinstance(key, str) or not key:
                raise ConfigError(f"overrides of size {self.name!r}: field names must be strings, got {key!r}")


@dataclass(frozen=True)
class FamilySpec:
    model: str  # recipe name in dnascale.models.registry
    sizes: tuple[SizeSpec, ...]
    preset: str = "tiny"
    label: str | None = None  # how rows and plots name it (default: the recipe name); lets a spec hold variants

    @property
    def name(self) -> str:
        return self.label or self.model

    def validate(self) -> None:
        _check_name("label", self.name)
        if not self.sizes:
            raise ConfigError(f"family {self.name!r}: sizes: expected at least one size")
        names = [s.name for s in self.sizes]
        duplicate = next((n for n in names if names.count(n) > 1), None)
        if duplicate:
            raise ConfigError(f"family {self.name!r}: sizes: name {duplicate!r} appears twice")


@dataclass(frozen=True)
class LayoutSpec:
    """Ranks of a run: data x tensor x pipeline parallel (world size = dp * tp * pp)."""

    dp: int = 1
    tp: int = 1
    pp: int = 1

    @property
    def world(self) -> int:
        return self.dp * self.tp * self.pp

    @property
    def name(self) -> str:
        return f"dp{self.dp}tp{self.tp}pp{self.pp}"

    def validate(self) -> None:
        for key in ("dp", "tp", "pp"):
            if getattr(self, key) < 1:
                raise ConfigError(f"layouts: {key}={getattr(self, key)}: must be >= 1")


@dataclass(frozen=True)
class TrainSpec:
    """Launcher settings shared by every run of the sweep (the global batch is micro x accum x dp)."""

    ds_config: str = "ds_configs/zero3.json"
    micro_batch_size: int = 8  # per data-parallel rank
    grad_accum: int = 1
    lr: float | None = None  # None: the launcher's default
    warmup_fraction: float = 0.05  # of each run's steps, so short and long runs warm up alike
    seed: int = 0
    data: str | None = None  # a shard directory; None: the launcher's bundled genomes
    eval_batches: int = 4  # the final step is always evaluated (val_loss in the last metrics line)
    save_every: int | None = None  # None: one checkpoint, at the end (enough to resume and to convert)
    num_workers: int = 0  # loader workers per rank; 0 keeps the CPU for the model on small machines
    extra_args: tuple[str, ...] = ()  # appended verbatim to every launcher command

    def validate(self) -> None:
        for key in ("micro_batch_size", "grad_accum"):
            if getattr(self, key) < 1:
                raise ConfigError(f"train: {key}={getattr(self, key)}: must be >= 1")
        if self.lr is not None and self.lr <= 0:
            raise ConfigError(f"train: lr={self.lr}: must be > 0")
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ConfigError(f"train: warmup_fraction={self.warmup_fraction}: must be in [0, 1)")
        if self.eval_batches < 0 or self.num_workers < 0:
            raise ConfigError("train: eval_batches and num_workers must be >= 0")
        if self.save_every is not None and self.save_every < 1:
            raise ConfigError(f"train: save_every={self.save_every}: must be >= 1 (or null: at the end only)")


@dataclass(frozen=True)
class SlurmSpec:
    gpus_per_node: int = 8
    sbatch_args: tuple[str, ...] = ()  # e.g. ["--partition=gpu", "--time=24:00:00"], before the script

    def validate(self) -> None:
        if self.gpus_per_node < 1:
            raise ConfigError(f"slurm: gpus_per_node={self.gpus_per_node}: must be >= 1")


@dataclass(frozen=True)
class SweepSpec:
    name: str
    families: tuple[FamilySpec, ...]
    token_budgets: tuple[int, ...]  # bases of DNA per run
    layouts: tuple[LayoutSpec, ...] = (LayoutSpec(),)
    train: TrainSpec = field(default_factory=TrainSpec)
    slurm: SlurmSpec = field(default_factory=SlurmSpec)
    source: str = "<spec>"  # the file it came from, for error messages (set by load_spec)

    def validate(self) -> None:
        _check_name("name", self.name)
        if not self.families:
            raise ConfigError("families: expected at least one family")
        labels = [f.name for f in self.families]
        duplicate = next((n for n in labels if labels.count(n) > 1), None)
        if duplicate:
            raise ConfigError(f"families: {duplicate!r} appears twice (give variants of a recipe a label)")
        if not self.token_budgets:
            raise ConfigError("token_budgets: expected at least one budget (bases per run)")
        for budget in self.token_budgets:
            if budget < 1:
                raise ConfigError(f"token_budgets: {budget}: must be a positive number of bases")
        if len(set(self.token_budgets)) != len(self.token_budgets):
            raise ConfigError(f"token_budgets: {list(self.token_budgets)} repeats a budget")
        if not self.layouts:
            raise ConfigError("layouts: expected at least one layout")
        if len({layout.name for layout in self.layouts}) != len(self.layouts):
            raise ConfigError("layouts: a layout appears twice")


def load_spec(path: str | Path) -> SweepSpec:
    """Read and validate a sweep spec; every mistake is a one-line ConfigError naming the file and field."""
    data = load_yaml(str(path))
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sweep fields")
    if "source" in data:
        raise ConfigError(f"{Path(path).name}: 'source' is set by the loader, not the spec")
    # A YAML budget written 4.0e4 is a float; whole numbers are accepted as the integers they are.
    budgets = data.get("token_budgets")
    if isinstance(budgets, list):
        data = dict(data, token_budgets=[int(b) if isinstance(b, float) and b.is_integer() else b for b in budgets])
    name = Path(path).name
    try:
        return from_dict(SweepSpec, dict(data, source=str(path)), source=name)
    except ConfigError as err:  # validate() messages name the field; add the file where from_dict did not
        message = str(err)
        raise ConfigError(message if message.startswith(name) else f"{name}: {message}") from None
