#!/usr/bin/env python
"""One call that checks the GPU path on a CUDA machine and writes one summary (run it through tools/gpu_check.sh).

    bash tools/gpu_check.sh [--wheels DIR] [--out DIR] [--quick] [--skip STEP]... [--budget STEP=S]...

Steps, in order, each a subprocess with its own time budget and log file (<out>/<step>.log, stdout and stderr):
  env      torch / CUDA / driver / nvcc versions, the device, its memory; key packages   (fails without CUDA)
  install  from --wheels (pip --no-index --no-deps), only the distributions not installed yet; then the repo
           itself (pip install --no-deps -e .) if it is not installed; then checks that the stack imports
  build    python -m dnascale.ops.extensions: builds the csrc kernels; fails if a CUDA backend is unusable
  pytest   pytest -m gpu -q with a junit xml (<out>/pytest-gpu.xml)
  kernels  tools/bench/bench_kernels.py --device cuda --dtype bfloat16: per-kernel GB/s and fraction of peak
  mfu      tools/bench/mfu.py on the four 1.2B presets (auto micro-batch and checkpointing, --profile)

Budgets (seconds; BUDGET_S below, --quick: QUICK_BUDGET_S) add up to at most 6 minutes. Time a step leaves
unused is carried to the later ones, never past the total. A step that runs out of time is killed with all its
children and recorded as "timeout"; a failed step does not stop the later ones. At the end <out>/summary.json and
<out>/summary.md (a table of the steps and the key figures) are written, summary.md is printed, and the exit
status is 1 if any step failed or timed out (0 when all ran or were skipped), 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import ast
import datetime
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
STEPS: tuple[str, ...] = ("env", "install", "build", "pytest", "kernels", "mfu")
# Seconds per step; the full run adds up to 6 minutes, --quick to 4. Where they come from: docs/gpu.md.
BUDGET_S: dict[str, float] = {"env": 10, "install": 30, "build": 75, "pytest": 50, "kernels": 35, "mfu": 160}
QUICK_BUDGET_S: dict[str, float] = {"env": 10, "install": 30, "build": 75, "pytest": 40, "kernels": 20, "mfu": 65}
MFU_PRESETS: tuple[str, ...] = ("encoder-1b2", "enbed-1b2", "dnazen-1b2", "dnachunker-1b2", "enbed-1b2@4096")
QUICK_MFU_PRESETS: tuple[str, ...] = ("encoder-1b2",)
# Modules the stack needs after the install step (pyproject's dependencies that the GPU image lacks or might;
# deepspeed's and zarr's own needs, pydantic, msgspec, ..., come in through their imports), and what they are.
REQUIRED_IMPORTS: dict[str, str] = {
    "torch": "torch", "deepspeed": "deepspeed", "megatron.core": "megatron-core", "webdataset": "webdataset",
    "zarr": "zarr", "pyfaidx": "pyfaidx", "yaml": "pyyaml", "sentencepiece": "sentencepiece",
    "transformers": "transformers", "safetensors": "safetensors", "tokenizers": "tokenizers", "tqdm": "tqdm",
    "hypothesis": "hypothesis (tests/conftest.py)", "dnascale.models.registry": "the repo and its model stack",
}
OPTIONAL_IMPORTS: dict[str, str] = {"wandb": "wandb (metrics; runs use --wandb-mode disabled without it)",
                                    # checked through dnascale's loader: a wheel built without selective_scan_cuda
                                    # cannot `import mamba_ssm`, yet its Triton SSD kernel is usable
                                    "mamba_ssm": "mamba-ssm (DNACHUNKER's Triton SSD scan; else pure torch)",
                                    "flash_attn": "flash-attn (attention backend; else SDPA/flex)"}
PACKAGES = ("torch", "triton", "deepspeed", "megatron-core", "transformers", "mamba-ssm", "flash-attn",
            "causal-conv1d", "dnascale")
STATUSES = ("ok", "failed", "timeout", "skipped")
LOG_TAIL_LINES = 15


class OneLineParser(argparse.ArgumentParser):
    """Bad arguments: one line on stderr (no usage block) and exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


