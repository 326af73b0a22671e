"""SNV effect scores: the masked-LM log-likelihood ratio log P(alt) / P(ref) at the variant's position.

For each SNV (CHROM, 1-based POS, REF, ALT) a window of the model's width is centred on the variant (shifted
inwards at a record end), the unit holding the variant base is replaced by [MASK] (a base; for DNAZEN the BPE token
holding it) and the head's 4-letter distribution at that base (dnascale.infer.families) gives
    llr = log P(ALT) - log P(REF)        (nats; < 0: the model finds the reference more likely)
The reference context is used throughout (the alternative allele is never written into the window), so the score
is the model's preference between the two letters given the same surroundings.

Input: VCF (by its `##fileformat=VCF` / `#CHROM` header: columns CHROM POS ID REF ALT ...) or a TSV of
CHROM POS REF ALT (optional header line; `#` lines are comments); plain or gzipped. A multi-allelic ALT gives one
row per allele. Everything that is not an SNV (indels, MNVs, symbolic or `*` alleles, letters outside A C G T,
ALT equal to REF) is kept in the output with its reason and counted, never dropped. A REF that disagrees with the
genome is a one-line error naming the line: scores against the wrong assembly would be silently meaningless.
"""

from __future__ import annotations

import csv
import gzip
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dnascale.data.fasta import read_segments
from dnascale.errors import ConfigError, DataError
from dnascale.infer.backbone import LoadedModel
from dnascale.infer.families import ACGT

COLUMNS = ("chrom", "pos", "ref", "alt", "llr", "logp_ref", "logp_alt", "status", "line")


@dataclass(frozen=True)
class Variant:
    line: str  # "file:line" where it was read
    chrom: str
    pos: int  # 1-based
    ref: str
    alt: str

    @property
    def skip_reason(self) -> str | None:
        """None for an SNV this tool scores, else why not."""
        alt, ref = self.alt.upper(), self.ref.upper()
        if alt in (".", "*") or alt.startswith("<") or "[" in alt or "]" in alt:
            return "symbolic allele"
        if len(ref) != len(alt):
            return "indel"
        if len(ref) > 1:
            return "MNV"
        if ref not in ACGT or alt not in ACGT:
            return "not A/C/G/T"
        if ref == alt:
            return "ALT equals REF"
        return None


@dataclass(frozen=True)
class VariantScore:
    variant: Variant
    status: str  # "scored" or "skipped: <reason>"
    llr: float = math.nan
    logp_ref: float = math.nan
    logp_alt: float = math.nan


def _open_text(path: str):
    try:
        with open(path, "rb") as probe:
            gz = probe.read(2) == b"\x1f\x8b"
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err.strerror or err})") from None
    return gzip.open(path, "rt") if gz else open(path, "rt")


def read_variants(path: str) -> list[Variant]:
    variants: list[Variant] = []
    vcf = None
    with _open_text(path) as handle:
        for number, raw in enumerate(handle, start=1):
            line = raw.rstrip("\r\n")
            if not line.strip():
                continue
            if line.startswith("##fileformat=VCF") or line.startswith("#CHROM"):
                vcf = True
            if line.startswith("#"):
                continue
            fields = line.split("\t") if "\t" in line else line.split()
            where = f"{path}:{number}"
            if vcf is None:
                vcf = False
                if len(fields) >= 2 and not fields[1].isdigit():
                    continue  # a TSV header line (CHROM POS REF ALT)
            columns = (0, 1, 3, 4) if vcf else (0, 1, 2, 3)
            if len(fields) <= columns[-1]:
                layout = "CHROM POS ID REF ALT" if vcf else "CHROM POS REF ALT"
                raise DataError(f"{where}: expected the columns {layout}, got {len(fields)} field(s)")
            chrom, pos, ref, alts = (fields[i] for i in columns)
            if not pos.isdigit() or int(pos) < 1:
                raise DataError(f"{where}: POS {pos!r} is not a 1-based position")
            for alt in alts.split(","):
                variants.append(Variant(where, chrom, int(pos), ref, alt))
    return variants


