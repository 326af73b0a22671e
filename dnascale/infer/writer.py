"""The zarr (v3) store of an inference run: one group per record, arrays chunked along the sequence, and the
progress that lets an interrupted run resume.

    genome.zarr/                      attrs["dnascale_infer"]: the run's settings (recipe, preset, checkpoint, the
                                      weights' sha256, window, stride, dtype, what, mlm_groups, chunk_bases,
                                      dnascale version) and the record -> group table
      <record>/                       attrs: record, length, sequence_sha256, chunk_bases, chunks_total,
                                      chunks_done, complete
        embeddings     [L, hidden]    per-base states (float32, or bfloat16 stored as its uint16 bit pattern:
                                      zarr v3 has no bfloat16; `read_array` decodes; attrs["encoding"] says so)
        mlm_logp       [L]   float32  log P(reference base) with the base's unit masked, over A/C/G/T (nats)
        mlm_entropy    [L]   float32  entropy of that 4-letter distribution (nats); both NaN at non-ACGT bases
        boundary_prob  [L, stages]    DNACHUNKER boundary probability per stage (float32)

Index i of every array is base i (0-based) of the record. Chunks hold `chunk_bases` bases of every array, zstd
compressed (Blosc, byte shuffle). Progress: chunk j of a record is written in every array, then the group's
`chunks_done` becomes j + 1; zarr's local store replaces zarr.json atomically (write + rename), so after a kill
`chunks_done` never counts a chunk that is not fully written. A chunk written but not yet counted is recomputed
(identically) on resume.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dnascale.errors import DataError

SETTINGS_KEY = "dnascale_infer"
BF16_ENCODING = "bfloat16 as uint16 bits (float32 = bits << 16)"
_SAFE_NAME = re.compile(r"[A-Za-z0-9._-]")


@dataclass(frozen=True)
class StoreSettings:
    """What the stored values depend on. A rerun into the same store must agree on all of it."""

    recipe: str
    preset: str
    checkpoint: str
    weights_sha256: str
    window: int
    stride: int
    dtype: str  # "fp32" | "bf16" (embeddings)
    what: tuple[str, ...]
    mlm_groups: int
    chunk_bases: int
    dnascale_version: str

    def to_json(self) -> dict:
        return dict(asdict(self), what=list(self.what))


@dataclass(frozen=True)
class ArraySpec:
    name: str
    trailing: tuple[int, ...]  # shape after the sequence axis
    dtype: str  # zarr dtype
    fill: Any
    encoding: str | None = None


def group_key(record: str) -> str:
    """A zarr node name for a record id: characters other than A-Z a-z 0-9 . _ - are %XX-escaped."""
    key = "".join(c if _SAFE_NAME.fullmatch(c) else "".join(f"%{b:02X}" for b in c.encode()) for c in record)
    return "%2E" + key[1:] if key.startswith(".") else key  # "." / ".." / "__x" are not valid names


def sequence_digest(seq: bytes) -> str:
    return hashlib.sha256(seq).hexdigest()


def to_storage(values: torch.Tensor, dtype: str) -> np.ndarray:
    """float32 values -> what the array stores (bf16: the bfloat16 bit pattern, round to nearest even)."""
    if dtype == "bf16":
        return values.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    return values.to(torch.float32).numpy()


def read_array(group: Any, name: str, selection: Any = slice(None)) -> np.ndarray:
    """An array of a record group as float32 (decodes bfloat16 bit patterns)."""
    array = group[name]
    values = array[selection]
    if array.attrs.get("encoding") == BF16_ENCODING:
        return (values.astype(np.uint32) << 16).view(np.float32)
    return values


def _compressor():
    from zarr.codecs import BloscCodec, BloscShuffle

    return BloscCodec(cname="zstd", clevel=5, shuffle=BloscShuffle.shuffle)


def _differences(stored: dict, wanted: dict) -> list[str]:
    keys = [k for k in wanted if stored.get(k) != wanted[k]]
    return [f"{k}={stored.get(k)!r} (now {wanted[k]!r})" for k in keys]


class RecordGroup:
    def __init__(self, group: Any, specs: list[ArraySpec]):
        self.group = group
        self.specs = specs
        attrs = group.attrs
        self.record = attrs["record"]
        self.length = int(attrs["length"])
        self.chunk_bases = int(attrs["chunk_bases"])
        self.chunks_total = int(attrs["chunks_total"])
        self.chunks_done = int(attrs["chunks_done"])

    @property
    def complete(self) -> bool:
        return self.chunks_done >= self.chunks_total

    def chunk_span(self, j: int) -> tuple[int, int]:
        return j * self.chunk_bases, min((j + 1) * self.chunk_bases, self.length)

    def write_chunk(self, j: int, values: dict[str, np.ndarray]) -> None:
        """Chunk j of every array, then the progress mark (chunks must complete in order)."""
        if j != self.chunks_done:
            raise RuntimeError(f"{self.record}: chunk {j} written out of order (next is {self.chunks_done})")
        lo, hi = self.chunk_span(j)
        for spec in self.specs:
            self.group[spec.name][lo:hi] = values[spec.name]
        self.chunks_done = j + 1
        self.group.attrs.update({"chunks_done": self.chunks_done, "complete": self.complete})


class InferenceStore:
    """Creates a store, or reopens one written with the same settings (else a one-line error)."""

    def __init__(self, path: str | Path, settings: StoreSettings):
        import zarr

        self.path = Path(path)
        self.settings = settings
        wanted = settings.to_json()
        if self.path.exists() and not self.path.is_dir():
            raise DataError(f"{self.path}: exists and is not a directory (expected a zarr store or a new path)")
        if self.path.is_dir() and any(self.path.iterdir()):
            self.root = self._reopen(wanted)
        else:
            self.root = zarr.open_group(str(self.path), mode="w", zarr_format=3)
            self.root.attrs[SETTINGS_KEY] = {"settings": wanted, "records": {}}

    def _reopen(self, wanted: dict) -> Any:
        import zarr

        if not (self.path / "zarr.json").is_file():
            raise DataError(f"{self.path}: a non-empty directory that is not a zarr store; choose another --out")
        try:
            root = zarr.open_group(str(self.path), mode="r+", zarr_format=3)
            meta = dict(root.attrs).get(SETTINGS_KEY)
        except Exception as err:  # zarr raises JSON, value, key and node-type errors for a damaged store
            raise DataError(f"{self.path}: unreadable zarr store ({type(err).__name__}: {_first_line(err)}); remove "
                            "it or choose another --out") from None
        if not isinstance(meta, dict) or not isinstance(meta.get("settings"), dict):
            raise DataError(f"{self.path}: a zarr store not written by tools/infer.py (no {SETTINGS_KEY} attrs); "
                            "choose another --out")
        diff = _differences(meta["settings"], wanted)
        if diff:
            raise DataError(f"{self.path}: written with other settings: {'; '.join(diff)}; rerun with the store's "
                            "settings to resume, or choose another --out")
        return root

    def record(self, record: str, seq: bytes, specs: list[ArraySpec]) -> RecordGroup:
        """The record's group: created with its arrays, or reopened after checking it holds this sequence."""
        meta = dict(self.root.attrs[SETTINGS_KEY])
        key = group_key(record)
        digest = sequence_digest(seq)
        if record in meta["records"]:
            try:
                group = self.root[meta["records"][record]]
                attrs = dict(group.attrs)
                missing = [s.name for s in specs if s.name not in group]
            except Exception as err:
                raise DataError(f"{self.path}: record group {key!r} is unreadable ({type(err).__name__}: "
                                f"{_first_line(err)}); remove the store or choose another --out") from None
            if attrs.get("sequence_sha256") != digest or int(attrs.get("length", -1)) != len(seq):
                raise DataError(f"{self.path}: record {record!r} was written from another sequence (length "
                                f"{attrs.get('length')}, now {len(seq)}); is this the same FASTA?")
            if missing:
                raise DataError(f"{self.path}: record group {key!r} lacks arrays {missing}; the store is damaged")
            return RecordGroup(group, specs)
        chunk = self.settings.chunk_bases
        # An unlisted group is one a killed run created before listing it: it holds no counted chunk.
        group = self.root.create_group(key, overwrite=key in self.root)
        for spec in specs:
            array = group.create_array(spec.name, shape=(len(seq), *spec.trailing), chunks=(chunk, *spec.trailing),
                                       dtype=spec.dtype, fill_value=spec.fill, compressors=_compressor())
            if spec.encoding:
                array.attrs["encoding"] = spec.encoding
        group.attrs.update({
            "record": record, "length": len(seq), "sequence_sha256": digest, "chunk_bases": chunk,
            "chunks_total": -(-len(seq) // chunk), "chunks_done": 0, "complete": False,
            "coordinates": "index i = base i of the record, 0-based (1-based position i + 1)",
        })
        meta["records"] = dict(meta["records"], **{record: key})
        self.root.attrs[SETTINGS_KEY] = meta  # after the group exists: a kill in between leaves an unlisted group
        return RecordGroup(group, specs)


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return text[0][:200] if text else ""


def open_result(path: str | Path) -> tuple[Any, dict]:
    """(root group, settings) of a finished or partial store, read-only; a one-line error if it is not one."""
    import zarr

    try:
        root = zarr.open_group(str(path), mode="r", zarr_format=3)
        meta = dict(root.attrs)[SETTINGS_KEY]
    except Exception as err:
        raise DataError(f"{path}: not a readable tools/infer.py store ({type(err).__name__}: "
                        f"{_first_line(err)})") from None
    return root, json.loads(json.dumps(meta))
