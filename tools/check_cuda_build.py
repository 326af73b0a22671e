#!/usr/bin/env python
"""Compile every csrc/ CUDA kernel with nvcc, on any machine with the CUDA toolkit, GPU or not.

    python tools/check_cuda_build.py                      # sm_80 and sm_90, every *_cuda.cu
    python tools/check_cuda_build.py --arch 90 --max-spill-bytes 0 --json

A CPU-only torch wheel ships the ATen/c10 headers but not the one header its CUDA build generates
(c10/cuda/impl/cuda_cmake_macros.h); this tool writes that header into a scratch folder with the value torch's own
CUDA builds give it (shared libraries), so the kernels compile against the installed torch's headers with the
same flags the JIT build uses (torch's common nvcc flags + dnascale.ops.extensions.NVCC_FLAGS). It compiles to
object files only: nothing is linked or loaded, so it proves the sources build, not that they run (the `gpu`
tests and tools/bench/bench_kernels.py --device cuda do that on a GPU).

`-Xptxas -v` reports each kernel instance's registers and spills; the tool prints the largest of each per file
and fails when a kernel spills more than --max-spill-bytes (the kernels are register-blocked on purpose: a spill
is a performance bug). Exit status: 0 all compiled within the spill limit, 1 otherwise, 2 when nvcc or torch's
headers are missing (one line saying which).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DEFAULT_ARCHES = ("80", "90")
GENERATED_HEADER = Path("c10") / "cuda" / "impl" / "cuda_cmake_macros.h"
# What torch's CMake writes into that header for its (shared-library) CUDA builds.
GENERATED_HEADER_TEXT = "#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n"
PTXAS_USAGE = re.compile(r"Used (\d+) registers")
PTXAS_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


@dataclass
class FileReport:
    source: str
    ok: bool
    seconds: float
    max_registers: int | None = None
    max_spill_bytes: int | None = None
    kernels: int = 0
    errors: list[str] = field(default_factory=list)


def find_nvcc() -> str | None:
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home and (Path(cuda_home) / "bin" / "nvcc").is_file():
        return str(Path(cuda_home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def cuda_sources() -> list[Path]:
    from dnascale.ops.extensions import CSRC, SOURCES

    return [CSRC / relative for (op, device), relative in sorted(SOURCES.items()) if device == "cuda"]


def include_flags(scratch: Path) -> list[str]:
    """torch's include folders, plus the generated header where this torch lacks it (a CPU wheel)."""
    from torch.utils import cpp_extension

    paths = [Path(p) for p in cpp_extension.include_paths()]
    if not any((p / GENERATED_HEADER).is_file() for p in paths):
        stub = scratch / GENERATED_HEADER
        stub.parent.mkdir(parents=True, exist_ok=True)
        stub.write_text(GENERATED_HEADER_TEXT)
        paths.append(scratch)
    return [f"-I{p}" for p in paths]


def nvcc_command(nvcc: str, source: Path, output: Path, arches: list[str], includes: list[str]) -> list[str]:
    from torch.utils import cpp_extension

    from dnascale.ops.extensions import NVCC_FLAGS

    gencode = [flag for arch in arches for flag in ("-gencode", f"arch=compute_{arch},code=sm_{arch}")]
    return [nvcc, "-c", str(source), "-o", str(output), "-std=c++17", "-Xcompiler", "-fPIC", "-Xptxas", "-v",
            *cpp_extension.COMMON_NVCC_FLAGS, *NVCC_FLAGS, *gencode, *includes]


def read_ptxas(log: str) -> tuple[int | None, int | None, int]:
    """(most registers of any kernel, most spill bytes (stores + loads) of any kernel, kernels reported)."""
    registers = [int(m.group(1)) for m in PTXAS_USAGE.finditer(log)]
    spills = [int(m.group(1)) + int(m.group(2)) for m in PTXAS_SPILL.finditer(log)]
    return (max(registers) if registers else None, max(spills) if spills else None, len(registers))


def compile_one(nvcc: str, source: Path, scratch: Path, arches: list[str], includes: list[str]) -> FileReport:
    output = scratch / (source.stem + ".o")
    command = nvcc_command(nvcc, source, output, arches, includes)
    start = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True)
    log = done.stdout + done.stderr
    registers, spill, kernels = read_ptxas(log)
    errors = [line.strip() for line in log.splitlines() if " error" in line or line.startswith("error")]
    if done.returncode != 0 and not errors:
        errors = [line.strip() for line in log.splitlines() if line.strip()][-3:]
    name = str(source.relative_to(REPO)) if source.is_relative_to(REPO) else str(source)
    return FileReport(name, done.returncode == 0, round(time.monotonic() - start, 1),
                      registers, spill, kernels, errors[:5])


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", action="append", default=None, metavar="SM",
                   help=f"compute capability without the dot, repeatable (default: {' '.join(DEFAULT_ARCHES)})")
    p.add_argument("--max-spill-bytes", type=int, default=0,
                   help="fail when a kernel spills more than this many bytes (stores + loads); default 0")
    p.add_argument("--json", action="store_true", help="also print one JSON line with every file's report")
    args = p.parse_args(argv)
    args.arch = args.arch or list(DEFAULT_ARCHES)
    bad = [a for a in args.arch if not re.fullmatch(r"\d{2,3}a?", a)]
    if bad:
        p.error(f"--arch {bad[0]!r}: expected a compute capability like 80 or 90")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    nvcc = find_nvcc()
    if nvcc is None:
        print("check_cuda_build: nvcc not found (put the CUDA toolkit's bin/ on PATH or set CUDA_HOME)",
              file=sys.stderr)
        return 2
    try:
        import torch  # noqa: F401
    except ImportError:
        print("check_cuda_build: torch is not importable (its headers are what the kernels compile against)",
              file=sys.stderr)
        return 2
    reports = []
    with tempfile.TemporaryDirectory(prefix="dnascale-nvcc-") as tmp:
        scratch = Path(tmp)
        includes = include_flags(scratch)
        for source in cuda_sources():
            report = compile_one(nvcc, source, scratch, args.arch, includes)
            reports.append(report)
            state = "ok" if report.ok else "FAILED"
            print(f"{report.source}: {state} in {report.seconds:.1f} s (sm_{', sm_'.join(args.arch)}); "
                  f"{report.kernels} kernel instances, at most {report.max_registers} registers, "
                  f"{report.max_spill_bytes} spill bytes")
            for error in report.errors:
                print(f"  {error}")
    over = [r for r in reports if r.ok and (r.max_spill_bytes or 0) > args.max_spill_bytes]
    for r in over:
        print(f"{r.source}: a kernel spills {r.max_spill_bytes} bytes (limit {args.max_spill_bytes})")
    if args.json:
        print(json.dumps({"arches": args.arch, "files": [asdict(r) for r in reports]}))
    return 0 if all(r.ok for r in reports) and not over else 1


if __name__ == "__main__":
    sys.exit(main())