# ---------------------------------------------------------------------------------------------------- arguments


def _budget_item(text: str) -> tuple[str, float]:
    name, sep, value = text.partition("=")
    if not sep or name not in STEPS:
        raise argparse.ArgumentTypeError(f"{text!r}: expected STEP=SECONDS with STEP one of {', '.join(STEPS)}")
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: SECONDS must be a positive number")
    return name, seconds


def _step_name(text: str) -> list[str]:
    names = [name for name in text.split(",") if name]
    for name in names:
        if name not in STEPS:
            raise argparse.ArgumentTypeError(f"unknown step {name!r}; steps: {', '.join(STEPS)}")
    return names


def parse_args(argv=None) -> argparse.Namespace:
    p = OneLineParser(prog="gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--wheels", default=None, metavar="DIR",
                   help="wheel folder for the install step (default: <repo>/.whl when it exists)")
    p.add_argument("--target", default=None, metavar="DIR",
                   help="install the wheels with pip --target DIR (put on PYTHONPATH of the later steps) instead "
                        "of into the running Python's environment")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="logs and summary (default: ./gpu-check-<date>-<time>)")
    p.add_argument("--quick", action="store_true", help="smaller budgets, one preset, fewer reps (4 min)")
    p.add_argument("--skip", action="append", type=_step_name, default=[], metavar="STEP",
                   help=f"skip a step (repeatable or comma-separated): {', '.join(STEPS)}")
    p.add_argument("--budget", action="append", type=_budget_item, default=[], metavar="STEP=S",
                   help="override one step's budget in seconds (repeatable)")
    args = p.parse_args(argv)
    args.skip = sorted({name for names in args.skip for name in names}, key=STEPS.index)
    budgets = dict(QUICK_BUDGET_S if args.quick else BUDGET_S)
    budgets.update(dict(args.budget))
    args.budgets = budgets
    if args.wheels is None and (REPO / ".whl").is_dir():
        args.wheels = str(REPO / ".whl")
    if args.wheels is not None and not Path(args.wheels).is_dir():
        p.error(f"--wheels {args.wheels}: no such directory")
    if args.out is None:
        args.out = f"gpu-check-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    return args


# ---------------------------------------------------------------------------------------------------- the runner


@dataclass
class Step:
    name: str
    command: list[str] | Callable[[float], list[str]]  # a callable gets the step's timeout in seconds
    budget_s: float
    # (stdout text, {earlier step name: StepResult}) -> (figures, failure note or None); also after a failure
    parse: Callable[[str, dict], tuple[dict | None, str | None]] | None = None


@dataclass
class StepResult:
    name: str
    status: str  # one of STATUSES
    rc: int | None = None
    duration_s: float = 0.0
    budget_s: float = 0.0
    timeout_s: float | None = None
    log: str | None = None
    command: list[str] = field(default_factory=list)
    result: dict | None = None
    note: str | None = None


def _pump(stream, log, lock: threading.Lock, keep: list[str] | None) -> None:
    for line in stream:
        with lock:
            log.write(line)
            log.flush()
        if keep is not None:
            keep.append(line)


