"""The launch modes by name: each turns a LaunchRequest and the environment into a LaunchPlan."""

from __future__ import annotations

from typing import Callable, Mapping

from dnascale.errors import ConfigError
from dnascale.launch.hostfile import hostfile_plan
from dnascale.launch.plan import LaunchPlan, LaunchRequest
from dnascale.launch.slurm import slurm_plan

MODES: dict[str, Callable[[LaunchRequest, Mapping[str, str]], LaunchPlan]] = {
    "slurm": slurm_plan,
    "hostfile": hostfile_plan,
}


def build_plan(mode: str, request: LaunchRequest, environ: Mapping[str, str]) -> LaunchPlan:
    if mode not in MODES:
        raise ConfigError(
            f"unknown launch mode {mode!r}: choose one of {', '.join(MODES)} (--slurm or --hostfile FILE)"
        )
    return MODES[mode](request, environ)
