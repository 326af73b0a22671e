"""Tokenizers: DNA text -> token ids, with a Hugging Face twin that gives the same ids.

Three tokenizers share one interface (`Tokenizer`):

* `NucleotideTokenizer("char")`: one base per token, the Caduceus `CharacterTokenizer` layout (DNACHUNKER spec §1).
* `NucleotideTokenizer("byte")`: one base per token, ByT5 byte ids (ENBED spec §1).
* `BPETokenizer`: sentencepiece BPE trained on DNA with the DNABERT-2 special layout (DNAZEN spec §1).

Id tables (`vocab_size` is the number of embedding rows and may exceed the live ids):

| tokenizer         | special ids                                              | base ids                 | rows | template        |
|-------------------|----------------------------------------------------------|--------------------------|------|-----------------|
| `nucleotide-char` | [CLS]=0 [SEP]=1 [BOS]=2 [MASK]=3 [PAD]=4 [RESERVED]=5 [UNK]=6 | A=7 C=8 G=9 T=10 N=11 | 16 * | `x [SEP]`       |
| `nucleotide-byte` | <pad>=0 </s>=1 (sep) <unk>=2 <cls>=259 <mask>=383        | A=68 C=70 G=74 T=87 N=81 | 384  | `x </s>`        |
| `bpe-<V>-<sha8>`  | [UNK]=0 [CLS]=1 [SEP]=2 [PAD]=3 [MASK]=4                 | N=5, learned pieces 6..  | V    | `[CLS] x [SEP]` |

\* 12 live ids padded to 16 rows (ids 12-15 unused). V is 4096 by default (DNABERT-2).

Choices, and why:

* char template `x [SEP]`: Caduceus' `CharacterTokenizer.build_inputs_with_special_tokens` appends only [SEP]
  (its [CLS] line is commented out) and DNAChunker pools by mean, so no [CLS] is needed.
* byte template `x </s>`: T5/ByT5 append EOS to every encoder input and have no [CLS]. `cls_id` is still needed by
  the interface, so it takes sentinel 259, the sentinel farthest from the span-corruption end (383, 382, ...);
  [MASK] is sentinel 383 as the ENBED spec suggests. Sentinels 260..382 are named `<extra_id_{383 - id}>`
  (counting down from 383, the T5 documentation's convention, where 383 would be `<extra_id_0>`).
* Both nucleotide layouts map lowercase (soft-masked) bases like uppercase, and everything that is not ACGTN to
  [UNK] (also in the byte layout: the model only ever sees DNA; `count_unknown` counts such bytes).
* BPE: N is a sentencepiece user-defined symbol, so it always has id 5 (even when the training data has no N) and
  never merges: an N run is one token per N, and no vocabulary is spent on N pieces. Consecutive characters outside
  the vocabulary become one [UNK] (sentencepiece behaviour, mirrored by `fuse_unk` in the HF twin).

`encode` never adds special tokens and returns the smallest unsigned dtype that holds `vocab_size` ids;
`add_special` applies the model's template. `save(dir)` writes `dnascale_tokenizer.json` (+ `bpe.model` for BPE),
which `load_tokenizer(dir)` reads back; `save_hf(dir)` writes the HF files, so one directory can hold both.
"""

from __future__ import annotations

import abc
import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import numpy as np

from dnascale.errors import ConfigError, DataError

if TYPE_CHECKING:  # transformers and tokenizers are imported lazily: shard building never needs them
    import tokenizers
    from transformers import PreTrainedTokenizerFast

__all__ = [
    "Tokenizer",
    "NucleotideTokenizer",
    "BPETokenizer",
    "load_tokenizer",
    "BUILTIN_SPECS",
    "CONFIG_FILE",
]

CONFIG_FILE = "dnascale_tokenizer.json"
BPE_MODEL_FILE = "bpe.model"
FORMAT_VERSION = 1
BUILTIN_SPECS = ("nucleotide", "nucleotide-char", "nucleotide-byte")
_ALLOWED = f"one of {', '.join(BUILTIN_SPECS)}, or a directory written by Tokenizer.save() (with {CONFIG_FILE})"

