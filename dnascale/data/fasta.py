"""Streaming FASTA reader with an explicit, reported cleaning policy.

`read_segments(path, policy, report)` streams a FASTA or gzipped FASTA file (gzip is detected by its magic bytes,
not the file name) record by record and yields clean `Segment`s: uppercase A C G T N (plus IUPAC codes when the
policy keeps them), with records split at long N runs. Every base read is accounted for in a `CleaningReport`:
it was either written (yielded in a segment) or dropped for a named reason, and `report.check()` proves it.

Only one record is held in memory at a time. The per-base work is done by C-level bytes operations
(`bytes.translate`, `bytes.find`, `re` on bytes) and numpy, never by a Python loop over bases.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import re
import zlib
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, BinaryIO, Iterator

import numpy as np

from dnascale.errors import ConfigError, DataError

__all__ = [
    "CleaningPolicy",
    "CleaningReport",
    "Segment",
    "read_segments",
    "fasta_record_ids",
    "open_indexed",
]

_BLOCK = 1 << 20  # read size; big enough that per-block Python overhead is negligible
_SNIFF = 8192
_BOM = b"\xef\xbb\xbf"  # UTF-8 byte-order mark, written by some Windows editors: an encoding marker, not data

_ACGTN = b"ACGTNacgtn"
_IUPAC_UPPER = b"RYWSKMBDHV"
_IUPAC = _IUPAC_UPPER + _IUPAC_UPPER.lower()
_LOWER = bytes(range(ord("a"), ord("z") + 1))
_NEWLINES = b"\r\n"
# bytes.translate(None, delete) keeps what is NOT in `delete`; these complements let it count or extract a class.
_NOT_LOWER = bytes(b for b in range(256) if b not in _LOWER)
_NOT_N = re.compile(rb"[^N]")

# Other compressions people feed us by mistake: name them instead of failing on "illegal character".
_OTHER_MAGIC = {
    b"BZh": "bzip2",
    b"\xfd7zXZ\x00": "xz",
    b"\x28\xb5\x2f\xfd": "zstd",
    b"PK\x03\x04": "zip",
}

_IUPAC_CHOICES = ("to_n", "keep", "error")
_EMPTY_CHOICES = ("error", "skip")
_DUPLICATE_CHOICES = ("error", "skip")


# ----------------------------------------------------------------------------------------------------------------
# Policy


@dataclass(frozen=True)
class CleaningPolicy:
    """How raw FASTA text becomes training sequence. Defaults are what the shard builder uses.

    uppercase:          True: `seq` is uppercase (lowercase = soft-masked repeats in most assemblies).
                        False: `seq` keeps the input's case (IUPAC codes map to 'N' or 'n' by case).
    keep_softmask:      attach to each segment a bool array, True where the input base was lowercase.
    max_n_run:          N runs longer than this split a record; their bases are dropped ("n_run"). Shorter runs stay
                        as N. None never splits.
    iupac:              "to_n" maps R Y W S K M B D H V (either case) to N; "keep" keeps them; "error" rejects them.
    min_segment_length: segments shorter than this are dropped ("short_segment").
    on_empty_record:    "error", or "skip" (counted in records_skipped["empty"]).
    on_duplicate_id:    "error", or "skip" the later record (records_skipped["duplicate_id"], bases dropped as
                        "duplicate_record").
    """

    uppercase: bool = True
    keep_softmask: bool = False
    max_n_run: int | None = 100
    iupac: str = "to_n"
    min_segment_length: int = 1
    on_empty_record: str = "error"
    on_duplicate_id: str = "error"

    def __post_init__(self) -> None:
        for name in ("uppercase", "keep_softmask"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise ConfigError(f"CleaningPolicy.{name}: {value!r} is not allowed; expected True or False")
        if self.max_n_run is not None and not _is_int(self.max_n_run, minimum=0):
            raise ConfigError(
                f"CleaningPolicy.max_n_run: {self.max_n_run!r} is not allowed; expected an integer >= 0 or None"
            )
        if not _is_int(self.min_segment_length, minimum=1):
            raise ConfigError(
                f"CleaningPolicy.min_segment_length: {self.min_segment_length!r} is not allowed; "
                "expected an integer >= 1"
            )
        _check_choice("iupac", self.iupac, _IUPAC_CHOICES)
        _check_choice("on_empty_record", self.on_empty_record, _EMPTY_CHOICES)
        _check_choice("on_duplicate_id", self.on_duplicate_id, _DUPLICATE_CHOICES)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> CleaningPolicy:
        """Build from a config mapping, naming any unknown key (a typo must not silently fall back to a default)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(
                f"CleaningPolicy: unknown field(s) {', '.join(unknown)}; expected some of {', '.join(sorted(known))}"
            )
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _is_int(value: Any, minimum: int) -> bool:
    # bool is an int subclass; max_n_run=True is a config mistake, not 1.
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        choices = ", ".join(repr(a) for a in allowed)
        raise ConfigError(f"CleaningPolicy.{name}: {value!r} is not allowed; expected one of {choices}")