def _stop(proc: subprocess.Popen) -> None:
    """End the step's process and everything it started (its own process group)."""
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_step(step: Step, out_dir: Path, timeout: float, env: dict, context: dict) -> StepResult:
    """Run one step: stdout and stderr into <out>/<name>.log, killed after `timeout` s, then its parse."""
    command = step.command(timeout) if callable(step.command) else list(step.command)
    log_path = out_dir / f"{step.name}.log"
    result = StepResult(step.name, "ok", budget_s=step.budget_s, timeout_s=round(timeout, 1), log=log_path.name,
                        command=command)
    stdout: list[str] = []
    start = time.monotonic()
    with open(log_path, "w") as log:
        log.write(f"$ {' '.join(command)}\n")
        log.flush()
        try:
            proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                    cwd=REPO, start_new_session=True, errors="replace")
        except OSError as err:
            result.status, result.note = "failed", f"could not start: {err}"
            log.write(f"{result.note}\n")
            return result
        lock = threading.Lock()
        pumps = [threading.Thread(target=_pump, args=(proc.stdout, log, lock, stdout), daemon=True),
                 threading.Thread(target=_pump, args=(proc.stderr, log, lock, None), daemon=True)]
        for pump in pumps:
            pump.start()
        try:
            result.rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _stop(proc)
            result.status, result.note = "timeout", f"killed after {timeout:.0f} s"
        for pump in pumps:
            pump.join(timeout=5)
        result.duration_s = round(time.monotonic() - start, 2)
        if result.status == "ok" and result.rc != 0:
            result.status, result.note = "failed", f"exit status {result.rc}"
        if step.parse is not None:
            try:
                figures, problem = step.parse("".join(stdout), context)
            except Exception as err:  # a parser bug must not hide the step's own outcome
                figures, problem = None, f"could not read the results: {type(err).__name__}: {err}"
            result.result = figures
            if problem:
                if result.status == "ok":
                    result.status = "failed"
                result.note = f"{result.note}; {problem}" if result.note else problem
        if result.status != "ok":
            log.write(f"\n[gpu_check] {step.name}: {result.status} ({result.note})\n")
    return result


def run_steps(steps: list[Step], out_dir: Path, skip: list[str], env: dict, progress=None) -> list[StepResult]:
    """Every step in order; a skipped one is recorded, a failed one does not stop the rest. Unused time carries
    over to later steps; the total never exceeds the sum of the budgets of the steps that run."""
    out_dir.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + sum(step.budget_s for step in steps if step.name not in skip)
    results: list[StepResult] = []
    context: dict[str, StepResult] = {}
    slack = 0.0
    for step in steps:
        if step.name in skip:
            result = StepResult(step.name, "skipped", budget_s=step.budget_s, note="--skip")
        else:
            timeout = max(1.0, min(step.budget_s + slack, deadline - time.monotonic()))
            if progress:
                progress(f"[gpu_check] {step.name} (up to {timeout:.0f} s) ...")
            result = run_step(step, out_dir, timeout, env, context)
            slack = max(0.0, step.budget_s + slack - result.duration_s)
            if progress:
                progress(f"[gpu_check] {step.name}: {result.status} in {result.duration_s:.1f} s"
                         + (f" ({result.note})" if result.note else ""))
        results.append(result)
        context[step.name] = result
    return results


# ---------------------------------------------------------------------------------------------------- parsers


def last_json_line(text: str) -> dict | None:
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return None


def parse_json_output(text: str, context: dict) -> tuple[dict | None, str | None]:
    data = last_json_line(text)
    return data, (None if data is not None else "no JSON line in its output")


def parse_env(text: str, context: dict) -> tuple[dict | None, str | None]:
    data = last_json_line(text)
    if data is None:
        return None, "no JSON line in its output"
    return data, (None if data.get("cuda_available") else "torch sees no CUDA device")


def parse_build(text: str, context: dict) -> tuple[dict | None, str | None]:
    """`python -m dnascale.ops.extensions` prints `<op> {backend: None | reason}`; None means usable."""
    backends: dict[str, dict] = {}
    for line in text.splitlines():
        name, _, rest = line.strip().partition(" ")
        if rest.startswith("{"):
            try:
                value = ast.literal_eval(rest)
            except (ValueError, SyntaxError):
                continue
            if isinstance(value, dict):
                backends[name] = value
    if not backends:
        return None, "no backend report in its output"
    env = context.get("env")
    cuda = bool(env and env.result and env.result.get("cuda_available"))
    broken = [f"{op} cuda: {reasons['cuda']}" for op, reasons in backends.items()
              if cuda and reasons.get("cuda") is not None]
    return {"backends": backends}, ("; ".join(broken) if broken else None)


