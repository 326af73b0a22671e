"""ENBED's memory grows linearly with length: a 16,384 bp forward + backward on CPU completes, and its peak memory
is at most 2.5x that of 8,192 bp.

How memory is measured (tools/bench/bench_enbed.py `memory`): each length runs in a fresh process (a narrow
config with every part of ENBED: local encoder windows 64/128, causal local + global decoder, aligned
cross-attention with block summaries; batch 1, fp32). After a short warm-up step, the kernel's peak-RSS counter
(VmHWM) is reset through /proc/self/clear_refs and the current RSS is read; after one forward + backward the
result is VmHWM minus that baseline: the memory the step itself needed at its peak. tracemalloc cannot see torch's
CPU allocations; RSS can, and the reset removes the interpreter, libraries and parameters from the number.

The same measurement on the dense `reference` backend (scores materialised, quadratic) must show a ratio well
above 2.5 when the length doubles, so the check can tell linear from quadratic.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_enbed", REPO / "tools" / "bench" / "bench_enbed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads peak RSS from /proc (Linux)")
def test_16k_forward_backward_memory_is_linear_in_length():
    bench = _bench()
    short, long = bench.measure_memory_many([8192, 16384])
    ratio = long["peak_mib"] / short["peak_mib"]
    print(f"peak memory 8192 bp: {short['peak_mib']:.0f} MiB, 16384 bp: {long['peak_mib']:.0f} MiB, "
          f"ratio {ratio:.2f} ({long['seconds']:.1f} s for the 16k step)")
    assert short["peak_mib"] > 50  # the step allocates real activations (the measurement sees torch's memory)
    assert ratio <= 2.5


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads peak RSS from /proc (Linux)")
def test_the_measurement_detects_quadratic_attention():
    bench = _bench()
    short, long = bench.measure_memory_many([2048, 4096], backend="reference")
    assert long["peak_mib"] / short["peak_mib"] > 3.0
