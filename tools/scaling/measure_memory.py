#!/usr/bin/env python
"""Measured vs predicted peak memory of real training steps on CPU (DeepSpeed ZeRO-0, one rank, fp32).

    python tools/scaling/measure_memory.py --seq-len 512 --batch 8                   # one config, JSON line
    python tools/scaling/measure_memory.py --seq-len 1024 --batch 4 --checkpointing --grad-accum 2
    python tools/scaling/measure_memory.py --model '{"hidden": 512, "heads": 8, "activation": "geglu"}'
    python tools/scaling/measure_memory.py --suite --out validation.json              # the validation configs

How it measures (each config in a fresh process, so nothing earlier can hide or inflate its peak):
1. glibc's mmap threshold is pinned to 64 KiB (mallopt), so every tensor buffer is its own mapping and returns
   to the OS when freed: resident memory then follows live tensor bytes, as torch.cuda.max_memory_allocated
   does on a GPU (without the pin, glibc keeps freed heap chunks and RSS overstates the live set).
2. Imports, torch.distributed + megatron groups, and one DeepSpeed engine over a minimal encoder trained for one
   step: the interpreter, libraries, thread pools, kernels loaded on first use and DeepSpeed's own structures.
   That engine is dropped, the peak-RSS counter (VmHWM) is reset through /proc/self/clear_refs and the resident
   size is read: the baseline.
3. The real model is built and trained through dnascale's engine (build_engine: GuardedAdamW, our LR schedule)
   for `--steps` optimizer steps of `--grad-accum` micro-batches of `--batch` x `--seq-len` tokens (random
   bases, 15% MLM targets, no padding). measured = VmHWM - baseline: weights, gradients, Adam state,
   activations and every temporary of the steps, nothing of the process's fixed cost.
4. The prediction is dnascale.scaling.memory for the same config and Layout(ZeRO-0, fp32, device "cpu").
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

M_MMAP_THRESHOLD = -3  # glibc mallopt parameter number (malloc.h)
MMAP_THRESHOLD_BYTES = 64 * 1024

# The validation configs: an encoder big enough that model state and activations are hundreds of MB.
MODEL = dict(vocab_size=16, hidden=384, layers=4, heads=6, ffn_hidden=1536, max_seq_len=2048, dropout=0.0)
# The last one differs in every dimension (width, depth, gated MLP, RMSNorm, length, batch) from the others.
HELD_OUT = dict(MODEL, hidden=512, layers=3, heads=8, ffn_hidden=1024, activation="geglu", norm="rmsnorm")
SUITE = [
    dict(seq_len=512, batch=8, checkpointing=False, grad_accum=1),
    dict(seq_len=1024, batch=8, checkpointing=False, grad_accum=1),
    dict(seq_len=1024, batch=8, checkpointing=True, grad_accum=2),
    dict(seq_len=768, batch=6, checkpointing=False, grad_accum=2, model=HELD_OUT),
]


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _libc():
    return ctypes.CDLL("libc.so.6")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


def _batch(config, batch: int, seq_len: int, seed: int):
    import torch

    from dnascale.data.masking import TokenMasking

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(7, 11, (batch, seq_len), generator=gen)  # A, C, G, T of the nucleotide tokenizer
    labels = torch.where(torch.rand(batch, seq_len, generator=gen) < TokenMasking().rate, ids, -100)
    return ids, labels


def _train(config_fields: dict, batch: int, seq_len: int, grad_accum: int, steps: int) -> None:
    import torch

    from dnascale.models.encoder import EncoderConfig, EncoderForMLM
    from dnascale.parallel import DeepSpeedMPU
    from dnascale.train.config import OptimConfig
    from dnascale.train.engine import build_engine, resolve_ds_config

    torch.manual_seed(0)
    config = EncoderConfig(**config_fields)
    model = EncoderForMLM(config).train()
    ds_config, _ = resolve_ds_config(str(REPO / "ds_configs" / "stage0.json"), micro_batch_size=batch,
                                     grad_accum=grad_accum, dp_size=1)
    engine, _, _ = build_engine(model, ds_config, OptimConfig(), total_steps=steps, mpu=DeepSpeedMPU())
    for step in range(steps):
        for micro in range(grad_accum):
            ids, labels = _batch(config, batch, seq_len, seed=step * grad_accum + micro)
            out = engine(input_ids=ids, labels=labels)
            engine.backward(out.loss)
            engine.step()
    del engine, model, out


def measure(seq_len: int, batch: int, checkpointing: bool, grad_accum: int, steps: int = 2,
            model: dict | None = None) -> dict:
    """Run in this process (it must be fresh: see the module docstring) and return the JSON record."""
    libc = _libc()
    libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
    import warnings

    warnings.filterwarnings("ignore")
    import logging

    import torch

    torch.set_num_threads(1)
    from dnascale.parallel import init_distributed

    init_distributed(tp=1, seed=0)
    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    fields = dict(MODEL, **(model or {}), activation_checkpointing=checkpointing)
    warm = dict(fields, hidden=8, heads=2, ffn_hidden=16, layers=1)
    _train(warm, batch=1, seq_len=16, grad_accum=1, steps=1)
    gc.collect()
    libc.malloc_trim(0)
    _reset_peak()
    baseline = _status_kib("VmRSS")
    start = time.perf_counter()
    _train(fields, batch, seq_len, grad_accum, steps)
    seconds = time.perf_counter() - start
    measured = (_status_kib("VmHWM") - baseline) * 1024

    import deepspeed

    from dnascale.models.encoder import EncoderConfig
    from dnascale.scaling.layout import Layout
    from dnascale.scaling.memory import estimate_memory

    layout = Layout(nodes=1, gpus_per_node=1, zero_stage=0, dtype="fp32", device="cpu", micro_batch=batch,
                    grad_accum=grad_accum, seq_len=seq_len, activation_checkpointing=checkpointing)
    predicted = estimate_memory("encoder", EncoderConfig(**fields), layout)
    return {
        "model": "encoder", "config": {k: v for k, v in fields.items()}, "seq_len": seq_len, "batch": batch,
        "grad_accum": grad_accum, "checkpointing": checkpointing, "steps": steps, "zero_stage": 0, "dtype": "fp32",
        "measured_bytes": measured, "predicted_bytes": predicted.total, "predicted_phase": predicted.peak_phase,
        "predicted_breakdown": predicted.breakdown, "ratio": measured / predicted.total,
        "baseline_bytes": baseline * 1024, "seconds": seconds, "date": datetime.date.today().isoformat(),
        "machine": f"a {os.cpu_count()}-core CPU machine ({platform.system()} {platform.machine()}, "
                   f"torch {torch.__version__}, deepspeed {deepspeed.__version__})",
    }


def command_line(seq_len: int, batch: int, checkpointing: bool, grad_accum: int, steps: int = 2,
                 model: dict | None = None) -> list[str]:
    command = [sys.executable, str(Path(__file__).resolve()), "--seq-len", str(seq_len), "--batch", str(batch),
               "--grad-accum", str(grad_accum), "--steps", str(steps)]
    if checkpointing:
        command.append("--checkpointing")
    if model is not None:
        command += ["--model", json.dumps(model)]
    return command


def child_environment() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)  # a world of one of its own, never the caller's
    return env


def measure_in_subprocess(seq_len: int, batch: int, checkpointing: bool, grad_accum: int, steps: int = 2,
                          model: dict | None = None, timeout: float = 900.0) -> dict:
    command = command_line(seq_len, batch, checkpointing, grad_accum, steps, model)
    done = subprocess.run(command, capture_output=True, text=True, env=child_environment(), cwd=REPO,
                          timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"memory measurement failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--model", type=json.loads, help="EncoderConfig fields (JSON) that override MODEL's")
    parser.add_argument("--suite", action="store_true", help="run the validation configs, each in a subprocess")
    parser.add_argument("--out", help="with --suite: write the records to this JSON file")
    args = parser.parse_args(argv)
    if args.suite:
        records = [measure_in_subprocess(**config) for config in SUITE]
        for record in records:
            print(json.dumps({k: record[k] for k in ("seq_len", "batch", "grad_accum", "checkpointing",
                                                     "measured_bytes", "predicted_bytes", "ratio")}))
        if args.out:
            Path(args.out).write_text(json.dumps(records, indent=1) + "\n")
        return 0
    print(json.dumps(measure(args.seq_len, args.batch, args.checkpointing, args.grad_accum, args.steps, args.model)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
