#!/usr/bin/env python
"""Plot DNACHUNKER boundary probabilities along a chromosome from a tools/infer.py zarr store, genes beneath.

    python tools/infer.py runs/chunker dnascale/genomes/scerevisiae_r64_chrI.fna.gz --out chrI.zarr \\
        --what boundaries
    python tools/analysis/boundary_track.py chrI.zarr --gff ../shared/data/genomes/scerevisiae_r64_chrI.gff.gz \\
        --out docs/img/chrI_boundaries.png

Top: the whole record, each stage's boundary probability averaged over --smooth bp (the expected number of chunk
starts per bp, i.e. 1 / expected chunk length), with the genes of the GFF (`gene` features, by strand) beneath.
Bottom: a --zoom region (default: the --zoom-width bp around the first gene start past a quarter of the record)
at base resolution. The GFF is read for --record (default: the store's only / first record).
"""

from __future__ import annotations

import argparse
import gzip
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from dnascale.errors import DataError, run_cli  # noqa: E402


@dataclass(frozen=True)
class Gene:
    start: int  # 0-based, inclusive
    end: int  # 0-based, exclusive
    strand: int  # +1 / -1
    name: str


def read_genes(path: str, record: str) -> list[Gene]:
    opener = gzip.open if path.endswith(".gz") else open
    genes = []
    try:
        with opener(path, "rt") as handle:
            for line in handle:
                fields = line.rstrip("\n").split("\t")
                if line.startswith("#") or len(fields) < 9 or fields[0] != record or fields[2] != "gene":
                    continue
                attrs = dict(kv.split("=", 1) for kv in fields[8].split(";") if "=" in kv)
                name = attrs.get("Name") or attrs.get("gene") or attrs.get("ID", "")
                genes.append(Gene(int(fields[3]) - 1, int(fields[4]), -1 if fields[6] == "-" else 1, name))
    except OSError as err:
        raise DataError(f"{path}: cannot read GFF ({err})") from None
    if not genes:
        raise DataError(f"{path}: no gene features on record {record!r}")
    return genes


def _draw_genes(ax, genes: list[Gene], lo: int, hi: int, labels: bool) -> None:
    from matplotlib.patches import Rectangle

    for gene in genes:
        if gene.end <= lo or gene.start >= hi:
            continue
        y = 0.6 if gene.strand > 0 else 0.1
        ax.add_patch(Rectangle((gene.start, y), gene.end - gene.start, 0.3, color="C2" if gene.strand > 0 else "C3",
                               lw=0))
        if labels:
            ax.text((max(gene.start, lo) + min(gene.end, hi)) / 2, y + 0.15, gene.name, ha="center", va="center",
                    fontsize=7)
    ax.set_ylim(0, 1)
    ax.set_yticks([0.25, 0.75], ["- strand", "+ strand"])
    ax.set_xlim(lo, hi)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("store", help="zarr store written by tools/infer.py with --what boundaries")
    p.add_argument("--gff", required=True)
    p.add_argument("--record", default=None)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--smooth", type=int, default=1000, help="bp per averaging window of the whole-record panel")
    p.add_argument("--zoom", default=None, help="START-END, 1-based inclusive, of the base-resolution panel")
    p.add_argument("--zoom-width", type=int, default=400)
    a = p.parse_args(argv)

    from dnascale.infer.writer import open_result, read_array

    root, meta = open_result(a.store)
    records = meta["records"]
    record = a.record or next(iter(records), None)
    if record not in records:
        raise DataError(f"{a.store}: no record {record!r} (has {', '.join(records) or 'none'})")
    group = root[records[record]]
    if "boundary_prob" not in group:
        raise DataError(f"{a.store}: record {record!r} has no boundary_prob (run tools/infer.py --what boundaries)")
    if not group.attrs.get("complete"):
        raise DataError(f"{a.store}: record {record!r} is not complete ({group.attrs.get('chunks_done')} of "
                        f"{group.attrs.get('chunks_total')} chunks); resume tools/infer.py first")
    prob = read_array(group, "boundary_prob")
    length, stages = prob.shape
    genes = read_genes(a.gff, record)
    if a.zoom:
        lo, hi = (int(x) for x in a.zoom.split("-"))
        lo -= 1
    else:
        anchor = next((g.start if g.strand > 0 else g.end for g in genes if g.start > length // 4), length // 2)
        lo = max(0, anchor - a.zoom_width // 2)
        hi = min(length, lo + a.zoom_width)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(4, 1, figsize=(14, 8), gridspec_kw={"height_ratios": [3, 0.8, 3, 0.8]})
    bins = length // a.smooth
    centres = (np.arange(bins) + 0.5) * a.smooth
    for stage in range(stages):
        mean = prob[: bins * a.smooth, stage].reshape(bins, a.smooth).mean(axis=1)
        axes[0].plot(centres, mean, lw=0.8, label=f"stage {stage + 1} (mean {prob[:, stage].mean():.3f}/bp)")
        # Stage s > 1 is non-zero only at the first bases of stage-(s-1) chunks: stems, not a line.
        x, y = np.arange(lo, hi), prob[lo:hi, stage]
        if stage == 0:
            axes[2].step(x, y, where="mid", lw=0.8, color="C0", label="stage 1")
        else:
            nz = y > 0
            axes[2].vlines(x[nz], 0, y[nz], color=f"C{stage}", lw=1.2, label=f"stage {stage + 1}")
    axes[2].axhline(0.5, color="k", lw=0.5, ls=":")
    axes[0].set_xlim(0, length)
    axes[0].set_ylabel(f"boundary prob.\n(mean over {a.smooth:,} bp)")
    axes[0].legend(fontsize=8, loc="upper right")
    s = meta["settings"]
    axes[0].set_title(f"DNACHUNKER ({s['recipe']}-{s['preset']}) boundary probabilities along {record} "
                      f"({length:,} bp, window {s['window']}, stride {s['stride']}); genes from the GFF beneath",
                      fontsize=10)
    _draw_genes(axes[1], genes, 0, length, labels=False)
    axes[2].set_ylabel("boundary prob.\n(per base)")
    axes[2].set_xlim(lo, hi)
    axes[2].legend(fontsize=8, loc="upper right")
    axes[2].set_title(f"{record}:{lo + 1:,}-{hi:,} at base resolution (a boundary is called at p >= 0.5; stage 2 "
                      "sits on stage-1 chunk starts)", fontsize=9)
    _draw_genes(axes[3], genes, lo, hi, labels=True)
    axes[3].set_xlabel(f"{record} position (bp)")
    fig.tight_layout()
    a.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(a.out, dpi=110)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    run_cli(main)
