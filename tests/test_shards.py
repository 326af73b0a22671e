import gzip
import hashlib
import io
import json
import subprocess
import sys
import tarfile

import numpy as np
import pytest

from dnascale.data.shards import ShardConfig, build_shards, load_manifest, reverse_complement, union_length, window_starts
from dnascale.errors import ConfigError, DataError

YEAST = "dnascale/genomes/scerevisiae_r64_chrI.fna.gz"
BASES = np.array(list(b"ACGTN"))  # char layout ids 7..11 -> bases


def fasta(tmp_path, name, records):
    path = tmp_path / name
    path.write_text("".join(f">{rid}\n{seq}\n" for rid, seq in records))
    return path


def genome(path):
    with gzip.open(path, "rt") as handle:
        return "".join(line.strip() for line in handle if not line.startswith(">")).upper()


def samples(directory, split="train"):
    manifest = load_manifest(directory)
    for shard in manifest["splits"][split]["shards"]:
        with tarfile.open(directory / shard["path"]) as tar:
            members = {}
            for member in tar.getmembers():
                key, _, ext = member.name.partition(".")
                members.setdefault(key, {})[ext] = tar.extractfile(member).read()
            for key, parts in members.items():
                ids = np.load(io.BytesIO(parts["ids.npy"]), allow_pickle=False)
                yield key, ids, json.loads(parts["meta.json"])


def decode_char(ids):
    return bytes(BASES[ids.astype(np.int64) - 7].astype(np.uint8)).decode()


def test_real_genome_windows_decode_back_and_every_base_is_accounted(tmp_path, repo_root):
    out = tmp_path / "shards"
    manifest = build_shards([repo_root / YEAST], out, ShardConfig(window=1000, val_fraction=0.1), progress=False)
    assert manifest["bases_read"] == 230_218
    assert manifest["bases_read"] == manifest["bases_written"] + sum(manifest["bases_dropped"].values())
    assert manifest["sources"][0]["sha256"] == hashlib.sha256((repo_root / YEAST).read_bytes()).hexdigest()
    sequence = genome(repo_root / YEAST)
    n_train = n_val = 0
    for split in ("train", "validation"):
        for key, ids, meta in samples(out, split):
            assert "." not in key and len(ids) == 1000 and ids.dtype == np.uint8
            assert decode_char(ids) == sequence[meta["start"] : meta["end"]]
            n_train += split == "train"
            n_val += split == "validation"
    assert n_train == manifest["splits"]["train"]["samples"] and n_val == manifest["splits"]["validation"]["samples"]
    assert 0.05 < n_val / (n_train + n_val) < 0.15
    # end_aligned tail: the whole chromosome is covered, nothing dropped for lack of a window
    assert manifest["bases_dropped"].get("outside_windows", 0) == 0


def test_rebuild_is_byte_identical_and_parallel_equals_serial(tmp_path, repo_root):
    other = fasta(tmp_path, "toy.fa", [("r1", "ACGT" * 300), ("r2", "GGCCA" * 200)])
    inputs = [repo_root / YEAST, other]
    config = ShardConfig(window=256, stride=200, reverse_complement=True, shard_max_samples=300)
    build_shards(inputs, tmp_path / "a", config, progress=False)
    build_shards(inputs, tmp_path / "b", config, progress=False, workers=2)
    files_a = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files_a == sorted(p.name for p in (tmp_path / "b").iterdir())
    assert len([f for f in files_a if f.startswith("train-000")]) > 1, "shard_max_samples rolled over"
    for name in files_a:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_reverse_complement_samples_and_overlap_accounting(tmp_path):
    seq = "ACGGTCAGTTAC" * 50  # 600 bp
    path = fasta(tmp_path, "toy.fa", [("r1", seq)])
    manifest = build_shards([path], tmp_path / "out", ShardConfig(window=100, stride=50, val_fraction=0.0,
                                                                 reverse_complement=True), progress=False)
    plus = {m["start"]: ids for _, ids, m in samples(tmp_path / "out") if m["strand"] == "+"}
    minus = {m["start"]: ids for _, ids, m in samples(tmp_path / "out") if m["strand"] == "-"}
    assert sorted(plus) == sorted(minus) == list(range(0, 501, 50))
    for start, ids in minus.items():
        assert decode_char(ids) == reverse_complement(seq[start : start + 100].encode()).decode()
    assert manifest["bases_written"] == 600, "overlaps and reverse complements do not count a base twice"
    assert manifest["tokens"]["train"] == 2 * 11 * 100


