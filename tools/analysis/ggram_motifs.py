#!/usr/bin/env python
"""How many G-grams hit JASPAR 2024 CORE motifs, against a shuffled-vocabulary control (beyond the DNAZEN paper,
which argues that G-grams resemble motifs without measuring it).

    python tools/analysis/ggram_motifs.py VOCAB.tsv.gz --motifs ../shared/data/motifs/jaspar2024_core.transfac.gz \\
        [--top 2000] [--pvalue 1e-5] [--shuffles 3] [--tax-groups plants fungi ...] \\
        [--plot docs/img/dnazen_motifs.png] [--json out.json]

Scoring. Each JASPAR matrix becomes a log-odds PWM (counts + 0.25 pseudocount per base, uniform background), scored
in integer tenths of a bit. A G-gram (its bases, from the vocabulary's `sequence` column) hits a motif when it
contains a full site of it on either strand whose score has p <= --pvalue under a uniform background (the exact
threshold comes from convolving the per-column score distributions, as FIMO / TFM-Pvalue do). Motifs wider than
a G-gram cannot hit it: the question is whether a G-gram holds a whole site.
Control: every G-gram's bases shuffled (mononucleotide composition and length kept; --shuffles seeded copies), the
same motifs and scoring. The output is a markdown table (overall and by G-gram length in bases; the motifs with
the most real hits) with hit fractions, the control's mean and the enrichment (real / control), plus a plot.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from dnascale.data.ggram import GGramVocab  # noqa: E402
from dnascale.errors import DataError, run_cli  # noqa: E402

BASES = "ACGT"
_CODE = np.full(256, -1, dtype=np.int64)
for _i, _b in enumerate(BASES):
    _CODE[ord(_b)] = _i


@dataclass
class Motif:
    accession: str
    name: str
    tax_group: str
    pwm: np.ndarray  # [W, 4] log2-odds

    @property
    def width(self) -> int:
        return len(self.pwm)


def read_transfac(path: str | Path, pseudocount: float = 0.25) -> list[Motif]:
    """JASPAR's TRANSFAC export: AC / ID / PO A C G T / numbered rows / CC tax_group: / //."""
    opener = gzip.open if str(path).endswith(".gz") else open
    motifs, rows, accession, name, tax = [], [], "", "", ""
    with opener(path, "rt") as handle:
        for line in handle:
            line = line.rstrip("\n")
            if line.startswith("AC "):
                accession = line[3:].strip()
            elif line.startswith("ID "):
                name = line[3:].strip()
            elif line.startswith("CC tax_group:"):
                tax = line.split(":", 1)[1].strip()
            elif line[:2].isdigit() and "\t" in line:
                rows.append([float(v) for v in line.split("\t")[1:5]])
            elif line.startswith("//"):
                if rows:
                    counts = np.asarray(rows) + pseudocount
                    probs = counts / counts.sum(axis=1, keepdims=True)
                    motifs.append(Motif(accession, name, tax, np.log2(probs / 0.25)))
                rows, accession, name, tax = [], "", "", ""
    if not motifs:
        raise DataError(f"{path}: no TRANSFAC matrices found")
    return motifs


def encode(seq: str) -> np.ndarray:
    return _CODE[np.frombuffer(seq.encode("ascii"), dtype=np.uint8)]


SCALE = 10  # log-odds are scored in tenths of a bit (integers), so the null distribution is exact by convolution


def score_threshold(pwm_int: np.ndarray, pvalue: float) -> int:
    """Smallest integer score t with P(score >= t) <= pvalue for a uniform random site (exact, by convolving
    the per-column score distributions)."""
    lo = int(pwm_int.min(axis=1).sum())
    dist = np.zeros(1)
    dist[0] = 1.0
    offset = 0  # dist[i] = P(score = offset + i)
    for column in pwm_int:
        cmin = int(column.min())
        width = len(dist) + int(column.max()) - cmin
        new = np.zeros(width)
        for value in column:
            shift = int(value) - cmin
            new[shift : shift + len(dist)] += 0.25 * dist
        dist, offset = new, offset + cmin
    assert offset == lo
    tail = np.cumsum(dist[::-1])[::-1]  # P(score >= offset + i)
    ok = np.flatnonzero(tail <= pvalue)
    return offset + int(ok[0]) if len(ok) else offset + len(dist)  # unreachable: no window can hit