@lru_cache(maxsize=16)
def _translation_table(uppercase: bool, iupac: str) -> bytes:
    table = bytearray(range(256))
    if uppercase:
        for b in _LOWER:
            table[b] = b - 32
    if iupac == "to_n":
        for b in _IUPAC_UPPER:
            table[b] = ord("N")
        for b in _IUPAC_UPPER.lower():
            table[b] = ord("N") if uppercase else ord("n")
    return bytes(table)


# ----------------------------------------------------------------------------------------------------------------
# Report


@dataclass
class CleaningReport:
    """Where every base went. Invariant: bases_read == bases_written + sum(bases_dropped.values()).

    bases_written counts bases handed downstream; a later stage that cannot use some of them calls
    `drop(reason, n)`, which moves them from written to dropped so the invariant keeps holding.
    iupac_to_n and softmasked_bases count over the bases read from records that were cleaned (not skipped).
    A record is booked in full before its first segment is yielded.
    """

    bases_read: int = 0
    bases_written: int = 0
    bases_dropped: dict[str, int] = field(default_factory=dict)
    records: int = 0  # records seen, skipped ones included
    records_skipped: dict[str, int] = field(default_factory=dict)
    records_all_n: int = 0  # cleaned records with no base but N (IUPAC codes mapped to N count as N)
    segments: int = 0
    iupac_to_n: int = 0
    softmasked_bases: int = 0
    files: int = 0

    def drop(self, reason: str, n: int) -> None:
        """Move `n` already-written bases to bases_dropped[reason]."""
        if not _is_int(n, minimum=0) or n > self.bases_written:
            raise ValueError(
                f"CleaningReport.drop({reason!r}, {n!r}): need 0 <= n <= bases_written ({self.bases_written:,})"
            )
        self.bases_written -= n
        self.bases_dropped[reason] = self.bases_dropped.get(reason, 0) + n

    def _drop_unwritten(self, reason: str, n: int) -> None:
        # Bases that were read but never reached bases_written (the reader's own drops).
        self.bases_dropped[reason] = self.bases_dropped.get(reason, 0) + n

    def _skip_record(self, reason: str) -> None:
        self.records_skipped[reason] = self.records_skipped.get(reason, 0) + 1

    def merge(self, other: CleaningReport) -> CleaningReport:
        """Add `other` into this report (e.g. one report per input file into a total) and return self."""
        for name in (
            "bases_read", "bases_written", "records", "records_all_n", "segments", "iupac_to_n", "softmasked_bases",
            "files",
        ):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for mine, theirs in ((self.bases_dropped, other.bases_dropped), (self.records_skipped, other.records_skipped)):
            for key, value in theirs.items():
                mine[key] = mine.get(key, 0) + value
        return self

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["bases_dropped"] = dict(sorted(self.bases_dropped.items()))
        out["records_skipped"] = dict(sorted(self.records_skipped.items()))
        return out

    def check(self) -> None:
        """Raise RuntimeError unless every base read is written or dropped. A failure is a bookkeeping bug."""
        dropped = sum(self.bases_dropped.values())
        negative = {k: v for k, v in self.to_dict().items() if isinstance(v, int) and v < 0}
        negative.update({f"bases_dropped[{k}]": v for k, v in self.bases_dropped.items() if v < 0})
        if negative or self.bases_read != self.bases_written + dropped:
            raise RuntimeError(
                f"cleaning report does not add up: bases_read {self.bases_read:,} != bases_written "
                f"{self.bases_written:,} + bases_dropped {dropped:,} {dict(sorted(self.bases_dropped.items()))}"
                + (f"; negative counts {negative}" if negative else "")
            )

    def summary(self) -> str:
        read = self.bases_read
        dropped = sum(self.bases_dropped.values())
        skipped = sum(self.records_skipped.values())
        lines = [
            f"files {self.files:,}; records {self.records:,} ({skipped:,} skipped{_breakdown(self.records_skipped)}); "
            f"segments {self.segments:,}",
            f"bases read {read:,}; written {self.bases_written:,} ({_percent(self.bases_written, read)}); "
            f"dropped {dropped:,} ({_percent(dropped, read)}){_breakdown(self.bases_dropped)}",
            f"IUPAC codes mapped to N {self.iupac_to_n:,}; soft-masked (lowercase) bases {self.softmasked_bases:,} "
            f"({_percent(self.softmasked_bases, read)})",
        ]
        return "\n".join(lines)


