"""Tests for dnascale.data.fasta: cleaning on real A. thaliana data against a slow oracle, malformed inputs,
line-width/CRLF/gzip independence, block-boundary independence of the scanner, policy validation, the report."""

from __future__ import annotations

import gzip
import json
import pathlib

import numpy as np
import pytest

from dnascale.data import fasta
from dnascale.data.fasta import (
    CleaningPolicy,
    CleaningReport,
    Segment,
    fasta_record_ids,
    open_indexed,
    read_segments,
)
from dnascale.errors import ConfigError, DataError

SLICE = pathlib.Path(__file__).resolve().parent / "data" / "athaliana_chr1_slice.fa.gz"
IUPAC = set("RYWSKMBDHVrywskmbdhv")


# ---------------------------------------------------------------------------------------------------------------
# helpers


def write(tmp_path: pathlib.Path, text: str | bytes, name: str = "genome.fa", gz: bool = False) -> pathlib.Path:
    data = text.encode() if isinstance(text, str) else text
    path = tmp_path / name
    path.write_bytes(gzip.compress(data, mtime=0) if gz else data)
    return path


def segments(path, policy: CleaningPolicy = CleaningPolicy(), report: CleaningReport | None = None) -> list[Segment]:
    return list(read_segments(path, policy, report))


def comparable(segs: list[Segment]) -> list[tuple]:
    """Everything but the source path, which differs between files holding the same sequence."""
    return [
        (s.record, s.description, s.start, s.seq, None if s.softmask is None else s.softmask.tobytes()) for s in segs
    ]


def raw_records(path: pathlib.Path) -> list[tuple[str, str, str]]:
    """(id, description, sequence text with original case) parsed the obvious, whole-file way."""
    records = []
    for line in gzip.open(path, "rt").read().splitlines():
        if line.startswith(">"):
            name, _, description = line[1:].partition(" ")
            records.append([name, description, []])
        elif line:
            records[-1][2].append(line)
    return [(name, description, "".join(lines)) for name, description, lines in records]


def oracle(records, max_n_run: int = 100, min_len: int = 1, iupac: str = "to_n"):
    """Slow twin of read_segments: a plain Python loop over bases. Returns ([(id, start, seq, mask)], n_run_dropped)."""
    out, n_run_dropped = [], 0
    for name, _, text in records:
        clean, mask = [], []
        for ch in text:
            mask.append(ch.islower())
            up = ch.upper()
            clean.append("N" if (iupac == "to_n" and up in IUPAC) else up)
        cut_points = []  # (run start, run end) of N runs longer than max_n_run
        i = 0
        while i < len(clean):
            if clean[i] == "N":
                j = i
                while j < len(clean) and clean[j] == "N":
                    j += 1
                if j - i > max_n_run:
                    cut_points.append((i, j))
                    n_run_dropped += j - i
                i = j
            else:
                i += 1
        previous = 0
        for a, b in cut_points + [(len(clean), len(clean))]:
            if a - previous >= min_len:
                out.append((name, previous, "".join(clean[previous:a]).encode(), mask[previous:a]))
            previous = b
    return out, n_run_dropped


def wrap(records, width: int, newline: str = "\n", blank_lines: bool = False) -> str:
    parts = []
    for name, description, text in records:
        parts.append(f">{name} {description}{newline}")
        step = width or len(text)
        parts.extend(text[i : i + step] + newline for i in range(0, len(text), step))
        if blank_lines:
            parts.append(newline * 2)
    return "".join(parts)


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message, f"message is not one line: {message!r}"
    return message


@pytest.fixture(scope="module")
def slice_records():
    return raw_records(SLICE)


# ---------------------------------------------------------------------------------------------------------------
# real data: A. thaliana slice


def test_fixture_has_what_it_claims(slice_records):
    text = "".join(t for _, _, t in slice_records)
    assert len(text) == 440_000 and len(slice_records) == 3
    assert sum(c.islower() for c in text) > 100_000
    assert sum(c in IUPAC for c in text) == 396
    assert "N" * 1000 in text and "N" * 101 not in slice_records[1][2]


