"""Environment defaults for 8-GPU nodes (H800/H100 class: NVSwitch inside, InfiniBand between nodes).

Each is a default, never a decision: a variable already set in the launching environment wins (export it before
`sbatch` or `launchers/multinode.py`). `launchers/slurm/cluster_env.sh` sets the same defaults for the sbatch
scripts, so a site edits one readable file; tests/test_launch.py keeps the two identical.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping


@dataclass(frozen=True)
class ClusterSetting:
    name: str
    default: str
    why: str


CLUSTER_ENV: tuple[ClusterSetting, ...] = (
    ClusterSetting(
        "NCCL_IB_HCA", "mlx5",
        "use the Mellanox InfiniBand/RoCE HCAs for inter-node traffic (prefix match: mlx5_0 ... mlx5_N); a site "
        "with a storage or management mlx5 port lists the compute HCAs instead, e.g. =mlx5_0,mlx5_1,... or "
        "excludes the others with ^mlx5_bond_0",
    ),
    ClusterSetting(
        "NCCL_SOCKET_IFNAME", "^lo,docker,virbr",
        "NCCL's bootstrap and its socket fallback must use a routable interface: never loopback or a "
        "container/VM bridge (NCCL may pick one on hosts that run docker); a site sets its own, e.g. bond0",
    ),
    ClusterSetting(
        "NCCL_DEBUG", "WARN",
        "print why a communicator failed (wrong HCA, unreachable peer) without INFO's per-rank topology dump; "
        "set INFO to see which transports and rings NCCL chose",
    ),
    ClusterSetting(
        "NCCL_NVLS_ENABLE", "0",
        "NVLink SHARP needs NVSwitch multicast (fabric manager, recent driver) and reserves extra memory per "
        "communicator, and we create several (TP, DP, world); ZeRO-3's traffic is inter-node all-gather and "
        "reduce-scatter, which NVLS does not speed up. Set 1 to try it on a node where it is supported",
    ),
    ClusterSetting(
        "CUDA_DEVICE_MAX_CONNECTIONS", "1",
        "megatron-core's ColumnParallelLinear issues the async TP all-reduce of the input gradient and then the "
        "weight-gradient GEMM, and relies on a single hardware queue to start the all-reduce first (tensor "
        "parallelism > 1)",
    ),
    ClusterSetting(
        "OMP_NUM_THREADS", "8",
        "torchrun would set 1 per process; intra-op CPU work (collation, host-side ops) gets a few cores per "
        "GPU process instead, and 8 ranks x 8 threads stays within a 2-socket node's cores (DataLoader "
        "workers set themselves to 1 thread)",
    ),
    ClusterSetting(
        "TORCH_NCCL_ASYNC_ERROR_HANDLING", "1",
        "on a failed or timed-out collective, abort the NCCL communicators and exit the process (TearDown), so "
        "torchrun and srun --kill-on-bad-exit end the job instead of leaving every other rank waiting until "
        "the time limit (torch's default 3 exits without aborting the communicators)",
    ),
    ClusterSetting(
        "PYTHONUNBUFFERED", "1",
        "every rank's log lines reach the job's output file when they are written, not when a buffer fills, "
        "so the last lines before a crash or hang are there",
    ),
)


def resolve_cluster_env(environ: Mapping[str, str]) -> dict[str, str]:
    """Every cluster setting, the launching environment's value where it has one, else the default."""
    return {s.name: environ.get(s.name, s.default) for s in CLUSTER_ENV}
