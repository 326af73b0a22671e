"""DNAZEN G-gram vocabulary (PMI extraction, parts and merges, the file) and the matcher (dnascale.data.ggram).

Oracles: a plain-Python transcription of the spec's extraction algorithm (dicts and loops), the token-trie matcher
`match_reference`, and a per-row Python construction of the G-gram rows.
"""

from __future__ import annotations

import math
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dnascale.data.ggram import (
    CorpusSpec,
    GGramMatcher,
    GGramVocab,
    NgramCodec,
    PMIConfig,
    VocabBuild,
    build_rows,
    extract_vocab,
    match_reference,
)
from dnascale.errors import ConfigError, DataError

REPO = Path(__file__).resolve().parents[1]
SPECIALS = (0, 1, 2, 3, 4)
SLICE = REPO / "tests" / "data" / "athaliana_chr1_slice.fa.gz"
TOKENIZER = REPO / "dnascale" / "assets" / "dnazen" / "tokenizer"


# ---- the spec's algorithm in plain Python (the oracle) ---------------------------------------------------------


def reference_extraction(seqs, config: PMIConfig):
    """Spec §1 steps 1-5, written with dicts and loops; special ids break adjacency. Returns {tuple: count}."""
    unigram, pairs = Counter(), Counter()
    seen, corpus = set(), []
    for seq in seqs:
        key = tuple(int(t) for t in seq)
        if config.dedup and key in seen:
            continue
        seen.add(key)
        # Split at special ids: adjacency never crosses them.
        pieces, current = [], []
        for t in key:
            if t in SPECIALS:
                pieces.append(current)
                current = []
            else:
                current.append(t)
        pieces.append(current)
        corpus.extend(p for p in pieces if p)
    for piece in corpus:
        unigram.update(piece)
        pairs.update(zip(piece, piece[1:]))
    total = sum(unigram.values())
    kept = {}
    for (a, b), c in pairs.items():
        if c >= config.min_token_count and unigram[a] >= config.min_token_count and unigram[b] >= config.min_token_count:
            pmi = math.log2(total * c / (unigram[a] * unigram[b]))
            if pmi >= config.theta:
                kept[(a, b)] = pmi
    candidates = Counter()
    for piece in corpus:
        run = [piece[0]]
        for prev, cur in zip(piece, piece[1:]):
            if (prev, cur) in kept and len(run) < config.max_len:
                run.append(cur)
            else:
                if len(run) >= config.min_len:
                    candidates[tuple(run)] += 1
                run = [cur]
        if len(run) >= config.min_len:
            candidates[tuple(run)] += 1
    survivors = {g for g, c in candidates.items() if c >= config.min_ngram_freq}
    recount = Counter()
    for piece in corpus:
        for n in range(config.min_len, config.max_len + 1):
            for i in range(len(piece) - n + 1):
                gram = tuple(piece[i : i + n])
                if gram in survivors:
                    recount[gram] += 1
    final = {g: c for g, c in recount.items() if c >= config.min_ngram_freq}
    min_pmi = {g: min(kept[p] for p in zip(g, g[1:])) for g in final}
    return final, min_pmi


def markov_corpus(seed: int, n_seqs: int = 60, length: int = 150, vocab: int = 24):
    """Sequences from a sparse Markov chain over ids 5..vocab-1 (strong pair structure), with a few specials."""
    rng = np.random.default_rng(seed)
    content = np.arange(5, vocab)
    nxt = {int(a): rng.choice(content, size=3, replace=False) for a in content}
    seqs = []
    for _ in range(n_seqs):
        seq = [int(rng.choice(content))]
        for _ in range(length - 1):
            seq.append(int(rng.choice(nxt[seq[-1]])) if rng.random() < 0.7 else int(rng.choice(content)))
        seq = np.asarray(seq)
        if rng.random() < 0.3:
            seq[rng.integers(len(seq))] = 1  # an [UNK]-like special inside a sequence
        seqs.append(seq)
    seqs.append(seqs[0].copy())  # an exact duplicate (dropped by dedup)
    return seqs


def as_dict(vocab: GGramVocab):
    return {vocab.ggram(i): int(vocab.counts[i - 1]) for i in range(1, len(vocab) + 1)}


