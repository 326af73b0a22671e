"""Tokenizers: id tables, round trips, HF parity, save/load, deterministic BPE training, the training CLI."""

from __future__ import annotations

import gzip
import importlib.util
import itertools
import json
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything below loads from local directories only

from dnascale.data.tokenizers import (  # noqa: E402
    CONFIG_FILE,
    BPETokenizer,
    NucleotideTokenizer,
    Tokenizer,
    load_tokenizer,
)
from dnascale.errors import ConfigError, DataError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
YEAST = REPO / "dnascale" / "genomes" / "scerevisiae_r64_chrI.fna.gz"
BPE_VOCAB = 512


def read_fasta_text(path: Path) -> str:
    """The raw sequence of a one-record FASTA, case kept (chrI starts with soft-masked lowercase)."""
    with gzip.open(path, "rt") as fh:
        return "".join(line.strip() for line in fh if not line.startswith(">"))


@pytest.fixture(scope="module")
def yeast() -> str:
    return read_fasta_text(YEAST)


@pytest.fixture(scope="module")
def bpe(yeast: str) -> BPETokenizer:
    return BPETokenizer.train([yeast], vocab_size=BPE_VOCAB, seed=0)


@pytest.fixture(scope="module")
def bpe4096(yeast: str) -> BPETokenizer:
    """The default vocabulary size (chrI is enough for it), for parity checks at the size the CLI writes."""
    return BPETokenizer.train([yeast], vocab_size=4096, seed=0)


@pytest.fixture(scope="module")
def hf_of():
    cache: dict[str, object] = {}

    def get(tok: Tokenizer):
        if tok.name not in cache:
            cache[tok.name] = tok.to_hf()
        return cache[tok.name]

    return get


def random_dna(rng: random.Random, n: int, alphabet: str = "ACGTNacgtn") -> str:
    return "".join(rng.choice(alphabet) for _ in range(n))


def parity_inputs(yeast: str) -> list[str]:
    """Real genome windows (soft-masked start included), random DNA with N and lowercase, repeats, odd characters."""
    rng = random.Random(7)
    texts = [yeast[:5000], yeast[100_000:103_000], yeast[-2000:]]
    texts += [random_dna(rng, rng.randint(1, 400)) for _ in range(200)]
    texts += [random_dna(rng, 50, "ACGTRYKM -\nxé") for _ in range(20)]
    units = ["A", "AC", "AT", "AAT", "TTAGGG", "CA", "GAA", "N"]
    for _ in range(200):
        unit = rng.choice(units) if rng.random() < 0.5 else random_dna(rng, rng.randint(1, 7), "ACGT")
        texts.append(random_dna(rng, rng.randint(0, 4), "ACGT") + unit * rng.randint(1, 60))
    return texts


TOKENIZERS = ["char", "byte", "bpe", "bpe4096"]


@pytest.fixture
def any_tok(request) -> Tokenizer:
    """Indirect parametrisation over TOKENIZERS."""
    if request.param in ("char", "byte"):
        return NucleotideTokenizer(request.param)
    return request.getfixturevalue(request.param)


# ---- id tables -----------------------------------------------------------------------------------------------


def test_char_layout_matches_caduceus_table():
    tok = NucleotideTokenizer("char")
    assert tok.name == "nucleotide-char" and tok.vocab_size == 16 and tok.one_token_per_base
    assert tok.encode("ACGTN").tolist() == [7, 8, 9, 10, 11]
    assert tok.encode("acgtn").tolist() == [7, 8, 9, 10, 11]
    assert tok.encode(b"RX-").tolist() == [6, 6, 6]
    assert (tok.cls_id, tok.sep_id, tok.mask_id, tok.pad_id, tok.unk_id) == (0, 1, 3, 4, 6)
    assert tok.special_ids == frozenset(range(7))
    assert tok.content_ids.tolist() == [7, 8, 9, 10, 11]
    assert tok.encode("ACGT").dtype == np.uint8
    assert tok.add_special(tok.encode("AC")).tolist() == [7, 8, 1]  # Caduceus: x [SEP], no [CLS]


