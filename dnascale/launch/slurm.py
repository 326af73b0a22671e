"""SLURM mode: one torchrun per node (srun --ntasks-per-node=1), static rendezvous at the allocation's first node.

Why torchrun with explicit --node-rank (static rendezvous) rather than c10d rendezvous: with c10d, node ranks
are handed out in arrival order, so which node holds global rank 0 (and writes checkpoints and logs) would change
from run to run and could not be printed in advance. SLURM_NODEID is already a stable node index; using it makes
global rank = node_rank x gpus_per_node + local_rank, exactly what --dry-run prints.
"""

from __future__ import annotations

import re
from typing import Mapping

from dnascale.errors import ConfigError
from dnascale.launch.cluster_env import resolve_cluster_env
from dnascale.launch.nodelist import expand_nodelist
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

# Jobs that share a node (no --exclusive) must not share a port; the job id spreads them over 10,000 ports.
_PORT_SPREAD = 10000


def _env_int(environ: Mapping[str, str], name: str) -> int | None:
    value = environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} must be an integer") from None


def _gpus_on_node(environ: Mapping[str, str]) -> int | None:
    """GPUs SLURM gave each node: SLURM_GPUS_ON_NODE, else SLURM_GPUS_PER_NODE (`8` or `h800:8`)."""
    on_node = _env_int(environ, "SLURM_GPUS_ON_NODE")
    if on_node is not None:
        return on_node
    per_node = environ.get("SLURM_GPUS_PER_NODE", "")
    match = re.fullmatch(r"(?:[\w-]+:)?(\d+)", per_node)
    return int(match.group(1)) if match else None


def default_port(environ: Mapping[str, str]) -> int:
    job_id = _env_int(environ, "SLURM_JOB_ID")
    return DEFAULT_MASTER_PORT + (job_id % _PORT_SPREAD if job_id is not None else 0)


def this_node_rank(request: LaunchRequest, environ: Mapping[str, str]) -> int:
    """This task's node rank: --node-rank, else SLURM_NODEID (SLURM_PROCID with one task per node)."""
    if request.node_rank is not None:
        return request.node_rank
    local_id = _env_int(environ, "SLURM_LOCALID")
    if local_id not in (None, 0):
        raise ConfigError(
            f"this is task {local_id} on its node (SLURM_LOCALID): run one task per node (srun "
            f"--ntasks-per-node=1); torchrun starts the node's GPU processes itself"
        )
    for name in ("SLURM_NODEID", "SLURM_PROCID"):
        rank = _env_int(environ, name)
        if rank is not None:
            return rank
    raise ConfigError("no node rank: run under srun (SLURM_NODEID) or pass --node-rank")


def slurm_plan(request: LaunchRequest, environ: Mapping[str, str]) -> LaunchPlan:
    nodelist = request.nodelist or environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
    if not nodelist:
        raise ConfigError("no SLURM nodelist: run inside an allocation (SLURM_JOB_NODELIST) or pass --nodelist")
    hosts = expand_nodelist(nodelist)
    slurm_nodes = _env_int(environ, "SLURM_NNODES") or _env_int(environ, "SLURM_JOB_NUM_NODES")
    if request.nodelist is None and slurm_nodes is not None and slurm_nodes != len(hosts):
        raise ConfigError(f"SLURM_NNODES={slurm_nodes} but the nodelist {nodelist!r} names {len(hosts)} hosts")
    nodes = request.nodes if request.nodes is not None else len(hosts)
    if not 1 <= nodes <= len(hosts):
        raise ConfigError(f"--nodes {nodes}: the nodelist {nodelist!r} has {len(hosts)} hosts")
    hosts = hosts[:nodes]

    allocated = _gpus_on_node(environ)
    gpus = request.gpus_per_node if request.gpus_per_node is not None else allocated
    if gpus is None:
        raise ConfigError(
            "GPUs per node unknown: allocate with --gpus-per-node (SLURM_GPUS_ON_NODE) or pass --gpus-per-node"
        )
    if allocated is not None and gpus > allocated:
        raise ConfigError(f"--gpus-per-node {gpus}, but SLURM gave each node {allocated} GPUs")

    tp, pp = parallel_sizes(request.script_args)
    check_grid(nodes, gpus, tp, pp)
    check_script(request)
    master_addr = request.master_addr or hosts[0]
    master_port = check_port(request.master_port if request.master_port is not None else default_port(environ))
    env = tuple(resolve_cluster_env(environ).items())
    commands = tuple(
        NodeCommand(
            node_rank=rank, host=host, cwd=request.cwd, env=env,
            argv=(
                request.python, "-m", "torch.distributed.run", f"--nnodes={nodes}", f"--nproc-per-node={gpus}",
                f"--node-rank={rank}", f"--master-addr={master_addr}", f"--master-port={master_port}",
                request.script, *request.script_args,
            ),
        )
        for rank, host in enumerate(hosts)
    )
    return LaunchPlan(
        mode="slurm", hosts=tuple(hosts), gpus_per_node=gpus, master_addr=master_addr, master_port=master_port,
        tp=tp, pp=pp, nodes=commands,
        note="each srun task (one per node) runs the line of its SLURM_NODEID",
    )