@pytest.mark.parametrize("seed,config", [
    (0, PMIConfig(theta=2.0, min_token_count=3, min_ngram_freq=3)),
    (1, PMIConfig(theta=1.0, min_token_count=2, min_ngram_freq=2, max_len=4)),
    (2, PMIConfig(theta=2.5, min_token_count=5, min_ngram_freq=4, min_len=3, dedup=False)),
])
def test_extraction_equals_the_spec_algorithm_in_plain_python(seed, config):
    seqs = markov_corpus(seed)
    # Small chunks and table: several chunks per pass and pruning-free merges still sum exactly.
    config_chunked = PMIConfig(**{**config.to_dict(), "chunk_tokens": 1000})
    vocab = extract_vocab(seqs, 32, SPECIALS, config_chunked)
    want, want_pmi = reference_extraction(seqs, config)
    assert as_dict(vocab) == want
    assert len(vocab) > 5
    for i in range(1, len(vocab) + 1):
        assert vocab.pmi[i - 1] == pytest.approx(want_pmi[vocab.ggram(i)], abs=1e-9)
    # Order: count descending, then token ids.
    keys = [(-int(vocab.counts[i - 1]), vocab.ggram(i)) for i in range(1, len(vocab) + 1)]
    assert keys == sorted(keys)


def planted_corpus(seed: int, motifs, n_seqs=400, length=250, vocab=200, copies=2):
    rng = np.random.default_rng(seed)
    seqs = []
    for _ in range(n_seqs):
        seq = rng.integers(5, vocab, size=length)
        for motif in motifs:
            for _ in range(copies):
                p = rng.integers(0, length - len(motif))
                seq[p : p + len(motif)] = motif
        seqs.append(seq)
    return seqs


def _contiguous_subgrams(motif):
    return {tuple(motif[i:j]) for i in range(len(motif)) for j in range(i + 2, len(motif) + 1)}


def test_pmi_recovers_planted_motifs_and_no_random_pairs():
    motifs = [(17, 42, 99), (120, 7, 65, 33, 181), (150, 151), (60, 61, 62, 63)]
    seqs = planted_corpus(0, motifs)
    vocab = extract_vocab(seqs, 256, SPECIALS, PMIConfig(theta=2.0, min_token_count=5, min_ngram_freq=20))
    found = set(as_dict(vocab))
    for motif in motifs:
        assert tuple(motif) in found, f"planted motif {motif} not recovered"
    allowed = set().union(*(_contiguous_subgrams(m) for m in motifs))
    assert found <= allowed, f"G-grams that are not parts of planted motifs: {sorted(found - allowed)[:5]}"
    # A few random pairs pass theta = 2 by chance (Poisson tails of counts ~2.6), but none is frequent enough to
    # become a G-gram; the motifs' pairs score far above theta (log2(N c(ab) / c(a) c(b)) ~ 5.5 here).
    assert vocab.metadata["pairs"]["kept_pairs"] >= sum(len(m) - 1 for m in motifs)
    assert (vocab.pmi >= 4.0).all()


def test_pruned_candidate_table_keeps_exact_counts():
    seqs = markov_corpus(3, n_seqs=80)
    config = PMIConfig(theta=1.5, min_token_count=3, min_ngram_freq=3, chunk_tokens=700)
    want = as_dict(extract_vocab(seqs, 32, SPECIALS, config))
    # A pass-2 table pruned hard still yields exact counts for whatever survives (pass 3 recounts).
    pruned = extract_vocab(seqs, 32, SPECIALS, PMIConfig(**{**config.to_dict(), "max_table": 8}))
    assert pruned.metadata["counts"]["pruned_entries"] > 0
    got = as_dict(pruned)
    assert got and all(want[g] == c for g, c in got.items())


