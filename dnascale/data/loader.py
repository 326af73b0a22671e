"""WebDataset shards -> a seeded, rank/worker-split sample stream that resumes exactly mid-epoch.

WebDataset streams tar shards but cannot resume inside an epoch. This module keeps WebDataset's tar reading
(`tar_file_expander` + `group_by_keys`) and owns the order instead, so that a position in the stream is two
integers per worker and the order is a pure function of (seed, epoch).

Global order of epoch e (N = sum of the manifest's sample counts):
  1. shards: a seeded permutation of the manifest's shards (seed, e), or manifest order when shuffle=False;
  2. inside each shard: a seeded permutation of its samples (seed, e, shard), or tar order;
  3. concatenate -> positions 0..N-1 (a sample's position is its `index`).
The N positions are cut into `world_size * num_workers` contiguous slots whose sizes differ by at most one;
slot = rank * num_workers + worker. A slot reads only the shards that overlap its range. Every sample of an epoch
goes to exactly one (rank, worker). With `infinite=True` a slot streams epoch 0, 1, 2, ... forever, so a worker's
batch can hold the end of epoch e and the start of e+1 and every batch is full.

Sample contract (what a collate_fn receives, a list of these dicts):
  ids       torch.LongTensor [L], token ids as stored (no special tokens)
  softmask  torch.BoolTensor [bases], only present when the shard sample has softmask.npy
  meta      dict from meta.json ({} when absent)
  epoch     int, the epoch this sample was drawn in
  index     int, its position in that epoch's global order (unique within the epoch, same on every rank)
  key       str, the WebDataset __key__
A collate_fn must draw any randomness (e.g. MLM masking) from (seed, epoch, index) only -- see
`dnascale.data.masking.sample_generator` -- never from a generator carried across batches. Then a resumed run
masks every sample exactly as the uninterrupted run did, with nothing but the data position in the checkpoint.

Resume: `ResumableLoader` tags every batch in its worker with the logical worker id and that worker's
position (epoch, offset in its slot) after the batch. torch's DataLoader hands out IterableDataset batches
round-robin over workers (0, 1, ..., W-1, 0, ...; exhausted workers skipped), so recording each logical
worker's position plus the worker due next is enough: on resume, physical worker w plays logical worker
(w + next_worker) % W, and the fixed round-robin replays the uninterrupted order.

Corrupt shards: with on_corrupt="error" a truncated/garbage/missing shard, a sample without ids.npy, or a sample
count that differs from the manifest raises DataError naming the shard. With on_corrupt="skip" the slot skips its
part of that shard, logs a warning and counts it; resume stays exact (the same shard is skipped again), but the
"every sample exactly once" guarantee then no longer holds -- the skipped samples are simply missing.

Cost model: a slot reads each shard it overlaps in full (to apply the within-shard permutation and to check the
count), holding one decoded shard in memory. A shard that straddles k slots is read k times per epoch, so keep
shards >= slots (world_size * num_workers) and of moderate size (tens to hundreds of MB).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import tarfile
import zlib
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_expander

from dnascale.data.shards import load_manifest
from dnascale.errors import DataError, DnascaleError

logger = logging.getLogger(__name__)


STATE_FORMAT = "dnascale-loader-state/1"
ON_CORRUPT = ("error", "skip")

# Domain tags keep the shard-order and within-shard hash streams independent of each other.
_TAG_SHARD_ORDER = 0x5348_4F52  # "SHOR"
_TAG_SAMPLE_ORDER = 0x5341_4D50  # "SAMP"
_M64 = (1 << 64) - 1


# --------------------------------------------------------------------------------------------------------------
# Seeded permutations: pure functions of integers, implemented here (not numpy's Generator) because numpy does not
# promise the same stream across versions, and a checkpoint must replay the same order after an upgrade.


def _mix64(x: int) -> int:
    """splitmix64 finalizer: a bijection on 64-bit integers with good avalanche."""
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def _mix64_array(x: np.ndarray) -> np.ndarray:
    x = x + np.uint64(0x9E3779B97F4A7C15)  # uint64 arrays wrap silently, which is what we want
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _hash_words(*words: int) -> int:
    h = 0
    for word in words:
        h = _mix64(h ^ (word & _M64))
    return h


def seeded_permutation(n: int, *words: int) -> np.ndarray:
    """A permutation of range(n) determined by `words`: sort positions by a keyed 64-bit bijective hash.

    XOR with a key and the mix are both bijections, so the sort keys are distinct and the order has no ties.
    """
    key = np.uint64(_hash_words(*words))
    return np.argsort(_mix64_array(np.arange(n, dtype=np.uint64) ^ key), kind="stable")


# --------------------------------------------------------------------------------------------------------------
# Manifest


@dataclass(frozen=True)
class ShardEntry:
    path: str  # relative to the dataset directory, as in the manifest
    samples: int
    sha256: str = ""


def _read_manifest(directory: Path, split: str) -> tuple[list[ShardEntry], str]:
    """The split's shards in manifest order, and a digest identifying them (for state compatibility checks)."""
    manifest = load_manifest(directory)
    path = directory / "manifest.json"
    splits = manifest.get("splits") or {}
    if split not in splits:
        raise DataError(f"{path}: no split {split!r} (splits: {', '.join(sorted(splits)) or 'none'})")
    entries = []
    for i, raw in enumerate(splits[split].get("shards", [])):
        samples = raw.get("samples") if isinstance(raw, dict) else None
        if not isinstance(raw.get("path") if isinstance(raw, dict) else None, str) or not isinstance(samples, int):
            raise DataError(f"{path}: splits.{split}.shards[{i}] needs a string 'path' and an int 'samples'")
        if samples < 0:
            raise DataError(f"{path}: splits.{split}.shards[{i}] ({raw['path']}) has negative samples={samples}")
        entries.append(ShardEntry(raw["path"], samples, str(raw.get("sha256", ""))))
    canonical = json.dumps([split, [dataclasses.astuple(e) for e in entries]], separators=(",", ":"))
    return entries, hashlib.sha256(canonical.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------------------------
# Reading one shard


class ShardCorrupt(Exception):
    """Internal: a shard cannot be used; the reader turns it into DataError or a counted skip."""


@dataclass
class _Sample:
    key: str
    ids: np.ndarray
    softmask: np.ndarray | None
    meta: dict


def _load_npy(data: bytes, what: str, key: str) -> np.ndarray:
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise ShardCorrupt(f"sample {key}: unreadable {what} ({err})") from None
    if array.ndim != 1:
        raise ShardCorrupt(f"sample {key}: {what} has shape {array.shape}, expected 1-D")
    return array


def _decode(raw: dict) -> _Sample:
    key = raw["__key__"]
    if "ids.npy" not in raw:
        present = sorted(k for k in raw if not k.startswith("__"))
        raise ShardCorrupt(f"sample {key} has no ids.npy (members: {', '.join(present) or 'none'})")
    ids = _load_npy(raw["ids.npy"], "ids.npy", key)
    if ids.dtype.kind not in "ui":
        raise ShardCorrupt(f"sample {key}: ids.npy has dtype {ids.dtype}, expected an integer dtype")
    softmask = _load_npy(raw["softmask.npy"], "softmask.npy", key).astype(bool) if "softmask.npy" in raw else None
    meta: dict = {}
    if "meta.json" in raw:
        try:
            meta = json.loads(raw["meta.json"])
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ShardCorrupt(f"sample {key}: unreadable meta.json ({err})") from None
    return _Sample(key, ids, softmask, meta)


class _HashingReader:
    """File wrapper that hashes what tarfile reads, so checksum verification costs no second pass."""

    def __init__(self, handle: io.BufferedReader):
        self.handle = handle
        self.digest = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self.handle.read(size)
        self.digest.update(data)
        return data

    def finish(self) -> str:
        for block in iter(lambda: self.read(1 << 20), b""):
            pass
        return self.digest.hexdigest()


def read_shard(path: Path, expected: int, sha256: str = "") -> list[_Sample]:
    """All samples of one shard in tar order, validated; raises ShardCorrupt saying what is wrong.

    `sha256` (hex) is checked when given.
    """
    try:
        with open(path, "rb") as handle:
            stream = _HashingReader(handle) if sha256 else handle
            files = tar_file_expander([{"url": str(path), "stream": stream}])
            samples = [_decode(raw) for raw in group_by_keys(files)]
            actual = stream.finish() if isinstance(stream, _HashingReader) else ""
    except FileNotFoundError:
        raise ShardCorrupt("missing shard file") from None
    except (tarfile.TarError, OSError, EOFError, ValueError, zlib.error) as err:
        # webdataset appends stream objects to exception args; the first arg is the message.
        reason = err.args[0] if err.args else type(err).__name__
        raise ShardCorrupt(f"unreadable tar ({type(err).__name__}: {reason})") from None
    if len(samples) != expected:
        raise ShardCorrupt(f"has {len(samples)} samples, the manifest says {expected} (truncated or rewritten?)")
    if sha256 and actual != sha256:
        raise ShardCorrupt(f"sha256 {actual[:12]}... differs from the manifest's {sha256[:12]}...")
    return samples


# --------------------------------------------------------------------------------------------------------------
# Positions and state


@dataclass
class WorkerPosition:
    """Where one logical worker stands: the next sample it yields is `offset` within its slot of `epoch`."""

    epoch: int = 0
    offset: int = 0
    skipped_shards: int = 0  # corrupt shards skipped so far (on_corrupt="skip"), cumulative across epochs


@dataclass
class LoaderState:
    """Everything needed to continue a stream exactly; `to_dict()` is what goes into a checkpoint."""

    manifest_digest: str
    split: str
    seed: int
    shuffle: bool
    infinite: bool
    rank: int
    world_size: int
    num_workers: int  # DataLoader workers; 0 = in-process (one logical worker)
    batch_size: int | None  # None for a ShardDataset's own single-sample stream
    next_worker: int = 0  # logical worker whose batch comes next in the round-robin
    batches: int = 0  # batches yielded so far (informational)
    workers: list[WorkerPosition] = field(default_factory=list)
    format: str = STATE_FORMAT

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, state: Mapping[str, Any]) -> "LoaderState":
        if not isinstance(state, Mapping) or state.get("format") != STATE_FORMAT:
            found = state.get("format") if isinstance(state, Mapping) else type(state).__name__
            raise DataError(f"not a loader state: format {found!r}, expected {STATE_FORMAT!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        missing = sorted(names - set(state))
        if missing:
            raise DataError(f"loader state is missing fields: {', '.join(missing)}")
        fields = {k: state[k] for k in names}
        fields["workers"] = [WorkerPosition(**w) for w in state["workers"]]
        return cls(**fields)

    @property
    def logical_workers(self) -> int:
        return max(1, self.num_workers)


def _check_compatible(saved: LoaderState, current: LoaderState) -> None:
    """One-line DataError when `saved` cannot continue in `current`'s configuration."""
    if saved.manifest_digest != current.manifest_digest or saved.split != current.split:
        raise DataError(
            f"loader state belongs to another dataset (split {saved.split!r}, manifest {saved.manifest_digest}); "
            f"this run reads split {current.split!r}, manifest {current.manifest_digest}"
        )
    topology = ("world_size", "rank", "num_workers")
    if any(getattr(saved, k) != getattr(current, k) for k in topology):
        was = ", ".join(f"{k}={getattr(saved, k)}" for k in topology)
        now = ", ".join(f"{k}={getattr(current, k)}" for k in topology)
        raise DataError(
            f"loader state was saved with {was} but this run has {now}; "
            "changing the data-parallel topology or worker count mid-run is not supported yet"
        )
    for name in ("seed", "shuffle", "infinite"):
        if getattr(saved, name) != getattr(current, name):
            raise DataError(
                f"loader state was saved with {name}={getattr(saved, name)} but this run has "
                f"{name}={getattr(current, name)}; the sample order would differ"
            )
    if len(saved.workers) != current.logical_workers or not 0 <= saved.next_worker < current.logical_workers:
        raise DataError(
            f"loader state is inconsistent: {len(saved.workers)} worker positions, next_worker={saved.next_worker}"
        )
    if saved.batch_size != current.batch_size:
        # Positions count samples, so nothing is lost or repeated; only the batch boundaries move.
        logger.warning(
            "loader state was saved with batch_size=%s, resuming with %s: no sample is lost or repeated, "
            "but the batches differ from the uninterrupted run",
            saved.batch_size,
            current.batch_size,
        )


# --------------------------------------------------------------------------------------------------------------
# The dataset


def _distributed_topology() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _slot_bounds(slot: int, num_slots: int, total: int) -> tuple[int, int]:
    return slot * total // num_slots, (slot + 1) * total // num_slots


class ShardDataset(IterableDataset):
    """Samples of one split of a shard directory, in the seeded global order, restricted to this rank/worker.

    Used directly (no DataLoader, or a plain DataLoader) it streams this rank's part split over the DataLoader's
    workers; `state_dict()`/`load_state_dict()` resume the in-process (num_workers=0) stream. For exact resume
    with workers use `ResumableLoader`.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        split: str = "train",
        *,
        rank: int | None = None,
        world_size: int | None = None,
        seed: int = 0,
        shuffle: bool = True,
        infinite: bool = True,
        on_corrupt: str = "error",
        verify_checksums: bool = False,
    ):
        super().__init__()
        if on_corrupt not in ON_CORRUPT:
            raise DataError(f"on_corrupt={on_corrupt!r}; expected one of {', '.join(ON_CORRUPT)}")
        dist_rank, dist_world = _distributed_topology()
        self.rank = dist_rank if rank is None else rank
        self.world_size = dist_world if world_size is None else world_size
        if not 0 <= self.rank < self.world_size:
            raise DataError(f"rank={self.rank} is outside world_size={self.world_size}")
        self.directory = Path(directory)
        self.split = split
        self.seed = int(seed)
        self.shuffle = shuffle
        self.infinite = infinite
        self.on_corrupt = on_corrupt
        self.verify_checksums = verify_checksums
        self.shards, self.manifest_digest = _read_manifest(self.directory, split)
        self.num_samples = sum(s.samples for s in self.shards)
        self.epoch = 0  # where a fresh stream starts; a finite stream reads only this epoch
        self.skipped_shards = 0  # in-process count (DataLoader workers count in their own copies)
        self._position = WorkerPosition()
        self._resumed = False

    def set_epoch(self, epoch: int) -> None:
        """Start fresh streams at `epoch` (finite mode: the one epoch read). Forgets a loaded state."""
        self.epoch = int(epoch)
        self._position = WorkerPosition(self.epoch)
        self._resumed = False

    def check_slots(self, num_slots: int) -> None:
        """Infinite streams need every slot non-empty, or a worker would spin forever without data."""
        if self.infinite and self.num_samples < num_slots:
            raise DataError(
                f"{self.directory} split {self.split!r}: {self.num_samples} samples cannot feed "
                f"{num_slots} streams (world_size={self.world_size} x workers); use fewer workers/ranks or more data"
            )

    # -- global order --

    def shard_order(self, epoch: int) -> np.ndarray:
        """Manifest indices of the shards in epoch `epoch`'s order."""
        if not self.shuffle:
            return np.arange(len(self.shards))
        return seeded_permutation(len(self.shards), _TAG_SHARD_ORDER, self.seed, epoch)

    def sample_order(self, epoch: int, shard: int) -> np.ndarray:
        """Tar-order indices of manifest shard `shard`'s samples in epoch `epoch`'s order."""
        n = self.shards[shard].samples
        if not self.shuffle:
            return np.arange(n)
        return seeded_permutation(n, _TAG_SAMPLE_ORDER, self.seed, epoch, shard)

    def _iter_slot(self, slot: int, num_slots: int, start: WorkerPosition) -> "_SlotReader":
        return _SlotReader(self, slot, num_slots, start)

    # -- single-stream use --

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        workers, worker = (1, 0) if info is None else (info.num_workers, info.id)
        if self._resumed and workers != 1:
            raise DataError("a ShardDataset state resumes only in-process streams; use ResumableLoader with workers")
        self.check_slots(self.world_size * workers)
        reader = self._iter_slot(self.rank * workers + worker, self.world_size * workers, self._position)
        for sample in reader:
            self._position = reader.position
            self.skipped_shards = reader.position.skipped_shards
            yield sample
        self.skipped_shards = reader.position.skipped_shards
        if not self.infinite:  # a finished finite pass rewinds, so iterating again replays the epoch
            self._position = WorkerPosition(self.epoch, 0, reader.position.skipped_shards)

    def _blank_state(self, num_workers: int, batch_size: int | None) -> LoaderState:
        workers = [WorkerPosition(self.epoch) for _ in range(max(1, num_workers))]
        return LoaderState(
            self.manifest_digest, self.split, self.seed, self.shuffle, self.infinite,
            self.rank, self.world_size, num_workers, batch_size, workers=workers,
        )  # fmt: skip

    def state_dict(self) -> dict:
        """Position of the in-process stream (the next sample `__iter__` yields)."""
        state = self._blank_state(0, None)
        state.workers = [dataclasses.replace(self._position)]
        return state.to_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        saved = LoaderState.from_dict(state)
        _check_compatible(saved, self._blank_state(0, saved.batch_size))
        self._position = dataclasses.replace(saved.workers[0])
        self.skipped_shards = self._position.skipped_shards
        self._resumed = True


class _SlotReader:
    """Streams one slot from a position; `position` is always the position after the last yielded sample."""

    def __init__(self, source: ShardDataset, slot: int, num_slots: int, start: WorkerPosition):
        self.source = source
        self.lo, self.hi = _slot_bounds(slot, num_slots, source.num_samples)
        self.position = self._normalized(start.epoch, start.offset, start.skipped_shards)
        self._cache: tuple[int, list[_Sample]] | None = None  # last shard read (a 1-shard split reuses it)

    @property
    def length(self) -> int:
        return self.hi - self.lo

    def _normalized(self, epoch: int, offset: int, skipped: int) -> WorkerPosition:
        # In an infinite stream "end of epoch e" and "start of e+1" are the same place; store the latter.
        if self.source.infinite and offset >= self.length:
            return WorkerPosition(epoch + 1, 0, skipped)
        return WorkerPosition(epoch, offset, skipped)

    def __iter__(self) -> Iterator[dict]:
        if self.source.infinite and self.length == 0:
            source = self.source
            raise DataError(f"{source.directory}: an infinite stream got an empty slot ({source.num_samples} samples)")
        while self.position.offset < self.length:
            epoch, offset = self.position.epoch, self.position.offset
            produced = yield from self._read_epoch(epoch, offset)
            if not self.source.infinite:
                return
            if produced == 0 and offset == 0:
                raise DataError(
                    f"{self.source.directory}: every shard this stream reads in epoch {epoch} is corrupt "
                    "and was skipped"
                )
            self.position = WorkerPosition(epoch + 1, 0, self.position.skipped_shards)

    def _read_epoch(self, epoch: int, offset: int) -> Iterator[dict]:
        """Yield this slot's samples of `epoch` from `offset`; returns how many were yielded."""
        source = self.source
        order = source.shard_order(epoch)
        counts = np.array([source.shards[m].samples for m in order], dtype=np.int64)
        ends = np.cumsum(counts)
        first = self.lo + offset
        produced = 0
        k = int(np.searchsorted(ends, first, side="right"))
        while k < len(order) and ends[k] - counts[k] < self.hi:
            shard, shard_start = int(order[k]), int(ends[k] - counts[k])
            a, b = max(first, shard_start) - shard_start, min(self.hi, int(ends[k])) - shard_start
            k += 1
            if b <= a:
                continue
            samples = self._load(shard, epoch, lost=b - a)
            if samples is None:
                skipped = self.position.skipped_shards + 1
                self.position = self._normalized(epoch, shard_start + b - self.lo, skipped)
                continue
            perm = source.sample_order(epoch, shard)
            for p in range(a, b):
                self.position = self._normalized(epoch, shard_start + p + 1 - self.lo, self.position.skipped_shards)
                produced += 1
                yield _to_item(samples[perm[p]], epoch, shard_start + p)
        return produced

    def _load(self, shard: int, epoch: int, lost: int) -> list[_Sample] | None:
        if self._cache is not None and self._cache[0] == shard:
            return self._cache[1]
        entry = self.source.shards[shard]
        path = self.source.directory / entry.path
        try:
            samples = read_shard(path, entry.samples, entry.sha256 if self.source.verify_checksums else "")
        except ShardCorrupt as err:
            if self.source.on_corrupt == "error":
                raise DataError(f"shard {path}: {err} (on_corrupt='skip' skips corrupt shards)") from None
            logger.warning(
                "skipping corrupt shard %s (epoch %d, this stream loses %d samples): %s",
                path,
                epoch,
                lost,
                err,
            )
            return None
        self._cache = (shard, samples)
        return samples


def _to_item(sample: _Sample, epoch: int, index: int) -> dict:
    item = {
        "ids": torch.from_numpy(sample.ids.astype(np.int64)),
        "meta": dict(sample.meta),  # a copy: the cached shard is reused and collators may edit meta
        "epoch": epoch,
        "index": index,
        "key": sample.key,
    }
    if sample.softmask is not None:
        item["softmask"] = torch.from_numpy(sample.softmask.copy())
    return item


# --------------------------------------------------------------------------------------------------------------
# The resumable loader


class _TaggedBatch(NamedTuple):
    """A collated batch plus its worker's position after it (a NamedTuple so pin_memory recurses into `batch`)."""

    batch: Any
    worker: int
    epoch: int
    offset: int
    skipped_shards: int


class _WorkerFailure(NamedTuple):
    """A DnascaleError raised in a worker, carried as data so the main process re-raises it with a one-line
    message (DataLoader would wrap it in a multi-line traceback)."""

    error_type: type
    message: str


def _passthrough(item: Any) -> Any:
    return item


class _BatchStream(IterableDataset):
    """Runs in each DataLoader worker: plays one logical worker, batches with the user's collate_fn, tags batches."""

    def __init__(
        self, dataset: ShardDataset, batch_size: int, collate_fn: Callable, drop_last: bool, state: LoaderState
    ):
        super().__init__()
        self.dataset = dataset
        self.batch_size = batch_size
        self.collate_fn = collate_fn
        self.drop_last = drop_last
        self.state = state

    def __iter__(self) -> Iterator[_TaggedBatch | _WorkerFailure]:
        try:
            yield from self._batches()
        except DnascaleError as err:
            yield _WorkerFailure(type(err), str(err))

    def _batches(self) -> Iterator[_TaggedBatch]:
        info = get_worker_info()
        physical = 0 if info is None else info.id
        workers = self.state.logical_workers
        running = 1 if info is None else info.num_workers
        if running != workers:
            raise RuntimeError(f"_BatchStream built for {workers} logical workers runs under {running}")
        logical = (physical + self.state.next_worker) % workers
        slot = self.dataset.rank * workers + logical
        reader = self.dataset._iter_slot(slot, self.dataset.world_size * workers, self.state.workers[logical])
        samples = iter(reader)
        while True:
            chunk = list(islice(samples, self.batch_size))
            if not chunk or (self.drop_last and len(chunk) < self.batch_size):
                return
            pos = reader.position
            yield _TaggedBatch(self.collate_fn(chunk), logical, pos.epoch, pos.offset, pos.skipped_shards)
            if len(chunk) < self.batch_size:
                return


class ResumableLoader:
    """A torch DataLoader over a ShardDataset whose batch stream can be checkpointed and resumed exactly.

    Iterating continues from the current position (a fresh start, a loaded state, or where the last iterator
    stopped). A finished finite pass (infinite=False) rewinds to the start of `dataset.epoch`. The collate_fn runs
    in the workers on a list of sample dicts (see the module docstring); it must take its randomness from
    (seed, epoch, index). Only one iterator is live at a time: starting a new one retires the previous.
    """

    def __init__(
        self,
        dataset: ShardDataset,
        batch_size: int,
        collate_fn: Callable[[list[dict]], Any] | None = None,
        num_workers: int = 0,
        *,
        drop_last: bool = False,
        pin_memory: bool = False,
        prefetch_factor: int | None = None,
        timeout: float = 0,
        multiprocessing_context: Any = None,
    ):
        if batch_size < 1 or num_workers < 0:
            raise DataError(f"batch_size={batch_size}, num_workers={num_workers}: need batch_size >= 1, workers >= 0")
        self.dataset = dataset
        self.batch_size = batch_size
        self.collate_fn = collate_fn or default_collate
        self.num_workers = num_workers
        self.drop_last = drop_last
        self._loader_kwargs = dict(
            pin_memory=pin_memory, prefetch_factor=prefetch_factor, timeout=timeout,
            multiprocessing_context=multiprocessing_context,
        )  # fmt: skip
        dataset.check_slots(dataset.world_size * max(1, num_workers))
        self._state: LoaderState | None = None  # None = fresh: built lazily so set_epoch() before iterating counts
        self._generation = 0

    def _current(self) -> LoaderState:
        if self._state is None:
            self._state = self.dataset._blank_state(self.num_workers, self.batch_size)
        return self._state

    @property
    def skipped_shards(self) -> int:
        """Corrupt shards skipped so far by this rank's workers (on_corrupt='skip'), counted once per epoch read."""
        return sum(w.skipped_shards for w in self._current().workers)

    def __iter__(self) -> Iterator[Any]:
        self._generation += 1
        return self._run(self._generation, self._current())

    def _run(self, generation: int, state: LoaderState) -> Iterator[Any]:
        # Workers get a snapshot; `state` itself advances only as batches reach the caller.
        stream = _BatchStream(self.dataset, self.batch_size, self.collate_fn, self.drop_last, _copy_state(state))
        loader = DataLoader(
            stream, batch_size=None, collate_fn=_passthrough, num_workers=self.num_workers,
            in_order=True, persistent_workers=False, **self._loader_kwargs,
        )  # fmt: skip
        for item in loader:
            if generation != self._generation:
                raise RuntimeError("this ResumableLoader iterator was retired by a newer iter() or load_state_dict()")
            if isinstance(item, _WorkerFailure):
                raise item.error_type(item.message)
            state.workers[item.worker] = WorkerPosition(item.epoch, item.offset, item.skipped_shards)
            state.next_worker = (item.worker + 1) % state.logical_workers
            state.batches += 1
            yield item.batch
        if generation == self._generation:
            self._state = None  # a finite pass ended: the next iter() replays from the start

    def state_dict(self) -> dict:
        """Position after the last batch handed to the caller (prefetched batches do not count)."""
        return _copy_state(self._current()).to_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        saved = LoaderState.from_dict(state)
        _check_compatible(saved, self.dataset._blank_state(self.num_workers, self.batch_size))
        saved.batch_size = self.batch_size
        self._generation += 1
        self._state = saved


def _copy_state(state: LoaderState) -> LoaderState:
    return LoaderState.from_dict(state.to_dict())
