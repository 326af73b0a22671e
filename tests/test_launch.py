"""Multi-node launch plans (launchers/multinode.py, dnascale/launch/, launchers/slurm/*.sbatch).

Fast: nothing is launched beyond the front end itself (no torch import), so these run in seconds. The commands
the plans print are parsed back with shlex, i.e. as the shell on each node would read them.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from dnascale.errors import ConfigError, run_cli
from dnascale.launch.cluster_env import CLUSTER_ENV
from dnascale.launch.modes import build_plan
from dnascale.launch.nodelist import expand_nodelist
from dnascale.launch.plan import LaunchRequest
from dnascale.launch.slurm import this_node_rank

REPO = Path(__file__).resolve().parents[1]
FRONT_END = REPO / "launchers" / "multinode.py"
_spec = importlib.util.spec_from_file_location("multinode_launcher", FRONT_END)
FRONT_END_MODULE = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(FRONT_END_MODULE)
SBATCH = {"pretrain": REPO / "launchers/slurm/pretrain.sbatch", "finetune": REPO / "launchers/slurm/finetune.sbatch"}
# Arguments for the training script, with a space inside one of them (it must arrive as one argument).
SCRIPT_ARGS = ["--ds_config", "ds_configs/zero3.json", "--tp", "2", "--pp", "2", "--override", "name=a b",
               "--steps", "10"]
SLURM_4X8 = {"SLURM_JOB_NODELIST": "gpu[01-04]", "SLURM_NNODES": "4", "SLURM_GPUS_ON_NODE": "8",
             "SLURM_JOB_ID": "4242"}


def base_env(home: Path, **extra: str) -> dict[str, str]:
    """A launching environment with nothing of this machine's NCCL/PYTHON/SLURM settings in it."""
    return {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": str(home), **extra}


def front_end(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(FRONT_END), *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=60)


def node_commands(stdout: str) -> list[tuple[dict[str, str], list[str]]]:
    """(environment, argv) of every command line in a dry run (`cd DIR && env K=V ... ARGV`), in order."""
    parsed = []
    for line in stdout.splitlines():
        if line.startswith("#"):
            continue
        words = shlex.split(line)
        assert words[:3] == ["cd", str(REPO), "&&"], line
        words = words[3:]
        env = {}
        if words[0] == "env":
            words = words[1:]
            while "=" in words[0] and not words[0].startswith("/"):
                key, _, value = words.pop(0).partition("=")
                env[key] = value
        parsed.append((env, words))
    return parsed


def _request(**kw) -> LaunchRequest:
    return LaunchRequest(script="launchers/pretrain.py", script_args=(), cwd=str(REPO), python=sys.executable, **kw)


def flag(argv: list[str], name: str) -> str:
    values = [a.split("=", 1)[1] for a in argv if a.startswith(name + "=")]
    assert len(values) == 1, (name, argv)
    return values[0]


# ---------------------------------------------------------------------------------------------------- plans


def test_slurm_4x8_one_torchrun_per_node(tmp_path):
    result = front_end(["--slurm", "--dry-run", "launchers/pretrain.py", *SCRIPT_ARGS],
                       base_env(tmp_path, **SLURM_4X8))
    assert result.returncode == 0, result.stderr
    assert "4 nodes x 8 GPUs = world 32; tp 2 x pp 2 x dp 8; master gpu01:33742" in result.stdout
    commands = node_commands(result.stdout)
    assert len(commands) == 4
    script_at = 8  # python -m torch.distributed.run + 5 flags
    for env, argv in commands:
        assert argv[:3] == [sys.executable, "-m", "torch.distributed.run"]
        assert argv[script_at:] == ["launchers/pretrain.py", *SCRIPT_ARGS]  # verbatim, "name=a b" one word
        assert env == {s.name: s.default for s in CLUSTER_ENV}
    assert [int(flag(a, "--node-rank")) for _, a in commands] == [0, 1, 2, 3]
    assert {(flag(a, "--master-addr"), flag(a, "--master-port")) for _, a in commands} == {("gpu01", "33742")}
    assert {(int(flag(a, "--nnodes")), int(flag(a, "--nproc-per-node"))) for _, a in commands} == {(4, 8)}


def test_hostfile_4x8_is_deepspeeds_per_host_command(tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("# four H800 nodes\nnode-a slots=8\n\nnode-b slots=8  # spare rack\nnode-c slots=8\n"
                        "node-d slots=8\n")
    result = front_end(["--hostfile", str(hostfile), "--dry-run", "launchers/pretrain.py", *SCRIPT_ARGS],
                       base_env(tmp_path))
    assert result.returncode == 0, result.stderr
    commands = node_commands(result.stdout)
    launcher, nodes = commands[0], commands[1:]
    assert launcher[1][:3] == [sys.executable, "-m", "deepspeed.launcher.runner"]
    assert launcher[1][3:9] == ["--hostfile", str(hostfile), "--master_addr", "node-a", "--master_port", "29500"]
    assert launcher[1][9:] == ["launchers/pretrain.py", *SCRIPT_ARGS]
    assert len(nodes) == 4
    for env, argv in nodes:
        assert argv[:4] == [sys.executable, "-u", "-m", "deepspeed.launcher.launch"]
        assert argv[9:] == ["launchers/pretrain.py", *SCRIPT_ARGS]
        assert env["PYTHONPATH"] == str(REPO)  # DeepSpeed's runner prefixes the working directory
        assert {k: env[k] for k in ("OMP_NUM_THREADS", "CUDA_DEVICE_MAX_CONNECTIONS")} == {
            "OMP_NUM_THREADS": "8", "CUDA_DEVICE_MAX_CONNECTIONS": "1"}
    assert [int(flag(a, "--node_rank")) for _, a in nodes] == [0, 1, 2, 3]
    assert {(flag(a, "--master_addr"), flag(a, "--master_port")) for _, a in nodes} == {("node-a", "29500")}
    infos = {flag(a, "--world_info") for _, a in nodes}
    assert len(infos) == 1
    world = json.loads(base64.urlsafe_b64decode(infos.pop()))
    assert world == {h: list(range(8)) for h in ("node-a", "node-b", "node-c", "node-d")}  # 4 x 8 = 32 ranks


def test_deepspeed_env_files_reach_every_host(tmp_path, monkeypatch):
    """~/.deepspeed_env lines (DeepSpeed's own mechanism) are exported on every host and win over our defaults."""
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".deepspeed_env").write_text("NCCL_IB_GID_INDEX=3\nNCCL_DEBUG=TRACE\n")
    hostfile = tmp_path / "hosts"
    hostfile.write_text("a slots=8\nb slots=8\n")
    plan = build_plan("hostfile", _request(hostfile=str(hostfile)), {"NCCL_SOCKET_IFNAME": "bond0"})
    env = dict(plan.nodes[1].env)
    assert (env["NCCL_IB_GID_INDEX"], env["NCCL_DEBUG"], env["NCCL_SOCKET_IFNAME"]) == ("3", "TRACE", "bond0")
    assert plan.nodes[0].env == plan.nodes[1].env


def test_environment_overrides_a_cluster_default(tmp_path):
    result = front_end(["--slurm", "--dry-run", "launchers/pretrain.py"],
                       base_env(tmp_path, NCCL_DEBUG="INFO", NCCL_IB_HCA="mlx5_0,mlx5_3", **SLURM_4X8))
    env, _ = node_commands(result.stdout)[0]
    assert (env["NCCL_DEBUG"], env["NCCL_IB_HCA"], env["OMP_NUM_THREADS"]) == ("INFO", "mlx5_0,mlx5_3", "8")


def test_each_srun_task_runs_the_line_of_its_node_id():
    environ = dict(SLURM_4X8, SLURM_NODEID="2", SLURM_PROCID="2", SLURM_LOCALID="0")
    plan = build_plan("slurm", _request(), environ)
    node = plan.node(this_node_rank(_request(), environ))
    assert (node.node_rank, node.host, flag(list(node.argv), "--node-rank")) == (2, "gpu03", "2")


def test_flags_stand_in_for_an_allocation():
    """A dry run on a laptop: --nodelist / --gpus-per-node instead of SLURM's variables; --nodes keeps the first."""
    plan = build_plan("slurm", _request(nodelist="a[1-2],b[1-3]", gpus_per_node=4, nodes=3, master_port=2000), {})
    assert (plan.hosts, plan.world_size, plan.master_addr, plan.master_port) == (("a1", "a2", "b1"), 12, "a1", 2000)


# ---------------------------------------------------------------------------------------------------- nodelists


@pytest.mark.parametrize("nodelist, hosts", [
    ("gpu[01-04]", ["gpu01", "gpu02", "gpu03", "gpu04"]),
    ("a[1-2],b3", ["a1", "a2", "b3"]),
    ("node[8-10]", ["node8", "node9", "node10"]),
    ("node[08-10]", ["node08", "node09", "node10"]),
    ("x[1,3-4],y[09-11]", ["x1", "x3", "x4", "y09", "y10", "y11"]),
    ("rack[1-2]-n[1,3]", ["rack1-n1", "rack1-n3", "rack2-n1", "rack2-n3"]),
    ("login-7.cluster", ["login-7.cluster"]),
    ("gpu[1-2]-ib", ["gpu1-ib", "gpu2-ib"]),
])
def test_nodelist_expansion(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("nodelist, message", [
    ("gpu[01-04", "never closed"),
    ("gpu01-04]", "without '['"),
    ("gpu[04-01]", "runs backwards"),
    ("gpu[a-b]", "not a number or a range"),
    ("gpu[]", "empty"),
    ("a,,b", "empty host name"),
    ("gpu[1-2],gpu2", "names host gpu2 twice"),
    ("", "empty"),
])
def test_bad_nodelist_is_one_line_error(nodelist, message):
    with pytest.raises(ConfigError, match=re.escape(message)) as err:
        expand_nodelist(nodelist)
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------------------------------------------- errors


# Run as real processes: the tp check, a hostfile error, and the check that must stop a task before it execs.
IN_A_REAL_PROCESS = {"tp_across_nodes", "bad_hostfile_line", "second_task_on_node"}


def _bad_hostfile(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("case", [
    "tp_across_nodes", "tp_not_dividing_node", "tp_pp_not_dividing_world", "bad_hostfile_line",
    "duplicate_host", "unequal_slots", "unknown_mode", "no_mode", "second_task_on_node", "nodes_mismatch",
])
def test_user_errors_are_one_line_exit_2(tmp_path, monkeypatch, capsys, case):
    slurm = base_env(tmp_path, **SLURM_4X8)
    two_nodes = base_env(tmp_path, **dict(SLURM_4X8, SLURM_JOB_NODELIST="gpu[1-2]", SLURM_NNODES="2"))
    cases = {
        "tp_across_nodes": (["--slurm", "--dry-run", "launchers/pretrain.py", "--tp", "16"], slurm,
                            "--tp 16 must divide the 8 GPUs of a node: tensor parallelism across nodes"),
        "tp_not_dividing_node": (["--slurm", "--dry-run", "launchers/pretrain.py", "--tp=3"], slurm,
                                 "--tp 3 must divide the 8 GPUs"),
        "tp_pp_not_dividing_world": (["--slurm", "--dry-run", "launchers/pretrain.py", "--tp", "8", "--pp", "3"],
                                     two_nodes, "tp*pp = 8*3 = 24 does not divide the world of 2 nodes x 8 GPUs = 16"),
        "bad_hostfile_line": (["--hostfile", _bad_hostfile(tmp_path, "hosts", "a slots=8\n# ok\nb slot=8\n"),
                               "--dry-run", "launchers/pretrain.py"], slurm,
                              f"{tmp_path / 'hosts'}:3: expected 'HOST slots=N', got 'b slot=8'"),
        "duplicate_host": (["--hostfile", _bad_hostfile(tmp_path, "dup", "a slots=8\na slots=8\n"), "--dry-run",
                            "launchers/pretrain.py"], slurm, "dup:2: host a is listed twice (first on line 1)"),
        "unequal_slots": (["--hostfile", _bad_hostfile(tmp_path, "uneven", "a slots=8\nb slots=4\n"), "--dry-run",
                           "launchers/pretrain.py"], slurm, "uneven:2: b has slots=4 but a has slots=8"),
        "unknown_mode": (["--mode", "mpi", "--dry-run", "launchers/pretrain.py"], slurm,
                         "unknown launch mode 'mpi': choose one of slurm, hostfile"),
        "no_mode": (["--dry-run", "launchers/pretrain.py"], slurm, "no launch mode: pass --slurm or --hostfile FILE"),
        # Refused before anything is executed: 8 srun tasks per node would start 8 torchruns per node.
        "second_task_on_node": (["--slurm", "launchers/pretrain.py"],
                                dict(slurm, SLURM_NODEID="0", SLURM_LOCALID="3"), "this is task 3 on its node"),
        "nodes_mismatch": (["--slurm", "--dry-run", "launchers/pretrain.py"], dict(slurm, SLURM_NNODES="8"),
                           "SLURM_NNODES=8 but the nodelist 'gpu[01-04]' names 4 hosts"),
    }
    args, env, message = cases[case]
    if case in IN_A_REAL_PROCESS:
        result = front_end(args, env)
        status, stdout, stderr = result.returncode, result.stdout, result.stderr
    else:  # the same main() and run_cli, in this process (a python start-up per case would cost more than the test)
        for key in list(os.environ):
            monkeypatch.delenv(key)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        monkeypatch.chdir(REPO)
        with pytest.raises(SystemExit) as exited:
            run_cli(lambda: FRONT_END_MODULE.main(args))
        status, (stdout, stderr) = exited.value.code, capsys.readouterr()
    assert status == 2, stdout + stderr
    assert stdout == "" and "Traceback" not in stderr
    assert stderr.count("\n") == 1 and stderr.startswith("error: "), stderr
    assert message in stderr, stderr


@pytest.mark.parametrize("kw, environ, message", [
    ({"hostfile": "/nonexistent/hosts"}, {}, "hostfile /nonexistent/hosts does not exist"),
    ({}, {"SLURM_JOB_NODELIST": "gpu1"}, "GPUs per node unknown"),
    ({}, {}, "no SLURM nodelist"),
    ({"nodelist": "gpu1", "gpus_per_node": 16}, {"SLURM_GPUS_ON_NODE": "8"}, "SLURM gave each node 8 GPUs"),
    ({"nodelist": "gpu1", "gpus_per_node": 8, "master_port": 70000}, {}, "not a TCP port"),
])
def test_plan_errors(kw, environ, message):
    mode = "hostfile" if "hostfile" in kw else "slurm"
    with pytest.raises(ConfigError, match=re.escape(message)):
        build_plan(mode, _request(**kw), environ)


def test_missing_script_and_bad_tp_value():
    with pytest.raises(ConfigError, match="training script launchers/nope.py not found"):
        build_plan("slurm", LaunchRequest(script="launchers/nope.py", script_args=(), cwd=str(REPO),
                                          python=sys.executable, nodelist="g1", gpus_per_node=8), {})
    with pytest.raises(ConfigError, match="--tp 'two' must be a positive integer"):
        build_plan("slurm", LaunchRequest(script="launchers/pretrain.py", script_args=("--tp", "two"),
                                          cwd=str(REPO), python=sys.executable, nodelist="g1", gpus_per_node=8), {})


def test_node_rank_outside_the_plan():
    plan = build_plan("slurm", _request(nodelist="g[1-2]", gpus_per_node=8), {})
    with pytest.raises(ConfigError, match="node rank 2 is outside this plan's 2 nodes"):
        plan.node(2)


# ---------------------------------------------------------------------------------------------------- sbatch


@pytest.mark.parametrize("name", sorted(SBATCH))
def test_sbatch_scripts_parse(name):
    result = subprocess.run(["bash", "-n", str(SBATCH[name])], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def _stub_scontrol(bin_dir: Path, hosts: list[str], marker: Path) -> None:
    """Stands in for SLURM's scontrol, absent here: `scontrol show hostnames LIST` prints one host a line."""
    bin_dir.mkdir()
    script = bin_dir / "scontrol"
    script.write_text("#!/bin/sh\n"
                      f"[ \"$1 $2\" = 'show hostnames' ] || exit 1\ntouch {shlex.quote(str(marker))}\n"
                      f"printf '%s\\n' {' '.join(hosts)}\n")
    script.chmod(0o755)


@pytest.mark.parametrize("name, script_args", [
    ("pretrain", SCRIPT_ARGS),
    ("finetune", ["--ds_config", "ds_configs/zero3.json", "--task", "gue/prom_core_tata", "--out", "runs/ft a"]),
])
@pytest.mark.parametrize("scontrol", [False, True], ids=["front-end-expands", "scontrol"])
def test_sbatch_dry_run_prints_the_front_ends_plan(tmp_path, name, script_args, scontrol):
    env = base_env(tmp_path, **SLURM_4X8)
    expected = front_end(["--slurm", "--dry-run", f"launchers/{name}.py", *script_args], env)
    assert expected.returncode == 0, expected.stderr
    marker = tmp_path / "scontrol-ran"
    if scontrol:
        _stub_scontrol(tmp_path / "bin", ["gpu01", "gpu02", "gpu03", "gpu04"], marker)
        env["PATH"] = f"{tmp_path / 'bin'}:{env['PATH']}"
    # Run from elsewhere, as sbatch does (its copy of the script lives in a spool directory).
    result = subprocess.run(
        ["bash", str(SBATCH[name]), *script_args], cwd=tmp_path, capture_output=True, text=True, timeout=60,
        env=dict(env, DNASCALE_DRY_RUN="1", PYTHON=sys.executable, SLURM_SUBMIT_DIR=str(REPO)),
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected.stdout
    assert marker.exists() == scontrol
    assert len(node_commands(result.stdout)) == 4


def test_cluster_env_sh_sets_the_python_defaults(tmp_path):
    """launchers/slurm/cluster_env.sh (what the sbatch scripts source) and dnascale/launch/cluster_env.py agree,
    and a value already in the environment survives the sourcing."""
    dump = "source launchers/slurm/cluster_env.sh && env -0"
    env = base_env(tmp_path)
    out = subprocess.run(["bash", "-c", dump], cwd=REPO, env=env, capture_output=True, text=True, check=True).stdout
    sourced = dict(item.split("=", 1) for item in out.split("\0") if item)
    assert {k: v for k, v in sourced.items() if k not in env and k not in ("PWD", "SHLVL", "_", "OLDPWD")} == {
        s.name: s.default for s in CLUSTER_ENV}
    out = subprocess.run(["bash", "-c", dump], cwd=REPO, env=dict(env, NCCL_DEBUG="INFO"), capture_output=True,
                         text=True, check=True).stdout
    assert "NCCL_DEBUG=INFO" in out.split("\0")
