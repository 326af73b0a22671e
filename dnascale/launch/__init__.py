"""Multi-node launch plans: which command every node of a SLURM allocation or a DeepSpeed hostfile runs.

Pure Python and free of torch, so `launchers/multinode.py --dry-run` answers in a fraction of a second on a
login node. `plan.py` holds the typed plan and its checks, `slurm.py` and `hostfile.py` build it for one
launch mode each, `modes.py` names them, `nodelist.py` expands SLURM host lists, `cluster_env.py` holds the
NCCL/thread defaults and `execute.py` runs this node's part.
"""
