"""Per-family inference: a window of bases -> per-base states, masked-LM base log-probabilities, boundaries.

Every family answers the same three questions about a batch of windows, at base resolution:

* `plain(windows)`: one unmasked pass. Per-base hidden states (what `encode()` gives classification: the encoder's
  and DNAZEN's final states, ENBED's encoder, DNACHUNKER's base-level states after dechunking and the head's norm)
  and, for DNACHUNKER, per-base boundary probabilities of every stage. A BPE family (DNAZEN) gives each base the
  state of the token that holds it.
* `masked(windows, masked_units)`: one pass with the chosen units replaced by [MASK]; for every base of a masked
  unit, log P(base) over A, C, G, T (the head's distribution restricted to the four bases and renormalised, so
  every family's score lives on the same 4-letter scale; N and specials get no mass).
  A unit is what the family masks in pretraining: a base for the nucleotide families, a BPE token for DNAZEN.
  For DNAZEN a masked token of length n predicts a piece, not a base; the per-base distribution at offset j is the
  head's distribution over pieces of the reference token's length n, marginalised to the letter at offset j:
      P(b at j) = sum_{piece v, |v| = n, v[j] = b} P(v) / sum_{|v| = n, v[j] in ACGT} P(v).
  Conditioning on the length keeps the offsets aligned (a piece of another length would not cover the same bases).
  ENBED predicts through its decoder, teacher-forced on the original sequence (it sees the original bases to the
  left, as in pretraining) and cross-attending to the corrupted encoder input.
* boundaries (DNACHUNKER): stage s's router gives a probability at every position of level s - 1 (bases for s = 1,
  stage-1 chunks for s = 2). Mapped to bases: the probability sits on the first base of the level-(s-1) chunk
  it belongs to, 0 elsewhere, i.e. "a level-s chunk starts at this base" given the (hard) chunking below it.
  Position 0 of a window is a forced boundary (p = 1): stitching keeps only a window's centre.

Units are masked as `[MASK]` (no 80/10/10 corruption: that is a training regulariser, not a scoring rule).
G-grams (DNAZEN) are matched on the ids the model sees, as in pretraining (on the masked ids for masked passes:
a G-gram over a [MASK] is not matched; on the plain ids otherwise, as fine-tuning does).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from dnascale.data.tokenizers import BASES, load_tokenizer
from dnascale.errors import ConfigError, DataError

ACGT = BASES[:4]


@dataclass(frozen=True)
class Prepared:
    """One window in the family's tokenizer."""

    ids: np.ndarray  # [T] int64 token ids, template included
    base_token: np.ndarray  # [w] int64: index in `ids` of the token holding each base
    units: np.ndarray  # [U] int64: indices in `ids` of the maskable tokens (the content tokens), in order
    base_unit: np.ndarray  # [w] int64: index in `units` of each base's token
    base_offset: np.ndarray  # [w] int64: offset of each base within its token (0 for one-base tokens)


@dataclass(frozen=True)
class PlainOutput:
    embeddings: list[torch.Tensor]  # per window [w, d] float32 (CPU)
    boundaries: list[np.ndarray] | None  # per window [w, stages] float32; None for families without boundaries


