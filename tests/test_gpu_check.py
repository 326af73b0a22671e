"""tools/gpu_check.py (the one-call GPU check) and tools/bench/mfu.py, on CPU: argument parsing, the step runner
(success, failure, timeout, skip, carried-over time, exit status), the summary from canned outputs of the real tools,
and one real CPU run of mfu.py on the tiny encoder (tokens/s and MFU as defined)."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


gc = _load("gpu_check_under_test", REPO / "tools" / "gpu_check.py")
mfu = _load("mfu_under_test", REPO / "tools" / "bench" / "mfu.py")
PY = sys.executable


def py(code: str) -> list[str]:
    return [PY, "-c", code]


# ---------------------------------------------------------------------------------------------------- arguments


def test_defaults_fit_six_minutes(tmp_path):
    args = gc.parse_args([])
    assert args.skip == [] and not args.quick
    assert args.budgets == gc.BUDGET_S
    assert list(gc.BUDGET_S) == list(gc.STEPS) == ["env", "install", "build", "pytest", "kernels", "mfu"]
    assert sum(gc.BUDGET_S.values()) <= 360
    assert sum(gc.QUICK_BUDGET_S.values()) < sum(gc.BUDGET_S.values())
    assert args.out.startswith("gpu-check-")
    steps = gc.build_steps(args, tmp_path)
    assert [s.name for s in steps] == list(gc.STEPS)
    assert [s.budget_s for s in steps] == [gc.BUDGET_S[name] for name in gc.STEPS]
    bench = steps[4].command
    assert bench[-4:] == ["--device", "cuda", "--dtype", "bfloat16"]
    mfu_cmd = steps[5].command(160.0)
    first = mfu_cmd.index("--presets") + 1
    assert mfu_cmd[first:first + len(gc.MFU_PRESETS)] == list(gc.MFU_PRESETS)
    assert "enbed-1b2@4096" in gc.MFU_PRESETS  # ENBED's MFU goal is set at 4k as well as at its own 16k
    assert "--profile" in mfu_cmd and mfu_cmd[mfu_cmd.index("--time-budget") + 1] == "140"
    assert steps[3].command[2:5] == ["pytest", "-m", "gpu"]


def test_quick_skip_and_budget(tmp_path):
    args = gc.parse_args(["--quick", "--skip", "mfu", "--skip", "install,env", "--budget", "pytest=12",
                          "--out", str(tmp_path)])
    assert args.skip == ["env", "install", "mfu"]  # in step order, deduplicated
    assert args.budgets == {**gc.QUICK_BUDGET_S, "pytest": 12.0}
    steps = gc.build_steps(args, tmp_path)
    mfu_cmd = steps[5].command(65.0)
    assert "--profile" not in mfu_cmd and mfu_cmd[mfu_cmd.index("--steps") + 1] == "2"
    assert "--reps" in steps[4].command


@pytest.mark.parametrize("argv, message", [
    (["--skip", "bogus"], "unknown step 'bogus'"),
    (["--skip", "env,nope"], "unknown step 'nope'"),
    (["--budget", "env=0"], "positive"),
    (["--budget", "env=ten"], "positive"),
    (["--budget", "gpu=3"], "STEP=SECONDS"),
    (["--wheels", "/no/such/wheel/dir"], "no such directory"),
    (["--frobnicate"], "unrecognized arguments"),
])
def test_bad_values_give_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        gc.parse_args(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("gpu_check: error:") and message in err


# ---------------------------------------------------------------------------------------------------- the runner


def _parse_seen(seen: list):
    def parse(text, context):
        seen.append(sorted(context))
        return gc.parse_json_output(text, context)

    return parse


def test_runner_statuses_logs_and_later_steps(tmp_path):
    seen: list = []
    steps = [
        gc.Step("slow", py("import time; print('started', flush=True); time.sleep(30)"), 1.0),
        gc.Step("good", py("import json, sys; print('hello'); print('to stderr', file=sys.stderr); "
                           "print(json.dumps({'x': 1}))"), 5.0, _parse_seen(seen)),
        gc.Step("bad", py("import sys; print('boom', file=sys.stderr); sys.exit(3)"), 5.0),
        gc.Step("skipped", py("raise SystemExit(9)"), 5.0),
        gc.Step("after", py("print('still ran')"), 5.0),
    ]
    start = time.monotonic()
    results = gc.run_steps(steps, tmp_path, ["skipped"], env=None)
    assert time.monotonic() - start < 20
    by = {r.name: r for r in results}
    assert [r.name for r in results] == ["slow", "good", "bad", "skipped", "after"]
    assert by["slow"].status == "timeout" and by["slow"].rc is None and 0.9 < by["slow"].duration_s < 10
    assert "started" in (tmp_path / "slow.log").read_text()
    assert by["good"].status == "ok" and by["good"].rc == 0 and by["good"].result == {"x": 1}
    good_log = (tmp_path / "good.log").read_text()
    assert "hello" in good_log and "to stderr" in good_log
    assert seen == [["slow"]]  # the parser saw the earlier steps' results
    assert by["bad"].status == "failed" and by["bad"].rc == 3 and "exit status 3" in by["bad"].note
    assert "boom" in (tmp_path / "bad.log").read_text()
    assert by["skipped"].status == "skipped" and by["skipped"].log is None
    assert not (tmp_path / "skipped.log").exists()
    assert by["after"].status == "ok" and "still ran" in (tmp_path / "after.log").read_text()
    assert all(r.duration_s >= 0 for r in results)


def test_unused_time_carries_over(tmp_path):
    steps = [gc.Step("quick", py("pass"), 6.0),
             gc.Step("needs_more", py("import time; time.sleep(2.5)"), 1.0)]
    quick, needs_more = gc.run_steps(steps, tmp_path, [], env=None)
    assert quick.status == "ok"
    assert needs_more.status == "ok", needs_more.note  # 1 s of its own + what "quick" left
    assert 4.0 < needs_more.timeout_s <= 7.0


def test_parser_failure_marks_step_failed(tmp_path):
    steps = [gc.Step("nojson", py("print('no json here')"), 5.0, gc.parse_json_output)]
    (result,) = gc.run_steps(steps, tmp_path, [], env=None)
    assert result.status == "failed" and result.rc == 0 and "no JSON" in result.note


def test_run_all_exit_status_and_summary_files(tmp_path):
    args = gc.parse_args(["--out", str(tmp_path / "a")])
    ok = [gc.Step("env", py("print('fine')"), 5.0), gc.Step("install", py("raise SystemExit(1)"), 5.0)]
    assert gc.run_all(args, steps=ok, env=None) == 1
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["ok"] is False and summary["failed_steps"] == ["install"]
    assert [s["status"] for s in summary["steps"]] == ["ok", "failed"]
    markdown = (tmp_path / "a" / "summary.md").read_text()
    assert "**FAILED**" in markdown and "| install | failed | 1 |" in markdown
    args = gc.parse_args(["--out", str(tmp_path / "b"), "--skip", "install"])
    assert gc.run_all(args, steps=ok, env=None) == 0
    assert "**OK**" in (tmp_path / "b" / "summary.md").read_text()


def test_real_env_step(tmp_path):
    """The real wiring: only the env step, through main(); it fails (exit 1) where torch sees no CUDA."""
    import torch

    rc = gc.main(["--out", str(tmp_path), "--skip", "install,build,pytest,kernels,mfu"])
    summary = json.loads((tmp_path / "summary.json").read_text())
    env = summary["steps"][0]
    assert env["result"]["torch"] == torch.__version__
    assert env["result"]["cuda_available"] is torch.cuda.is_available()
    assert rc == (0 if torch.cuda.is_available() else 1)
    if not torch.cuda.is_available():
        assert env["status"] == "failed" and "no CUDA device" in env["note"]
    assert [s["status"] for s in summary["steps"][1:]] == ["skipped"] * 5


# ---------------------------------------------------------------------------------------------------- install


def test_plan_install_only_what_is_missing():
    assert gc.wheel_distribution("megatron_core-0.16.1-py3-none-any.whl") == "megatron-core"
    assert gc.wheel_distribution("/w/google_crc32c-1.7.1-cp312-cp312-manylinux_2_17_x86_64.whl") == "google-crc32c"
    wheels = ["/w/deepspeed-0.19.8-py3-none-any.whl", "/w/megatron_core-0.16.1-py3-none-any.whl",
              "/w/PyYAML-6.0.2-cp312-cp312-manylinux_2_17_x86_64.whl"]
    present = {"pyyaml": "6.0.1"}
    todo, already = gc.plan_install(wheels, present.get)
    assert todo == wheels[:2] and already == ["pyyaml 6.0.1"]


# ---------------------------------------------------------------------------------------------------- summary

# What tools/bench/bench_kernels.py prints last on CUDA: its `summary` dict.
CANNED_KERNELS = {
    "device": "cuda", "device_name": "NVIDIA H100 80GB HBM3", "dtype": "bfloat16", "threads": 16,
    "ggram_fusion_speedup_vs_dense": 3.41, "ggram_fusion_speedup_vs_dnazen_code": 9.8,
    "ggram_fusion_speedup_vs_reference": 5.2, "boundary_speedup_vs_eager": 6.75,
    "boundary_speedup_vs_eager_by_hidden": {"256": 6.75, "640": 8.1},
    "ms": {"ggram": {"extension": 0.21, "reference": 1.1, "dense_bmm": 0.72, "dnazen_code": 2.06},
           "boundary_d256": {"extension": 0.08, "reference": 0.54},
           "boundary_d640": {"extension": 0.12, "reference": 0.97}},
    "matching_bytes": {"csr": 123456, "dense_matrix_fp32": 1048576}, "quick": False, "omp_num_threads": None,
    "kernels": {
        "ggram": {"fwd": {"us": 35.2, "gb_per_s": 1342.5, "fraction_of_peak": 0.401},
                  "grad_g_deterministic": {"us": 20.1, "gb_per_s": 1600.0, "fraction_of_peak": 0.478},
                  "grad_g_atomic": {"us": 28.0, "gb_per_s": 1150.2, "fraction_of_peak": 0.343}},
        "boundary_d256": {"fwd": {"us": 12.5, "gb_per_s": 1010.0, "fraction_of_peak": 0.301},
                          "bwd": {"us": 18.0, "gb_per_s": 1250.0, "fraction_of_peak": 0.373}},
        "boundary_d640": {"fwd": {"us": 25.0, "gb_per_s": 1700.0, "fraction_of_peak": 0.507},
                          "bwd": {"us": 40.0, "gb_per_s": 1900.0, "fraction_of_peak": 0.567}},
    },
    "peak_gbps": 3350.0,
}


def _mfu_record(preset, status="ok", **extra):
    record = {"preset": preset, "family": preset.split("-")[0], "status": status, "micro_batch": 4, "seq_len": 4096,
              "activation_checkpointing": False, "choice": {"reason": "micro-batch 4, checkpointing off: ...",
                                                            "auto": True, "oom_at": []}}
    return record | extra


CANNED_MFU = {
    "tool": "mfu", "device": "cuda", "device_name": "NVIDIA H100 80GB HBM3", "device_memory_gib": 79.6,
    "torch": "2.11.0+cu130", "engine": "deepspeed-zero3", "dtype": "bfloat16", "peak_tflops": 989.0,
    "peak_source": "dnascale.train.metrics.PEAK_FLOPS", "steps": 3, "warmup": 1, "profile": True,
    "results": [
        _mfu_record("encoder-1b2", tokens_per_s=41234.5, mfu=0.4012, step_time_s=0.397, peak_memory_gib=46.3,
                    predicted_gib=47.3, flops_per_token=9.6e9,
                    profile={"sort_by": "self_cuda_time", "steps": 2, "top": [
                        {"name": "aten::mm", "self_ms": 180.2, "fraction": 0.61, "calls": 300},
                        {"name": "aten::_flash_attention_backward", "self_ms": 40.0, "fraction": 0.13, "calls": 24},
                        {"name": "aten::_flash_attention_forward", "self_ms": 20.0, "fraction": 0.07, "calls": 24},
                        {"name": "aten::add_", "self_ms": 10.0, "fraction": 0.03, "calls": 900},
                        {"name": "aten::copy_", "self_ms": 8.0, "fraction": 0.03, "calls": 700}]}),
        _mfu_record("dnachunker-1b2", status="oom", error="CUDA out of memory. Tried to allocate 2.00 GiB",
                    choice={"reason": "micro-batch 4 ...", "auto": True, "oom_at": [4, 2]}),
    ],
}

CANNED_JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" errors="0" failures="1"
skipped="1" tests="9"><testcase classname="tests.test_ops_ggram_fusion" name="test_cuda_matches_reference"/>
<testcase classname="tests.test_ssm_scans" name="test_mamba_ssm"><failure message="boom">x</failure></testcase>
</testsuite></testsuites>"""