def _percent(part: int, whole: int) -> str:
    return f"{100.0 * part / whole:.2f}%" if whole else "n/a"


def _breakdown(counts: dict[str, int]) -> str:
    if not counts:
        return ""
    return ": " + ", ".join(f"{k} {v:,}" for k, v in sorted(counts.items()))


# ----------------------------------------------------------------------------------------------------------------
# Segments


@dataclass(eq=False)
class Segment:
    """A clean stretch of one record: `seq` starts at 0-based offset `start` of record `record` in file `source`."""

    source: str
    record: str
    description: str
    start: int
    seq: bytes
    softmask: np.ndarray | None = None  # bool, True where the input base was lowercase; only with keep_softmask

    def __len__(self) -> int:
        return len(self.seq)

    @property
    def end(self) -> int:
        return self.start + len(self.seq)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Segment):
            return NotImplemented
        same_mask = (self.softmask is None and other.softmask is None) or (
            self.softmask is not None and other.softmask is not None and np.array_equal(self.softmask, other.softmask)
        )
        return (self.source, self.record, self.description, self.start, self.seq) == (
            other.source,
            other.record,
            other.description,
            other.start,
            other.seq,
        ) and same_mask


def read_segments(
    path: str | os.PathLike[str],
    policy: CleaningPolicy = CleaningPolicy(),
    report: CleaningReport | None = None,
) -> Iterator[Segment]:
    """Stream the clean segments of a FASTA or gzipped FASTA file, booking every base in `report`.

    Raises DataError (one line naming the file, and the record and 1-based position where it applies) for
    malformed input. Segments before the first error have already been yielded by then.
    """
    if not isinstance(policy, CleaningPolicy):
        raise ConfigError(f"read_segments: policy must be a CleaningPolicy, got {type(policy).__name__}")
    report = report if report is not None else CleaningReport()
    source = os.fspath(path)
    seen: dict[str, int] = {}  # record id -> header line, to name both places on a duplicate
    with _open(source) as fh:
        report.files += 1
        for record in _scan(fh, source, keep_sequence=True):
            yield from _clean_record(record, policy, report, seen, source)


def fasta_record_ids(path: str | os.PathLike[str]) -> list[str]:
    """Record ids in file order (first word of each header). Reads (and decompresses) the whole file."""
    source = os.fspath(path)
    with _open(source) as fh:
        return [record.name for record in _scan(fh, source, keep_sequence=False)]


def open_indexed(path: str | os.PathLike[str]) -> Any:
    """Random access to a plain-text FASTA via pyfaidx (writes PATH.fai next to it). Returns a `pyfaidx.Fasta`
    whose slices are raw strings (case kept, no cleaning). Streaming with read_segments needs no index."""
    import pyfaidx

    source = os.fspath(path)
    with _open(source) as fh:
        if isinstance(fh, gzip.GzipFile):
            raise DataError(f"{source}: open_indexed needs an uncompressed FASTA; gunzip it or use read_segments")
    try:
        return pyfaidx.Fasta(source, as_raw=True, sequence_always_upper=False)
    except (pyfaidx.FastaIndexingError, ValueError, OSError) as err:
        detail = " ".join(str(err).split())
        raise DataError(f"{source}: cannot index FASTA with pyfaidx: {detail}") from None


