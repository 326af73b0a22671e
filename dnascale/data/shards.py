"""FASTA -> windows -> token ids -> WebDataset tar shards, with a manifest that accounts for every base.

One input file is one unit of work: it is cleaned, windowed, tokenized and written to its own shards
(`{split}-{input:03d}-{species}-{n:06d}.tar`), so inputs build in parallel and the output does not depend on
scheduling. Tar members carry fixed mtime/owner/mode, and the manifest holds no timestamps or absolute paths,
so the same inputs and config give byte-identical shards and manifest.

Sample layout (the contract with `dnascale.data.loader`):
  __key__        `{split}_{input:03d}_{window:09d}` (no dots: WebDataset splits keys at the first dot)
  ids.npy        1-D token ids, the tokenizer's smallest unsigned dtype, no special tokens
  meta.json      {"record", "source", "species", "start", "end", "strand"} (0-based, end exclusive, on +)
  softmask.npy   optional 1-D bool, True where the input base was lowercase (soft-masked repeat)

Base accounting: `bases_read == bases_written + sum(bases_dropped)`, where written means covered by at least
one written window (overlapping windows and reverse complements do not count twice; tokens are counted apart).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import multiprocessing
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import webdataset as wds

from dnascale.data.fasta import CleaningPolicy, CleaningReport, Segment, read_segments
from dnascale.data.tokenizers import Tokenizer, load_tokenizer
from dnascale.errors import ConfigError, DataError, DnascaleError

FORMAT = "dnascale-shards/1"
SPLITS = ("train", "validation")
TAIL_POLICIES = ("end_aligned", "drop")
SPLIT_POLICIES = ("hash", "record")
_COMPLEMENT = bytes.maketrans(b"ACGTN", b"TGCAN")
_FASTA_SUFFIXES = re.compile(r"(\.(fa|fna|fasta|fas|seq))?(\.gz)?$", re.IGNORECASE)


@dataclass(frozen=True)
class ShardConfig:
    """How FASTA becomes shards. Defaults suit nucleotide-level pretraining."""

    window: int = 1024  # bases per sample
    stride: int | None = None  # bases between window starts; None = window (no overlap)
    tail: str = "end_aligned"  # end_aligned: add one window flush with the segment end; drop: leave the tail out
    reverse_complement: bool = False  # also write the reverse complement of every window as its own sample
    max_n_fraction: float = 0.5  # windows with more N than this are dropped (ENBED: "drop windows mostly N")
    split: str = "hash"  # hash: seeded hash of each window; record: --val-records are held out whole
    val_fraction: float = 0.01  # for split=hash
    val_records: tuple[str, ...] = ()  # for split=record: record ids (e.g. chromosomes) held out
    seed: int = 0
    tokenizer: str = "nucleotide"  # a spec understood by load_tokenizer (name or directory)
    keep_softmask: bool = False
    shard_max_bytes: int = 16 * 2**20  # small enough that shards outnumber ranks x workers on modest data
    shard_max_samples: int = 100_000
    cleaning: CleaningPolicy = field(default_factory=CleaningPolicy)

    @property
    def effective_stride(self) -> int:
        return self.window if self.stride is None else self.stride

    def validate(self) -> None:
        if self.window <= 0:
            raise ConfigError(f"window: expected a positive number of bases, got {self.window}")
        if self.stride is not None and self.stride <= 0:
            raise ConfigError(f"stride: expected a positive number of bases, got {self.stride}")
        if self.tail not in TAIL_POLICIES:
            raise ConfigError(f"tail: expected one of {', '.join(TAIL_POLICIES)}, got {self.tail!r}")
        if self.split not in SPLIT_POLICIES:
            raise ConfigError(f"split: expected one of {', '.join(SPLIT_POLICIES)}, got {self.split!r}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction: expected a fraction in [0, 1), got {self.val_fraction}")
        if self.split == "record" and not self.val_records:
            raise ConfigError("val_records: split=record needs at least one record id to hold out")
        if not 0.0 <= self.max_n_fraction <= 1.0:
            raise ConfigError(f"max_n_fraction: expected a fraction in [0, 1], got {self.max_n_fraction}")
        if self.shard_max_bytes <= 0 or self.shard_max_samples <= 0:
            raise ConfigError("shard_max_bytes and shard_max_samples must be positive")
        if self.keep_softmask and not self.cleaning.keep_softmask:
            raise ConfigError("keep_softmask: needs cleaning.keep_softmask=True to have a mask to keep")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class ShardInfo:
    path: str  # relative to the dataset directory
    samples: int
    tokens: int
    bytes: int = 0
    sha256: str = ""


@dataclass
class InputResult:
    """What one input file produced."""

    index: int
    source: str
    species: str
    sha256: str
    report: CleaningReport
    shards: dict[str, list[ShardInfo]]
    windows: dict[str, int]
    tokens: dict[str, int]
    segments_shorter_than_window: int
    longest_segment: int = 0
    path: str = ""  # as given, for messages; the manifest keeps only the file name


def species_name(path: str | os.PathLike) -> str:
    stem = _FASTA_SUFFIXES.sub("", Path(path).name)
    return re.sub(r"[^A-Za-z0-9_-]+", "_", stem) or "input"


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def window_starts(length: int, window: int, stride: int, tail: str) -> np.ndarray:
    """Window start offsets in a segment of `length` bases (empty when the segment is shorter than a window)."""
    if length < window:
        return np.zeros(0, dtype=np.int64)
    starts = np.arange(0, length - window + 1, stride, dtype=np.int64)
    if tail == "end_aligned" and starts[-1] + window < length:
        starts = np.append(starts, length - window)
    return starts


def union_length(starts: np.ndarray, window: int) -> int:
    """Bases covered by equal-length windows at sorted `starts`."""
    if len(starts) == 0:
        return 0
    gaps = np.minimum(np.diff(starts), window)
    return int(gaps.sum()) + window


def reverse_complement(seq: bytes) -> bytes:
    return seq.translate(_COMPLEMENT)[::-1]


@functools.lru_cache(maxsize=64)
def _npy_header(dtype: str, length: int) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buffer, {"descr": dtype, "fortran_order": False, "shape": (length,)}
    )
    return buffer.getvalue()


def _npy_bytes(array: np.ndarray) -> bytes:
    """np.save's bytes for a 1-D array, with the header cached: windows share a few (dtype, length) pairs."""
    return _npy_header(np.lib.format.dtype_to_descr(array.dtype), len(array)) + array.tobytes()