def _result(name, status="ok", **fields):
    return gc.StepResult(name, status, rc=0 if status == "ok" else 1, duration_s=1.5, budget_s=gc.BUDGET_S[name],
                         log=f"{name}.log", **fields)


def test_parsers_on_canned_outputs(tmp_path):
    env = _result("env", result={"cuda_available": True, "device_name": "NVIDIA H100 80GB HBM3"})
    build_text = ("routing_boundary {'reference': None, 'cpu': None, 'cuda': None}\n"
                  "ggram_fusion {'reference': None, 'cpu': None, 'cuda': 'nvcc failed: error in fusion.cu'}\n")
    figures, problem = gc.parse_build(build_text, {"env": env})
    assert figures["backends"]["routing_boundary"]["cuda"] is None
    assert problem == "ggram_fusion cuda: nvcc failed: error in fusion.cu"
    no_cuda = _result("env", result={"cuda_available": False})
    assert gc.parse_build(build_text, {"env": no_cuda})[1] is None  # CPU: a missing CUDA backend is expected
    assert gc.parse_env(json.dumps({"cuda_available": False}), {})[1] == "torch sees no CUDA device"
    text = "device cuda (NVIDIA H100 80GB HBM3) ...\nggram kernels alone: {...}\n" + json.dumps(CANNED_KERNELS)
    assert gc.parse_json_output(text, {})[0] == CANNED_KERNELS
    junit = tmp_path / "j.xml"
    junit.write_text(CANNED_JUNIT)
    counts, problem = gc.make_pytest_parser(junit)("", {})
    assert (counts["tests"], counts["passed"], counts["failures"], counts["skipped"]) == (9, 7, 1, 1)
    assert counts["failed_tests"] == ["tests.test_ssm_scans::test_mamba_ssm"] and problem == "1 failed, 0 errors"
    assert gc.make_pytest_parser(tmp_path / "none.xml")("", {})[1] == "no junit xml written"
    # mfu: a run killed part-way leaves its --out file; a preset that ran out of memory fails the step
    partial = tmp_path / "mfu.json"
    partial.write_text(json.dumps(CANNED_MFU))
    data, problem = gc.make_mfu_parser(partial)("encoder-1b2: ...\n", {})
    assert data == CANNED_MFU and problem == "dnachunker-1b2: oom"