def test_vocab_build_over_parts_matches_one_part_and_the_cli_stages(tmp_path):
    spec = CorpusSpec(fasta=(str(SLICE),), tokenizer=str(TOKENIZER), doc_bases=20_000)
    config = PMIConfig(theta=2.0, min_token_count=3, min_ngram_freq=3)
    one = VocabBuild(spec, config, tmp_path / "w1", 1).run_local(tmp_path / "one.tsv.gz")
    three = VocabBuild(spec, config, tmp_path / "w3", 3).run_local(tmp_path / "three.tsv.gz", workers=2)
    assert len(one) > 50 and as_dict(one) == as_dict(three)
    assert (tmp_path / "one.tsv.gz").read_bytes() != b""
    # The same build as separate processes per stage and part, sharing a work directory (the cluster flow).
    tool = [sys.executable, str(REPO / "tools" / "build_ggram_vocab.py"), str(SLICE), "--tokenizer", str(TOKENIZER),
            "--theta", "2", "--min-token-count", "3", "--min-freq", "3", "--doc-bases", "20000",
            "--work-dir", str(tmp_path / "cluster"), "--parts", "3"]
    for stage in ("pairs", "candidates", "recount"):
        for part in range(3):
            done = subprocess.run(tool + ["--stage", stage, "--part", str(part)], capture_output=True, text=True)
            assert done.returncode == 0, done.stderr[-2000:]
        merge = tool + ["--stage", f"merge-{stage}"] + (["--out", str(tmp_path / "cli.tsv.gz")] if stage == "recount" else [])
        done = subprocess.run(merge, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "cli.tsv.gz").read_bytes() == (tmp_path / "three.tsv.gz").read_bytes()
    # A stage with other parameters refuses the work directory; a merge with missing parts names them.
    bad = subprocess.run(tool[:-2] + ["--parts", "3", "--theta", "3", "--stage", "pairs", "--part", "0"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "holds a G-gram build with other params" in bad.stderr
    (tmp_path / "cluster" / "recount-00001-of-00003.npz").unlink()
    bad = subprocess.run(tool + ["--stage", "merge-recount", "--out", str(tmp_path / "x.tsv")], capture_output=True,
                         text=True)
    assert bad.returncode == 2 and "missing parts [1]" in bad.stderr


def test_vocab_file_round_trip_is_deterministic_and_checked(tmp_path):
    vocab = extract_vocab(markov_corpus(4), 32, SPECIALS, PMIConfig(theta=1.5, min_token_count=3, min_ngram_freq=3))
    a, b = vocab.save(tmp_path / "a.tsv.gz"), vocab.save(tmp_path / "b.tsv.gz")
    assert a.read_bytes() == b.read_bytes()
    plain = vocab.save(tmp_path / "v.tsv")
    lines = plain.read_text().splitlines()
    assert lines[0] == "#dnascale-ggram-vocab\t1" and lines[2] == "id\ttokens\tlength\tcount\tpmi\tsequence"
    back = GGramVocab.load(a)
    assert as_dict(back) == as_dict(vocab) and back.metadata == GGramVocab.load(plain).metadata
    np.testing.assert_allclose(back.pmi, vocab.pmi, atol=1e-4)
    assert back.num_embeddings == len(vocab) + 1
    (tmp_path / "bad.tsv").write_text("id\ttokens\n1\t5 6\n")
    with pytest.raises(DataError, match="not a dnascale-ggram-vocab version 1 file"):
        GGramVocab.load(tmp_path / "bad.tsv")
    with pytest.raises(ConfigError, match="no such file"):
        GGramVocab.load(tmp_path / "missing.tsv")


def test_codec_round_trip_and_limits():
    codec = NgramCodec(4096, 5)
    for gram in [(5, 6), (4095, 0, 17), (1, 2, 3, 4, 4095)]:
        assert codec.unpack(codec.pack(gram)) == gram
    x = np.array([9, 8, 7, 6, 5], dtype=np.int64)
    assert codec.window_keys(x, 3).tolist() == [codec.pack((9, 8, 7)), codec.pack((8, 7, 6)), codec.pack((7, 6, 5))]
    with pytest.raises(ConfigError, match="bits"):
        NgramCodec(65536, 5)


# ---- matching -------------------------------------------------------------------------------------------------


def _vocab_of(grams):
    grams = sorted(set(grams))
    tokens = np.full((len(grams), 5), -1, dtype=np.int64)
    for i, g in enumerate(grams):
        tokens[i, : len(g)] = g
    lengths = np.array([len(g) for g in grams])
    return GGramVocab(tokens, lengths, np.arange(len(grams), 0, -1), np.zeros(len(grams)))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    grams=st.lists(st.lists(st.integers(5, 9), min_size=2, max_size=5).map(tuple), min_size=1, max_size=25),
    rows=st.lists(st.lists(st.integers(0, 9), min_size=0, max_size=40), min_size=1, max_size=4),
    cap=st.sampled_from([None, 1, 3, 30]),
)
def test_matcher_and_rows_equal_the_trie_and_a_per_row_construction(grams, rows, cap):
    vocab = _vocab_of(grams)
    width = max(len(r) for r in rows) or 1
    ids = np.full((len(rows), width), 3, dtype=np.int64)  # [PAD] = 3
    for b, row in enumerate(rows):
        ids[b, : len(row)] = row
    matcher = GGramMatcher(vocab, 16)
    occ = matcher.find(ids)
    for b in range(len(rows)):
        got = [(int(t), int(n), int(g)) for bb, t, n, g in zip(*occ) if bb == b]
        assert got == match_reference(vocab, ids[b])  # windows never run into the next row
    matching = build_rows(occ, len(rows), cap)
    want_triplets = set()
    for b in range(len(rows)):
        found = match_reference(vocab, ids[b])
        first = {}
        for t, n, g in found:
            first.setdefault(g, (t, n, g))
        order = sorted(first.values())[: cap if cap is not None else None]
        row_of = {g: j for j, (_, _, g) in enumerate(order)}
        assert matching.ggram_ids[b, : len(order)].tolist() == [g for _, _, g in order]
        assert (matching.ggram_ids[b, len(order) :] == 0).all()
        assert matching.rows_before_cap[b] == len(first)
        for t, n, g in found:
            if g in row_of:
                want_triplets |= {(b, p, row_of[g]) for p in range(t, t + n)}
    assert set(map(tuple, matching.triplets.tolist())) == want_triplets
    assert matching.ggram_ids.shape[1] >= 1


def test_matcher_refuses_ids_outside_its_key_space():
    matcher = GGramMatcher(_vocab_of([(5, 6)]), 16)
    with pytest.raises(DataError, match=r"token ids must lie in \[0, 16\)"):
        matcher.find(np.array([[5, 99]]))


def test_vocab_build_reads_shard_directories(tmp_path):
    from dnascale.data.loader import read_shard
    from dnascale.data.shards import ShardConfig, build_shards

    manifest = build_shards([SLICE], tmp_path / "shards", ShardConfig(window=2000, tokenizer=str(TOKENIZER),
                                                                       val_fraction=0.0), progress=False)
    config = PMIConfig(theta=2.0, min_token_count=3, min_ngram_freq=3)
    build = VocabBuild(CorpusSpec(shards=(str(tmp_path / "shards"),)), config, tmp_path / "w", 2)
    built = build.run_local(None)
    seqs = [s.ids for shard in manifest["splits"]["train"]["shards"]
            for s in read_shard(tmp_path / "shards" / shard["path"], shard["samples"])]
    # The build breaks adjacency at the specials and at the tokenizer's all-N pieces; the in-memory oracle gets
    # the same breakers (the slice has N runs, so the N pieces matter here).
    assert set(SPECIALS) < set(build.special_ids)
    assert len(built) > 20 and as_dict(built) == as_dict(extract_vocab(seqs, 4096, build.special_ids, config))
    assert built.tokenizer_name == manifest["tokenizer"]["name"] and built.sequences is not None
    assert built.sequences[0] and set(built.sequences[0]) <= set("ACGTN")


def _motif_tool():
    import importlib.util

    spec = importlib.util.spec_from_file_location("ggram_motifs", REPO / "tools" / "analysis" / "ggram_motifs.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_motif_tool_thresholds_are_exact_p_values_and_planted_sites_hit(tmp_path):
    import itertools

    tool = _motif_tool()
    rng = np.random.default_rng(0)
    table = rng.integers(-20, 15, size=(4, 4))
    # Brute force over all 4^4 sites: P(score >= t) <= p at the returned t, and > p one step below.
    scores = np.array([sum(table[k, b] for k, b in enumerate(site)) for site in itertools.product(range(4), repeat=4)])
    for p in (0.5, 0.1, 1 / 256, 1e-3):
        t = tool.score_threshold(table, p)
        assert (scores >= t).mean() <= p < (scores >= t - 1).mean() or (scores >= t).mean() == 0
    (tmp_path / "m.transfac").write_text(
        "AC MA9999.1\nID TEST\nPO\tA\tC\tG\tT\n"
        + "".join(f"{i + 1:02d}\t{row}\n" for i, row in enumerate(
            ["20\t0\t0\t0", "0\t20\t0\t0", "0\t0\t20\t0", "0\t0\t0\t20", "20\t0\t0\t0", "0\t0\t20\t0"]))
        + "CC tax_group:plants\n//\n")
    (motif,) = tool.read_transfac(tmp_path / "m.transfac")
    hits = tool.motif_hits(["TTACGTAGTT", "TTCTACGTTT", "ACGTA", "TTTTTTTTTT", "TTACGTAGNT"], [motif], 1e-3)
    # Site ACGTAG on +, its reverse complement CTACGT on -, too short, absent, N inside the G-gram.
    assert hits[:, 0].tolist() == [True, True, False, False, False]