def motif_hits(sequences: list[str], motifs: list[Motif], pvalue: float) -> np.ndarray:
    """[n_sequences, n_motifs] bool: sequence i contains a site of motif j (either strand) whose score has a
    p-value <= `pvalue` under a uniform background. Motifs wider than the sequence cannot hit it."""
    hits = np.zeros((len(sequences), len(motifs)), dtype=bool)
    tables = [np.rint(m.pwm * SCALE).astype(np.int64) for m in motifs]
    thresholds = [score_threshold(t, pvalue) for t in tables]
    by_length: dict[int, list[int]] = {}
    for i, s in enumerate(sequences):
        by_length.setdefault(len(s), []).append(i)
    for length, members in by_length.items():
        codes = np.stack([encode(sequences[i]) for i in members])  # [n, L]
        valid = (codes >= 0).all(axis=1)  # a G-gram with N never hits
        codes = np.where(codes < 0, 0, codes)
        both = np.concatenate([codes, (3 - codes)[:, ::-1]])  # forward and reverse complement
        for j, (table, threshold) in enumerate(zip(tables, thresholds)):
            width = len(table)
            if width > length:
                continue
            positions = length - width + 1
            score = np.zeros((len(both), positions), dtype=np.int64)
            for k in range(width):
                score += table[k][both[:, k : k + positions]]
            best = score.max(axis=1)
            hits[members, j] = (np.maximum(best[: len(members)], best[len(members) :]) >= threshold) & valid
    return hits


