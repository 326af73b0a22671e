"""Run a plan: this node's command (SLURM), or DeepSpeed's runner for all hosts (hostfile).

Each prints the command line it runs to stderr first, so the job log shows the same line --dry-run prints.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile

from dnascale.launch.plan import LaunchPlan, NodeCommand


def exec_node(command: NodeCommand) -> None:
    """Replace this process with the node's launcher, so srun's signals (preemption, time limit) reach torchrun
    directly and its exit status is the task's."""
    print(f"# node {command.node_rank} on {command.host}: {command.shell_line()}", file=sys.stderr, flush=True)
    os.chdir(command.cwd)
    os.execvpe(command.argv[0], list(command.argv), {**os.environ, **dict(command.env)})


def run_deepspeed_runner(plan: LaunchPlan) -> int:
    """Start DeepSpeed's runner with an env file carrying every host's exports; wait for it."""
    assert plan.launcher is not None
    print(f"# {plan.launcher.shell_line()}", file=sys.stderr, flush=True)
    exports = dict(plan.nodes[0].env)
    with tempfile.NamedTemporaryFile("w", prefix="dnascale-ds-env-", suffix=".txt", delete=False) as handle:
        handle.writelines(f"{key}={value}\n" for key, value in exports.items())
        env_file = handle.name
    # An absolute DS_ENV_FILE: DeepSpeed joins the name to ~ and ., and joining an absolute path yields it.
    env = {**os.environ, **dict(plan.launcher.env), "DS_ENV_FILE": env_file}
    try:
        process = subprocess.Popen(list(plan.launcher.argv), cwd=plan.launcher.cwd, env=env)
        # Ctrl-C reaches the runner too (same process group); it stops the remote ranks through pdsh. We wait
        # for it instead of dying first, which would kill it before it cleaned up.
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            return process.wait()
        finally:
            signal.signal(signal.SIGINT, previous)
    finally:
        os.unlink(env_file)