def test_summary_from_canned_results(tmp_path):
    results = [
        _result("env", result={"cuda_available": True, "device_name": "NVIDIA H100 80GB HBM3", "memory_gib": 79.2,
                               "torch": "2.11.0+cu130", "torch_cuda": "13.0", "capability": "9.0",
                               "multiprocessors": 132, "driver": "580.159.04", "nvcc": "13.0, V13.0.88",
                               "python": "3.12.3", "packages": {"torch": "2.11.0+cu130", "deepspeed": "0.19.8"}}),
        _result("install", result={"installed": ["deepspeed", "megatron-core"], "present": ["einops 0.8"],
                                   "repo": "installed (editable)", "missing": [],
                                   "optional_missing": ["mamba-ssm (...): ImportError: selective_scan_cuda"]}),
        _result("build", result={"backends": {"ggram_fusion": {"reference": None, "cpu": None, "cuda": None}}}),
        _result("pytest", "failed", result={"tests": 9, "passed": 7, "failures": 1, "errors": 0, "skipped": 1,
                                            "failed_tests": ["tests.test_ssm_scans::test_mamba_ssm"]},
                note="1 failed, 0 errors"),
        _result("kernels", result=CANNED_KERNELS),
        _result("mfu", "failed", result=CANNED_MFU, note="dnachunker-1b2: oom"),
    ]
    (tmp_path / "pytest.log").write_text("collected 9 items\nFAILED tests/test_ssm_scans.py::test_mamba_ssm\n")
    meta = {"started": "2026-12-05T15:00:00", "total_s": 301.0, "quick": False, "out": str(tmp_path)}
    markdown = gc.write_summary(results, tmp_path, meta)
    assert markdown == (tmp_path / "summary.md").read_text()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["ok"] is False and summary["failed_steps"] == ["pytest", "mfu"]
    figures = summary["figures"]
    assert figures["device"]["device_name"] == "NVIDIA H100 80GB HBM3"
    assert len(figures["kernels"]) == 7
    assert figures["kernels"][0] == {"kernel": "ggram.fwd", "us": 35.2, "gb_per_s": 1342.5, "fraction_of_peak": 0.401}
    assert figures["training"][0]["tokens_per_s"] == 41234.5 and figures["training"][0]["mfu"] == 0.4012
    assert figures["training"][0]["profile_top5"][0] == "aten::mm"
    assert figures["training"][1]["status"] == "oom"
    assert figures["gpu_tests"] == {"passed": 7, "failures": 1, "errors": 0, "skipped": 1}
    # the human summary: the step table and the key figures
    assert "# GPU check: NVIDIA H100 80GB HBM3" in markdown and "**FAILED**: pytest failed, mfu failed" in markdown
    assert "| kernels | ok | 0 | 1.5 | 35 | kernels.log |  |" in markdown
    assert "| ggram.fwd | 35.2 | 1342.5 | 40.1% |" in markdown
    assert "| boundary_d640.bwd | 40.0 | 1900.0 | 56.7% |" in markdown
    assert "| encoder-1b2 | ok | 4 x 4096 | off | 41,234 | 40.1% | 46.3 | 47.3 | 0.397 |" in markdown
    assert "| dnachunker-1b2 | oom |" in markdown and "out of memory at [4, 2]" in markdown
    assert "`aten::mm` 180.20 ms (61%)" in markdown
    assert "7 passed, 1 failed, 0 errors, 1 skipped" in markdown
    assert "G-gram fusion 3.41x the dense bmm" in markdown and "routing boundary 6.75x eager" in markdown
    assert "FAILED tests/test_ssm_scans.py::test_mamba_ssm" in markdown  # the failed step's log tail
    assert "installed from wheels: deepspeed, megatron-core" in markdown