def parse_junit(path: Path) -> dict:
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {key: sum(int(s.get(key, 0)) for s in suites) for key in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    failed = []
    for case in root.iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            failed.append(f"{case.get('classname', '')}::{case.get('name', '')}")
    counts["failed_tests"] = failed[:20]
    return counts


def make_pytest_parser(junit: Path):
    def parse(text: str, context: dict) -> tuple[dict | None, str | None]:
        if not junit.is_file():
            return None, "no junit xml written"
        counts = parse_junit(junit)
        problem = None
        if counts["failures"] or counts["errors"]:
            problem = f"{counts['failures']} failed, {counts['errors']} errors"
        elif counts["tests"] == 0:
            problem = "no GPU tests collected"
        return counts, problem

    return parse


def make_mfu_parser(json_path: Path):
    def parse(text: str, context: dict) -> tuple[dict | None, str | None]:
        data = last_json_line(text)
        if data is None and json_path.is_file():  # killed part-way: the presets finished so far
            data = json.loads(json_path.read_text())
        if data is None:
            return None, "no results"
        bad = [f"{r['preset']}: {r['status']}" for r in data.get("results", [])
               if r.get("status") in ("oom", "failed", "timeout")]
        return data, ("; ".join(bad) if bad else None)

    return parse


def kernel_rows(kernels: dict | None) -> list[dict]:
    """The kernel bench's {"kernels": {group: {kernel: {us, gb_per_s, fraction_of_peak}}}} as flat rows."""
    rows = []
    for group, members in (kernels or {}).items():
        if not isinstance(members, dict):
            continue
        for name, figures in members.items():
            if isinstance(figures, dict) and "gb_per_s" in figures:
                rows.append({"kernel": f"{group}.{name}", "us": figures.get("us"), "gb_per_s": figures["gb_per_s"],
                             "fraction_of_peak": figures.get("fraction_of_peak")})
    return rows


# ---------------------------------------------------------------------------------------------------- the steps


def build_steps(args, out_dir: Path, python: str = sys.executable) -> list[Step]:
    me = str(Path(__file__).resolve())
    install = [python, me, "_install"] + (["--wheels", str(Path(args.wheels).resolve())] if args.wheels else [])
    install += ["--target", str(Path(args.target).resolve())] if args.target else []
    junit = out_dir / "pytest-gpu.xml"
    mfu_json = out_dir / "mfu.json"
    kernels = [python, str(REPO / "tools" / "bench" / "bench_kernels.py"), "--device", "cuda", "--dtype", "bfloat16"]
    if args.quick:
        kernels += ["--reps", "3"]
    presets = QUICK_MFU_PRESETS if args.quick else MFU_PRESETS

    def mfu_command(timeout: float) -> list[str]:
        command = [python, str(REPO / "tools" / "bench" / "mfu.py"), "--presets", *presets,
                   "--micro-batch", "auto", "--activation-checkpointing", "auto",
                   "--time-budget", str(max(20, int(timeout - 20))), "--out", str(mfu_json)]
        return command + (["--steps", "2", "--warmup", "1"] if args.quick else ["--steps", "3", "--warmup", "1",
                                                                                 "--profile"])

    b = args.budgets
    return [
        Step("env", [python, me, "_env"], b["env"], parse_env),
        Step("install", install, b["install"], parse_json_output),
        Step("build", [python, "-m", "dnascale.ops.extensions"], b["build"], parse_build),
        Step("pytest", [python, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
                        f"--junitxml={junit}", "tests"], b["pytest"], make_pytest_parser(junit)),
        Step("kernels", kernels, b["kernels"], parse_json_output),
        Step("mfu", mfu_command, b["mfu"], make_mfu_parser(mfu_json)),
    ]


def step_environment(args) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", WANDB_MODE=os.environ.get("WANDB_MODE", "disabled"))
    paths = ([str(Path(args.target).resolve())] if args.target else []) + [str(REPO)]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


# ---------------------------------------------------------------------------------------------------- the summary


def _fmt(value, spec: str = "", none: str = "n/a") -> str:
    if value is None:
        return none
    return format(value, spec) if spec else str(value)


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(cell).replace("|", "\\|") for cell in row) + " |" for row in rows]