def _pad(rows: list[np.ndarray], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    ids = np.full((len(rows), max(len(r) for r in rows)), pad_id, dtype=np.int64)
    mask = np.zeros(ids.shape, dtype=bool)
    for i, row in enumerate(rows):
        ids[i, : len(row)], mask[i, : len(row)] = row, True
    return ids, mask


class FamilyRunner:
    """Nucleotide layouts (one token per base); subclasses say how states and MLM logits come out of the model."""

    has_boundaries = False

    def __init__(self, recipe: Any, model: torch.nn.Module, config: Any, tokenizer_spec: str, device: torch.device,
                 autocast_dtype: torch.dtype | None = None):
        self.recipe = recipe
        self.model = model
        self.config = config
        self.tokenizer = load_tokenizer(tokenizer_spec)
        self.device = device
        self.autocast_dtype = autocast_dtype
        self.max_window = int(recipe.data_window(config))
        self.max_tokens = int(config.max_seq_len)
        self.acgt_ids = torch.as_tensor(self.tokenizer.encode(ACGT).astype(np.int64), device=device)
        self.vocab_size = int(config.vocab_size)

    # ---- tokenization --------------------------------------------------------------------------------------
    def prepare(self, seq: bytes, where: str) -> Prepared:
        tok = self.tokenizer
        ids = tok.add_special(tok.encode(seq)).astype(np.int64)
        if len(ids) > self.max_tokens:
            raise ConfigError(f"{where}: {len(seq)} bases make {len(ids)} tokens, more than max_seq_len "
                              f"{self.max_tokens}")
        first = len(tok.template.prefix)
        base = np.arange(len(seq), dtype=np.int64)
        return Prepared(ids, base + first, base + first, base, np.zeros(len(seq), dtype=np.int64))

    def unit_phase(self, prepared: Prepared, start: int) -> np.ndarray:
        """[U] the index that assigns each unit to one of the interleaved mask groups (phase % groups): a base's
        record coordinate, so a base is masked with the same neighbours in every window that holds it."""
        return start + np.arange(len(prepared.units), dtype=np.int64)

    # ---- model calls (per family) ----------------------------------------------------------------------------
    def _states(self, ids: torch.Tensor, mask: torch.Tensor, extras: dict) -> tuple[torch.Tensor, Any]:
        """(final per-token states [B, T, d], anything `_boundaries` needs)."""
        raise NotImplementedError

    def _logits(self, masked_ids: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, extras: dict,
                select: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logits [N, V] at the selected (masked) token positions, in row-major order."""
        raise NotImplementedError

    def _boundaries(self, aux: Any, lengths: list[int]) -> list[np.ndarray] | None:
        return None

    def _extras(self, ids: np.ndarray) -> dict:
        return {}

    # ---- shared passes -----------------------------------------------------------------------------------------
    def _autocast(self):
        # bf16 autocast on CUDA only: CPUs without bf16 matrix units run it slower than float32.
        if self.autocast_dtype is None or self.device.type != "cuda":
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=self.autocast_dtype)

    def _tensors(self, ids: np.ndarray, mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, dict]:
        extras = {k: v.to(self.device) for k, v in self._extras(ids).items()}
        return torch.from_numpy(ids).to(self.device), torch.from_numpy(mask).to(self.device), extras

    @torch.inference_mode()
    def plain(self, batch: list[Prepared], boundaries: bool) -> PlainOutput:
        ids, mask = _pad([p.ids for p in batch], self.tokenizer.pad_id)
        ids_t, mask_t, extras = self._tensors(ids, mask)
        with self._autocast():
            states, aux = self._states(ids_t, mask_t, extras)
        states = states.float().cpu()
        embeddings = [states[i, torch.from_numpy(p.base_token)] for i, p in enumerate(batch)]
        tracks = self._boundaries(aux, [len(p.base_token) for p in batch]) if boundaries else None
        return PlainOutput(embeddings, tracks)

    @torch.inference_mode()
    def masked(self, batch: list[Prepared], masked_units: list[np.ndarray]) -> list[np.ndarray]:
        """Per window [w, 4] float32 log P(A, C, G, T) at the bases of masked units; NaN at the other bases."""
        rows, masked_rows = [], []
        for prepared, units in zip(batch, masked_units):
            row = prepared.ids.copy()
            row[prepared.units[units]] = self.tokenizer.mask_id
            rows.append(prepared.ids)
            masked_rows.append(row)
        ids, mask = _pad(rows, self.tokenizer.pad_id)
        masked_ids, _ = _pad(masked_rows, self.tokenizer.pad_id)
        select = np.zeros(ids.shape, dtype=bool)
        for i, (prepared, units) in enumerate(zip(batch, masked_units)):
            select[i, prepared.units[units]] = True
        masked_t, mask_t, extras = self._tensors(masked_ids, mask)
        ids_t = torch.from_numpy(ids).to(self.device)
        with self._autocast():
            logits = self._logits(masked_t, ids_t, mask_t, extras, torch.from_numpy(select).to(self.device))
        per_token = self._token_base_logprobs(logits.float(), ids[select])  # [N, max_offset, 4]
        out = []
        cursor = 0
        for prepared, units in zip(batch, masked_units):
            count = int(units.sum())
            mine = per_token[cursor : cursor + count].cpu().numpy()
            cursor += count
            slot = np.full(len(prepared.units), -1, dtype=np.int64)  # unit -> row in `mine`
            slot[np.flatnonzero(units)] = np.arange(count)
            rows_of_base = slot[prepared.base_unit]
            values = np.full((len(prepared.base_unit), 4), np.nan, dtype=np.float32)
            hit = rows_of_base >= 0
            values[hit] = mine[rows_of_base[hit], prepared.base_offset[hit]]
            out.append(values)
        return out

    def _token_base_logprobs(self, logits: torch.Tensor, reference_ids: np.ndarray) -> torch.Tensor:
        """[N, 1, 4]: one base per token; the head's logits of A, C, G, T, renormalised."""
        return logits[:, self.acgt_ids].log_softmax(-1)[:, None, :]


class EncoderRunner(FamilyRunner):
    def _states(self, ids, mask, extras):
        return self.model.encode(ids, mask), None

    def _logits(self, masked_ids, ids, mask, extras, select):
        hidden = self.model.encode(masked_ids, mask, **extras)
        return self.model.head(hidden[select], self.model.embeddings.weight)[:, : self.vocab_size]


class EnbedRunner(FamilyRunner):
    def _states(self, ids, mask, extras):
        return self.model.encode(ids, mask), None

    def _logits(self, masked_ids, ids, mask, extras, select):
        from dnascale.models.enbed import IGNORE_INDEX, shift_right

        memory = self.model.encode(masked_ids, mask)
        decoder_inputs = shift_right(ids.masked_fill(~mask, IGNORE_INDEX))  # teacher forcing on the original
        hidden = self.model.decode(decoder_inputs, None, memory, mask)
        return self.model.lm_logits(hidden[select])[:, : self.vocab_size]


class ChunkerRunner(FamilyRunner):
    has_boundaries = True

    def _states(self, ids, mask, extras):
        hidden, levels, routings, _ = self.model.hidden_states(ids, mask)
        return self.model.head.norm(hidden), (levels, routings)

    def _logits(self, masked_ids, ids, mask, extras, select):
        hidden, _, _, _ = self.model.hidden_states(masked_ids, mask)
        return self.model.head(hidden[select], self.model.embeddings.weight)[:, : self.vocab_size]

    def _boundaries(self, aux, lengths):
        levels, routings = aux
        batch, tokens = levels[0].padding.shape
        tracks = torch.zeros(batch, tokens, len(routings), dtype=torch.float32, device=levels[0].padding.device)
        for stage, routing in enumerate(routings):
            level = levels[stage]  # stage s routes the positions of level s - 1
            prob = torch.where(level.padding, routing.prob.float(), torch.zeros_like(routing.prob.float()))
            start = torch.where(level.padding, level.start, torch.zeros_like(level.start))
            tracks[:, :, stage].scatter_add_(1, start, prob)
        first = len(self.tokenizer.template.prefix)
        tracks = tracks.cpu().numpy()
        return [tracks[i, first : first + n] for i, n in enumerate(lengths)]


class DnazenRunner(FamilyRunner):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        from dnascale.finetune.inputs import EXTRAS

        self._match = EXTRAS["dnazen"](self.config, self.tokenizer)
        pieces = self.tokenizer.tokens
        self._piece = {i: pieces[i] for i in range(self.tokenizer.vocab_size)}
        content = set(int(i) for i in self.tokenizer.content_ids)
        # Pieces made of A, C, G, T only take part in the marginals (N is a piece of its own and never merges).
        spelled = {i: p for i, p in self._piece.items() if i in content and p and set(p) <= set(ACGT)}
        longest = max(len(p) for p in spelled.values())
        letters = np.zeros((self.vocab_size, longest, 4), dtype=np.float32)
        lengths = np.zeros(self.vocab_size, dtype=np.int64)
        for i, piece in spelled.items():
            lengths[i] = len(piece)
            letters[i, np.arange(len(piece)), [ACGT.index(c) for c in piece]] = 1.0
        self._letters = torch.from_numpy(letters).to(self.device)
        self._lengths = torch.from_numpy(lengths).to(self.device)
        self._content = content

    def prepare(self, seq: bytes, where: str) -> Prepared:
        tok = self.tokenizer
        pieces = tok.encode(seq).astype(np.int64)
        lengths = np.array([len(self._piece[int(i)]) if int(i) in self._content else 0 for i in pieces])
        if lengths.sum() != len(seq) or (lengths == 0).any():
            raise DataError(f"{where}: the BPE pieces do not spell the window's {len(seq)} bases (a character "
                            "outside A C G T N?)")
        ids = tok.add_special(pieces).astype(np.int64)
        if len(ids) > self.max_tokens:
            raise ConfigError(f"{where}: {len(seq)} bases make {len(ids)} BPE tokens, more than max_seq_len "
                              f"{self.max_tokens}; use a smaller --window")
        first = len(tok.template.prefix)
        base_unit = np.repeat(np.arange(len(pieces)), lengths)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        base_offset = np.arange(len(seq)) - starts[base_unit]
        units = np.arange(len(pieces), dtype=np.int64) + first
        return Prepared(ids, units[base_unit], units, base_unit.astype(np.int64), base_offset.astype(np.int64))

    def unit_phase(self, prepared: Prepared, start: int) -> np.ndarray:
        # BPE tokens are cut per window, so their index within the window is the only stable order.
        return np.arange(len(prepared.units), dtype=np.int64)

    def _extras(self, ids):
        return self._match(ids)

    def _states(self, ids, mask, extras):
        return self.model.encode(ids, mask, **extras), None

    def _logits(self, masked_ids, ids, mask, extras, select):
        hidden = self.model.encode(masked_ids, mask, **extras)
        return self.model.head(hidden[select], self.model.embeddings.weight)[:, : self.vocab_size]

    def _token_base_logprobs(self, logits, reference_ids):
        probs = logits.softmax(-1)
        reference = torch.as_tensor(reference_ids, device=probs.device)
        same_length = self._lengths[None, :] == self._lengths[reference][:, None]  # [N, V]
        marginal = torch.einsum("nv,vjb->njb", probs * same_length, self._letters)  # [N, longest, 4]
        total = marginal.sum(-1, keepdim=True)
        return (marginal / total.clamp_min(torch.finfo(marginal.dtype).tiny)).log()


RUNNERS: dict[str, type[FamilyRunner]] = {
    "encoder": EncoderRunner,
    "enbed": EnbedRunner,
    "dnazen": DnazenRunner,
    "dnachunker": ChunkerRunner,
}


def runner_for(recipe: Any, *args, **kwargs) -> FamilyRunner:
    if recipe.name not in RUNNERS:
        raise ConfigError(f"inference does not know the {recipe.name!r} family yet; known: {sorted(RUNNERS)}")
    return RUNNERS[recipe.name](recipe, *args, **kwargs)
