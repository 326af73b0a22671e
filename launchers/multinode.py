#!/usr/bin/env python
"""Launch a training script on N nodes x G GPUs, under SLURM or from a DeepSpeed hostfile.

    python launchers/multinode.py --slurm --dry-run launchers/pretrain.py --ds_config ds_configs/zero3.json --tp 2
    srun --ntasks-per-node=1 python launchers/multinode.py --slurm launchers/pretrain.py ...  # launchers/slurm/*.sbatch
    python launchers/multinode.py --hostfile hostfile --dry-run launchers/pretrain.py --ds_config ds_configs/zero3.json
    python launchers/multinode.py --hostfile hostfile launchers/finetune.py --task TASK --out runs/ft ...

--dry-run prints every node's exact command (environment and command line) and starts nothing. Without it,
--slurm runs this node's command (the one of its SLURM_NODEID) and --hostfile hands the launch to DeepSpeed's
runner (`deepspeed --hostfile`), which starts the printed command on every host. Front-end options go before
the script; everything after the script is passed to every rank verbatim. Details: docs/cluster.md.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from dnascale.errors import ConfigError, run_cli  # noqa: E402
from dnascale.launch.execute import exec_node, run_deepspeed_runner  # noqa: E402
from dnascale.launch.modes import build_plan  # noqa: E402
from dnascale.launch.plan import LaunchRequest  # noqa: E402
from dnascale.launch.slurm import this_node_rank  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--slurm", action="store_true", help="SLURM allocation: one torchrun per node (srun task)")
    p.add_argument("--hostfile", metavar="FILE", help="DeepSpeed hostfile ('HOST slots=N' lines)")
    p.add_argument("--mode", metavar="NAME", help="the launch mode by name: slurm (= --slurm) or hostfile")
    p.add_argument("--nodes", type=int, help="nodes to use (default: all of the allocation / hostfile)")
    p.add_argument("--gpus-per-node", type=int, help="(default: SLURM_GPUS_ON_NODE / the hostfile's slots)")
    p.add_argument("--nodelist", help="SLURM host list, e.g. gpu[01-04] (default: SLURM_JOB_NODELIST)")
    p.add_argument("--master-addr", help="rendezvous host (default: the first node)")
    p.add_argument("--master-port", type=int,
                   help="rendezvous port (default: 29500; under SLURM 29500 + job id mod 10000)")
    p.add_argument("--node-rank", type=int, help="this node's rank (default: SLURM_NODEID)")
    p.add_argument("--dry-run", action="store_true", help="print every node's command, run nothing")
    p.add_argument("script", help="launchers/pretrain.py, launchers/finetune.py, ...")
    p.add_argument("script_args", nargs=argparse.REMAINDER, help="passed to the script verbatim")
    return p.parse_args(argv)


def _mode(args: argparse.Namespace) -> str:
    given = [m for m, on in (("slurm", args.slurm), ("hostfile", args.hostfile is not None), (args.mode, args.mode))
             if on]
    if not given:
        raise ConfigError("no launch mode: pass --slurm or --hostfile FILE")
    if len(set(given)) > 1:
        raise ConfigError(f"choose one launch mode, not {' and '.join(given)}")
    return given[0]


def main(argv=None) -> int:
    args = parse_args(argv)
    mode = _mode(args)
    request = LaunchRequest(
        script=args.script, script_args=tuple(args.script_args), cwd=os.getcwd(), python=sys.executable,
        nodes=args.nodes, gpus_per_node=args.gpus_per_node, master_addr=args.master_addr,
        master_port=args.master_port, node_rank=args.node_rank, nodelist=args.nodelist, hostfile=args.hostfile,
    )
    plan = build_plan(mode, request, os.environ)
    if args.dry_run:
        print(plan.describe())
        return 0
    if plan.launcher is not None:
        return run_deepspeed_runner(plan)
    exec_node(plan.node(this_node_rank(request, os.environ)))
    return 0  # not reached: exec_node replaces this process


if __name__ == "__main__":
    run_cli(main)