# ---------------------------------------------------------------------------------------------------- mfu.py


def test_mfu_peak_table_and_arguments(capsys):
    assert mfu.peak_flops("NVIDIA H100 80GB HBM3", "bfloat16", None)[0] == 989e12
    assert mfu.peak_flops("NVIDIA H200", "bfloat16", None)[0] == 989e12
    assert mfu.peak_flops("NVIDIA A100-SXM4-80GB", "bfloat16", None)[0] == 312e12
    assert mfu.peak_flops("x86_64", "float32", None) == (None, None)
    assert mfu.peak_flops("x86_64", "float32", 2.5) == (2.5e12, "--peak-tflops")
    args = mfu.parse_args(["--presets", "encoder-1b2", "dnazen-1b2", "--micro-batch", "4", "dnazen-1b2=auto"])
    assert args.micro_batch == {"encoder-1b2": 4, "dnazen-1b2": "auto"}
    assert mfu.parse_args([]).presets == list(mfu.DEFAULT_PRESETS)
    assert mfu.split_preset("enbed-1b2@4096") == ("enbed", "1b2", 4096)
    assert mfu.split_preset("enbed-1b2") == ("enbed", "1b2", None)
    for argv in (["--micro-batch", "0"], ["--presets", "nope-1b2"], ["--presets", "encoder-9z"],
                 ["--presets", "enbed-1b2@4k"], ["--presets", "enbed-1b2@4"],
                 ["--presets", "encoder-tiny", "--micro-batch", "enbed-1b2=4"], ["--steps", "0"]):
        with pytest.raises(SystemExit) as exit_info:
            mfu.parse_args(argv)
        assert exit_info.value.code == 2
        assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_mfu_auto_micro_batch_follows_the_memory_model():
    """--micro-batch auto: the largest power of two the memory model fits in 90% of the GPU, per checkpointing."""
    args = mfu.parse_args(["--presets", "encoder-1b2", "--gpu-memory-gib", "80", "--activation-checkpointing",
                           "auto"])
    device = {"device": "cuda", "device_name": "NVIDIA H100 80GB HBM3", "memory_gib": None}
    choice = mfu.plan("encoder-1b2", args, device, "bfloat16")
    budget = 0.9 * 80
    for option, ckpt in (("off", False), ("on", True)):
        micro = choice["options"][option]["micro_batch"]
        config = mfu.model_config("encoder", "1b2", None, ckpt)
        assert micro >= 1 and micro & (micro - 1) == 0
        assert mfu.predicted_gib("encoder", config, micro, ckpt, "bfloat16", "cuda") <= budget
        assert (micro * 2 * config.max_seq_len > args.max_batch_tokens
                or mfu.predicted_gib("encoder", config, micro * 2, ckpt, "bfloat16", "cuda") > budget)
    off = choice["options"]["off"]["micro_batch"]
    assert choice["activation_checkpointing"] is (off * 4096 < args.min_batch_tokens)
    assert choice["micro_batch"] == choice["options"]["on" if choice["activation_checkpointing"] else "off"][
        "micro_batch"]
    assert "fits" in choice["reason"]
    # A preset at another length is planned at that length: ENBED's 16k preset at 4k fits more sequences.
    args = mfu.parse_args(["--presets", "enbed-1b2", "enbed-1b2@4096", "--gpu-memory-gib", "80"])
    long, short = (mfu.plan(name, args, device, "bfloat16") for name in args.presets)
    assert "x 16384" in long["reason"] and "x 4096" in short["reason"]
    assert short["options"]["off"]["micro_batch"] > long["options"]["off"]["micro_batch"]


