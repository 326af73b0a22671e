# Environment defaults for 8-GPU nodes (NVSwitch inside, InfiniBand between nodes), sourced by the sbatch scripts.
# Each line keeps a value already in the environment: `export NCCL_DEBUG=INFO; sbatch ...` overrides it (sbatch
# passes the submitting environment on), and so does editing the default here. The front end
# (launchers/multinode.py) applies the same defaults in hostfile mode; dnascale/launch/cluster_env.py holds them
# with the same reasons, and tests/test_launch.py keeps the two files identical.

# Inter-node traffic over the Mellanox InfiniBand/RoCE HCAs (prefix match: mlx5_0 ... mlx5_N). A site with a
# storage or management mlx5 port lists the compute HCAs instead (mlx5_0,mlx5_1,...) or excludes one (^mlx5_bond_0).
export NCCL_IB_HCA="${NCCL_IB_HCA:-mlx5}"
# NCCL's bootstrap and socket fallback need a routable interface: never loopback or a docker/VM bridge, which NCCL
# may otherwise pick on hosts that run containers. Sites usually name theirs (bond0, eth0, ib0).
export NCCL_SOCKET_IFNAME="${NCCL_SOCKET_IFNAME:-^lo,docker,virbr}"
# Say why a communicator failed (wrong HCA, unreachable peer) without INFO's per-rank topology dump; INFO shows
# which transports and rings NCCL chose.
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
# NVLink SHARP needs NVSwitch multicast (fabric manager, recent driver) and reserves memory per communicator (we
# create several: TP, DP, world); ZeRO-3 traffic is inter-node all-gather/reduce-scatter, which NVLS does not
# speed up. Set 1 to try it where it is supported.
export NCCL_NVLS_ENABLE="${NCCL_NVLS_ENABLE:-0}"
# megatron-core's ColumnParallelLinear issues the async TP all-reduce of the input gradient, then the weight-gradient
# GEMM, and relies on a single hardware queue to start the all-reduce first (tensor parallelism > 1).
export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"
# torchrun would set 1 per process; give each GPU process a few cores for host-side work. 8 ranks x 8 threads fit a
# 2-socket node (DataLoader workers set themselves to 1 thread).
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"
# On a failed or timed-out collective, abort the communicators and exit (TearDown), so torchrun and srun
# --kill-on-bad-exit end the job instead of every other rank waiting until the time limit.
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
# Every rank's lines reach the job's output file as they are written, so the last ones before a crash are there.
export PYTHONUNBUFFERED="${PYTHONUNBUFFERED:-1}"