def test_real_slice_matches_slow_oracle(slice_records):
    report = CleaningReport()
    segs = segments(SLICE, CleaningPolicy(keep_softmask=True), report)
    expected, n_run_dropped = oracle(slice_records)
    assert [(s.record, s.start, s.seq) for s in segs] == [(r, a, seq) for r, a, seq, _ in expected]
    for seg, (_, _, _, mask) in zip(segs, expected):
        assert seg.softmask.dtype == np.bool_ and seg.softmask.tolist() == mask
        assert set(seg.seq) <= set(b"ACGTN")
    assert [s.description for s in segs][0] == "Arabidopsis thaliana chromosome 1 (TAIR10), slice"
    assert all(s.source == str(SLICE) for s in segs)
    report.check()
    text = "".join(t for _, _, t in slice_records)
    assert report.bases_read == 440_000
    assert report.bases_dropped == {"n_run": n_run_dropped} == {"n_run": 28_000}
    assert report.bases_written == sum(len(s) for s in segs) == 412_000
    assert report.iupac_to_n == 396
    assert report.softmasked_bases == sum(c.islower() for c in text)
    assert (report.records, report.segments, report.files) == (3, 5, 1)


def test_n_run_split_positions_on_real_data(slice_records):
    segs = segments(SLICE)
    # record 1: 1,000 N at offset 36,045 splits it; record 2: exactly 100 N stays; record 3: 27,000 N at 6,721.
    assert [(s.record.split(":")[1], s.start, s.end) for s in segs] == [
        ("15050001-15400000", 0, 36_045),
        ("15050001-15400000", 37_045, 350_000),
        ("13180001-13230000", 0, 50_000),
        ("14505001-14545000", 0, 6_721),
        ("14505001-14545000", 33_721, 40_000),
    ]
    assert segs[2].seq[21_252:21_352] == b"N" * 100
    # One base lower threshold: the 100-N run of record 2 now splits it, and the oracle agrees.
    report = CleaningReport()
    tighter = segments(SLICE, CleaningPolicy(max_n_run=99), report)
    expected, dropped = oracle(slice_records, max_n_run=99)
    assert [(s.record, s.start, s.seq) for s in tighter] == [(r, a, seq) for r, a, seq, _ in expected]
    assert report.bases_dropped["n_run"] == dropped
    report.check()


def test_iupac_policies_on_real_data(slice_records):
    first = slice_records[0][2]
    position = next(i for i, c in enumerate(first) if c in IUPAC)
    kept = segments(SLICE, CleaningPolicy(iupac="keep"))
    expected, _ = oracle(slice_records, iupac="keep")
    assert [s.seq for s in kept] == [seq for _, _, seq, _ in expected]
    assert sum(sum(s.seq.count(c.encode()) for c in "RYWSKM") for s in kept) == 396
    with pytest.raises(DataError) as err:
        segments(SLICE, CleaningPolicy(iupac="error"))
    message = one_line(err)
    assert str(SLICE) in message and "NC_003070.9:15050001-15400000" in message
    assert f"position {position + 1:,}" in message and f"'{first[position]}'" in message


def test_streams_before_a_later_error(tmp_path):
    # The first record comes out before the reader reaches the bad second record: nothing is read ahead.
    path = write(tmp_path, ">a\nACGT\n>b\nAC*T\n")
    stream = read_segments(path)
    assert next(stream).seq == b"ACGT"
    with pytest.raises(DataError, match=r"record 'b' position 3: illegal character '\*'"):
        next(stream)


# ---------------------------------------------------------------------------------------------------------------
# format independence


@pytest.mark.parametrize("width", [60, 80, 1, 0])
def test_line_width_crlf_and_gzip_do_not_change_segments(tmp_path, slice_records, width):
    reference = comparable(segments(SLICE, CleaningPolicy(keep_softmask=True)))
    policy = CleaningPolicy(keep_softmask=True)
    small = width == 1  # one base per line is slow to build as text; the 50 kb record 2 is enough there
    records = slice_records[1:2] if small else slice_records
    expected = [r for r in reference if r[0] == records[0][0]] if small else reference
    for newline in ("\n", "\r\n"):
        text = wrap(records, width, newline, blank_lines=(newline == "\r\n"))
        for gz in (False, True):
            path = write(tmp_path, text, name=f"w{width}{len(newline)}{gz}.fa", gz=gz)
            assert comparable(segments(path, policy)) == expected, (width, repr(newline), gz)