def test_mfu_runs_on_cpu(tmp_path):
    """One real run: the tiny encoder through DeepSpeed ZeRO-3 on CPU; MFU = flops_per_token x tokens/s / peak."""
    out = tmp_path / "mfu.json"
    cmd = [PY, str(REPO / "tools" / "bench" / "mfu.py"), "--presets", "encoder-tiny", "--steps", "3", "--warmup",
           "1", "--peak-tflops", "1", "--dtype", "float32", "--micro-batch", "2", "--device", "cpu", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(proc.stdout.strip().splitlines()[-1])
    assert data == json.loads(out.read_text())
    assert data["engine"] == "deepspeed-zero3" and data["dtype"] == "float32" and data["peak_tflops"] == 1.0
    (r,) = data["results"]
    assert r["status"] == "ok", r
    assert (r["micro_batch"], r["seq_len"], r["activation_checkpointing"]) == (2, 512, False)
    assert r["tokens_per_s"] > 0 and r["tokens_per_step"] == 2 * 512
    assert len(r["step_times_s"]) == 3
    assert math.isclose(r["tokens_per_s"], r["tokens_per_step"] / r["step_time_s"], rel_tol=1e-9)
    from dnascale.models.registry import get_recipe, load_preset

    config = load_preset("encoder", "tiny")
    assert r["flops_per_token"] == get_recipe("encoder").flops_per_token(config, r["window_bases"])
    assert math.isclose(r["mfu"], r["flops_per_token"] * r["tokens_per_s"] / 1e12, rel_tol=1e-12)
    assert r["peak_memory_gib"] > 0 and r["peak_memory_source"].startswith("ru_maxrss")
    assert r["choice"]["reason"].startswith("micro-batch 2 as given")
