#!/usr/bin/env python
"""DNACHUNKER training throughput on this machine, and where the step time goes.

    python tools/bench/bench_dnachunker.py --preset tiny --steps 8 --warmup 2 [--checkpoint OUT/checkpoints]

1. Throughput: full training steps (forward, backward, AdamW) of the plain PyTorch model (no DeepSpeed), on
   real windows of the bundled yeast genome masked by the recipe's collator; step time -> tokens/s.
2. Breakdown: every call of each top-level part (embedding, BiMamba encoders, routers, chunk layer, trunk, dechunk
   layer, residual projections, BiMamba decoders, head) is captured with its inputs during one forward, then
   replayed alone, forward + backward (random output gradients), `--reps` times. Shares are of the full step;
   "rest" is the step minus the parts (loss, metrics, the optimizer, Python glue).
Times are the best of the repetitions (`--stat min`, the default: the least disturbed by other jobs on a shared
machine) or their median (`--stat median`).
Chunk counts follow the router: with random initial weights compression is not at its target; pass a trained
checkpoint (`--checkpoint`, as tools/analysis/boundaries.py takes it) for representative ones.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

PARTS = ("embeddings", "encoders", "routers", "chunk_layer", "trunk", "dechunk_layer", "residuals", "decoders",
         "head")
ROUTING_PARTS = ("routers", "chunk_layer", "dechunk_layer")


def _batches(config, batch_size: int, count: int, seed: int):
    from dnascale.data.chunker_masking import ChunkerMLMCollator
    from dnascale.data.tokenizers import load_tokenizer
    from dnascale.models.dnachunker import data_window
    from dnascale.train.data import BUNDLED_GENOMES

    tokenizer = load_tokenizer("nucleotide-char")
    collator = ChunkerMLMCollator(tokenizer, seed=seed, max_length=config.max_seq_len)
    with gzip.open(BUNDLED_GENOMES / "scerevisiae_r64_chrI.fna.gz", "rt") as handle:
        sequence = "".join(line.strip() for line in handle if not line.startswith(">")).upper()
    window = data_window(config)
    ids = tokenizer.encode(sequence)
    batches = []
    for b in range(count):
        samples = [{"ids": ids[(b * batch_size + i) * window:(b * batch_size + i + 1) * window], "epoch": 0,
                    "index": b * batch_size + i} for i in range(batch_size)]
        batches.append(collator(samples))
    return batches


def _leaves(value, out):
    if isinstance(value, torch.Tensor):
        out.append(value)
    elif isinstance(value, (tuple, list)):
        for v in value:
            _leaves(v, out)
    elif isinstance(value, dict):
        for v in value.values():
            _leaves(v, out)
    return out


def _with_grad(value):
    """A copy of the call's inputs with fresh leaf tensors (float ones requiring grad)."""
    if isinstance(value, torch.Tensor):
        copy = value.detach().clone()
        return copy.requires_grad_() if copy.is_floating_point() else copy
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*(_with_grad(v) for v in value))
    if isinstance(value, (tuple, list)):
        return type(value)(_with_grad(v) for v in value)
    if isinstance(value, dict):
        return {k: _with_grad(v) for k, v in value.items()}
    return value


def _capture(model, batch):
    """{part: [(module, args, kwargs), ...]} for one forward."""
    calls = {part: [] for part in PARTS}
    hooks = []
    for part in PARTS:
        module = getattr(model, part)
        targets = list(module) if isinstance(module, torch.nn.ModuleList) else [module]
        for target in targets:
            def hook(mod, args, kwargs, part=part):
                calls[part].append((mod, _with_grad(args), _with_grad(kwargs)))
            hooks.append(target.register_forward_pre_hook(hook, with_kwargs=True))
    with torch.no_grad():
        model(batch.input_ids, batch.attention_mask, batch.labels)
    for h in hooks:
        h.remove()
    # The head also takes the tied embedding weight: give it a gradient too, as in training.
    return calls


