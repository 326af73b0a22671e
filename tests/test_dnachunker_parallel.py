"""DNACHUNKER under parallelism (2 gloo ranks): TP=2 equals TP=1, and ZeRO-3 data parallelism with different
chunk counts on the two ranks trains without hanging.

TP: the trunk is megatron tensor-parallel; BiMamba stages, routers and residual projections are replicated and
see replicated inputs, so both ranks take the same boundary decisions as TP=1 (checked exactly) and the outputs
and gradients agree in float64 within tests/parity.py's F64_TOL (only the all-reduce order differs; see there).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from dist_helpers import run_distributed
from parity import F64_TOL, assert_parity, float64, parity_seeds

# Worst observed over 20 seeds (python tools/parity_sweep.py --seeds 20, 2-core CPU, 2026-12-04): 1.3e-15 absolute
# (9.2e-7 of F64_TOL); boundary decisions identical at every seed.
pytestmark = pytest.mark.distributed


FIELDS = dict(hidden=32, max_seq_len=64, stage_layers=1, d_state=8, headdim=8, ssm_chunk_size=8, trunk_layers=2,
              heads=4, ffn_hidden=64, qk_norm="rmsnorm", routing_backend="reference", router_init="normal",
              init_std=0.1)


def _config(tp: int):
    from dnascale.models.dnachunker import DNAChunkerConfig

    return DNAChunkerConfig(**FIELDS, tp=tp)


def _batch(seed: int, lengths=(40, 29), mask_rate=0.2):
    g = torch.Generator().manual_seed(seed)
    batch, length = len(lengths), max(lengths)
    ids = torch.randint(7, 11, (batch, length), generator=g)
    padding = torch.arange(length)[None] < torch.tensor(lengths)[:, None]
    targets = (torch.rand(batch, length, generator=g) < mask_rate) & padding
    labels = torch.where(targets, ids, -100)
    ids = torch.where(targets & (torch.rand(batch, length, generator=g) < 0.8), 3, ids)
    return torch.where(padding, ids, 4), padding, labels


def _run(model, seed: int):
    ids, padding, labels = _batch(seed)
    out = model(ids, padding, labels, return_logits=True, return_routing=True)
    out.loss.backward()
    return out


def _compare_tp2_with_tp1(rank: int, seed: int):
    from dnascale.models.dnachunker import DNAChunkerForMLM
    from dnascale.nn.tp import load_full_state_dict, shard_for_rank
    from dnascale.parallel import init_distributed

    init_distributed(tp=1, seed=0)
    torch.manual_seed(seed)
    reference_model = DNAChunkerForMLM(_config(1))
    reference = _run(reference_model, seed)
    params = {n: p.detach().clone() for n, p in reference_model.named_parameters()}
    grads = {n: p.grad.detach().clone() for n, p in reference_model.named_parameters()}

    init_distributed(tp=2, seed=0)
    model = DNAChunkerForMLM(_config(2))
    load_full_state_dict(model, params)
    out = _run(model, seed)
    for want, got in zip(reference.routing, out.routing):
        assert torch.equal(want.boundary, got.boundary) and torch.equal(want.num_chunks, got.num_chunks)
    check = dict(test="dnachunker", seed=seed, **F64_TOL)
    assert_parity(out.loss, reference.loss, what="loss", **check)
    assert_parity(out.logits, reference.logits, what="logits", **check)
    for name, param in model.named_parameters():
        assert_parity(param.grad, shard_for_rank(grads[name], param, rank, 2), what=f"grad of {name}", **check)
    return model


def _tp_worker(rank: int) -> None:
    with float64():
        for seed in parity_seeds():
            model = _compare_tp2_with_tp1(rank, seed)
    # The trunk really is split (and only the trunk and the vocab-parallel embedding).
    split = {n for n, p in model.named_parameters() if getattr(p, "tensor_model_parallel", False)}
    assert split and all(n.startswith(("trunk.", "embeddings.")) for n in split)


def test_tensor_parallel_2_equals_1():
    run_distributed(_tp_worker)


def _zero3_worker(rank: int, out_dir: str) -> None:
    import deepspeed

    from dnascale.models.dnachunker import DNAChunkerForMLM
    from dnascale.parallel import DeepSpeedMPU, init_distributed, zero3_init
    from dnascale.train.config import OptimConfig
    from dnascale.train.engine import build_engine, resolve_ds_config

    init_distributed(tp=1, seed=0)
    ds_config, _ = resolve_ds_config("ds_configs/zero3.json", micro_batch_size=2, grad_accum=1, dp_size=2)
    with zero3_init(ds_config):
        model = DNAChunkerForMLM(_config(1))
    engine, _, _ = build_engine(model, ds_config, OptimConfig(warmup_steps=0), 3, DeepSpeedMPU())
    chunks = []
    for step in range(3):
        # Different lengths and masking per rank: different chunk counts, the same modules.
        ids, padding, labels = _batch(10 * step + rank, lengths=(48, 20) if rank else (33, 33),
                                      mask_rate=0.1 + 0.2 * rank)
        out = engine(ids, padding, labels)
        engine.backward(out.loss)
        engine.step()
        assert torch.isfinite(out.loss)
        chunks.append(out.metrics["chunks_s2"])
    gathered = [None, None]
    dist.all_gather_object(gathered, chunks)
    assert gathered[0] != gathered[1]
    # A checkpoint as the loop writes it, and the full weights, for the analysis tool's consolidation below.
    engine.save_checkpoint(f"{out_dir}/checkpoints", tag="step_0000003")
    if rank == 0:
        (Path(out_dir) / "checkpoints" / "latest").write_text("step_0000003")
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        full = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    if rank == 0:
        torch.save(full, f"{out_dir}/full.pt")


def test_zero3_data_parallel_with_different_chunk_counts_per_rank(repo_root, monkeypatch, tmp_path):
    monkeypatch.chdir(repo_root)
    run_distributed(_zero3_worker, str(tmp_path))
    # tools/analysis/boundaries.py consolidates the ZeRO-3 partitions of both ranks into the trained weights.
    spec = importlib.util.spec_from_file_location("boundaries", repo_root / "tools" / "analysis" / "boundaries.py")
    boundaries = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(boundaries)
    from dnascale.parallel import destroy

    try:
        overrides = [f"{k}={v}" for k, v in FIELDS.items()]
        model, config = boundaries.load_model(tmp_path / "checkpoints", "tiny", overrides)
        want = torch.load(tmp_path / "full.pt", weights_only=True)
        got = dict(model.named_parameters())
        assert sorted(got) == sorted(want)
        for name, value in want.items():
            torch.testing.assert_close(got[name].detach(), value, rtol=0, atol=0, msg=lambda m: f"{name}: {m}")
        # ... and the boundary calls cover a whole sequence, one per stage.
        calls, covered = boundaries.boundary_tracks(model, config, "ACGTTGCAAC" * 30, batch_size=4)
        assert calls.shape == (2, 300) and covered.all() and calls[0].any()
    finally:
        torch.set_grad_enabled(True)
        destroy()