def _is_validation(config: ShardConfig, species: str, record: str, start: int) -> bool:
    if config.split == "record":
        return record in config.val_records
    if config.val_fraction == 0.0:
        return False
    # A keyed hash, not Python's hash(): stable across processes and runs, so splits rebuild identically.
    digest = hashlib.blake2b(f"{species}\0{record}\0{start}".encode(), digest_size=8, key=str(config.seed).encode())
    return int.from_bytes(digest.digest(), "little") / 2**64 < config.val_fraction


class _SplitWriter:
    """A ShardWriter opened on first use that records per-shard sample and token counts."""

    def __init__(self, directory: Path, prefix: str, config: ShardConfig):
        self.directory = directory
        self.prefix = prefix
        self.config = config
        self.writer: wds.ShardWriter | None = None
        self.shards: list[ShardInfo] = []
        self._tokens_in_shard = 0

    def _shard_done(self, fname: str) -> None:
        assert self.writer is not None
        self.shards.append(ShardInfo(Path(fname).name, self.writer.count, self._tokens_in_shard))
        self._tokens_in_shard = 0

    def write(self, sample: dict, tokens: int) -> None:
        if self.writer is None:
            self.writer = wds.ShardWriter(
                str(self.directory / f"{self.prefix}-%06d.tar"),
                maxcount=self.config.shard_max_samples,
                maxsize=self.config.shard_max_bytes,
                post=self._shard_done,
                verbose=0,
                encoder=False,
                mtime=0,  # an int: a float mtime makes tarfile add a PAX header to every member (2x slower)
                user="dnascale",
                group="dnascale",
                mode=0o444,
            )
        self.writer.write(sample)
        self._tokens_in_shard += tokens

    def close(self) -> list[ShardInfo]:
        if self.writer is not None:
            self.writer.close()
        return self.shards