def test_mostly_n_windows_and_short_segments_are_dropped_and_counted(tmp_path):
    path = fasta(tmp_path, "toy.fa", [("r1", "ACGT" * 50 + "N" * 80 + "ACGT" * 30), ("short", "ACGTACGT")])
    config = ShardConfig(window=100, val_fraction=0.0, max_n_fraction=0.5)
    manifest = build_shards([path], tmp_path / "out", config, progress=False)
    # r1 is 400 bp; the 80-N run stays (<= max_n_run) and puts windows [200,300) at 80% N -> dropped
    dropped = manifest["bases_dropped"]
    assert dropped["shorter_than_window"] == 8
    assert dropped["mostly_n"] == 100
    assert manifest["bases_read"] == 408 == manifest["bases_written"] + sum(dropped.values())


def test_record_split_holds_out_whole_records(tmp_path):
    path = fasta(tmp_path, "toy.fa", [("chrA", "ACGT" * 100), ("chrB", "TTGCA" * 80)])
    config = ShardConfig(window=50, split="record", val_records=("chrB",))
    build_shards([path], tmp_path / "out", config, progress=False)
    assert {m["record"] for _, _, m in samples(tmp_path / "out", "train")} == {"chrA"}
    assert {m["record"] for _, _, m in samples(tmp_path / "out", "validation")} == {"chrB"}


@pytest.mark.parametrize(
    "config, error, message",
    [
        (ShardConfig(stride=0), ConfigError, "stride: expected a positive"),
        (ShardConfig(window=0), ConfigError, "window: expected a positive"),
        (ShardConfig(split="record"), ConfigError, "val_records"),
        (ShardConfig(tail="pad"), ConfigError, "tail: expected one of"),
        (ShardConfig(val_fraction=1.5), ConfigError, "val_fraction"),
        (ShardConfig(window=10_000), DataError,
         r"toy\.fa: the 1 record is shorter than --window 10000 \(longest 400 bp\); lower --window to at most 400"),
    ],
)
def test_bad_configs_give_one_line_errors(tmp_path, config, error, message):
    path = fasta(tmp_path, "toy.fa", [("r1", "ACGT" * 100)])
    with pytest.raises(error, match=message) as info:
        build_shards([path], tmp_path / "out", config, progress=False)
    assert "\n" not in str(info.value)


def test_missing_input_unknown_tokenizer_and_nonempty_output(tmp_path):
    with pytest.raises(DataError, match="nope.fa: no such FASTA file"):
        build_shards([tmp_path / "nope.fa"], tmp_path / "out", progress=False)
    path = fasta(tmp_path, "toy.fa", [("r1", "ACGT" * 100)])
    with pytest.raises(ConfigError):
        build_shards([path], tmp_path / "out", ShardConfig(tokenizer="klingon"), progress=False)
    build_shards([path], tmp_path / "out", ShardConfig(window=100), progress=False)
    with pytest.raises(DataError, match="not empty"):
        build_shards([path], tmp_path / "out", ShardConfig(window=100), progress=False)
    with pytest.raises(DataError, match="no manifest.json"):
        load_manifest(tmp_path)


def test_window_arithmetic():
    assert window_starts(10, 4, 4, "drop").tolist() == [0, 4]
    assert window_starts(10, 4, 4, "end_aligned").tolist() == [0, 4, 6]
    assert window_starts(3, 4, 4, "end_aligned").tolist() == []
    assert union_length(np.array([0, 4, 6]), 4) == 10
    assert union_length(np.array([0, 10]), 4) == 8


def test_cli_prints_one_line_error_without_traceback(tmp_path, repo_root):
    path = fasta(tmp_path, "toy.fa", [("r1", "ACGT" * 100)])
    result = subprocess.run([sys.executable, str(repo_root / "tools/build_shards.py"), str(path), "--out",
                             str(tmp_path / "o"), "--stride", "0"], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["error: stride: expected a positive number of bases, got 0"]
    result = subprocess.run([sys.executable, str(repo_root / "tools/build_shards.py"), str(path), "--out",
                             str(tmp_path / "o"), "--window", "100"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "bases read 400" in result.stdout
