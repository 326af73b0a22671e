#!/usr/bin/env python
"""Predicted memory per GPU, communication per step and throughput of a training layout.

    python tools/scaling/memory_model.py --model encoder --preset 1b2 --nodes 2 --tp 1 --zero-stage 3 \\
        --micro-batch 2 --activation-checkpointing on --mfu 0.4          # one layout: breakdown table
    python tools/scaling/memory_model.py --model enbed --preset 1b2 --ds-config ds_configs/zero3.json --json
    python tools/scaling/memory_model.py --table --mfu 0.4 --out docs/scaling_predicted.md \\
        --validation validation.json                                     # every 1.2B preset on 1-8 nodes

One layout: flags left out take the ds_config's values (ZeRO stage, offload, bf16, buckets; --ds-config) or
the preset's (sequence length = max_seq_len, activation checkpointing). --table chooses a default layout per
preset and node count (dnascale/scaling/default_layout.py) and writes the markdown table; --validation adds the
measured-vs-predicted records written by tools/scaling/measure_memory.py --suite --out.
Formulas and assumptions: dnascale/scaling/memory.py, activations.py, communication.py, throughput.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import sys
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

TABLE_PRESETS = ("encoder", "enbed", "dnazen", "dnachunker")  # each at preset "1b2"
TABLE_NODES = (1, 2, 4, 8)
GIB = 2**30
GB = 1e9


def _on_off(value: str | None) -> bool | None:
    return None if value is None else value == "on"


def _layout(args):
    from dnascale.scaling.layout import Layout, layout_from_ds_config

    fields = dict(nodes=args.nodes, gpus_per_node=args.gpus_per_node, tp=args.tp, pp=args.pp,
                  micro_batch=args.micro_batch, grad_accum=args.grad_accum, seq_len=args.seq_len,
                  activation_checkpointing=_on_off(args.activation_checkpointing), attention=args.attention,
                  device="cuda")
    flags = dict(zero_stage=args.zero_stage, dtype=args.dtype,
                 offload_optimizer=True if args.offload_optimizer else None,
                 offload_params=True if args.offload_params else None)
    if args.ds_config:
        return layout_from_ds_config(args.ds_config, **fields, **flags)
    defaults = dict(zero_stage=3, dtype="bf16", offload_optimizer=False, offload_params=False)
    return Layout(**fields, **{key: value if value is not None else defaults[key] for key, value in flags.items()})


def _describe(layout, config) -> str:
    seq = layout.seq_len if layout.seq_len is not None else config.max_seq_len
    checkpointing = (layout.activation_checkpointing if layout.activation_checkpointing is not None
                     else config.activation_checkpointing)
    offload = [name for name, on in (("optimizer", layout.offload_optimizer), ("params", layout.offload_params)) if on]
    return (f"{layout.nodes} node(s) x {layout.gpus_per_node} GPUs: tp {layout.tp}, pp {layout.pp}, dp {layout.dp}, "
            f"ZeRO-{layout.zero_stage}{' offload ' + '+'.join(offload) if offload else ''}, micro-batch "
            f"{layout.micro_batch}, grad-accum {layout.grad_accum}, seq {seq}, checkpointing "
            f"{'on' if checkpointing else 'off'}, {layout.dtype}, {layout.attention} attention")


def run_one(args) -> int:
    from dnascale.models.registry import load_preset
    from dnascale.scaling.communication import estimate_communication
    from dnascale.scaling.families import model_shape
    from dnascale.scaling.memory import census_for, estimate_memory
    from dnascale.scaling.throughput import estimate_throughput

    if not args.model or not args.preset:
        from dnascale.errors import ConfigError

        raise ConfigError("give --model and --preset (or --table)")
    config = load_preset(args.model, args.preset)
    layout = _layout(args)
    census = census_for(args.model, config, model_shape(args.model, config, layout))
    memory = estimate_memory(args.model, config, layout, census)
    comm = estimate_communication(args.model, config, layout, census)
    speed = estimate_throughput(args.model, config, layout, args.mfu, args.gpu)
    if args.json:
        print(json.dumps({
            "model": args.model, "preset": args.preset, "layout": dataclasses.asdict(layout),
            "params": {"total": census.total, "tp_sharded": census.sharded, "replicated": census.replicated,
                       "per_rank": memory.params_per_rank},
            "memory": dataclasses.asdict(memory), "communication": dataclasses.asdict(comm),
            "throughput": dataclasses.asdict(speed) | {"days_per_100b_tokens": speed.days_per_100b_tokens},
        }))
        return 0
    print(f"{args.model}-{args.preset} on {_describe(layout, config)}")
    print(f"parameters {census.total:,}: {census.sharded:,} TP-sharded, {census.replicated:,} replicated; "
          f"{memory.params_per_rank:,} on the worst rank (stage {memory.stage}) before ZeRO")
    print(f"\n{'memory per GPU':<52}{'GiB':>10}")
    for name, value in memory.breakdown.items():
        print(f"  {name:<50}{value / GIB:>10.3f}")
    print(f"  {'peak (' + memory.peak_phase + ')':<50}{memory.total / GIB:>10.3f}")
    print(f"\n{'communication sent per GPU per optimizer step':<52}{'GB':>10}")
    for name, value in comm.breakdown.items():
        print(f"  {name:<50}{value / GB:>10.3f}")
    print(f"\nthroughput at MFU {args.mfu:.2f} ({args.gpu} {layout.dtype} "
          f"{speed.peak_flops_per_gpu / 1e12:.0f} TFLOP/s, "
          f"{speed.flops_per_token / 1e9:.2f} GFLOP per token): {speed.tokens_per_s:,.0f} tokens/s "
          f"({speed.tokens_per_s_per_gpu:,.0f} per GPU), {speed.step_seconds:.2f} s per step of "
          f"{layout.global_batch} sequences, {speed.days_per_100b_tokens:.1f} days per 100B tokens")
    return 0


def _validation_section(path: str) -> list[str]:
    records = json.loads(Path(path).read_text())
    base = {k: v for k, v in records[0]["config"].items() if k != "activation_checkpointing"}
    lines = [
        "## Validation: predicted vs measured peak memory (CPU)",
        "",
        "Encoder MLM training steps under DeepSpeed ZeRO-0, one rank, fp32, one torch thread, measured on "
        f"{records[0]['machine']}, {records[0]['date']}:",
        "`python tools/scaling/measure_memory.py --suite --out validation.json` (each config in a fresh process).",
        f"Base model (EncoderConfig): `{json.dumps(base)}`; {records[0]['steps']} optimizer steps per config; random "
        "bases, 15% MLM targets, no padding. Rows 1-3 informed two refinements of the model (docs/architecture.md, "
        "\"Memory and throughput model\"); the last row, which changes every dimension, and the test's two configs "
        "(tests/test_memory_model.py, batch 4) were not used to shape it.",
        "",
        "| model | seq len | batch | grad accum | checkpointing | measured (MiB) | predicted (MiB) "
        "| predicted peak phase | measured / predicted |",
        "|---|---:|---:|---:|---|---:|---:|---|---:|",
    ]
    for r in records:
        changed = {k: v for k, v in r["config"].items() if k != "activation_checkpointing" and base.get(k) != v}
        label = "base" if not changed else ", ".join(f"{k} {v}" for k, v in changed.items())
        lines.append(f"| {label} | {r['seq_len']} | {r['batch']} | {r['grad_accum']} "
                     f"| {'on' if r['checkpointing'] else 'off'} "
                     f"| {r['measured_bytes'] / 2**20:.0f} | {r['predicted_bytes'] / 2**20:.0f} "
                     f"| {r['predicted_phase']} | {r['ratio']:.3f} |")
    lines += [
        "",
        "Measured = peak resident memory during the steps minus the resident memory after imports, process-group "
        "set-up and a warm-up DeepSpeed engine of a minimal model (VmHWM reset through /proc/self/clear_refs), "
        "with glibc's mmap threshold pinned to 64 KiB so that freed tensors leave the resident set (RSS then "
        "follows live tensor bytes, as torch.cuda.max_memory_allocated does on a GPU). Predicted = "
        "`dnascale.scaling.memory.estimate_memory` for the same config with `Layout(zero_stage=0, dtype='fp32', "
        "device='cpu')`. Breakdown of the predictions (MiB):",
        "",
    ]
    names = list(records[0]["predicted_breakdown"])
    lines.append("| item | " + " | ".join(f"s{r['seq_len']} b{r['batch']} ga{r['grad_accum']}"
                                          f"{' ckpt' if r['checkpointing'] else ''}" for r in records) + " |")
    lines.append("|---|" + "---:|" * len(records))
    for name in names:
        lines.append(f"| {name} | " + " | ".join(f"{r['predicted_breakdown'].get(name, 0) / 2**20:.1f}"
                                                 for r in records) + " |")
    return lines


def run_table(args) -> int:
    from dnascale.models.registry import load_preset
    from dnascale.scaling.communication import estimate_communication
    from dnascale.scaling.default_layout import DEFAULT_FIT_FRACTION, DEFAULT_STEP_TOKENS, DEVICE_MEMORY, choose_layout
    from dnascale.scaling.families import model_shape
    from dnascale.scaling.memory import census_for
    from dnascale.scaling.throughput import estimate_throughput, peak_flops

    ds_config = args.ds_config or str(REPO / "ds_configs" / "zero3.json")
    rows = []
    for model in TABLE_PRESETS:
        config = load_preset(model, "1b2")
        for nodes in TABLE_NODES:
            choice = choose_layout(model, config, nodes, ds_config, gpus_per_node=args.gpus_per_node, gpu=args.gpu)
            layout = choice.layout
            census = census_for(model, config, model_shape(model, config, layout))
            comm = estimate_communication(model, config, layout, census)
            speed = estimate_throughput(model, config, layout, args.mfu, args.gpu)
            checkpointing = (layout.activation_checkpointing if layout.activation_checkpointing is not None
                             else config.activation_checkpointing)
            rows.append(
                f"| {model}-1b2 | {nodes} | {layout.world} | tp {layout.tp}, mb {layout.micro_batch}, ga "
                f"{layout.grad_accum}, ckpt {'on' if checkpointing else 'off'} | {config.max_seq_len} "
                f"| {choice.memory.total / GIB:.1f} | {speed.tokens_per_s:,.0f} | {speed.days_per_100b_tokens:.2f} "
                f"| {comm.tp / GB:.2f} | {comm.dp / GB:.2f} | {speed.step_seconds:.2f} |")
            print(rows[-1], flush=True)
    date = args.date or datetime.date.today().isoformat()
    out = Path(args.out).resolve()
    shown_out = out.relative_to(REPO) if out.is_relative_to(REPO) else out
    command = (f"python tools/scaling/memory_model.py --table --mfu {args.mfu} --out {shown_out}"
               + (f" --validation {Path(args.validation).name}" if args.validation else ""))
    lines = [
        "# Predicted memory and throughput of the 1.2B presets",
        "",
        f"Generated {date} by `{command}` (the lead merges this into docs/scaling.md). Predictions, not "
        "measurements: the memory model is validated against measured CPU runs below; the GPU numbers are "
        "untested on hardware.",
        "",
        f"Layout per preset and node count ({args.gpus_per_node}x{args.gpu} per node, "
        f"{DEVICE_MEMORY[args.gpu] / 1e9:.0f} GB each): ZeRO-3 with `{Path(ds_config).name}`'s buckets, bf16, "
        f"no offload, no PP; a global batch of {DEFAULT_STEP_TOKENS:,} tokens per step at every node count; TP 1 "
        f"unless it does not fit; the preset's activation checkpointing (on in all four); the largest "
        f"power-of-two micro-batch whose predicted peak is at most {DEFAULT_FIT_FRACTION:.0%} of the GPU's "
        "memory (the rest for the CUDA context, NCCL buffers and allocator fragmentation), grad accumulation "
        "for the rest of the batch (dnascale/scaling/default_layout.py).",
        f"Throughput assumes MFU {args.mfu} of the dense bf16 peak ({args.gpu}: "
        f"{peak_flops(args.gpu, 'bf16') / 1e12:.0f} TFLOP/s, dnascale.train.metrics.PEAK_FLOPS) with each "
        "recipe's FLOPs per token at the preset's sequence length; tokens are model input "
        "positions (bases, except BPE tokens for DNAZEN, ~4-5 bases each). Communication: bytes each GPU sends per "
        "optimizer step (ring collectives; dnascale/scaling/communication.py).",
        "",
        "| model | nodes | GPUs | layout | seq len | memory / GPU (GiB) | tokens/s | days / 100B tokens "
        "| TP comm / GPU / step (GB) | DP comm / GPU / step (GB) | step (s) |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
        "Notes and doubts:",
        "- Memory is the predicted peak per GPU (dnascale/scaling/memory.py: model state exact from the built "
        "model's parameters, activations from formulas checked against autograd's saved tensors, DeepSpeed's "
        "ZeRO-3 buffers from the ds_config). All four presets fit at TP 1 on one node; TP 2 was never needed.",
        "- With the global batch fixed, more nodes means a smaller micro-batch per GPU, so memory per GPU falls "
        "while ZeRO-3's per-GPU traffic (3 x the bf16 weights per micro-batch, (n-1)/n of it) stays ~6-7 GB per "
        "step; at 8 nodes the step compute (the last column) shrinks to a fraction of a second, so these steps "
        "are communication-bound unless the inter-node fabric moves ~7 GB per GPU in that time.",
        "- DNACHUNKER: the BiMamba formula models mamba-ssm's fused SSD kernel (the GPU path), not validated on a "
        "GPU; the CPU pure-torch SSD keeps ~2.5x more. Level lengths are taken at the ratio targets (0.33, 0.33); "
        "mask protection makes the coarser levels somewhat longer during MLM pretraining. Its FLOPs per base are "
        "low (most bases see only the BiMamba stages), so at an equal MFU it processes far more bases per second; "
        "an MFU of 0.4 is optimistic for scan kernels.",
        "- ENBED: sliding-window attention modelled as FlexAttention (no score matrix); DNAZEN: ALiBi through "
        "flash-attn's slopes (on CPU SDPA gets a dense [heads, T, T] bias per layer, which the CPU model adds).",
        "",
    ]
    if args.validation:
        lines += _validation_section(args.validation) + [""]
    Path(args.out).write_text("\n".join(lines))
    print(f"wrote {args.out}")
    return 0


def main(argv=None) -> int:
    warnings.filterwarnings("ignore")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="recipe name (encoder, enbed, dnazen, dnachunker)")
    parser.add_argument("--preset", help="preset name, e.g. 1b2")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--zero-stage", type=int, choices=(0, 1, 2, 3), help="default: the ds_config's, else 3")
    parser.add_argument("--ds-config", help="read ZeRO stage, offload, precision and buffer sizes from it")
    parser.add_argument("--offload-optimizer", action="store_true")
    parser.add_argument("--offload-params", action="store_true")
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--seq-len", type=int, help="default: the preset's max_seq_len")
    parser.add_argument("--activation-checkpointing", choices=("on", "off"), help="default: the preset's")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), help="default: the ds_config's, else bf16")
    parser.add_argument("--attention", choices=("flash", "materialised"), default="flash")
    parser.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOPs utilisation")
    parser.add_argument("--gpu", default="H800")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--table", action="store_true", help="the 1.2B presets on 1, 2, 4, 8 nodes, as markdown")
    parser.add_argument("--out", default=str(REPO / "docs" / "scaling_predicted.md"))
    parser.add_argument("--validation", help="JSON from tools/scaling/measure_memory.py --suite --out")
    parser.add_argument("--date", help="date stamped in the table (default: today)")
    args = parser.parse_args(argv)
    return run_table(args) if args.table else run_one(args)


if __name__ == "__main__":
    from dnascale.errors import run_cli

    run_cli(main)