def _windows_of_segment(
    segment: Segment, config: ShardConfig, tokenizer: Tokenizer, per_base: bool, report: CleaningReport
) -> Iterator[tuple[int, str, np.ndarray, np.ndarray | None]]:
    """Yield (start, strand, ids, softmask) for the kept windows of one segment; book dropped bases."""
    length, window = len(segment.seq), config.window
    starts = window_starts(length, window, config.effective_stride, config.tail)
    if len(starts) == 0:
        report.drop("shorter_than_window", length)
        return
    bases = np.frombuffer(segment.seq, dtype=np.uint8)
    n_prefix = np.concatenate([[0], np.cumsum(bases == ord("N"), dtype=np.int64)])
    n_counts = n_prefix[starts + window] - n_prefix[starts]
    keep = n_counts <= config.max_n_fraction * window
    kept = starts[keep]
    candidate_cover = union_length(starts, window)
    kept_cover = union_length(kept, window)
    report.drop("outside_windows", length - candidate_cover)
    report.drop("mostly_n", candidate_cover - kept_cover)

    # Nucleotide tokenizers map base i to token i, so the segment is encoded once and windows are views.
    segment_ids = tokenizer.encode(segment.seq) if per_base else None
    rc_segment = reverse_complement(segment.seq) if config.reverse_complement else None
    rc_ids = tokenizer.encode(rc_segment) if (per_base and rc_segment is not None) else None
    for start in kept.tolist():
        end = start + window
        mask = segment.softmask[start:end] if config.keep_softmask else None
        ids = segment_ids[start:end] if per_base else tokenizer.encode(segment.seq[start:end])
        yield start, "+", ids, mask
        if rc_segment is not None:
            rc_start = length - end  # the same bases, read on the minus strand
            rc_window = rc_ids[rc_start : rc_start + window] if per_base else tokenizer.encode(
                rc_segment[rc_start : rc_start + window]
            )
            yield start, "-", rc_window, (mask[::-1].copy() if mask is not None else None)


def build_input(index: int, path: str, config: ShardConfig, out_dir: str) -> InputResult:
    """Clean, window, tokenize and write one FASTA file. Runs in a worker process."""
    tokenizer = load_tokenizer(config.tokenizer)
    per_base = bool(getattr(tokenizer, "one_token_per_base", False))
    species = species_name(path)
    source = Path(path).name
    report = CleaningReport()
    writers = {split: _SplitWriter(Path(out_dir), f"{split}-{index:03d}-{species}", config) for split in SPLITS}
    windows = dict.fromkeys(SPLITS, 0)
    tokens = dict.fromkeys(SPLITS, 0)
    serial = 0
    shorter = 0
    longest = 0
    try:
        for segment in read_segments(path, config.cleaning, report):
            longest = max(longest, len(segment.seq))
            if len(segment.seq) < config.window:
                shorter += 1
            for start, strand, ids, mask in _windows_of_segment(segment, config, tokenizer, per_base, report):
                split = "validation" if _is_validation(config, species, segment.record, start) else "train"
                offset = segment.start + start  # position in the record, not the segment
                meta = {
                    "record": segment.record,
                    "source": source,
                    "species": species,
                    "start": offset,
                    "end": offset + config.window,
                    "strand": strand,
                }
                sample = {
                    "__key__": f"{split}_{index:03d}_{serial:09d}",
                    "ids.npy": _npy_bytes(np.ascontiguousarray(ids)),
                    "meta.json": json.dumps(meta, sort_keys=True).encode(),
                }
                if mask is not None:
                    sample["softmask.npy"] = _npy_bytes(np.ascontiguousarray(mask, dtype=bool))
                writers[split].write(sample, len(ids))
                windows[split] += 1
                tokens[split] += len(ids)
                serial += 1
    except BaseException:
        # Close the open tar streams now: left to the garbage collector they flush into closed files at exit and
        # print a traceback after the one-line error. build_shards then removes the partial shards.
        for writer in writers.values():
            writer.close()
        raise
    report.check()
    shards = {split: writer.close() for split, writer in writers.items()}
    for infos in shards.values():
        for info in infos:
            shard_path = Path(out_dir) / info.path
            info.bytes = shard_path.stat().st_size
            info.sha256 = file_sha256(shard_path)
    return InputResult(
        index=index,
        source=source,
        species=species,
        sha256=file_sha256(path),
        report=report,
        shards=shards,
        windows=windows,
        tokens=tokens,
        segments_shorter_than_window=shorter,
        longest_segment=longest,
        path=str(path),
    )