# ----------------------------------------------------------------------------------------------------------------
# Reading: file -> raw records


@dataclass
class _RawRecord:
    name: str
    description: str
    line: int  # 1-based line of the header
    chunks: list[bytes]  # sequence text as read, line endings removed


def _open(source: str) -> BinaryIO:
    try:
        with open(source, "rb") as probe:
            head = probe.read(_SNIFF)
    except FileNotFoundError:
        raise DataError(f"{source}: no such file") from None
    except IsADirectoryError:
        raise DataError(f"{source}: is a directory, expected a FASTA file") from None
    except PermissionError:
        raise DataError(f"{source}: permission denied") from None
    except OSError as err:
        raise DataError(f"{source}: cannot read ({err.strerror or err})") from None
    if head[:2] == b"\x1f\x8b":
        return gzip.open(source, "rb")  # type: ignore[return-value]
    for magic, kind in _OTHER_MAGIC.items():
        if head.startswith(magic):
            raise DataError(f"{source}: {kind}-compressed; only plain or gzip-compressed FASTA is supported")
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):  # a byte-order mark: what Windows "Unicode" saves
        raise DataError(f"{source}: UTF-16 text; save the file as UTF-8 or ASCII")
    if b"\x00" in head:
        raise DataError(
            f"{source}: binary data (NUL bytes), neither FASTA text nor gzip (first bytes {head[:8].hex()})"
        )
    return open(source, "rb")


def _read_block(fh: BinaryIO, source: str) -> bytes:
    try:
        return fh.read(_BLOCK)
    except EOFError:
        raise DataError(f"{source}: truncated gzip stream (file ends before the gzip end-of-stream marker)") from None
    except (gzip.BadGzipFile, zlib.error) as err:
        raise DataError(f"{source}: corrupt gzip stream ({err})") from None


def _scan(fh: BinaryIO, source: str, keep_sequence: bool) -> Iterator[_RawRecord]:
    """Split the byte stream into records. Works on 1 MiB blocks rather than lines: a header is a '>' at the
    start of a line, found with bytes.find(b"\\n>"), so sequence text is never touched line by line here."""
    carry = b""  # an unfinished header line waiting for the next block
    at_line_start = True
    line = 1  # line number of data[pos]
    total = 0
    current: _RawRecord | None = None
    first = True
    while True:
        block = _read_block(fh, source)
        if first and block.startswith(_BOM):
            block = block[len(_BOM) :]
        first = False
        total += len(block)
        eof = not block
        data = carry + block if carry else block
        carry = b""
        pos, size = 0, len(data)
        while pos < size:
            if at_line_start and data[pos] == 0x3E:  # '>'
                newline = data.find(b"\n", pos)
                if newline < 0 and not eof:
                    carry = data[pos:]
                    break
                end = size if newline < 0 else newline + 1
                name, description = _parse_header(data[pos + 1 : end], source, line)
                if current is not None:
                    yield current
                current = _RawRecord(name, description, line, [])
                line += 1
                pos = end
                continue
            next_header = data.find(b"\n>", pos)
            end = size if next_header < 0 else next_header + 1
            chunk = data[pos:end]
            if current is None:
                _check_preamble(chunk, source, line)
            elif keep_sequence:
                # Dropping line endings per block, not per record, saves holding the record twice at join time.
                current.chunks.append(chunk.translate(None, _NEWLINES))
            line += chunk.count(b"\n")
            at_line_start = chunk.endswith(b"\n")
            pos = end
        if eof:
            break
    if current is not None:
        yield current
    elif total == 0:
        raise DataError(f"{source}: empty file (no FASTA records)")
    else:
        raise DataError(f"{source}: no FASTA records (only blank lines)")


