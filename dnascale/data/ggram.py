"""DNAZEN G-grams: PMI vocabulary extraction over BPE token ids, the versioned vocabulary file, and the matcher.

Extraction (DNAZEN spec §1; three counting passes, each a map over corpus parts followed by an exact merge):

1. `pairs`: unigram counts c(a) and adjacent-pair counts c(a, b) over content tokens (special ids, the N token
   and sequence ends break adjacency). Tokens and pairs seen fewer than `min_token_count` times are dropped, the rest scored
   PMI(a, b) = log2(N c(a, b) / (c(a) c(b))) with N the total content-token count; pairs with PMI >= theta are kept.
2. `candidates`: every sequence is cut between adjacent tokens whose pair is not kept; a run of kept pairs grows
   until it holds `max_len` tokens, then a new run starts at the next token (the spec's segmentation). Runs of
   `min_len`..`max_len` tokens are counted; candidates seen fewer than `min_ngram_freq` times are dropped.
3. `recount`: the surviving candidates are re-counted as substrings of the whole corpus (also inside longer runs)
   and filtered again; the most frequent `max_vocab` (all when None) form the vocabulary, ids 1.. by descending
   count (ties: by token ids), 0 being the padding id of the model's G-gram table.

Every pass reads one part of the corpus (`iter_part_sequences`: shard k or FASTA piece k goes to part
k % num_parts) in bounded chunks of `chunk_tokens` tokens, so parts run as separate processes or cluster array
tasks and their partial counts (`NgramCounts`, sorted key/count arrays) are summed by `merge_counts`. Pass-1 and
pass-3 tables are exact and small (pairs <= V^2, pass 3 only holds the candidates). Pass 2 can meet many distinct
runs on a large corpus, so its table is pruned when it outgrows `max_table` entries: the rarest entries are
dropped (lossy counting; how many and the largest dropped count are recorded). Pruning only decides which
candidates reach pass 3, whose counts are exact again; without pruning the output does not depend on the number
of parts. Exact duplicate sequences are dropped within each part (`dedup`; a 64-bit digest per sequence).

N-gram keys: an n-gram of ids below 2^b (b = bits of the vocabulary size) is packed into one int64 as
`n << (b * max_len) | id_0 << (b * (n - 1)) | ... | id_{n-1}`; this needs b * max_len + 3 <= 63 bits (4096 ids:
12 * 5 + 3 = 63), checked by `NgramCodec`.

Matching (`GGramMatcher`, spec §1): every window of 2..max_len tokens whose adjacent id pairs all occur inside
some G-gram (a dense pair table filters ~90% of windows) is looked up among the vocabulary keys (sorted array +
searchsorted, one vectorised pass per length over a whole [B, T] batch; a Python token trie, `match_reference`,
is the slow twin the tests compare against). Windows never cross rows; special ids are never in
the vocabulary, so windows over [CLS]/[SEP]/[PAD]/[MASK] never match. `build_rows` merges the occurrences of one
G-gram in a row into one G-gram row (positions = the union), orders rows by (first position, length, id) and
keeps the first `max_ggrams` (30): the release code's order, which is the one inference sees. The result is the
G-gram id matrix [B, M] (0 = padding) and the (batch, token, row) triplets that `GGramMatching.from_triplets`
(dnascale.ops.ggram_fusion) turns into the fusion kernel's CSRs.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, NamedTuple, Sequence

import numpy as np

from dnascale.errors import ConfigError, DataError

FORMAT = "dnascale-ggram-vocab"
FORMAT_VERSION = 1
PAD_GGRAM_ID = 0
COLUMNS = ("id", "tokens", "length", "count", "pmi", "sequence")

__all__ = [
    "FORMAT", "FORMAT_VERSION", "PAD_GGRAM_ID", "PMIConfig", "NgramCodec", "NgramCounts", "GGramVocab",
    "GGramMatcher", "Occurrences", "BatchMatching", "build_rows", "match_reference", "merge_counts",
    "count_pairs", "score_pairs", "count_candidates", "recount", "make_vocab", "extract_vocab",
    "iter_part_sequences", "CorpusSpec", "PairTable", "VocabBuild",
]


# --------------------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PMIConfig:
    """Extraction hyperparameters. theta = 2 (log2) is the paper's value (seed); the repository scripts used
    (theta 5, min counts 5) and later (theta 10, min token count 10, min G-gram frequency 500) on ~35B bases."""

    theta: float = 2.0  # keep adjacent pairs with PMI >= theta (log2)
    min_token_count: int = 5  # tokens and pairs seen fewer times are not scored
    min_ngram_freq: int = 5  # candidates (pass 2) and re-counted G-grams (pass 3) below this are dropped
    min_len: int = 2  # tokens per G-gram
    max_len: int = 5
    max_vocab: int | None = None  # vocabulary cap (the most frequent); None = no cap
    dedup: bool = True  # drop exact duplicate sequences (within a part)
    chunk_tokens: int = 4_000_000  # tokens processed per vectorised step (memory ~ 100 bytes x this)
    max_table: int = 20_000_000  # pass-2 entries per part before the rarest are pruned

    def validate(self) -> None:
        if not math.isfinite(self.theta):
            raise ConfigError(f"theta={self.theta}: must be a finite number (log2 PMI)")
        for name in ("min_token_count", "min_ngram_freq", "chunk_tokens", "max_table"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)}: must be >= 1")
        if not 2 <= self.min_len <= self.max_len <= 7:
            raise ConfigError(f"min_len={self.min_len}, max_len={self.max_len}: need 2 <= min_len <= max_len <= 7")
        if self.max_vocab is not None and self.max_vocab < 1:
            raise ConfigError(f"max_vocab={self.max_vocab}: must be >= 1 or None")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------------------------
# N-gram keys
# --------------------------------------------------------------------------------------------------------------


class NgramCodec:
    """Packs n-grams (n <= max_len) of ids < vocab_size into int64 keys that sort by (length, ids)."""

    def __init__(self, vocab_size: int, max_len: int):
        if vocab_size < 2:
            raise ConfigError(f"vocab_size={vocab_size}: need at least 2 ids")
        self.vocab_size = int(vocab_size)
        self.max_len = int(max_len)
        self.bits = max(1, (self.vocab_size - 1).bit_length())
        self.len_shift = self.bits * self.max_len
        if self.len_shift + 3 > 63 or self.max_len > 7:
            raise ConfigError(
                f"n-grams of up to {max_len} ids below {vocab_size} need {self.len_shift + 3} bits; at most 63 fit "
                f"in an int64 key (lower max_len or use a vocabulary of at most 2^{(60 // max_len)} ids)"
            )

    def pack(self, tokens: Sequence[int]) -> int:
        n = len(tokens)
        return (n << self.len_shift) | sum(int(t) << (self.bits * (n - 1 - k)) for k, t in enumerate(tokens))

    def unpack(self, key: int) -> tuple[int, ...]:
        key = int(key)
        n = key >> self.len_shift
        mask = (1 << self.bits) - 1
        return tuple((key >> (self.bits * (n - 1 - k))) & mask for k in range(n))

    def lengths(self, keys: np.ndarray) -> np.ndarray:
        return (np.asarray(keys, dtype=np.int64) >> self.len_shift).astype(np.int64)

    def window_keys(self, x: np.ndarray, n: int, starts: np.ndarray | None = None) -> np.ndarray:
        """Keys of the n-token windows of `x` (int64) starting at `starts` (default: every start 0..len-n)."""
        if starts is None:
            count = len(x) - n + 1
            if count <= 0:
                return np.zeros(0, dtype=np.int64)
            key = np.full(count, n << self.len_shift, dtype=np.int64)
            for k in range(n):
                key |= x[k : k + count] << (self.bits * (n - 1 - k))
            return key
        key = np.full(len(starts), n << self.len_shift, dtype=np.int64)
        for k in range(n):
            key |= x[starts + k] << (self.bits * (n - 1 - k))
        return key

    def unpack_many(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Token matrix [K, max_len] (-1 beyond each n-gram's length) and lengths [K]."""
        keys = np.asarray(keys, dtype=np.int64)
        lengths = self.lengths(keys)
        tokens = np.full((len(keys), self.max_len), -1, dtype=np.int64)
        mask = (1 << self.bits) - 1
        for k in range(self.max_len):
            shift = self.bits * (lengths - 1 - k)
            live = lengths > k
            tokens[live, k] = (keys[live] >> shift[live]) & mask
        return tokens, lengths


