#!/usr/bin/env python
"""ENBED benchmarks on CPU: training throughput per preset and length, and peak memory against length.

    python tools/bench/bench_enbed.py throughput --preset tiny --lengths 1024 4096 16384
    python tools/bench/bench_enbed.py memory --length 16384            # one measurement, printed as JSON
    python tools/bench/bench_enbed.py plot --lengths 2048 4096 8192 16384 --out docs/img/enbed_memory_vs_length.png

throughput: tokens/s of forward + backward + AdamW step (batch 1 unless --batch; tokens = encoder tokens, the
decoder processes as many), dropout off, the preset's own activation checkpointing; a first, untimed warm-up
step at min(length, 1024) creates the optimizer state and loads kernels. Both wall-clock tokens/s and tokens per
CPU-second of this process are reported, with the 1-minute load average: on a shared machine the wall clock
measures the neighbours, while with --threads 1 the CPU-time rate is what one dedicated core delivers.

memory: the peak resident memory that one forward + backward at `--length` adds, in a fresh process. torch's CPU
allocator is invisible to tracemalloc, so this reads the kernel's own accounting: after a short warm-up step
(which loads lazily initialised kernels), VmHWM is reset through /proc/self/clear_refs, VmRSS is read as the
baseline, the step runs, and the result is VmHWM - baseline: the memory the step itself needed at its peak
(activations, saved tensors, gradients, temporaries), without the interpreter, libraries and parameters.
Falls back to ru_maxrss minus the baseline where clear_refs is not writable (then the warm-up must be smaller).

plot: runs `memory` in subprocesses for each length for the blocked ENBED (and, for contrast, the dense
`reference` backend at the lengths where it fits) and writes the PNG and a JSON of the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

# The narrow model of the memory test: every part of ENBED (local encoder windows 64/128, causal local + global
# decoder, aligned cross-attention with summaries), small enough that one 16k step takes seconds.
NARROW = dict(vocab_size=384, hidden=64, ffn_hidden=128, heads=2, head_dim=32, encoder_layers=2,
              encoder_early_layers=1, decoder_layers=1, dropout=0.0, max_seq_len=1 << 16)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def _quiet() -> None:
    import warnings

    warnings.filterwarnings("ignore")
    os.environ.setdefault("WANDB_MODE", "disabled")
    import logging

    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)


def _model(config_fields: dict):
    from dnascale.models.enbed import EnbedConfig, EnbedForPretraining
    from dnascale.parallel import init_distributed

    init_distributed(tp=1, seed=0)
    import torch

    torch.manual_seed(0)
    return EnbedForPretraining(EnbedConfig(**config_fields))


def _batch(batch: int, length: int, seed: int = 0):
    """Random bases (the cost does not depend on content), 15% selected with 80/10/10 corruption."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    bases = torch.tensor([68, 70, 74, 87])
    labels = bases[torch.randint(0, 4, (batch, length), generator=gen)]
    labels[:, -1] = 1  # </s>
    selected = torch.rand(batch, length, generator=gen) < 0.15
    selected[:, -1] = False
    inputs = labels.masked_fill(selected, 383)
    return inputs, torch.ones(batch, length, dtype=torch.bool), labels, selected


def _step(model, batch, optimizer=None) -> float:
    inputs, mask, labels, selected = batch
    out = model(inputs, mask, labels, mlm_mask=selected)
    out.loss.backward()
    if optimizer is not None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    else:
        model.zero_grad(set_to_none=True)
    return float(out.loss)


def cmd_memory(args) -> dict:
    _quiet()
    import torch

    torch.set_num_threads(args.threads)
    fields = dict(NARROW, attention_backend=args.backend, cross_attention_backend=args.cross_backend,
                  cross_attention=args.cross_attention)
    model = _model(fields).train()
    _step(model, _batch(1, args.warmup_length))  # lazily loaded kernels, autograd machinery
    batch = _batch(1, args.length)
    exact = _reset_peak()
    baseline = _status_kib("VmRSS")
    start = time.perf_counter()
    _step(model, batch)
    seconds = time.perf_counter() - start
    peak = _status_kib("VmHWM")  # with exact=False it may include the (small) warm-up step
    result = {"length": args.length, "backend": args.backend, "cross_attention": args.cross_attention,
              "peak_mib": (peak - baseline) / 1024.0, "seconds": seconds, "exact_peak_reset": exact}
    print(json.dumps(result))
    return result


