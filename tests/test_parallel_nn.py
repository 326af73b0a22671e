"""Tensor parallelism is exact: TP=2 equals TP=1 on the same full weights; plus the parallel state and mpu adapter.

Each of the 2 gloo ranks first builds every module at TP=1 (world = 2 data-parallel ranks), records the full
weights, outputs and gradients, then rebuilds megatron's groups at TP=2, loads its shard of those weights
(column-parallel split along dim 0, row-parallel along dim 1, vocab-parallel by rows, the rest replicated:
`dnascale.nn.tp.load_full_state_dict`) and compares. The TP comparisons run in float64 with tests/parity.py's
F64_TOL (the only difference is the order of the TP all-reduce sums; see there for the bound); the ZeRO-3 one
trains in float32 under DeepSpeed.
"""

from __future__ import annotations


import pytest
import torch
import torch.distributed as dist

from dist_helpers import run_distributed
from dnascale.errors import ConfigError
from parity import assert_parity, compare_tp2_with_tp1, float64, parity_seeds, sgd_losses_under_zero_stages

# Worst observed over 20 seeds (python tools/parity_sweep.py --seeds 20, 2-core CPU, 2026-12-04): TP parity
# 1.4e-14 absolute in float64 (6.4e-6 of F64_TOL); ZeRO-3 vs ZeRO-0 losses in float32 2.4e-7 (0.09 of ZERO3_TOL:
# at dp=1 ZeRO-3 runs the same sums, only its flattened buffers round the SGD update differently).
ZERO3_TOL = dict(rtol=1e-6, atol=1e-6)
HIDDEN, HEADS, BATCH, LENGTH = 32, 4, 2, 11
_sweep_seed = 0  # set per seed of the parity sweep; every weight and input below derives from it


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(1000 * _sweep_seed + seed)


def _padding() -> torch.Tensor:
    return torch.arange(LENGTH)[None, :] < torch.tensor([LENGTH, 7])[:, None]


def _weighted(out: torch.Tensor) -> torch.Tensor:
    return (out * torch.randn(out.shape, generator=_gen(5))).sum()


def _mlp(activation):
    from dnascale.nn.mlp import MLP, MLPConfig
    from dnascale.nn.tp import megatron_config, normal_init, tp_rank_and_size

    def build():
        init = normal_init(0.2)
        return MLP(MLPConfig(HIDDEN, 64, activation), megatron_config(tp_rank_and_size()[1]), init, init)

    def run(model):
        x = torch.randn(BATCH, LENGTH, HIDDEN, generator=_gen(1)).requires_grad_()
        out = model(x)
        _weighted(out).backward()
        return [out, x.grad]

    return build, run


def _self_attention(**attention):
    from dnascale.nn.attention import AttentionConfig, SelfAttention
    from dnascale.nn.tp import megatron_config, normal_init, tp_rank_and_size

    def build():
        init = normal_init(0.2)
        config = AttentionConfig(hidden=HIDDEN, heads=HEADS, **attention)
        return SelfAttention(config, megatron_config(tp_rank_and_size()[1]), init, init)

    def run(model):
        x = torch.randn(BATCH, LENGTH, HIDDEN, generator=_gen(2)).requires_grad_()
        out = model(x, key_padding=_padding())
        _weighted(out).backward()
        return [out, x.grad]

    return build, run


def _cross_attention():
    from dnascale.nn.attention import AttentionConfig, CrossAttention
    from dnascale.nn.tp import megatron_config, normal_init, tp_rank_and_size

    def build():
        init = normal_init(0.2)
        config = AttentionConfig(hidden=HIDDEN, heads=HEADS, kv_hidden=24, qk_norm="layernorm")
        return CrossAttention(config, megatron_config(tp_rank_and_size()[1]), init, init)

    def run(model):
        x = torch.randn(BATCH, LENGTH, HIDDEN, generator=_gen(3)).requires_grad_()
        memory = torch.randn(BATCH, 6, 24, generator=_gen(4)).requires_grad_()
        memory_padding = torch.arange(6)[None, :] < torch.tensor([6, 4])[:, None]
        out = model(x, memory, memory_padding)
        _weighted(out).backward()
        return [out, x.grad, memory.grad]

    return build, run


