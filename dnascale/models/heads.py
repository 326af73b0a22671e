"""Output heads shared by the model families.

MLM head (BERT's): dense -> GELU -> norm -> decoder tied to the vocab-parallel token embedding, plus a bias.
The logits stay vocab-parallel ([N, padded_vocab / tp] on each TP rank) and go straight into megatron's
`vocab_parallel_cross_entropy`, so no rank ever holds the full vocabulary. The decoder weight is passed into
`forward` rather than stored: the head must not own (or register twice) the embedding table it is tied to.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from torch import nn

from dnascale.nn.norms import build_norm
from dnascale.nn.tp import InitMethod, gather_last_dim, tp_rank_and_size

IGNORE_INDEX = -100


class MLMOutput(NamedTuple):
    """loss: mean cross-entropy over target positions (0 when there are none); num_targets: how many there were
    (for token-weighted averaging across data-parallel ranks); logits: [B, T, vocab_size], only on request;
    metrics: optional named scalars the training loop logs.

    A NamedTuple rather than a dataclass: ZeRO-3 finds the tensors in a module's outputs to hook its backward
    (re-gathering partitioned parameters), and it can only look inside tuples, lists and dicts.
    """

    loss: torch.Tensor
    num_targets: int
    logits: torch.Tensor | None = None
    # Family-specific scalars to log per step (e.g. realized compression): the loop averages them over
    # micro-batches and data-parallel ranks. Every rank must report the same keys.
    metrics: dict[str, torch.Tensor | float] | None = None


class MLMHead(nn.Module):
    def __init__(
        self, hidden: int, vocab_size: int, padded_vocab_size: int, norm: str, norm_eps: float,
        init_method: InitMethod,
    ) -> None:
        super().__init__()
        tp_rank, tp_size = tp_rank_and_size()
        per_rank = padded_vocab_size // tp_size
        self.vocab_size = vocab_size
        self.vocab_start = tp_rank * per_rank  # first (padded) vocabulary id whose logit this rank computes
        # Replicated across TP ranks: their inputs and output gradients are replicated, so their grads agree.
        # Created and initialised here, not through nn.Linear: under deepspeed.zero.Init a submodule's
        # parameters are partitioned as soon as its own __init__ returns, so a later init would be lost.
        self.dense_weight = nn.Parameter(torch.empty(hidden, hidden))
        self.dense_bias = nn.Parameter(torch.zeros(hidden))
        with torch.no_grad():
            init_method(self.dense_weight)
        self.norm = build_norm(norm, hidden, norm_eps)
        self.bias = nn.Parameter(torch.zeros(per_rank))
        # Vocab-parallel like the embedding rows it is added to: DeepSpeed and our sharding helpers read this mark.
        tensor_parallel.set_tensor_model_parallel_attributes(self.bias, is_parallel=True, dim=0, stride=1)

    def forward(self, hidden: torch.Tensor, decoder_weight: torch.Tensor) -> torch.Tensor:
        """hidden [..., H] (replicated) + this rank's embedding rows -> vocab-parallel logits [..., V/tp].

        Logits of padding vocabulary rows are pushed to the dtype's minimum so softmax gives them no mass.
        """
        transformed = self.norm(F.gelu(F.linear(hidden, self.dense_weight, self.dense_bias)))
        # Identity forward; backward all-reduces the input gradient over TP (each rank saw a vocabulary slice).
        transformed = tensor_parallel.copy_to_tensor_model_parallel_region(transformed)
        logits = F.linear(transformed, decoder_weight, self.bias)
        ids = torch.arange(self.vocab_start, self.vocab_start + logits.shape[-1], device=logits.device)
        return logits.masked_fill(ids >= self.vocab_size, torch.finfo(logits.dtype).min)


def masked_lm_loss(
    head: MLMHead, hidden: torch.Tensor, decoder_weight: torch.Tensor, labels: torch.Tensor | None,
    vocab_size: int, return_logits: bool,
) -> tuple[torch.Tensor, int, torch.Tensor | None]:
    """(mean loss over target positions, number of targets, full logits or None) for an MLM head over `hidden`
    [B, T, H]; labels [B, T] with IGNORE_INDEX where nothing is scored (None: no targets). The head runs only at
    target positions unless logits are asked for."""
    if labels is None:
        labels = torch.full(hidden.shape[:-1], IGNORE_INDEX, dtype=torch.long, device=hidden.device)
    targets = labels != IGNORE_INDEX
    num_targets = int(targets.sum())
    if return_logits:
        logits = head(hidden, decoder_weight)
        per_target = mlm_loss(logits[targets], labels[targets])
        full_logits = gather_logits(logits, vocab_size)
    else:
        per_target = mlm_loss(head(hidden[targets], decoder_weight), labels[targets])
        full_logits = None
    # Sum over an empty selection is a 0 still attached to the graph, so backward runs on every rank alike.
    return per_target.sum() / max(num_targets, 1), num_targets, full_logits


def mlm_loss(vocab_parallel_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-target cross-entropy (float32 at least) from vocab-parallel logits; targets are full-vocabulary ids."""
    compute = torch.promote_types(vocab_parallel_logits.dtype, torch.float32)  # bf16 logits up, float64 kept
    return tensor_parallel.vocab_parallel_cross_entropy(vocab_parallel_logits.to(compute), targets)


def gather_logits(vocab_parallel_logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Full-vocabulary logits on every TP rank, padding rows dropped."""
    full = gather_last_dim(vocab_parallel_logits)
    return full[..., :vocab_size]
