"""The launch plan: every node's exact command, and the checks that keep a plan launchable.

A plan is data. `--dry-run` prints it; without it, each node runs its own entry (SLURM) or DeepSpeed's runner
starts them all (hostfile). Both read the same `NodeCommand`, so what the dry run prints is what runs.
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass

from dnascale.errors import ConfigError

# torch's and DeepSpeed's default rendezvous port.
DEFAULT_MASTER_PORT = 29500


@dataclass(frozen=True)
class LaunchRequest:
    """What the user asked for. None means: take it from the environment (SLURM) or the hostfile."""

    script: str  # launchers/pretrain.py, launchers/finetune.py, ...
    script_args: tuple[str, ...]  # passed to every rank verbatim
    cwd: str  # where every node starts the script (srun and DeepSpeed's pdsh both cd there)
    python: str  # the interpreter every node runs: the launching one (same venv on a shared filesystem)
    nodes: int | None = None
    gpus_per_node: int | None = None
    master_addr: str | None = None
    master_port: int | None = None
    node_rank: int | None = None  # this node's rank, for running (SLURM: SLURM_NODEID)
    nodelist: str | None = None  # SLURM mode: instead of SLURM_JOB_NODELIST
    hostfile: str | None = None  # hostfile mode


@dataclass(frozen=True)
class NodeCommand:
    """One node's process: environment additions and argv, run from `cwd`."""

    node_rank: int
    host: str
    cwd: str
    env: tuple[tuple[str, str], ...]  # added to the environment the node's launcher inherits
    argv: tuple[str, ...]

    def shell_line(self) -> str:
        """The command as one shell line that runs as is (every word quoted where it needs to be)."""
        env = " ".join(f"{name}={shlex.quote(value)}" for name, value in self.env)
        command = f"env {env} {shlex.join(self.argv)}" if env else shlex.join(self.argv)
        return f"cd {shlex.quote(self.cwd)} && {command}"


@dataclass(frozen=True)
class LaunchPlan:
    mode: str  # "slurm" | "hostfile"
    hosts: tuple[str, ...]
    gpus_per_node: int
    master_addr: str
    master_port: int
    tp: int
    pp: int
    nodes: tuple[NodeCommand, ...]  # one per host, node_rank = position
    # Hostfile mode: the one command run on this machine (DeepSpeed's runner), which starts `nodes` over ssh.
    launcher: NodeCommand | None = None
    note: str = ""  # how the node commands reach their hosts, printed with the plan

    @property
    def world_size(self) -> int:
        return len(self.hosts) * self.gpus_per_node

    @property
    def dp(self) -> int:
        return self.world_size // (self.tp * self.pp)

    def node(self, node_rank: int) -> NodeCommand:
        if not 0 <= node_rank < len(self.nodes):
            last = len(self.nodes) - 1
            raise ConfigError(f"node rank {node_rank} is outside this plan's {len(self.nodes)} nodes (0-{last})")
        return self.nodes[node_rank]

    def describe(self) -> str:
        """The dry-run text: a summary, then per node a `#` line and its exact command line."""
        lines = [
            f"# dnascale launch plan ({self.mode}): {len(self.hosts)} nodes x {self.gpus_per_node} GPUs = world "
            f"{self.world_size}; tp {self.tp} x pp {self.pp} x dp {self.dp}; "
            f"master {self.master_addr}:{self.master_port}"
        ]
        if self.launcher is not None:
            lines += ["# this machine runs:", self.launcher.shell_line()]
        if self.note:
            lines.append(f"# {self.note}")
        for node in self.nodes:
            first = node.node_rank * self.gpus_per_node
            lines.append(f"# node {node.node_rank} on {node.host}: ranks {first}-{first + self.gpus_per_node - 1}")
            lines.append(node.shell_line())
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- checks


def _flag_value(args: tuple[str, ...], flag: str) -> str | None:
    """The value the training script's argparse will see for `flag` (last one wins; `--tp 2` or `--tp=2`)."""
    value = None
    for i, arg in enumerate(args):
        if arg == flag:
            value = args[i + 1] if i + 1 < len(args) else ""
        elif arg.startswith(flag + "="):
            value = arg[len(flag) + 1:]
    return value


def parallel_sizes(script_args: tuple[str, ...]) -> tuple[int, int]:
    """(tp, pp) as the training script will read them from its arguments (1 when absent)."""
    sizes = []
    for flag in ("--tp", "--pp"):
        value = _flag_value(script_args, flag)
        if value is None:
            sizes.append(1)
            continue
        try:
            size = int(value)
        except ValueError:
            size = 0
        if size < 1:
            raise ConfigError(f"{flag} {value!r} must be a positive integer")
        sizes.append(size)
    return sizes[0], sizes[1]


def check_grid(num_nodes: int, gpus_per_node: int, tp: int, pp: int) -> None:
    """Refuse grids the training script would refuse later, or train slowly: before any node starts."""
    if num_nodes < 1 or gpus_per_node < 1:
        raise ConfigError(f"a launch needs at least one node and one GPU per node (got {num_nodes} x {gpus_per_node})")
    if gpus_per_node % tp:
        raise ConfigError(
            f"--tp {tp} must divide the {gpus_per_node} GPUs of a node: tensor parallelism across nodes would send "
            f"every layer's all-reduces over the network; keep tp within a node and scale with data (or pipeline) "
            f"parallelism across nodes"
        )
    world = num_nodes * gpus_per_node
    if world % (tp * pp):
        raise ConfigError(
            f"tp*pp = {tp}*{pp} = {tp * pp} does not divide the world of {num_nodes} nodes x {gpus_per_node} GPUs "
            f"= {world}"
        )


def check_port(port: int) -> int:
    if not 1 <= port <= 65535:
        raise ConfigError(f"--master-port {port} is not a TCP port (1-65535)")
    return port


def check_script(request: LaunchRequest) -> None:
    path = os.path.join(request.cwd, request.script)
    if not os.path.isfile(path):
        raise ConfigError(f"training script {request.script} not found (from {request.cwd})")