def _encoder(position):
    from dnascale.models.encoder import EncoderConfig, EncoderForMLM
    from dnascale.nn.tp import tp_rank_and_size

    def build():
        config = EncoderConfig(
            vocab_size=12, hidden=HIDDEN, layers=2, heads=HEADS, ffn_hidden=64, position=position, dropout=0.0,
            max_seq_len=64, vocab_pad_multiple=8, tp=tp_rank_and_size()[1], qk_norm="rmsnorm", init_std=0.1,
        )
        return EncoderForMLM(config)

    def run(model):
        ids = torch.randint(0, 12, (BATCH, LENGTH), generator=_gen(6))
        labels = torch.where(torch.rand(BATCH, LENGTH, generator=_gen(7)) < 0.4, ids, -100)
        labels[~_padding()] = -100
        out = model(ids, _padding(), labels, return_logits=True)
        out.loss.backward()
        return [out.loss, out.logits]

    return build, run


def _cases():
    return {
        "mlp_gelu": _mlp("gelu"),
        "mlp_swiglu": _mlp("swiglu"),
        "attention_rope_qknorm": _self_attention(position="rope", qk_norm="rmsnorm"),
        "attention_alibi_window": _self_attention(position="alibi", window=3, bias=False),
        "cross_attention": _cross_attention(),
        "encoder_rope": _encoder("rope"),
        "encoder_learned": _encoder("learned"),
    }


def _parity_worker(rank: int) -> None:
    from dnascale.parallel import DeepSpeedMPU, init_distributed

    # A grid that does not divide the world fails before anything is started.
    with pytest.raises(ConfigError, match=r"world size 2 is not divisible by tp\*pp = 3\*1 = 3"):
        init_distributed(tp=3)
    with pytest.raises(ConfigError, match=r"tp\*pp = 2\*2"):
        init_distributed(tp=2, pp=2)
    with pytest.raises(ConfigError, match="tp=0"):
        init_distributed(tp=0)
    assert not dist.is_initialized()

    mpu = DeepSpeedMPU()
    state = init_distributed(tp=1, seed=0)
    # Data-parallel sanity: two replicas, no model parallelism.
    assert (state.dp_size, state.tp_size, state.pp_size, state.dp_rank, state.tp_rank) == (2, 1, 1, rank, 0)
    assert mpu.get_data_parallel_world_size() == 2 and mpu.get_data_parallel_rank() == rank
    assert mpu.get_model_parallel_world_size() == 1 and mpu.get_tensor_model_parallel_world_size() == 1
    assert mpu.get_data_parallel_group_ranks() == [0, 1]
    assert dist.get_world_size(mpu.get_data_parallel_group()) == 2

    state = init_distributed(tp=2, seed=0)
    assert (state.dp_size, state.tp_size, state.tp_rank, state.dp_rank) == (1, 2, rank, 0)
    assert mpu.get_model_parallel_world_size() == 2 and mpu.get_model_parallel_rank() == rank
    assert mpu.get_tensor_model_parallel_rank() == rank and mpu.get_tensor_model_parallel_src_rank() == 0
    assert dist.get_process_group_ranks(mpu.get_model_parallel_group()) == [0, 1]
    assert mpu.get_data_parallel_world_size() == 1 and mpu.get_data_parallel_group_ranks() == [rank]
    assert mpu.get_pipe_parallel_world_size() == 1 and mpu.get_pipeline_model_parallel_rank() == 0

    with float64():
        for seed in parity_seeds():
            _compare_tp2_with_tp1(rank, seed)
    _check_random_streams(rank)


def _compare_tp2_with_tp1(rank: int, seed: int) -> None:
    global _sweep_seed
    _sweep_seed = seed
    compare_tp2_with_tp1(_cases(), rank, seed, test="parallel_nn")


