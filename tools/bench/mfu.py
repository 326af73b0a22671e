#!/usr/bin/env python
"""Training throughput, model FLOPs utilisation and peak memory of presets on this machine's device.

    python tools/bench/mfu.py                                     # the four *-1b2 presets, bf16, one GPU
    python tools/bench/mfu.py --micro-batch auto --gpu-memory-gib 80 --activation-checkpointing auto --profile
    python tools/bench/mfu.py --presets encoder-1b2 dnazen-1b2 --micro-batch 4 dnazen-1b2=32 --steps 8
    python tools/bench/mfu.py --presets encoder-tiny --steps 3 --warmup 1 --dtype float32 --peak-tflops 1  # CPU

What it measures. Each preset trains for --warmup + --steps optimizer steps (one micro-batch per step) the way
`launchers/pretrain.py` trains it: the recipe's model built under `deepspeed.zero.Init`, DeepSpeed ZeRO-3 from
ds_configs/zero3.json on a world of one (dnascale.train.loop's own engine builder and train step: GuardedAdamW,
the LR schedule, the loss read back every micro-batch), bf16 via the ds_config on CUDA. That is what users run, so
it is the default (`--engine deepspeed`); its per-module ZeRO-3 gather/release hooks cost something even on one
GPU. `--engine torch` measures the model alone: plain torch, the model on the device in float32 under bf16
autocast, torch.optim.AdamW(fused=True) on CUDA, the same batches; the gap between the two is the engine's cost.
Batches are windows of the bundled yeast chrI (real sequence: BPE and G-gram matching behave as on genomes),
collated by the recipe's own collator before timing and cycled, so data loading is not timed.

- tokens/s: the median over the timed steps of tokens in the step / its wall time, each step bracketed by
  torch.cuda.synchronize(); tokens are the model's input positions (attention-mask sum), as in metrics.jsonl.
- MFU = flops_per_token x tokens/s / peak FLOP/s, flops_per_token = the recipe's training FLOPs (forward +
  backward, no recomputation: MFU, not HFU) at the data window, as the training loop reports it. Peak: dense
  bf16 (or fp32) tensor-core figures of dnascale.train.metrics.PEAK_FLOPS by device name (H100/H200 989e12,
  A100 312e12 in bf16), or --peak-tflops; unknown device (CPU) without --peak-tflops: MFU null.
- peak memory: torch.cuda.max_memory_allocated of the preset's process; on CPU the process's peak RSS
  (ru_maxrss: interpreter and libraries included, an upper bound).
- --profile: torch.profiler over 2 more steps; the 5 ops with the most self CUDA time (self CPU time on CPU).
- --micro-batch auto: the memory model (dnascale.scaling.memory, as tools/scaling/memory_model.py) picks the
  largest power-of-two micro-batch whose predicted ZeRO-3 peak is within 90% of --gpu-memory-gib (default: the
  device's), at most --max-batch-tokens positions; --activation-checkpointing auto then turns checkpointing off
  when the micro-batch that fits without it still holds >= --min-batch-tokens positions (recomputation costs a
  third more compute; matmuls of that many rows keep the GPU busy), else on. The choice and why are printed.

Each preset runs in its own process (`--isolation process`, default): a CUDA out-of-memory or a crash is
recorded for that preset ("oom", "failed") and the next one starts on a clean device; an auto micro-batch that
runs out of memory is retried at half the size (at most twice). --time-budget S shares S seconds among the
presets and records the ones left without time as "skipped". Progress bars go to stderr; the results are written
to --out after every preset, and the last line of stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

DEFAULT_PRESETS = ("encoder-1b2", "enbed-1b2", "dnazen-1b2", "dnachunker-1b2", "enbed-1b2@4096")
FAMILIES = ("encoder", "enbed", "dnazen", "dnachunker")  # recipe names; a preset is "<family>-<preset>"
DS_CONFIG = REPO / "ds_configs" / "zero3.json"
GENOME = REPO / "dnascale" / "genomes" / "scerevisiae_r64_chrI.fna.gz"
FIT_FRACTION = 0.9  # as dnascale.scaling.default_layout: the rest for the CUDA context and fragmentation
MAX_MICRO_BATCH = 1024
BATCH_POOL = 4  # distinct batches collated before timing and cycled
PROFILE_STEPS = 2
OOM_RETRIES = 2
STATUSES = ("ok", "oom", "failed", "timeout", "skipped", "planned")


def fail(message: str) -> None:
    """One-line error and exit status 2 (argparse's convention for bad arguments)."""
    print(f"mfu.py: error: {message}", file=sys.stderr)
    raise SystemExit(2)


# ---------------------------------------------------------------------------------------------------- arguments


def split_preset(name: str) -> tuple[str, str, int | None]:
    """'encoder-1b2' -> ('encoder', '1b2', None); 'enbed-1b2@4096' -> ('enbed', '1b2', 4096): a preset at another
    sequence length (tokens) than its own. One-line error for an unknown family or preset or a bad length."""
    base, at, length = name.partition("@")
    seq_len = None
    if at:
        if not length.isdigit() or int(length) < 8:
            fail(f"preset {name!r}: expected <family>-<preset>@<sequence length >= 8>")
        seq_len = int(length)
    family, sep, preset = base.partition("-")
    if not sep or family not in FAMILIES:
        fail(f"preset {name!r}: expected <family>-<preset> with family one of {', '.join(FAMILIES)}")
    available = sorted(p.stem[len(family) + 1:] for p in (REPO / "dnascale" / "presets").glob(f"{family}-*.yaml"))
    if preset not in available:
        fail(f"preset {name!r}: {family} has presets {', '.join(available)}")
    return family, preset, seq_len


def parse_micro_batch(items: list[str], presets: list[str]) -> dict[str, str | int]:
    """--micro-batch values: 'auto' or N for every preset, then 'PRESET=auto|N' for one."""
    chosen: dict[str, str | int] = {name: "auto" for name in presets}

    def value(text: str, where: str) -> str | int:
        if text == "auto":
            return "auto"
        try:
            number = int(text)
        except ValueError:
            number = 0
        if number < 1:
            fail(f"--micro-batch {where}: expected 'auto' or a positive integer, got {text!r}")
        return number

    for item in items:
        if "=" in item:
            name, _, text = item.partition("=")
            if name not in chosen:
                fail(f"--micro-batch {item}: {name!r} is not among --presets ({', '.join(presets)})")
            chosen[name] = value(text, item)
        else:
            chosen = {name: value(item, item) for name in chosen}
    return chosen


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", nargs="+", default=list(DEFAULT_PRESETS), metavar="FAMILY-PRESET[@SEQ]",
                   help="e.g. encoder-1b2 enbed-1b2@4096 (a preset at another sequence length than its own)")
    p.add_argument("--steps", type=int, default=5, help="timed optimizer steps per preset")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (the first ones do one-time work)")
    p.add_argument("--micro-batch", nargs="+", default=["auto"], metavar="auto|N|PRESET=N",
                   help="sequences per step: 'auto' (memory model), N, or PRESET=N for one preset")
    p.add_argument("--seq-len", type=int, default=None,
                   help="override the presets' max_seq_len (DNAZEN's window_bases scales with it)")
    p.add_argument("--activation-checkpointing", choices=("preset", "on", "off", "auto"), default="preset")
    p.add_argument("--gpu-memory-gib", type=float, default=None, help="memory --micro-batch auto plans for "
                   "(default: the CUDA device's)")
    p.add_argument("--max-batch-tokens", type=int, default=32768,
                   help="--micro-batch auto: at most this many positions per micro-batch")
    p.add_argument("--min-batch-tokens", type=int, default=8192,
                   help="--activation-checkpointing auto: off when a micro-batch of this many positions fits without")
    p.add_argument("--engine", choices=("deepspeed", "torch"), default="deepspeed")
    p.add_argument("--dtype", choices=("auto", "bfloat16", "float32"), default="auto",
                   help="auto: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--peak-tflops", type=float, default=None, help="peak dense FLOP/s per device, in TFLOP/s")
    p.add_argument("--profile", action="store_true", help="torch.profiler over 2 more steps: top-5 ops")
    p.add_argument("--isolation", choices=("process", "none"), default="process",
                   help="process: each preset in its own Python process (default); none: all in this one")
    p.add_argument("--time-budget", type=float, default=None, metavar="S", help="seconds for all presets")
    p.add_argument("--plan-only", action="store_true", help="print the micro-batch/checkpointing choices, run nothing")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the JSON result here too (after every preset)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # one preset's JSON spec (internal)
    a = p.parse_args(argv)
    if a.worker is not None:
        return a
    if a.steps < 1 or a.warmup < 0:
        fail(f"--steps must be >= 1 and --warmup >= 0, got {a.steps} and {a.warmup}")
    if a.seq_len is not None and a.seq_len < 8:
        fail(f"--seq-len {a.seq_len}: expected at least 8")
    for name in ("peak_tflops", "gpu_memory_gib", "time_budget"):
        if getattr(a, name) is not None and getattr(a, name) <= 0:
            fail(f"--{name.replace('_', '-')} must be positive, got {getattr(a, name)}")
    for name in a.presets:
        split_preset(name)
    a.micro_batch = parse_micro_batch(a.micro_batch, a.presets)
    return a