# --------------------------------------------------------------------------------------------------------------
# Count tables
# --------------------------------------------------------------------------------------------------------------


@dataclass
class NgramCounts:
    """A sorted table of int64 keys with int64 counts, plus bookkeeping that merges by summing."""

    keys: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    counts: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    stats: dict[str, int] = field(default_factory=dict)  # tokens, sequences, duplicates, pruned, ...

    def __len__(self) -> int:
        return len(self.keys)

    def add(self, keys: np.ndarray, counts: np.ndarray | None = None) -> None:
        """Add raw keys (counts default to 1 each) into the table."""
        if counts is None:
            keys, counts = np.unique(keys, return_counts=True)
        merged = merge_counts([NgramCounts(self.keys, self.counts), NgramCounts(keys, counts.astype(np.int64))])
        self.keys, self.counts = merged.keys, merged.counts

    def prune(self, max_entries: int) -> None:
        """Drop the rarest entries until at most max_entries / 2 remain (lossy counting; stats say how much)."""
        if len(self.keys) <= max_entries:
            return
        # The count at rank len - max_entries / 2 from the top: everything at or below it goes (ties included).
        cut = len(self.counts) - max_entries // 2
        threshold = int(np.partition(self.counts, cut)[cut])
        keep = self.counts > threshold
        dropped = self.counts[~keep]
        self.stats["pruned_entries"] = self.stats.get("pruned_entries", 0) + int(len(dropped))
        self.stats["max_pruned_count"] = max(self.stats.get("max_pruned_count", 0), int(dropped.max(initial=0)))
        self.keys, self.counts = self.keys[keep], self.counts[keep]

    def filter(self, min_count: int) -> "NgramCounts":
        keep = self.counts >= min_count
        return NgramCounts(self.keys[keep], self.counts[keep], dict(self.stats))

    def save(self, path: str | os.PathLike[str], **extra: np.ndarray) -> None:
        tmp = Path(f"{path}.{os.getpid()}.tmp")
        with open(tmp, "wb") as handle:
            np.savez(handle, keys=self.keys, counts=self.counts, stats=np.asarray(json.dumps(self.stats)), **extra)
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "NgramCounts":
        with np.load(path, allow_pickle=False) as data:
            return cls(data["keys"].astype(np.int64), data["counts"].astype(np.int64), json.loads(str(data["stats"])))


def merge_counts(tables: Sequence[NgramCounts]) -> NgramCounts:
    """Sum tables key by key (exact; the result is sorted by key). Stats add up (max_* entries take the max)."""
    stats: dict[str, int] = {}
    for table in tables:
        for name, value in table.stats.items():
            stats[name] = max(stats.get(name, 0), value) if name.startswith("max_") else stats.get(name, 0) + value
    live = [t for t in tables if len(t.keys)]
    if not live:
        return NgramCounts(stats=stats)
    if len(live) == 1:
        return NgramCounts(live[0].keys.copy(), live[0].counts.copy(), stats)
    keys = np.concatenate([t.keys for t in live])
    counts = np.concatenate([t.counts for t in live])
    unique, inverse = np.unique(keys, return_inverse=True)
    return NgramCounts(unique, np.bincount(inverse, weights=counts, minlength=len(unique)).astype(np.int64), stats)


# --------------------------------------------------------------------------------------------------------------
# Chunks of the corpus
# --------------------------------------------------------------------------------------------------------------


class _Chunk(NamedTuple):
    """Concatenated sequences: ids x [n] int64 and segment ids [n]. A segment is a maximal stretch of content
    tokens of one sequence; every special token is a segment of its own and is flagged in `special`."""

    x: np.ndarray
    segment: np.ndarray
    special: np.ndarray

    def window_valid(self, n: int) -> np.ndarray:
        """[len - n + 1] bool: the window at each start lies inside one content segment."""
        count = len(self.x) - n + 1
        if count <= 0:
            return np.zeros(0, dtype=bool)
        return (self.segment[: count] == self.segment[n - 1 :]) & ~self.special[:count]