def test_no_trailing_newline_and_blank_lines(tmp_path):
    base = segments(write(tmp_path, ">a x\nACGT\nAC\n>b\nGG\n", "one.fa"))
    other = segments(write(tmp_path, "\n\n>a x\r\nACGT\r\n\r\nAC\r\n\n\n>b\nGG", "two.fa"))
    assert comparable(base) == comparable(other)
    assert [(s.record, s.description, s.seq) for s in base] == [("a", "x", b"ACGTAC"), ("b", "", b"GG")]


@pytest.mark.parametrize("block", [1, 2, 3, 5, 7, 64])
def test_block_boundaries_do_not_change_records(tmp_path, monkeypatch, block):
    text = "\n>r1 first one\r\nACGTNNNNacgt\r\n\r\n>r2\nAC\nGT\n\n>r3  spaced  desc \nnnnnnAAAA\nCC"
    path = write(tmp_path, text)
    policy = CleaningPolicy(max_n_run=3, keep_softmask=True)
    expected = comparable(segments(path, policy))
    monkeypatch.setattr(fasta, "_BLOCK", block)
    assert comparable(segments(path, policy)) == expected
    assert [s.record for s in segments(path, policy)] == ["r1", "r1", "r2", "r3"]


def test_block_boundaries_on_real_data(monkeypatch):
    expected = comparable(segments(SLICE, CleaningPolicy(keep_softmask=True)))
    monkeypatch.setattr(fasta, "_BLOCK", 4099)  # ~100 blocks, so headers and N runs straddle boundaries
    assert comparable(segments(SLICE, CleaningPolicy(keep_softmask=True))) == expected


# ---------------------------------------------------------------------------------------------------------------
# cleaning policy semantics on small inputs


def test_softmask_iupac_and_case(tmp_path):
    path = write(tmp_path, ">s\nACgtRyNnAC\n")
    report = CleaningReport()
    (seg,) = segments(path, CleaningPolicy(keep_softmask=True), report)
    assert seg.seq == b"ACGTNNNNAC"
    assert seg.softmask.tolist() == [False, False, True, True, False, True, False, True, False, False]
    assert (report.iupac_to_n, report.softmasked_bases) == (2, 4)  # g t y n
    (kept,) = segments(path, CleaningPolicy(iupac="keep"))
    assert kept.seq == b"ACGTRYNNAC" and kept.softmask is None
    (cased,) = segments(path, CleaningPolicy(uppercase=False))
    assert cased.seq == b"ACgtNnNnAC"


def test_lowercase_n_runs_split_when_case_is_kept(tmp_path):
    path = write(tmp_path, ">s\nACnnnnNNGT\n")
    segs = segments(path, CleaningPolicy(uppercase=False, max_n_run=3))
    assert [(s.start, s.seq) for s in segs] == [(0, b"AC"), (8, b"GT")]


def test_n_runs_at_edges_and_threshold(tmp_path):
    path = write(tmp_path, ">s\nNNNNACGTNNNTTNNNN\n")
    report = CleaningReport()
    segs = segments(path, CleaningPolicy(max_n_run=3), report)
    assert [(s.start, s.seq) for s in segs] == [(4, b"ACGTNNNTT")]  # 3 N in the middle stay (<= threshold)
    assert report.bases_dropped == {"n_run": 8}
    report.check()
    (whole,) = segments(path, CleaningPolicy(max_n_run=None))
    assert len(whole) == 17


def test_min_segment_length_drops_and_counts(tmp_path):
    path = write(tmp_path, ">s\nAC" + "N" * 5 + "ACGTACGT\n>t\nA\n")
    report = CleaningReport()
    segs = segments(path, CleaningPolicy(max_n_run=2, min_segment_length=3), report)
    assert [(s.record, s.start, s.seq) for s in segs] == [("s", 7, b"ACGTACGT")]
    assert report.bases_dropped == {"n_run": 5, "short_segment": 3}
    assert report.segments == 1
    report.check()