def _check_random_streams(rank: int) -> None:
    """Default stream identical across the TP group (replicated dropout), model-parallel stream per rank."""
    from dnascale.models.encoder import EncoderConfig, EncoderForMLM
    from dnascale.parallel import model_parallel_rng, seed_everything

    seed_everything(3)
    with model_parallel_rng():
        own = torch.rand(4)
    shared = torch.rand(4)
    gathered_own = [torch.empty(4) for _ in range(2)]
    gathered_shared = [torch.empty(4) for _ in range(2)]
    dist.all_gather(gathered_own, own)
    dist.all_gather(gathered_shared, shared)
    assert not torch.equal(gathered_own[0], gathered_own[1])
    assert torch.equal(gathered_shared[0], gathered_shared[1])

    # With every dropout on, the replicated hidden states must still agree across TP ranks.
    config = EncoderConfig(vocab_size=12, hidden=HIDDEN, layers=2, heads=HEADS, ffn_hidden=64, dropout=0.2,
                           attention_dropout=0.2, max_seq_len=64, vocab_pad_multiple=8, tp=2)
    model = EncoderForMLM(config).train()
    hidden = model.encode(torch.randint(0, 12, (BATCH, LENGTH), generator=_gen(8)), _padding()).detach()
    gathered = [torch.empty_like(hidden) for _ in range(2)]
    dist.all_gather(gathered, hidden)
    assert torch.equal(gathered[0], gathered[1])


@pytest.mark.distributed
def test_tensor_parallel_matches_single_rank_and_parallel_state_is_consistent():
    # Also: the mpu adapter's sizes and groups, DP=2 sanity, grid validation, and the random streams.
    run_distributed(_parity_worker)


@pytest.mark.distributed
def test_worker_failures_fail_the_test():
    with pytest.raises(Exception, match="boom on rank 1"):
        run_distributed(_failing_worker, world_size=2, timeout=60)


def _failing_worker(rank: int) -> None:
    if rank == 1:
        raise RuntimeError("boom on rank 1")


def _zero3_worker(rank: int) -> None:
    """ZeRO-3 (built inside zero3_init) trains the TP=2 encoder exactly like ZeRO-0 (plain DP) does."""
    global _sweep_seed
    from dnascale.models.encoder import EncoderConfig, EncoderForMLM
    from dnascale.parallel import init_distributed

    init_distributed(tp=2, seed=0)
    config = EncoderConfig(vocab_size=12, hidden=HIDDEN, layers=1, heads=HEADS, ffn_hidden=64, dropout=0.0,
                           max_seq_len=64, vocab_pad_multiple=8, tp=2)
    for seed in parity_seeds():
        _sweep_seed = seed
        ids = torch.randint(0, 12, (BATCH, 16), generator=_gen(9))
        labels = torch.where(torch.rand(BATCH, 16, generator=_gen(10)) < 0.3, ids, -100)
        mask = torch.ones_like(ids, dtype=torch.bool)
        losses = sgd_losses_under_zero_stages(lambda: EncoderForMLM(config),
                                              lambda engine: engine(ids, mask, labels).loss, seed, BATCH)
        assert_parity(torch.tensor(losses[3]), torch.tensor(losses[0]), test="parallel_nn_zero3",
                      what="losses of 3 SGD steps", seed=seed, **ZERO3_TOL)


@pytest.mark.distributed
def test_zero3_with_tensor_parallel_trains_like_plain_data_parallel():
    run_distributed(_zero3_worker)


_PARENT_THEN_CHILD = """
import os, subprocess, sys
from dnascale.parallel import init_distributed
init_distributed()
child = "import os; from dnascale.parallel import init_distributed; init_distributed(); print(os.environ['MASTER_PORT'])"
result = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=240)
assert result.returncode == 0, result.stderr[-2000:]
print(os.environ["MASTER_PORT"], result.stdout.split()[-1])
"""


@pytest.mark.distributed
def test_a_child_of_a_single_process_world_starts_its_own_world():
    """A process that made itself a world of one leaves RANK/WORLD_SIZE/MASTER_PORT in its environment; a child
    (a test, a tool launching training) must not read them as a launch and rendezvous on the parent's port."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    result = subprocess.run([sys.executable, "-c", _PARENT_THEN_CHILD], capture_output=True, text=True, timeout=300,
                            env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    parent_port, child_port = result.stdout.split()[-2:]
    assert parent_port != child_port