def _chunks(
    sequences: Iterable[np.ndarray], special_ids: np.ndarray, chunk_tokens: int, stats: dict[str, int], dedup: bool
) -> Iterator[_Chunk]:
    seen: set[bytes] = set()
    pending: list[np.ndarray] = []
    size = 0

    def flush() -> _Chunk:
        x = np.concatenate(pending).astype(np.int64, copy=False)
        starts = np.zeros(len(x), dtype=bool)
        starts[np.cumsum([0] + [len(p) for p in pending[:-1]])] = True
        special = np.isin(x, special_ids)
        boundary = starts | special
        boundary[1:] |= special[:-1]
        return _Chunk(x, np.cumsum(boundary), special)

    for seq in sequences:
        seq = np.asarray(seq)
        if len(seq) == 0:
            continue
        if dedup:
            digest = hashlib.blake2b(np.ascontiguousarray(seq, dtype=np.int64).tobytes(), digest_size=8).digest()
            if digest in seen:
                stats["duplicates"] = stats.get("duplicates", 0) + 1
                continue
            seen.add(digest)
        stats["sequences"] = stats.get("sequences", 0) + 1
        pending.append(seq)
        size += len(seq)
        if size >= chunk_tokens:
            yield flush()
            pending, size = [], 0
    if pending:
        yield flush()


# --------------------------------------------------------------------------------------------------------------
# The three passes
# --------------------------------------------------------------------------------------------------------------


def count_pairs(
    sequences: Iterable[np.ndarray], vocab_size: int, special_ids: Sequence[int], config: PMIConfig = PMIConfig()
) -> NgramCounts:
    """Pass 1 over one part: unigram counts (keys of length 1) and adjacent-pair counts (length 2)."""
    codec = NgramCodec(vocab_size, config.max_len)
    table = NgramCounts(stats={"tokens": 0, "sequences": 0, "duplicates": 0})
    special = np.asarray(sorted(special_ids), dtype=np.int64)
    for chunk in _chunks(sequences, special, config.chunk_tokens, table.stats, config.dedup):
        content = chunk.x[~chunk.special]
        table.stats["tokens"] += int(len(content))
        unigrams = np.bincount(content, minlength=vocab_size)
        live = np.flatnonzero(unigrams)
        pair_keys, pair_counts = np.unique(codec.window_keys(chunk.x, 2)[chunk.window_valid(2)], return_counts=True)
        table.add(np.concatenate([(1 << codec.len_shift) | live, pair_keys]),
                  np.concatenate([unigrams[live], pair_counts]))
    return table


@dataclass
class PairTable:
    """Kept pairs (sorted keys) with their PMI, and the scoring summary."""

    keys: np.ndarray
    pmi: np.ndarray
    stats: dict[str, Any]

    def pmi_of(self, keys: np.ndarray) -> np.ndarray:
        """PMI of pair keys (NaN for pairs that were not kept)."""
        idx = np.searchsorted(self.keys, keys).clip(max=max(len(self.keys) - 1, 0))
        hit = (self.keys[idx] == keys) if len(self.keys) else np.zeros(len(keys), dtype=bool)
        return np.where(hit, self.pmi[idx] if len(self.keys) else 0.0, np.nan)


def score_pairs(counts: NgramCounts, vocab_size: int, config: PMIConfig = PMIConfig()) -> PairTable:
    """PMI of every pair whose tokens and itself reach min_token_count; keep those with PMI >= theta."""
    codec = NgramCodec(vocab_size, config.max_len)
    lengths = codec.lengths(counts.keys)
    mask = (1 << codec.bits) - 1
    uni = counts.keys[lengths == 1] & mask
    unigram = np.zeros(vocab_size, dtype=np.int64)
    unigram[uni] = counts.counts[lengths == 1]
    pair_keys, pair_counts = counts.keys[lengths == 2], counts.counts[lengths == 2]
    a, b = (pair_keys >> codec.bits) & mask, pair_keys & mask
    total = int(unigram.sum())
    eligible = (pair_counts >= config.min_token_count) & (unigram[a] >= config.min_token_count) & (
        unigram[b] >= config.min_token_count
    )
    with np.errstate(divide="ignore"):
        pmi = np.log2(total * pair_counts.astype(np.float64)) - np.log2(unigram[a].astype(np.float64)) - np.log2(
            unigram[b].astype(np.float64)
        )
    keep = eligible & (pmi >= config.theta)
    stats = {
        "tokens": total,
        "distinct_tokens": int((unigram > 0).sum()),
        "distinct_pairs": int(len(pair_keys)),
        "scored_pairs": int(eligible.sum()),
        "kept_pairs": int(keep.sum()),
    }
    return PairTable(pair_keys[keep], pmi[keep], stats)


