"""Genome-scale inference: every record of a FASTA tiled with overlapping windows, batched through a model, stitched
base by base (dnascale.infer.tiling) and written chunk by chunk to a zarr store that resumes (dnascale.infer.writer).

What can be asked (`what`):
    embeddings   per-base final states (dnascale.infer.families: each family's encode() states at bases)
    mlm_score    per-base masked-LM log-likelihood of the reference base and the entropy of the prediction. Each
                 window runs `mlm_groups` = k extra passes; pass g masks the units (bases; BPE tokens for DNAZEN)
                 whose phase is g mod k, so every unit is masked exactly once, with no masked neighbour closer than
                 k units: k passes instead of one per base. k defaults to round(1 / mask rate) of the family's
                 pretraining (7 at 15%), so a pass masks about the fraction the model was trained to fill in.
    boundaries   DNACHUNKER boundary probabilities per stage (from the same unmasked pass as the embeddings)

Records are read with the FASTA reader's cleaning (uppercase, IUPAC codes as N) but never split: N runs stay in
place, so array index i is base i of the record. N bases get states like any other token and NaN scores.

Resume: a record's windows are cut into fixed batches (window indices [b B, (b + 1) B)); a rerun restarts at the
batch holding the first base of the first chunk not yet written and recomputes those batches exactly as the first
run did (same windows in the same batch), so a resumed store equals an uninterrupted one bit for bit at the same
--batch-size and device. Batch size and device are not part of the settings; other values differ only by float
rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from dnascale.data.fasta import CleaningPolicy, read_segments
from dnascale.errors import ConfigError, DataError
from dnascale.infer.backbone import LoadedModel, load_model, resolve_device
from dnascale.infer.families import ACGT
from dnascale.infer.tiling import tile
from dnascale.infer.writer import BF16_ENCODING, ArraySpec, InferenceStore, StoreSettings, to_storage

WHAT_CHOICES = ("embeddings", "mlm_score", "boundaries")
DTYPES = {"fp32": None, "bf16": torch.bfloat16}  # autocast dtype on CUDA; CPU computes in float32
# Chunks of about this many bytes (uncompressed) in the widest array: large enough that zarr's per-chunk overhead
# is small, small enough that a killed run loses little work and the stitching buffer stays small.
TARGET_CHUNK_BYTES = 4 << 20
# The reader's cleaning, minus the N-run split: inference keeps record coordinates.
POLICY = CleaningPolicy(max_n_run=None)
# Base letter -> index in A, C, G, T (-1: not a base the head scores).
_BASE_INDEX = np.full(256, -1, dtype=np.int64)
for _i, _b in enumerate(ACGT):
    _BASE_INDEX[ord(_b)] = _i


@dataclass
class InferConfig:
    checkpoint: str
    fasta: str
    out: str
    what: tuple[str, ...] = ("embeddings",)
    window: int | None = None  # bases per window; None: the model's training window
    stride: int | None = None  # None: window // 2
    batch_size: int = 8  # windows per forward pass
    dtype: str = "fp32"  # embeddings storage (and CUDA autocast)
    device: str = "cpu"
    records: tuple[str, ...] | None = None  # None: every record, in file order
    mlm_groups: int | None = None  # None: round(1 / the family's pretraining mask rate)
    chunk_bases: int | None = None  # None: from TARGET_CHUNK_BYTES
    progress: bool = True


@dataclass(frozen=True)
class Summary:
    store: Path
    records: dict[str, int]  # record -> length
    bases_computed: int  # bases whose chunks this run wrote (0 when everything was already there)


def default_mlm_groups(config) -> int:
    from dnascale.data.masking import TokenMasking

    rate = float(getattr(config, "mask_rate", TokenMasking().rate))
    return max(2, round(1.0 / rate))


def record_lengths(fasta: str, wanted: tuple[str, ...] | None) -> dict[str, int]:
    """Record -> length, in file order (restricted to `wanted`, which must all exist)."""
    lengths = {}
    for segment in read_segments(fasta, POLICY):
        lengths[segment.record] = lengths.get(segment.record, 0) + len(segment)
    if wanted is None:
        return lengths
    missing = [r for r in wanted if r not in lengths]
    if missing:
        shown = ", ".join(list(lengths)[:10]) + (", ..." if len(lengths) > 10 else "")
        raise DataError(f"{fasta}: no record named {missing[0]!r} (records: {shown})")
    return {r: lengths[r] for r in dict.fromkeys(wanted)}


def iter_records(fasta: str, wanted: dict[str, int]):
    for segment in read_segments(fasta, POLICY):
        if segment.record in wanted:
            if segment.start != 0 or len(segment) != wanted[segment.record]:
                raise DataError(f"{fasta}: record {segment.record} did not read back whole")
            yield segment.record, segment.seq


def _check(cfg: InferConfig) -> None:
    bad = [w for w in cfg.what if w not in WHAT_CHOICES]
    if bad or not cfg.what:
        raise ConfigError(f"--what {','.join(cfg.what)}: choose some of {', '.join(WHAT_CHOICES)}")
    if cfg.dtype not in DTYPES:
        raise ConfigError(f"--dtype {cfg.dtype!r}: choose one of {', '.join(DTYPES)}")
    for name in ("batch_size", "window", "stride", "chunk_bases"):
        value = getattr(cfg, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} {value}: must be >= 1")
    if cfg.mlm_groups is not None and cfg.mlm_groups < 2:
        raise ConfigError(f"--mlm-groups {cfg.mlm_groups}: must be >= 2 (group g masks every k-th unit)")


def array_specs(what: tuple[str, ...], model: LoadedModel, dtype: str) -> list[ArraySpec]:
    specs = []
    if "embeddings" in what:
        hidden = next(int(getattr(model.config, n)) for n in ("hidden", "d_model") if hasattr(model.config, n))
        specs.append(ArraySpec("embeddings", (hidden,), "uint16" if dtype == "bf16" else "float32",
                               0 if dtype == "bf16" else np.nan, BF16_ENCODING if dtype == "bf16" else None))
    if "mlm_score" in what:
        specs += [ArraySpec("mlm_logp", (), "float32", np.nan), ArraySpec("mlm_entropy", (), "float32", np.nan)]
    if "boundaries" in what:
        specs.append(ArraySpec("boundary_prob", (int(model.config.stages),), "float32", np.nan))
    return specs


def default_chunk_bases(specs: list[ArraySpec]) -> int:
    """The largest power of two of bases whose chunk of the widest array fits TARGET_CHUNK_BYTES."""
    widest = max(int(np.prod(s.trailing, dtype=np.int64)) * np.dtype(s.dtype).itemsize for s in specs)
    return 1 << int(math.log2(max(TARGET_CHUNK_BYTES // widest, 1)))


class _Stitcher:
    """Per-chunk buffers that collect each window's owned span; a chunk is handed out once every base is in."""

    def __init__(self, group, specs: list[ArraySpec]):
        self.group = group
        self.specs = specs
        self.buffers: dict[int, dict[str, np.ndarray]] = {}

    def _buffer(self, j: int) -> dict[str, np.ndarray]:
        if j not in self.buffers:
            lo, hi = self.group.chunk_span(j)
            self.buffers[j] = {s.name: np.full((hi - lo, *s.trailing), s.fill, dtype=s.dtype) for s in self.specs}
        return self.buffers[j]

    def put(self, lo: int, hi: int, start: int, values: dict[str, np.ndarray]) -> None:
        """Bases [lo, hi) of the record from a window that starts at `start`."""
        chunk = self.group.chunk_bases
        lo = max(lo, self.group.chunks_done * chunk)  # never rewrite a chunk that is already stored
        for j in range(lo // chunk, -(-hi // chunk)):
            c_lo, c_hi = self.group.chunk_span(j)
            a, b = max(lo, c_lo), min(hi, c_hi)
            if a >= b:
                continue
            buffer = self._buffer(j)
            for name, array in values.items():
                buffer[name][a - c_lo : b - c_lo] = array[a - start : b - start]

    def flush(self, finished: int, on_chunk: Callable[[str, int], None] | None) -> int:
        """Write every chunk that lies below base `finished`; returns the bases written."""
        written = 0
        while not self.group.complete and self.group.chunk_span(self.group.chunks_done)[1] <= finished:
            j = self.group.chunks_done
            self.group.write_chunk(j, self.buffers.pop(j))
            lo, hi = self.group.chunk_span(j)
            written += hi - lo
            if on_chunk is not None:
                on_chunk(self.group.record, j)
        return written


def _window_values(model: LoadedModel, what: tuple[str, ...], dtype: str, groups: int, seqs: list[bytes],
                   starts: list[int], record: str) -> list[dict[str, np.ndarray]]:
    """Per window, the per-base arrays of every requested output."""
    runner = model.runner
    prepared = [runner.prepare(s, f"{record}:{a + 1}-{a + len(s)}") for s, a in zip(seqs, starts)]
    out: list[dict[str, np.ndarray]] = [{} for _ in seqs]
    if "embeddings" in what or "boundaries" in what:
        plain = runner.plain(prepared, "boundaries" in what)
        for i in range(len(seqs)):
            if "embeddings" in what:
                out[i]["embeddings"] = to_storage(plain.embeddings[i], dtype)
            if "boundaries" in what:
                out[i]["boundary_prob"] = plain.boundaries[i].astype(np.float32)
    if "mlm_score" in what:
        reference = [_BASE_INDEX[np.frombuffer(s, dtype=np.uint8)] for s in seqs]
        phases = [runner.unit_phase(p, a) for p, a in zip(prepared, starts)]
        # A unit is worth masking if it holds a base the head scores (N alone is not).
        scorable = [np.bincount(p.base_unit, weights=r >= 0, minlength=len(p.units)) > 0
                    for p, r in zip(prepared, reference)]
        logp = [np.full((len(s), 4), np.nan, dtype=np.float32) for s in seqs]
        for g in range(groups):
            units = [(ph % groups == g) & ok for ph, ok in zip(phases, scorable)]
            if not any(u.any() for u in units):
                continue
            for i, values in enumerate(runner.masked(prepared, units)):
                hit = ~np.isnan(values[:, 0])
                logp[i][hit] = values[hit]
        for i, (lp, ref) in enumerate(zip(logp, reference)):
            score = np.full(len(ref), np.nan, dtype=np.float32)
            known = ref >= 0
            score[known] = lp[known, ref[known]]
            prob = np.exp(lp)
            with np.errstate(invalid="ignore"):  # 0 * log 0 (a letter with no mass) counts as 0
                entropy = -np.where(prob > 0, prob * lp, 0.0).sum(axis=1).astype(np.float32)
            entropy[~known] = np.nan
            out[i]["mlm_logp"], out[i]["mlm_entropy"] = score, entropy
    return out


def infer(cfg: InferConfig, on_chunk: Callable[[str, int], None] | None = None,
          model: LoadedModel | None = None) -> Summary:
    """Run (or resume) inference into cfg.out. `on_chunk(record, j)` is called after chunk j is stored."""
    import dnascale

    _check(cfg)
    device = resolve_device(cfg.device)
    lengths = record_lengths(cfg.fasta, cfg.records)  # a missing record fails before the model is read
    if not lengths:
        raise DataError(f"{cfg.fasta}: no records")
    if model is None:
        model = load_model(cfg.checkpoint, device, DTYPES[cfg.dtype])
    runner = model.runner
    if "boundaries" in cfg.what and not runner.has_boundaries:
        raise ConfigError(f"--what boundaries: only dnachunker models have chunk boundaries; {cfg.checkpoint} is "
                          f"a {model.recipe!r} model")
    window = cfg.window or runner.max_window
    if window > runner.max_window:
        raise ConfigError(f"--window {window}: the {model.recipe} model takes at most {runner.max_window} bases per "
                          f"window (max_seq_len {runner.max_tokens} with its template)")
    stride = cfg.stride or max(window // 2, 1)
    if stride > window:
        raise ConfigError(f"--stride {stride} is larger than --window {window}: bases between windows would be lost")
    groups = cfg.mlm_groups or default_mlm_groups(model.config)
    specs = array_specs(cfg.what, model, cfg.dtype)
    chunk_bases = cfg.chunk_bases or default_chunk_bases(specs)
    settings = StoreSettings(
        recipe=model.recipe, preset=model.preset, checkpoint=model.checkpoint, weights_sha256=model.weights_sha256,
        window=window, stride=stride, dtype=cfg.dtype, what=tuple(sorted(cfg.what)),
        mlm_groups=groups if "mlm_score" in cfg.what else 0, chunk_bases=chunk_bases,
        dnascale_version=dnascale.__version__,
    )
    store = InferenceStore(cfg.out, settings)
    bar = tqdm(total=sum(lengths.values()), unit="bp", unit_scale=True, desc="infer", disable=not cfg.progress)
    computed = 0
    try:
        for record, seq in iter_records(cfg.fasta, lengths):
            group = store.record(record, seq, specs)
            done = min(group.chunks_done * chunk_bases, len(seq))
            bar.update(done)
            if group.complete:
                continue
            tiling = tile(len(seq), window, stride)
            first = (tiling.owner(done) // cfg.batch_size) * cfg.batch_size
            stitcher = _Stitcher(group, specs)
            bar.set_postfix_str(record)
            for b0 in range(first, len(tiling), cfg.batch_size):
                ks = range(b0, min(b0 + cfg.batch_size, len(tiling)))
                starts = [int(tiling.starts[k]) for k in ks]
                seqs = [seq[int(tiling.starts[k]) : int(tiling.ends[k])] for k in ks]
                values = _window_values(model, cfg.what, cfg.dtype, groups, seqs, starts, record)
                for k, start, v in zip(ks, starts, values):
                    stitcher.put(int(tiling.own_lo[k]), int(tiling.own_hi[k]), start, v)
                written = stitcher.flush(int(tiling.own_hi[ks[-1]]), on_chunk)
                computed += written
                bar.update(written)
    finally:
        bar.close()
    return Summary(Path(cfg.out), lengths, computed)