def test_byte_layout_matches_byt5_table():
    tok = NucleotideTokenizer("byte")
    assert tok.name == "nucleotide-byte" and tok.vocab_size == 384
    assert tok.encode("ACGTN").tolist() == [68, 70, 74, 87, 81]
    assert tok.encode("acgtn").tolist() == [68, 70, 74, 87, 81]
    assert tok.encode("R").tolist() == [2]
    assert (tok.pad_id, tok.sep_id, tok.unk_id, tok.mask_id, tok.cls_id) == (0, 1, 2, 383, 259)
    assert tok.special_ids == frozenset({0, 1, 2, 259, 383})
    assert tok.encode("A").dtype == np.uint16
    assert tok.add_special(tok.encode("AC")).tolist() == [68, 70, 1]  # T5: x </s>
    assert tok.decode([300]) == "<extra_id_83>"


def test_bpe_layout(bpe: BPETokenizer):
    assert bpe.vocab_size == BPE_VOCAB
    assert bpe.name.startswith(f"bpe-{BPE_VOCAB}-") and len(bpe.name.split("-")[-1]) == 8
    assert (bpe.unk_id, bpe.cls_id, bpe.sep_id, bpe.pad_id, bpe.mask_id) == (0, 1, 2, 3, 4)
    assert bpe.special_ids == frozenset(range(5))
    assert bpe.tokens[5] == "N" and bpe.encode("NNN").tolist() == [5, 5, 5]  # atomic, though chrI has no N
    assert not any("N" in piece for i, piece in bpe.tokens.items() if i > 5)
    assert bpe.encode("ACGT").dtype == np.uint16
    ids = bpe.encode("ACGTACGT")
    assert bpe.add_special(ids).tolist() == [1, *ids.tolist(), 2]


def test_nucleotide_rejects_unknown_layout():
    with pytest.raises(ConfigError, match="layout 'kmer'"):
        NucleotideTokenizer("kmer")


# ---- round trips ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["char", "byte"])
def test_nucleotide_round_trip(layout: str, yeast: str):
    tok = NucleotideTokenizer(layout)
    text = yeast[:20_000]
    assert tok.decode(tok.encode(text)) == text.upper()
    assert tok.decode(tok.encode(text.encode())) == text.upper()
    assert tok.decode(tok.add_special(tok.encode("ACGTN")), skip_special=True) == "ACGTN"
    assert tok.encode("").size == 0 and tok.decode([]) == ""
    with pytest.raises(DataError, match="token ids"):
        tok.decode([tok.vocab_size])


def test_count_unknown():
    tok = NucleotideTokenizer("char")
    assert tok.count_unknown("ACGTNacgtn") == 0
    assert tok.count_unknown(b"ACRYGT-") == 3
    assert tok.count_unknown("Aé") == 1  # one non-ASCII character, one [UNK]


def test_bpe_round_trip(bpe: BPETokenizer, yeast: str):
    text = yeast[50_000:60_000]
    ids = bpe.encode(text)
    assert bpe.decode(ids) == text.upper()
    assert len(ids) < len(text) / 2  # it does compress
    assert bpe.decode(bpe.encode("acgtnNNacgt")) == "ACGTNNNACGT"
    assert bpe.decode(bpe.add_special(ids), skip_special=True) == text.upper()
    assert bpe.decode(bpe.encode("ACRRYGT")) == "AC[UNK]GT"  # a run of unknown characters is one [UNK]


# ---- HF parity -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("any_tok", TOKENIZERS, indirect=True)
def test_hf_parity(any_tok: Tokenizer, yeast: str, hf_of):
    tok = any_tok
    hf = hf_of(tok)
    texts = parity_inputs(yeast)
    plain = hf(texts, add_special_tokens=False)["input_ids"]
    templated = hf(texts)["input_ids"]
    for text, hf_plain, hf_templated in zip(texts, plain, templated):
        ids = tok.encode(text)
        assert hf_plain == ids.tolist(), text[:60]
        assert hf_templated == tok.add_special(ids).tolist(), text[:60]
    assert set(hf.all_special_ids) == set(tok.special_ids)
    assert (hf.pad_token_id, hf.mask_token_id, hf.unk_token_id) == (tok.pad_id, tok.mask_id, tok.unk_id)
    assert (hf.cls_token_id, hf.sep_token_id) == (tok.cls_id, tok.sep_id)
    assert hf.decode(tok.encode("ACGTNacgtn").tolist()) == "ACGTNACGTN"