def _parse_header(raw: bytes, source: str, line: int) -> tuple[str, str]:
    if b"\r" in raw.rstrip(b"\r\n"):
        # Classic-Mac (CR-only) line endings turn the whole file into one header line; say so instead of
        # reporting a record with no sequence.
        raise DataError(
            f"{source}: line {line:,}: carriage return inside the header line (CR-only line endings?); "
            "convert the file to \\n or \\r\\n line endings"
        )
    try:
        text = raw.decode("utf-8").strip()
    except UnicodeDecodeError as err:
        # Record ids end up in every sample's meta.json; guessing an encoding could silently rename records.
        raise DataError(
            f"{source}: line {line:,}: header is not UTF-8 text (byte 0x{raw[err.start]:02X} at column "
            f"{err.start + 2}); re-encode the file as UTF-8, e.g. iconv -f cp1252 -t utf-8"
        ) from None
    if not text:
        raise DataError(f"{source}: line {line:,}: empty header ('>' with no record id)")
    parts = text.split(None, 1)
    return parts[0], (parts[1].strip() if len(parts) > 1 else "")


def _check_preamble(chunk: bytes, source: str, line: int) -> None:
    """Text before the first header may only be blank lines."""
    body = chunk.lstrip()
    if not body:
        return
    if b"\x00" in body[:_SNIFF]:
        raise DataError(f"{source}: binary data, not FASTA text")
    first = line + chunk.count(b"\n", 0, len(chunk) - len(body))
    raise DataError(
        f"{source}: line {first:,}: sequence data before the first '>' header (a FASTA file starts with a '>' line)"
    )


# ----------------------------------------------------------------------------------------------------------------
# Cleaning: raw record -> segments


def _clean_record(
    record: _RawRecord, policy: CleaningPolicy, report: CleaningReport, seen: dict[str, int], source: str
) -> Iterator[Segment]:
    report.records += 1
    if record.name in seen:
        _duplicate(record, policy, report, seen[record.name], source)
        return
    seen[record.name] = record.line

    text = b"".join(record.chunks)  # the record as in the file, case and IUPAC codes included
    record.chunks.clear()  # the scanner still references the list; free the pieces now that they are joined
    rest = text.translate(None, _ACGTN)  # everything but A C G T N: usually tiny
    iupac_count = 0
    if rest:
        illegal = rest.translate(None, _IUPAC)
        iupac_count = len(rest) - len(illegal)
        if illegal or (policy.iupac == "error" and iupac_count):
            raise _illegal_character(text, policy, record, source)
    if not text:
        _empty(record, policy, report, source)
        return
    if policy.keep_softmask:
        mask = np.frombuffer(text, dtype=np.uint8) >= ord("a")  # every byte is a letter by now
        lowercase = int(np.count_nonzero(mask))
    else:
        mask = None
        lowercase = len(text.translate(None, _NOT_LOWER))
    seq = text.translate(_translation_table(policy.uppercase, policy.iupac))
    del text

    pieces = _book_record(seq, policy, report)
    report.iupac_to_n += iupac_count if policy.iupac == "to_n" else 0
    report.softmasked_bases += lowercase
    for start, end in pieces:
        softmask = mask[start:end].copy() if mask is not None else None  # copy: don't pin the record-wide mask
        yield Segment(source, record.name, record.description, start, seq[start:end], softmask)


def _book_record(seq: bytes, policy: CleaningPolicy, report: CleaningReport) -> list[tuple[int, int]]:
    """Cut `seq` at long N runs, book read/written/dropped bases, and return the kept (start, end) pieces."""
    upper = seq if policy.uppercase else seq.upper()
    runs = _long_n_runs(upper, policy.max_n_run)
    pieces, previous = [], 0
    for start, end in runs:
        if start > previous:
            pieces.append((previous, start))
        previous = end
    if previous < len(seq):
        pieces.append((previous, len(seq)))
    kept = [(a, b) for a, b in pieces if b - a >= policy.min_segment_length]

    report.bases_read += len(seq)
    if _NOT_N.search(upper) is None:  # stops at the first non-N: O(1) for ordinary records
        report.records_all_n += 1
    n_run = sum(b - a for a, b in runs)
    short = sum(b - a for a, b in pieces) - sum(b - a for a, b in kept)
    if n_run:
        report._drop_unwritten("n_run", n_run)
    if short:
        report._drop_unwritten("short_segment", short)
    report.bases_written += sum(b - a for a, b in kept)
    report.segments += len(kept)
    return kept