def test_record_made_only_of_n_is_dropped_and_counted(tmp_path):
    path = write(tmp_path, ">gap\n" + "N" * 150 + "\n>ok\nACGT\n")
    report = CleaningReport()
    segs = segments(path, CleaningPolicy(), report)
    assert [s.record for s in segs] == ["ok"]
    assert report.bases_dropped == {"n_run": 150} and report.records == 2
    report.check()


def test_empty_record_skip_policy(tmp_path):
    path = write(tmp_path, ">a\n>b\nACGT\n>c\n\n")
    report = CleaningReport()
    segs = segments(path, CleaningPolicy(on_empty_record="skip"), report)
    assert [s.record for s in segs] == ["b"]
    assert report.records_skipped == {"empty": 2} and report.records == 3
    report.check()


def test_duplicate_id_skip_policy(tmp_path):
    path = write(tmp_path, ">a\nACGT\n>b\nGG\n>a other\nTTTTT\nTT\n")
    report = CleaningReport()
    segs = segments(path, CleaningPolicy(on_duplicate_id="skip"), report)
    assert [(s.record, s.seq) for s in segs] == [("a", b"ACGT"), ("b", b"GG")]
    assert report.bases_dropped == {"duplicate_record": 7}
    assert report.records_skipped == {"duplicate_id": 1}
    assert report.bases_read == 13
    report.check()


# ---------------------------------------------------------------------------------------------------------------
# malformed inputs: each a one-line DataError naming the file (and record/position where they apply)


@pytest.mark.parametrize(
    "content, fragment",
    [
        (b"", "empty file"),
        (b"\n\n\r\n", "only blank lines"),
        (b"ACGT\nACGT\n", "line 1: sequence data before the first '>' header"),
        (b"\n\nACGT\n>chr1\nACGT\n", "line 3: sequence data before the first '>' header"),
        (b">chr1\n", "line 1: record 'chr1' has no sequence"),
        (b">chr1 only a header", "line 1: record 'chr1' has no sequence"),
        (b">a\nACGT\n>b\n\n>c\nAC\n", "line 3: record 'b' has no sequence"),
        (b">\nACGT\n", "line 1: empty header"),
        (b">a\nAC\n>   \r\nACGT\n", "line 3: empty header"),
        (b">a\nACGT\n>b\nAC\n>a\nGG\n", "line 5: duplicate record id 'a' (first seen on line 1)"),
        (b">\xff\xfe\nACGT\n", "line 1: header is not UTF-8"),
        (b"\x00\x01\x02garbage\xff" * 10, "binary data"),
        (b"BZh91AY&SY" + bytes(range(40)), "bzip2-compressed"),
    ],
    ids=[
        "empty-file",
        "blank-lines-only",
        "no-header",
        "sequence-before-header",
        "header-only",
        "header-only-no-newline",
        "empty-record",
        "empty-header",
        "blank-header",
        "duplicate-id",
        "non-utf8-header",
        "binary-garbage",
        "bzip2",
    ],
)
def test_malformed_file_errors(tmp_path, content, fragment):
    path = write(tmp_path, content, name="genome.fa")
    with pytest.raises(DataError) as err:
        segments(path)
    message = one_line(err)
    assert message.startswith(f"{path}: ") and fragment in message


@pytest.mark.parametrize(
    "sequence, position, shown",
    [
        ("ACGT*ACGT", 5, "'*'"),
        ("ACGT-ACGT", 5, "'-'"),
        ("ACGT.", 5, "'.'"),
        ("A1CGT", 2, "'1'"),
        ("ACXGT", 3, "'X'"),
        ("ACUGT", 3, "'U'"),
        ("ACG>T", 4, "'>'"),
        ("AC GT", 3, "' '"),
        ("ACG\tT", 4, "byte 0x09"),
        ("ACGé", 4, "byte 0xC3"),
    ],
)
def test_illegal_character_names_file_record_position(tmp_path, sequence, position, shown):
    path = write(tmp_path, f">ok\nACGT\n>chr2 desc\n{sequence}\n")
    with pytest.raises(DataError) as err:
        segments(path)
    message = one_line(err)
    # line 4: the sequence line of chr2; a hint may follow for characters with a usual cause ('*', '-', ...)
    assert message.startswith(
        f"{path}: line 4: record 'chr2' position {position}: illegal character {shown} "
        "(expected A C G T N, IUPAC codes or lowercase)"
    )


