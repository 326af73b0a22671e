#!/usr/bin/env python
"""Per-base embeddings, masked-LM scores and DNACHUNKER boundaries for whole genomes, written to zarr.

    python tools/infer.py runs/chunker genome.fa.gz --out genome.zarr --what embeddings,mlm_score,boundaries
    python tools/infer.py runs/encoder-hf genome.fa.gz --out genome.zarr --records chrI,chrII --dtype bf16 \\
        --device cuda --batch-size 64

CHECKPOINT is a pretraining run (its latest checkpoint; any ZeRO stage, DP and TP size), a checkpoint tag
directory, an init directory (tools/convert_from_hf.py) or an HF export (tools/convert_to_hf.py). Each record is
tiled with windows of --window bases (default: the model's training window) every --stride bases (default: half
a window); each base takes the value of the window whose centre is nearest to it. The store holds one group per
record (dnascale/infer/writer.py documents the layout). An interrupted run resumes where it stopped when rerun
with the same settings; other settings into the same --out are refused.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from dnascale.errors import run_cli  # noqa: E402


def _names(text: str) -> tuple[str, ...]:
    return tuple(t for t in (s.strip() for s in text.split(",")) if t)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="run dir, checkpoint dir, init dir or HF export")
    p.add_argument("fasta", help="FASTA or gzipped FASTA")
    p.add_argument("--out", required=True, help="zarr store to write (or resume)")
    p.add_argument("--what", type=_names, default=("embeddings",),
                   help="comma-separated: embeddings, mlm_score, boundaries (default: embeddings)")
    p.add_argument("--window", type=int, default=None, help="bases per window (default: the model's)")
    p.add_argument("--stride", type=int, default=None, help="bases between window starts (default: window / 2)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    p.add_argument("--dtype", default="fp32", help="fp32 | bf16: embeddings storage (and CUDA autocast)")
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("--records", type=_names, default=None, help="comma-separated record ids (default: all)")
    p.add_argument("--mlm-groups", type=int, default=None,
                   help="mlm_score: masked passes per window (default: 1 / the pretraining mask rate)")
    p.add_argument("--chunk-bases", type=int, default=None, help="bases per zarr chunk (default: ~4 MiB chunks)")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    import warnings

    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
    from dnascale.infer.run import InferConfig, infer

    cfg = InferConfig(checkpoint=a.checkpoint, fasta=a.fasta, out=a.out, what=a.what, window=a.window,
                      stride=a.stride, batch_size=a.batch_size, dtype=a.dtype, device=a.device, records=a.records,
                      mlm_groups=a.mlm_groups, chunk_bases=a.chunk_bases, progress=not a.no_progress)
    summary = infer(cfg)
    print(f"wrote {','.join(cfg.what)} for "
          f"{len(summary.records)} records ({sum(summary.records.values()):,} bp; {summary.bases_computed:,} bp "
          f"computed by this run) to {summary.store}")
    return 0


if __name__ == "__main__":
    run_cli(main)
