"""The bad-input contract of tools/build_shards.py, case by case through its real command line.

Legal but awkward FASTA must build shards whose windows decode back to the sequence we expect (written by hand
here, never computed by dnascale), with `bases_read == bases_written + sum(bases_dropped)` in the manifest.
Bad FASTA must exit 2 with one `error: ...` line that names the file (and the line/record where one applies) and
the flag that would accept it, never a traceback. Most cases call the CLI's `main` in-process under `run_cli`
(SystemExit + captured stdout/stderr, no interpreter start-up); a few run it as a subprocess to prove the real
exit path, where leftovers such as unclosed tar streams would print after the error.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import importlib.util
import io
import json
import lzma
import pathlib
import subprocess
import sys
import tarfile
from dataclasses import dataclass

import numpy as np
import pytest

from dnascale.errors import run_cli

REPO = pathlib.Path(__file__).resolve().parents[1]
CLI = REPO / "tools" / "build_shards.py"
BASES = np.frombuffer(b"ACGTN", dtype=np.uint8)  # nucleotide tokenizer: ids 7..11 are A C G T N
DIRECTORY, MISSING = object(), object()  # file contents standing for "make a directory" / "create nothing"


def _load_cli():
    spec = importlib.util.spec_from_file_location("build_shards_cli", CLI)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build_shards_cli = _load_cli()


@dataclass
class Run:
    code: int
    stdout: str
    stderr: str
    out: pathlib.Path

    @property
    def manifest(self) -> dict:
        return json.loads((self.out / "manifest.json").read_text())


def make_inputs(tmp_path: pathlib.Path, files: dict) -> list[pathlib.Path]:
    paths = []
    for name, content in files.items():
        path = tmp_path / name
        if content is DIRECTORY:
            path.mkdir()
        elif content is not MISSING:
            path.write_bytes(content)
        paths.append(path)
    return paths


def build(tmp_path: pathlib.Path, files: dict, *args: str, inputs: list | None = None) -> Run:
    """`build_shards.py FILES --out OUT ARGS` in this process, as run_cli would end it (`inputs`: the paths to
    pass instead of the files just made)."""
    made = make_inputs(tmp_path, files)
    inputs = made if inputs is None else inputs
    out = tmp_path / "out"
    stdout, stderr = io.StringIO(), io.StringIO()
    code = None
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            run_cli(lambda: build_shards_cli.main([*map(str, inputs), "--out", str(out), *args]))
        except SystemExit as exit_:
            code = exit_.code
    return Run(code, stdout.getvalue(), stderr.getvalue(), out)


def build_subprocess(tmp_path: pathlib.Path, files: dict, *args: str) -> Run:
    inputs = make_inputs(tmp_path, files)
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, str(CLI), *map(str, inputs), "--out", str(out), *args],
        capture_output=True, text=True, timeout=120,
    )
    return Run(result.returncode, result.stdout, result.stderr, out)


def assert_one_line_error(run: Run, path: pathlib.Path | str, *fragments: str) -> str:
    assert run.code == 2, (run.code, run.stderr)
    assert "Traceback" not in run.stderr and "Exception ignored" not in run.stderr, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, f"not one line: {run.stderr!r}"
    message = lines[0]
    assert message.startswith(f"error: {path}: "), message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    assert not list(run.out.glob("*.tar")), "a failed build left shards behind"
    assert not (run.out / "manifest.json").exists()
    return message


def decoded_windows(out: pathlib.Path, manifest: dict) -> list[tuple[str, int, str]]:
    """(record, start, bases) of every '+' window in every shard, decoded with the plain id -> base table."""
    windows = []
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            with tarfile.open(out / shard["path"]) as tar:
                members: dict[str, dict[str, bytes]] = {}
                for member in tar.getmembers():
                    key, _, ext = member.name.partition(".")
                    members.setdefault(key, {})[ext] = tar.extractfile(member).read()
            for parts in members.values():
                meta = json.loads(parts["meta.json"])
                ids = np.load(io.BytesIO(parts["ids.npy"]), allow_pickle=False).astype(np.int64)
                if meta["strand"] == "+":
                    windows.append((meta["record"], meta["start"], bytes(BASES[ids - 7]).decode()))
    return windows


def assert_built(run: Run, expected: dict[str, str], window: int) -> dict:
    """Exit 0; every base accounted for; the windows decode to `expected`: record id -> cleaned sequence, with
    '-' where the cleaner must drop bases (long N runs). With stride = window and end-aligned tails, the written
    bases are exactly the stretches between '-' that are at least one window long, and windows cover them."""
    assert run.code == 0, run.stderr
    assert "Traceback" not in run.stderr
    manifest = run.manifest
    assert manifest["bases_read"] == manifest["bases_written"] + sum(manifest["bases_dropped"].values())
    assert manifest["splits"]["train"]["shards"], "no train shard"
    for shard in manifest["splits"]["train"]["shards"]:
        assert (run.out / shard["path"]).is_file()

    # '?' marks a base no window may cover
    expected_written = 0
    coverage = {record: bytearray(b"?" * len(seq)) for record, seq in expected.items()}
    for record, seq in expected.items():
        position = 0
        for stretch in seq.split("-"):
            if len(stretch) >= window:
                expected_written += len(stretch)
                coverage[record][position : position + len(stretch)] = stretch.encode()
            position += len(stretch) + 1
    assert manifest["bases_written"] == expected_written
    assert manifest["bases_read"] == sum(len(seq) for seq in expected.values())

    seen = {record: bytearray(b"?" * len(seq)) for record, seq in expected.items()}
    for record, start, bases in decoded_windows(run.out, manifest):
        assert len(bases) == window and record in expected, (record, start)
        seen[record][start : start + window] = bases.encode()
    assert seen == coverage
    return manifest


def gz(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)


# ---------------------------------------------------------------------------------------------------------------
# legal inputs: they build, and the shards hold exactly the expected bases


def tiny_records() -> tuple[bytes, dict[str, str]]:
    """10,000 records of 10-50 bp."""
    text, expected = [], {}
    for i in range(10_000):
        length = 10 + (i * 7) % 41
        seq = ("ACGTTGCA" * 7)[i % 8 : i % 8 + length]
        text.append(f">r{i} tiny\n{seq}\n")
        expected[f"r{i}"] = seq
    return "".join(text).encode(), expected


TINY_TEXT, TINY_EXPECTED = tiny_records()
LONG_LINE = "ACGGT" * 200_000  # a single 1 Mbp line


LEGAL = [
    # id, {file name: bytes}, window, extra args, {record: expected cleaned sequence}
    ("crlf", {"genome.fa": b">a x\r\nACGT\r\nGGCC\r\n>b\r\nTTTTAAAA\r\n"}, 4, (),
     {"a": "ACGTGGCC", "b": "TTTTAAAA"}),
    ("lowercase-softmask", {"genome.fa": b">a\nacgtac\ngtacgt\n"}, 4, (), {"a": "ACGTACGTACGT"}),
    ("mixed-case", {"genome.fa": b">a\nAcGtnNaC\n"}, 4, (), {"a": "ACGTNNAC"}),
    ("iupac-to-n", {"genome.fa": b">a\nACGTRYAC\nkmGT\n"}, 4, (), {"a": "ACGTNNACNNGT"}),
    ("blank-lines-between-and-inside", {"genome.fa": b">a\nACGT\n\nACGT\n\n\n>b\n\nGGGG\n\n"}, 4, (),
     {"a": "ACGTACGT", "b": "GGGG"}),
    ("leading-blank-lines", {"genome.fa": b"\n\r\n\n>a\nACGTACGT\n"}, 4, (), {"a": "ACGTACGT"}),
    ("no-trailing-newline", {"genome.fa": b">a\nACGT\nACG"}, 4, (), {"a": "ACGTACG"}),
    ("utf8-header", {"genome.fa": ">chrÄ Ärabidopsis – ß\nACGTACGT\n".encode()}, 4, (), {"chrÄ": "ACGTACGT"}),
    ("header-without-description", {"genome.fa": b">a\nACGT\n>b \nCCCC\n"}, 4, (), {"a": "ACGT", "b": "CCCC"}),
    ("utf8-bom", {"genome.fa": b"\xef\xbb\xbf>a\nACGTACGT\n"}, 4, (), {"a": "ACGTACGT"}),
    ("one-1mbp-line", {"genome.fa": b">a\n" + LONG_LINE.encode() + b"\n"}, 1000, (), {"a": LONG_LINE}),
    # window 40: three in four tiny records are shorter (dropped, counted), and the shard writes stay few
    ("10k-tiny-records", {"genome.fa": TINY_TEXT}, 40, (), TINY_EXPECTED),
    ("long-n-run-splits-record", {"genome.fa": b">a\nACGTACGT" + b"N" * 150 + b"GGCCGGCC\n"}, 4, (),
     {"a": "ACGTACGT" + "-" * 150 + "GGCCGGCC"}),
    # gzip members concatenated (bgzip/cat a.gz b.gz): one record even spans the member boundary
    ("concatenated-gzip-members", {"genome.fna.gz": gz(b">a\nACGT") + gz(b"ACGT\n>b\nGGGGCCCC\n")}, 4, (),
     {"a": "ACGTACGT", "b": "GGGGCCCC"}),
    ("gzip-without-gz-suffix", {"genome.fa": gz(b">a\nACGTACGT\n")}, 4, (), {"a": "ACGTACGT"}),
    ("plain-text-named-gz", {"genome.fa.gz": b">a\nACGTACGT\n"}, 4, (), {"a": "ACGTACGT"}),
    ("fasta-suffix", {"genome.fasta": b">a\nACGTACGT\n"}, 4, (), {"a": "ACGTACGT"}),
    ("empty-record-skipped", {"genome.fa": b">a\n>b\nACGTACGT\n>c\n"}, 4, ("--on-empty-record", "skip"),
     {"a": "", "b": "ACGTACGT", "c": ""}),
]


@pytest.mark.parametrize("files, window, args, expected", [c[1:] for c in LEGAL], ids=[c[0] for c in LEGAL])
def test_legal_input_builds_the_expected_bases(tmp_path, files, window, args, expected):
    run = build(tmp_path, files, "--window", str(window), "--val-fraction", "0", *args)
    manifest = assert_built(run, expected, window)
    (name,) = files
    assert manifest["sources"][0]["file"] == name and manifest["sources"][0]["species"] == "genome"
    assert manifest["sources"][0]["nothing_written"] is None


def test_skips_and_iupac_are_counted_not_silent(tmp_path):
    # The skipped record and its bases show up in the manifest and the CLI summary; IUPAC codes are counted.
    files = {"genome.fa": b">a\nACGT\n>a\nGGGGGG\n>e\n>b\nACRYACGT\n"}
    run = build(tmp_path, files, "--window", "4", "--val-fraction", "0", "--on-empty-record", "skip",
                "--on-duplicate-id", "skip")
    assert run.code == 0, run.stderr
    manifest = run.manifest
    assert sorted(decoded_windows(run.out, manifest)) == [("a", 0, "ACGT"), ("b", 0, "ACNN"), ("b", 4, "ACGT")]
    assert manifest["cleaning"]["records_skipped"] == {"duplicate_id": 1, "empty": 1}
    assert manifest["bases_dropped"] == {"duplicate_record": 6}
    assert (manifest["bases_read"], manifest["bases_written"]) == (18, 12)
    assert manifest["cleaning"]["iupac_to_n"] == 2
    assert manifest["sources"][0]["records"] == 4
    assert 'records skipped {"duplicate_id": 1, "empty": 1}' in run.stdout


# ---------------------------------------------------------------------------------------------------------------
# nothing to write: the error names the file, the record count, the cause and the flag that would accept it


NOTHING = [
    ("all-records-entirely-n", {"genome.fa": b">a\n" + b"N" * 3000 + b"\n>b\n" + b"n" * 2000 + b"\n"},
     ("--window", "100"),
     ["all 2 records are entirely N (5,000 bases dropped)", "nothing to write", "--max-n-fraction", "check the file"]),
    # 50-N records survive cleaning (runs <= --max-n-run) and die as mostly-N windows: still "entirely N"
    ("short-n-records", {"genome.fa": b">a\n" + b"N" * 50 + b"\n>b\nRYKMN\n"}, ("--window", "5"),
     ["all 2 records are entirely N (55 bases dropped)"]),
    ("all-records-shorter-than-window", {"genome.fa": b">a\n" + b"A" * 812 + b"\n>b\nACGT\n>c\n" + b"C" * 500 + b"\n"},
     ("--window", "1024"),
     ["all 3 records are shorter than --window 1024 (longest 812 bp); lower --window to at most 812"]),
    ("one-short-record", {"genome.fa": b">a\nACGTAC\n"}, ("--window", "8"),
     ["the 1 record is shorter than --window 8 (longest 6 bp); lower --window to at most 6"]),
    ("short-after-n-split", {"genome.fa": b">a\n" + b"A" * 40 + b"N" * 200 + b"C" * 30 + b"\n"}, ("--window", "64"),
     ["every segment is shorter than --window 64 (longest 40 bp)", "runs of more than 100 N (200 N dropped)",
      "lower --window to at most 40 or raise --max-n-run"]),
    ("windows-mostly-n", {"genome.fa": b">a\n" + b"ANNN" * 40 + b"\n"}, ("--window", "64"),
     ["every window of its 1 record is more than 0.5 N (--max-n-fraction 0.5); raise --max-n-fraction"]),
    ("only-empty-records-skipped", {"genome.fa": b">a\n>b\n\n"}, ("--on-empty-record", "skip"),
     ["all 2 records are skipped (empty 2); nothing to write"]),
]


@pytest.mark.parametrize("files, args, fragments", [c[1:] for c in NOTHING], ids=[c[0] for c in NOTHING])
def test_nothing_to_write_is_a_one_line_error(tmp_path, files, args, fragments):
    run = build(tmp_path, files, *args)
    (name,) = files
    assert_one_line_error(run, tmp_path / name, *fragments)


def test_a_file_that_contributes_nothing_among_others_is_reported_not_fatal(tmp_path):
    files = {"good.fa": b">a\nACGTACGTACGT\n", "gaps.fa": b">n\n" + b"N" * 500 + b"\n", "tiny.fa": b">t\nACG\n"}
    run = build(tmp_path, files, "--window", "4", "--val-fraction", "0")
    assert run.code == 0, run.stderr
    manifest = run.manifest
    by_file = {s["file"]: s for s in manifest["sources"]}
    assert by_file["good.fa"]["nothing_written"] is None and by_file["good.fa"]["bases_written"] == 12
    assert by_file["gaps.fa"]["nothing_written"].startswith("the 1 record is entirely N (500 bases dropped)")
    assert by_file["gaps.fa"]["bases_dropped"] == {"n_run": 500}
    assert by_file["tiny.fa"]["nothing_written"].startswith("the 1 record is shorter than --window 4 (longest 3 bp)")
    assert by_file["tiny.fa"]["bases_dropped"] == {"shorter_than_window": 3}
    for source in by_file.values():  # per-file accounting adds up too
        assert source["bases_read"] == source["bases_written"] + sum(source["bases_dropped"].values())
    assert (manifest["bases_read"], manifest["bases_written"]) == (515, 12)
    assert "note: gaps.fa contributed no window: the 1 record is entirely N" in run.stdout
    assert "note: tiny.fa contributed no window" in run.stdout
    assert "tiny.fa: 1 record, bases read 3 written 0, 0 windows" in run.stdout


def test_every_file_contributing_nothing_names_each(tmp_path):
    files = {"gaps.fa": b">n\n" + b"N" * 500 + b"\n", "tiny.fa": b">t\nACG\n>u\nAC\n"}
    run = build(tmp_path, files, "--window", "4")
    assert run.code == 2 and "Traceback" not in run.stderr
    (message,) = run.stderr.strip().splitlines()
    assert message.startswith("error: no window written from any of the 2 inputs: ")
    assert f"{tmp_path / 'gaps.fa'}: the 1 record is entirely N" in message
    assert f"{tmp_path / 'tiny.fa'}: all 2 records are shorter than --window 4 (longest 3 bp)" in message


# ---------------------------------------------------------------------------------------------------------------
# malformed inputs: one line naming the file, and the line/record where it applies


def truncated_gzip() -> bytes:
    whole = gz(b">a\n" + b"ACGT" * 50_000 + b"\n")
    return whole[: len(whole) // 2]


MALFORMED = [
    # id, file name, content, extra args, fragments of the message after "error: PATH: "
    ("empty-file", "genome.fa", b"", (), ["empty file (no FASTA records)"]),
    ("blank-lines-only", "genome.fa", b"\n\r\n\n", (), ["no FASTA records (only blank lines)"]),
    ("only-headers", "genome.fa", b">a\n>b\n", (),
     ["line 1: record 'a' has no sequence", "--on-empty-record skip"]),
    ("empty-record", "genome.fa", b">a\nACGT\n>b\n\n>c\nACGT\n", (),
     ["line 3: record 'b' has no sequence", "--on-empty-record skip"]),
    ("empty-header", "genome.fa", b">a\nACGT\n>\nACGT\n", (), ["line 3: empty header"]),
    ("duplicate-id", "genome.fa", b">a\nACGT\n>b\nACGT\n>a x\nGG\n", (),
     ["line 5: duplicate record id 'a' (first seen on line 1)", "--on-duplicate-id skip"]),
    ("windows-1252-header", "genome.fa", b">chr1 caf\xe9\nACGT\n", (),
     ["line 1: header is not UTF-8 text (byte 0xE9 at column 10)", "iconv"]),
    ("utf16-file", "genome.fa", ">a\nACGT\n".encode("utf-16"), (), ["UTF-16 text; save the file as UTF-8"]),
    ("cr-only-line-endings", "genome.fa", b">a\rACGT\rACGT\r", (), ["line 1: carriage return inside the header"]),
    ("sequence-before-header", "genome.fa", b"\nACGT\n>a\nACGT\n", (), ["line 2: sequence data before the first"]),
    ("tab-in-sequence", "genome.fa", b">a\nACGT\nAC\tGT\n", (),
     ["line 3: record 'a' position 7: illegal character byte 0x09", "spaces and tabs are not allowed"]),
    ("trailing-space", "genome.fa", b">a\nACGT \nACGT\n", (),
     ["line 2: record 'a' position 5: illegal character ' '", "spaces and tabs"]),
    ("digits-in-sequence", "genome.fa", b">a\nACGT\n>b\nACGTACGT\n61 ACGT\n", (),
     ["line 5: record 'b' position 9: illegal character '6'", "digits in sequence lines"]),
    ("stop-star", "genome.fa", b">a\nACGT*\n", (), ["line 2: record 'a' position 5: illegal character '*'", "protein"]),
    ("gap-dash", "genome.fa", b">a\nAC--GT\n", (), ["line 2: record 'a' position 3: illegal character '-'", "gaps"]),
    ("gt-inside-sequence-line", "genome.fa", b">a\nACGT>b\nACGT\n", (),
     ["line 2: record 'a' position 5: illegal character '>'", "must start its own line"]),
    ("rna-u", "genome.fa", b">a\nACGU\n", (), ["line 2: record 'a' position 4: illegal character 'U'"]),
    ("illegal-in-gzip-crlf", "genome.fa.gz", gz(b">a\r\nACGT\r\nACGT\r\nAC!T\r\n"), (),
     ["line 4: record 'a' position 11: illegal character '!'"]),
    ("iupac-error-policy", "genome.fa", b">a\nACGT\nACGy\n", ("--iupac", "error"),
     ["line 3: record 'a' position 8: IUPAC code 'y' not allowed"]),
    ("truncated-gzip", "genome.fa.gz", truncated_gzip(), (), ["truncated gzip stream"]),
    ("bzip2", "genome.fa.bz2", bz2.compress(b">a\nACGT\n"), (), ["bzip2-compressed; only plain or gzip"]),
    ("xz", "genome.fa.xz", lzma.compress(b">a\nACGT\n"), (), ["xz-compressed; only plain or gzip"]),
    ("directory", "genomes", DIRECTORY, (), ["is a directory, expected a FASTA file"]),
    ("missing-file", "nope.fa", MISSING, (), ["no such FASTA file"]),
]


@pytest.mark.parametrize("name, content, args, fragments", [c[1:] for c in MALFORMED], ids=[c[0] for c in MALFORMED])
def test_malformed_input_is_a_one_line_error(tmp_path, name, content, args, fragments):
    run = build(tmp_path, {name: content}, "--window", "4", *args)
    assert_one_line_error(run, tmp_path / name, *fragments)


def test_error_in_a_later_file_leaves_no_partial_shards(tmp_path):
    files = {"good.fa": b">a\n" + b"ACGT" * 100 + b"\n", "bad.fa": b">a\nACGT\n>b\nAC GT\n"}
    run = build(tmp_path, files, "--window", "4")
    assert_one_line_error(run, tmp_path / "bad.fa", "line 4: record 'b' position 3")
    # the fixed rerun needs no --overwrite: the failed build left no shards behind
    inputs = [tmp_path / "good.fa", tmp_path / "bad.fa"]
    rerun = build(tmp_path, {"bad.fa": b">a\nACGT\n"}, "--window", "4", inputs=inputs)
    assert rerun.code == 0, rerun.stderr
    assert [s["file"] for s in rerun.manifest["sources"]] == ["good.fa", "bad.fa"]


def test_same_file_twice_names_it(tmp_path):
    path = make_inputs(tmp_path, {"genome.fa": b">a\nACGT\n"})[0]
    run = build(tmp_path, {}, "--window", "4", inputs=[path, tmp_path / "." / "genome.fa"])
    assert_one_line_error(run, path, "the same FASTA file is listed twice")


# ---------------------------------------------------------------------------------------------------------------
# the real command line (interpreter exit included)


def test_cli_subprocess_error_after_windows_were_written(tmp_path):
    # Record 'a' writes windows before the duplicate is seen: the tar writer must be closed and its shard removed,
    # or the interpreter prints "Exception ignored ... Traceback" after the error line at exit.
    run = build_subprocess(tmp_path, {"genome.fa": b">a\nACGTACGT\n>a\nACGT\n"}, "--window", "4")
    assert_one_line_error(run, tmp_path / "genome.fa", "line 3: duplicate record id 'a'")


def test_cli_subprocess_all_n(tmp_path):
    # stderr is a pipe here: no progress bar may precede the error line (tests/test_shards.py runs a legal build)
    run = build_subprocess(tmp_path, {"gaps.fa": b">a\n" + b"N" * 300 + b"\n>b\n" + b"N" * 200 + b"\n"})
    assert_one_line_error(run, tmp_path / "gaps.fa", "all 2 records are entirely N (500 bases dropped)")