# ---------------------------------------------------------------------------------------------------- device


def probe_device(requested: str) -> dict:
    """Device kind, name and memory without creating a CUDA context in this (parent) process: nvidia-smi first."""
    import torch

    cuda = torch.cuda.is_available() if requested != "cpu" else False
    if requested == "cuda" and not cuda:
        fail("--device cuda: torch sees no CUDA device")
    if not cuda:
        import platform

        return {"device": "cpu", "device_name": platform.processor() or platform.machine(), "memory_gib": None}
    try:  # torch's device 0 is the first visible one; nvidia-smi numbers all of them
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
        out = subprocess.run(["nvidia-smi", f"--id={visible or 0}", "--query-gpu=name,memory.total",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=20)
        name, mib = [part.strip() for part in out.stdout.strip().splitlines()[0].split(",")]
        return {"device": "cuda", "device_name": name, "memory_gib": float(mib) / 1024}
    except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
        props = torch.cuda.get_device_properties(0)
        return {"device": "cuda", "device_name": props.name, "memory_gib": props.total_memory / 2**30}


def peak_flops(device_name: str, dtype: str, override_tflops: float | None) -> tuple[float | None, str | None]:
    """(peak FLOP/s, where it came from)."""
    if override_tflops is not None:
        return override_tflops * 1e12, "--peak-tflops"
    from dnascale.train.metrics import device_peak_flops

    peak = device_peak_flops("bf16" if dtype == "bfloat16" else "fp32", device_name)
    return peak, ("dnascale.train.metrics.PEAK_FLOPS" if peak else None)


# ---------------------------------------------------------------------------------------------------- planning


def model_config(family: str, preset: str, seq_len: int | None, checkpointing: bool | None):
    """The preset's config with --seq-len and the checkpointing choice applied (validated)."""
    from dnascale.models.registry import load_preset

    config = load_preset(family, preset)
    changes: dict[str, Any] = {}
    if seq_len is not None:
        changes["max_seq_len"] = seq_len
        if hasattr(config, "window_bases"):  # DNAZEN: bases per window scale with the token length
            changes["window_bases"] = max(1, round(config.window_bases * seq_len / config.max_seq_len))
    if checkpointing is not None and hasattr(config, "activation_checkpointing"):
        changes["activation_checkpointing"] = checkpointing
    if changes:
        config = dataclasses.replace(config, **changes)
        config.validate()
    return config


def predicted_gib(family: str, config, micro_batch: int, checkpointing: bool, dtype: str, device: str,
                  census=None) -> float | None:
    """The memory model's ZeRO-3 peak for one GPU, GiB (None where the family is not modelled)."""
    from dnascale.scaling.families import model_shape
    from dnascale.scaling.layout import layout_from_ds_config
    from dnascale.scaling.memory import census_for, estimate_memory

    layout = layout_from_ds_config(DS_CONFIG, nodes=1, gpus_per_node=1, tp=1, pp=1, micro_batch=micro_batch,
                                   grad_accum=1, activation_checkpointing=checkpointing,
                                   dtype="bf16" if dtype == "bfloat16" else "fp32", device=device)
    if census is None:
        census = census_for(family, config, model_shape(family, config, layout))
    return estimate_memory(family, config, layout, census).total / 2**30


def largest_fitting(family: str, config, checkpointing: bool, budget_gib: float, max_micro: int, dtype: str,
                    device: str) -> tuple[int, float | None]:
    """(largest power-of-two micro-batch <= max_micro predicted within budget_gib or 0, its prediction)."""
    from dnascale.scaling.families import model_shape
    from dnascale.scaling.layout import layout_from_ds_config
    from dnascale.scaling.memory import census_for

    layout = layout_from_ds_config(DS_CONFIG, nodes=1, gpus_per_node=1, micro_batch=1, dtype="bf16", device=device)
    census = census_for(family, config, model_shape(family, config, layout))
    best, best_gib, micro = 0, None, 1
    while micro <= max_micro:
        gib = predicted_gib(family, config, micro, checkpointing, dtype, device, census)
        if gib > budget_gib:
            break
        best, best_gib = micro, gib
        micro *= 2
    return best, best_gib


def plan(name: str, args, device: dict, dtype: str) -> dict:
    """Micro-batch and checkpointing for one preset, with the reason; printed by the caller."""
    family, preset, own_seq_len = split_preset(name)
    seq_len = own_seq_len or args.seq_len
    base = model_config(family, preset, seq_len, None)
    preset_ckpt = bool(getattr(base, "activation_checkpointing", False))
    mode, requested = args.activation_checkpointing, args.micro_batch[name]
    ckpt = {"preset": preset_ckpt, "on": True, "off": False}.get(mode)
    positions = base.max_seq_len
    memory = args.gpu_memory_gib or device["memory_gib"]
    if requested != "auto":
        ckpt = preset_ckpt if ckpt is None else ckpt
        reason = f"micro-batch {requested} as given; checkpointing {'on' if ckpt else 'off'} ({mode})"
        return {"micro_batch": requested, "activation_checkpointing": ckpt, "reason": reason, "auto": False}
    if memory is None:
        source = mode if ckpt is not None else "the preset's: auto needs GPU memory too"
        ckpt = preset_ckpt if ckpt is None else ckpt
        reason = ("micro-batch 8 (the engine's default): no GPU memory to plan for (give --gpu-memory-gib); "
                  f"checkpointing {'on' if ckpt else 'off'} ({source})")
        return {"micro_batch": 8, "activation_checkpointing": ckpt, "reason": reason, "auto": False}
    budget = FIT_FRACTION * memory
    max_micro = max(1, min(MAX_MICRO_BATCH, args.max_batch_tokens // positions))
    model_device = "cuda"  # GPU memory is what is planned for, also when previewed on CPU (--plan-only)
    options = {}
    for option in (False, True):
        config = model_config(family, preset, seq_len, option)
        micro, gib = largest_fitting(family, config, option, budget, max_micro, dtype, model_device)
        options["on" if option else "off"] = {"micro_batch": micro, "predicted_gib": gib}
    off, on = options["off"], options["on"]
    fits = f"{FIT_FRACTION:.0%} of {memory:.1f} GiB"
    cap = f"at most {args.max_batch_tokens} positions ({max_micro} x {positions})"
    alternatives = (f"without checkpointing {off['micro_batch']} fits, with it {on['micro_batch']} "
                    f"(largest power of two within {fits}, {cap})")
    if ckpt is None:  # auto
        if off["micro_batch"] * positions >= args.min_batch_tokens:
            ckpt, why = False, (f"off: {off['micro_batch']} x {positions} >= {args.min_batch_tokens} positions "
                                "fit without recomputation")
        else:
            ckpt, why = True, (f"on: without it only {off['micro_batch']} x {positions} < {args.min_batch_tokens} "
                               "positions fit")
    else:
        why = f"{'on' if ckpt else 'off'} ({mode})"
    chosen = options["on" if ckpt else "off"]
    if chosen["micro_batch"] == 0:
        reason = f"nothing fits: {alternatives}; trying micro-batch 1 (checkpointing {why})"
        return {"micro_batch": 1, "activation_checkpointing": ckpt, "reason": reason, "auto": True,
                "options": options}
    reason = f"micro-batch {chosen['micro_batch']}, checkpointing {why}; {alternatives}"
    return {"micro_batch": chosen["micro_batch"], "activation_checkpointing": ckpt, "reason": reason, "auto": True,
            "options": options}


# ---------------------------------------------------------------------------------------------------- one preset


def genome_bases() -> bytes:
    from dnascale.data.fasta import read_segments

    return b"".join(segment.seq for segment in read_segments(GENOME))


def make_batches(recipe, config, micro_batch: int, count: int, seed: int) -> tuple[list, int]:
    """(`count` batches of windows of the bundled genome, through the recipe's tokenizer and collator; the
    window in bases)."""
    import numpy as np
    import torch

    from dnascale.data.tokenizers import load_tokenizer

    tokenizer = load_tokenizer(recipe.tokenizer)
    collator = recipe.make_collator(config, tokenizer, seed)
    window = recipe.data_window(config)
    genome = genome_bases()
    while len(genome) <= window:
        genome += genome
    rng = np.random.default_rng(seed)
    batches = []
    for b in range(count):
        samples = []
        for i in range(micro_batch):
            start = int(rng.integers(0, len(genome) - window))
            ids = np.asarray(tokenizer.encode(genome[start:start + window]), dtype=np.int64)
            index = b * micro_batch + i
            samples.append({"ids": torch.from_numpy(ids), "meta": {}, "epoch": 0, "index": index,
                            "key": f"chrI:{start}"})
        batches.append(collator(samples))
    return batches, window


@dataclasses.dataclass
class TorchStepStats:
    tokens: float
    loss: float


class TorchRun:
    """The model alone: float32 weights on the device, bf16 autocast, AdamW (fused on CUDA), clipping at 1.0."""

    def __init__(self, model, device, dtype: str, lr: float, weight_decay: float):
        import torch

        from dnascale.train.engine import parameter_groups

        self.module = model.to(device).train()
        self.device = device
        fused = device.type == "cuda"
        self.optimizer = torch.optim.AdamW(parameter_groups(model, weight_decay), lr=lr, fused=fused)
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16")

    def train_step(self, stream, grad_accum: int):
        import torch

        tokens = 0.0
        for _ in range(grad_accum):
            batch = next(stream).to(self.device)
            with self.autocast:
                out = self.module(batch.input_ids, batch.attention_mask, batch.labels, **batch.extras)
            out.loss.backward()
            tokens += batch.num_tokens
        torch.nn.utils.clip_grad_norm_(self.module.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return TorchStepStats(tokens, float(out.loss.detach()))


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def profile_top(run, stream, device, steps: int = PROFILE_STEPS, top: int = 5) -> dict:
    """Top ops by self CUDA time (self CPU time on CPU) over `steps` training steps."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            run.train_step(stream, 1)
        _sync(device)
    events = prof.key_averages()

    def self_device_us(event) -> float:
        for name in ("self_device_time_total", "self_cuda_time_total"):
            value = getattr(event, name, None)
            if value is not None:
                return float(value)
        return 0.0

    on_cuda = device.type == "cuda"
    key = self_device_us if on_cuda else (lambda event: float(event.self_cpu_time_total))
    total = sum(key(event) for event in events) or 1.0
    ranked = sorted(events, key=key, reverse=True)[:top]
    return {
        "sort_by": "self_cuda_time" if on_cuda else "self_cpu_time",
        "steps": steps,
        "top": [{"name": event.key, "self_ms": round(key(event) / 1e3 / steps, 3),
                 "fraction": round(key(event) / total, 4), "calls": int(event.count) // steps}
                for event in ranked],
    }


def _peak_memory(device) -> tuple[float, str]:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30, "torch.cuda.max_memory_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "ru_maxrss (process peak RSS)"


def run_preset(spec: dict) -> dict:
    """Build, warm up, time, optionally profile one preset; the result record (status "ok" or "oom")."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
    import torch
    from tqdm import tqdm

    from dnascale.models.registry import get_recipe
    from dnascale.parallel import init_distributed

    started = time.perf_counter()
    family, preset = spec["family"], spec["preset"]
    config = model_config(family, preset, spec["seq_len"], spec["activation_checkpointing"])
    recipe = get_recipe(family)
    result = {"preset": f"{family}-{preset}", "family": family, "status": "ok",
              "micro_batch": spec["micro_batch"],
              "activation_checkpointing": bool(getattr(config, "activation_checkpointing", False)),
              "engine": spec["engine"], "dtype": spec["dtype"]}
    if spec["device"] == "cpu":
        os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    parallel = init_distributed(tp=1, pp=1, seed=spec["seed"])
    device = parallel.device
    try:
        batches, window = make_batches(recipe, config, spec["micro_batch"], BATCH_POOL, spec["seed"])
        result["seq_len"] = int(batches[0].input_ids.shape[1])
        result["window_bases"] = window
        total_steps = spec["warmup"] + spec["steps"] + (PROFILE_STEPS if spec["profile"] else 0)
        if spec["engine"] == "deepspeed":
            from dnascale.train.config import TrainConfig
            from dnascale.train.engine import resolve_ds_config
            from dnascale.train.loop import _build_data_parallel  # the launcher's own engine construction

            ds_config, _ = resolve_ds_config(str(DS_CONFIG), micro_batch_size=spec["micro_batch"], grad_accum=1,
                                             dp_size=parallel.dp_size)
            ds_config["bf16"] = {"enabled": spec["dtype"] == "bfloat16"}
            cfg = TrainConfig(model=family, preset=preset, steps=total_steps, micro_batch_size=spec["micro_batch"],
                              grad_accum=1, seed=spec["seed"], ds_config=str(DS_CONFIG))
            run = _build_data_parallel(recipe, config, parallel, ds_config, cfg)
        else:
            from dnascale.train.config import OptimConfig

            optim = OptimConfig()
            run = TorchRun(recipe.build(config, parallel), device, spec["dtype"], optim.lr, optim.weight_decay)
        result["params"] = int(sum(getattr(p, "ds_numel", p.numel()) for p in run.module.parameters()))
        flops_per_token = float(recipe.flops_per_token(config, window))
        stream = itertools.cycle(batches)
        step_times, step_tokens = [], []
        bar = tqdm(total=spec["warmup"] + spec["steps"], desc=result["preset"], unit="step", file=sys.stderr,
                   dynamic_ncols=True, disable=spec.get("quiet", False))
        for step in range(spec["warmup"] + spec["steps"]):
            _sync(device)
            start = time.perf_counter()
            stats = run.train_step(stream, 1)
            _sync(device)
            elapsed = time.perf_counter() - start
            if step >= spec["warmup"]:
                step_times.append(elapsed)
                step_tokens.append(float(stats.tokens))
            bar.update(1)
            bar.set_postfix(s_per_step=f"{elapsed:.3f}")
        bar.close()
        peak_gib, peak_source = _peak_memory(device)
        rates = [tokens / seconds for tokens, seconds in zip(step_tokens, step_times)]
        tokens_per_s = statistics.median(rates)
        peak = spec["peak_flops"]
        result.update({
            "steps": spec["steps"], "warmup": spec["warmup"],
            "tokens_per_step": statistics.median(step_tokens),
            "tokens_per_s": tokens_per_s,
            "step_time_s": statistics.median(step_times),
            "step_times_s": [round(t, 4) for t in step_times],
            "flops_per_token": flops_per_token,
            "peak_flops": peak,
            "mfu": flops_per_token * tokens_per_s / peak if peak else None,
            "peak_memory_gib": peak_gib,
            "peak_memory_source": peak_source,
        })
        if spec["profile"]:
            result["profile"] = profile_top(run, stream, device)
    except torch.OutOfMemoryError as err:
        result.update(status="oom", error=str(err).splitlines()[0][:300])
    result["device_name"] = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    result["wall_s"] = round(time.perf_counter() - started, 2)
    return result


# ---------------------------------------------------------------------------------------------------- the driver


def _looks_like_oom(text: str) -> bool:
    lowered = text.lower()
    return "out of memory" in lowered or "outofmemoryerror" in lowered


def run_isolated(spec: dict, timeout: float | None) -> dict:
    """`run_preset(spec)` in a fresh Python process; stderr is passed through (progress bars) and its tail kept."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if spec["device"] == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    tail: deque[str] = deque(maxlen=60)
    stdout: list[str] = []

    def pump_stderr() -> None:
        for line in proc.stderr:
            sys.stderr.write(line)
            tail.append(line)

    def pump_stdout() -> None:
        for line in proc.stdout:
            stdout.append(line)
            if not line.startswith("{"):
                sys.stderr.write(line)  # DeepSpeed's prints: keep this process's stdout for results

    threads = [threading.Thread(target=pump_stderr, daemon=True), threading.Thread(target=pump_stdout, daemon=True)]
    for thread in threads:
        thread.start()
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)  # the worker and anything it started (its own session)
        proc.wait()
        for thread in threads:
            thread.join(timeout=5)
        return {"status": "timeout", "error": f"no result within {timeout:.0f} s"}
    for thread in threads:
        thread.join(timeout=5)
    for line in reversed(stdout):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                break
    text = "".join(tail)
    status = "oom" if _looks_like_oom(text) else "failed"
    last = [line.strip() for line in tail if line.strip()]
    return {"status": status, "rc": rc, "error": (last[-1] if last else f"exit status {rc}")[:300]}


def run_in_process(spec: dict) -> dict:
    try:
        return run_preset(spec)
    except Exception as err:  # recorded, the next preset still runs
        status = "oom" if _looks_like_oom(f"{type(err).__name__} {err}") else "failed"
        return {"status": status, "error": f"{type(err).__name__}: {err}"[:300]}


def describe(result: dict) -> str:
    if result["status"] == "planned":
        gib = result.get("predicted_gib")
        return (f"{result['preset']}: planned micro-batch {result['micro_batch']}, checkpointing "
                f"{'on' if result['activation_checkpointing'] else 'off'}"
                + (f", predicted peak {gib:.1f} GiB" if gib is not None else ""))
    if result["status"] != "ok":
        return f"{result['preset']}: {result['status']} ({result.get('error', '')})"
    mfu = f"MFU {result['mfu']:.1%}" if result.get("mfu") is not None else "MFU n/a (no peak)"
    return (f"{result['preset']}: {result['tokens_per_s']:,.0f} tokens/s, {mfu}, "
            f"{result['step_time_s']:.3f} s/step, micro-batch {result['micro_batch']} x {result['seq_len']}, "
            f"checkpointing {'on' if result['activation_checkpointing'] else 'off'}, "
            f"peak {result['peak_memory_gib']:.2f} GiB")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker is not None:  # one preset, in a process of its own
        spec = json.loads(args.worker)
        print(json.dumps(run_in_process(spec)), flush=True)
        return 0

    from tqdm import tqdm

    device = probe_device(args.device)
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if device["device"] == "cuda" else "float32")
    peak, peak_source = peak_flops(device["device_name"], dtype, args.peak_tflops)
    deadline = time.monotonic() + args.time_budget if args.time_budget else None
    import torch

    summary = {
        "tool": "mfu", "device": device["device"], "device_name": device["device_name"],
        "device_memory_gib": device["memory_gib"], "torch": torch.__version__,
        "engine": "deepspeed-zero3" if args.engine == "deepspeed" else "torch-adamw",
        "dtype": dtype, "peak_tflops": peak / 1e12 if peak else None, "peak_source": peak_source,
        "steps": args.steps, "warmup": args.warmup, "profile": args.profile, "results": [],
    }
    print(f"mfu.py: {device['device']} ({device['device_name']}), {summary['engine']}, {dtype}, peak "
          f"{summary['peak_tflops'] or 'unknown'} TFLOP/s ({peak_source or 'give --peak-tflops'})", flush=True)
    bar = tqdm(args.presets, desc="presets", unit="preset", file=sys.stderr, dynamic_ncols=True)
    for index, name in enumerate(bar):
        family, preset, own_seq_len = split_preset(name)
        seq_len = own_seq_len or args.seq_len
        bar.set_postfix_str(name)
        choice = plan(name, args, device, dtype)
        print(f"{name}: {choice['reason']}", flush=True)
        micro = choice["micro_batch"]
        oom_at: list[int] = []
        while not args.plan_only:
            spec = {"family": family, "preset": preset, "micro_batch": micro, "seq_len": seq_len,
                    "activation_checkpointing": choice["activation_checkpointing"], "engine": args.engine,
                    "dtype": dtype, "device": device["device"], "steps": args.steps, "warmup": args.warmup,
                    "profile": args.profile, "seed": args.seed, "peak_flops": peak}
            timeout = None
            if deadline is not None:
                remaining = deadline - time.monotonic()
                left = len(args.presets) - index
                timeout = min(remaining, max(1.5 * remaining / left, 45.0))
                if remaining < 10:
                    result = {"status": "skipped", "error": "--time-budget spent"}
                    break
            result = run_isolated(spec, timeout) if args.isolation == "process" else run_in_process(spec)
            if result["status"] == "oom" and choice["auto"] and len(oom_at) < OOM_RETRIES:
                oom_at.append(micro)
                if micro > 1:
                    micro //= 2
                elif args.activation_checkpointing == "auto" and not choice["activation_checkpointing"]:
                    choice["activation_checkpointing"] = True  # nothing smaller to try without recomputation
                    micro = max(1, choice["options"]["on"]["micro_batch"] // 2)
                else:
                    break
                print(f"{name}: out of memory at micro-batch {oom_at[-1]}; retrying at {micro}, checkpointing "
                      f"{'on' if choice['activation_checkpointing'] else 'off'}", flush=True)
                continue
            break
        else:
            result = {"status": "planned"}
        result = {"preset": name, "family": family, "micro_batch": micro,
                  "activation_checkpointing": choice["activation_checkpointing"], **result}
        result["choice"] = {"reason": choice["reason"], "auto": choice["auto"], "oom_at": oom_at,
                            **({"options": choice["options"]} if "options" in choice else {})}
        if args.engine == "deepspeed" and family in FAMILIES:
            try:
                config = model_config(family, preset, seq_len, result["activation_checkpointing"])
                result["predicted_gib"] = predicted_gib(family, config, result["micro_batch"],
                                                        result["activation_checkpointing"], dtype,
                                                        "cuda" if device["device"] == "cuda" or args.plan_only
                                                        else "cpu")
            except Exception as err:  # the prediction is a side note: never lose a measurement to it
                result["predicted_gib"] = None
                result["prediction_error"] = str(err)[:200]
        summary["results"].append(result)
        print(describe(result), flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(summary, indent=1))
    bar.close()
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    from dnascale.errors import run_cli

    run_cli(main)