SeqLike = bytes | bytearray | memoryview | str
BASES = "ACGTN"


def _as_bytes(seq: SeqLike) -> bytes | bytearray | memoryview:
    """Bytes view of a sequence; a non-ASCII character of a str becomes one '?' (one [UNK]), as in the HF twin."""
    if isinstance(seq, str):
        return seq.encode("ascii", "replace")
    return seq


def _smallest_uint(vocab_size: int) -> np.dtype:
    for dtype in (np.uint8, np.uint16, np.uint32):
        if vocab_size - 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    raise ConfigError(f"vocab_size {vocab_size} does not fit in uint32")


@dataclass(frozen=True)
class Template:
    """Special ids placed around one sequence by `add_special` (and by the HF post-processor)."""

    prefix: tuple[int, ...]
    suffix: tuple[int, ...]


class Tokenizer(abc.ABC):
    """What every dnascale tokenizer offers. Concrete classes set the attributes in `__init__`."""

    name: str  # stable id written into shard manifests
    vocab_size: int  # embedding rows (may be padded beyond the live ids)
    pad_id: int
    unk_id: int
    cls_id: int
    sep_id: int
    mask_id: int
    one_token_per_base: bool  # True: token i is base i, so windows of an encoded segment are views
    template: Template

    # ---- per-tokenizer parts -------------------------------------------------------------------------------
    @abc.abstractmethod
    def encode(self, seq: SeqLike) -> np.ndarray:
        """Token ids of `seq` without special tokens (dtype: `self.dtype`)."""

    @abc.abstractmethod
    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write what `load_tokenizer(directory)` needs; returns the config file path."""

    @property
    @abc.abstractmethod
    def tokens(self) -> dict[int, str]:
        """Id -> token string for every id with a name (specials, bases, pieces, sentinels, unused rows)."""

    @property
    @abc.abstractmethod
    def special_tokens(self) -> dict[str, int]:
        """Named special tokens (template, padding, masking, [UNK]) -> id; their ids form `special_ids`."""

    @property
    @abc.abstractmethod
    def content_ids(self) -> np.ndarray:
        """Sorted ids that `encode` can emit besides [UNK] (bases or pieces): the pool for random MLM replacement."""

    @abc.abstractmethod
    def _hf_model(self) -> tuple[Any, Any]:
        """The `tokenizers` model and pre-tokenizer of the HF twin."""

    @abc.abstractmethod
    def _hf_role_tokens(self) -> dict[str, str]:
        """HF special-token roles (`unk_token`, `pad_token`, ...) -> token strings."""

    # ---- shared behaviour ----------------------------------------------------------------------------------
    @property
    def dtype(self) -> np.dtype:
        return _smallest_uint(self.vocab_size)

    @property
    def special_ids(self) -> frozenset[int]:
        return frozenset(self.special_tokens.values())

    def add_special(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """`ids` wrapped in the model template (e.g. [CLS] x [SEP])."""
        ids = np.asarray(ids, dtype=self.dtype)
        prefix = np.asarray(self.template.prefix, dtype=self.dtype)
        suffix = np.asarray(self.template.suffix, dtype=self.dtype)
        return np.concatenate([prefix, ids, suffix])

    def decode(self, ids: Sequence[int] | np.ndarray, skip_special: bool = False) -> str:
        """Token strings joined; specials appear by name (e.g. "[MASK]") unless `skip_special`."""
        ids = np.asarray(ids, dtype=np.int64).ravel()
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise DataError(f"{self.name}: token ids must lie in [0, {self.vocab_size}), got {ids.min()}..{ids.max()}")
        table = self._decode_table(skip_special)
        return "".join(table[ids].tolist())

    def _decode_table(self, skip_special: bool) -> np.ndarray:
        cache = self.__dict__.setdefault("_decode_tables", {})
        if skip_special not in cache:
            table = np.full(self.vocab_size, "", dtype=object)
            for i, tok in self.tokens.items():
                table[i] = tok
            if skip_special:
                # Everything that is not a base or piece is dropped (specials, sentinels, unused rows).
                keep = np.zeros(self.vocab_size, dtype=bool)
                keep[self.content_ids] = True
                keep[self.unk_id] = False
                table[~keep] = ""
            cache[skip_special] = table
        return cache[skip_special]

    def to_hf(self) -> "PreTrainedTokenizerFast":
        """A `transformers` fast tokenizer that gives the same ids as `encode` (+ `add_special` by default)."""
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast(tokenizer_object=self._hf_backend(), **self._hf_special_kwargs())

    def _hf_special_kwargs(self) -> dict[str, Any]:
        """Role tokens plus the remaining specials, so HF's `all_special_ids` equals `special_ids`."""
        roles = self._hf_role_tokens()
        extra = [tok for tok in self.special_tokens if tok not in roles.values()]
        return {**roles, **({"additional_special_tokens": extra} if extra else {})}

    def _hf_backend(self) -> "tokenizers.Tokenizer":
        from tokenizers import AddedToken, decoders, normalizers, processors
        from tokenizers import Tokenizer as HFTokenizer

        model, pre_tokenizer = self._hf_model()
        backend = HFTokenizer(model)
        # Only lowercase bases need folding: any other character maps to [UNK] in either case.
        backend.normalizer = normalizers.Sequence([normalizers.Replace(b.lower(), b) for b in BASES])
        if pre_tokenizer is not None:
            backend.pre_tokenizer = pre_tokenizer
        backend.add_special_tokens(
            [AddedToken(tok, special=True, normalized=False) for tok in sorted(self.special_tokens, key=len)]
        )
        backend.post_processor = self._hf_template(processors)
        backend.decoder = decoders.Fuse()  # DNA has no spaces: join tokens as they are
        return backend

    def _hf_template(self, processors: Any) -> Any:
        names = self.tokens
        prefix = " ".join(names[i] for i in self.template.prefix)
        suffix = " ".join(names[i] for i in self.template.suffix)
        suffix_b = " ".join(f"{names[i]}:1" for i in self.template.suffix)
        single = " ".join(p for p in (prefix, "$A", suffix) if p)
        pair = " ".join(p for p in (single, "$B:1", suffix_b) if p)  # BERT style: the prefix only once
        used = sorted(set(self.template.prefix + self.template.suffix))
        return processors.TemplateProcessing(single=single, pair=pair, special_tokens=[(names[i], i) for i in used])

    def save_hf(self, directory: str | os.PathLike[str]) -> Path:
        """Write tokenizer.json, tokenizer_config.json, special_tokens_map.json: AutoTokenizer loads them offline."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.to_hf().save_pretrained(str(directory))
        config_path = directory / "tokenizer_config.json"
        config = json.loads(config_path.read_text())
        # transformers 5 writes its internal class name; the public alias also loads under transformers 4.
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        if "extra_special_tokens" in config:  # transformers 4 reads a list of extra specials under this key
            config["additional_special_tokens"] = config.pop("extra_special_tokens")
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        # transformers 5 no longer writes this file; older loaders and other tools still read it.
        (directory / "special_tokens_map.json").write_text(json.dumps(self._hf_special_kwargs(), indent=2) + "\n")
        return directory


# --------------------------------------------------------------------------------------------------------------
# One token per base
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NucleotideLayout:
    """Id assignment of a one-token-per-base vocabulary."""

    name: str
    vocab_size: int
    specials: dict[str, int]  # token string -> id
    roles: dict[str, str]  # pad/unk/cls/sep/mask (+ HF-only bos/eos) -> token string
    bases: dict[str, int]  # "A" -> id
    extra: dict[int, str]  # other named ids: sentinels, unused padding rows
    template: Template


def _char_layout() -> NucleotideLayout:
    specials = {"[CLS]": 0, "[SEP]": 1, "[BOS]": 2, "[MASK]": 3, "[PAD]": 4, "[RESERVED]": 5, "[UNK]": 6}
    return NucleotideLayout(
        name="nucleotide-char",
        vocab_size=16,  # 12 live ids padded to a multiple of 8 (DNACHUNKER spec)
        specials=specials,
        roles={"pad": "[PAD]", "unk": "[UNK]", "cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]", "bos": "[BOS]",
               "eos": "[SEP]"},
        bases={b: 7 + i for i, b in enumerate(BASES)},
        extra={i: f"[UNUSED{i - 12}]" for i in range(12, 16)},
        template=Template(prefix=(), suffix=(specials["[SEP]"],)),
    )


BYTE_OFFSET = 3  # ByT5: byte b -> id b + 3, after <pad>, </s>, <unk>
BYTE_CLS_ID = 259
BYTE_MASK_ID = 383


def _byte_layout() -> NucleotideLayout:
    specials = {"<pad>": 0, "</s>": 1, "<unk>": 2, "<cls>": BYTE_CLS_ID, "<mask>": BYTE_MASK_ID}
    sentinels = {i: f"<extra_id_{BYTE_MASK_ID - i}>" for i in range(BYTE_CLS_ID + 1, BYTE_MASK_ID)}
    return NucleotideLayout(
        name="nucleotide-byte",
        vocab_size=384,
        specials=specials,
        roles={"pad": "<pad>", "unk": "<unk>", "cls": "<cls>", "sep": "</s>", "mask": "<mask>", "eos": "</s>"},
        bases={b: ord(b) + BYTE_OFFSET for b in BASES},
        extra=sentinels,
        template=Template(prefix=(), suffix=(specials["</s>"],)),
    )


_LAYOUTS = {"char": _char_layout, "byte": _byte_layout}


class NucleotideTokenizer(Tokenizer):
    """One token per base through a 256-entry lookup table (the shard-building hot path)."""

    one_token_per_base = True

    def __init__(self, layout: str = "char"):
        if layout not in _LAYOUTS:
            raise ConfigError(f"nucleotide tokenizer layout {layout!r}: expected one of {', '.join(_LAYOUTS)}")
        self.layout = layout
        spec = _LAYOUTS[layout]()
        self._spec = spec
        self.name = spec.name
        self.vocab_size = spec.vocab_size
        ids = {role: spec.specials[tok] for role, tok in spec.roles.items()}
        self.pad_id, self.unk_id, self.cls_id = ids["pad"], ids["unk"], ids["cls"]
        self.sep_id, self.mask_id = ids["sep"], ids["mask"]
        self.template = spec.template
        lut = np.full(256, self.unk_id, dtype=self.dtype)
        for base, i in spec.bases.items():
            lut[ord(base)] = lut[ord(base.lower())] = i
        lut.setflags(write=False)
        self._lut = lut
        self._known = lut != self.unk_id

    def encode(self, seq: SeqLike) -> np.ndarray:
        # Fancy indexing a uint8 table with a uint8 view runs at ~1 Gbp/s; no Python loop over bases.
        return self._lut[np.frombuffer(_as_bytes(seq), dtype=np.uint8)]

    def count_unknown(self, seq: SeqLike) -> int:
        """How many characters of `seq` are not ACGTN (either case), i.e. would encode to [UNK]."""
        return int(np.count_nonzero(~self._known[np.frombuffer(_as_bytes(seq), dtype=np.uint8)]))

    @property
    def tokens(self) -> dict[int, str]:
        names = {i: tok for tok, i in self._spec.specials.items()}
        names.update({i: b for b, i in self._spec.bases.items()})
        names.update(self._spec.extra)
        if self.layout == "byte":  # ids of other bytes decode to the byte, as ByT5 would (encode never emits them)
            for b in range(256):
                names.setdefault(b + BYTE_OFFSET, chr(b))
        return names

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(self._spec.specials)

    @property
    def content_ids(self) -> np.ndarray:
        return np.array(sorted(self._spec.bases.values()), dtype=np.int64)

    def save(self, directory: str | os.PathLike[str]) -> Path:
        return _write_config(Path(directory), {"kind": "nucleotide", "layout": self.layout, "name": self.name,
                                               "vocab_size": self.vocab_size})

    def _hf_model(self) -> tuple[Any, Any]:
        from tokenizers import Regex, models, pre_tokenizers

        # The HF vocab holds the named ids only (not the 251 non-DNA byte ids), so any other character -> [UNK].
        vocab = {tok: i for tok, i in self._spec.specials.items()}
        vocab.update(self._spec.bases)
        vocab.update({tok: i for i, tok in self._spec.extra.items()})
        model = models.WordLevel(vocab=vocab, unk_token=self._spec.roles["unk"])
        # Every character is its own word ([\s\S] also matches newlines, unlike ".").
        return model, pre_tokenizers.Split(pattern=Regex(r"[\s\S]"), behavior="isolated")

    def _hf_role_tokens(self) -> dict[str, str]:
        return {f"{role}_token": tok for role, tok in self._spec.roles.items()}

    def __repr__(self) -> str:
        return f"NucleotideTokenizer(layout={self.layout!r})"


# --------------------------------------------------------------------------------------------------------------
# BPE (sentencepiece)
# --------------------------------------------------------------------------------------------------------------

# DNABERT-2 layout: [UNK]=0, [CLS]=1, [SEP]=2, [PAD]=3, [MASK]=4; then N, pinned as a user-defined symbol.
BPE_SPECIALS = {"[UNK]": 0, "[CLS]": 1, "[SEP]": 2, "[PAD]": 3, "[MASK]": 4}
BPE_N_ID = 5


@dataclass(frozen=True)
class BPETrainingConfig:
    """Sentencepiece options that matter for DNA; recorded in the saved config."""

    vocab_size: int = 4096
    seed: int = 0
    chunk: int = 2000  # bases per training sentence; must stay below sentencepiece's max_sentence_length
    max_piece_length: int = 16  # sentencepiece default

    def validate(self) -> None:
        if self.vocab_size < 16:
            raise ConfigError(f"BPE vocab_size must be >= 16, got {self.vocab_size}")
        if self.chunk < 1:
            raise ConfigError(f"BPE training chunk must be >= 1 base, got {self.chunk}")
        if self.max_piece_length < 1:
            raise ConfigError(f"BPE max_piece_length must be >= 1, got {self.max_piece_length}")


def _training_sentences(sequences: Iterable[SeqLike], chunk: int) -> list[str]:
    sentences = []
    for seq in sequences:
        text = bytes(_as_bytes(seq)).upper().decode("latin-1")
        sentences.extend(text[i : i + chunk] for i in range(0, len(text), chunk))
    return sentences


class BPETokenizer(Tokenizer):
    """Sentencepiece BPE over DNA; `encode` upper-cases first."""

    one_token_per_base = False

    def __init__(self, model_proto: bytes):
        import sentencepiece as spm

        self._proto = bytes(model_proto)
        try:
            self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
        except (RuntimeError, OSError) as err:
            raise ConfigError(f"not a sentencepiece model ({err})") from None
        self.vocab_size = self._sp.get_piece_size()
        self._pieces = [self._sp.id_to_piece(i) for i in range(self.vocab_size)]
        for tok, i in BPE_SPECIALS.items():
            if i >= self.vocab_size or self._pieces[i] != tok:
                raise ConfigError(f"sentencepiece model does not have the DNABERT-2 layout: expected {tok} at id {i}")
        if self.vocab_size <= BPE_N_ID or self._pieces[BPE_N_ID] != "N":
            raise ConfigError(f"sentencepiece model was not trained by dnascale: expected N at id {BPE_N_ID}")
        self.unk_id, self.cls_id, self.sep_id = BPE_SPECIALS["[UNK]"], BPE_SPECIALS["[CLS]"], BPE_SPECIALS["[SEP]"]
        self.pad_id, self.mask_id = BPE_SPECIALS["[PAD]"], BPE_SPECIALS["[MASK]"]
        self.template = Template(prefix=(self.cls_id,), suffix=(self.sep_id,))
        self.model_sha256 = hashlib.sha256(self._proto).hexdigest()
        self.name = f"bpe-{self.vocab_size}-{self.model_sha256[:8]}"

    # ---- training --------------------------------------------------------------------------------------------
    @classmethod
    def train(
        cls,
        sequences: Iterable[SeqLike],
        vocab_size: int = 4096,
        seed: int = 0,
        *,
        chunk: int = 2000,
        max_piece_length: int = 16,
    ) -> "BPETokenizer":
        """Train on `sequences` (cut into `chunk`-base sentences). Same inputs + seed -> byte-identical model."""
        import sentencepiece as spm

        config = BPETrainingConfig(vocab_size=vocab_size, seed=seed, chunk=chunk, max_piece_length=max_piece_length)
        config.validate()
        sentences = _training_sentences(sequences, chunk)
        if not sentences:
            raise DataError("BPE training got no sequence data")
        # We feed every sentence ourselves in a seeded order, so sentencepiece neither samples nor shuffles.
        order = np.random.default_rng(seed).permutation(len(sentences))
        if hasattr(spm, "set_random_generator_seed"):
            spm.set_random_generator_seed(seed)
        model = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=(sentences[i] for i in order),
                model_writer=model,
                model_type="bpe",
                vocab_size=vocab_size,
                character_coverage=1.0,
                normalization_rule_name="identity",  # never change a base
                add_dummy_prefix=False,  # DNA has no words, so no '▁' word-start marker
                remove_extra_whitespaces=False,
                byte_fallback=False,
                max_sentence_length=max(4192, chunk),
                max_sentencepiece_length=max_piece_length,
                input_sentence_size=0,
                shuffle_input_sentence=False,
                num_threads=1,  # output does not depend on it, but the value is stored in the model file
                unk_id=BPE_SPECIALS["[UNK]"], unk_piece="[UNK]",
                bos_id=BPE_SPECIALS["[CLS]"], bos_piece="[CLS]",
                eos_id=BPE_SPECIALS["[SEP]"], eos_piece="[SEP]",
                pad_id=BPE_SPECIALS["[PAD]"], pad_piece="[PAD]",
                control_symbols=["[MASK]"],  # next free id: 4
                user_defined_symbols=["N"],  # next free id: 5; atomic, present even if the data has no N
                minloglevel=2,
            )
        except RuntimeError as err:
            # e.g. "Vocabulary size is too high": the data has fewer distinct pieces than requested.
            msg = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
            raise ConfigError(f"BPE training with vocab_size={vocab_size} failed: {msg}") from None
        tokenizer = cls(model.getvalue())
        if tokenizer.vocab_size != vocab_size:
            raise ConfigError(f"BPE training produced {tokenizer.vocab_size} pieces, not the requested {vocab_size}")
        return tokenizer

    # ---- ids -------------------------------------------------------------------------------------------------
    def encode(self, seq: SeqLike) -> np.ndarray:
        # bytes.upper() folds ASCII only, so the character count (and the HF twin's view) is unchanged.
        text = bytes(_as_bytes(seq)).upper().decode("latin-1")
        return np.asarray(self._sp.encode(text), dtype=self.dtype)

    @property
    def tokens(self) -> dict[int, str]:
        return dict(enumerate(self._pieces))

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(BPE_SPECIALS)

    @property
    def content_ids(self) -> np.ndarray:
        return np.arange(len(BPE_SPECIALS), self.vocab_size, dtype=np.int64)

    @property
    def model_proto(self) -> bytes:
        return self._proto

    # ---- persistence -----------------------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike[str]) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / BPE_MODEL_FILE).write_bytes(self._proto)
        return _write_config(directory, {
            "kind": "bpe", "name": self.name, "vocab_size": self.vocab_size, "model_file": BPE_MODEL_FILE,
            "model_sha256": self.model_sha256, "special_ids": dict(BPE_SPECIALS), "n_id": BPE_N_ID,
        })

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> "BPETokenizer":
        tokenizer = load_tokenizer(str(directory))
        if not isinstance(tokenizer, BPETokenizer):
            raise ConfigError(f"{directory}: holds a {tokenizer.name} tokenizer, not a BPE one")
        return tokenizer

    # ---- HF twin ---------------------------------------------------------------------------------------------
    def hf_merges(self) -> list[tuple[str, str]]:
        """Every split (a, b) of every piece a+b into two pieces, ranked by the piece's sentencepiece score.

        Sentencepiece BPE repeatedly merges the adjacent pair whose *concatenation* has the best score, whichever
        two pieces form it; HF BPE merges by pair rank. Listing all splits, ranked by the score of the result,
        makes the two agree. Splits of one piece tie in sentencepiece (broken by position); here they are ordered
        by split point. Parity is checked exhaustively on short strings and on real genomes in the tests.
        """
        vocab = {p: i for i, p in enumerate(self._pieces)}
        skip = set(BPE_SPECIALS.values())
        ranked = []
        for piece, i in vocab.items():
            if i in skip or len(piece) < 2:
                continue
            score = self._sp.get_score(i)
            for k in range(1, len(piece)):
                left, right = piece[:k], piece[k:]
                if left in vocab and right in vocab:
                    ranked.append((-score, k, left, right))
        ranked.sort()
        return [(left, right) for _, _, left, right in ranked]

    def _hf_model(self) -> tuple[Any, Any]:
        from tokenizers import models

        vocab = {p: i for i, p in enumerate(self._pieces)}
        # fuse_unk: a run of out-of-vocabulary characters is one [UNK], as in sentencepiece.
        model = models.BPE(vocab=vocab, merges=self.hf_merges(), unk_token="[UNK]", fuse_unk=True, byte_fallback=False)
        return model, None  # no pre-tokenizer: like sentencepiece, the whole sequence is one word

    def _hf_role_tokens(self) -> dict[str, str]:
        return {"unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]", "pad_token": "[PAD]",
                "mask_token": "[MASK]"}

    def __repr__(self) -> str:
        return f"BPETokenizer(name={self.name!r})"


# --------------------------------------------------------------------------------------------------------------
# Loading by spec
# --------------------------------------------------------------------------------------------------------------


def _write_config(directory: Path, fields: dict[str, Any]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / CONFIG_FILE
    path.write_text(json.dumps({"format": FORMAT_VERSION, **fields}, indent=2) + "\n")
    return path


def _read_config(directory: Path, spec: str) -> dict[str, Any]:
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(f"tokenizer directory {spec!r} has no {CONFIG_FILE}; expected {_ALLOWED}")
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"{path}: unreadable tokenizer config ({err}); expected {_ALLOWED}") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT_VERSION:
        raise ConfigError(f"{path}: not a dnascale tokenizer config of format {FORMAT_VERSION}")
    return config


def _load_bpe(directory: Path, config: dict[str, Any]) -> BPETokenizer:
    model_path = directory / str(config.get("model_file", BPE_MODEL_FILE))
    if not model_path.is_file():
        raise ConfigError(f"{directory}: BPE tokenizer config names {model_path.name}, which is missing")
    tokenizer = BPETokenizer(model_path.read_bytes())
    # The name goes into shard manifests: a model file swapped under an old config must not pass for it.
    if tokenizer.name != config.get("name"):
        raise ConfigError(f"{model_path}: model is {tokenizer.name}, but {CONFIG_FILE} says {config.get('name')}")
    return tokenizer


def load_tokenizer(spec: str | os.PathLike[str]) -> Tokenizer:
    """`nucleotide` (= char layout), `nucleotide-char`, `nucleotide-byte`, or a directory written by `save()`."""
    spec = os.fspath(spec)
    if spec in ("nucleotide", "nucleotide-char"):
        return NucleotideTokenizer("char")
    if spec == "nucleotide-byte":
        return NucleotideTokenizer("byte")
    directory = Path(spec)
    if not directory.is_dir():
        raise ConfigError(f"unknown tokenizer spec {spec!r}: expected {_ALLOWED}")
    config = _read_config(directory, spec)
    kind = config.get("kind")
    if kind == "nucleotide":
        layout = config.get("layout")
        if layout not in _LAYOUTS:
            raise ConfigError(f"{directory / CONFIG_FILE}: layout {layout!r}, expected one of {', '.join(_LAYOUTS)}")
        return NucleotideTokenizer(layout)
    if kind == "bpe":
        return _load_bpe(directory, config)
    raise ConfigError(f"{directory / CONFIG_FILE}: tokenizer kind {kind!r}, expected nucleotide or bpe")