def _replay(module, args, kwargs) -> float:
    args, kwargs = _with_grad(args), _with_grad(kwargs)
    start = time.perf_counter()
    out = module(*args, **kwargs)
    floats = [t for t in _leaves(out, []) if t.is_floating_point() and t.requires_grad]
    if floats:
        loss = sum((t * torch.randn_like(t)).sum() for t in floats)
        loss.backward()
    return time.perf_counter() - start


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--override", action="append", default=[], metavar="FIELD=VALUE")
    p.add_argument("--checkpoint", type=Path, default=None, help="trained weights (DeepSpeed checkpoint dir)")
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--stat", choices=("min", "median"), default="min")
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)

    from dnascale.config import apply_overrides
    from dnascale.models.dnachunker import DNAChunkerForMLM
    from dnascale.models.registry import load_preset
    from dnascale.parallel import init_distributed

    if a.checkpoint is not None:
        from tools.analysis.boundaries import load_model

        model, config = load_model(a.checkpoint, a.preset, a.override)
        torch.set_grad_enabled(True)
        model.train()
    else:
        config = load_preset("dnachunker", a.preset)
        if a.override:
            config = apply_overrides(config, a.override, source="--override")
        init_distributed(tp=1, seed=0)
        model = DNAChunkerForMLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batches = _batches(config, a.micro_batch_size, a.warmup + a.steps, seed=0)

    times, tokens, metrics = [], [], []
    for i, batch in enumerate(batches):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        out = model(batch.input_ids, batch.attention_mask, batch.labels)
        out.loss.backward()
        optimizer.step()
        elapsed = time.perf_counter() - start
        if i >= a.warmup:
            times.append(elapsed)
            tokens.append(batch.num_tokens)
            metrics.append(out.metrics)
    pick = min if a.stat == "min" else statistics.median
    step = pick(times)
    tokens_per_s = statistics.median(tokens) / step

    calls = _capture(model, batches[-1])
    part_times = {}
    for part, recorded in calls.items():
        per_rep = [sum(_replay(module, args, kwargs) for module, args, kwargs in recorded) for _ in range(a.reps)]
        part_times[part] = pick(per_rep)
    model.zero_grad(set_to_none=True)
    rest = step - sum(part_times.values())
    routing_share = sum(part_times[p] for p in ROUTING_PARTS) / step

    mean = {k: statistics.fmean(m[k] for m in metrics) for k in metrics[0]}
    print(f"dnachunker-{a.preset}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, micro-batch "
          f"{a.micro_batch_size} x {config.max_seq_len} tokens, {torch.get_num_threads()} threads")
    print(f"train step (fwd+bwd+AdamW): {a.stat} {step * 1e3:.0f} ms over {len(times)} steps (median "
          f"{statistics.median(times) * 1e3:.0f} ms) -> {tokens_per_s:,.0f} tokens/s")
    print("compression per stage: " + ", ".join(
        f"s{s}: {mean[f'compression_s{s}']:.3f} (free {mean[f'free_compression_s{s}']:.3f})"
        for s in range(1, config.stages + 1)) + f"; {mean['bp_per_trunk_token']:.2f} bp per trunk token")
    print(f"{'part':<14} {'fwd+bwd ms':>10} {'share':>7}")
    for part in PARTS:
        print(f"{part:<14} {part_times[part] * 1e3:>10.1f} {part_times[part] / step:>7.1%}")
    print(f"{'rest':<14} {rest * 1e3:>10.1f} {rest / step:>7.1%}")
    print(f"routing + chunk + dechunk: {routing_share:.1%} of the step")
    if a.json:
        a.json.write_text(json.dumps({
            "preset": a.preset, "micro_batch_size": a.micro_batch_size, "threads": torch.get_num_threads(),
            "stat": a.stat, "step_times_s": times,
            "step_s": step, "tokens_per_s": tokens_per_s, "parts_s": part_times, "rest_s": rest,
            "routing_share": routing_share, "metrics": mean,
        }, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