@pytest.mark.parametrize("any_tok", ["bpe", "bpe4096"], indirect=True)
def test_bpe_hf_parity_exhaustive_short_strings(any_tok: BPETokenizer, hf_of):
    # Every ACGT string up to length 8: where a merge-order difference between the two BPEs would show first.
    bpe = any_tok
    hf = hf_of(bpe)
    texts = ["".join(p) for n in range(1, 9) for p in itertools.product("ACGT", repeat=n)]
    hf_ids = hf(texts, add_special_tokens=False)["input_ids"]
    mismatches = [t for t, h in zip(texts, hf_ids) if h != bpe.encode(t).tolist()]
    assert mismatches == []


@pytest.mark.parametrize("any_tok", ["bpe", "bpe4096"], indirect=True)
def test_bpe_hf_parity_whole_chromosome(any_tok: BPETokenizer, yeast: str, hf_of):
    bpe = any_tok
    hf = hf_of(bpe)
    assert hf(yeast, add_special_tokens=False)["input_ids"] == bpe.encode(yeast).tolist()


@pytest.mark.parametrize("any_tok", TOKENIZERS[:3], indirect=True)
def test_save_hf_loads_offline_with_auto_tokenizer(any_tok: Tokenizer, yeast: str, tmp_path: Path):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok = any_tok
    tok.save_hf(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tmp_path / name).is_file()
    text = yeast[:3000]
    for loaded in (AutoTokenizer.from_pretrained(tmp_path), PreTrainedTokenizerFast.from_pretrained(tmp_path)):
        assert loaded(text)["input_ids"] == tok.add_special(tok.encode(text)).tolist()
        assert set(loaded.all_special_ids) == set(tok.special_ids)
        assert loaded.mask_token_id == tok.mask_id and loaded.pad_token_id == tok.pad_id


# ---- save / load ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec,name", [("nucleotide", "nucleotide-char"), ("nucleotide-char", "nucleotide-char"),
                                       ("nucleotide-byte", "nucleotide-byte")])
def test_load_builtin_specs(spec: str, name: str):
    assert load_tokenizer(spec).name == name


@pytest.mark.parametrize("any_tok", TOKENIZERS[:3], indirect=True)
def test_save_load_round_trip(any_tok: Tokenizer, yeast: str, tmp_path: Path):
    tok = any_tok
    tok.save(tmp_path)
    again = load_tokenizer(tmp_path)
    assert type(again) is type(tok)
    assert (again.name, again.vocab_size, again.special_ids) == (tok.name, tok.vocab_size, tok.special_ids)
    text = yeast[:5000]
    assert np.array_equal(again.encode(text), tok.encode(text))
    assert again.encode(text).dtype == tok.encode(text).dtype


def test_bpe_load_classmethod_and_tamper_check(bpe: BPETokenizer, yeast: str, tmp_path: Path):
    bpe.save(tmp_path)
    assert BPETokenizer.load(tmp_path).name == bpe.name
    other = BPETokenizer.train([yeast[:50_000]], vocab_size=64, seed=0)
    (tmp_path / "bpe.model").write_bytes(other.model_proto)  # model swapped under the old config
    with pytest.raises(ConfigError, match="but dnascale_tokenizer.json says"):
        load_tokenizer(tmp_path)
    NucleotideTokenizer("char").save(tmp_path / "char")
    with pytest.raises(ConfigError, match="not a BPE one"):
        BPETokenizer.load(tmp_path / "char")


def test_load_tokenizer_errors(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"unknown tokenizer spec 'kmer6'.*nucleotide-byte") as err:
        load_tokenizer("kmer6")
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=f"has no {CONFIG_FILE}"):
        load_tokenizer(tmp_path)
    (tmp_path / CONFIG_FILE).write_text("{not json")
    with pytest.raises(ConfigError, match="unreadable tokenizer config"):
        load_tokenizer(tmp_path)
    (tmp_path / CONFIG_FILE).write_text(json.dumps({"format": 1, "kind": "wordpiece"}))
    with pytest.raises(ConfigError, match="kind 'wordpiece'"):
        load_tokenizer(tmp_path)
    (tmp_path / CONFIG_FILE).write_text(json.dumps({"format": 1, "kind": "bpe", "name": "bpe-1-x"}))
    with pytest.raises(ConfigError, match="missing"):
        load_tokenizer(tmp_path)


