"""tools/check_cuda_build.py: the csrc CUDA kernels compile with nvcc against the installed torch's headers.

This runs on CPU machines too (CI has nvcc but no GPU): it is what keeps a CUDA source from breaking unnoticed
between the sessions that have a GPU. Where nvcc is absent the compile tests skip and say so, except under CI
(CI=true), whose machine has the toolkit: there a missing nvcc fails them.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("check_cuda_build", REPO / "tools" / "check_cuda_build.py")
ccb = importlib.util.module_from_spec(_spec)
sys.modules["check_cuda_build"] = ccb  # before executing it: its dataclasses look their module up there
_spec.loader.exec_module(ccb)


@pytest.fixture
def nvcc() -> str:
    """nvcc's path. A machine without the CUDA toolkit skips, saying so; CI fails instead: its machine image ships
    nvcc 13.0, so a missing one there means the CUDA sources would silently go unchecked."""
    path = ccb.find_nvcc()
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("nvcc not found on CI (CI=true), whose machine has the CUDA toolkit: the CUDA sources would "
                        "go unchecked; put its bin/ on PATH or set CUDA_HOME")
        pytest.skip("nvcc (the CUDA toolkit) is not installed here")
    return path


PTXAS_LOG = """
ptxas info    : Compiling entry function '_ZN8dnascale12_GLOBAL__N_1gather' for 'sm_90'
ptxas info    : Used 40 registers, used 0 barriers, 400 bytes cmem[0]
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Compiling entry function '_ZN8dnascale12_GLOBAL__N_1scatter' for 'sm_90'
ptxas info    : Used 255 registers, used 1 barriers, 400 bytes cmem[0]
    64 bytes stack frame, 24 bytes spill stores, 16 bytes spill loads
"""


def test_ptxas_report_is_read():
    assert ccb.read_ptxas(PTXAS_LOG) == (255, 40, 2)
    assert ccb.read_ptxas("") == (None, None, 0)


def test_every_cuda_source_of_the_op_table_is_checked():
    sources = ccb.cuda_sources()
    assert {s.name for s in sources} == {"routing_boundary_cuda.cu", "ggram_fusion_cuda.cu"}
    assert all(s.is_file() for s in sources)


def test_generated_header_is_supplied_only_where_torch_lacks_it(tmp_path):
    flags = ccb.include_flags(tmp_path)
    stub = tmp_path / ccb.GENERATED_HEADER
    torch_has_it = any((Path(f[2:]) / ccb.GENERATED_HEADER).is_file() for f in flags if f != f"-I{tmp_path}")
    assert stub.is_file() != torch_has_it
    if stub.is_file():
        assert f"-I{tmp_path}" in flags and "C10_CUDA_BUILD_SHARED_LIBS" in stub.read_text()


def test_bad_arch_is_one_line(capsys):
    with pytest.raises(SystemExit) as exc:
        ccb.parse_args(["--arch", "sm_90"])
    assert exc.value.code == 2 and "--arch 'sm_90'" in capsys.readouterr().err


def test_a_broken_source_is_reported(tmp_path, nvcc):
    source = tmp_path / "broken_cuda.cu"
    source.write_text("__global__ void k(float* x) { x[0] = undefined_name; }\n")
    report = ccb.compile_one(nvcc, source, tmp_path, ["90"], [])
    assert not report.ok
    assert any("undefined_name" in line for line in report.errors)


def test_kernels_compile_for_sm90_without_spills(capsys, nvcc):
    # One architecture keeps this to ~50 s on two cores; tools/check_cuda_build.py defaults to sm_80 and sm_90.
    rc = ccb.main(["--arch", "90", "--json"])
    out = capsys.readouterr().out
    report = json.loads(out.strip().splitlines()[-1])
    assert rc == 0, out
    assert len(report["files"]) == 2
    for file in report["files"]:
        assert file["ok"] and file["kernels"] > 0, file
        assert file["max_spill_bytes"] == 0, file
