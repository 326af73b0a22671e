#!/usr/bin/env python
"""Build a DNAZEN G-gram vocabulary by PMI segmentation of a BPE-tokenized corpus (dnascale.data.ggram).

On one machine (every stage, parts run by --workers processes):

    python tools/build_ggram_vocab.py SHARD_DIR|FASTA [...] --out vocab.tsv.gz [--tokenizer DIR] \\
        [--theta 2] [--min-token-count 5] [--min-freq 5] [--max-len 5] [--max-vocab N] [--workers 2] [--parts 8]

Inputs are shard directories built with a BPE tokenizer (ids as stored; the manifest names the tokenizer) and/or
FASTA files (cleaned, cut into --doc-bases pieces and encoded with --tokenizer). The output is the versioned,
sorted vocabulary file (ids, tokens, counts, PMI, bases) that the DNAZEN collator reads; a summary (size, length
histogram, pass statistics, time) is printed as one JSON line.

On a cluster, one process per part and stage (e.g. a SLURM array of --parts tasks), all sharing --work-dir:

    for stage in pairs candidates recount; do
        sbatch --wait --array=0-63 --wrap "python tools/build_ggram_vocab.py IN... --work-dir W --stage $stage"
        python tools/build_ggram_vocab.py IN... --work-dir W --parts 64 --stage merge-$stage [--out vocab.tsv.gz]
    done

(--part and --parts default to $SLURM_ARRAY_TASK_ID / $SLURM_ARRAY_TASK_COUNT, else $RANK / $WORLD_SIZE, so one
`srun` or `torchrun` line runs every part of a stage.) Each part reads its own shards (shard k -> part k % parts)
in bounded chunks; a merge sums the partial counts.
The work directory records the inputs and parameters and refuses a stage run with different ones.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

from dnascale.data.ggram import CorpusSpec, PMIConfig, VocabBuild
from dnascale.errors import ConfigError, DataError, run_cli

STAGES = ("all", *VocabBuild.STAGES)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("inputs", nargs="+", help="shard directories and/or FASTA files")
    p.add_argument("--out", help="vocabulary file (.tsv or .tsv.gz); needed by --stage all and merge-recount")
    p.add_argument("--tokenizer", help="BPE tokenizer directory (default: the shards' manifest's)")
    defaults = PMIConfig()
    p.add_argument("--theta", type=float, default=defaults.theta, help="PMI threshold, log2 (default 2)")
    p.add_argument("--min-token-count", type=int, default=defaults.min_token_count)
    p.add_argument("--min-freq", type=int, default=defaults.min_ngram_freq, help="minimum G-gram frequency")
    p.add_argument("--min-len", type=int, default=defaults.min_len)
    p.add_argument("--max-len", type=int, default=defaults.max_len)
    p.add_argument("--max-vocab", type=int, default=None, help="keep the N most frequent G-grams (default: all)")
    p.add_argument("--no-dedup", action="store_true", help="keep exact duplicate sequences")
    p.add_argument("--chunk-tokens", type=int, default=defaults.chunk_tokens, help="tokens per vectorised step")
    p.add_argument("--max-table", type=int, default=defaults.max_table, help="pass-2 entries before pruning")
    p.add_argument("--splits", nargs="+", default=["train"], help="shard splits to read (default train)")
    p.add_argument("--doc-bases", type=int, default=100_000, help="FASTA piece size in bases (default 100,000)")
    p.add_argument("--workers", type=int, default=1, help="processes for --stage all (default 1)")
    p.add_argument("--parts", type=int, default=None,
                   help="corpus parts (--stage all: default 4 x workers; stages: default $SLURM_ARRAY_TASK_COUNT "
                        "or $WORLD_SIZE)")
    p.add_argument("--work-dir", help="partial counts (default: a temporary directory, removed at the end)")
    p.add_argument("--stage", choices=STAGES, default="all")
    p.add_argument("--part", type=int, help="the part a counting stage runs, 0-based (default $SLURM_ARRAY_TASK_ID or "
                                            "$RANK)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    shards, fasta = [], []
    for item in args.inputs:
        path = Path(item)
        if path.is_dir():
            shards.append(str(path))
        elif path.is_file():
            fasta.append(str(path))
        else:
            raise DataError(f"{item}: no such shard directory or FASTA file")
    if args.workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {args.workers}")
    counting = args.stage in ("pairs", "candidates", "recount")
    # Under a scheduler the part and the part count may come from the environment (SLURM arrays, torchrun ranks).
    if counting and args.part is None:
        env = os.environ.get("SLURM_ARRAY_TASK_ID", os.environ.get("RANK"))
        args.part = int(env) if env is not None else None
    if args.parts is None and args.stage != "all":
        env = os.environ.get("SLURM_ARRAY_TASK_COUNT", os.environ.get("WORLD_SIZE"))
        args.parts = int(env) if env is not None else None
        if args.parts is None:
            raise ConfigError(f"--stage {args.stage} needs --parts (the same for every stage of the build)")
    parts = args.parts or 4 * args.workers
    needs_out = args.stage in ("all", "merge-recount")
    if needs_out and not args.out:
        raise ConfigError(f"--stage {args.stage} writes the vocabulary: give --out")
    if needs_out and Path(args.out).exists() and not args.overwrite:
        raise ConfigError(f"{args.out} exists; pass --overwrite to replace it")
    if args.stage != "all" and not args.work_dir:
        raise ConfigError(f"--stage {args.stage} needs a shared --work-dir")
    spec = CorpusSpec(shards=tuple(shards), fasta=tuple(fasta), tokenizer=args.tokenizer,
                      splits=tuple(args.splits), doc_bases=args.doc_bases)
    config = PMIConfig(theta=args.theta, min_token_count=args.min_token_count, min_ngram_freq=args.min_freq,
                       min_len=args.min_len, max_len=args.max_len, max_vocab=args.max_vocab,
                       dedup=not args.no_dedup, chunk_tokens=args.chunk_tokens, max_table=args.max_table)
    temporary = args.work_dir is None
    work_dir = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="ggram-build-"))
    try:
        build = VocabBuild(spec, config, work_dir, parts)
        if counting:
            if args.part is None:
                raise ConfigError(f"--stage {args.stage} counts one part: give --part (0..{parts - 1}), or run it "
                                  "as a SLURM array task / torchrun rank")
            stats = build.run_part(args.stage, args.part)
            print(json.dumps({"stage": args.stage, "part": args.part, **stats}))
            return 0
        if args.stage.startswith("merge-"):
            result = build.merge(args.stage, args.out)
            if args.stage != "merge-recount":
                print(json.dumps({"stage": args.stage, **result.stats}, default=str))
                return 0
            vocab = result
        else:
            vocab = build.run_local(args.out, workers=args.workers, progress=not args.no_progress)
    finally:
        if temporary:
            shutil.rmtree(work_dir, ignore_errors=True)
    summary = {"out": args.out, "tokenizer": vocab.tokenizer_name, **vocab.statistics(),
               "pairs": vocab.metadata.get("pairs"), "counts": vocab.metadata.get("counts"),
               "seconds": round(time.perf_counter() - started, 2)}
    print(json.dumps(summary, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
