#!/usr/bin/env python
"""DNAZEN benchmarks: PMI extraction, vocabulary statistics, loader throughput, fused vs dense train step.

    # PMI extraction time and peak memory (the whole process tree, sampled every 50 ms) on one FASTA
    python tools/bench/bench_dnazen.py pmi FASTA --tokenizer DIR [--workers 2] [--out vocab.tsv.gz]
    # vocabulary statistics on real data: size, length histograms, G-grams per window (+ plot)
    python tools/bench/bench_dnazen.py vocab-stats --vocab V --tokenizer DIR FASTA [...] [--window 2000] [--plot P]
    # loader Mbp/s with whole-G-gram masking + matching in the workers (shards built first into --work-dir); also
    # Mbp per CPU-second of the workers, which a loaded machine does not distort
    python tools/bench/bench_dnazen.py loader FASTA --tokenizer DIR --vocab V [--workers 1] [--seconds 30]
    # train step (forward + backward + AdamW) at base shapes, csrc fusion vs dense bmm vs torch reference
    python tools/bench/bench_dnazen.py train-step --vocab V --tokenizer DIR FASTA [--batch 8] [--steps 3]

Every subcommand prints one JSON line with its numbers (and the machine), for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def machine() -> dict:
    import torch

    return {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "load_avg_1m": round(os.getloadavg()[0], 2),
            "date": time.strftime("%Y-%m-%d")}


# ---- pmi --------------------------------------------------------------------------------------------------------


def tree_rss_sampler(pid: int, peak: dict, stop: threading.Event) -> None:
    import psutil

    root = psutil.Process(pid)
    while not stop.is_set():
        try:
            procs = [root, *root.children(recursive=True)]
            total = 0
            for p in procs:
                try:
                    total += p.memory_info().rss
                except psutil.NoSuchProcess:
                    pass
            peak["tree"] = max(peak.get("tree", 0), total)
        except psutil.NoSuchProcess:
            return
        stop.wait(0.05)


def cmd_pmi(args: argparse.Namespace) -> dict:
    out = args.out or str(Path(tempfile.mkdtemp()) / "vocab.tsv.gz")
    cmd = [sys.executable, str(REPO / "tools" / "build_ggram_vocab.py"), *args.inputs, "--tokenizer", args.tokenizer,
           "--out", out, "--overwrite", "--workers", str(args.workers), "--no-progress",
           "--theta", str(args.theta), "--min-freq", str(args.min_freq)]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak: dict = {}
    stop = threading.Event()
    sampler = threading.Thread(target=tree_rss_sampler, args=(proc.pid, peak, stop), daemon=True)
    sampler.start()
    stdout, stderr = proc.communicate()
    wall = time.perf_counter() - start
    stop.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(stderr[-3000:])
    import resource

    summary = json.loads(stdout.strip().splitlines()[-1])
    return {"bench": "pmi", "inputs": [Path(p).name for p in args.inputs], "workers": args.workers,
            "wall_s": round(wall, 2), "peak_rss_tree_gib": round(peak.get("tree", 0) / 2**30, 3),
            "peak_rss_largest_process_gib": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20, 3),
            "tokens": summary["pairs"]["tokens"], "vocab_size": summary["size"],
            "length_histogram": summary["length_histogram"], "pairs": summary["pairs"], "machine": machine()}


# ---- vocab-stats ------------------------------------------------------------------------------------------------


def windows(paths: list[str], tokenizer, window: int, max_windows: int | None):
    from dnascale.data.fasta import CleaningPolicy, read_segments

    per_file = {}
    for path in paths:
        rows = []
        for segment in read_segments(path, CleaningPolicy()):
            for start in range(0, len(segment.seq) - window + 1, window):
                rows.append(tokenizer.encode(segment.seq[start : start + window]).astype(np.int64))
                if max_windows and len(rows) >= max_windows:
                    break
            if max_windows and len(rows) >= max_windows:
                break
        from dnascale.data.shards import species_name

        per_file[species_name(path)] = rows
    return per_file


def cmd_vocab_stats(args: argparse.Namespace) -> dict:
    from dnascale.data.ggram import GGramMatcher, GGramVocab, build_rows
    from dnascale.data.tokenizers import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer)
    vocab = GGramVocab.load(args.vocab)
    matcher = GGramMatcher(vocab, tokenizer.vocab_size)
    per_file = windows(args.inputs, tokenizer, args.window, args.max_windows)
    stats = vocab.statistics()
    bases = np.array([len(s) for s in vocab.sequences]) if vocab.sequences else None
    result = {"bench": "vocab-stats", "vocab": args.vocab, "tokenizer": tokenizer.name, **stats,
              "params": vocab.metadata.get("params"), "pairs": vocab.metadata.get("pairs"),
              "bases_histogram": {int(k): int(v) for k, v in zip(*np.unique(bases, return_counts=True))}
              if bases is not None else None, "window_bases": args.window, "per_species": {}}
    per_seq_all = {}
    for species, rows in per_file.items():
        counts, coverage, tokens = [], [], []
        for start in range(0, len(rows), 64):
            chunk = rows[start : start + 64]
            width = max(len(r) for r in chunk)
            ids = np.full((len(chunk), width), tokenizer.pad_id, dtype=np.int64)
            for i, r in enumerate(chunk):
                ids[i, : len(r)] = r
            matching = build_rows(matcher.find(ids), len(chunk), None)
            counts.extend(matching.rows_before_cap.tolist())
            covered = np.zeros(ids.shape, dtype=bool)
            covered[matching.triplets[:, 0], matching.triplets[:, 1]] = True
            coverage.extend((covered.sum(axis=1) / np.array([len(r) for r in chunk])).tolist())
            tokens.extend(len(r) for r in chunk)
        counts = np.array(counts)
        per_seq_all[species] = counts
        result["per_species"][species] = {
            "windows": len(rows), "tokens_per_window": float(np.mean(tokens)),
            "ggrams_per_window_mean": float(counts.mean()), "median": float(np.median(counts)),
            "p90": float(np.quantile(counts, 0.9)), "over_cap_30": float((counts > 30).mean()),
            "token_coverage": float(np.mean(coverage)),
        }
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
        hist = stats["length_histogram"]
        axes[0].bar(list(hist), list(hist.values()))
        axes[0].set_xlabel("G-gram length (BPE tokens)")
        axes[0].set_ylabel("G-grams")
        axes[0].set_yscale("log")
        axes[0].set_xticks(list(hist))
        axes[0].set_title(f"{stats['size']:,} G-grams (theta {vocab.metadata['params']['theta']}, "
                          f"min freq {vocab.metadata['params']['min_ngram_freq']})")
        if bases is not None:
            axes[1].hist(bases, bins=np.arange(bases.min(), bases.max() + 2) - 0.5)
            axes[1].set_xlabel("G-gram length (bases)")
            axes[1].set_title("length in bases")
        top = 100  # the rare repeat-rich windows beyond it are pooled into the last bin
        for species, counts in per_seq_all.items():
            axes[2].hist(np.minimum(counts, top), bins=np.arange(0, top + 2) - 0.5, histtype="step", density=True,
                         label=species)
        axes[2].axvline(30.5, color="grey", linestyle=":", label="cap 30")
        axes[2].set_xlabel(f"distinct G-grams per {args.window} bp window (>= {top} pooled)")
        axes[2].set_title("G-grams per sequence")
        axes[2].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=110)
    return result


# ---- loader ------------------------------------------------------------------------------------------------------


def build_bench_shards(args: argparse.Namespace) -> Path:
    from dnascale.data.shards import ShardConfig, build_shards

    directory = Path(args.work_dir) / f"shards-w{args.window}"
    if not (directory / "manifest.json").is_file():
        config = ShardConfig(window=args.window, tokenizer=args.tokenizer, val_fraction=0.0,
                             shard_max_bytes=4 * 2**20)
        build_shards(args.inputs, directory, config, workers=2, overwrite=True, progress=False)
    return directory


class CountingCollator:
    """The DNAZEN collator plus the bases it saw (windows are fixed-size in bases)."""

    def __init__(self, inner, window: int):
        self.inner, self.window = inner, window

    def __call__(self, samples):
        return self.inner(samples), len(samples) * self.window


def cmd_loader(args: argparse.Namespace) -> dict:
    import torch

    from dnascale.data.ggram_masking import GGramMLMCollator
    from dnascale.data.loader import ResumableLoader, ShardDataset
    from dnascale.data.tokenizers import load_tokenizer

    directory = build_bench_shards(args)
    tokenizer = load_tokenizer(args.tokenizer)
    collator = CountingCollator(GGramMLMCollator(tokenizer, args.vocab, seed=0, max_length=args.max_length),
                                args.window)
    dataset = ShardDataset(directory, "train", rank=0, world_size=1, seed=0, infinite=True)
    loader = ResumableLoader(dataset, args.batch_size, collator, num_workers=args.workers)
    import psutil

    def worker_cpu_s() -> float:
        """CPU seconds used so far by the loader's worker processes (all of this process's children)."""
        total = 0.0
        for child in psutil.Process().children(recursive=True):
            try:
                times = child.cpu_times()
                total += times.user + times.system
            except psutil.NoSuchProcess:
                pass
        return total

    stream = iter(loader)
    next(stream)
    cpu0 = worker_cpu_s()
    start, bases, batches, ggrams, rate = time.perf_counter(), 0, 0, [], []
    while time.perf_counter() - start < args.seconds:
        batch, n = next(stream)
        bases += n
        batches += 1
        ggrams.append(float((batch.extras["ggram_ids"] != 0).sum(dim=1).float().mean()))
        rate.append(float(batch.extras["masked_fraction"].mean()))
    elapsed = time.perf_counter() - start
    worker_cpu = worker_cpu_s() - cpu0
    # The collator alone, in this process (no shard reading, no inter-process transfer): per-core ceiling.
    samples = []
    for item in ShardDataset(directory, "train", rank=0, world_size=1, seed=0, infinite=False):
        samples.append(item)
        if len(samples) >= 40 * args.batch_size:
            break
    torch.set_num_threads(1)
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(0, len(samples), args.batch_size):
        collator(samples[i : i + args.batch_size])
    collate_s, collate_cpu_s = time.perf_counter() - t0, time.process_time() - c0
    return {"bench": "loader", "workers": args.workers, "batch_size": args.batch_size, "window_bases": args.window,
            "mbp_per_s": round(bases / elapsed / 1e6, 3),
            "mbp_per_s_per_worker": round(bases / elapsed / 1e6 / max(args.workers, 1), 3),
            "mbp_per_worker_cpu_s": round(bases / worker_cpu / 1e6, 3) if worker_cpu > 0 else None,
            "collator_only_mbp_per_s_one_thread": round(len(samples) * args.window / collate_s / 1e6, 3),
            "collator_only_mbp_per_cpu_s": round(len(samples) * args.window / collate_cpu_s / 1e6, 3),
            "batches": batches, "ggrams_per_seq": round(statistics.mean(ggrams), 2),
            "mask_rate": round(statistics.mean(rate), 4), "machine": machine()}


# ---- train-step ----------------------------------------------------------------------------------------------------


def cmd_train_step(args: argparse.Namespace) -> dict:
    import torch

    from dnascale.data.ggram import GGramVocab
    from dnascale.data.ggram_masking import GGramMLMCollator
    from dnascale.data.tokenizers import load_tokenizer
    from dnascale.models import load_preset
    from dnascale.models.dnazen import DnazenForMLM
    from dnascale.ops.ggram_fusion import GGramMatching, ggram_fusion, ggram_fusion_dense
    from dnascale.parallel import init_distributed

    init_distributed(tp=1, seed=0)
    torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer(args.tokenizer)
    vocab = GGramVocab.load(args.vocab)
    config = load_preset("dnazen", args.preset)
    config.dropout = 0.0
    config.ggram_vocab_size = max(config.ggram_vocab_size, vocab.num_embeddings)
    rows = windows(args.inputs, tokenizer, config.window_bases, args.batch)
    samples = [{"ids": r, "epoch": 0, "index": i} for i, r in enumerate(next(iter(rows.values()))[: args.batch])]
    batch = GGramMLMCollator(tokenizer, vocab, seed=0, max_length=config.max_seq_len)(samples)
    extras = batch.extras
    b, t = batch.input_ids.shape
    m = extras["ggram_ids"].shape[1]
    torch.manual_seed(0)
    model = DnazenForMLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    result = {"bench": "train-step", "preset": args.preset, "batch": b, "tokens": t, "ggram_rows": m,
              "matches": int(extras["ggram_triplets"].shape[0]), "threads": args.threads, "steps": {}}
    # Backends take turns within every step (the same weights: each step is undone), so a machine whose load
    # drifts slows them alike; the first round is warm-up.
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    times = {backend: [] for backend in args.backends}
    losses = {}
    for step in range(args.steps + 1):
        for backend in args.backends:
            with torch.no_grad():
                for name, param in model.named_parameters():
                    param.copy_(start[name])
            model.config.fusion_backend = backend
            t0 = time.perf_counter()
            out = model(batch.input_ids, batch.attention_mask, batch.labels, **extras)
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            optimizer.step()
            if step:
                times[backend].append(time.perf_counter() - t0)
            losses[backend] = round(out.loss.item(), 4)
    for backend in args.backends:
        result["steps"][backend] = {"median_s": round(statistics.median(times[backend]), 3), "loss": losses[backend]}
    # The fusion op alone at these shapes (6 layers' worth), forward + backward.
    matching = GGramMatching.from_triplets(extras["ggram_triplets"], b, t, m)
    dense = matching.dense()
    h = torch.randn(b, t, config.hidden, requires_grad=True)
    g = torch.randn(b, m, config.hidden, requires_grad=True)
    op = {"csrc": [], "dense": []}
    fns = {"csrc": lambda: ggram_fusion(h, g, matching), "dense": lambda: ggram_fusion_dense(h, g, dense)}
    for rep in range(args.op_reps + 1):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(config.ggram_layers):
                fn().sum().backward()
            if rep:
                op[name].append(time.perf_counter() - t0)
    op = {name: round(statistics.median(v) * 1e3, 2) for name, v in op.items()}
    result["fusion_op_ms_per_step"] = op
    result["machine"] = machine()
    return result


# ---- CLI ---------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="bench", required=True)
    pmi = sub.add_parser("pmi")
    pmi.add_argument("inputs", nargs="+")
    pmi.add_argument("--tokenizer", required=True)
    pmi.add_argument("--workers", type=int, default=2)
    pmi.add_argument("--theta", type=float, default=2.0)
    pmi.add_argument("--min-freq", type=int, default=5)
    pmi.add_argument("--out")
    stats = sub.add_parser("vocab-stats")
    stats.add_argument("inputs", nargs="+")
    stats.add_argument("--vocab", required=True)
    stats.add_argument("--tokenizer", required=True)
    stats.add_argument("--window", type=int, default=2000)
    stats.add_argument("--max-windows", type=int, default=2000, help="per file")
    stats.add_argument("--plot")
    loader = sub.add_parser("loader")
    loader.add_argument("inputs", nargs="+")
    loader.add_argument("--tokenizer", required=True)
    loader.add_argument("--vocab", required=True)
    loader.add_argument("--work-dir", default=str(Path(tempfile.gettempdir()) / "dnazen-bench"))
    loader.add_argument("--window", type=int, default=2000)
    loader.add_argument("--max-length", type=int, default=512)
    loader.add_argument("--batch-size", type=int, default=32)
    loader.add_argument("--workers", type=int, default=1)
    loader.add_argument("--seconds", type=float, default=20.0)
    step = sub.add_parser("train-step")
    step.add_argument("inputs", nargs="+")
    step.add_argument("--vocab", required=True)
    step.add_argument("--tokenizer", required=True)
    step.add_argument("--preset", default="base")
    step.add_argument("--batch", type=int, default=8)
    step.add_argument("--steps", type=int, default=3)
    step.add_argument("--threads", type=int, default=2)
    step.add_argument("--op-reps", type=int, default=5)
    step.add_argument("--backends", nargs="+", default=["cpu", "dense", "reference"])
    args = p.parse_args(argv)
    runner = {"pmi": cmd_pmi, "vocab-stats": cmd_vocab_stats, "loader": cmd_loader, "train-step": cmd_train_step}
    print(json.dumps(runner[args.bench](args), default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