def _genome(fasta: str, chroms: set[str]) -> dict[str, bytes]:
    from dnascale.infer.run import POLICY

    return {s.record: s.seq for s in read_segments(fasta, POLICY) if s.record in chroms}


def check_reference(variant: Variant, genome: dict[str, bytes], fasta: str) -> None:
    if variant.chrom not in genome:
        raise DataError(f"{variant.line}: chromosome {variant.chrom!r} is not in {fasta}")
    seq = genome[variant.chrom]
    ref = variant.ref.upper()
    if not ref.isalpha():
        return  # symbolic REF (e.g. "."): nothing to compare
    lo = variant.pos - 1
    if lo + len(ref) > len(seq):
        raise DataError(f"{variant.line}: {variant.chrom}:{variant.pos} lies beyond the record's {len(seq):,} bases")
    found = seq[lo : lo + len(ref)].decode()
    if found != ref:
        raise DataError(f"{variant.line}: REF {variant.ref!r} at {variant.chrom}:{variant.pos} does not match the "
                        f"genome ({found!r}); wrong assembly or coordinates?")


def score_variants(model: LoadedModel, fasta: str, variants: list[Variant], window: int | None = None,
                   batch_size: int = 32) -> list[VariantScore]:
    runner = model.runner
    window = window or runner.max_window
    if window > runner.max_window:
        raise ConfigError(f"--window {window}: the {model.recipe} model takes at most {runner.max_window} bases")
    if batch_size < 1:
        raise ConfigError(f"--batch-size {batch_size}: must be >= 1")
    genome = _genome(fasta, {v.chrom for v in variants})
    for variant in variants:
        check_reference(variant, genome, fasta)
    results: dict[int, VariantScore] = {}
    snvs = []
    for i, variant in enumerate(variants):
        reason = variant.skip_reason
        if reason is None:
            snvs.append(i)
        else:
            results[i] = VariantScore(variant, f"skipped: {reason}")
    for b0 in range(0, len(snvs), batch_size):
        batch = snvs[b0 : b0 + batch_size]
        prepared, offsets, masks = [], [], []
        for i in batch:
            v = variants[i]
            seq = genome[v.chrom]
            width = min(window, len(seq))
            start = min(max(v.pos - 1 - width // 2, 0), len(seq) - width)
            p = runner.prepare(seq[start : start + width], f"{v.line}: window {v.chrom}:{start + 1}-{start + width}")
            offset = v.pos - 1 - start
            units = np.zeros(len(p.units), dtype=bool)
            units[p.base_unit[offset]] = True
            prepared.append(p)
            offsets.append(offset)
            masks.append(units)
        for i, offset, values in zip(batch, offsets, runner.masked(prepared, masks)):
            v = variants[i]
            lp_ref = float(values[offset, ACGT.index(v.ref.upper())])
            lp_alt = float(values[offset, ACGT.index(v.alt.upper())])
            results[i] = VariantScore(v, "scored", lp_alt - lp_ref, lp_ref, lp_alt)
    return [results[i] for i in range(len(variants))]


def write_scores(scores: list[VariantScore], out: str | Path) -> None:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
        writer.writerow(COLUMNS)
        for s in scores:
            v = s.variant
            numbers = ["" if math.isnan(x) else f"{x:.6f}" for x in (s.llr, s.logp_ref, s.logp_alt)]
            writer.writerow([v.chrom, v.pos, v.ref, v.alt, *numbers, s.status, v.line])


def summary(scores: list[VariantScore]) -> str:
    scored = sum(s.status == "scored" for s in scores)
    skipped = Counter(s.status.removeprefix("skipped: ") for s in scores if s.status != "scored")
    detail = f" ({', '.join(f'{k} {n}' for k, n in sorted(skipped.items()))})" if skipped else ""
    return f"scored {scored} SNV(s); skipped {sum(skipped.values())} non-SNV allele(s){detail}"