def measure_memory_many(lengths: list[int], backend: str = "auto", cross_attention: str = "local_global",
                        warmup_length: int = 256, threads: int = 1, timeout: float = 600.0) -> list[dict]:
    """`memory` for each length, each in its own fresh process (so no earlier allocation can hide or inflate a
    peak), all processes at once: each reads its own peak, so running side by side changes time, not memory."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONWARNINGS="ignore")
    processes = []
    for length in lengths:
        command = [sys.executable, str(Path(__file__).resolve()), "memory", "--length", str(length), "--backend",
                   backend, "--cross-attention", cross_attention, "--warmup-length", str(warmup_length),
                   "--threads", str(threads)]
        processes.append(subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                          env=env, cwd=REPO))
    results = []
    for length, process in zip(lengths, processes):
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
        if process.returncode != 0:
            raise RuntimeError(f"memory measurement at {length} failed:\n{stdout[-2000:]}\n{stderr[-4000:]}")
        results.append(json.loads([line for line in stdout.splitlines() if line.startswith("{")][-1]))
    return results


def measure_memory(length: int, **kwargs) -> dict:
    return measure_memory_many([length], **kwargs)[0]


def cmd_throughput(args) -> list[dict]:
    _quiet()
    import dataclasses

    import torch

    from dnascale.models.registry import load_preset

    torch.set_num_threads(args.threads)
    config = load_preset("enbed", args.preset)
    results = []
    for length in args.lengths:
        fields = dataclasses.asdict(config)
        fields.update(max_seq_len=max(length, config.max_seq_len), dropout=0.0)
        model = _model(fields).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        batch = _batch(args.batch, length)
        _step(model, _batch(args.batch, min(length, 1024)), optimizer)  # warm-up (kernels, allocator, Adam state)
        start, cpu_start = time.perf_counter(), time.process_time()
        for _ in range(args.steps):
            _step(model, batch, optimizer)
        seconds = (time.perf_counter() - start) / args.steps
        cpu_seconds = (time.process_time() - cpu_start) / args.steps
        tokens = args.batch * length
        row = {"preset": args.preset, "length": length, "batch": args.batch, "threads": args.threads,
               "seconds_per_step": seconds, "tokens_per_s": tokens / seconds,
               "cpu_seconds_per_step": cpu_seconds, "tokens_per_cpu_s": tokens / cpu_seconds,
               "load_avg_1m": os.getloadavg()[0]}
        print(json.dumps(row), flush=True)
        results.append(row)
        del model, optimizer
    return results


def cmd_plot(args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {}
    runs = [("blocked (ENBED default)", "auto", "local_global", args.lengths),
            ("dense reference backend", "reference", "local_global", [n for n in args.lengths if n <= args.dense_max])]
    for label, backend, cross, lengths in runs:
        series[label] = [measure_memory(n, backend=backend, cross_attention=cross, threads=args.threads)
                         for n in lengths]
        for row in series[label]:
            print(label, json.dumps(row), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure, axis = plt.subplots(figsize=(6.4, 4.2))
    for (label, rows), marker in zip(series.items(), ("o", "s")):
        axis.plot([r["length"] for r in rows], [r["peak_mib"] for r in rows], marker=marker, label=label)
    first = series["blocked (ENBED default)"][0]
    lengths = args.lengths
    axis.plot(lengths, [first["peak_mib"] * n / first["length"] for n in lengths], "k:", linewidth=1,
              label="linear from the first point")
    axis.set_xscale("log", base=2)
    axis.set_yscale("log")
    axis.set_xlabel("sequence length (bp)")
    axis.set_ylabel("peak memory of one forward+backward (MiB)")
    axis.set_title("ENBED (narrow config, batch 1, CPU fp32)")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(out, dpi=120)
    out.with_suffix(".json").write_text(json.dumps(series, indent=1))
    print(f"wrote {out}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    memory = sub.add_parser("memory", help="peak memory of one forward+backward of the narrow config")
    memory.add_argument("--length", type=int, required=True)
    memory.add_argument("--backend", default="auto", help="self-attention backend")
    memory.add_argument("--cross-backend", default="auto")
    memory.add_argument("--cross-attention", default="local_global", choices=("local_global", "full"))
    memory.add_argument("--warmup-length", type=int, default=256)
    memory.add_argument("--threads", type=int, default=2)
    throughput = sub.add_parser("throughput", help="training tokens/s of a preset at several lengths")
    throughput.add_argument("--preset", default="tiny")
    throughput.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    throughput.add_argument("--batch", type=int, default=1)
    throughput.add_argument("--steps", type=int, default=2)
    throughput.add_argument("--threads", type=int, default=2)
    plot = sub.add_parser("plot", help="memory vs length PNG")
    plot.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    plot.add_argument("--dense-max", type=int, default=4096, help="longest length for the dense contrast")
    plot.add_argument("--threads", type=int, default=2)
    plot.add_argument("--out", default=str(REPO / "docs" / "img" / "enbed_memory_vs_length.png"))
    args = parser.parse_args(argv)
    {"memory": cmd_memory, "throughput": cmd_throughput, "plot": cmd_plot}[args.command](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