def test_illegal_character_position_counts_across_lines(tmp_path):
    body = "\n".join(["ACGTACGTAC"] * 150) + "\n"  # 1,500 bases at 10 per line
    body = body[:1_234 + 1_234 // 10 - 1] + "*" + body[1_234 + 1_234 // 10 :]  # replace base 1,234
    path = write(tmp_path, ">chr2\r\n" + body.replace("\n", "\r\n"), gz=True, name="genome.fa.gz")
    # base 1,234 at 10 bases a line is on sequence line 124, file line 125
    with pytest.raises(DataError, match=r"genome\.fa\.gz: line 125: record 'chr2' position 1,234: illegal char"):
        segments(path)


def test_truncated_and_corrupt_gzip(tmp_path):
    good = gzip.compress(wrap([("a", "", "ACGT" * 50_000)], 60).encode(), mtime=0)
    truncated = write(tmp_path, good[: len(good) // 2], name="cut.fa.gz")
    with pytest.raises(DataError) as err:
        segments(truncated)
    assert one_line(err).startswith(f"{truncated}: truncated gzip stream")
    corrupt = bytearray(good)
    corrupt[-8] ^= 0xFF  # CRC32 in the gzip trailer
    bad = write(tmp_path, bytes(corrupt), name="crc.fa.gz")
    with pytest.raises(DataError) as err:
        segments(bad)
    assert one_line(err).startswith(f"{bad}: corrupt gzip stream")


def test_gzip_is_detected_by_magic_not_name(tmp_path):
    text = ">a\nACGT\n"
    plain_named_gz = write(tmp_path, text, name="plain.fa.gz")
    gz_named_plain = write(tmp_path, text, name="packed.fa", gz=True)
    assert comparable(segments(plain_named_gz)) == comparable(segments(gz_named_plain))


def test_gzipped_garbage_names_binary(tmp_path):
    path = write(tmp_path, b"\x00\x01binary\x00" * 20, gz=True, name="junk.fa.gz")
    with pytest.raises(DataError) as err:
        segments(path)
    assert one_line(err) == f"{path}: binary data, not FASTA text"


def test_missing_path_and_directory(tmp_path):
    missing = tmp_path / "nope.fa"
    with pytest.raises(DataError) as err:
        segments(missing)
    assert one_line(err) == f"{missing}: no such file"
    with pytest.raises(DataError) as err:
        segments(tmp_path)
    assert one_line(err) == f"{tmp_path}: is a directory, expected a FASTA file"


def test_iupac_error_policy_names_the_code(tmp_path):
    path = write(tmp_path, ">x\nACGTACGTAcgtr\n")
    with pytest.raises(DataError) as err:
        segments(path, CleaningPolicy(iupac="error"))
    assert one_line(err) == (
        f"{path}: line 2: record 'x' position 13: IUPAC code 'r' not allowed by CleaningPolicy.iupac='error' "
        "(use 'to_n' or 'keep')"
    )


# ---------------------------------------------------------------------------------------------------------------
# policy validation


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"iupac": "drop"}, "CleaningPolicy.iupac: 'drop' is not allowed; expected one of 'to_n', 'keep', 'error'"),
        ({"on_empty_record": "warn"}, "CleaningPolicy.on_empty_record: 'warn' is not allowed; expected one of"),
        ({"on_duplicate_id": "rename"}, "CleaningPolicy.on_duplicate_id: 'rename'"),
        ({"max_n_run": -1}, "CleaningPolicy.max_n_run: -1 is not allowed; expected an integer >= 0 or None"),
        ({"max_n_run": True}, "CleaningPolicy.max_n_run: True"),
        ({"max_n_run": 1.5}, "CleaningPolicy.max_n_run: 1.5"),
        ({"min_segment_length": 0}, "CleaningPolicy.min_segment_length: 0 is not allowed; expected an integer >= 1"),
        ({"uppercase": "yes"}, "CleaningPolicy.uppercase: 'yes' is not allowed; expected True or False"),
        ({"keep_softmask": 1}, "CleaningPolicy.keep_softmask: 1"),
    ],
)
def test_policy_validation(kwargs, fragment):
    with pytest.raises(ConfigError) as err:
        CleaningPolicy(**kwargs)
    assert fragment in one_line(err)