def count_candidates(
    sequences: Iterable[np.ndarray],
    pairs: PairTable,
    vocab_size: int,
    special_ids: Sequence[int],
    config: PMIConfig = PMIConfig(),
) -> NgramCounts:
    """Pass 2 over one part: count the runs of kept pairs (cut into pieces of at most max_len tokens)."""
    codec = NgramCodec(vocab_size, config.max_len)
    table = NgramCounts(stats={"tokens": 0, "sequences": 0, "duplicates": 0, "runs": 0})
    special = np.asarray(sorted(special_ids), dtype=np.int64)
    for chunk in _chunks(sequences, special, config.chunk_tokens, table.stats, config.dedup):
        table.stats["tokens"] += int((~chunk.special).sum())
        pair_keys = codec.window_keys(chunk.x, 2)
        link = chunk.window_valid(2)
        if len(pairs.keys):
            idx = np.searchsorted(pairs.keys, pair_keys).clip(max=len(pairs.keys) - 1)
            link &= pairs.keys[idx] == pair_keys
        else:
            link[:] = False
        # Runs of consecutive links: a run of k links spans k + 1 tokens starting at the first link's position.
        edges = np.diff(np.concatenate([[0], link.view(np.int8), [0]]))
        run_start = np.flatnonzero(edges == 1)
        run_tokens = np.flatnonzero(edges == -1) - run_start + 1
        table.stats["runs"] += int(len(run_start))
        # Cut each run into consecutive pieces of max_len tokens (the last one shorter).
        pieces = -(-run_tokens // config.max_len)
        first_piece = np.repeat(np.cumsum(pieces) - pieces, pieces)
        k = np.arange(int(pieces.sum())) - first_piece
        starts = np.repeat(run_start, pieces) + k * config.max_len
        lengths = np.minimum(np.repeat(run_tokens, pieces) - k * config.max_len, config.max_len)
        keys = []
        for n in range(config.min_len, config.max_len + 1):
            keys.append(codec.window_keys(chunk.x, n, starts[lengths == n]))
        table.add(np.concatenate(keys))
        table.prune(config.max_table)
    return table


def recount(
    sequences: Iterable[np.ndarray],
    candidates: np.ndarray,
    vocab_size: int,
    special_ids: Sequence[int],
    config: PMIConfig = PMIConfig(),
) -> NgramCounts:
    """Pass 3 over one part: exact substring counts of the (sorted) candidate keys."""
    codec = NgramCodec(vocab_size, config.max_len)
    candidates = np.asarray(candidates, dtype=np.int64)
    totals = np.zeros(len(candidates), dtype=np.int64)
    stats = {"tokens": 0, "sequences": 0, "duplicates": 0}
    special = np.asarray(sorted(special_ids), dtype=np.int64)
    lengths = np.unique(codec.lengths(candidates))
    for chunk in _chunks(sequences, special, config.chunk_tokens, stats, config.dedup):
        stats["tokens"] += int((~chunk.special).sum())
        if not len(candidates):
            continue
        for n in lengths.tolist():
            keys = codec.window_keys(chunk.x, n)[chunk.window_valid(n)]
            idx = np.searchsorted(candidates, keys).clip(max=len(candidates) - 1)
            hit = candidates[idx] == keys
            totals += np.bincount(idx[hit], minlength=len(candidates))
    return NgramCounts(candidates.copy(), totals, stats)


def make_vocab(
    counts: NgramCounts, pairs: PairTable, vocab_size: int, config: PMIConfig = PMIConfig(),
    metadata: dict[str, Any] | None = None,
) -> "GGramVocab":
    """Final filter (min_ngram_freq, lengths), order (count desc, then ids), cap, and per-G-gram min pair PMI."""
    codec = NgramCodec(vocab_size, config.max_len)
    table = counts.filter(config.min_ngram_freq)
    tokens, lengths = codec.unpack_many(table.keys)
    keep = (lengths >= config.min_len) & (lengths <= config.max_len)
    tokens, lengths, freq = tokens[keep], lengths[keep], table.counts[keep]
    # Deterministic order: count descending, then token ids ascending (shorter first on a common prefix).
    order = np.lexsort(tuple(tokens[:, k] for k in range(config.max_len - 1, -1, -1)) + (-freq,))
    if config.max_vocab is not None:
        order = order[: config.max_vocab]
    tokens, lengths, freq = tokens[order], lengths[order], freq[order]
    pmi = np.full(len(tokens), np.inf)
    for k in range(config.max_len - 1):
        live = lengths > k + 1
        pair = (2 << codec.len_shift) | (tokens[live, k] << codec.bits) | tokens[live, k + 1]
        pmi[live] = np.minimum(pmi[live], pairs.pmi_of(pair))
    meta = dict(metadata or {})
    meta.setdefault("token_vocab_size", int(vocab_size))
    meta.setdefault("params", config.to_dict())
    meta.setdefault("pairs", pairs.stats)
    meta.setdefault("counts", {**counts.stats, "candidates": int(len(counts)), "kept": int(len(tokens))})
    return GGramVocab(tokens, lengths, freq, pmi, meta)


def extract_vocab(
    sequences: Sequence[np.ndarray] | Iterable[np.ndarray],
    vocab_size: int,
    special_ids: Sequence[int],
    config: PMIConfig = PMIConfig(),
    metadata: dict[str, Any] | None = None,
) -> "GGramVocab":
    """All three passes in this process over an in-memory corpus (tests, small corpora). The tool
    (tools/build_ggram_vocab.py) runs the same passes over corpus parts in parallel."""
    config.validate()
    sequences = list(sequences)
    pairs = score_pairs(count_pairs(sequences, vocab_size, special_ids, config), vocab_size, config)
    candidates = count_candidates(sequences, pairs, vocab_size, special_ids, config).filter(config.min_ngram_freq)
    counts = recount(sequences, candidates.keys, vocab_size, special_ids, config)
    counts.stats.update({k: v for k, v in candidates.stats.items() if k.startswith(("pruned", "max_"))})
    counts.stats["pass2_candidates"] = len(candidates)
    return make_vocab(counts, pairs, vocab_size, config, metadata)


# --------------------------------------------------------------------------------------------------------------
# Corpus parts
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CorpusSpec:
    """Where token ids come from: shard directories (ids as stored) and/or FASTA files (cleaned, cut into
    `doc_bases`-base pieces, encoded with `tokenizer`)."""

    shards: tuple[str, ...] = ()
    fasta: tuple[str, ...] = ()
    tokenizer: str | None = None  # needed for FASTA inputs
    splits: tuple[str, ...] = ("train",)
    doc_bases: int = 100_000

    def validate(self) -> None:
        if not self.shards and not self.fasta:
            raise ConfigError("no corpus: give shard directories and/or FASTA files")
        if self.fasta and self.tokenizer is None:
            raise ConfigError("FASTA inputs need --tokenizer (a BPE tokenizer directory)")
        if self.doc_bases < 1:
            raise ConfigError(f"doc_bases={self.doc_bases}: must be >= 1")


def iter_part_sequences(spec: CorpusSpec, part: int, num_parts: int) -> Iterator[np.ndarray]:
    """Token id arrays of corpus part `part` of `num_parts`: shard k (over all shard directories, in manifest
    order) and FASTA piece k (over all files, in order) belong to part k % num_parts."""
    k = 0
    for directory in spec.shards:
        # Imported here: the shard modules pull in torch (through webdataset), which FASTA-only builds never need.
        from dnascale.data.loader import read_shard
        from dnascale.data.shards import load_manifest

        manifest = load_manifest(directory)
        for split in spec.splits:
            for shard in manifest["splits"].get(split, {}).get("shards", []):
                if k % num_parts == part:
                    try:
                        samples = read_shard(Path(directory) / shard["path"], shard["samples"])
                    except Exception as err:  # ShardCorrupt: name the shard
                        raise DataError(f"{directory}/{shard['path']}: {err}") from None
                    for sample in samples:
                        yield sample.ids
                k += 1
    if spec.fasta:
        from dnascale.data.fasta import CleaningPolicy, read_segments
        from dnascale.data.tokenizers import load_tokenizer

        tokenizer = load_tokenizer(spec.tokenizer)
        k = 0
        for path in spec.fasta:
            for segment in read_segments(path, CleaningPolicy()):
                for i in range(0, len(segment.seq), spec.doc_bases):
                    if k % num_parts == part:
                        yield tokenizer.encode(segment.seq[i : i + spec.doc_bases])
                    k += 1


class VocabBuild:
    """The three passes over `num_parts` corpus parts, with partial counts as files in `work_dir`.

    Stages, each run once per part (separate processes, cluster array tasks or ranks), then merged once:
        pairs -> merge-pairs -> candidates -> merge-candidates -> recount -> merge-recount (writes the vocabulary)
    Files: `run.json` (what this build is; a stage refuses a work_dir made for other inputs or parameters),
    `{stage}-{part:05d}-of-{num_parts:05d}.npz` per part, `pairs.npz` (kept pairs and PMI), `candidates.npz`.
    FASTA inputs are tokenized once, in the pairs stage, into `tokens-{part}-of-{num_parts}.npz`.
    """

    STAGES = ("pairs", "merge-pairs", "candidates", "merge-candidates", "recount", "merge-recount")

    def __init__(self, spec: CorpusSpec, config: PMIConfig, work_dir: str | os.PathLike[str], num_parts: int):
        spec.validate()
        config.validate()
        if num_parts < 1:
            raise ConfigError(f"num_parts={num_parts}: must be >= 1")
        self.spec = spec
        self.config = config
        self.work_dir = Path(work_dir)
        self.num_parts = num_parts
        self.tokenizer = self._resolve_tokenizer()
        self.vocab_size = int(self.tokenizer.vocab_size)
        # Ids that break adjacency: the specials, and N (an unknown base; N runs of assembly gaps would otherwise
        # be the corpus's most "cohesive" G-grams).
        unknown = [i for i, piece in self.tokenizer.tokens.items() if piece and set(piece) == {"N"}]
        self.special_ids = sorted({int(i) for i in self.tokenizer.special_ids} | set(unknown))
        NgramCodec(self.vocab_size, config.max_len)  # fail early on a vocabulary too large for the keys

    def _resolve_tokenizer(self) -> Any:
        from dnascale.data.tokenizers import load_tokenizer

        names = {}
        for directory in self.spec.shards:
            from dnascale.data.shards import load_manifest  # (torch, through webdataset: only for shard inputs)

            info = load_manifest(directory)["tokenizer"]
            names[directory] = (info["name"], info["spec"])
        if len({name for name, _ in names.values()}) > 1:
            raise ConfigError(f"shard directories were built with different tokenizers: {names}")
        spec = self.spec.tokenizer or (next(iter(names.values()))[1] if names else None)
        tokenizer = load_tokenizer(spec)
        for directory, (name, _) in names.items():
            if name != tokenizer.name:
                raise ConfigError(f"{directory}: shards hold {name} ids but the tokenizer is {tokenizer.name}")
        return tokenizer

    def descriptor(self) -> dict[str, Any]:
        return {
            "format": f"{FORMAT}-build/{FORMAT_VERSION}",
            "tokenizer": self.tokenizer.name,
            "token_vocab_size": self.vocab_size,
            "corpus": {**dataclasses.asdict(self.spec), "tokenizer": None,
                       "shards": [str(Path(p).resolve()) for p in self.spec.shards],
                       "fasta": [str(Path(p).resolve()) for p in self.spec.fasta]},
            "params": {k: v for k, v in self.config.to_dict().items() if k not in ("chunk_tokens",)},
            "num_parts": self.num_parts,
        }

    def corpus_fingerprint(self) -> dict[str, Any]:
        """What the vocabulary was built from, independent of where the files lie (names and sha256)."""

        def sha256(path: Path) -> str:
            digest = hashlib.sha256()
            with open(path, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
            return digest.hexdigest()

        return {
            "fasta": [{"file": Path(p).name, "sha256": sha256(Path(p))} for p in self.spec.fasta],
            "shards": [{"dir": Path(p).name, "manifest_sha256": sha256(Path(p) / "manifest.json")}
                       for p in self.spec.shards],
            "splits": list(self.spec.splits),
            "doc_bases": self.spec.doc_bases,
        }

    def prepare(self) -> None:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        path = self.work_dir / "run.json"
        mine = json.loads(json.dumps(self.descriptor(), default=_json_default))
        if path.is_file():
            theirs = json.loads(path.read_text())
            if theirs != mine:
                diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
                raise ConfigError(f"{self.work_dir} holds a G-gram build with other {', '.join(diff)}; "
                                  "use another --work-dir or delete it")
        else:
            tmp = path.with_name(f"run.json.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(mine, indent=1, sort_keys=True) + "\n")
            tmp.replace(path)

    def part_file(self, stage: str, part: int) -> Path:
        return self.work_dir / f"{stage}-{part:05d}-of-{self.num_parts:05d}.npz"

    def _token_cache(self, part: int) -> Path:
        return self.work_dir / f"tokens-{part:05d}-of-{self.num_parts:05d}.npz"

    def sequences(self, part: int, write_cache: bool = False) -> Iterator[np.ndarray]:
        """Part `part`'s token arrays: its shards, then its FASTA pieces (from the token cache when there)."""
        yield from iter_part_sequences(dataclasses.replace(self.spec, fasta=()), part, self.num_parts)
        if not self.spec.fasta:
            return
        cache = self._token_cache(part)
        if cache.is_file():
            with np.load(cache) as data:
                tokens, lengths = data["tokens"], data["lengths"]
            yield from np.split(tokens, np.cumsum(lengths)[:-1]) if len(lengths) else ()
            return
        pieces = []
        for seq in iter_part_sequences(dataclasses.replace(self.spec, shards=()), part, self.num_parts):
            if write_cache:
                pieces.append(seq)
            yield seq
        if write_cache:
            tokens = np.concatenate(pieces) if pieces else np.zeros(0, dtype=self.tokenizer.dtype)
            lengths = np.asarray([len(p) for p in pieces], dtype=np.int64)
            tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
            with open(tmp, "wb") as handle:
                np.savez(handle, tokens=tokens, lengths=lengths)
            tmp.replace(cache)

    def _need(self, path: Path, stage: str) -> Path:
        if not path.is_file():
            raise DataError(f"{path} is missing: run stage {stage!r} first")
        return path

    def run_part(self, stage: str, part: int) -> dict[str, int]:
        """Count one part for stage pairs / candidates / recount; returns the part's stats."""
        if not 0 <= part < self.num_parts:
            raise ConfigError(f"part={part}: must be in [0, {self.num_parts})")
        self.prepare()
        if stage == "pairs":
            table = count_pairs(self.sequences(part, write_cache=True), self.vocab_size, self.special_ids, self.config)
        elif stage == "candidates":
            pairs = self.load_pairs()
            table = count_candidates(self.sequences(part), pairs, self.vocab_size, self.special_ids, self.config)
        elif stage == "recount":
            candidates = NgramCounts.load(self._need(self.work_dir / "candidates.npz", "merge-candidates"))
            table = recount(self.sequences(part), candidates.keys, self.vocab_size, self.special_ids, self.config)
        else:
            raise ConfigError(f"stage {stage!r} is not a counting stage (pairs, candidates, recount)")
        table.save(self.part_file(stage, part))
        return dict(table.stats)

    def _merged_parts(self, stage: str) -> NgramCounts:
        missing = [p for p in range(self.num_parts) if not self.part_file(stage, p).is_file()]
        if missing:
            raise DataError(f"{self.work_dir}: stage {stage!r} is missing parts {missing[:10]}"
                            f"{' ...' if len(missing) > 10 else ''} of {self.num_parts}")
        return merge_counts([NgramCounts.load(self.part_file(stage, p)) for p in range(self.num_parts)])

    def load_pairs(self) -> PairTable:
        path = self._need(self.work_dir / "pairs.npz", "merge-pairs")
        with np.load(path) as data:
            return PairTable(data["keys"], data["pmi"], json.loads(str(data["stats"])))

    def merge(self, stage: str, out: str | os.PathLike[str] | None = None) -> Any:
        """merge-pairs -> PairTable; merge-candidates -> NgramCounts; merge-recount -> GGramVocab (saved to out)."""
        self.prepare()
        if stage == "merge-pairs":
            merged = self._merged_parts("pairs")
            table = score_pairs(merged, self.vocab_size, self.config)
            table.stats.update({f"corpus_{k}": v for k, v in merged.stats.items()})
            tmp = self.work_dir / "pairs.npz.tmp"
            with open(tmp, "wb") as handle:
                np.savez(handle, keys=table.keys, pmi=table.pmi, stats=np.asarray(json.dumps(table.stats)))
            tmp.replace(self.work_dir / "pairs.npz")
            return table
        if stage == "merge-candidates":
            merged = self._merged_parts("candidates")
            kept = merged.filter(self.config.min_ngram_freq)
            kept.stats["pass2_distinct"] = int(len(merged))
            kept.save(self.work_dir / "candidates.npz")
            return kept
        if stage == "merge-recount":
            merged = self._merged_parts("recount")
            candidates = NgramCounts.load(self._need(self.work_dir / "candidates.npz", "merge-candidates"))
            merged.stats.update({k: v for k, v in candidates.stats.items() if k.startswith(("pass2", "pruned", "max_"))})
            merged.stats["pass2_candidates"] = int(len(candidates))
            pairs = self.load_pairs()
            meta = {"tokenizer": self.tokenizer.name, "corpus": self.corpus_fingerprint()}
            vocab = make_vocab(merged, pairs, self.vocab_size, self.config, meta).with_sequences(self.tokenizer)
            if out is not None:
                vocab.save(out)
            return vocab
        raise ConfigError(f"stage {stage!r} is not a merge stage (merge-pairs, merge-candidates, merge-recount)")

    def run_local(
        self, out: str | os.PathLike[str] | None, workers: int = 1, progress: bool = False
    ) -> "GGramVocab":
        """Every stage here: parts in a pool of `workers` processes, merges in this process."""
        from tqdm import tqdm

        self.prepare()
        vocab = None
        for stage in ("pairs", "candidates", "recount"):
            bar = tqdm(total=self.num_parts, desc=f"{stage:>10}", unit="part", disable=not progress)
            tokens = 0
            if workers > 1 and self.num_parts > 1:
                import multiprocessing

                context = multiprocessing.get_context("fork" if os.name == "posix" else "spawn")
                with context.Pool(min(workers, self.num_parts)) as pool:
                    jobs = [(self.spec, self.config, str(self.work_dir), self.num_parts, stage, p)
                            for p in range(self.num_parts)]
                    for stats in pool.imap_unordered(_run_part_star, jobs):
                        tokens += stats.get("tokens", 0)
                        bar.update(1)
                        bar.set_postfix(tokens=f"{tokens:,}")
            else:
                for part in range(self.num_parts):
                    tokens += self.run_part(stage, part).get("tokens", 0)
                    bar.update(1)
                    bar.set_postfix(tokens=f"{tokens:,}")
            bar.close()
            vocab = self.merge(f"merge-{stage}", out)
        return vocab


def _run_part_star(args: tuple) -> dict[str, int]:
    spec, config, work_dir, num_parts, stage, part = args
    return VocabBuild(spec, config, work_dir, num_parts).run_part(stage, part)


# --------------------------------------------------------------------------------------------------------------
# The vocabulary file
# --------------------------------------------------------------------------------------------------------------


class GGramVocab:
    """G-grams (token id tuples) with ids 1..len (0 = padding), counts, min adjacent-pair PMI and metadata.

    File format (`save`/`load`; gzip when the name ends in .gz), UTF-8 text, tab-separated:
        #dnascale-ggram-vocab<TAB>1
        #meta<TAB>{json: tokenizer name, extraction params, corpus and pass statistics}
        id<TAB>tokens<TAB>length<TAB>count<TAB>pmi<TAB>sequence
        1<TAB>517 33<TAB>2<TAB>12345<TAB>4.2103<TAB>ACGTTTGA
    `tokens` are BPE ids separated by spaces; `pmi` is the smallest PMI among the G-gram's adjacent pairs (the
    criterion it passed); `sequence` is the decoded bases when the tokenizer was known, else empty.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        lengths: np.ndarray,
        counts: np.ndarray,
        pmi: np.ndarray,
        metadata: dict[str, Any] | None = None,
        sequences: list[str] | None = None,
    ):
        self.tokens = np.asarray(tokens, dtype=np.int64)  # [M, max_len], -1 beyond each length
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.counts = np.asarray(counts, dtype=np.int64)
        self.pmi = np.asarray(pmi, dtype=np.float64)
        self.metadata = dict(metadata or {})
        self.sequences = sequences
        if self.tokens.ndim != 2 or not len(self.tokens) == len(self.lengths) == len(self.counts) == len(self.pmi):
            raise DataError("G-gram vocabulary arrays disagree in length")

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def max_len(self) -> int:
        return int(self.tokens.shape[1])

    @property
    def tokenizer_name(self) -> str | None:
        return self.metadata.get("tokenizer")

    @property
    def num_embeddings(self) -> int:
        """Rows a G-gram embedding table needs: the G-grams plus padding id 0."""
        return len(self) + 1

    def ggram(self, ggram_id: int) -> tuple[int, ...]:
        row = ggram_id - 1
        return tuple(int(t) for t in self.tokens[row, : self.lengths[row]])

    def as_dict(self) -> dict[tuple[int, ...], int]:
        return {self.ggram(i): i for i in range(1, len(self) + 1)}

    def with_sequences(self, tokenizer: Any) -> "GGramVocab":
        """A copy whose `sequence` column holds the decoded bases (and whose metadata names the tokenizer)."""
        seqs = [tokenizer.decode(self.tokens[i, : self.lengths[i]]) for i in range(len(self))]
        meta = {**self.metadata, "tokenizer": tokenizer.name}
        return GGramVocab(self.tokens, self.lengths, self.counts, self.pmi, meta, seqs)

    def save(self, path: str | os.PathLike[str]) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.StringIO()
        buffer.write(f"#{FORMAT}\t{FORMAT_VERSION}\n")
        buffer.write(f"#meta\t{json.dumps(self.metadata, sort_keys=True, default=_json_default)}\n")
        buffer.write("\t".join(COLUMNS) + "\n")
        for i in range(len(self)):
            ids = " ".join(str(int(t)) for t in self.tokens[i, : self.lengths[i]])
            seq = self.sequences[i] if self.sequences is not None else ""
            buffer.write(f"{i + 1}\t{ids}\t{self.lengths[i]}\t{self.counts[i]}\t{self.pmi[i]:.4f}\t{seq}\n")
        data = buffer.getvalue().encode()
        tmp = path.with_name(path.name + ".tmp")
        if path.name.endswith(".gz"):
            # mtime 0 and no file name: the same vocabulary gives byte-identical files.
            with open(tmp, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as handle:
                handle.write(data)
        else:
            tmp.write_bytes(data)
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "GGramVocab":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"G-gram vocabulary {path}: no such file (build one with tools/build_ggram_vocab.py)")
        opener = gzip.open if path.name.endswith(".gz") else open
        try:
            with opener(path, "rt", encoding="utf-8") as handle:
                lines = handle.read().splitlines()
        except (OSError, UnicodeDecodeError) as err:
            raise DataError(f"{path}: unreadable G-gram vocabulary ({err})") from None
        if len(lines) < 3 or lines[0] != f"#{FORMAT}\t{FORMAT_VERSION}":
            found = lines[0][:60] if lines else "an empty file"
            raise DataError(f"{path}: not a {FORMAT} version {FORMAT_VERSION} file (starts with {found!r})")
        if not lines[1].startswith("#meta\t") or lines[2].split("\t") != list(COLUMNS):
            raise DataError(f"{path}: malformed header (expected #meta and the columns {', '.join(COLUMNS)})")
        metadata = json.loads(lines[1].split("\t", 1)[1])
        rows = [line.split("\t") for line in lines[3:] if line]
        max_len = int(metadata.get("params", {}).get("max_len", 0)) or max((int(r[2]) for r in rows), default=2)
        tokens = np.full((len(rows), max_len), -1, dtype=np.int64)
        lengths = np.zeros(len(rows), dtype=np.int64)
        counts = np.zeros(len(rows), dtype=np.int64)
        pmi = np.zeros(len(rows), dtype=np.float64)
        seqs = []
        for i, row in enumerate(rows):
            if len(row) != len(COLUMNS) or int(row[0]) != i + 1:
                raise DataError(f"{path}: line {i + 4}: expected {len(COLUMNS)} columns with id {i + 1}")
            ids = [int(t) for t in row[1].split()]
            if len(ids) != int(row[2]) or len(ids) > max_len:
                raise DataError(f"{path}: line {i + 4}: {len(ids)} tokens but length {row[2]} (max {max_len})")
            tokens[i, : len(ids)] = ids
            lengths[i], counts[i], pmi[i] = len(ids), int(row[3]), float(row[4])
            seqs.append(row[5])
        return cls(tokens, lengths, counts, pmi, metadata, seqs if any(seqs) else None)

    def statistics(self) -> dict[str, Any]:
        """Size, length histogram and count quantiles (what docs and tools report)."""
        hist = {int(n): int(c) for n, c in zip(*np.unique(self.lengths, return_counts=True))}
        q = np.quantile(self.counts, [0.0, 0.5, 0.9, 1.0]).tolist() if len(self) else [0, 0, 0, 0]
        return {"size": len(self), "length_histogram": hist, "count_min": q[0], "count_median": q[1],
                "count_p90": q[2], "count_max": q[3]}


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, (tuple, set)):
        return list(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


# --------------------------------------------------------------------------------------------------------------
# Matching
# --------------------------------------------------------------------------------------------------------------


class Occurrences(NamedTuple):
    """G-gram occurrences in a [B, T] batch: row b, first token t, length, G-gram id (all int64 [K]),
    sorted by (b, t, length)."""

    batch: np.ndarray
    start: np.ndarray
    length: np.ndarray
    ggram: np.ndarray

    def select(self, keep: np.ndarray) -> "Occurrences":
        return Occurrences(self.batch[keep], self.start[keep], self.length[keep], self.ggram[keep])


class BatchMatching(NamedTuple):
    """What the model gets: G-gram ids [B, M] (0 = padding) and (b, token, row) triplets [K, 3] (int64), plus
    how many G-gram rows each sequence had before the cap [B]."""

    ggram_ids: np.ndarray
    triplets: np.ndarray
    rows_before_cap: np.ndarray


class GGramMatcher:
    """Finds vocabulary G-grams in token id batches (vectorised; see the module docstring)."""

    def __init__(self, vocab: GGramVocab, token_vocab_size: int | None = None):
        self.vocab = vocab
        size = token_vocab_size or int(vocab.metadata.get("token_vocab_size", 0)) or int(vocab.tokens.max(initial=1)) + 1
        self.codec = NgramCodec(max(size, int(vocab.tokens.max(initial=1)) + 1), max(vocab.max_len, 2))
        keys = np.array([self.codec.pack(vocab.ggram(i)) for i in range(1, len(vocab) + 1)], dtype=np.int64)
        order = np.argsort(keys, kind="stable")
        if len(keys) and np.any(keys[order][1:] == keys[order][:-1]):
            raise DataError("G-gram vocabulary lists the same G-gram twice")
        self.keys = keys[order]
        self.ids = (order + 1).astype(np.int64)
        self.lengths = [int(n) for n in np.unique(vocab.lengths)] if len(vocab) else []
        # Filter: a window can only match if each of its adjacent pairs occurs inside some G-gram. A dense table
        # over id pairs (16 MB for 4096 ids) leaves ~10x fewer windows for the sorted-key lookup.
        self.pair_size = 1 << self.codec.bits
        self.pair_ok = None
        if self.pair_size**2 <= 1 << 26 and len(vocab):
            self.pair_ok = np.zeros(self.pair_size**2, dtype=bool)
            for k in range(vocab.max_len - 1):
                live = vocab.lengths > k + 1
                self.pair_ok[vocab.tokens[live, k] * self.pair_size + vocab.tokens[live, k + 1]] = True

    def find(self, ids: np.ndarray) -> Occurrences:
        """All occurrences in `ids` ([T] or [B, T] integer ids); windows never cross rows."""
        ids = np.asarray(ids, dtype=np.int64)
        if ids.ndim == 1:
            ids = ids[None]
        batch, length = ids.shape
        flat = ids.reshape(-1)
        if flat.size and (flat.min() < 0 or flat.max() >= self.pair_size):
            raise DataError(f"token ids must lie in [0, {self.pair_size}) for this G-gram vocabulary")
        parts = []
        link = np.ones(max(flat.size - 1, 0), dtype=bool)
        if self.pair_ok is not None and flat.size > 1:
            link = self.pair_ok[flat[:-1] * self.pair_size + flat[1:]]
        link[np.arange(1, batch) * length - 1] = False  # never across rows
        links_before = np.concatenate([[0], np.cumsum(link)])
        for n in self.lengths:
            if n > length or not len(self.keys):
                continue
            count = flat.size - n + 1
            start = np.flatnonzero(links_before[n - 1 : n - 1 + count] - links_before[:count] == n - 1)
            keys = self.codec.window_keys(flat, n, start)
            idx = np.searchsorted(self.keys, keys).clip(max=len(self.keys) - 1)
            hit = self.keys[idx] == keys
            pos = start[hit]
            parts.append((pos // length, pos % length, np.full(len(pos), n, dtype=np.int64), self.ids[idx[hit]]))
        if not parts:
            empty = np.zeros(0, dtype=np.int64)
            return Occurrences(empty, empty, empty, empty)
        b, t, n, g = (np.concatenate(x) for x in zip(*parts))
        order = np.lexsort((n, t, b))
        return Occurrences(b[order], t[order], n[order], g[order])


def build_rows(occ: Occurrences, batch: int, max_ggrams: int | None = 30, min_rows: int = 1) -> BatchMatching:
    """Merge occurrences of one G-gram per sequence into one row, order rows by (first position, length, id),
    keep the first `max_ggrams` per sequence, and emit the matching as (b, token, row) triplets."""
    vocab_rows = int(occ.ggram.max(initial=0)) + 1
    row_key = occ.batch * vocab_rows + occ.ggram
    if len(row_key):
        unique, first_index, inverse = np.unique(row_key, return_index=True, return_inverse=True)
        # The first occurrence of each (b, G-gram) in (b, t, length) order is at its first index (occ is sorted).
        first_start = occ.start[first_index]
        row_batch, row_ggram, row_len = occ.batch[first_index], occ.ggram[first_index], occ.length[first_index]
        order = np.lexsort((row_ggram, row_len, first_start, row_batch))
        sorted_batch = row_batch[order]
        group_start = np.searchsorted(sorted_batch, sorted_batch, side="left")
        rank = np.empty(len(order), dtype=np.int64)
        rank[order] = np.arange(len(order)) - group_start
        rows_before_cap = np.bincount(row_batch, minlength=batch)
    else:
        inverse = rank = np.zeros(0, dtype=np.int64)
        row_batch = row_ggram = np.zeros(0, dtype=np.int64)
        rows_before_cap = np.zeros(batch, dtype=np.int64)
    kept_row = rank < max_ggrams if max_ggrams is not None else np.ones(len(rank), dtype=bool)
    width = max(min_rows, int(rank[kept_row].max(initial=-1)) + 1)
    ggram_ids = np.zeros((batch, width), dtype=np.int64)
    ggram_ids[row_batch[kept_row], rank[kept_row]] = row_ggram[kept_row]
    # Triplets: every token of every occurrence whose row was kept.
    occ_row = rank[inverse] if len(inverse) else inverse
    live = kept_row[inverse] if len(inverse) else np.zeros(0, dtype=bool)
    b, t, n, j = occ.batch[live], occ.start[live], occ.length[live], occ_row[live]
    offsets = np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)
    triplets = np.stack([np.repeat(b, n), np.repeat(t, n) + offsets, np.repeat(j, n)], axis=1).astype(np.int64)
    return BatchMatching(ggram_ids, triplets.reshape(-1, 3), rows_before_cap)


def match_reference(vocab: GGramVocab, ids: Sequence[int]) -> list[tuple[int, int, int]]:
    """Slow twin of `GGramMatcher.find` for one sequence: a token trie walked from every start.
    Returns (start, length, G-gram id) sorted by (start, length)."""
    trie = vocab.__dict__.get("_trie")
    if trie is None:
        trie = {}
        for ggram_id in range(1, len(vocab) + 1):
            node = trie
            for token in vocab.ggram(ggram_id):
                node = node.setdefault(token, {})
            node[None] = ggram_id
        vocab.__dict__["_trie"] = trie
    found = []
    ids = [int(t) for t in ids]
    for start in range(len(ids)):
        node = trie
        for end in range(start, len(ids)):
            node = node.get(ids[end])
            if node is None:
                break
            if None in node:
                found.append((start, end - start + 1, node[None]))
    return sorted(found)
