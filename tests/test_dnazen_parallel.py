"""DNAZEN under tensor parallelism: TP=2 equals TP=1 on the same full weights (2 gloo ranks).

Each rank builds the model at TP=1 (a world of 2 data-parallel ranks), records the full weights, the loss, the
full logits and the gradients, rebuilds megatron's groups at TP=2, loads its shard of those weights and compares
in float64 with tests/parity.py's F64_TOL (only the order of the TP all-reduce sums differs; see there). Both
vocabulary tables (BPE and G-gram) are vocab-parallel; the fusion runs on the replicated residual stream, with
the csrc kernel and with the dense formulation.
"""

from __future__ import annotations

import pytest
import torch

from dist_helpers import run_distributed
from parity import F64_TOL, assert_parity, float64, parity_seeds

# Worst observed over 20 seeds (python tools/parity_sweep.py --seeds 20, 2-core CPU, 2026-12-04): 6.3e-15 absolute
# (4.8e-6 of F64_TOL), at the logits.


def _config(tp: int, fusion_backend: str):
    from dnascale.models.dnazen import DnazenConfig

    return DnazenConfig(vocab_size=40, ggram_vocab_size=30, hidden=32, layers=3, heads=4, ffn_hidden=48,
                        ggram_layers=2, ggram_heads=2, ggram_ffn_hidden=40, max_seq_len=64, dropout=0.0,
                        vocab_pad_multiple=8, init_std=0.2, tp=tp, fusion_backend=fusion_backend)


def _inputs(seed: int):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 40, (2, 16), generator=gen)
    mask = torch.arange(16)[None, :] < torch.tensor([16, 11])[:, None]
    labels = torch.where(torch.rand(2, 16, generator=gen) < 0.4, ids, -100)
    labels[~mask] = -100
    ggram_ids = torch.tensor([[3, 7, 29], [5, 0, 0]])
    triplets = torch.tensor([(0, 1, 0), (0, 2, 0), (0, 2, 1), (0, 3, 1), (0, 9, 2), (0, 10, 2), (0, 11, 2),
                             (1, 4, 0), (1, 5, 0), (0, 14, 0), (0, 15, 0)])
    return ids, mask, labels, ggram_ids, triplets


def _run(model, seed: int):
    ids, mask, labels, ggram_ids, triplets = _inputs(seed)
    out = model(ids, mask, labels, ggram_ids=ggram_ids, ggram_triplets=triplets, return_logits=True)
    out.loss.backward()
    return out


def _parity_worker(rank: int) -> None:
    with float64():
        for seed in parity_seeds():
            _compare_tp2_with_tp1(rank, seed)


def _compare_tp2_with_tp1(rank: int, seed: int) -> None:
    from dnascale.models.dnazen import DnazenForMLM
    from dnascale.nn.tp import load_full_state_dict, shard_for_rank
    from dnascale.parallel import init_distributed

    init_distributed(tp=1, seed=0)
    torch.manual_seed(seed)
    reference = DnazenForMLM(_config(1, "cpu"))
    want = _run(reference, seed)
    full = {n: p.detach().clone() for n, p in reference.named_parameters()}
    grads = {n: p.grad.detach().clone() for n, p in reference.named_parameters()}

    init_distributed(tp=2, seed=0)
    for backend in ("cpu", "dense"):
        model = DnazenForMLM(_config(2, backend))
        load_full_state_dict(model, full)
        got = _run(model, seed)
        check = dict(test="dnazen", seed=seed, **F64_TOL)
        assert_parity(got.loss, want.loss, what=f"{backend}: loss", **check)
        assert_parity(got.logits, want.logits, what=f"{backend}: logits", **check)
        for name, param in model.named_parameters():
            assert_parity(param.grad, shard_for_rank(grads[name], param, rank, 2), what=f"{backend}: grad of {name}",
                          **check)
    assert model.ggram_embeddings.word.weight.shape == (16, 32)  # 30 rows padded to 32, half per rank


@pytest.mark.distributed
def test_dnazen_tensor_parallel_2_matches_1():
    run_distributed(_parity_worker)