def key_figures(results: list[StepResult]) -> dict:
    by_name = {r.name: r for r in results}
    figures: dict = {}
    env = by_name.get("env")
    if env and env.result:
        figures["device"] = {key: env.result.get(key) for key in
                             ("device_name", "memory_gib", "torch", "torch_cuda", "driver", "nvcc")}
    tests = by_name.get("pytest")
    if tests and tests.result:
        figures["gpu_tests"] = {k: tests.result[k] for k in ("passed", "failures", "errors", "skipped")}
    bench = by_name.get("kernels")
    if bench and bench.result:
        figures["kernels"] = kernel_rows(bench.result.get("kernels"))
        figures["kernel_speedups"] = {k: bench.result.get(k) for k in
                                      ("ggram_fusion_speedup_vs_dense", "boundary_speedup_vs_eager")}
    mfu = by_name.get("mfu")
    if mfu and mfu.result:
        figures["training"] = [
            {key: r.get(key) for key in ("preset", "status", "micro_batch", "seq_len", "activation_checkpointing",
                                         "tokens_per_s", "mfu", "peak_memory_gib", "predicted_gib")}
            | {"profile_top5": [op["name"] for op in (r.get("profile") or {}).get("top", [])]}
            for r in mfu.result.get("results", [])
        ]
    return figures