def shuffled(sequences: list[str], seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return ["".join(rng.permutation(list(s))) for s in sequences]


def length_bins(lengths: np.ndarray) -> list[tuple[str, np.ndarray]]:
    edges = [(0, 9), (10, 14), (15, 19), (20, 29), (30, 10**9)]
    labels = ["<10", "10-14", "15-19", "20-29", ">=30"]
    return [(label, (lengths >= lo) & (lengths <= hi)) for label, (lo, hi) in zip(labels, edges)]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("vocab", help="G-gram vocabulary from tools/build_ggram_vocab.py (with its sequence column)")
    p.add_argument("--motifs", required=True, help="JASPAR TRANSFAC file (.gz ok)")
    p.add_argument("--top", type=int, default=2000, help="the N most frequent G-grams (0 = all; default 2000)")
    p.add_argument("--pvalue", type=float, default=1e-5, help="site p-value of a hit (default 1e-5)")
    p.add_argument("--shuffles", type=int, default=3, help="shuffled control copies (default 3)")
    p.add_argument("--tax-groups", nargs="*", default=None, help="JASPAR tax groups to keep (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--show", type=int, default=12, help="motifs listed in the table")
    p.add_argument("--plot", help="PNG path for the figure")
    p.add_argument("--json", help="write the numbers here")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    vocab = GGramVocab.load(args.vocab)
    if vocab.sequences is None:
        raise DataError(f"{args.vocab}: no sequence column; rebuild it with tools/build_ggram_vocab.py")
    n = len(vocab) if args.top in (0, None) else min(args.top, len(vocab))
    sequences = vocab.sequences[:n]
    motifs = read_transfac(args.motifs)
    if args.tax_groups:
        motifs = [m for m in motifs if m.tax_group in set(args.tax_groups)]
    real = motif_hits(sequences, motifs, args.pvalue)
    controls = [motif_hits(shuffled(sequences, args.seed + r), motifs, args.pvalue) for r in range(args.shuffles)]
    lengths = np.array([len(s) for s in sequences])
    scored = np.ones(len(sequences), dtype=bool)

    def frac(h, sel):
        return float(h[sel].any(axis=1).mean()) if sel.any() else float("nan")

    rows = []
    for label, sel in [("all", scored)] + [(f"{lab} bp", s & scored) for lab, s in length_bins(lengths)]:
        control = [frac(c, sel) for c in controls]
        rows.append({"group": label, "ggrams": int(sel.sum()), "real": frac(real, sel),
                     "control": float(np.mean(control)), "control_sd": float(np.std(control)),
                     "motifs_per_ggram": float(real[sel].sum(axis=1).mean()) if sel.any() else float("nan"),
                     "control_motifs_per_ggram": float(np.mean([c[sel].sum(axis=1).mean() for c in controls]))
                     if sel.any() else float("nan")})
    per_motif_real = real[scored].sum(axis=0)
    per_motif_control = np.mean([c[scored].sum(axis=0) for c in controls], axis=0)
    top = np.argsort(-per_motif_real, kind="stable")[: args.show]
    motif_rows = [{"motif": f"{motifs[j].accession} {motifs[j].name}", "tax_group": motifs[j].tax_group,
                   "real": int(per_motif_real[j]), "control": float(per_motif_control[j])} for j in top]

    print(f"G-grams: the {n} most frequent of {len(vocab)}; motifs: {len(motifs)}; a hit: a full site with "
          f"p <= {args.pvalue:g}; control: {args.shuffles} shuffles of every G-gram\n")
    print("| G-grams | n | hit >= 1 motif | shuffled control | enrichment | motifs per G-gram (control) |\n"
          "|---|---|---|---|---|---|")
    for r in rows:
        if not r["ggrams"]:
            continue
        ratio = r["real"] / r["control"] if r["control"] else float("inf")
        print(f"| {r['group']} | {r['ggrams']} | {r['real']:.1%} | {r['control']:.1%} ± {r['control_sd']:.1%} "
              f"| {ratio:.2f}x | {r['motifs_per_ggram']:.2f} ({r['control_motifs_per_ggram']:.2f}) |")
    print("\n| motif | tax group | G-grams hitting it | shuffled control |\n|---|---|---|---|")
    for r in motif_rows:
        print(f"| {r['motif']} | {r['tax_group']} | {r['real']} | {r['control']:.1f} |")
    result = {"vocab": args.vocab, "ggrams": n, "motifs": len(motifs), "pvalue": args.pvalue, "shuffles": args.shuffles, "groups": rows, "top_motifs": motif_rows}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    if args.plot:
        _plot(rows, motif_rows, args.plot, n, args.pvalue)
    return 0


def _plot(rows: list[dict], motif_rows: list[dict], path: str, n: int, pvalue: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    groups = [r for r in rows if r["ggrams"] > 0]
    x = np.arange(len(groups))
    left.bar(x - 0.2, [r["real"] for r in groups], 0.4, label="G-grams")
    left.bar(x + 0.2, [r["control"] for r in groups], 0.4, yerr=[r["control_sd"] for r in groups],
             label="shuffled control")
    left.set_xticks(x, [f"{r['group']}\n(n={r['ggrams']})" for r in groups], fontsize=8)
    left.set_ylabel("fraction hitting >= 1 JASPAR motif")
    left.set_title(f"top {n} G-grams, full JASPAR site with p <= {pvalue:g}")
    left.legend()
    names = [r["motif"] for r in motif_rows][::-1]
    y = np.arange(len(names))
    right.barh(y + 0.2, [r["real"] for r in motif_rows][::-1], 0.4, label="G-grams")
    right.barh(y - 0.2, [r["control"] for r in motif_rows][::-1], 0.4, label="shuffled")
    right.set_yticks(y, names, fontsize=7)
    right.set_xlabel("G-grams hitting the motif")
    right.set_title("motifs with the most G-gram hits")
    right.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    run_cli(main)
