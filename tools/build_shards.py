#!/usr/bin/env python
"""Build WebDataset shards from FASTA files.

    python tools/build_shards.py FASTA [FASTA ...] --out DIR [--tokenizer nucleotide|PATH] [--window N] [--stride N]

Every input is cleaned (see dnascale.data.fasta.CleaningPolicy), cut into windows, tokenized and written to tar
shards; DIR/manifest.json records the config, the sources with their sha256, shards with sample/token counts, and
where every base went (bases_read == bases_written + sum(bases_dropped)).
"""

from __future__ import annotations

import argparse
import json

from dnascale.data.fasta import CleaningPolicy
from dnascale.data.shards import SPLIT_POLICIES, TAIL_POLICIES, ShardConfig, build_shards
from dnascale.errors import run_cli


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("inputs", nargs="+", help="FASTA or gzipped FASTA files (one species per file)")
    p.add_argument("--out", required=True, help="output directory for shards and manifest.json")
    p.add_argument("--tokenizer", default="nucleotide", help="nucleotide, nucleotide-byte, or a tokenizer directory")
    p.add_argument("--window", type=int, default=1024, help="bases per sample (default 1024)")
    p.add_argument("--stride", type=int, default=None, help="bases between window starts (default: the window)")
    p.add_argument("--tail", choices=TAIL_POLICIES, default="end_aligned")
    p.add_argument("--reverse-complement", action="store_true", help="also write each window's reverse complement")
    p.add_argument("--max-n-fraction", type=float, default=0.5, help="drop windows with more N than this")
    p.add_argument("--split", choices=SPLIT_POLICIES, default="hash")
    p.add_argument("--val-fraction", type=float, default=0.01, help="validation share for --split hash")
    p.add_argument("--val-records", default="", help="comma-separated record ids to hold out for --split record")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shard-size-mb", type=float, default=16.0, help="target shard size")
    p.add_argument("--shard-max-samples", type=int, default=100_000)
    p.add_argument("--softmask", action="store_true", help="keep a per-base soft-mask track (softmask.npy)")
    p.add_argument("--max-n-run", type=int, default=CleaningPolicy.max_n_run, help="longer N runs split records")
    p.add_argument("--iupac", choices=("to_n", "keep", "error"), default="to_n")
    p.add_argument("--on-empty-record", choices=("error", "skip"), default=CleaningPolicy.on_empty_record,
                   help="a record with no sequence: stop with an error (default), or skip it (counted in the manifest)")
    p.add_argument("--on-duplicate-id", choices=("error", "skip"), default=CleaningPolicy.on_duplicate_id,
                   help="a repeated record id in one file: stop with an error (default), or skip the later record "
                   "(its bases counted as dropped)")
    p.add_argument("--workers", type=int, default=1, help="processes, one input file each")
    p.add_argument("--overwrite", action="store_true", help="replace shards already in --out")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    cleaning = CleaningPolicy(
        keep_softmask=args.softmask,
        max_n_run=args.max_n_run,
        iupac=args.iupac,
        on_empty_record=args.on_empty_record,
        on_duplicate_id=args.on_duplicate_id,
    )
    config = ShardConfig(
        window=args.window,
        stride=args.stride,
        tail=args.tail,
        reverse_complement=args.reverse_complement,
        max_n_fraction=args.max_n_fraction,
        split=args.split,
        val_fraction=args.val_fraction,
        val_records=tuple(r for r in args.val_records.split(",") if r),
        seed=args.seed,
        tokenizer=args.tokenizer,
        keep_softmask=args.softmask,
        shard_max_bytes=int(args.shard_size_mb * 2**20),
        shard_max_samples=args.shard_max_samples,
        cleaning=cleaning,
    )
    manifest = build_shards(args.inputs, args.out, config, workers=args.workers, overwrite=args.overwrite)
    print(f"wrote {args.out}/manifest.json")
    print(f"  bases read {manifest['bases_read']:,}  written {manifest['bases_written']:,}")
    print(f"  bases dropped {json.dumps(manifest['bases_dropped'])}")
    skipped = manifest["cleaning"]["records_skipped"]
    if skipped:
        print(f"  records skipped {json.dumps(skipped)}")
    sources = manifest["sources"]
    for source in sources if len(sources) > 1 else ():
        windows = sum(source["windows"].values())
        records = source["records"]
        print(f"  {source['file']}: {records:,} record{'s' if records != 1 else ''}, "
              f"bases read {source['bases_read']:,} written {source['bases_written']:,}, {windows:,} windows")
    for source in sources:
        if source["nothing_written"]:
            print(f"  note: {source['file']} contributed no window: {source['nothing_written']}")
    for split, info in manifest["splits"].items():
        print(f"  {split}: {info['samples']:,} windows, {info['tokens']:,} tokens in {len(info['shards'])} shards")
    return 0


if __name__ == "__main__":
    run_cli(main)
