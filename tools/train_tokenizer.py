#!/usr/bin/env python
"""Train a DNA BPE tokenizer (sentencepiece, DNABERT-2 special layout) from FASTA files.

    python tools/train_tokenizer.py FASTA [FASTA ...] --out DIR [--vocab-size 4096] [--seed 0] [--max-bases N] [--chunk 2000]

Each input is cleaned by dnascale.data.fasta (uppercase ACGTN, long N runs split off), cut into --chunk-base
sentences and, up to --max-bases bases in all (shared evenly between the files), given to sentencepiece in a
seeded order. Same inputs + seed -> byte-identical model. DIR receives the dnascale tokenizer
(dnascale_tokenizer.json + bpe.model, for `--tokenizer DIR` in build_shards.py) and its Hugging Face twin
(tokenizer.json, tokenizer_config.json, special_tokens_map.json).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Sequence

from tqdm import tqdm

from dnascale.data.fasta import CleaningPolicy, read_segments
from dnascale.data.tokenizers import CONFIG_FILE, BPETokenizer
from dnascale.errors import ConfigError, DataError, run_cli

DEFAULT_MAX_BASES = 50_000_000  # enough for a 4096-piece vocabulary; sentencepiece holds all of it in memory


def collect_training_sequences(
    paths: Sequence[str | os.PathLike[str]], max_bases: int | None, chunk: int, progress: bool = False
) -> list[bytes]:
    """Clean FASTA segments cut into sentences of at most `chunk` bases, `max_bases` in all (None: everything).

    The budget is shared between files: each file may use an equal part of what the earlier files left, so one
    large genome does not crowd out the others.
    """
    if chunk < 1:
        raise ConfigError(f"--chunk must be >= 1, got {chunk}")
    if max_bases is not None and max_bases < 1:
        raise ConfigError(f"--max-bases must be >= 1, got {max_bases}")
    sentences: list[bytes] = []
    used = 0
    bar = tqdm(total=max_bases, unit="bp", unit_scale=True, desc="reading", disable=not progress)
    for index, path in enumerate(paths):
        budget = None if max_bases is None else (max_bases - used) // (len(paths) - index)
        taken = 0
        for segment in read_segments(path, policy=CleaningPolicy()):
            seq = segment.seq if budget is None else segment.seq[: budget - taken]
            sentences.extend(seq[i : i + chunk] for i in range(0, len(seq), chunk))
            taken += len(seq)
            bar.update(len(seq))
            if budget is not None and taken >= budget:
                break
        used += taken
    bar.close()
    if not sentences:
        raise DataError(f"no sequence data in {', '.join(map(str, paths))}")
    return sentences


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("inputs", nargs="+", help="FASTA or gzipped FASTA files")
    p.add_argument("--out", required=True, help="output directory for the tokenizer")
    p.add_argument("--vocab-size", type=int, default=4096, help="total vocabulary incl. 5 specials (default 4096)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sentence order (default 0)")
    p.add_argument("--max-bases", type=int, default=DEFAULT_MAX_BASES,
                   help=f"bases to train on, 0 = all (default {DEFAULT_MAX_BASES:,})")
    p.add_argument("--chunk", type=int, default=2000, help="bases per training sentence (default 2000)")
    p.add_argument("--overwrite", action="store_true", help="replace a tokenizer already in --out")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    if (out / CONFIG_FILE).exists() and not args.overwrite:
        raise ConfigError(f"{out} already holds a tokenizer; pass --overwrite to replace it")
    for path in args.inputs:
        if not Path(path).is_file():
            raise DataError(f"{path}: no such FASTA file")
    sentences = collect_training_sequences(args.inputs, args.max_bases or None, args.chunk, progress=True)
    bases = sum(len(s) for s in sentences)
    print(f"training BPE vocab {args.vocab_size} on {bases:,} bases ({len(sentences):,} sentences)", file=sys.stderr)
    tokenizer = BPETokenizer.train(sentences, vocab_size=args.vocab_size, seed=args.seed, chunk=args.chunk)
    tokenizer.save(out)
    tokenizer.save_hf(out)
    sample = b"".join(sentences[:: max(1, len(sentences) // 200)])  # ~200 sentences spread over the data
    per_token = len(sample) / max(1, len(tokenizer.encode(sample)))
    print(f"{tokenizer.name}: {per_token:.2f} bases/token on the training data; written to {out}")
    return 0


if __name__ == "__main__":
    run_cli(main)
