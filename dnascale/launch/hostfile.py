"""Hostfile mode: what `deepspeed --hostfile FILE` runs on each host, computed without DeepSpeed.

DeepSpeed's runner (deepspeed/launcher/runner.py + multinode_runner.py, PDSH backend) encodes the hosts and
their GPU slots as base64 JSON (`--world_info`) and runs on every host, over pdsh/ssh:

    export K=V; ...; cd CWD; PYTHON -u -m deepspeed.launcher.launch --world_info=... --node_rank=N
        --master_addr=A --master_port=P --enable_each_rank_log=None SCRIPT ARGS

with N the host's position in the hostfile. The exports are the launching environment's variables named
PYTHON*, MLFLOW*, MV2*, UCX* (and NCCL* on a CUDA machine), PYTHONPATH prefixed with CWD, then the lines of the
DeepSpeed env file (`~/.deepspeed_env`, `./.deepspeed_env`, named by DS_ENV_FILE). Our cluster settings are
not all named so (OMP_NUM_THREADS, CUDA_DEVICE_MAX_CONNECTIONS, ...): the front end writes every export into
its own env file and points DS_ENV_FILE at it, so each host gets exactly the environment printed here.
Importing deepspeed to ask it would cost ~10 s per dry run; this mirrors DeepSpeed 0.19's rules instead.
"""

from __future__ import annotations

import base64
import json
import os
import re
from dataclasses import dataclass
from typing import Mapping

from dnascale.errors import ConfigError
from dnascale.launch.cluster_env import resolve_cluster_env
from dnascale.launch.plan import (
    DEFAULT_MASTER_PORT,
    LaunchPlan,
    LaunchRequest,
    NodeCommand,
    check_grid,
    check_port,
    check_script,
    parallel_sizes,
)

# Prefixes DeepSpeed's runner exports to every host (runner.EXPORT_ENVS + the CUDA accelerator's "NCCL").
_EXPORTED_PREFIXES = ("PYTHON", "MLFLOW", "MV2", "UCX", "NCCL")
_LINE = re.compile(r"^(\S+)\s+slots=(\d+)\s*(?:#.*)?$")


@dataclass(frozen=True)
class HostEntry:
    host: str
    slots: int
    line: int  # 1-based, for error messages