def render_markdown(results: list[StepResult], meta: dict) -> str:
    by_name = {r.name: r for r in results}
    failed = [r for r in results if r.status in ("failed", "timeout")]
    env = (by_name.get("env") and by_name["env"].result) or {}
    device = env.get("device_name") or "no CUDA device"
    lines = [f"# GPU check: {device}, {meta['started']}", "",
             f"**{'FAILED' if failed else 'OK'}**: " + (", ".join(f"{r.name} {r.status}" for r in failed)
                                                         if failed else "every step that ran passed")
             + f"; {meta['total_s']:.0f} s in all{', --quick' if meta['quick'] else ''}. Logs: `{meta['out']}`.", ""]
    lines += _md_table(["step", "status", "rc", "time (s)", "budget (s)", "log", "note"],
                       [[r.name, r.status, _fmt(r.rc, none=""), f"{r.duration_s:.1f}", f"{r.budget_s:.0f}",
                         r.log or "", r.note or ""] for r in results])
    if env:
        packages = ", ".join(f"{k} {v}" for k, v in (env.get("packages") or {}).items() if v)
        lines += ["", "## Environment", "",
                  f"- device: {device}, {_fmt(env.get('memory_gib'), '.1f')} GiB, compute capability "
                  f"{_fmt(env.get('capability'))}, {_fmt(env.get('multiprocessors'))} SMs; driver "
                  f"{_fmt(env.get('driver'))}",
                  f"- torch {_fmt(env.get('torch'))} (CUDA {_fmt(env.get('torch_cuda'))}), nvcc "
                  f"{_fmt(env.get('nvcc'), none='not found')}, Python {_fmt(env.get('python'))}",
                  f"- packages: {packages or 'n/a'}"]
    install = by_name.get("install")
    if install and install.result:
        data = install.result
        lines += ["", "## Install", "",
                  f"- installed from wheels: {', '.join(data.get('installed', [])) or 'nothing needed'}; "
                  f"already present: {len(data.get('present', []))}; repo: {data.get('repo', 'n/a')}"]
        if data.get("missing"):
            lines.append(f"- still not importable: {', '.join(data['missing'])}")
        if data.get("optional_missing"):
            lines.append(f"- optional, not importable: {'; '.join(data['optional_missing'])}")
    build = by_name.get("build")
    if build and build.result:
        lines += ["", "## Kernel build", ""]
        for op, backends in build.result["backends"].items():
            state = ", ".join(f"{k} {'ok' if v is None else 'unavailable (' + str(v)[:120] + ')'}"
                              for k, v in backends.items())
            lines.append(f"- {op}: {state}")
    tests = by_name.get("pytest")
    if tests and tests.result:
        t = tests.result
        lines += ["", "## GPU tests (pytest -m gpu)", "",
                  f"{t['passed']} passed, {t['failures']} failed, {t['errors']} errors, {t['skipped']} skipped"]
        lines += [f"- failed: `{name}`" for name in t.get("failed_tests", [])]
    bench = by_name.get("kernels")
    if bench and bench.result:
        data = bench.result
        lines += ["", f"## Kernels (bench_kernels.py, {data.get('dtype', '?')}, peak "
                      f"{_fmt(data.get('peak_gbps'))} GB/s)", ""]
        rows = kernel_rows(data.get("kernels"))
        lines += _md_table(["kernel", "time (us)", "GB/s", "fraction of peak"],
                           [[r["kernel"], _fmt(r["us"]), _fmt(r["gb_per_s"]), _fmt(r["fraction_of_peak"], ".1%")]
                            for r in rows]) if rows else ["(no per-kernel figures: not run on CUDA)"]
        lines += ["", f"Fwd+bwd speed-ups: G-gram fusion {_fmt(data.get('ggram_fusion_speedup_vs_dense'))}x the "
                      f"dense bmm, {_fmt(data.get('ggram_fusion_speedup_vs_dnazen_code'))}x DNAZEN's code; routing "
                      f"boundary {_fmt(data.get('boundary_speedup_vs_eager'))}x eager torch."]
    mfu = by_name.get("mfu")
    if mfu and mfu.result:
        data = mfu.result
        lines += ["", f"## Training throughput and MFU (mfu.py: {data.get('engine')}, {data.get('dtype')}, peak "
                      f"{_fmt(data.get('peak_tflops'))} TFLOP/s, {data.get('steps')} timed steps)", ""]
        rows = []
        for r in data.get("results", []):
            ckpt = r.get("activation_checkpointing")
            rows.append([r.get("preset"), r.get("status"), f"{_fmt(r.get('micro_batch'))} x {_fmt(r.get('seq_len'))}",
                         "on" if ckpt else "off", _fmt(r.get("tokens_per_s"), ",.0f"), _fmt(r.get("mfu"), ".1%"),
                         _fmt(r.get("peak_memory_gib"), ".1f"), _fmt(r.get("predicted_gib"), ".1f"),
                         _fmt(r.get("step_time_s"), ".3f"), (r.get("error") or "")[:80]])
        lines += _md_table(["preset", "status", "micro-batch x seq", "ckpt", "tokens/s", "MFU", "peak mem (GiB)",
                            "predicted (GiB)", "s/step", "error"], rows)
        choices = [f"- {r['preset']}: {r['choice']['reason']}" + (f" (out of memory at {r['choice']['oom_at']})"
                                                                  if r["choice"].get("oom_at") else "")
                   for r in data.get("results", []) if r.get("choice")]
        if choices:
            lines += ["", "Micro-batch and checkpointing:", *choices]
        profiled = [r for r in data.get("results", []) if r.get("profile")]
        if profiled:
            lines += ["", f"Profile, top 5 ops by {profiled[0]['profile']['sort_by'].replace('_', ' ')} per step:"]
            for r in profiled:
                ops = "; ".join(f"`{op['name']}` {op['self_ms']:.2f} ms ({op['fraction']:.0%})"
                                for op in r["profile"]["top"])
                lines.append(f"- {r['preset']}: {ops}")
    problems = [r for r in results if r.status in ("failed", "timeout") and r.log]
    for r in problems:
        tail = log_tail(Path(meta["out"]) / r.log)
        if tail:
            lines += ["", f"## {r.name}: last lines of {r.log}", "", "```", *tail, "```"]
    return "\n".join(lines) + "\n"