def _build_input_star(args: tuple) -> InputResult:
    return build_input(*args)


def _check_inputs(paths: Sequence[str | os.PathLike]) -> list[str]:
    if not paths:
        raise ConfigError("no FASTA inputs given")
    checked: list[str] = []
    seen: dict[Path, str] = {}
    for path in paths:
        candidate = Path(path)
        if candidate.is_dir():
            raise DataError(
                f"{path}: is a directory, expected a FASTA file (pass the files in it, e.g. {path}/*.fa.gz)"
            )
        if not candidate.exists():
            raise DataError(f"{path}: no such FASTA file")
        if not candidate.is_file():
            raise DataError(f"{path}: not a regular file, expected a FASTA file")
        # Resolved, so ./a.fa and a.fa are caught too: a file read twice would weigh its species double.
        key = candidate.resolve()
        if key in seen:
            raise ConfigError(f"{path}: the same FASTA file is listed twice (also as {seen[key]})")
        seen[key] = str(path)
        checked.append(str(path))
    return checked


def _count(n: int, noun: str) -> str:
    """'all 3 records are' / 'the 1 record is': the subject of a nothing-written message."""
    return f"the 1 {noun} is" if n == 1 else f"all {n:,} {noun}s are"


def _plural(n: int, noun: str) -> str:
    return f"{n:,} {noun}" + ("" if n == 1 else "s")


def nothing_written(result: InputResult, config: ShardConfig) -> str | None:
    """Why an input wrote no window at all (one clause plus the flag that would accept it), or None if it wrote
    some. The cleaning report and the segment lengths say which of the causes it was."""
    if sum(result.windows.values()):
        return None
    report, window = result.report, config.window
    skipped = sum(report.records_skipped.values())
    cleaned = report.records - skipped
    if cleaned == 0:
        reasons = ", ".join(f"{k} {v:,}" for k, v in sorted(report.records_skipped.items()))
        return f"{_count(report.records, 'record')} skipped ({reasons}); nothing to write; check the file"
    if report.records_all_n == cleaned:
        return (
            f"{_count(cleaned, 'record')} entirely N ({report.bases_read:,} bases dropped); nothing to write "
            "(N is an unknown base); check the file, or to keep N windows anyway use --max-n-fraction 1 with "
            "--max-n-run above the longest N run"
        )
    longest = result.longest_segment
    if report.segments and longest < window:
        n_run = report.bases_dropped.get("n_run", 0)
        if not n_run:  # no record was split, so each record is one segment
            return (
                f"{_count(cleaned, 'record')} shorter than --window {window} (longest {longest:,} bp); "
                f"lower --window to at most {longest}"
            )
        return (
            f"every segment is shorter than --window {window} (longest {longest:,} bp) after its "
            f"{_plural(cleaned, 'record')} were split at runs of more than {config.cleaning.max_n_run:,} N "
            f"({n_run:,} N dropped); lower --window to at most {longest} or raise --max-n-run"
        )
    shorter = result.segments_shorter_than_window
    short = ""
    if shorter:
        short = f"{shorter:,} of {_plural(report.segments, 'segment')} shorter than --window {window} and "
    return (
        f"{short}every window of its {_plural(cleaned, 'record')} is more than {config.max_n_fraction:g} N "
        f"(--max-n-fraction {config.max_n_fraction:g}); raise --max-n-fraction"
        + (" or lower --window" if shorter else "")
    )


def _prepare_out_dir(out_dir: Path, overwrite: bool) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    existing = sorted(p.name for p in out_dir.iterdir())
    if existing and not overwrite:
        raise DataError(f"{out_dir}: output directory is not empty ({len(existing)} entries); pass --overwrite")
    for name in existing:
        if name.endswith(".tar") or name == "manifest.json":
            (out_dir / name).unlink()


def _remove_shards(out_dir: Path) -> None:
    for path in out_dir.glob("*.tar"):
        path.unlink(missing_ok=True)