# ---- BPE training --------------------------------------------------------------------------------------------


def test_bpe_training_is_deterministic(bpe: BPETokenizer, yeast: str):
    again = BPETokenizer.train([yeast], vocab_size=BPE_VOCAB, seed=0)
    assert again.model_proto == bpe.model_proto and again.name == bpe.name
    # bytes and str inputs, and lowercase, give the same model
    assert BPETokenizer.train([yeast.lower().encode()], vocab_size=BPE_VOCAB, seed=0).model_proto == bpe.model_proto


@pytest.mark.parametrize("vocab_size", [64, 300])
def test_bpe_vocab_size_is_the_requested_size(vocab_size: int, yeast: str):
    assert BPETokenizer.train([yeast[:100_000]], vocab_size=vocab_size, seed=1).vocab_size == vocab_size


def test_bpe_training_errors():
    with pytest.raises(ConfigError, match="vocab_size=5000 failed"):
        BPETokenizer.train(["ACGT" * 50], vocab_size=5000)
    with pytest.raises(ConfigError, match="must be >= 16"):
        BPETokenizer.train(["ACGT"], vocab_size=8)
    with pytest.raises(DataError, match="no sequence data"):
        BPETokenizer.train([], vocab_size=64)


# ---- speed ---------------------------------------------------------------------------------------------------


def test_nucleotide_encode_is_fast():
    seq = np.random.default_rng(0).choice(np.frombuffer(b"ACGT", np.uint8), 4_000_000).tobytes()
    tok = NucleotideTokenizer("char")
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        tok.encode(seq)
        best = min(best, time.perf_counter() - start)
    # Target is >= 200 Mbp/s (measured ~900 on the dev box); the bound is loose for shared CI cores.
    assert len(seq) / best / 1e6 > 50


# ---- training CLI --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli():
    spec = importlib.util.spec_from_file_location("train_tokenizer_cli", REPO / "tools" / "train_tokenizer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_fasta(path: Path, records: dict[str, str]) -> Path:
    path.write_text("".join(f">{name}\n{seq}\n" for name, seq in records.items()))
    return path


def test_collect_training_sequences_chunks_and_budget(cli, tmp_path: Path):
    a = write_fasta(tmp_path / "a.fa", {"r1": "ACGT" * 100, "r2": "acgt" * 50})
    b = write_fasta(tmp_path / "b.fa", {"s1": "GGCC" * 100})
    everything = cli.collect_training_sequences([a, b], None, 150)
    assert all(0 < len(s) <= 150 for s in everything)
    assert b"".join(everything) == b"ACGT" * 150 + b"GGCC" * 100  # cleaned: uppercase
    budget = cli.collect_training_sequences([a, b], 500, 150)
    assert sum(len(s) for s in budget) == 500
    assert sum(len(s) for s in budget if set(s) <= set(b"GC")) == 250  # the budget is shared between files


def test_train_tokenizer_cli_end_to_end(cli, tmp_path: Path, capsys):
    out = tmp_path / "tok"
    argv = [str(YEAST), "--out", str(out), "--vocab-size", "300", "--max-bases", "200000", "--chunk", "1000"]
    assert cli.main(argv) == 0
    tok = load_tokenizer(out)
    assert isinstance(tok, BPETokenizer) and tok.vocab_size == 300
    assert tok.name in capsys.readouterr().out
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(out)
    assert hf("ACGTNACGTTTGA")["input_ids"] == tok.add_special(tok.encode("ACGTNACGTTTGA")).tolist()
    with pytest.raises(ConfigError, match="--overwrite"):
        cli.main(argv)
    assert cli.main([*argv, "--overwrite"]) == 0
    assert load_tokenizer(out).name == tok.name  # same data + seed, same model


def test_train_tokenizer_cli_reports_one_line_errors(tmp_path: Path):
    import subprocess

    result = subprocess.run(
        [sys.executable, str(REPO / "tools" / "train_tokenizer.py"), str(tmp_path / "missing.fa"), "--out",
         str(tmp_path / "o")],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: {tmp_path / 'missing.fa'}: no such FASTA file"]