def _long_n_runs(seq: bytes, max_n_run: int | None) -> list[tuple[int, int]]:
    """(start, end) of every run of more than max_n_run N's in an uppercase sequence."""
    if max_n_run is None:
        return []
    probe = b"N" * (max_n_run + 1)
    runs = []
    # The leftmost match of max_n_run+1 N's is the start of a long run; the run ends at the next non-N.
    start = seq.find(probe)
    while start >= 0:
        other = _NOT_N.search(seq, start + len(probe))
        end = other.start() if other else len(seq)
        runs.append((start, end))
        start = seq.find(probe, end)
    return runs


def _duplicate(record: _RawRecord, policy: CleaningPolicy, report: CleaningReport, first: int, source: str) -> None:
    if policy.on_duplicate_id == "error":
        raise DataError(
            f"{source}: line {record.line:,}: duplicate record id '{record.name}' (first seen on line {first:,}); "
            "rename it, or skip later duplicates with --on-duplicate-id skip (CleaningPolicy.on_duplicate_id='skip')"
        )
    bases = sum(len(c) for c in record.chunks)
    record.chunks.clear()
    report.bases_read += bases
    report._drop_unwritten("duplicate_record", bases)
    report._skip_record("duplicate_id")


def _empty(record: _RawRecord, policy: CleaningPolicy, report: CleaningReport, source: str) -> None:
    if policy.on_empty_record == "error":
        raise DataError(
            f"{source}: line {record.line:,}: record '{record.name}' has no sequence; "
            "remove it, or skip such records with --on-empty-record skip (CleaningPolicy.on_empty_record='skip')"
        )
    report._skip_record("empty")


# Why a character that is not a base is there, for the few cases with a usual cause.
_ILLEGAL_HINTS = {
    ord("-"): "; '-' and '.' are alignment gaps: ungap the sequences first",
    ord("."): "; '-' and '.' are alignment gaps: ungap the sequences first",
    ord("*"): "; '*' is a protein stop: is this a protein FASTA?",
    ord(" "): "; spaces and tabs are not allowed inside sequence lines",
    ord("\t"): "; spaces and tabs are not allowed inside sequence lines",
    ord(">"): "; a header '>' must start its own line",
}
_ILLEGAL_HINTS.update({b: "; digits in sequence lines (GenBank/EMBL layout?) are not FASTA" for b in b"0123456789"})


def _illegal_character(seq: bytes, policy: CleaningPolicy, record: _RawRecord, source: str) -> DataError:
    """Locate the first offending byte. Only runs on the error path, so it may take its time."""
    allowed = _ACGTN if policy.iupac == "error" else _ACGTN + _IUPAC
    found = re.search(b"[^" + re.escape(allowed) + b"]", seq)
    assert found is not None, "caller saw an illegal byte that the search cannot find"
    position, byte = found.start() + 1, seq[found.start()]
    line = _line_of_position(source, record.line, position)
    where = f"{source}: " + (f"line {line:,}: " if line else "") + f"record '{record.name}' position {position:,}"
    if byte in _IUPAC:
        return DataError(
            f"{where}: IUPAC code '{chr(byte)}' not allowed by CleaningPolicy.iupac='error' (use 'to_n' or 'keep')"
        )
    shown = f"'{chr(byte)}'" if 0x20 <= byte < 0x7F else f"byte 0x{byte:02X}"
    return DataError(
        f"{where}: illegal character {shown} (expected A C G T N, IUPAC codes or lowercase)"
        + _ILLEGAL_HINTS.get(byte, "")
    )


def _line_of_position(source: str, header_line: int, position: int) -> int | None:
    """The 1-based file line holding base `position` of the record whose header is on `header_line`, found by
    reading the file again (error path only). None if the file cannot be re-read the same way."""
    try:
        with _open(source) as fh:
            for number, raw in enumerate(fh, start=1):
                if number <= header_line:
                    continue
                length = len(raw.translate(None, _NEWLINES))  # the scanner drops every CR and LF, so do the same
                if position <= length:
                    return number
                position -= length
    except (DataError, OSError, EOFError, zlib.error):
        return None
    return None
