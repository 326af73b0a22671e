"""tools/analysis/boundaries.py statistics on synthetic boundary tracks with a known answer, its GFF reading on the
real yeast annotation format, and tools/bench/bench_dnachunker.py end to end on a toy config."""

from __future__ import annotations

import gzip
import importlib.util

import numpy as np
import pytest

from conftest import REPO


def _load(name: str, relative: str):
    spec = importlib.util.spec_from_file_location(name, REPO / relative)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


boundaries = _load("boundaries", "tools/analysis/boundaries.py")


def _annotation(length=60_000, genes=40, seed=0):
    rng = np.random.default_rng(seed)
    starts = np.sort(rng.choice(np.arange(1_000, length - 1_000, 1_300), genes, replace=False))
    strands = rng.choice([-1, 1], genes)
    classes = np.full(length, 2, dtype=np.int8)
    for start, strand in zip(starts, strands):
        lo, hi = (start, start + 600) if strand > 0 else (start - 600, start)
        classes[lo:hi] = 0
    return boundaries.Annotation(starts, strands, np.sort(np.concatenate([starts, starts + 600])), classes)


def test_boundaries_placed_at_gene_starts_and_in_cds_stand_out_from_the_shuffled_control():
    length = 60_000
    ann = _annotation(length)
    rng = np.random.default_rng(1)
    calls = np.zeros((2, length), dtype=bool)
    calls[0] = rng.random(length) < 0.05  # background
    calls[0, ann.gene_starts] = True  # plus a boundary at every gene start
    calls[1] = (rng.random(length) < 0.02) | ((ann.classes == 0) & (rng.random(length) < 0.2))  # CDS-dense
    covered = np.ones(length, dtype=bool)
    summary = boundaries.analyse(calls, covered, ann, shuffles=40, flank=100, bin_size=10, seed=0)
    gene = summary["gene_start"]
    zero_bin = 100 // 10
    assert gene["observed"][0, zero_bin] > 0.1 and gene["z"][0, zero_bin] > 5
    assert abs(gene["z"][0, 0]) < 4  # far from the start: background
    classes = summary["classes"]
    assert classes["observed"][1, 0] == pytest.approx(0.02 + 0.98 * 0.2, abs=0.02)  # CDS
    assert classes["z"][1, 0] > 5 and classes["observed"][1, 2] < classes["control_mean"][1, 2]


def test_profile_orients_minus_strand_features_5_prime_to_3_prime():
    calls = np.zeros((1, 100), dtype=bool)
    calls[0, 45] = True  # 5 bp downstream (3') of a minus-strand start at 50
    covered = np.ones(100, dtype=bool)
    prof = boundaries.profile(calls, covered, np.array([50]), np.array([-1]), flank=10, bin_size=1)
    assert prof[0, 10 + 5] == 1.0 and prof[0].sum() == 1.0


def test_gff_reading_takes_strand_aware_gene_starts_and_classes(tmp_path):
    gff = tmp_path / "a.gff.gz"
    rows = [
        "chr\tx\tregion\t1\t100\t.\t+\t.\tID=r",
        "chr\tx\tgene\t11\t40\t.\t+\t.\tID=g1",
        "chr\tx\tCDS\t15\t35\t.\t+\t0\tID=c1",
        "chr\tx\texon\t15\t35\t.\t+\t.\tID=e1",
        "chr\tx\tgene\t61\t90\t.\t-\t.\tID=g2",
        "other\tx\tgene\t1\t5\t.\t+\t.\tID=g3",
    ]
    with gzip.open(gff, "wt") as handle:
        handle.write("##gff-version 3\n" + "\n".join(rows) + "\n")
    ann = boundaries.read_gff(str(gff), "chr", 100)
    assert ann.gene_starts.tolist() == [10, 89] and ann.gene_strands.tolist() == [1, -1]
    assert ann.exon_edges.tolist() == [14, 34]
    assert ann.classes[20] == 0 and ann.classes[11] == 1 and ann.classes[50] == 2 and ann.classes[70] == 1


def test_bench_runs_end_to_end_on_a_toy_config(tmp_path, capsys):
    bench = _load("bench_dnachunker", "tools/bench/bench_dnachunker.py")
    from dnascale.parallel import destroy

    out = tmp_path / "bench.json"
    try:
        bench.main(["--override", "max_seq_len=64", "--override", "routing_backend=reference", "--steps", "1",
                    "--warmup", "0", "--reps", "1", "--micro-batch-size", "2", "--json", str(out)])
    finally:
        destroy()
    text = capsys.readouterr().out
    assert "routing + chunk + dechunk" in text and "tokens/s" in text
    import json

    result = json.loads(out.read_text())
    assert result["tokens_per_s"] > 0 and set(result["parts_s"]) >= {"routers", "chunk_layer", "dechunk_layer"}
