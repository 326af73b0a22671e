#!/usr/bin/env python
"""Score SNVs with a masked-LM: log P(ALT) / P(REF) at the masked variant base, in a window centred on it.

    python tools/score_variants.py runs/encoder genome.fa.gz variants.vcf.gz --out scores.tsv
    python tools/score_variants.py runs/encoder-hf genome.fa.gz variants.tsv --out scores.tsv --device cuda

VARIANTS is a VCF (CHROM POS ID REF ALT ..., 1-based) or a TSV of CHROM POS REF ALT, plain or gzipped. The output
TSV has one row per ALT allele: chrom, pos, ref, alt, llr (nats; negative: the model prefers REF), logp_ref,
logp_alt, status ("scored" or "skipped: <reason>" for indels, MNVs, symbolic alleles ...) and the input line.
A REF that does not match the genome is an error naming the line. dnascale/infer/variants.py has the details.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from dnascale.errors import run_cli  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="run dir, checkpoint dir, init dir or HF export")
    p.add_argument("fasta")
    p.add_argument("variants", help="VCF or CHROM POS REF ALT TSV (optionally gzipped)")
    p.add_argument("--out", required=True)
    p.add_argument("--window", type=int, default=None, help="bases of context (default: the model's window)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    a = p.parse_args(argv)
    import warnings

    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
    from dnascale.infer.backbone import load_model, resolve_device
    from dnascale.infer.variants import read_variants, score_variants, summary, write_scores

    variants = read_variants(a.variants)  # malformed lines fail before the model is read
    model = load_model(a.checkpoint, resolve_device(a.device))
    scores = score_variants(model, a.fasta, variants, a.window, a.batch_size)
    write_scores(scores, a.out)
    print(f"{summary(scores)} -> {a.out}")
    return 0


if __name__ == "__main__":
    run_cli(main)