def test_policy_from_dict_and_frozen():
    policy = CleaningPolicy.from_dict({"max_n_run": 50, "iupac": "keep"})
    assert policy == CleaningPolicy(max_n_run=50, iupac="keep")
    assert CleaningPolicy.from_dict(policy.to_dict()) == policy
    with pytest.raises(ConfigError, match="unknown field.*max_nrun"):
        CleaningPolicy.from_dict({"max_nrun": 5})
    with pytest.raises(AttributeError):
        policy.iupac = "to_n"  # type: ignore[misc]
    assert CleaningPolicy.max_n_run == 100  # class-level default, used by tools/build_shards.py


# ---------------------------------------------------------------------------------------------------------------
# report


def test_report_drop_merge_check_and_serialise(tmp_path):
    report = CleaningReport()
    segments(write(tmp_path, ">a\nAC" + "N" * 120 + "GTacgt\n", "a.fa"), CleaningPolicy(), report)
    assert (report.bases_read, report.bases_written, report.bases_dropped) == (128, 8, {"n_run": 120})
    report.drop("shorter_than_window", 6)
    report.drop("mostly_n", 0)
    assert report.bases_written == 2 and report.bases_dropped["shorter_than_window"] == 6
    report.check()
    with pytest.raises(ValueError, match="bases_written"):
        report.drop("outside_windows", 3)

    other = CleaningReport()
    segments(write(tmp_path, ">b\nACGT\n>c\n\n", "b.fa"), CleaningPolicy(on_empty_record="skip"), other)
    total = CleaningReport().merge(report).merge(other)
    assert (total.files, total.records, total.bases_read, total.bases_written) == (2, 3, 132, 6)
    assert total.records_skipped == {"empty": 1} and total.softmasked_bases == 4
    total.check()
    as_dict = json.loads(json.dumps(total.to_dict()))
    assert as_dict["bases_dropped"] == {"mostly_n": 0, "n_run": 120, "shorter_than_window": 6}
    summary = total.summary()
    assert len(summary.splitlines()) == 3 and "bases read 132" in summary and "n_run 120" in summary

    total.bases_written += 1
    with pytest.raises(RuntimeError, match="does not add up"):
        total.check()


def test_empty_report_summary():
    report = CleaningReport()
    report.check()
    assert "n/a" in report.summary()


# ---------------------------------------------------------------------------------------------------------------
# helpers around the reader


def test_fasta_record_ids(tmp_path):
    assert fasta_record_ids(SLICE) == [
        "NC_003070.9:15050001-15400000",
        "NC_003070.9:13180001-13230000",
        "NC_003070.9:14505001-14545000",
    ]
    with pytest.raises(DataError, match="no such file"):
        fasta_record_ids(tmp_path / "missing.fa")


def test_open_indexed(tmp_path):
    path = write(tmp_path, ">a desc\nACGTacgt\nNNAC\n>b\nGG\n")
    index = open_indexed(path)
    assert str(index["a"][2:10]) == "GTacgtNN" and len(index["b"]) == 2
    index.close()
    with pytest.raises(DataError, match="needs an uncompressed FASTA"):
        open_indexed(SLICE)
    with pytest.raises(DataError) as err:
        open_indexed(write(tmp_path, ">a\nAC\n>a\nGG\n", "dup.fa"))
    assert one_line(err).startswith(f"{tmp_path / 'dup.fa'}: cannot index FASTA with pyfaidx")
