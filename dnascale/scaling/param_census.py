"""Parameters per rank, counted on the real model: built through its recipe on the meta device (shapes only).

Each parameter is classified once:
- TP-sharded or replicated: megatron marks every Column/RowParallel weight, column-parallel bias and
  vocab-parallel table with `tensor_model_parallel` (also at TP=1); such a tensor holds numel/tp elements per TP
  rank (the configs refuse sizes tp does not divide), any other is held whole by every TP rank. This is exact
  for any TP size from one TP=1 build.
- pipeline unit: the layer it belongs to (`UnitPattern`s name the layer modules of a family, in forward order),
  or "outer" (embeddings, heads, norms, routers), which sits on the first stage, or on the last one for the
  head's parameters; parameters tied between the input embedding and the output head sit on both.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

import torch

from dnascale.models.registry import get_recipe

UnitKey = tuple[str, int]


@dataclass(frozen=True)
class UnitPattern:
    """A regex over parameter names whose last group is the layer index; the earlier groups, formatted into
    `group`, name the stack (e.g. r"^(encoders\\.\\d+)\\.layers\\.(\\d+)\\." with group "{0}")."""

    regex: str
    group: str

    def match(self, name: str) -> UnitKey | None:
        found = re.match(self.regex, name)
        if found is None:
            return None
        *stack, index = found.groups()
        return self.group.format(*stack), int(index)


@dataclass(frozen=True)
class ParamInfo:
    name: str
    numel: int
    sharded: bool  # megatron's tensor_model_parallel mark
    unit: UnitKey | None  # None: outer
    last_stage: bool  # an outer parameter of the output head
    tied: bool  # used by the first and the last stage

    def per_rank(self, tp: int) -> int:
        return self.numel // tp if self.sharded else self.numel


@dataclass(frozen=True)
class ParamCensus:
    params: tuple[ParamInfo, ...]
    units: tuple[UnitKey, ...]  # pipeline units in forward order

    @property
    def total(self) -> int:
        return sum(p.numel for p in self.params)

    @property
    def sharded(self) -> int:
        return sum(p.numel for p in self.params if p.sharded)

    @property
    def replicated(self) -> int:
        return self.total - self.sharded

    def per_rank(self, tp: int) -> int:
        """Parameters one TP rank holds (pipeline stages together)."""
        return sum(p.per_rank(tp) for p in self.params)

    def stage_units(self, pp: int) -> list[tuple[UnitKey, ...]]:
        """Units per pipeline stage: contiguous, as even as possible (earlier stages take the remainder)."""
        base, extra = divmod(len(self.units), pp)
        stages, start = [], 0
        for stage in range(pp):
            size = base + (1 if stage < extra else 0)
            stages.append(tuple(self.units[start:start + size]))
            start += size
        return stages

    def on_stage(self, stage: int, pp: int) -> list[ParamInfo]:
        units = set(self.stage_units(pp)[stage])
        first, last = stage == 0, stage == pp - 1
        chosen = []
        for p in self.params:
            if p.unit is not None:
                keep = p.unit in units
            elif p.tied:
                keep = first or last
            else:
                keep = last if p.last_stage else first
            if keep:
                chosen.append(p)
        return chosen


def _config_at_tp1(config: Any) -> Any:
    return dataclasses.replace(config, tp=1) if getattr(config, "tp", 1) != 1 else config


def take_census(recipe_name: str, config: Any, patterns: tuple[UnitPattern, ...], group_order: tuple[str, ...],
                last_stage_prefixes: tuple[str, ...], tied_prefixes: tuple[str, ...]) -> ParamCensus:
    """Build `recipe_name` at TP=1 on the meta device and classify every parameter (module docstring)."""
    recipe = get_recipe(recipe_name)
    with torch.device("meta"):
        model = recipe.build(_config_at_tp1(config), None)
    params, units = [], set()
    for name, param in model.named_parameters():
        unit = next((key for key in (pattern.match(name) for pattern in patterns) if key is not None), None)
        if unit is not None:
            units.add(unit)
        params.append(ParamInfo(
            name=name, numel=param.numel(), sharded=bool(getattr(param, "tensor_model_parallel", False)),
            unit=unit, last_stage=unit is None and name.startswith(last_stage_prefixes),
            tied=unit is None and name.startswith(tied_prefixes),
        ))
    ordered = tuple(sorted(units, key=lambda key: (group_order.index(key[0]), key[1])))
    return ParamCensus(tuple(params), ordered)