def log_tail(path: Path, n: int = LOG_TAIL_LINES) -> list[str]:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return []
    lines = [line.rstrip()[-240:] for line in text.replace("\r", "\n").splitlines() if line.strip()]
    return lines[-n:]


def write_summary(results: list[StepResult], out_dir: Path, meta: dict) -> str:
    failed = [r.name for r in results if r.status in ("failed", "timeout")]
    document = {**meta, "ok": not failed, "failed_steps": failed, "steps": [asdict(r) for r in results],
                "figures": key_figures(results)}
    (out_dir / "summary.json").write_text(json.dumps(document, indent=1))
    markdown = render_markdown(results, meta)
    (out_dir / "summary.md").write_text(markdown)
    return markdown


# ---------------------------------------------------------------------------------------------------- env, install


def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _run_text(command: list[str]) -> str | None:
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def env_report() -> int:
    """The env step: one JSON line; exit status 1 when torch sees no CUDA device."""
    import platform

    report: dict = {"python": platform.python_version(), "executable": sys.executable}
    try:
        import torch

        report.update(torch=torch.__version__, torch_cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
        if report["cuda_available"]:
            props = torch.cuda.get_device_properties(0)
            report.update(device_name=props.name, memory_gib=round(props.total_memory / 2**30, 2),
                          capability=f"{props.major}.{props.minor}", multiprocessors=props.multi_processor_count,
                          device_count=torch.cuda.device_count(), bf16=torch.cuda.is_bf16_supported())
    except ImportError as err:
        report.update(torch=None, cuda_available=False, error=str(err))
    smi = _run_text(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    report["driver"] = smi.splitlines()[0] if smi else None
    nvcc = _run_text(["nvcc", "--version"])
    report["nvcc"] = next((line.split("release")[-1].strip() for line in (nvcc or "").splitlines()
                           if "release" in line), None)
    report["packages"] = {name: _version(name) for name in PACKAGES}
    print(f"torch {report.get('torch')} (CUDA {report.get('torch_cuda')}), device "
          f"{report.get('device_name', 'none')}, {report.get('memory_gib', '?')} GiB, driver {report['driver']}, "
          f"nvcc {report['nvcc']}")
    print(json.dumps(report))
    return 0 if report["cuda_available"] else 1


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def wheel_distribution(filename: str) -> str:
    """'megatron_core-0.16.1-py3-none-any.whl' -> 'megatron-core' (PEP 427 file names)."""
    return _normalise(Path(filename).name.split("-")[0])


def plan_install(wheels: list[str], installed: Callable[[str], str | None]) -> tuple[list[str], list[str]]:
    """(wheel files to install, 'name version' already present); one wheel per distribution (the last file name in
    sorted order when a folder holds several)."""
    chosen: dict[str, str] = {}
    for wheel in sorted(wheels):
        chosen[wheel_distribution(wheel)] = wheel
    todo, present = [], []
    for dist, wheel in sorted(chosen.items()):
        version = installed(dist)
        if version is None:
            todo.append(wheel)
        else:
            present.append(f"{dist} {version}")
    return todo, present


def _importable(module: str) -> str | None:
    """None when `module` imports, else the one-line reason."""
    import importlib

    try:
        importlib.import_module(module)
        return None
    except Exception as err:  # ImportError, or a package whose import fails on this machine
        return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:200]


def _mamba_ssd_unavailable() -> str | None:
    """None when mamba-ssm's Triton SSD kernel loads (by either route of dnascale's loader), else why not."""
    from dnascale.models.dnachunker.mamba_ssm_loader import MambaSSMUnavailable, load_ssd_kernel

    try:
        load_ssd_kernel()
    except MambaSSMUnavailable as err:
        return str(err)
    return None


def install(wheels_dir: str | None, target: str | None) -> int:
    """The install step: missing wheels from `wheels_dir`, the repo (editable), then an import check."""
    import warnings

    warnings.filterwarnings("ignore")
    report: dict = {"wheels_dir": wheels_dir, "target": target, "installed": [], "present": [], "missing": [],
                    "optional_missing": []}
    pip = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
           "--disable-pip-version-check", "-q"]
    rc = 0
    if wheels_dir:
        wheels = sorted(str(p) for p in Path(wheels_dir).glob("*.whl"))
        if target:  # what an earlier run put there counts as installed
            Path(target).mkdir(parents=True, exist_ok=True)
            sys.path.insert(0, target)
        todo, report["present"] = plan_install(wheels, _version)
        if todo:
            command = pip + ["--find-links", wheels_dir] + (["--target", target] if target else []) + todo
            print("$ " + " ".join(command), flush=True)
            if subprocess.run(command).returncode != 0:
                rc = 1
                report["pip_failed"] = True
            else:
                report["installed"] = [wheel_distribution(w) for w in todo]
    else:
        report["note"] = "no wheel folder (--wheels): nothing installed from wheels"
    if _version("dnascale") is not None:
        report["repo"] = f"installed ({_version('dnascale')})"
    elif target:
        report["repo"] = "on PYTHONPATH (not installed: --target given)"
    else:
        command = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                   "--disable-pip-version-check", "-q", "-e", str(REPO)]
        print("$ " + " ".join(command), flush=True)
        ok = subprocess.run(command).returncode == 0
        # The later steps also get the repo on PYTHONPATH, so a failed editable install is not fatal.
        report["repo"] = "installed (editable)" if ok else "editable install failed; on PYTHONPATH"
    for module, what in REQUIRED_IMPORTS.items():
        reason = _importable(module)
        if reason is not None:
            report["missing"].append(f"{module} ({what}): {reason}")
    for module, what in OPTIONAL_IMPORTS.items():
        reason = _mamba_ssd_unavailable() if module == "mamba_ssm" else _importable(module)
        if reason is not None:
            report["optional_missing"].append(f"{what}: {reason}")
    if report["missing"]:
        rc = 1
        print("still not importable: " + "; ".join(report["missing"]), flush=True)
    print(json.dumps(report))
    return rc


# ---------------------------------------------------------------------------------------------------- main


def run_all(args, steps: list[Step] | None = None, env: dict | None = None) -> int:
    out_dir = Path(args.out).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    started = datetime.datetime.now()
    clock = time.monotonic()
    steps = steps if steps is not None else build_steps(args, out_dir)
    env = env if env is not None else step_environment(args)
    results = run_steps(steps, out_dir, args.skip, env, progress=lambda text: print(text, file=sys.stderr,
                                                                                    flush=True))
    meta = {"started": started.isoformat(timespec="seconds"), "total_s": round(time.monotonic() - clock, 1),
            "quick": args.quick, "out": str(out_dir), "budgets_s": {s.name: s.budget_s for s in steps},
            "skipped": args.skip, "wheels": args.wheels, "python": sys.executable}
    markdown = write_summary(results, out_dir, meta)
    print(markdown)
    return 1 if any(r.status in ("failed", "timeout") for r in results) else 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["_env"]:
        return env_report()
    if argv[:1] == ["_install"]:
        p = OneLineParser(prog="gpu_check _install")
        p.add_argument("--wheels", default=None)
        p.add_argument("--target", default=None)
        a = p.parse_args(argv[1:])
        return install(a.wheels, a.target)
    return run_all(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
