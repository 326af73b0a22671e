#!/usr/bin/env python
"""Where does a trained DNACHUNKER put its chunk boundaries? Density around annotated features vs a shuffled control.

    python tools/analysis/boundaries.py runs/chunker/checkpoints/step_0000150 \\
        --fasta ../shared/data/genomes/scerevisiae_r64_chrI.fna.gz \\
        --gff ../shared/data/genomes/scerevisiae_r64_chrI.gff.gz \\
        --out docs/img/dnachunker_boundaries.png

1. Loads the checkpoint: a DeepSpeed checkpoint written by the pretraining loop (`OUT/checkpoints/<tag>`, or
   `OUT/checkpoints` for its `latest`), consolidated to one fp32 state dict with DeepSpeed's zero_to_fp32 (DP-only
   runs; ZeRO-3 partitions are gathered). The model config is the one the loop recorded with the checkpoint
   (`dnascale_model.json`), or a named `--preset`, plus any `--override`s.
2. Runs the model, without masking, over windows of the record tiled with half-window overlap; each base takes the
   boundary calls of the window in which it lies in the central half (no window-edge effects), per stage: stage 1
   boundaries (a level-1 chunk starts at this bp) and stage 2 boundaries (a trunk token starts here).
3. From the GFF (strand-aware): gene starts (5' ends of `gene` features), exon boundaries (both ends of each
   `exon`), and per-base classes: CDS, gene outside CDS (UTRs, introns, non-coding genes), intergenic.
4. Reports boundary density (boundaries per bp) per class and in profiles around gene starts and exon boundaries,
   next to a shuffled control: the same annotation circularly shifted by `--shuffles` random offsets (keeps the
   features' sizes and spacing, breaks their alignment with the sequence); z = (observed - control mean) / sd.
Writes the PNG (`--out`) and the numbers as JSON (`--json`, default: next to the PNG).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

CLASSES = ("CDS", "gene (non-CDS)", "intergenic")


# --- inputs ---------------------------------------------------------------------------------------------------


def read_record(path: str, record: str | None) -> tuple[str, str]:
    """(record id, uppercase sequence with non-ACGT as N) of one FASTA record (the first when `record` is None)."""
    from dnascale.data.fasta import CleaningPolicy, read_segments

    policy = CleaningPolicy(max_n_run=None, min_segment_length=1)
    for segment in read_segments(path, policy):
        if record is None or segment.record == record:
            if segment.start != 0:
                raise SystemExit(f"{path}: record {segment.record} does not start at its first base")
            return segment.record, segment.seq.decode()
    raise SystemExit(f"{path}: no record named {record!r}")


@dataclass
class Annotation:
    gene_starts: np.ndarray  # 0-based 5' ends
    gene_strands: np.ndarray  # +1 / -1
    exon_edges: np.ndarray  # 0-based positions of exon first and last bases
    classes: np.ndarray  # [G] int8 index into CLASSES


def read_gff(path: str, record: str, length: int) -> Annotation:
    opener = gzip.open if path.endswith(".gz") else open
    starts, strands, edges = [], [], []
    in_gene = np.zeros(length, dtype=bool)
    in_cds = np.zeros(length, dtype=bool)
    with opener(path, "rt") as handle:
        for line in handle:
            if line.startswith("#") or not line.strip():
                continue
            fields = line.rstrip("\n").split("\t")
            if len(fields) < 9 or fields[0] != record:
                continue
            kind, start, end, strand = fields[2], int(fields[3]) - 1, int(fields[4]) - 1, fields[6]
            if kind in ("gene", "pseudogene"):
                in_gene[start : end + 1] = True
                if kind == "gene":
                    starts.append(start if strand != "-" else end)
                    strands.append(-1 if strand == "-" else 1)
            elif kind == "CDS":
                in_cds[start : end + 1] = True
            elif kind == "exon":
                edges.extend((start, end))
    classes = np.full(length, 2, dtype=np.int8)
    classes[in_gene] = 1
    classes[in_cds] = 0
    if not starts:
        raise SystemExit(f"{path}: no gene features on record {record}")
    return Annotation(np.array(starts), np.array(strands), np.unique(np.array(edges, dtype=np.int64)), classes)


def load_model(checkpoint: Path, preset: str | None, overrides: list[str]):
    """(model in eval mode, config) from a DeepSpeed checkpoint of the pretraining loop. The config is the one the
    loop recorded in the checkpoint (dnascale_model.json) unless a preset is named; overrides apply on top."""
    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from dnascale.config import apply_overrides, from_dict
    from dnascale.models.dnachunker import DNAChunkerConfig
    from dnascale.models.registry import get_recipe, load_preset
    from dnascale.parallel import init_distributed
    from dnascale.train.checkpoint import MODEL_INFO, read_model_info

    if (checkpoint / "latest").is_file():  # the checkpoints directory: take its newest complete tag
        checkpoint = checkpoint / (checkpoint / "latest").read_text().strip()
    if not checkpoint.is_dir():
        raise SystemExit(f"{checkpoint}: not a checkpoint directory")
    state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.parent), tag=checkpoint.name)
    if preset is None and (checkpoint / MODEL_INFO).is_file():
        info = read_model_info(checkpoint)
        if info.get("recipe") != "dnachunker":
            raise SystemExit(f"{checkpoint}: a {info.get('recipe')!r} checkpoint, not a dnachunker one")
        config = from_dict(DNAChunkerConfig, info["config"], source=str(checkpoint / MODEL_INFO))
        preset = info.get("preset", "?")
    else:
        preset = preset or "tiny"
        config = load_preset("dnachunker", preset)
    if overrides:
        config = apply_overrides(config, overrides, source="--override")
    init_distributed(tp=1, seed=0)
    model = get_recipe("dnachunker").build(config, None)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise SystemExit(f"{checkpoint}: does not fit dnachunker-{preset} (missing {missing[:4]}, unexpected "
                         f"{unexpected[:4]}); pass the run's --preset/--override")
    model.eval()
    torch.set_grad_enabled(False)
    return model, config


# --- boundary calls -------------------------------------------------------------------------------------------


def boundary_tracks(model, config, sequence: str, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """([stages, G] bool boundary calls, [G] bool covered) from central halves of half-overlapping windows."""
    import torch

    from dnascale.data.tokenizers import load_tokenizer
    from dnascale.models.dnachunker import data_window

    tokenizer = load_tokenizer("nucleotide-char")
    window = data_window(config)
    stride = window // 2
    length = len(sequence)
    starts = list(range(0, max(length - window, 0) + 1, stride))
    if starts[-1] + window < length:
        starts.append(length - window)
    calls = np.zeros((config.stages, length), dtype=bool)
    covered = np.zeros(length, dtype=bool)
    ids = np.asarray(tokenizer.encode(sequence))
    for first in range(0, len(starts), batch_size):
        group = starts[first : first + batch_size]
        rows = [np.asarray(tokenizer.add_special(ids[s : s + window])) for s in group]
        input_ids = torch.as_tensor(np.stack(rows), dtype=torch.long)
        out = model(input_ids, torch.ones_like(input_ids, dtype=torch.bool), return_routing=True)
        for row, start in enumerate(group):
            lo = start + (0 if start == 0 else window // 4)
            hi = start + (window if start + window >= length else 3 * window // 4)
            covered[lo:hi] = True
            for stage, routing in enumerate(out.routing):
                calls[stage, lo:hi] = routing.boundary_bp[row, lo - start : hi - start].numpy()
    return calls, covered


# --- statistics -----------------------------------------------------------------------------------------------


def class_density(calls: np.ndarray, covered: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """[stages, classes] boundaries per bp within each class (covered bases only)."""
    out = np.full((calls.shape[0], len(CLASSES)), np.nan)
    for k in range(len(CLASSES)):
        where = covered & (classes == k)
        if where.any():
            out[:, k] = calls[:, where].mean(axis=1)
    return out


def profile(calls: np.ndarray, covered: np.ndarray, centres: np.ndarray, strands: np.ndarray | None, flank: int,
            bin_size: int) -> np.ndarray:
    """[stages, bins] density at offsets -flank..flank-1 (5'->3' when strands are given), averaged over centres."""
    offsets = np.arange(-flank, flank)
    length = calls.shape[1]
    oriented = offsets[None, :] * (strands[:, None] if strands is not None else 1)
    positions = centres[:, None] + oriented  # [features, offsets]
    inside = (positions >= 0) & (positions < length)
    clipped = np.clip(positions, 0, length - 1)
    valid = inside & covered[clipped]
    bins = (offsets + flank) // bin_size
    result = np.zeros((calls.shape[0], bins.max() + 1))
    for stage in range(calls.shape[0]):
        values = np.where(valid, calls[stage][clipped], 0.0)
        hits = np.bincount(np.broadcast_to(bins, values.shape).ravel(), weights=values.ravel())
        counts = np.bincount(np.broadcast_to(bins, values.shape).ravel(), weights=valid.ravel().astype(float))
        result[stage] = hits / np.maximum(counts, 1)
    return result


def shifted(annotation: Annotation, shift: int, length: int) -> Annotation:
    return Annotation(
        (annotation.gene_starts + shift) % length, annotation.gene_strands, (annotation.exon_edges + shift) % length,
        np.roll(annotation.classes, shift),
    )


def analyse(calls, covered, annotation: Annotation, shuffles: int, flank: int, bin_size: int, seed: int) -> dict:
    length = calls.shape[1]

    def measure(ann: Annotation) -> dict[str, np.ndarray]:
        return {
            "classes": class_density(calls, covered, ann.classes),
            "gene_start": profile(calls, covered, ann.gene_starts, ann.gene_strands, flank, bin_size),
            "exon_edge": profile(calls, covered, ann.exon_edges, None, flank, bin_size),
        }

    observed = measure(annotation)
    rng = np.random.default_rng(seed)
    low = min(10_000, length // 4)
    controls = [measure(shifted(annotation, int(rng.integers(low, length - low)), length)) for _ in range(shuffles)]
    summary = {}
    for key, value in observed.items():
        stack = np.stack([c[key] for c in controls])
        mean, sd = stack.mean(axis=0), stack.std(axis=0)
        summary[key] = {"observed": value, "control_mean": mean, "control_sd": sd,
                        "z": (value - mean) / np.where(sd > 0, sd, np.nan)}
    return summary


# --- output ---------------------------------------------------------------------------------------------------


def plot(summary: dict, flank: int, bin_size: int, stages: int, title: str, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(stages, 3, figsize=(15, 3.6 * stages), squeeze=False)
    centres = np.arange(summary["gene_start"]["observed"].shape[1]) * bin_size - flank + bin_size / 2
    for stage in range(stages):
        for col, (key, label) in enumerate((("gene_start", "distance to gene start (bp, 5'->3')"),
                                            ("exon_edge", "distance to exon boundary (bp)"))):
            ax = axes[stage, col]
            s = summary[key]
            mean, sd = s["control_mean"][stage], s["control_sd"][stage]
            ax.fill_between(centres, mean - 2 * sd, mean + 2 * sd, color="0.8", label="shuffled control (mean ± 2 sd)")
            ax.plot(centres, mean, color="0.4", lw=1)
            ax.plot(centres, s["observed"][stage], color="C0" if stage == 0 else "C1", lw=1.5, label="observed")
            ax.axvline(0, color="k", lw=0.5, ls=":")
            ax.set_xlabel(label)
            ax.set_ylabel(f"stage-{stage + 1} boundaries per bp")
            ax.legend(fontsize=7, loc="upper right")
        ax = axes[stage, 2]
        s = summary["classes"]
        x = np.arange(len(CLASSES))
        ax.bar(x - 0.2, s["observed"][stage], 0.4, label="observed", color="C0" if stage == 0 else "C1")
        ax.bar(x + 0.2, s["control_mean"][stage], 0.4, yerr=2 * s["control_sd"][stage], label="shuffled control",
               color="0.7", capsize=3)
        ax.set_xticks(x, CLASSES)
        ax.set_ylabel(f"stage-{stage + 1} boundaries per bp")
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def _jsonable(value):
    if isinstance(value, np.ndarray):
        return [_jsonable(v) for v in value.tolist()] if value.ndim else _jsonable(value.item())
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", type=Path, help="OUT/checkpoints/<tag> (or OUT/checkpoints for its latest)")
    p.add_argument("--fasta", required=True)
    p.add_argument("--gff", required=True)
    p.add_argument("--record", default=None, help="FASTA/GFF record id (default: the FASTA's first)")
    p.add_argument("--preset", default=None,
                   help="the run's dnachunker preset (default: the config recorded in the checkpoint, else tiny)")
    p.add_argument("--override", action="append", default=[], metavar="FIELD=VALUE", help="the run's overrides")
    p.add_argument("--out", type=Path, default=Path("docs/img/dnachunker_boundaries.png"))
    p.add_argument("--json", type=Path, default=None, help="numbers (default: the PNG's path with .json)")
    p.add_argument("--shuffles", type=int, default=200)
    p.add_argument("--flank", type=int, default=400)
    p.add_argument("--bin", dest="bin_size", type=int, default=20, help="profile bin width (bp); divides --flank")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.flank % a.bin_size:
        p.error(f"--bin {a.bin_size} must divide --flank {a.flank}")

    record, sequence = read_record(a.fasta, a.record)
    annotation = read_gff(a.gff, record, len(sequence))
    model, config = load_model(a.checkpoint, a.preset, a.override)
    calls, covered = boundary_tracks(model, config, sequence, a.batch_size)
    summary = analyse(calls, covered, annotation, a.shuffles, a.flank, a.bin_size, a.seed)
    overall = calls[:, covered].mean(axis=1)
    report = {
        "checkpoint": str(a.checkpoint), "record": record, "length": len(sequence), "covered": int(covered.sum()),
        "genes": len(annotation.gene_starts), "exon_edges": len(annotation.exon_edges),
        "shuffles": a.shuffles, "flank": a.flank, "bin": a.bin_size, "classes": list(CLASSES),
        "overall_density": overall, "bp_per_chunk": 1 / overall, **summary,
    }
    params = sum(p.numel() for p in model.parameters()) / 1e6
    title = (f"DNACHUNKER ({params:.2f}M params, {a.checkpoint.name}) boundaries on {record} ({len(sequence):,} bp, "
             f"{len(annotation.gene_starts)} genes); bp per chunk: "
             + ", ".join(f"stage {s + 1} {1 / d:.1f}" for s, d in enumerate(overall)))
    plot(summary, a.flank, a.bin_size, config.stages, title, a.out)
    json_path = a.json or a.out.with_suffix(".json")
    json_path.write_text(json.dumps(_jsonable(report), indent=1) + "\n")
    for stage in range(config.stages):
        density = summary["classes"]
        line = ", ".join(
            f"{name} {density['observed'][stage, k]:.3f} (control {density['control_mean'][stage, k]:.3f}, "
            f"z {density['z'][stage, k]:+.1f})" for k, name in enumerate(CLASSES))
        print(f"stage {stage + 1}: {overall[stage]:.3f} boundaries/bp overall; {line}")
    print(f"wrote {a.out} and {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