def read_hostfile(path: str) -> list[HostEntry]:
    """`host slots=N` lines (blank lines and `#` comments skipped); any other line is a one-line error."""
    if not os.path.isfile(path):
        raise ConfigError(f"hostfile {path} does not exist")
    entries: list[HostEntry] = []
    first_line: dict[str, int] = {}
    with open(path, encoding="utf-8") as handle:
        for number, raw in enumerate(handle, start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            match = _LINE.match(line)
            if not match:
                raise ConfigError(f"{path}:{number}: expected 'HOST slots=N', got {line!r}")
            host, slots = match.group(1), int(match.group(2))
            if host in first_line:
                raise ConfigError(f"{path}:{number}: host {host} is listed twice (first on line {first_line[host]})")
            if slots < 1:
                raise ConfigError(f"{path}:{number}: {host} has slots={slots}; a host needs at least one slot")
            if entries and slots != entries[0].slots:
                raise ConfigError(
                    f"{path}:{number}: {host} has slots={slots} but {entries[0].host} has slots={entries[0].slots}; "
                    f"every node must run the same number of GPU processes"
                )
            first_line[host] = number
            entries.append(HostEntry(host, slots, number))
    if not entries:
        raise ConfigError(f"hostfile {path} lists no hosts ('HOST slots=N' lines)")
    return entries


def world_info(hosts: tuple[str, ...], gpus_per_node: int) -> str:
    """DeepSpeed's `--world_info`: urlsafe base64 of the JSON {host: [slot, ...]}, in hostfile order."""
    resources = {host: list(range(gpus_per_node)) for host in hosts}
    return base64.urlsafe_b64encode(json.dumps(resources).encode("utf-8")).decode("utf-8")


def _deepspeed_env_files(environ: Mapping[str, str], cwd: str) -> list[str]:
    name = environ.get("DS_ENV_FILE", ".deepspeed_env")
    return [os.path.join(os.path.expanduser("~"), name), os.path.join(cwd, name)]


def host_exports(environ: Mapping[str, str], cwd: str) -> dict[str, str]:
    """The environment every host's launcher gets, in DeepSpeed's order (later entries win)."""
    exports = {k: v for k, v in environ.items() if k.startswith(_EXPORTED_PREFIXES)}
    old_path = environ.get("PYTHONPATH")
    exports["PYTHONPATH"] = f"{cwd}:{old_path}" if old_path else cwd
    exports.update(resolve_cluster_env(environ))
    for path in _deepspeed_env_files(environ, cwd):
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as handle:
                for line in handle:
                    key, sep, value = line.strip().partition("=")
                    if sep:
                        exports[key] = value
    return exports


def hostfile_plan(request: LaunchRequest, environ: Mapping[str, str]) -> LaunchPlan:
    if request.hostfile is None:
        raise ConfigError("hostfile mode needs --hostfile FILE")
    entries = read_hostfile(request.hostfile)
    # --nodes / --gpus-per-node keep the first hosts and slots, as DeepSpeed's --num_nodes / --num_gpus do.
    nodes = request.nodes if request.nodes is not None else len(entries)
    if not 1 <= nodes <= len(entries):
        raise ConfigError(f"--nodes {nodes}: hostfile {request.hostfile} lists {len(entries)} hosts")
    gpus = request.gpus_per_node if request.gpus_per_node is not None else entries[0].slots
    if not 1 <= gpus <= entries[0].slots:
        raise ConfigError(
            f"--gpus-per-node {gpus}: hostfile {request.hostfile} gives each host {entries[0].slots} slots"
        )
    hosts = tuple(e.host for e in entries[:nodes])

    tp, pp = parallel_sizes(request.script_args)
    check_grid(nodes, gpus, tp, pp)
    check_script(request)
    master_addr = request.master_addr or hosts[0]
    master_port = check_port(request.master_port if request.master_port is not None else DEFAULT_MASTER_PORT)
    info = world_info(hosts, gpus)
    env = tuple(host_exports(environ, request.cwd).items())
    commands = tuple(
        NodeCommand(
            node_rank=rank, host=host, cwd=request.cwd, env=env,
            argv=(
                request.python, "-u", "-m", "deepspeed.launcher.launch", f"--world_info={info}",
                f"--node_rank={rank}", f"--master_addr={master_addr}", f"--master_port={master_port}",
                # DeepSpeed's runner always passes its (string) default along; kept so the lines match word for word
                "--enable_each_rank_log=None",
                request.script, *request.script_args,
            ),
        )
        for rank, host in enumerate(hosts)
    )
    trim = []
    if request.nodes is not None:
        trim += ["--num_nodes", str(nodes)]
    if request.gpus_per_node is not None:
        trim += ["--num_gpus", str(gpus)]
    # master_addr is always given: left out, DeepSpeed asks the first host over ssh (`hostname -I`), which a
    # dry run cannot know.
    launcher = NodeCommand(
        node_rank=-1, host="localhost", cwd=request.cwd, env=tuple(resolve_cluster_env(environ).items()),
        argv=(
            request.python, "-m", "deepspeed.launcher.runner", "--hostfile", os.path.abspath(request.hostfile),
            "--master_addr", master_addr, "--master_port", str(master_port), *trim,
            request.script, *request.script_args,
        ),
    )
    return LaunchPlan(
        mode="hostfile", hosts=hosts, gpus_per_node=gpus, master_addr=master_addr, master_port=master_port,
        tp=tp, pp=pp, nodes=commands, launcher=launcher,
        note="DeepSpeed's runner runs each line below on its host over pdsh/ssh (the exports via a DS_ENV_FILE)",
    )