def build_shards(
    inputs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    config: ShardConfig = ShardConfig(),
    *,
    workers: int = 1,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Build shards for all inputs and write `out_dir/manifest.json`; returns the manifest."""
    config.validate()
    paths = _check_inputs(inputs)
    tokenizer = load_tokenizer(config.tokenizer)  # fail here, once, on a bad tokenizer spec
    out = Path(out_dir)
    _prepare_out_dir(out, overwrite)
    jobs = [(i, p, config, str(out)) for i, p in enumerate(paths)]
    results: list[InputResult] = []
    from tqdm import tqdm

    try:
        # disable=None: a bar only on a terminal, so logs and captured stderr end with the one-line error, not a
        # half-drawn bar; `with` closes the bar before an input error propagates to run_cli.
        with tqdm(total=len(jobs), unit="file", desc="building shards", disable=None if progress else True) as bar:
            if workers > 1 and len(jobs) > 1:
                with multiprocessing.get_context("spawn").Pool(min(workers, len(jobs))) as pool:
                    for result in pool.imap_unordered(_build_input_star, jobs):
                        results.append(result)
                        bar.update(1)
            else:
                for job in jobs:
                    results.append(_build_input_star(job))
                    bar.update(1)
    except DnascaleError:
        # Shards of the inputs read before the bad one would otherwise sit there without a manifest and make
        # the rerun after the fix ask for --overwrite. Every .tar here is this build's (_prepare_out_dir).
        _remove_shards(out)
        raise
    results.sort(key=lambda r: r.index)
    # An input that gives nothing is an error only when every input does: with several species, one that
    # contributes nothing is reported per source in the manifest (nothing_written) and by the CLI, not fatal.
    empty = [(r.path, reason) for r in results if (reason := nothing_written(r, config)) is not None]
    if len(empty) == len(results):  # then no shard was written either: writers open on the first window
        if len(empty) == 1:
            raise DataError(f"{empty[0][0]}: {empty[0][1]}")
        raise DataError(
            f"no window written from any of the {len(empty)} inputs: " + "; ".join(f"{p}: {why}" for p, why in empty)
        )
    manifest = _manifest(results, config, tokenizer)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return manifest


def _manifest(results: list[InputResult], config: ShardConfig, tokenizer: Tokenizer) -> dict:
    total = CleaningReport()
    for result in results:
        total.merge(result.report)
    total.check()
    splits = {}
    for split in SPLITS:
        shards = [dataclasses.asdict(info) for r in results for info in r.shards[split]]
        splits[split] = {
            "shards": shards,
            "samples": sum(s["samples"] for s in shards),
            "tokens": sum(s["tokens"] for s in shards),
        }
    return {
        "format": FORMAT,
        "config": config.to_dict(),
        "tokenizer": {"name": tokenizer.name, "vocab_size": tokenizer.vocab_size, "spec": config.tokenizer},
        "sources": [
            {
                "file": r.source,
                "species": r.species,
                "sha256": r.sha256,
                "bases_read": r.report.bases_read,
                "bases_written": r.report.bases_written,
                "bases_dropped": {reason: n for reason, n in sorted(r.report.bases_dropped.items()) if n},
                "records": r.report.records,
                "records_skipped": dict(sorted(r.report.records_skipped.items())),
                "segments": r.report.segments,
                "windows": r.windows,
                "nothing_written": nothing_written(r, config),
            }
            for r in results
        ],
        "bases_read": total.bases_read,
        "bases_written": total.bases_written,
        "bases_dropped": {reason: n for reason, n in sorted(total.bases_dropped.items()) if n},
        "cleaning": total.to_dict(),
        "windows": {split: sum(r.windows[split] for r in results) for split in SPLITS},
        "tokens": {split: sum(r.tokens[split] for r in results) for split in SPLITS},
        "splits": splits,
    }


def load_manifest(directory: str | os.PathLike) -> dict:
    """Read and sanity-check a shard directory's manifest."""
    path = Path(directory) / "manifest.json"
    if not path.is_file():
        raise DataError(f"{directory}: not a shard directory (no manifest.json); build one with tools/build_shards.py")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: corrupt manifest ({err.msg} at line {err.lineno})") from None
    if manifest.get("format") != FORMAT:
        raise DataError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest
