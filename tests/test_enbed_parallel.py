"""ENBED is exactly tensor-parallel: TP=2 equals TP=1 on the same full weights (2 gloo ranks), as in
test_parallel_nn: each rank builds the model at TP=1 (world = 2 data-parallel ranks), records full weights,
outputs and gradients, rebuilds at TP=2, loads its shard (QKV/q/kv/FFN-in column-parallel, output row-parallel,
embedding and LM head vocab-parallel, relative-position tables split by heads along dim 1, norms replicated) and
compares. Covered: bidirectional TGlobal encoder, causal local+global decoder, aligned and full cross-attention,
the MLM loss through megatron's vocab-parallel cross-entropy, the shared sequence classifier over encode();
then ZeRO-3 with TP=2 against ZeRO-0. The TP comparisons run in float64 with tests/parity.py's F64_TOL (only
the order of the TP all-reduce sums differs; see there for the bound); the ZeRO-3 one trains in float32.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from dist_helpers import run_distributed
from parity import assert_parity, compare_tp2_with_tp1, float64, parity_seeds, sgd_losses_under_zero_stages

# Worst observed over 20 seeds (python tools/parity_sweep.py --seeds 20, 2-core CPU, 2026-12-04): TP parity
# 3.3e-14 absolute in float64 (2.5e-5 of F64_TOL). ZeRO-3 vs ZeRO-0: 2.9e-5 on losses of ~5.5 (0.05 of
# ZERO3_TOL). ZeRO-3 does the same math in float32 but not in the same order (it gathers parameters and
# accumulates gradients in its own flat buffers; ENBED's relative-position tables are shared by all layers, so
# their gradients are sums, the likely place the order differs), and 3 SGD steps at lr 0.5 amplify a 1-ulp
# difference; so the bound is relative to the loss:
# 1e-6 absolute failed at seed 4 (1.8e-5 on a loss of ~5.5), a genuine ZeRO-3 fault moves the loss by > 1e-2.
ZERO3_TOL = dict(rtol=1e-4, atol=1e-6)
BATCH, LENGTH = 2, 37
_sweep_seed = 0  # set per seed of the parity sweep; every weight and input below derives from it


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(1000 * _sweep_seed + seed)


def _config(**overrides):
    from dnascale.models.enbed import EnbedConfig
    from dnascale.nn.tp import tp_rank_and_size

    fields = dict(hidden=32, ffn_hidden=64, heads=4, head_dim=8, encoder_layers=2, decoder_layers=2,
                  encoder_window=8, encoder_early_window=4, encoder_early_layers=1, decoder_window=8,
                  cross_window=6, global_block=4, max_seq_len=64, dropout=0.0, relative_max_distance=16,
                  init_factor=2.0, tp=tp_rank_and_size()[1])
    fields.update(overrides)
    return EnbedConfig(**fields)


def _batch():
    bases = torch.tensor([68, 70, 74, 87])
    labels = bases[torch.randint(0, 4, (BATCH, LENGTH), generator=_gen(1))]
    mask = torch.arange(LENGTH)[None] < torch.tensor([LENGTH, 23])[:, None]
    labels[0, -1] = labels[1, 22] = 1
    labels[1, 23:] = -100
    selected = (torch.rand(BATCH, LENGTH, generator=_gen(2)) < 0.3) & (labels > 1)
    inputs = torch.where(mask, labels.masked_fill(selected, 383), torch.zeros_like(labels))
    return inputs, mask, labels, selected


def _pretraining(**overrides):
    def build():
        from dnascale.models.enbed import EnbedForPretraining

        return EnbedForPretraining(_config(**overrides))

    def run(model):
        inputs, mask, labels, selected = _batch()
        out = model(inputs, mask, labels, mlm_mask=selected, return_logits=True)
        out.loss.backward()
        return [out.loss, out.logits]

    return build, run


def _classifier():
    def build():
        from dnascale.finetune.classifier import SequenceClassifier, drop_unused
        from dnascale.models.enbed import EnbedForPretraining

        config = _config(encoder_global=True)
        backbone = drop_unused(EnbedForPretraining(config), "enbed")
        return SequenceClassifier(backbone, config.hidden, num_labels=3, dropout=0.0)

    def run(model):
        inputs, mask, _, _ = _batch()
        out = model(inputs, mask, torch.tensor([2, 0]))
        out.loss.backward()
        return [out.loss, out.logits]

    return build, run


def _cases():
    return {
        "tglobal_encoder_aligned_cross": _pretraining(encoder_global=True, copy_weight=0.3),
        "local_encoder_full_cross": _pretraining(cross_attention="full"),
        "classifier": _classifier(),
    }


def _parity_worker(rank: int) -> None:
    from dnascale.parallel import init_distributed

    with float64():
        for seed in parity_seeds():
            _compare_tp2_with_tp1(rank, seed)

    init_distributed(tp=2, seed=0)
    # With dropout on, the replicated states must stay identical across the two TP ranks.
    from dnascale.models.enbed import EnbedForPretraining

    model = EnbedForPretraining(_config(dropout=0.2)).train()
    inputs, mask, _, _ = _batch()
    states = model.encode(inputs, mask).detach()
    gathered = [torch.empty_like(states) for _ in range(2)]
    dist.all_gather(gathered, states)
    assert torch.equal(gathered[0], gathered[1])


def _compare_tp2_with_tp1(rank: int, seed: int) -> None:
    global _sweep_seed
    _sweep_seed = seed

    def relative_bias_is_split(name, model):
        sharded = [n for n, p in model.named_parameters() if getattr(p, "tensor_model_parallel", False)]
        assert any("relative_bias" in n for n in sharded) or name == "classifier"

    compare_tp2_with_tp1(_cases(), rank, seed, test="enbed", check_tp2_model=relative_bias_is_split)


@pytest.mark.distributed
def test_enbed_tensor_parallel_matches_single_rank():
    run_distributed(_parity_worker)


def _zero3_worker(rank: int) -> None:
    """ZeRO-3 (parameters created partitioned, inside zero3_init) with TP=2 trains ENBED like ZeRO-0."""
    global _sweep_seed
    from dnascale.models.enbed import EnbedForPretraining
    from dnascale.parallel import init_distributed

    init_distributed(tp=2, seed=0)
    for seed in parity_seeds():
        _sweep_seed = seed
        inputs, mask, labels, selected = _batch()
        losses = sgd_losses_under_zero_stages(lambda: EnbedForPretraining(_config()),
                                              lambda engine: engine(inputs, mask, labels, mlm_mask=selected).loss,
                                              seed, BATCH)
        assert losses[0][2] < losses[0][0]
        assert_parity(torch.tensor(losses[3]), torch.tensor(losses[0]), test="enbed_zero3",
                      what="losses of 3 SGD steps", seed=seed, **ZERO3_TOL)


@pytest.mark.distributed
def test_enbed_zero3_with_tensor_parallel_trains_like_plain_data_parallel():
    run_distributed(_zero3_worker)
